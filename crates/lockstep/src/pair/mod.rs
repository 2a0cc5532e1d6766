//! The two sides of a fault-tolerant pair: the run loops around `ft`.
//!
//! The primary ([`primary`]) runs the guest live, as `run --record` does,
//! but its log goes to the secondary ([`ft::link::PrimaryLink`]) and its
//! network output waits in the output gate until the secondary has
//! acknowledged the log up to where that output was produced. The
//! secondary ([`secondary`]) builds the same machine and replays the log
//! as it arrives (the [`crate::replayer`]), never running past what it has
//! received. When the primary is lost and the secondary wins the next
//! epoch, it replays what it holds, goes live at exactly that position on
//! its own tap, and announces the guest's addresses ([`announce`]) so the
//! bridge and the clients' neighbours learn the new port.
//!
//! A planned switchover (`lockstep switchover`) swaps the roles of a
//! running pair on the same connection: the primary stops its guest at a
//! position P once everything before P is acknowledged, the secondary
//! replays to P and goes on as the primary, and the old primary replays
//! from P as its secondary ([`Next`], [`drive`]).

pub mod announce;
pub mod mirror;
pub mod policy;
pub mod primary;
pub mod secondary;
pub mod sync;

use crate::host::console::StdioConsole;
use crate::host::status::StatusFn;
use crate::replayer::{MachineMaker, Takeover};
use crate::vm::record::{LogSink, Meta, Recorder};
use crate::vm::{replica, LinuxVm};
use crate::Outcome;
use anyhow::{bail, Context, Result};
use ft::arbiter::Arbiter;
use ft::gate::OutputGate;
use ft::link::Shared;
use ft::link::Switched;
use ft::{PairConfig, Status};
use machine::Machine;
use replay::Record;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::Mutex;

/// How often a pair compares state hashes unless told otherwise: every
/// 0.25 s of guest time. The hash is incremental (pages and disk chunks
/// written since the last one), so this costs well under 1 %.
pub const DEFAULT_HASH_EVERY: u64 = 250_000_000;

/// Options of either side.
pub struct PairOpts {
    /// Primary: the secondary's address. Secondary: the address to listen on.
    pub addr: String,
    /// Where a side running alone looks for a secondary to join it (the
    /// primary's `--peer`; a secondary's, if given, once it has gone live).
    pub peer: Option<String>,
    /// `file:PATH` or `etcd:http://HOST:PORT` (default: a file for this VM
    /// in the state directory, for pairs on one host).
    pub arbiter: Option<String>,
    pub cfg: PairConfig,
    /// Serve `/metrics` and `/status` here.
    pub metrics: Option<String>,
    /// State hashes are exchanged every this many positions (always: see
    /// [`DEFAULT_HASH_EVERY`]); printed only when asked for.
    pub hash_every: Option<u64>,
    pub print_hashes: bool,
    pub max_insns: Option<u64>,
    /// Authenticates the log channel.
    pub key: Option<ft::auth::Key>,
    /// Keep this side's copy of the log here (see [`KeptLog`]).
    pub keep_log: Option<PathBuf>,
    /// Failure policies (see [`policy`]).
    pub policy: policy::PolicyOpts,
}

/// `--keep-log DIR`: this side's copy of the pair's event log, in the
/// format of `run --record`, beside a copy of its disk replica taken before
/// the guest ran, so that `lockstep replay LOG` rebuilds the run (after a
/// divergence: the primary's execution, which the secondary's failed to
/// match). Files are named `ROLE-SECONDS.log` and `ROLE-SECONDS.img`.
pub struct KeptLog {
    pub path: PathBuf,
    recorder: Recorder,
}

/// The first half of [`KeptLog`]: the replica copy, taken while nothing
/// runs on it (before pairing). Dropped without [`KeptReplica::start`] (the
/// pairing failed), it removes the copy: no log will go with it.
pub struct KeptReplica {
    stem: PathBuf,
    copy: Option<PathBuf>,
}

impl KeptReplica {
    pub fn take(vm: &LinuxVm, dir: &Path, role: &str) -> Result<KeptReplica> {
        std::fs::create_dir_all(dir).with_context(|| format!("--keep-log: cannot create '{}'", dir.display()))?;
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let stem = dir.join(format!("{role}-{secs}"));
        let copy = match &vm.disk {
            Some((disk, _)) => {
                let copy = stem.with_extension("img");
                let copied = std::process::Command::new("cp")
                    .arg("--sparse=always")
                    .arg(disk)
                    .arg(&copy)
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                if !copied {
                    let _ = std::fs::remove_file(&copy);
                    bail!("--keep-log: cannot copy the replica '{}' to '{}'", disk.display(), copy.display());
                }
                Some(copy)
            }
            None => None,
        };
        Ok(KeptReplica { stem, copy })
    }

    /// Start the log for `vm` as paired (the secondary's has the primary's
    /// MAC); `disk_hash` is the replica's, which the copy shares.
    pub fn start(mut self, vm: &LinuxVm, disk_hash: Option<String>) -> Result<KeptLog> {
        let mut kept = vm.clone();
        if let (Some((disk, _)), Some(copy)) = (&mut kept.disk, &self.copy) {
            *disk = copy.clone();
        }
        let path = self.stem.with_extension("log");
        let recorder = Recorder::create(&path, &Meta::with_disk_hash(&kept, disk_hash)?)?;
        // The copy now belongs with the log.
        self.copy = None;
        Ok(KeptLog { path, recorder })
    }
}

impl Drop for KeptReplica {
    fn drop(&mut self) {
        if let Some(copy) = &self.copy {
            let _ = std::fs::remove_file(copy);
        }
    }
}

impl KeptLog {
    pub fn append(&mut self, record: &Record) {
        self.recorder.append(record.clone());
    }

    /// Everything so far is in the file; a line saying where it is.
    pub fn close(mut self) -> String {
        match self.recorder.flush() {
            Ok(()) => format!("this side's log is kept in '{}' (`lockstep replay` it)", self.path.display()),
            Err(e) => format!("{e:#}"),
        }
    }
}

/// What a side holds across its role changes: the host's console and tap,
/// the status endpoint, the replica's record, the arbiter.
pub struct SideHost {
    /// The VM's identity (`LinuxVm::identity`), computed once.
    pub vm_id: String,
    pub console: StdioConsole,
    /// The side's own handle on its tap (readers and senders are clones).
    pub tap: Option<tap::Tap>,
    pub status: StatusSlot,
    /// Set by `POST /switchover`; the primary's run loop takes it.
    pub switch: Arc<AtomicBool>,
    /// Set by `POST /migrate`: where to, and whether to keep this side as
    /// the secondary afterwards; the primary's run loop takes it.
    pub migrate: Migrate,
    pub records: replica::RecordWriter,
    pub arbiter: Arc<dyn Arbiter>,
}

/// What a side's run loop ended with.
pub enum Next {
    /// The side is done (the VM ended, or this side stops).
    Done(Outcome),
    /// A switchover made this side (the old primary) the secondary: it
    /// replays from its machine's position on.
    /// `late`: frames for the guest that reached this side after the
    /// handover point.
    /// `release`: a migration is done, and this side is not kept.
    Secondary { machine: Machine, maker: MachineMaker, switched: Switched, late: Vec<Vec<u8>>, release: bool },
    /// A switchover made this side (the old secondary) the primary: its
    /// guest runs live from here, after `input` (frames the mirror holds).
    Primary { machine: Machine, maker: MachineMaker, switched: Switched, input: Vec<Vec<u8>>, takeover: Takeover },
    /// This side (a secondary) won `epoch` after losing the primary: the
    /// guest runs here alone, as a primary a secondary can join. With
    /// `fresh_boot`, the machine boots afresh (lost between a reboot and
    /// the next boot).
    Alone {
        machine: Machine,
        maker: MachineMaker,
        takeover: Takeover,
        input: Vec<Vec<u8>>,
        epoch: u64,
        base: u64,
        fresh_boot: bool,
    },
}

/// How long a side released after a migration keeps saying so on its
/// status endpoint before it exits.
const RELEASED_LINGER: std::time::Duration = std::time::Duration::from_millis(500);

/// Run a side through its role changes until it is done.
pub fn drive(vm: &LinuxVm, opts: &PairOpts, host: &mut SideHost, first: Next) -> Result<Outcome> {
    let mut next = first;
    loop {
        next = match next {
            Next::Done(outcome) => return Ok(outcome),
            Next::Secondary { switched, release: true, .. } => {
                let why = "released after the migration";
                let epoch = switched.epoch;
                tracing::info!("migrated: the VM runs at the new primary, epoch {epoch}; this side is {why}");
                switched.release(why);
                // Said on the endpoint for a moment before this side goes,
                // for `lockstep migrate` to read.
                let note = format!("migrated: the VM runs at the new primary, epoch {epoch}");
                host.status.set(move || Status {
                    role: "released".into(),
                    epoch,
                    note: note.clone(),
                    ..Status::default()
                });
                std::thread::sleep(RELEASED_LINGER);
                Next::Done(Outcome::Success)
            }
            Next::Secondary { machine, maker, switched, late, release: false } => {
                secondary::resume(vm, opts, host, machine, maker, switched, late)?
            }
            Next::Primary { machine, maker, switched, input, takeover } => {
                primary::resume(vm, opts, host, machine, maker, switched, input, takeover)?
            }
            Next::Alone { machine, maker, takeover, input, epoch, base, fresh_boot } => {
                let live = primary::Live { takeover, input, epoch, base, fresh_boot };
                primary::alone(vm, opts, host, machine, maker, live)?
            }
        };
    }
}

/// A migration asked for: the secondary's address to move the VM to, and
/// whether this side stays on as the secondary.
pub type Migrate = Arc<Mutex<Option<(String, bool)>>>;

/// The status endpoint's source, which a role change replaces, and the
/// side's failure policies (their state and last decision).
#[derive(Clone)]
pub struct StatusSlot {
    source: Arc<Mutex<Option<StatusFn>>>,
    policy: Arc<policy::Policy>,
}

impl StatusSlot {
    /// Serve `/status`, `/metrics` and `/switchover` on `addr` (if given)
    /// from whatever the slot holds; a switchover request sets `switch`
    /// when this side is a protected primary.
    pub fn serve(
        addr: Option<&str>,
        switch: Arc<AtomicBool>,
        migrate: Migrate,
        policy: Arc<policy::Policy>,
    ) -> Result<StatusSlot> {
        let slot = StatusSlot { source: Arc::default(), policy };
        if let Some(addr) = addr {
            let (a, b) = (slot.clone(), slot.clone());
            let action = move |path: &str, query: &str| {
                let s = b.status();
                let primary = if s.role == "primary" {
                    Ok(())
                } else {
                    Err(format!(
                        "this side is the {}: ask the primary's endpoint",
                        if s.role.is_empty() { "unpaired side" } else { &s.role }
                    ))
                };
                Some(match path {
                    "/switchover" => primary.and_then(|()| {
                        if !s.protected {
                            return Err(format!("the VM is not protected (no secondary to switch to): {}", s.note));
                        }
                        switch.store(true, Ordering::SeqCst);
                        Ok(format!("switchover requested at epoch {}", s.epoch))
                    }),
                    "/migrate" => primary.and_then(|()| {
                        let arg = |k: &str| query.split('&').find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='));
                        let to = arg("to").filter(|t| !t.is_empty()).ok_or("migrate needs to=HOST:PORT")?;
                        let keep = arg("keep") == Some("1");
                        *migrate.lock().unwrap() = Some((to.to_string(), keep));
                        Ok(format!("migration to {to} requested at epoch {}", s.epoch))
                    }),
                    _ => return None,
                })
            };
            crate::host::status::serve(addr, Box::new(move || a.status()), Box::new(action))?;
        }
        Ok(slot)
    }

    pub fn set(&self, f: impl Fn() -> Status + Send + Sync + 'static) {
        *self.source.lock().unwrap() = Some(Box::new(f));
    }

    pub fn status(&self) -> Status {
        let mut s = self.source.lock().unwrap().as_ref().map(|f| f()).unwrap_or_default();
        self.policy.fill(&mut s);
        s
    }

    /// The side's failure policies.
    pub fn policy(&self) -> &policy::Policy {
        &self.policy
    }
}

/// Track the changes to this side's replica (a writable disk) from now
/// on: a later join with a replica that shares a generation with it then
/// sends only the chunks that changed ([`crate::vm::changes`]).
fn track_replica(vm: &LinuxVm, vm_id: &str) -> Result<Option<crate::vm::changes::ChangeTracker>> {
    match &vm.disk {
        Some((path, false)) => crate::vm::changes::track(path, vm_id).map(Some),
        _ => Ok(None),
    }
}

fn arbiter_for(opts: &PairOpts, vm_id: &str) -> Result<Arc<dyn Arbiter>> {
    let spec = match &opts.arbiter {
        Some(s) => s.clone(),
        None => format!("file:{}", crate::host::identity::state_dir().join(format!("{vm_id}.epoch")).display()),
    };
    Ok(Arc::from(ft::arbiter::from_spec(&spec, vm_id)?))
}

/// The figures of one side for `/status` and `/metrics`.
fn status_fn(shared: Arc<Shared>, gate: Option<Arc<OutputGate>>) -> impl Fn() -> Status + Send + Sync + 'static {
    move || {
        let mut s = shared.status();
        if let Some(g) = &gate {
            let st = g.stats();
            s.frames_held = st.held_now;
            s.frames_released = st.released;
            s.hold_us_mean = st.hold_us_mean;
            s.hold_us_max = st.hold_us_max;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kept replica copy goes with its log; without one (the pairing
    /// failed) it is removed, and a started one stays beside its log.
    #[test]
    fn a_kept_replica_without_a_log_is_removed() {
        let dir = std::env::temp_dir().join(format!("lockstep-kept-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (kernel, disk) = (dir.join("Image"), dir.join("disk.img"));
        std::fs::write(&kernel, b"kernel").unwrap();
        std::fs::write(&disk, vec![7u8; 8192]).unwrap();
        let vm =
            LinuxVm { kernel, initrd: None, append: String::new(), mem: 1 << 20, disk: Some((disk, false)), net: None };
        let keep = dir.join("keep");
        let copies = || {
            std::fs::read_dir(&keep)
                .unwrap()
                .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "img"))
                .count()
        };
        drop(KeptReplica::take(&vm, &keep, "secondary").unwrap());
        assert_eq!(copies(), 0);
        let kept = KeptReplica::take(&vm, &keep, "primary").unwrap().start(&vm, vm.disk_hash().unwrap()).unwrap();
        assert_eq!(copies(), 1);
        assert!(kept.close().contains("primary-"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
