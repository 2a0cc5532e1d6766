//! Which parts of a disk replica changed, and since when: what lets a
//! replica that comes back after a failover be brought up to date by
//! sending only the chunks that may differ, not the whole disk (DRBD's
//! generation identifiers and bitmap, in a small form).
//!
//! A *generation* starts when two replicas are known to be equal: a pair
//! formed at boot (the hello compares the disks' hashes) or a completed
//! join. Both sides record its id. From then on every write to a replica
//! marks its 1 MiB chunk in the current generation's set, on disk, before
//! the data is written: whatever the side does next (runs alone, dies
//! mid-write, is killed during a transfer), its replica equals the
//! contents at the generation's start except in marked chunks. So two
//! replicas that share a generation differ at most in the chunks either
//! marked since it began, and a returning replica needs only those.
//!
//! A side keeps its last few generations (a primary that re-protected onto
//! a third replica meanwhile still knows what changed since the one it
//! shared with the returning replica). The history lives beside the image
//! (`IMAGE.lockstep-changes`), checksummed: a torn or foreign file counts
//! as no history, and the next join copies the whole disk, which is always
//! safe. A writable disk run outside a pair has its history removed (its
//! writes are not tracked); a replica must not be written by anything but
//! lockstep while it has a history.

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// The granule of change tracking: a write marks the chunks it touches.
pub const CHUNK_BYTES: u64 = 1 << 20;
/// Generations kept per replica (the oldest are dropped first).
const KEEP_GENERATIONS: usize = 8;
const MAGIC: &[u8; 8] = b"LSCHG001";

/// A set of chunk numbers, one bit each.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChunkSet(Vec<u64>);

impl ChunkSet {
    /// Add chunks `first..end`; whether any was new.
    pub fn insert_range(&mut self, first: u64, end: u64) -> bool {
        let mut new = false;
        for c in first..end {
            let (w, bit) = ((c / 64) as usize, 1u64 << (c % 64));
            if w >= self.0.len() {
                self.0.resize(w + 1, 0);
            }
            new |= self.0[w] & bit == 0;
            self.0[w] |= bit;
        }
        new
    }

    pub fn contains(&self, c: u64) -> bool {
        self.0.get((c / 64) as usize).is_some_and(|w| w & (1 << (c % 64)) != 0)
    }

    pub fn union_with(&mut self, other: &ChunkSet) {
        if other.0.len() > self.0.len() {
            self.0.resize(other.0.len(), 0);
        }
        for (w, o) in self.0.iter_mut().zip(&other.0) {
            *w |= o;
        }
    }

    /// The chunk numbers, in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.0
            .iter()
            .enumerate()
            .flat_map(|(i, &w)| (0..64).filter(move |b| w & (1 << b) != 0).map(move |b| i as u64 * 64 + b))
    }

    pub fn len(&self) -> u64 {
        self.0.iter().map(|w| w.count_ones() as u64).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One generation: its id, and the chunks written since it began (until
/// the next began, for all but the last).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    pub id: u64,
    pub written: ChunkSet,
}

/// What a replica knows of its own changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    /// The VM it belongs to.
    pub vm: String,
    /// The replica's size in bytes (a resized replica has no history).
    pub size: u64,
    /// Oldest first; the last is the current one. Empty: nothing known
    /// (the next join copies the whole disk).
    pub generations: Vec<Generation>,
}

impl History {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&(self.vm.len() as u32).to_le_bytes());
        b.extend_from_slice(self.vm.as_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&(self.generations.len() as u32).to_le_bytes());
        for g in &self.generations {
            b.extend_from_slice(&g.id.to_le_bytes());
            b.extend_from_slice(&(g.written.0.len() as u32).to_le_bytes());
            for w in &g.written.0 {
                b.extend_from_slice(&w.to_le_bytes());
            }
        }
        let sum = xxhash_rust::xxh3::xxh3_64(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        b
    }

    /// The history `b` holds; `Err` says what is wrong with it.
    pub fn decode(b: &[u8]) -> Result<History, String> {
        let body = b.len().checked_sub(8).map(|n| &b[..n]).ok_or("it is too short")?;
        let sum = u64::from_le_bytes(b[body.len()..].try_into().unwrap());
        if !body.starts_with(MAGIC) {
            return Err("it is not a lockstep change history".into());
        }
        if xxhash_rust::xxh3::xxh3_64(body) != sum {
            return Err("its checksum does not match (a torn write?)".into());
        }
        let mut r = Reader(&body[MAGIC.len()..]);
        let short = || "it ends early".to_string();
        let n = r.u32().ok_or_else(short)? as usize;
        let vm = String::from_utf8(r.take(n).ok_or_else(short)?.to_vec()).map_err(|_| "its VM id is not text")?;
        let size = r.u64().ok_or_else(short)?;
        let count = r.u32().ok_or_else(short)?;
        let mut generations = Vec::new();
        for _ in 0..count {
            let id = r.u64().ok_or_else(short)?;
            let words = r.u32().ok_or_else(short)?;
            let written = (0..words).map(|_| r.u64()).collect::<Option<Vec<u64>>>().ok_or_else(short)?;
            generations.push(Generation { id, written: ChunkSet(written) });
        }
        if !r.0.is_empty() {
            return Err("it has bytes past its end".into());
        }
        Ok(History { vm, size, generations })
    }

    /// The chunks that may differ between a replica with this history and
    /// one with `theirs`, and the newest generation they share; `None`
    /// when they share none (or belong to other VMs or sizes): only a
    /// whole copy makes them equal.
    pub fn differences(&self, theirs: &History) -> Option<(u64, ChunkSet)> {
        if self.vm != theirs.vm || self.size != theirs.size {
            return None;
        }
        let (mine_at, common) =
            self.generations.iter().enumerate().rev().find(|(_, g)| theirs.generations.iter().any(|t| t.id == g.id))?;
        let theirs_at = theirs.generations.iter().position(|t| t.id == common.id)?;
        let mut set = ChunkSet::default();
        for g in self.generations[mine_at..].iter().chain(&theirs.generations[theirs_at..]) {
            set.union_with(&g.written);
        }
        Some((common.id, set))
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    }
}

/// Where the history of `disk` lives.
pub fn history_path(disk: &Path) -> PathBuf {
    let mut name = disk.as_os_str().to_os_string();
    name.push(".lockstep-changes");
    PathBuf::from(name)
}

/// Keeps a replica's history on disk as it is written. Clones share it.
#[derive(Clone)]
pub struct ChangeTracker(Arc<Mutex<Tracked>>);

struct Tracked {
    path: PathBuf,
    file: Option<std::fs::File>,
    history: History,
}

impl ChangeTracker {
    /// The tracker of `disk` (of VM `vm`), with the history on disk if it
    /// is this VM's, of this size and whole (a warning says why not).
    fn open(disk: &Path, vm: &str) -> Result<ChangeTracker> {
        let size = std::fs::metadata(disk).with_context(|| format!("cannot read '{}'", disk.display()))?.len();
        let path = history_path(disk);
        let fresh = History { vm: vm.to_string(), size, generations: Vec::new() };
        let history = match std::fs::read(&path) {
            Ok(bytes) => match History::decode(&bytes) {
                Ok(h) if h.vm == vm && h.size == size => h,
                Ok(_) => fresh,
                Err(why) => {
                    tracing::warn!("ignoring the change history '{}': {why}", path.display());
                    fresh
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => fresh,
            Err(e) => return Err(e).with_context(|| format!("cannot read '{}'", path.display())),
        };
        Ok(ChangeTracker(Arc::new(Mutex::new(Tracked { path, file: None, history }))))
    }

    pub fn history(&self) -> History {
        self.0.lock().unwrap().history.clone()
    }

    /// Mark the chunks of `len` bytes at `offset`, durably, before they are
    /// written. Nothing to do without a current generation.
    pub fn mark(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mut t = self.0.lock().unwrap();
        let Some(current) = t.history.generations.last_mut() else { return Ok(()) };
        if current.written.insert_range(offset / CHUNK_BYTES, (offset + len).div_ceil(CHUNK_BYTES)) {
            t.save()?;
        }
        Ok(())
    }

    /// A new generation begins: this replica now equals its peer's, which
    /// records the same `id`. With `alone`, the older ones are dropped
    /// (the replica's contents were replaced or compared whole).
    pub fn begin(&self, id: u64, alone: bool) -> std::io::Result<()> {
        let mut t = self.0.lock().unwrap();
        let gens = &mut t.history.generations;
        if alone {
            gens.clear();
        }
        gens.push(Generation { id, written: ChunkSet::default() });
        let excess = gens.len().saturating_sub(KEEP_GENERATIONS);
        gens.drain(..excess);
        t.save()
    }

    /// Nothing is known any more (the contents are about to be replaced).
    pub fn forget(&self) -> std::io::Result<()> {
        let mut t = self.0.lock().unwrap();
        t.history.generations.clear();
        t.save()
    }
}

impl Tracked {
    /// Write the history in place and sync it (a fraction of a millisecond:
    /// it is a few hundred bytes, written once per chunk per generation).
    fn save(&mut self) -> std::io::Result<()> {
        let bytes = self.history.encode();
        if self.file.is_none() {
            let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&self.path)?;
            self.file = Some(f);
        }
        let f = self.file.as_ref().unwrap();
        f.write_all_at(&bytes, 0)?;
        f.set_len(bytes.len() as u64)?;
        f.sync_data()
    }
}

/// A fresh generation id (random: two joins never share one).
pub fn new_generation_id() -> Result<u64> {
    let seed = crate::host::entropy::host_seed()?;
    Ok(u64::from_le_bytes(seed[..8].try_into().unwrap()) | 1)
}

/// The generation a pair formed at boot begins: both sides know the boot
/// seed from the hello, and their disks were compared whole.
pub fn boot_generation(seed: &[u8; 32]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(seed) | 1
}

/// The replicas this process tracks, by path.
fn tracked() -> &'static Mutex<BTreeMap<PathBuf, ChangeTracker>> {
    static TRACKED: OnceLock<Mutex<BTreeMap<PathBuf, ChangeTracker>>> = OnceLock::new();
    TRACKED.get_or_init(Default::default)
}

/// Track the changes to `disk` (VM `vm`) from now on: every machine this
/// process builds on it marks its writes ([`LinuxVm::machine`]). A pair's
/// side calls this once, before any machine exists.
///
/// [`LinuxVm::machine`]: super::LinuxVm::machine
pub fn track(disk: &Path, vm: &str) -> Result<ChangeTracker> {
    let t = ChangeTracker::open(disk, vm)?;
    tracked().lock().unwrap().insert(disk.to_path_buf(), t.clone());
    Ok(t)
}

/// The tracker of `disk`, if this process tracks it.
pub fn tracker(disk: &Path) -> Option<ChangeTracker> {
    tracked().lock().unwrap().get(disk).cloned()
}

/// `disk` is about to be written untracked: its history, if any, no longer
/// holds, and goes.
pub fn untracked_writer(disk: &Path) -> Result<()> {
    let path = history_path(disk);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            tracing::info!("'{}' is written outside a pair: its change history is removed", disk.display());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove '{}'", path.display())),
    }
}

/// A disk whose writes are marked in its replica's history first.
pub struct TrackedDisk {
    pub inner: Box<dyn machine::virtio::blk::BlockBackend>,
    pub tracker: ChangeTracker,
}

impl machine::virtio::blk::BlockBackend for TrackedDisk {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.tracker.mark(offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.tracker.mark(offset, len)?;
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.tracker.mark(offset, len)?;
        self.inner.write_zeroes(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(chunks: &[u64]) -> ChunkSet {
        let mut s = ChunkSet::default();
        for &c in chunks {
            s.insert_range(c, c + 1);
        }
        s
    }

    fn history(gens: &[(u64, &[u64])]) -> History {
        History {
            vm: "vm".into(),
            size: 1 << 30,
            generations: gens.iter().map(|&(id, c)| Generation { id, written: set(c) }).collect(),
        }
    }

    #[test]
    fn chunk_sets_mark_ranges_and_say_what_was_new() {
        let mut s = ChunkSet::default();
        assert!(s.insert_range(3, 5));
        assert!(!s.insert_range(3, 4), "chunk 3 is marked already");
        assert!(s.insert_range(4, 200));
        assert_eq!(s.len(), 197);
        assert!(s.contains(199) && !s.contains(200) && !s.contains(2));
        assert_eq!(s.iter().take(3).collect::<Vec<_>>(), [3, 4, 5]);
    }

    #[test]
    fn replicas_differ_in_what_either_wrote_since_the_newest_shared_generation() {
        // The survivor re-protected onto a third replica (generation 3)
        // after the returning one left it in generation 2.
        let survivor = history(&[(1, &[0]), (2, &[5, 6]), (3, &[9])]);
        let returning = history(&[(1, &[0]), (2, &[6, 7])]);
        let (common, diff) = survivor.differences(&returning).unwrap();
        assert_eq!(common, 2);
        assert_eq!(diff.iter().collect::<Vec<_>>(), [5, 6, 7, 9]);
        assert_eq!(returning.differences(&survivor).unwrap().1, diff, "the same either way round");
        // Nothing shared, another VM, another size: a whole copy.
        assert_eq!(survivor.differences(&history(&[(4, &[])])), None);
        assert_eq!(survivor.differences(&History::default()), None);
        assert_eq!(survivor.differences(&History { vm: "other".into(), ..returning.clone() }), None);
        assert_eq!(survivor.differences(&History { size: 1 << 20, ..returning }), None);
    }

    #[test]
    fn a_history_survives_its_file_and_a_damaged_file_is_no_history() {
        let h = history(&[(7, &[1, 100]), (8, &[])]);
        assert_eq!(History::decode(&h.encode()), Ok(h.clone()));
        let mut torn = h.encode();
        torn[20] ^= 1;
        assert!(History::decode(&torn).unwrap_err().contains("checksum"));
        let cut = h.encode();
        assert!(History::decode(&cut[..cut.len() - 3]).is_err());
        assert!(History::decode(b"{\"vm\": 1}").unwrap_err().contains("not a lockstep change history"));
        assert!(History::decode(b"").is_err());
    }

    #[test]
    fn a_tracker_marks_before_writing_and_reopens_what_it_marked() {
        let dir = std::env::temp_dir().join(format!("lockstep-changes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("r.img");
        std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
        let t = ChangeTracker::open(&disk, "vm").unwrap();
        // No generation yet: nothing to mark against.
        t.mark(0, 4096).unwrap();
        assert!(t.history().generations.is_empty());
        t.begin(11, true).unwrap();
        let mut d = TrackedDisk {
            inner: Box::new(machine::virtio::blk::FileBackend::open(&disk, false).unwrap()),
            tracker: t.clone(),
        };
        use machine::virtio::blk::BlockBackend;
        d.write_at(&[1; 512], CHUNK_BYTES - 256).unwrap();
        d.discard(3 * CHUNK_BYTES, 4096).unwrap();
        let again = ChangeTracker::open(&disk, "vm").unwrap().history();
        assert_eq!(again.generations.len(), 1);
        assert_eq!(again.generations[0].id, 11);
        assert_eq!(again.generations[0].written.iter().collect::<Vec<_>>(), [0, 1, 3]);
        // Another VM's history, or a damaged one, is none.
        assert!(ChangeTracker::open(&disk, "other").unwrap().history().generations.is_empty());
        let mut bytes = std::fs::read(history_path(&disk)).unwrap();
        bytes.truncate(bytes.len() - 1);
        std::fs::write(history_path(&disk), &bytes).unwrap();
        assert!(ChangeTracker::open(&disk, "vm").unwrap().history().generations.is_empty());
        // An untracked writer removes it.
        untracked_writer(&disk).unwrap();
        assert!(!history_path(&disk).exists());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn at_most_the_last_generations_are_kept() {
        let dir = std::env::temp_dir().join(format!("lockstep-changes-keep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("r.img");
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        let t = ChangeTracker::open(&disk, "vm").unwrap();
        for id in 1..=20 {
            t.begin(id, false).unwrap();
        }
        let ids: Vec<u64> = t.history().generations.iter().map(|g| g.id).collect();
        assert_eq!(ids, (13..=20).collect::<Vec<_>>());
        t.begin(21, true).unwrap();
        assert_eq!(t.history().generations.len(), 1);
        std::fs::remove_dir_all(&dir).ok();
    }
}
