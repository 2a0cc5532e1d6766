//! virtio-blk (virtio 1.2, 5.2) on a [`BlockBackend`], usually a raw image
//! file. Requests complete synchronously at the notify, so their effect on
//! the guest is deterministic. A host I/O error reaches the guest as
//! VIRTIO_BLK_S_IOERR, is counted in `io_errors` and is reported to the host
//! as a `tracing` warning; it is never dropped.
//!
//! ```text
//!  request: header (device-readable, 16 B): type u32 | reserved u32 | sector u64
//!           data buffers (readable for OUT, writable for IN / GET_ID)
//!           status (device-writable, 1 B, last)
//! ```

use super::queue::{Buffer, Chain, Queue, QueueError};
use super::RestoreError;
use super::VirtioDevice;
use crate::ram::Ram;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const ID_BLOCK: u32 = 2;
pub const SECTOR: u64 = 512;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
/// Largest discard / write-zeroes range per segment, and segments per
/// request (advertised in the configuration space).
const MAX_RANGE_SECTORS: u32 = 1 << 16;
const MAX_RANGE_SEGS: u32 = 32;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// Largest data transfer served per request, whatever the chain claims.
const MAX_REQUEST_BYTES: u64 = 4 << 20;

/// Storage behind a block device.
pub trait BlockBackend {
    /// Size in bytes.
    fn size_bytes(&self) -> u64;
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    /// Make written data durable (`fdatasync` for a file).
    fn flush(&mut self) -> std::io::Result<()>;
    /// The range need not keep its data (it reads back as zeros after).
    /// The default writes zeros; a file punches a hole.
    fn discard(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.write_zeroes(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk '{path}'")]
    Open { path: String, source: std::io::Error },
    #[error("disk '{path}' is {len} bytes, shorter than one {SECTOR}-byte sector")]
    TooShort { path: String, len: u64 },
    #[error("disk '{path}' is in use by another process (it holds a lock on it)")]
    Locked { path: String },
}

/// A raw image file.
pub struct FileBackend {
    file: File,
    len: u64,
}

impl FileBackend {
    pub fn open(path: &Path, read_only: bool) -> Result<FileBackend, DiskError> {
        let p = path.display().to_string();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| DiskError::Open { path: p.clone(), source })?;
        // Two writers on one image corrupt it, as would a writer under a
        // reader: lock it as QEMU does (shared for read-only use).
        let locked = if read_only { file.try_lock_shared() } else { file.try_lock() };
        match locked {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(DiskError::Locked { path: p }),
            Err(std::fs::TryLockError::Error(source)) => return Err(DiskError::Open { path: p, source }),
        }
        let len = file.metadata().map_err(|source| DiskError::Open { path: p.clone(), source })?.len();
        if len < SECTOR {
            return Err(DiskError::TooShort { path: p, len });
        }
        Ok(FileBackend { file, len })
    }
}

impl BlockBackend for FileBackend {
    fn size_bytes(&self) -> u64 {
        self.len
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }
    fn discard(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        use nix::fcntl::{fallocate, FallocateFlags};
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        use std::os::fd::AsRawFd;
        match fallocate(self.file.as_raw_fd(), flags, offset as i64, len as i64) {
            Ok(()) => Ok(()),
            // A file system without hole punching: zeros do the same job.
            Err(nix::errno::Errno::EOPNOTSUPP) => self.write_zeroes(offset, len),
            Err(e) => Err(e.into()),
        }
    }
}

pub struct Block {
    backend: Box<dyn BlockBackend>,
    read_only: bool,
    /// Capacity in sectors, fixed when the device is made.
    capacity: u64,
    id: [u8; 20],
    /// Host I/O errors so far (each answered with VIRTIO_BLK_S_IOERR).
    pub io_errors: u64,
    /// 4 KiB chunks of the disk written since the last storage delta.
    written: std::collections::BTreeSet<u64>,
    /// A host I/O error stops the machine instead of reaching the guest
    /// as VIRTIO_BLK_S_IOERR: a pair's replica is one of two, and an error
    /// only this side saw would make its guest diverge from the other's.
    pub stop_on_host_error: bool,
    /// The host error that stopped the device (with `stop_on_host_error`).
    fault: Option<String>,
    /// The request that failed then, not yet completed: (head, bytes
    /// written, where its status goes, the status). If the side runs on
    /// alone, it completes with its error status.
    unfinished: Option<(u16, u32, Option<u64>, u8)>,
    /// Hashes of the chunks written since boot, for the state hash, and
    /// the chunks written since it was last brought up to date.
    chunk_hashes: std::collections::BTreeMap<u64, u64>,
    rehash: std::collections::BTreeSet<u64>,
}

/// Granule of the disk changes an incremental snapshot carries.
const CHUNK: u64 = 4096;

impl Block {
    pub fn new(backend: Box<dyn BlockBackend>, read_only: bool, id: &str) -> Block {
        let capacity = backend.size_bytes() / SECTOR;
        let mut idb = [0u8; 20];
        let n = id.len().min(20);
        idb[..n].copy_from_slice(&id.as_bytes()[..n]);
        Block {
            backend,
            read_only,
            capacity,
            id: idb,
            io_errors: 0,
            stop_on_host_error: false,
            fault: None,
            unfinished: None,
            written: Default::default(),
            chunk_hashes: Default::default(),
            rehash: Default::default(),
        }
    }

    /// A host I/O error on a transfer: counted, and reported to the host
    /// (the guest gets VIRTIO_BLK_S_IOERR).
    fn io_error(&mut self, op: &'static str, offset: u64, len: u64, error: &std::io::Error) {
        if self.stop_on_host_error {
            self.fault.get_or_insert_with(|| format!("disk {op} of {len} bytes at offset {offset} failed: {error}"));
            return;
        }
        self.io_errors += 1;
        tracing::warn!(device = "virtio-blk", offset, len, %error, "disk {op} failed");
    }

    /// Serve one request; returns (status, bytes written to the guest).
    fn serve(&mut self, chain: &Chain, ram: &mut Ram) -> (u8, u32) {
        let Some((hdr, rest)) = chain.buffers.split_first() else { return (S_IOERR, 0) };
        let Some((status, data)) = rest.split_last() else { return (S_IOERR, 0) };
        if hdr.write || hdr.len < 16 || !status.write || status.len < 1 {
            return (S_IOERR, 0);
        }
        let mut h = [0u8; 16];
        ram.read(hdr.addr, &mut h);
        let kind = u32::from_le_bytes(h[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(h[8..16].try_into().unwrap());
        let total: u64 = data.iter().map(|b| b.len as u64).sum();
        let in_range = |len: u64| {
            sector.checked_mul(SECTOR).and_then(|o| o.checked_add(len)).is_some_and(|end| end <= self.capacity * SECTOR)
        };
        match kind {
            T_IN | T_OUT if total > MAX_REQUEST_BYTES || !in_range(total) || !total.is_multiple_of(SECTOR) => {
                (S_IOERR, 0)
            }
            T_IN if data.iter().all(|b| b.write) => self.transfer(data, sector, ram, false),
            T_OUT if self.read_only => (S_IOERR, 0),
            T_OUT if data.iter().all(|b| !b.write) => self.transfer(data, sector, ram, true),
            T_FLUSH => match self.backend.flush() {
                Ok(()) => (S_OK, 0),
                Err(error) if self.stop_on_host_error => {
                    self.fault.get_or_insert_with(|| format!("disk flush failed: {error}"));
                    (S_IOERR, 0)
                }
                Err(error) => {
                    self.io_errors += 1;
                    tracing::warn!(device = "virtio-blk", %error, "disk flush failed");
                    (S_IOERR, 0)
                }
            },
            T_GET_ID => {
                let mut n = 0;
                if let Some(b) = data.first().filter(|b| b.write) {
                    n = (b.len as usize).min(20);
                    ram.write(b.addr, &self.id[..n]);
                }
                (S_OK, n as u32)
            }
            T_DISCARD | T_WRITE_ZEROES if self.read_only => (S_IOERR, 0),
            T_DISCARD | T_WRITE_ZEROES => self.ranges(kind, data, ram),
            T_IN | T_OUT => (S_IOERR, 0),
            _ => (S_UNSUPP, 0),
        }
    }

    /// Discard or write zeroes over the segments the request lists
    /// (16 B each: sector u64, num_sectors u32, flags u32).
    fn ranges(&mut self, kind: u32, data: &[Buffer], ram: &mut Ram) -> (u8, u32) {
        let mut segs = Vec::new();
        for b in data {
            if b.write || b.len % 16 != 0 {
                return (S_IOERR, 0);
            }
            let mut raw = vec![0u8; b.len as usize];
            ram.read(b.addr, &mut raw);
            for s in raw.chunks(16) {
                let sector = u64::from_le_bytes(s[0..8].try_into().unwrap());
                let count = u32::from_le_bytes(s[8..12].try_into().unwrap());
                segs.push((sector, count));
            }
        }
        if segs.is_empty() || segs.len() > MAX_RANGE_SEGS as usize {
            return (S_IOERR, 0);
        }
        for &(sector, count) in &segs {
            let end = sector.checked_add(count as u64);
            if count > MAX_RANGE_SECTORS || end.is_none_or(|e| e > self.capacity) {
                return (S_IOERR, 0);
            }
        }
        for (sector, count) in segs {
            let (off, len) = (sector * SECTOR, count as u64 * SECTOR);
            if len == 0 {
                continue;
            }
            self.written.extend(off / CHUNK..(off + len).div_ceil(CHUNK));
            self.rehash.extend(off / CHUNK..(off + len).div_ceil(CHUNK));
            let result =
                if kind == T_DISCARD { self.backend.discard(off, len) } else { self.backend.write_zeroes(off, len) };
            if let Err(e) = result {
                let what = if kind == T_DISCARD { "discard" } else { "write-zeroes" };
                self.io_error(what, off, len, &e);
                return (S_IOERR, 0);
            }
        }
        (S_OK, 0)
    }

    fn transfer(&mut self, data: &[Buffer], sector: u64, ram: &mut Ram, write: bool) -> (u8, u32) {
        let mut off = sector * SECTOR;
        let mut written = 0u32;
        for b in data {
            let mut buf = vec![0u8; b.len as usize];
            let result = if write {
                ram.read(b.addr, &mut buf);
                let end = off + b.len as u64;
                self.written.extend(off / CHUNK..end.div_ceil(CHUNK));
                self.rehash.extend(off / CHUNK..end.div_ceil(CHUNK));
                self.backend.write_at(&buf, off)
            } else {
                self.backend.read_at(&mut buf, off).map(|()| {
                    ram.write(b.addr, &buf);
                    written += b.len;
                })
            };
            if let Err(e) = result {
                let what = if write { "write" } else { "read" };
                self.io_error(what, off, b.len as u64, &e);
                return (S_IOERR, written);
            }
            off += b.len as u64;
        }
        (S_OK, written)
    }
}

impl VirtioDevice for Block {
    fn device_id(&self) -> u32 {
        ID_BLOCK
    }
    fn features(&self) -> u64 {
        VIRTIO_BLK_F_FLUSH
            | if self.read_only { VIRTIO_BLK_F_RO } else { VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES }
    }
    fn num_queues(&self) -> usize {
        1
    }
    fn take_storage_delta(&mut self) -> std::io::Result<Vec<(u64, Vec<u8>)>> {
        let size = self.backend.size_bytes();
        let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
        for chunk in std::mem::take(&mut self.written) {
            let off = chunk * CHUNK;
            let len = CHUNK.min(size.saturating_sub(off)) as usize;
            let mut buf = vec![0u8; len];
            self.backend.read_at(&mut buf, off)?;
            // Adjacent chunks become one extent.
            match out.last_mut() {
                Some((start, data)) if *start + data.len() as u64 == off => data.extend_from_slice(&buf),
                _ => out.push((off, buf)),
            }
        }
        Ok(out)
    }
    fn forget_storage_delta(&mut self) {
        self.written.clear();
    }
    fn apply_storage(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.rehash.extend(offset / CHUNK..(offset + data.len() as u64).div_ceil(CHUNK));
        self.backend.write_at(data, offset)
    }
    fn host_fault(&self) -> Option<String> {
        self.fault.clone()
    }
    fn stop_on_host_error(&mut self, stop: bool) {
        self.stop_on_host_error = stop;
        if !stop {
            // A machine that stopped on the fault runs on with it: the
            // request it stopped at completes with its error status at the
            // next `process` (the transport calls it at once).
            self.fault = None;
        }
    }
    /// The chunks written since boot (which the state hash covers): a
    /// machine restored elsewhere hashes the same chunks of its copy.
    fn save(&self) -> Vec<u8> {
        let chunks: std::collections::BTreeSet<u64> =
            self.chunk_hashes.keys().chain(self.rehash.iter()).copied().collect();
        serde_json::to_vec(&chunks).unwrap_or_default()
    }
    fn restore(&mut self, state: &[u8]) -> Result<(), RestoreError> {
        // Snapshots from before this state existed carry none.
        let chunks: std::collections::BTreeSet<u64> = if state.is_empty() {
            Default::default()
        } else {
            serde_json::from_slice(state).map_err(|source| RestoreError::Malformed { device: "virtio-blk", source })?
        };
        // Chunks hashed already keep their hashes: their contents change
        // only through writes, which mark them for rehashing.
        self.chunk_hashes.retain(|c, _| chunks.contains(c));
        self.rehash.retain(|c| chunks.contains(c));
        self.rehash.extend(chunks.into_iter().filter(|c| !self.chunk_hashes.contains_key(c)));
        Ok(())
    }
    fn storage_digest(&mut self, h: &mut xxhash_rust::xxh3::Xxh3) {
        let size = self.backend.size_bytes();
        let mut buf = vec![0u8; CHUNK as usize];
        for chunk in std::mem::take(&mut self.rehash) {
            let off = chunk * CHUNK;
            let len = CHUNK.min(size.saturating_sub(off)) as usize;
            // A chunk the host cannot read back hashes as unreadable: the
            // state hash then differs from the peer's, and the side whose
            // disk fails is the one in doubt.
            let hash = match self.backend.read_at(&mut buf[..len], off) {
                Ok(()) => xxhash_rust::xxh3::xxh3_64(&buf[..len]),
                Err(_) => u64::MAX,
            };
            self.chunk_hashes.insert(chunk, hash);
        }
        for (chunk, hash) in &self.chunk_hashes {
            h.update(&chunk.to_le_bytes());
            h.update(&hash.to_le_bytes());
        }
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // capacity, and the discard / write-zeroes limits (virtio 1.2,
        // 5.2.4: struct virtio_blk_config, offsets 36..57).
        let mut cfg = [0u8; 60];
        cfg[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        for (at, v) in
            [(36, MAX_RANGE_SECTORS), (40, MAX_RANGE_SEGS), (44, 1), (48, MAX_RANGE_SECTORS), (52, MAX_RANGE_SEGS)]
        {
            cfg[at..at + 4].copy_from_slice(&u32::to_le_bytes(v));
        }
        cfg[56] = 1; // write_zeroes_may_unmap
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn process(&mut self, _index: usize, queue: &mut Queue, ram: &mut Ram) -> Result<bool, QueueError> {
        let mut notify = false;
        if self.fault.is_some() {
            return Ok(false);
        }
        if let Some((head, written, status_at, status)) = self.unfinished.take() {
            if let Some(at) = status_at {
                ram.write(at, &[status]);
            }
            notify |= queue.push_used(ram, head, written + 1)?;
        }
        while let Some(chain) = queue.pop(ram)? {
            let (status, written) = self.serve(&chain, ram);
            let status_at = chain.buffers.last().filter(|b| b.write && b.len >= 1).map(|b| b.addr);
            if self.fault.is_some() {
                // Not completed: the machine stops before the guest learns
                // anything of this request.
                self.unfinished = Some((chain.head, written, status_at, status));
                return Ok(notify);
            }
            if let Some(at) = status_at {
                ram.write(at, &[status]);
            }
            notify |= queue.push_used(ram, chain.head, written + 1)?;
        }
        Ok(notify)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_host_error_stops_the_device_instead_of_reaching_the_guest_when_asked() {
        let mut ram = Ram::new(BASE, 1 << 16);
        let mut d = disk(true);
        let write = request(&mut ram, T_OUT, 0, 512, false);
        assert_eq!(d.serve(&write, &mut ram).0, S_IOERR, "by default the guest sees the error");
        assert_eq!(d.host_fault(), None);
        d.stop_on_host_error = true;
        d.serve(&write, &mut ram);
        let fault = d.host_fault().expect("a host fault");
        assert!(fault.contains("disk write of 512 bytes at offset 0 failed"), "{fault}");
        // A side left alone runs on: the fault is cleared, and the next
        // error reaches the guest as on any VM.
        VirtioDevice::stop_on_host_error(&mut d, false);
        assert_eq!(d.host_fault(), None);
        assert_eq!(d.serve(&write, &mut ram).0, S_IOERR);
        assert_eq!((d.host_fault(), d.io_errors), (None, 2));
    }

    use super::*;

    /// An in-memory disk that can be told to fail.
    struct MemDisk {
        data: Vec<u8>,
        fail_writes: bool,
        flushes: usize,
    }

    impl BlockBackend for MemDisk {
        fn size_bytes(&self) -> u64 {
            self.data.len() as u64
        }
        fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            buf.copy_from_slice(&self.data[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            if self.fail_writes {
                return Err(std::io::Error::other("no space left on device"));
            }
            self.data[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.flushes += 1;
            Ok(())
        }
    }

    const BASE: u64 = 0x8000_0000;
    const HDR: u64 = BASE + 0x100;
    const DATA: u64 = BASE + 0x1000;
    const STATUS: u64 = BASE + 0x200;

    fn request(ram: &mut Ram, kind: u32, sector: u64, len: u32, data_write: bool) -> Chain {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        ram.write(HDR, &h);
        let mut buffers = vec![Buffer { addr: HDR, len: 16, write: false }];
        if len > 0 {
            buffers.push(Buffer { addr: DATA, len, write: data_write });
        }
        buffers.push(Buffer { addr: STATUS, len: 1, write: true });
        Chain { head: 0, buffers }
    }

    fn disk(fail: bool) -> Block {
        let data: Vec<u8> = (0..8 * SECTOR).map(|i| (i / SECTOR) as u8).collect();
        Block::new(Box::new(MemDisk { data, fail_writes: fail, flushes: 0 }), false, "lockstep-test")
    }

    fn read_sector(d: &mut Block, ram: &mut Ram, sector: u64) -> [u8; 512] {
        assert_eq!(d.serve(&request(ram, T_IN, sector, 512, true), ram), (S_OK, 512));
        let mut b = [0u8; 512];
        ram.read(DATA, &mut b);
        b
    }

    #[test]
    fn discard_and_write_zeroes_clear_ranges_and_check_bounds() {
        let mut ram = Ram::new(BASE, 1 << 16);
        let mut d = disk(false);
        assert_ne!(d.features() & VIRTIO_BLK_F_DISCARD, 0);
        // Two segments: sectors 1..3 and 6.
        let mut segs = Vec::new();
        for (sector, n) in [(1u64, 2u32), (6, 1)] {
            segs.extend_from_slice(&sector.to_le_bytes());
            segs.extend_from_slice(&n.to_le_bytes());
            segs.extend_from_slice(&0u32.to_le_bytes());
        }
        ram.write(DATA, &segs);
        assert_eq!(d.serve(&request(&mut ram, T_DISCARD, 0, 32, false), &mut ram), (S_OK, 0));
        for (sector, zero) in [(5, false), (1, true), (2, true), (3, false), (6, true), (7, false)] {
            let b = read_sector(&mut d, &mut ram, sector);
            assert_eq!(b.iter().all(|&x| x == 0), zero, "sector {sector}");
        }
        ram.write(DATA, &[7u64.to_le_bytes().as_slice(), &1u32.to_le_bytes(), &0u32.to_le_bytes()].concat());
        assert_eq!(d.serve(&request(&mut ram, T_WRITE_ZEROES, 0, 16, false), &mut ram), (S_OK, 0));
        assert!(read_sector(&mut d, &mut ram, 7).iter().all(|&x| x == 0));
        // Past the end, or a malformed segment list: IOERR, nothing changed.
        ram.write(DATA, &[7u64.to_le_bytes().as_slice(), &2u32.to_le_bytes(), &0u32.to_le_bytes()].concat());
        assert_eq!(d.serve(&request(&mut ram, T_DISCARD, 0, 16, false), &mut ram).0, S_IOERR);
        assert_eq!(d.serve(&request(&mut ram, T_DISCARD, 0, 10, false), &mut ram).0, S_IOERR);
        assert_eq!(read_sector(&mut d, &mut ram, 4)[0], 4);
        // Snapshots learn of the cleared chunks.
        let delta = d.take_storage_delta().unwrap();
        assert_eq!(
            delta.len(),
            1,
            "one extent over the first 4 KiB: {:?}",
            delta.iter().map(|e| e.0).collect::<Vec<_>>()
        );
    }

    #[test]
    fn read_write_flush_and_id() {
        let mut ram = Ram::new(BASE, 1 << 16);
        let mut d = disk(false);
        assert_eq!(d.serve(&request(&mut ram, T_IN, 3, 512, true), &mut ram), (S_OK, 512));
        let mut b = [0u8; 512];
        ram.read(DATA, &mut b);
        assert!(b.iter().all(|&x| x == 3));
        ram.write(DATA, &[0xab; 512]);
        assert_eq!(d.serve(&request(&mut ram, T_OUT, 5, 512, false), &mut ram), (S_OK, 0));
        assert_eq!(d.serve(&request(&mut ram, T_IN, 5, 512, true), &mut ram), (S_OK, 512));
        ram.read(DATA, &mut b);
        assert!(b.iter().all(|&x| x == 0xab));
        assert_eq!(d.serve(&request(&mut ram, T_FLUSH, 0, 0, false), &mut ram), (S_OK, 0));
        assert_eq!(d.serve(&request(&mut ram, T_GET_ID, 0, 20, true), &mut ram), (S_OK, 20));
        let mut id = [0u8; 13];
        ram.read(DATA, &mut id);
        assert_eq!(&id, b"lockstep-test");
        let mut cap = [0u8; 8];
        d.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
    }

    #[test]
    fn out_of_range_read_only_and_host_errors_are_ioerr() {
        let mut ram = Ram::new(BASE, 1 << 16);
        let mut d = disk(false);
        assert_eq!(d.serve(&request(&mut ram, T_IN, 8, 512, true), &mut ram).0, S_IOERR, "past the end");
        assert_eq!(d.serve(&request(&mut ram, T_IN, u64::MAX, 512, true), &mut ram).0, S_IOERR, "overflow");
        assert_eq!(d.serve(&request(&mut ram, 99, 0, 0, false), &mut ram).0, S_UNSUPP);
        let mut ro = Block::new(Box::new(MemDisk { data: vec![0; 1024], fail_writes: false, flushes: 0 }), true, "ro");
        assert_eq!(ro.serve(&request(&mut ram, T_OUT, 0, 512, false), &mut ram).0, S_IOERR);
        assert_ne!(ro.features() & VIRTIO_BLK_F_RO, 0);
        let mut failing = disk(true);
        assert_eq!(failing.serve(&request(&mut ram, T_OUT, 0, 512, false), &mut ram).0, S_IOERR);
        assert_eq!(failing.io_errors, 1, "counted (and reported)");
    }

    #[test]
    fn file_backend_rejects_missing_and_short_images() {
        let dir = std::env::temp_dir().join(format!("lockstep-blk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = FileBackend::open(&dir.join("missing.img"), false).err().unwrap();
        assert!(matches!(e, DiskError::Open { .. }));
        // The io error is the source, so `{:#}` prints it once.
        assert_eq!(e.to_string(), format!("cannot open disk '{}'", dir.join("missing.img").display()));
        assert!(std::error::Error::source(&e).is_some());
        let short = dir.join("short.img");
        std::fs::write(&short, [0u8; 100]).unwrap();
        let e = FileBackend::open(&short, false).err().unwrap();
        assert!(e.to_string().contains("shorter than one 512-byte sector"), "{e}");
        // One writer at a time; readers share.
        let img = dir.join("locked.img");
        std::fs::write(&img, [0u8; 4096]).unwrap();
        let writer = FileBackend::open(&img, false).unwrap();
        assert!(matches!(FileBackend::open(&img, false), Err(DiskError::Locked { .. })));
        assert!(matches!(FileBackend::open(&img, true), Err(DiskError::Locked { .. })));
        drop(writer);
        let r1 = FileBackend::open(&img, true).unwrap();
        let _r2 = FileBackend::open(&img, true).unwrap();
        assert!(matches!(FileBackend::open(&img, false), Err(DiskError::Locked { .. })));
        drop(r1);
        std::fs::remove_dir_all(&dir).ok();
    }
}
