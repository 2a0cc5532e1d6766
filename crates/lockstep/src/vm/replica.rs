//! A disk replica's record, beside the image (`IMAGE.lockstep`): the VM it
//! belongs to and the last epoch it ran at. With the arbiter's record of
//! the last epoch a side ran alone, it tells a stale replica: after a
//! failover, the old primary's disk is behind the new primary's, and
//! starting the VM from it would make a second, older, live VM.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    /// The VM's identity (`LinuxVm::identity`).
    pub vm: String,
    /// The last epoch this replica ran at (paired or alone).
    pub epoch: u64,
}

/// Where the record of `disk` lives.
pub fn record_path(disk: &Path) -> PathBuf {
    let mut name = disk.as_os_str().to_os_string();
    name.push(".lockstep");
    PathBuf::from(name)
}

/// The record of `disk`, if it has one.
pub fn read(disk: &Path) -> Result<Option<ReplicaRecord>> {
    let path = record_path(disk);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("'{}' is not a replica record", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read '{}'", path.display())),
    }
}

/// Record that `disk` runs `vm` at `epoch`: a new file renamed over the
/// old, so a crash leaves one record or the other, never half of one.
pub fn write(disk: &Path, record: &ReplicaRecord) -> Result<()> {
    let path = record_path(disk);
    let tmp = path.with_extension("lockstep.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(record).expect("a record serializes"))?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().with_context(|| format!("cannot write the replica record '{}'", path.display()))
}

/// Records, off the run loop and in order, that `vm`'s replica (if it has
/// a writable disk) runs at an epoch. Each record is synced to disk, and a
/// sync can take hundreds of milliseconds on a busy disk: a run loop or a
/// replay that stood still that long would look dead to the other side.
/// A failure is reported, not fatal (the replica may later be taken for
/// stale, which is the safe mistake).
pub struct RecordWriter {
    epochs: Option<mpsc::Sender<u64>>,
    done: Option<mpsc::Receiver<()>>,
}

/// How long a side that stops waits for its last record to be written.
const LAST_RECORD_WAIT: Duration = Duration::from_secs(5);

impl RecordWriter {
    pub fn new(vm: &super::LinuxVm, vm_id: &str) -> RecordWriter {
        let Some((disk, false)) = vm.disk.clone() else { return RecordWriter { epochs: None, done: None } };
        let (tx, epochs) = mpsc::channel::<u64>();
        let (finished, done) = mpsc::channel();
        let vm = vm_id.to_string();
        std::thread::spawn(move || {
            for epoch in epochs {
                if let Err(e) = write(&disk, &ReplicaRecord { vm: vm.clone(), epoch }) {
                    tracing::warn!("{e:#}");
                }
            }
            let _ = finished.send(());
        });
        RecordWriter { epochs: Some(tx), done: Some(done) }
    }

    pub fn ran_at(&self, epoch: u64) {
        if let Some(tx) = &self.epochs {
            let _ = tx.send(epoch);
        }
    }
}

impl Drop for RecordWriter {
    /// The records asked for are on disk before the side goes (a hung disk
    /// holds the exit up for a bounded time).
    fn drop(&mut self) {
        drop(self.epochs.take());
        if let Some(done) = self.done.take() {
            let _ = done.recv_timeout(LAST_RECORD_WAIT);
        }
    }
}

/// Refuse to start `vm` from `disk` if a side ran alone at a later epoch
/// than this replica last ran (`holder`: the arbiter's record).
pub fn check_fresh(disk: &Path, vm: &str, holder: Option<&ft::arbiter::Holder>) -> Result<()> {
    let Some(h) = holder.filter(|h| h.alone > 0) else { return Ok(()) };
    let ran = read(disk)?.filter(|r| r.vm == vm).map_or(0, |r| r.epoch);
    if ran < h.alone {
        let who = if h.epoch == h.alone { format!(" on '{}'", h.owner) } else { String::new() };
        bail!(
            "replica '{}' is stale: epoch {} ran alone{who} since (this replica last ran at epoch {ran}); start the VM \
             from the replica that ran it",
            disk.display(),
            h.alone
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ft::arbiter::Holder;

    #[test]
    fn a_replica_behind_the_last_epoch_run_alone_is_stale() {
        let dir = std::env::temp_dir().join(format!("lockstep-replica-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("a.img");
        let holder = |epoch, alone| Holder { epoch, owner: "secondary@b:1".into(), alone };
        // No arbiter record, or nobody ever ran alone: any replica will do.
        check_fresh(&disk, "vm", None).unwrap();
        check_fresh(&disk, "vm", Some(&holder(3, 0))).unwrap();
        write(&disk, &ReplicaRecord { vm: "vm".into(), epoch: 1 }).unwrap();
        let e = check_fresh(&disk, "vm", Some(&holder(2, 2))).unwrap_err().to_string();
        assert!(e.contains("is stale: epoch 2 ran alone on 'secondary@b:1' since"), "{e}");
        assert!(e.contains("last ran at epoch 1"), "{e}");
        write(&disk, &ReplicaRecord { vm: "vm".into(), epoch: 2 }).unwrap();
        check_fresh(&disk, "vm", Some(&holder(3, 2))).unwrap();
        // A record of another VM counts as none.
        assert!(check_fresh(&disk, "other", Some(&holder(3, 2))).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
