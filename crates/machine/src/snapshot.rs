//! Snapshots of the whole machine: hart, devices, RAM and what the guest
//! wrote to its disks.
//!
//! The first snapshot of a run is full (every non-zero RAM page); each
//! later one is a delta naming its parent by id and carrying only the RAM
//! pages written since (dirty-page tracking) and the disk chunks written
//! since. Restoring applies a chain, oldest first, onto a machine built
//! with the same devices whose disks hold what they held when the chain's
//! first snapshot's run started.
//!
//! ```text
//!  magic "LSSNAP\0\0" | version u32 | body_len u64 | body | crc32 u32 (of body)
//!  body:  header_len u32 | header (JSON: position, parent id, state)
//!         | pages: count u64, (page u64 | 4096 bytes)*
//!         | extents: count u64, (slot u32 | offset u64 | len u32 | bytes)*
//! ```
//! The id of a snapshot is the xxh3 of its body. Files are written to a
//! temporary name and renamed, so a crash never leaves half a snapshot.

use crate::virtio::mmio::TransportState;
use crate::virtio::RestoreError;
use crate::Machine;
use rv::HartState;
use serde::{Deserialize, Serialize};
use std::path::Path;

const MAGIC: [u8; 8] = *b"LSSNAP\0\0";
pub const VERSION: u32 = 1;
const PAGE: usize = 4096;

/// Everything but RAM and disk contents.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MachineState {
    pub hart: HartState,
    pub clint: crate::clint::Clint,
    pub plic: crate::plic::Plic,
    pub uart: crate::uart::Uart,
    pub console_in: Vec<u8>,
    pub virtio: Vec<TransportState>,
    pub panicked_at: Option<u64>,
    pub panic_scan: Vec<u8>,
    pub waiting: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Header {
    position: u64,
    /// Id of the snapshot this one is a delta of.
    parent: Option<u64>,
    ram_bytes: u64,
    state: MachineState,
}

/// One snapshot in memory.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub position: u64,
    pub parent: Option<u64>,
    ram_bytes: u64,
    pub state: MachineState,
    /// (page number from the start of RAM, contents).
    pub pages: Vec<(u64, Vec<u8>)>,
    /// (virtio slot, byte offset, bytes) written to storage.
    pub extents: Vec<(u32, u64, Vec<u8>)>,
}

/// A full snapshot being copied while the guest runs on (see
/// [`Machine::snapshot_running`]).
pub struct RunningSnapshot {
    snap: Snapshot,
    /// The next page to scan.
    next: u64,
}

impl RunningSnapshot {
    /// The snapshot, once [`Machine::snapshot_copy`] has said it is done.
    pub fn finish(self) -> Snapshot {
        self.snap
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read snapshot '{path}'")]
    Read { path: String, source: std::io::Error },
    #[error("cannot write snapshot '{path}'")]
    Write { path: String, source: std::io::Error },
    #[error("snapshot '{path}' is not a lockstep snapshot")]
    NotASnapshot { path: String },
    #[error("snapshot '{path}' is format version {found}, this lockstep reads version {VERSION}")]
    Version { path: String, found: u32 },
    #[error("snapshot '{path}' is corrupt: {what}")]
    Corrupt { path: String, what: &'static str },
    #[error("snapshot '{path}' is corrupt: its header is unreadable")]
    Header { path: String, source: serde_json::Error },
    #[error("the parent snapshot {parent:016x} is not in '{dir}'")]
    MissingParent { parent: u64, dir: String },
    #[error("the chain of parent snapshots loops")]
    ParentLoop,
    #[error("snapshot does not fit this machine: {0}")]
    Mismatch(Mismatch),
    #[error("cannot write a snapshot's disk extent back to the device in virtio slot {slot}")]
    WriteBack { slot: u32, source: std::io::Error },
    #[error("snapshot does not fit this machine's virtio device in slot {slot}")]
    Device { slot: usize, source: RestoreError },
}

/// How a chain of snapshots does not fit the machine it is restored onto.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("no snapshot given")]
    Empty,
    #[error("snapshot at position {position} is not a delta of the one before it")]
    NotADelta { position: u64 },
    #[error("it has {snapshot} bytes of RAM, this machine {machine}")]
    RamSize { snapshot: u64, machine: u64 },
    #[error("it has {snapshot} virtio devices, this machine {machine}")]
    DeviceCount { snapshot: usize, machine: usize },
    #[error("page {0} is outside RAM")]
    PageOutsideRam(u64),
    #[error("no device in slot {0}")]
    NoDevice(u32),
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

impl Snapshot {
    fn body(&self) -> Vec<u8> {
        let header = Header {
            position: self.position,
            parent: self.parent,
            ram_bytes: self.ram_bytes,
            state: self.state.clone(),
        };
        let json = serde_json::to_vec(&header).expect("snapshot header serializes");
        let mut b = Vec::with_capacity(json.len() + self.pages.len() * (PAGE + 8) + 64);
        b.extend_from_slice(&(json.len() as u32).to_le_bytes());
        b.extend_from_slice(&json);
        b.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
        for (n, data) in &self.pages {
            b.extend_from_slice(&n.to_le_bytes());
            b.extend_from_slice(data);
        }
        b.extend_from_slice(&(self.extents.len() as u64).to_le_bytes());
        for (slot, off, data) in &self.extents {
            b.extend_from_slice(&slot.to_le_bytes());
            b.extend_from_slice(&off.to_le_bytes());
            b.extend_from_slice(&(data.len() as u32).to_le_bytes());
            b.extend_from_slice(data);
        }
        b
    }

    /// Write into `dir` as `POSITION-ID.lss` (the name replay looks a
    /// parent up by); returns the id and the path.
    pub fn write_in(&self, dir: &Path) -> Result<(u64, std::path::PathBuf), SnapshotError> {
        let body = self.body();
        let id = xxhash_rust::xxh3::xxh3_64(&body);
        let path = dir.join(format!("{:020}-{id:016x}.lss", self.position));
        Self::write_body(&body, &path)?;
        Ok((id, path))
    }

    /// The file of snapshot `id` in `dir`, if there is one.
    pub fn find_in(dir: &Path, id: u64) -> Option<std::path::PathBuf> {
        let suffix = format!("-{id:016x}.lss");
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(&suffix)))
    }

    /// Read the snapshot at `path` and the parents it is a delta of (from
    /// the same directory), oldest first.
    pub fn read_chain(path: &Path) -> Result<Vec<(Snapshot, u64)>, SnapshotError> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut chain = vec![Snapshot::read(path)?];
        while let Some(parent) = chain.last().and_then(|(s, _)| s.parent) {
            let p = Snapshot::find_in(dir, parent)
                .ok_or_else(|| SnapshotError::MissingParent { parent, dir: dir.display().to_string() })?;
            chain.push(Snapshot::read(&p)?);
            if chain.len() > 100_000 {
                return Err(SnapshotError::ParentLoop);
            }
        }
        chain.reverse();
        Ok(chain)
    }

    /// The snapshot as bytes (the file's format), to send elsewhere, and
    /// its id (what a delta of it names as its parent).
    pub fn to_bytes(&self) -> (Vec<u8>, u64) {
        let body = self.body();
        let id = xxhash_rust::xxh3::xxh3_64(&body);
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&(body.len() as u64).to_le_bytes());
        b.extend_from_slice(&body);
        b.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        (b, id)
    }

    /// A snapshot from [`Snapshot::to_bytes`]'s bytes (`what` names them
    /// in errors); returns it and its id.
    pub fn from_bytes(bytes: &[u8], what: &str) -> Result<(Snapshot, u64), SnapshotError> {
        Snapshot::parse(bytes, what.to_string())
    }

    /// Write to `path` (via a temporary file and a rename); returns the id.
    pub fn write(&self, path: &Path) -> Result<u64, SnapshotError> {
        let body = self.body();
        Self::write_body(&body, path)?;
        Ok(xxhash_rust::xxh3::xxh3_64(&body))
    }

    fn write_body(body: &[u8], path: &Path) -> Result<(), SnapshotError> {
        let io = |source| SnapshotError::Write { path: path.display().to_string(), source };
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        use std::io::Write;
        let mut head = MAGIC.to_vec();
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&(body.len() as u64).to_le_bytes());
        f.write_all(&head).map_err(io)?;
        f.write_all(body).map_err(io)?;
        f.write_all(&crc32fast::hash(body).to_le_bytes()).map_err(io)?;
        f.sync_data().map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Read a snapshot; returns it and its id.
    pub fn read(path: &Path) -> Result<(Snapshot, u64), SnapshotError> {
        let p = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| SnapshotError::Read { path: p.clone(), source })?;
        Snapshot::parse(&bytes, p)
    }

    fn parse(bytes: &[u8], p: String) -> Result<(Snapshot, u64), SnapshotError> {
        if bytes.len() < 24 || bytes[..8] != MAGIC {
            return Err(SnapshotError::NotASnapshot { path: p });
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        if version != VERSION {
            return Err(SnapshotError::Version { path: p, found: version });
        }
        let corrupt = |what: &'static str| SnapshotError::Corrupt { path: p.clone(), what };
        let len = u64::from_le_bytes(bytes[12..20].try_into().unwrap());
        if len.checked_add(24) != Some(bytes.len() as u64) {
            return Err(corrupt("its length does not match its header (truncated?)"));
        }
        let body = &bytes[20..20 + len as usize];
        let crc = u32::from_le_bytes(bytes[20 + len as usize..].try_into().unwrap());
        if crc32fast::hash(body) != crc {
            return Err(corrupt("checksum mismatch"));
        }
        let mut c = Cursor { b: body, at: 0 };
        let hlen = c.u32().ok_or_else(|| corrupt("no header"))? as usize;
        let header: Header = serde_json::from_slice(c.take(hlen).ok_or_else(|| corrupt("short header"))?)
            .map_err(|source| SnapshotError::Header { path: p.clone(), source })?;
        let npages = c.u64().ok_or_else(|| corrupt("no page count"))?;
        let mut pages = Vec::new();
        for _ in 0..npages {
            let n = c.u64().ok_or_else(|| corrupt("short page table"))?;
            pages.push((n, c.take(PAGE).ok_or_else(|| corrupt("short page"))?.to_vec()));
        }
        let nextents = c.u64().ok_or_else(|| corrupt("no extent count"))?;
        let mut extents = Vec::new();
        for _ in 0..nextents {
            let slot = c.u32().ok_or_else(|| corrupt("short extent"))?;
            let off = c.u64().ok_or_else(|| corrupt("short extent"))?;
            let n = c.u32().ok_or_else(|| corrupt("short extent"))? as usize;
            extents.push((slot, off, c.take(n).ok_or_else(|| corrupt("short extent"))?.to_vec()));
        }
        let snap = Snapshot {
            position: header.position,
            parent: header.parent,
            ram_bytes: header.ram_bytes,
            state: header.state,
            pages,
            extents,
        };
        Ok((snap, xxhash_rust::xxh3::xxh3_64(body)))
    }
}

/// Whether `bytes` are all zero. A full snapshot scans all of RAM with
/// the guest stopped (a joining secondary's first copy), so this goes by
/// 64-byte blocks that the compiler turns into vector ORs; a byte-by-byte
/// `any` with its early exit does not vectorize and scanned at a tenth of
/// the speed.
pub fn is_zero(bytes: &[u8]) -> bool {
    let blocks = bytes.chunks_exact(64);
    let tail = blocks.remainder();
    blocks.into_iter().all(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0) && tail.iter().all(|&x| x == 0)
}

impl Machine {
    /// Take a snapshot: full the first time, then a delta of `parent` with
    /// what changed since the previous call.
    pub fn snapshot(&mut self, parent: Option<u64>) -> std::io::Result<Snapshot> {
        let dirty = self.take_dirty_pages();
        let ram = self.board.ram.bytes();
        let page_numbers: Vec<u64> = match parent {
            Some(_) => dirty,
            None => (0..(ram.len() / PAGE) as u64)
                .filter(|&n| !is_zero(&ram[n as usize * PAGE..(n as usize + 1) * PAGE]))
                .collect(),
        };
        let ram = self.board.ram.bytes();
        let pages =
            page_numbers.into_iter().map(|n| (n, ram[n as usize * PAGE..(n as usize + 1) * PAGE].to_vec())).collect();
        let mut extents = Vec::new();
        for (slot, dev) in self.board.virtio.iter_mut().enumerate() {
            for (off, data) in dev.device_mut().take_storage_delta()? {
                extents.push((slot as u32, off, data));
            }
        }
        Ok(Snapshot {
            position: self.hart.position().0,
            parent,
            ram_bytes: self.board.ram.bytes().len() as u64,
            state: self.save_state(),
            pages,
            extents,
        })
    }

    /// Begin a full snapshot that is copied while the guest runs on (a
    /// live migration's first round): the hart's and devices' state are
    /// this moment's, and so is the start of dirty tracking; the pages are
    /// copied later, a batch at a time ([`Machine::snapshot_copy`]), each
    /// as it is then. The snapshot is fuzzy on its own; the next delta
    /// (every page written since this moment) makes it exact at the
    /// delta's position. The guest pays for a batch at a time, not for
    /// all of RAM at once. Disks are not in it (they go whole, some other
    /// way); the next delta has the chunks written from this moment on.
    pub fn snapshot_running(&mut self) -> RunningSnapshot {
        let _ = self.take_dirty_pages();
        for dev in self.board.virtio.iter_mut() {
            dev.device_mut().forget_storage_delta();
        }
        let snap = Snapshot {
            position: self.hart.position().0,
            parent: None,
            ram_bytes: self.board.ram.bytes().len() as u64,
            state: self.save_state(),
            pages: Vec::new(),
            extents: Vec::new(),
        };
        RunningSnapshot { snap, next: 0 }
    }

    /// Scan up to `pages` more pages of a running snapshot's RAM and copy
    /// the non-zero ones; whether all of RAM is done.
    pub fn snapshot_copy(&mut self, running: &mut RunningSnapshot, pages: u64) -> bool {
        let ram = self.board.ram.bytes();
        let total = (ram.len() / PAGE) as u64;
        let end = running.next.saturating_add(pages).min(total);
        for n in running.next..end {
            let page = &ram[n as usize * PAGE..(n as usize + 1) * PAGE];
            if !is_zero(page) {
                running.snap.pages.push((n, page.to_vec()));
            }
        }
        running.next = end;
        end == total
    }

    fn save_state(&self) -> MachineState {
        let b = &self.board;
        MachineState {
            hart: self.hart.state(),
            clint: b.clint.clone(),
            plic: b.plic.clone(),
            uart: b.uart.clone(),
            console_in: b.console_in.iter().copied().collect(),
            virtio: b.virtio.iter().map(|t| t.save()).collect(),
            panicked_at: self.panicked_at,
            panic_scan: self.panic_scan.clone(),
            waiting: self.waiting,
        }
    }

    /// Restore a chain of snapshots (oldest first, each a delta of the one
    /// before): RAM, disks and state end as they were at the last one.
    pub fn restore(&mut self, chain: &[(Snapshot, u64)]) -> Result<(), SnapshotError> {
        self.apply_chain(chain, None)
    }

    /// Go on from the snapshot `parent` this machine was restored to (or
    /// last went on to) with `delta`, a delta of it: only the pages and
    /// disk chunks it carries are written (and rehashed for the state
    /// hash), so a machine kept up to date this way (a secondary joining
    /// a running primary) pays for what changed, not for all of RAM.
    pub fn restore_delta(&mut self, parent: u64, delta: &(Snapshot, u64)) -> Result<(), SnapshotError> {
        self.apply_chain(std::slice::from_ref(delta), Some(parent))
    }

    fn apply_chain(&mut self, chain: &[(Snapshot, u64)], onto: Option<u64>) -> Result<(), SnapshotError> {
        let Some((last, _)) = chain.last() else {
            return Err(SnapshotError::Mismatch(Mismatch::Empty));
        };
        for (i, (s, _)) in chain.iter().enumerate() {
            let want = if i == 0 { onto } else { Some(chain[i - 1].1) };
            if s.parent != want {
                return Err(SnapshotError::Mismatch(Mismatch::NotADelta { position: s.position }));
            }
            if s.ram_bytes != self.board.ram.bytes().len() as u64 {
                let machine = self.board.ram.bytes().len() as u64;
                return Err(SnapshotError::Mismatch(Mismatch::RamSize { snapshot: s.ram_bytes, machine }));
            }
        }
        if last.state.virtio.len() != self.board.virtio.len() {
            let (snapshot, machine) = (last.state.virtio.len(), self.board.virtio.len());
            return Err(SnapshotError::Mismatch(Mismatch::DeviceCount { snapshot, machine }));
        }
        if onto.is_none() {
            self.ram_replaced();
            self.board.ram.bytes_mut().fill(0);
        }
        for (s, _) in chain {
            let ram = self.board.ram.bytes_mut();
            for (n, data) in &s.pages {
                let off = *n as usize * PAGE;
                let dst = ram.get_mut(off..off + PAGE).ok_or(SnapshotError::Mismatch(Mismatch::PageOutsideRam(*n)))?;
                dst.copy_from_slice(data);
            }
            if onto.is_some() {
                for (n, _) in &s.pages {
                    self.digest.mark(*n);
                }
            }
            for (slot, off, data) in &s.extents {
                let dev = self
                    .board
                    .virtio
                    .get_mut(*slot as usize)
                    .ok_or(SnapshotError::Mismatch(Mismatch::NoDevice(*slot)))?;
                dev.device_mut()
                    .apply_storage(*off, data)
                    .map_err(|source| SnapshotError::WriteBack { slot: *slot, source })?;
            }
        }
        let st = &last.state;
        for (slot, (t, s)) in self.board.virtio.iter_mut().zip(&st.virtio).enumerate() {
            t.restore(s).map_err(|source| SnapshotError::Device { slot, source })?;
        }
        self.hart.restore(&st.hart);
        let b = &mut self.board;
        b.clint = st.clint.clone();
        b.plic = st.plic.clone();
        b.uart = st.uart.clone();
        b.console_in = st.console_in.iter().copied().collect();
        b.console_out.clear();
        self.panicked_at = st.panicked_at;
        self.panic_scan = st.panic_scan.clone();
        self.waiting = st.waiting;
        self.next_hash = 0;
        // Start dirty tracking afresh from the restored state.
        let _ = self.take_dirty_pages();
        let _ = self.board.ram.take_written();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_sees_a_single_set_byte_anywhere() {
        for len in [0usize, 1, 63, 64, 65, 4096, 4100] {
            let mut b = vec![0u8; len];
            assert!(is_zero(&b), "{len}");
            for at in [0, len / 2, len.saturating_sub(1)] {
                if at < len {
                    b[at] = 0x40;
                    assert!(!is_zero(&b), "{len} {at}");
                    b[at] = 0;
                }
            }
        }
    }
    use rv::Position;

    fn machine() -> (Machine, crate::programs::Program) {
        let p = crate::programs::int_loop_u_sv39(2_000_000);
        let mut m = Machine::new(16 << 20);
        p.load(&mut m.board.ram);
        m.hart.set_pc(p.entry);
        (m, p)
    }

    fn run_to(m: &mut Machine, pos: u64) {
        assert!(m.run_until(Position(pos), |_| false).unwrap());
    }

    #[test]
    fn a_snapshot_copied_while_the_guest_runs_is_exact_with_its_next_delta() {
        let (mut a, _) = machine();
        run_to(&mut a, 1_500_000);
        let reference = a.state_hash();
        // The copy starts at 1 M and goes a few pages at a time, the guest
        // writing RAM in between.
        let (mut b, _) = machine();
        run_to(&mut b, 1_000_000);
        let mut running = b.snapshot_running();
        let mut at = 1_000_000;
        while !b.snapshot_copy(&mut running, 512) {
            at += 50_000;
            run_to(&mut b, at);
        }
        assert!(at > 1_000_000, "the copy took several steps");
        run_to(&mut b, 1_500_000);
        let (full, full_id) = Snapshot::from_bytes(&running.finish().to_bytes().0, "full").unwrap();
        let delta = b.snapshot(Some(full_id)).unwrap();
        let delta = Snapshot::from_bytes(&delta.to_bytes().0, "delta").unwrap();
        let mut c = Machine::new(16 << 20);
        c.restore(&[(full, full_id), delta]).unwrap();
        assert_eq!(c.hart.position().0, 1_500_000);
        assert_eq!(c.state_hash(), reference);
    }

    /// Guest time moved past the S-timer's deadline without running (an
    /// idle skip, or the run loop catching up with host time): the hart
    /// raises STIP when it next runs, not during the skip. A snapshot taken
    /// in between must restore to that same state (STIP still to come),
    /// not to one with STIP already raised: a joining secondary's state hash
    /// would differ from the primary's (seen once in the nemesis test).
    #[test]
    fn a_snapshot_taken_when_the_s_timer_is_due_restores_to_the_same_state() {
        use crate::layout::INSNS_PER_TICK;
        use rv::csr::{MENVCFG, MENVCFG_STCE, STIMECMP};
        for skip_to in [50_000 * INSNS_PER_TICK, 60_000 * INSNS_PER_TICK] {
            let (mut a, _) = machine();
            a.hart.write_csr_m(MENVCFG, MENVCFG_STCE);
            a.hart.write_csr_m(STIMECMP, 50_000);
            run_to(&mut a, 1_000_000);
            // Exactly to the deadline, and past it.
            a.skip(skip_to - 1_000_000);
            let hash = a.state_hash();
            let snap = Snapshot::from_bytes(&a.snapshot(None).unwrap().to_bytes().0, "full").unwrap();
            let mut c = Machine::new(16 << 20);
            c.restore(&[snap]).unwrap();
            assert_eq!(c.hart.state(), a.hart.state(), "skipped to {skip_to}");
            assert_eq!(c.state_hash(), hash);
            run_to(&mut a, skip_to + 100_000);
            run_to(&mut c, skip_to + 100_000);
            assert_eq!(c.state_hash(), a.state_hash());
        }
    }

    #[test]
    fn a_restored_chain_continues_to_the_same_state() {
        let dir = std::env::temp_dir().join(format!("lockstep-snap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // The reference: one machine that never stops.
        let (mut a, _) = machine();
        run_to(&mut a, 3_000_000);
        let reference = a.state_hash();

        // Snapshots along the way: full at 1 M, a delta at 2 M.
        let (mut b, _) = machine();
        run_to(&mut b, 1_000_000);
        let full = b.snapshot(None).unwrap();
        let full_id = full.write(&dir.join("s1")).unwrap();
        run_to(&mut b, 2_000_000);
        let hash_at_2m = b.state_hash();
        let delta = b.snapshot(Some(full_id)).unwrap();
        assert!(delta.pages.len() < full.pages.len(), "a delta carries only what changed");
        let delta_id = delta.write(&dir.join("s2")).unwrap();
        run_to(&mut b, 3_000_000);
        assert_eq!(b.state_hash(), reference, "taking snapshots changes nothing");

        // A fresh machine restored from the files continues identically.
        let chain = vec![Snapshot::read(&dir.join("s1")).unwrap(), Snapshot::read(&dir.join("s2")).unwrap()];
        assert_eq!((chain[0].1, chain[1].1), (full_id, delta_id));
        let mut c = Machine::new(16 << 20);
        c.restore(&chain).unwrap();
        assert_eq!(c.hart.position().0, 2_000_000);
        assert_eq!(c.state_hash(), hash_at_2m);
        run_to(&mut c, 3_000_000);
        assert_eq!(c.state_hash(), reference);

        // A chain out of order, a machine of another size, a damaged file.
        let mut d = Machine::new(16 << 20);
        let backwards = vec![chain[1].clone(), chain[0].clone()];
        assert!(matches!(d.restore(&backwards), Err(SnapshotError::Mismatch(Mismatch::NotADelta { .. }))));
        let mut e = Machine::new(32 << 20);
        let err = e.restore(&chain).unwrap_err();
        assert!(matches!(err, SnapshotError::Mismatch(Mismatch::RamSize { .. })), "{err:?}");
        assert_eq!(
            err.to_string(),
            "snapshot does not fit this machine: it has 16777216 bytes of RAM, this machine 33554432"
        );
        let mut bytes = std::fs::read(dir.join("s2")).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 1;
        std::fs::write(dir.join("bad"), &bytes).unwrap();
        assert!(matches!(Snapshot::read(&dir.join("bad")), Err(SnapshotError::Corrupt { .. })));
        std::fs::write(dir.join("short"), &bytes[..n - 10]).unwrap();
        assert!(matches!(Snapshot::read(&dir.join("short")), Err(SnapshotError::Corrupt { .. })));
        let missing = Snapshot::read(&dir.join("missing")).unwrap_err();
        assert!(matches!(missing, SnapshotError::Read { .. }), "{missing:?}");
        assert!(!missing.to_string().contains("os error"), "the io error is the source only: {missing}");
        std::fs::write(dir.join("junk"), b"hello").unwrap();
        assert!(matches!(Snapshot::read(&dir.join("junk")), Err(SnapshotError::NotASnapshot { .. })));
        std::fs::remove_dir_all(&dir).ok();
    }
}
