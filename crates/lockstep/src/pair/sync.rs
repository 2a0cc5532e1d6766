//! Joining a running primary: its state, sent over the pair's channel as
//! `Sync` pieces, and put in place on the joining secondary.
//!
//! Pre-copy, as live migration does it: at a position P0 the primary
//! starts a full snapshot of the machine (the hart's and devices' state,
//! and dirty tracking from there on) and lets its guest run on, alone,
//! while a thread sends the disk replica's allocated contents (all-zero
//! blocks are not sent: the joining replica starts empty). RAM's non-zero
//! pages are copied a step (16 MiB) at a time between the guest's slices,
//! each as it is then, and go after the disk; the pages the guest wrote
//! since P0 are in the next round, which makes the copy exact. Then rounds: a
//! delta snapshot (the RAM pages and disk chunks written since the last
//! one), sent while the guest runs on, until one is small; that last one
//! is sent with the guest paused at P, and the secondary restores the
//! chain onto its copy of the disk and answers with its state hash, which
//! must be the primary's at P (RAM, devices and the disk chunks the guest
//! wrote). The pair runs from P. A disk block the guest wrote while it was
//! being read is in a later delta, so what it read does not matter.
//!
//! The disk goes whole to a new replica, and in part to one that comes
//! back: the secondary first says what its replica holds (its change
//! history, [`crate::vm::changes`]); if it shares a generation with the
//! primary's, only the chunks either side wrote since are sent.
//!
//! Until the copy is whole, the joining replica's record says it last ran
//! at epoch 0, older than the epoch the primary ran alone: a replica left
//! half-copied by a failure is refused as stale, never started. (Its
//! change history still covers what the transfer wrote, so the next
//! attempt sends those chunks again.)

use crate::replayer::MachineMaker;
use crate::vm::changes::{self, ChunkSet, History};
use crate::vm::{replica, LinuxVm};
use anyhow::{bail, Context, Result};
use ft::link::Joining;
use machine::snapshot::{RunningSnapshot, Snapshot};
use machine::Machine;
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Disk contents go in blocks of this size (a tracked chunk); all-zero
/// blocks are skipped in a whole copy.
const DISK_BLOCK: usize = changes::CHUNK_BYTES as usize;
/// The snapshot goes in parts of this size (a message's limit is 16 MiB).
const SNAPSHOT_PART: usize = 8 << 20;

/// One piece of a transfer.
#[derive(Debug, PartialEq, Eq)]
enum Piece {
    /// Secondary → primary, first: its replica's change history.
    History(Vec<u8>),
    /// The disk replica's size in bytes (first, if the VM has a disk): a
    /// whole copy follows.
    DiskSize(u64),
    /// Instead: the secondary's replica shares generation `common` with
    /// the primary's, and is kept; the chunks that may differ follow.
    DiskKeep { size: u64, common: u64 },
    /// Disk contents at a byte offset.
    Disk { offset: u64, data: Vec<u8> },
    /// The next part of the current snapshot's bytes ...
    Snapshot(Vec<u8>),
    /// ... and its end (the next snapshot is a delta of it).
    SnapshotEnd,
    /// The end: the primary stopped at `at` (this boot's position;
    /// `base`: the positions of earlier boots), its state hash there, and
    /// the disk generation the two replicas begin there.
    Done { at: u64, base: u64, state_hash: u64, generation: u64 },
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
            Piece::SnapshotEnd => b.push(5),
            Piece::Done { at, base, state_hash, generation } => {
                b.push(4);
                for v in [at, base, state_hash, generation] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
            }
            Piece::History(h) => {
                b.push(6);
                b.extend_from_slice(h);
            }
            Piece::DiskKeep { size, common } => {
                b.push(7);
                b.extend_from_slice(&size.to_le_bytes());
                b.extend_from_slice(&common.to_le_bytes());
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
            4 if b.len() == 33 => {
                Piece::Done { at: u64_at(1)?, base: u64_at(9)?, state_hash: u64_at(17)?, generation: u64_at(25)? }
            }
            5 if b.len() == 1 => Piece::SnapshotEnd,
            6 => Piece::History(b[1..].to_vec()),
            7 if b.len() == 17 => Piece::DiskKeep { size: u64_at(1)?, common: u64_at(9)? },
            _ => return None,
        })
    }
}

/// What a transfer moved, for the log line.
#[derive(Default)]
pub struct Sent {
    pub disk_bytes: u64,
    /// The disk went in part (a returning replica): the chunks that may
    /// have differed, and the generation the replicas shared.
    pub disk_delta: Option<(u64, u64)>,
    pub snapshot_bytes: u64,
    /// Delta rounds sent while the guest ran.
    pub rounds: u32,
    /// The guest's pause for the last round and the secondary's answer.
    pub pause_ms: u128,
    /// The guest's pause to start the first round (its state) ...
    pub first_pause_ms: u128,
    /// ... and its longest pause for a step of that round's RAM.
    pub step_pause_ms: u128,
}

/// Pages of RAM the first round scans (and copies, if not zero) per step:
/// 16 MiB, a few milliseconds of the guest's time; it runs between steps.
const SCAN_PAGES_PER_STEP: u64 = 4096;

/// A delta at most this large is the last (sent with the guest paused).
const LAST_ROUND_BYTES: usize = 8 << 20;
/// At most this many rounds while the guest runs (a guest that writes
/// memory faster than the link carries it never converges).
const MAX_ROUNDS: u32 = 4;

/// How far a transfer has come, for the primary's status (see
/// [`ft::SyncProgress`]); shared with the sending thread.
#[derive(Clone)]
pub struct Progress(Arc<Mutex<ProgressState>>);

struct ProgressState {
    shared: Arc<ft::link::Shared>,
    peer: String,
    started: Instant,
    reported: Instant,
    phase: String,
    done: u64,
    total: u64,
}

/// The status is refreshed at most this often while bytes flow.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

impl Progress {
    /// Report into `shared` (the primary's link status) for a transfer to `peer`.
    pub fn new(shared: Arc<ft::link::Shared>, peer: &str) -> Progress {
        let now = Instant::now();
        let state = ProgressState {
            shared,
            peer: peer.to_string(),
            started: now,
            reported: now,
            phase: String::new(),
            done: 0,
            total: 0,
        };
        Progress(Arc::new(Mutex::new(state)))
    }

    /// A new phase, with `more` bytes to go.
    fn phase(&self, name: &str, more: u64) {
        let mut p = self.0.lock().unwrap();
        p.phase = name.to_string();
        p.total += more;
        p.report();
    }

    /// `n` more bytes done.
    fn advance(&self, n: u64) {
        let mut p = self.0.lock().unwrap();
        p.done = (p.done + n).min(p.total);
        if p.reported.elapsed() >= PROGRESS_EVERY {
            p.report();
        }
    }

    /// No transfer under way any more.
    pub fn clear(&self) {
        self.0.lock().unwrap().shared.set_sync(None);
    }
}

impl ProgressState {
    fn report(&mut self) {
        self.reported = Instant::now();
        let secs = self.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 { self.done as f64 / secs } else { 0.0 };
        let left = self.total.saturating_sub(self.done) as f64;
        self.shared.set_sync(Some(ft::SyncProgress {
            peer: self.peer.clone(),
            phase: self.phase.clone(),
            bytes_done: self.done,
            bytes_total: self.total,
            percent: if self.total > 0 { 100.0 * self.done as f64 / self.total as f64 } else { 0.0 },
            eta_s: (rate > 0.0).then(|| left / rate),
        }));
    }
}

/// What a round's thread hands back: the connection, the bytes it sent,
/// and the id of the snapshot it encoded (the first round's is encoded on
/// the thread, off the guest's time).
struct RoundSent {
    j: Joining,
    disk: u64,
    disk_delta: Option<(u64, u64)>,
    snapshot: u64,
    id: Option<u64>,
}

/// A transfer under way: the thread sending the current round, and the id
/// of the last snapshot taken (the next is a delta of it).
pub struct Copy {
    sending: std::thread::JoinHandle<Result<RoundSent>>,
    /// The first round's RAM, still being copied a step at a time while
    /// the guest runs (the thread on its way sends the disk meanwhile).
    filling: Option<Box<RunningSnapshot>>,
    /// The id of the last snapshot taken, if known before its thread ends.
    parent: Option<u64>,
    first_pause_ms: u128,
    step_pause_ms: u128,
    rounds: u32,
    disk_bytes: u64,
    disk_delta: Option<(u64, u64)>,
    snapshot_bytes: u64,
    progress: Progress,
    /// The primary's replica's change tracker (a new generation begins
    /// when the transfer is through).
    tracker: Option<changes::ChangeTracker>,
}

/// How long the primary waits for a joining secondary's first word.
const HISTORY_WAIT: Duration = Duration::from_secs(30);

/// Primary: what the secondary that just connected says its replica holds.
pub fn peer_history(j: &mut Joining) -> Result<History> {
    j.set_wait(Some(HISTORY_WAIT));
    let bytes = j.receive().map_err(anyhow::Error::msg)?;
    j.set_wait(None);
    match Piece::decode(&bytes) {
        Some(Piece::History(h)) => {
            History::decode(&h).map_err(|why| anyhow::anyhow!("the secondary's replica history is unreadable: {why}"))
        }
        _ => bail!("the secondary did not say what its replica holds"),
    }
}

/// Send a snapshot and wait until the secondary has it in place; returns
/// the secondary's state hash there.
fn send_snapshot(j: &mut Joining, bytes: &[u8], progress: &Progress) -> Result<u64> {
    for part in bytes.chunks(SNAPSHOT_PART) {
        j.send(Piece::Snapshot(part.to_vec()).encode()).context("the transfer broke")?;
        progress.advance(part.len() as u64);
    }
    j.send(Piece::SnapshotEnd.encode()).context("the transfer broke")?;
    j.wait_synced().map_err(anyhow::Error::msg)
}

/// Primary: take the full snapshot of `m` at its position and start
/// sending it, after `vm`'s disk replica, on a thread; `done` is set when
/// the thread is through (the guest runs on meanwhile).
pub fn start_copy(
    mut j: Joining,
    theirs: History,
    m: &mut Machine,
    vm: &LinuxVm,
    done: Arc<AtomicBool>,
    progress: Progress,
) -> Result<Copy> {
    // The guest waits only for the hart's and devices' state: RAM is
    // copied a step at a time as it runs on (`next_round`), and what it
    // writes meanwhile is in the next delta.
    let t = Instant::now();
    let running = m.snapshot_running();
    let first_pause_ms = t.elapsed().as_millis();
    let disk = vm.disk.as_ref().map(|(path, _)| path.clone());
    // What may differ on a returning replica: the changes both sides
    // marked since the generation they share, up to this point.
    let tracker = disk.as_deref().and_then(changes::tracker);
    let delta = tracker.as_ref().and_then(|t| t.history().differences(&theirs));
    let p = progress.clone();
    let sending = std::thread::spawn(move || {
        let result = (|| {
            let (mut disk_bytes, mut disk_delta) = (0, None);
            if let Some(path) = disk {
                disk_bytes = match delta {
                    Some((common, chunks)) => {
                        disk_delta = Some((chunks.len(), common));
                        send_changed_chunks(&mut j, &path, common, &chunks, &p)?
                    }
                    None => send_disk(&mut j, &path, &p)?,
                };
            }
            Ok(RoundSent { j, disk: disk_bytes, disk_delta, snapshot: 0, id: None })
        })();
        // (No `done` yet: the snapshot's thread follows this one.)
        result
    });
    // Back at the next slice for the first step of RAM.
    done.store(true, Ordering::SeqCst);
    Ok(Copy {
        sending,
        filling: Some(Box::new(running)),
        parent: None,
        first_pause_ms,
        step_pause_ms: 0,
        rounds: 0,
        disk_bytes: 0,
        disk_delta: None,
        snapshot_bytes: 0,
        progress,
        tracker,
    })
}

fn open_replica(path: &std::path::Path) -> Result<(std::fs::File, u64)> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot read the replica '{}'", path.display()))?;
    let size = f.metadata().with_context(|| format!("cannot read the replica '{}'", path.display()))?.len();
    Ok((f, size))
}

/// The disk's size, then its non-zero blocks; returns the bytes sent.
fn send_disk(j: &mut Joining, path: &std::path::Path, progress: &Progress) -> Result<u64> {
    let (mut f, size) = open_replica(path)?;
    progress.phase("disk", size);
    j.send(Piece::DiskSize(size).encode()).context("the transfer broke")?;
    let mut buf = vec![0u8; DISK_BLOCK];
    let (mut offset, mut sent) = (0u64, 0u64);
    while offset < size {
        let n = (size - offset).min(DISK_BLOCK as u64) as usize;
        f.read_exact(&mut buf[..n]).with_context(|| format!("cannot read the replica '{}'", path.display()))?;
        if !machine::snapshot::is_zero(&buf[..n]) {
            j.send(Piece::Disk { offset, data: buf[..n].to_vec() }.encode()).context("the transfer broke")?;
            sent += n as u64;
        }
        progress.advance(n as u64);
        offset += n as u64;
    }
    Ok(sent)
}

/// A returning replica: keep it, and send the chunks that may differ
/// (zeros too: the other side's copy of a chunk may not be); returns the
/// bytes sent.
fn send_changed_chunks(
    j: &mut Joining,
    path: &std::path::Path,
    common: u64,
    chunks: &ChunkSet,
    progress: &Progress,
) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let (f, size) = open_replica(path)?;
    progress.phase("disk", chunks.len() * DISK_BLOCK as u64);
    j.send(Piece::DiskKeep { size, common }.encode()).context("the transfer broke")?;
    let mut buf = vec![0u8; DISK_BLOCK];
    let mut sent = 0u64;
    for chunk in chunks.iter() {
        let offset = chunk * DISK_BLOCK as u64;
        if offset >= size {
            break;
        }
        let n = (size - offset).min(DISK_BLOCK as u64) as usize;
        f.read_exact_at(&mut buf[..n], offset)
            .with_context(|| format!("cannot read the replica '{}' at {offset}", path.display()))?;
        j.send(Piece::Disk { offset, data: buf[..n].to_vec() }.encode()).context("the transfer broke")?;
        sent += n as u64;
        progress.advance(n as u64);
    }
    Ok(sent)
}

/// What the primary does next with a transfer whose round is through.
pub enum Round {
    /// Another round is on its way (the guest runs on).
    Sending(Copy),
    /// The secondary holds the state at the machine's position.
    Joined(Joining, Sent),
}

/// Primary: the round on its way is through (`done` was set): take the
/// delta since it; a large one is sent while the guest runs on, a small
/// one (or the last allowed) ends the transfer with the guest paused, and
/// the state hashes are compared.
pub fn next_round(mut copy: Copy, m: &mut Machine, base: u64, done: Arc<AtomicBool>) -> Result<Round> {
    if let Some(mut running) = copy.filling.take() {
        let t = Instant::now();
        let complete = m.snapshot_copy(&mut running, SCAN_PAGES_PER_STEP);
        copy.step_pause_ms = copy.step_pause_ms.max(t.elapsed().as_millis());
        if !complete {
            copy.filling = Some(running);
            done.store(true, Ordering::SeqCst);
            return Ok(Round::Sending(copy));
        }
        // All of RAM is copied: it goes after the disk, from a thread that
        // waits for the disk's.
        let snap = running.finish();
        let (disk_thread, p, finished) = (copy.sending, copy.progress.clone(), done.clone());
        let sending = std::thread::spawn(move || {
            let result = (|| {
                let sent = disk_thread.join().map_err(|_| anyhow::anyhow!("the transfer thread failed"))??;
                let (bytes, id) = snap.to_bytes();
                drop(snap);
                p.phase("memory", bytes.len() as u64);
                let mut j = sent.j;
                send_snapshot(&mut j, &bytes, &p)?;
                Ok(RoundSent { j, snapshot: bytes.len() as u64, id: Some(id), ..sent })
            })();
            finished.store(true, Ordering::SeqCst);
            result
        });
        return Ok(Round::Sending(Copy { sending, ..copy }));
    }
    let RoundSent { mut j, disk, disk_delta, snapshot, id } =
        copy.sending.join().map_err(|_| anyhow::anyhow!("the transfer thread failed"))??;
    let disk_bytes = copy.disk_bytes + disk;
    let disk_delta = copy.disk_delta.or(disk_delta);
    let previous = id.or(copy.parent).context("the transfer lost its last snapshot's id")?;
    let t = Instant::now();
    let delta = m.snapshot(Some(previous)).context("cannot take the machine's snapshot")?;
    let (bytes, parent) = delta.to_bytes();
    let snapshot_bytes = copy.snapshot_bytes + snapshot + bytes.len() as u64;
    let rounds = copy.rounds + 1;
    let (progress, copy_tracker) = (copy.progress, copy.tracker);
    if bytes.len() > LAST_ROUND_BYTES && rounds < MAX_ROUNDS {
        done.store(false, Ordering::SeqCst);
        progress.phase(&format!("round {rounds}"), bytes.len() as u64);
        let p = progress.clone();
        let sending = std::thread::spawn(move || {
            let result = send_snapshot(&mut j, &bytes, &p).map(|_| RoundSent {
                j,
                disk: 0,
                disk_delta: None,
                snapshot: 0,
                id: None,
            });
            done.store(true, Ordering::SeqCst);
            result
        });
        let (first_pause_ms, step_pause_ms) = (copy.first_pause_ms, copy.step_pause_ms);
        let parent = Some(parent);
        return Ok(Round::Sending(Copy {
            sending,
            filling: None,
            parent,
            first_pause_ms,
            step_pause_ms,
            rounds,
            disk_bytes,
            disk_delta,
            snapshot_bytes,
            progress,
            tracker: copy_tracker,
        }));
    }
    progress.phase("final round", bytes.len() as u64);
    let theirs = send_snapshot(&mut j, &bytes, &progress)?;
    let at = m.hart.position().0;
    let state_hash = m.state_hash();
    if theirs != state_hash {
        let why = format!(
            "the joined secondary's state hash is {theirs:016x}, this side's {state_hash:016x} at position {at} \
             ({})",
            describe_parts(m.state_hash_parts())
        );
        // The secondary says its parts when it reads this.
        j.refuse(&why);
        bail!("{why}");
    }
    let generation = changes::new_generation_id()?;
    j.send(Piece::Done { at, base, state_hash, generation }.encode()).context("the transfer broke")?;
    // The secondary's word that it runs from here.
    j.wait_synced().map_err(anyhow::Error::msg)?;
    // The replicas are equal here. (Had this side died just before, the
    // secondary would share an older generation with it, or none.)
    if let Some(t) = &copy_tracker {
        t.begin(generation, false).context("cannot record the disk generation")?;
    }
    let sent = Sent {
        disk_bytes,
        disk_delta,
        snapshot_bytes,
        rounds,
        pause_ms: t.elapsed().as_millis(),
        first_pause_ms: copy.first_pause_ms,
        step_pause_ms: copy.step_pause_ms,
    };
    Ok(Round::Joined(j, sent))
}

/// The parts of a state hash, for comparing two sides' logs.
fn describe_parts([devices, disk, ram]: [u64; 3]) -> String {
    format!("hart and devices {devices:016x}, disk {disk:016x}, RAM {ram:016x}")
}

/// Secondary: the replica at `path`, opened for the primary's contents
/// (emptied first unless it is kept) and marked as not to be started from
/// until the transfer is through.
fn open_for_transfer(path: &std::path::Path, vm_id: &str, size: u64, empty: bool) -> Result<std::fs::File> {
    replica::write(path, &replica::ReplicaRecord { vm: vm_id.into(), epoch: 0 })?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(empty)
        .open(path)
        .with_context(|| format!("cannot write the replica '{}'", path.display()))?;
    f.set_len(size).with_context(|| format!("cannot size the replica '{}'", path.display()))?;
    Ok(f)
}

/// What a secondary received.
pub struct Received {
    pub machine: Machine,
    /// The primary's position (this boot's), and its earlier boots'.
    pub at: u64,
    pub base: u64,
    pub state_hash: u64,
    /// The replica was kept and updated (the generation it shared with
    /// the primary's), not copied whole.
    pub kept: Option<u64>,
}

/// Secondary: take the primary's state into `vm`'s disk replica and a
/// machine built by `maker`. On an error the replica is left marked as
/// never having run (see the module documentation).
pub fn receive_state(j: &mut Joining, vm: &LinuxVm, vm_id: &str, maker: &MachineMaker) -> Result<Received> {
    // First, what this replica holds: a returning one gets only what may
    // differ.
    let replica = vm.disk.as_ref().filter(|(_, ro)| !ro).map(|(path, _)| path.clone());
    let tracker = replica.as_deref().and_then(changes::tracker);
    let history = tracker.as_ref().map(|t| t.history()).unwrap_or_default();
    j.send(Piece::History(history.encode()).encode()).context("the transfer broke")?;
    // Whether the replica is kept (the generation it shares with the
    // primary's), once the primary has said.
    let mut kept: Option<u64> = None;
    let mut disk = None;
    let mut snapshot = Vec::new();
    // The machine, once the first (full) snapshot is in, and the id of the
    // last snapshot it was brought to.
    let mut built: Option<(Machine, u64)> = None;
    let piece = |j: &mut Joining| -> Result<Piece> {
        let bytes = j.receive().map_err(anyhow::Error::msg)?;
        Piece::decode(&bytes).context("the primary sent a malformed piece of its state")
    };
    let (at, base, state_hash, generation) = loop {
        let next = match piece(j) {
            Ok(next) => next,
            // A refusal after a round names the primary's parts: these
            // are this side's.
            Err(e) => match built.as_mut() {
                Some((m, _)) => bail!("{e:#} (this side: {})", describe_parts(m.state_hash_parts())),
                None => return Err(e),
            },
        };
        match next {
            Piece::DiskKeep { size, common } => {
                let path = replica.as_ref().context("the primary has a disk; this secondary has no writable one")?;
                if history.size != size || !history.generations.iter().any(|g| g.id == common) {
                    bail!("the primary would update generation {common:016x}, which this replica does not hold");
                }
                kept = Some(common);
                disk = Some((open_for_transfer(path, vm_id, size, false)?, path.clone()));
            }
            Piece::DiskSize(size) => {
                let Some(path) = &replica else {
                    bail!("the primary has a disk; this secondary has no writable one (--disk)")
                };
                // Its contents go: so does what was known of them.
                if let Some(t) = &tracker {
                    t.forget().with_context(|| format!("cannot reset the history of '{}'", path.display()))?;
                }
                disk = Some((open_for_transfer(path, vm_id, size, true)?, path.clone()));
            }
            Piece::Disk { offset, data } => {
                let (f, path) = disk.as_mut().context("the primary sent disk contents before the disk's size")?;
                // Marked first: a transfer cut short leaves the replica's
                // history covering what it changed.
                if let Some(t) = tracker.as_ref().filter(|_| kept.is_some()) {
                    t.mark(offset, data.len() as u64)
                        .with_context(|| format!("cannot record a change of '{}'", path.display()))?;
                }
                let write = f.seek(SeekFrom::Start(offset)).and_then(|_| f.write_all(&data));
                write.with_context(|| format!("cannot write the replica '{}' at {offset}", path.display()))?;
            }
            Piece::History(_) => bail!("the primary sent a replica history"),
            Piece::Snapshot(part) => snapshot.extend_from_slice(&part),
            Piece::SnapshotEnd => {
                let n = if built.is_some() { "a delta of" } else { "a full snapshot of" };
                let snap = Snapshot::from_bytes(&std::mem::take(&mut snapshot), &format!("{n} the primary's state"))?;
                let id = snap.1;
                let (m, id) = match built.take() {
                    None => {
                        // The disk is whole before the first snapshot.
                        if let Some((f, path)) = disk.take() {
                            f.sync_all().with_context(|| format!("cannot write the replica '{}'", path.display()))?;
                        }
                        // Any seed: the restore replaces what the boot put in RAM.
                        let mut m = maker.machine([0; 32])?;
                        m.restore(&[snap]).context("cannot restore the primary's state")?;
                        (m, id)
                    }
                    Some((mut m, parent)) => {
                        m.restore_delta(parent, &snap).context("cannot restore the primary's state")?;
                        (m, id)
                    }
                };
                let mut m = m;
                j.ack(m.state_hash()).context("the transfer broke")?;
                built = Some((m, id));
            }
            Piece::Done { at, base, state_hash, generation } => break (at, base, state_hash, generation),
        }
    };
    let (mut machine, _) = built.context("the primary ended its state without a snapshot")?;
    let mine = machine.state_hash();
    if mine != state_hash {
        bail!("the restored state hashes to {mine:016x}, the primary's to {state_hash:016x} (at position {at})");
    }
    // The replicas are equal from here on.
    if let Some(t) = &tracker {
        t.begin(generation, kept.is_none()).context("cannot record the disk generation")?;
    }
    Ok(Received { machine, at, base, state_hash, kept })
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
            Piece::SnapshotEnd,
            Piece::Done { at: 5, base: 6, state_hash: 7, generation: 8 },
            Piece::History(vec![4, 5]),
            Piece::DiskKeep { size: 1 << 30, common: 9 },
        ] {
            assert_eq!(Piece::decode(&p.encode()), Some(p));
        }
        for junk in [&[][..], &[9], &[1, 2], &[4, 0, 0], &[7, 1]] {
            assert_eq!(Piece::decode(junk), None, "{junk:?}");
        }
    }
}
