//! Joining a running primary: its state, sent over the pair's channel as
//! `Sync` pieces, and put in place on the joining secondary.
//!
//! The primary's guest is paused at a position P while it sends (stop and
//! copy): the disk replica's allocated contents (all-zero blocks are not
//! sent; the joining replica starts empty), then a full snapshot of the
//! machine (every non-zero RAM page, the hart's and devices' state). The
//! secondary writes the disk, restores the machine, and answers with its
//! state hash, which must be the primary's at P (RAM, devices and the
//! disk chunks the guest wrote); the pair then runs from P.
//!
//! Until the copy is whole, the joining replica's record says it last ran
//! at epoch 0, older than the epoch the primary ran alone: a replica left
//! half-copied by a failure is refused as stale, never started.

use crate::replayer::MachineMaker;
use crate::vm::{replica, LinuxVm};
use anyhow::{bail, Context, Result};
use ft::link::Joining;
use machine::snapshot::Snapshot;
use machine::Machine;
use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Instant;

/// Disk contents go in blocks of this size; all-zero blocks are skipped.
const DISK_BLOCK: usize = 1 << 20;
/// The snapshot goes in parts of this size (a message's limit is 16 MiB).
const SNAPSHOT_PART: usize = 8 << 20;

/// One piece of a transfer.
#[derive(Debug, PartialEq, Eq)]
enum Piece {
    /// The disk replica's size in bytes (first, if the VM has a disk).
    DiskSize(u64),
    /// Disk contents at a byte offset.
    Disk { offset: u64, data: Vec<u8> },
    /// The next part of the snapshot's bytes.
    Snapshot(Vec<u8>),
    /// The end: the primary stopped at `at` (this boot's position;
    /// `base`: the positions of earlier boots), its state hash there.
    Done { at: u64, base: u64, state_hash: u64 },
}

impl Piece {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            Piece::DiskSize(n) => {
                b.push(1);
                b.extend_from_slice(&n.to_le_bytes());
            }
            Piece::Disk { offset, data } => {
                b.push(2);
                b.extend_from_slice(&offset.to_le_bytes());
                b.extend_from_slice(data);
            }
            Piece::Snapshot(part) => {
                b.push(3);
                b.extend_from_slice(part);
            }
            Piece::Done { at, base, state_hash } => {
                b.push(4);
                for v in [at, base, state_hash] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        b
    }

    fn decode(b: &[u8]) -> Option<Piece> {
        let u64_at = |at: usize| b.get(at..at + 8).map(|s| u64::from_le_bytes(s.try_into().unwrap()));
        Some(match *b.first()? {
            1 if b.len() == 9 => Piece::DiskSize(u64_at(1)?),
            2 => Piece::Disk { offset: u64_at(1)?, data: b.get(9..)?.to_vec() },
            3 => Piece::Snapshot(b[1..].to_vec()),
            4 if b.len() == 25 => Piece::Done { at: u64_at(1)?, base: u64_at(9)?, state_hash: u64_at(17)? },
            _ => return None,
        })
    }
}

/// What a transfer moved, for the log line.
pub struct Sent {
    pub disk_bytes: u64,
    pub snapshot_bytes: u64,
    pub millis: u128,
}

/// Primary: send the state of `m` (paused at its position) and `vm`'s disk
/// replica, then wait for the secondary's state hash and compare.
pub fn send_state(j: &mut Joining, m: &mut Machine, vm: &LinuxVm, base: u64) -> Result<Sent> {
    let t = Instant::now();
    let mut disk_bytes = 0;
    let send = |j: &mut Joining, p: Piece| j.send(p.encode()).context("the transfer broke");
    if let Some((path, _)) = &vm.disk {
        let mut f =
            std::fs::File::open(path).with_context(|| format!("cannot read the replica '{}'", path.display()))?;
        let size = f.metadata()?.len();
        send(j, Piece::DiskSize(size))?;
        let mut buf = vec![0u8; DISK_BLOCK];
        let mut offset = 0u64;
        while offset < size {
            let n = (size - offset).min(DISK_BLOCK as u64) as usize;
            f.read_exact(&mut buf[..n]).with_context(|| format!("cannot read the replica '{}'", path.display()))?;
            if buf[..n].iter().any(|&b| b != 0) {
                send(j, Piece::Disk { offset, data: buf[..n].to_vec() })?;
                disk_bytes += n as u64;
            }
            offset += n as u64;
        }
    }
    let mut snap = m.snapshot(None).context("cannot take the machine's snapshot")?;
    // The disk went whole: what the guest wrote is in it already.
    snap.extents.clear();
    let bytes = snap.to_bytes();
    for part in bytes.chunks(SNAPSHOT_PART) {
        send(j, Piece::Snapshot(part.to_vec()))?;
    }
    let at = m.hart.position().0;
    let state_hash = m.state_hash();
    send(j, Piece::Done { at, base, state_hash })?;
    let theirs = j.wait_synced().map_err(anyhow::Error::msg)?;
    if theirs != state_hash {
        bail!("the joined secondary's state hash is {theirs:016x}, this side's {state_hash:016x} at position {at}");
    }
    Ok(Sent { disk_bytes, snapshot_bytes: bytes.len() as u64, millis: t.elapsed().as_millis() })
}

/// What a secondary received.
pub struct Received {
    pub machine: Machine,
    /// The primary's position (this boot's), and its earlier boots'.
    pub at: u64,
    pub base: u64,
    pub state_hash: u64,
}

/// Secondary: take the primary's state into `vm`'s disk replica and a
/// machine built by `maker`. On an error the replica is left marked as
/// never having run (see the module documentation).
pub fn receive_state(j: &mut Joining, vm: &LinuxVm, vm_id: &str, maker: &MachineMaker) -> Result<Received> {
    let mut disk = None;
    let mut snapshot = Vec::new();
    let piece = |j: &mut Joining| -> Result<Piece> {
        let bytes = j.receive().map_err(anyhow::Error::msg)?;
        Piece::decode(&bytes).context("the primary sent a malformed piece of its state")
    };
    let (at, base, state_hash) = loop {
        match piece(j)? {
            Piece::DiskSize(size) => {
                let Some((path, false)) = &vm.disk else {
                    bail!("the primary has a disk; this secondary has no writable one (--disk)")
                };
                // Not to be started from until the copy is whole.
                replica::write(path, &replica::ReplicaRecord { vm: vm_id.into(), epoch: 0 })?;
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(path)
                    .with_context(|| format!("cannot write the replica '{}'", path.display()))?;
                f.set_len(size).with_context(|| format!("cannot size the replica '{}'", path.display()))?;
                disk = Some((f, path.clone()));
            }
            Piece::Disk { offset, data } => {
                let (f, path) = disk.as_mut().context("the primary sent disk contents before the disk's size")?;
                let write = f.seek(SeekFrom::Start(offset)).and_then(|_| f.write_all(&data));
                write.with_context(|| format!("cannot write the replica '{}' at {offset}", path.display()))?;
            }
            Piece::Snapshot(part) => snapshot.extend_from_slice(&part),
            Piece::Done { at, base, state_hash } => break (at, base, state_hash),
        }
    };
    if let Some((f, path)) = disk.take() {
        f.sync_all().with_context(|| format!("cannot write the replica '{}'", path.display()))?;
    }
    let (snap, id) = Snapshot::from_bytes(&snapshot, "the primary's state").context("the primary's state")?;
    // Any seed: the restore replaces what the boot put in RAM.
    let mut machine = maker.machine([0; 32])?;
    machine.restore(&[(snap, id)]).context("cannot restore the primary's state")?;
    let mine = machine.state_hash();
    if mine != state_hash {
        bail!("the restored state hashes to {mine:016x}, the primary's to {state_hash:016x} (at position {at})");
    }
    Ok(Received { machine, at, base, state_hash })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_survive_the_round_trip_and_garbage_is_refused() {
        for p in [
            Piece::DiskSize(1 << 30),
            Piece::Disk { offset: 4096, data: vec![7; 100] },
            Piece::Snapshot(vec![1, 2, 3]),
            Piece::Done { at: 5, base: 6, state_hash: 7 },
        ] {
            assert_eq!(Piece::decode(&p.encode()), Some(p));
        }
        for junk in [&[][..], &[9], &[1, 2], &[4, 0, 0]] {
            assert_eq!(Piece::decode(junk), None, "{junk:?}");
        }
    }
}
