//! The secondary: the primary's log replayed on this host's replica, and
//! the takeover when the primary is lost.
//!
//! Its life is a small state machine ([`Phase`]): *replaying* the log as
//! it arrives; once the primary is lost, *claiming* the next epoch from
//! the arbiter (having replayed everything it holds); *live* once it has
//! won (the guest runs on this host's console, tap, entropy and clock,
//! and reboots alone, as `run` does); or *ended* when the primary ended
//! the VM or another side won.

use super::mirror::{InputMirror, LogTally};
use super::{arbiter_for, drive, status_fn, KeptLog, KeptReplica, Next, PairOpts, SideHost, StatusSlot};
use crate::host::console::StdioConsole;
use crate::replayer::{Fetched, MachineMaker, ReplayError, ReplayOpts, Replayer, Source, Step};
use crate::vm::{changes, print_final, replica, LinuxVm};
use crate::Outcome;
use anyhow::{bail, Context, Result};
use ft::arbiter::Claim;
use ft::link::{Incoming, Paired, SecondaryLink, Switched};
use ft::wire::Hello;
use machine::Machine;
use replay::EndReason;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

/// The primary's log as it arrives on the link (and into the kept log; its
/// frames are crossed off the input mirror's window).
/// A handover (a planned switchover) ends the log like a loss, and leaves
/// its point and the channel's reading end here.
/// A release (the primary moves the VM elsewhere) sets the last field.
pub struct LinkSource(
    pub SecondaryLink,
    pub Option<KeptLog>,
    pub Option<LogTally>,
    pub Option<(u64, ft::link::HandoverEnd)>,
    pub bool,
);

impl Source for LinkSource {
    fn fetch(&mut self, wait: Duration) -> Result<Fetched, ReplayError> {
        let msg = if wait.is_zero() {
            self.0.rx.try_recv().map_err(|e| match e {
                std::sync::mpsc::TryRecvError::Empty => RecvTimeoutError::Timeout,
                std::sync::mpsc::TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
            })
        } else {
            self.0.rx.recv_timeout(wait)
        };
        Ok(match msg {
            Ok(Incoming::Records(records)) => {
                if let Some(kept) = &mut self.1 {
                    records.iter().for_each(|r| kept.append(r));
                }
                if let Some(tally) = &self.2 {
                    for r in &records {
                        if let replay::Event::Frame { nic: 0, data } = &r.event {
                            tally.delivered(data);
                        }
                    }
                }
                Fetched::Records(records)
            }
            Ok(Incoming::Through { through, released }) => Fetched::Through { through, released },
            Ok(Incoming::Lost(why)) => Fetched::Closed(why),
            Ok(Incoming::Released) => {
                self.4 = true;
                Fetched::Closed("the primary released this secondary".into())
            }
            Ok(Incoming::Handover { at, end }) => {
                self.3 = Some((at, end));
                Fetched::Closed(format!("the primary handed over at position {at}"))
            }
            Err(RecvTimeoutError::Timeout) => Fetched::Nothing,
            Err(RecvTimeoutError::Disconnected) => Fetched::Closed("the log channel closed".into()),
        })
    }
}

/// Where the secondary is in its life.
enum Phase {
    /// Replaying the primary's log as it arrives.
    Replaying,
    /// The primary is lost (why); everything it sent has been replayed.
    /// With `fresh_boot`, it was lost between a guest reboot and the next
    /// boot's record: the side that goes on boots the VM afresh.
    Claiming { why: String, fresh_boot: bool },
    /// This side won the epoch: the guest runs here.
    Live { fresh_boot: bool, epoch: u64 },
    /// The primary ended the VM.
    Ended(EndReason),
}

/// How long a released secondary waits for the primary to claim the next
/// epoch (it does so at once) before it takes the primary for lost.
const RELEASE_WAIT: Duration = Duration::from_secs(3);

/// Whether someone holds an epoch past `epoch` within `wait` (an arbiter
/// that cannot be read counts as no).
fn claimed_past(arbiter: &dyn ft::arbiter::Arbiter, epoch: u64, wait: Duration) -> bool {
    let t = std::time::Instant::now();
    loop {
        if arbiter.read().ok().flatten().is_some_and(|h| h.epoch > epoch) {
            return true;
        }
        if t.elapsed() >= wait {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long the replay waits for the log when it has executed all of it.
const LOG_WAIT: Duration = Duration::from_millis(20);

/// Run the secondary of a pair.
pub fn run(vm: &LinuxVm, opts: &PairOpts) -> Result<Outcome> {
    let vm_id = vm.identity()?;
    let arbiter = arbiter_for(opts, &vm_id)?;
    // Before any machine exists: they all mark their writes.
    let tracker = super::track_replica(vm, &vm_id)?;
    let listener = ft::link::listen(&opts.addr)?;
    let console = StdioConsole::open();
    // Opened now so a bad tap is an error before pairing; read by the input
    // mirror while replaying, by the guest once live.
    let tap = match &vm.net {
        Some((name, _)) => Some(tap::Tap::open(name, true)?),
        None => None,
    };
    // Hashed when a primary boots the guest with this side (a joining
    // one sends its disk instead): a whole 1 GiB replica takes a while.
    let mut disk_hash: Option<Option<String>> = None;
    // The replica is copied now, while nothing runs on it.
    let kept = opts.keep_log.as_deref().map(|dir| KeptReplica::take(vm, dir, "secondary")).transpose()?;
    let mut vm = vm.clone();
    let mut built: Option<(Machine, MachineMaker, [u8; 32])> = None;
    tracing::info!("secondary: listening on {} (arbiter {})", opts.addr, arbiter.describe());
    let host = crate::host::identity::host_id();
    let build = crate::host::identity::build_id();
    let shared_arbiter = arbiter.shared_across_hosts();
    let mut check = |h: &Hello| -> Result<(), String> {
        // A file arbiter is one host's: two hosts would each win their own.
        if h.host != host && !(shared_arbiter && h.shared_arbiter) {
            return Err(format!(
                "the sides run on different hosts ('{}' and '{host}'); a pair across hosts needs a shared arbiter \
                 (--arbiter etcd:URL)",
                h.host
            ));
        }
        if h.build != build {
            return Err(format!(
                "the primary runs another lockstep build ({}, this secondary's is {build}): both sides must run the \
                 same engine",
                h.build
            ));
        }
        if h.vm_id != vm_id {
            return Err(format!(
                "the primary runs another VM (identity {}, this secondary's is {vm_id}: kernel, initrd, command line, \
                 memory or devices differ)",
                h.vm_id
            ));
        }
        // Same guest MAC on both sides: the secondary takes over the address.
        if let (Some((_, mac)), Some(theirs)) = (&mut vm.net, h.mac) {
            *mac = theirs;
        }
        if h.join {
            // The primary's state (disk included) comes over the channel.
            return Ok(());
        }
        let mine = match &disk_hash {
            Some(hash) => hash.clone(),
            None => disk_hash.insert(vm.disk_hash().map_err(|e| format!("{e:#}"))?).clone(),
        };
        if h.disk_hash != mine {
            return Err(format!(
                "the disk replicas differ (primary {}, secondary {}): copy the primary's image first",
                h.disk_hash.as_deref().unwrap_or("none"),
                mine.as_deref().unwrap_or("none")
            ));
        }
        let maker = MachineMaker::new(&vm, opts.hash_every).watching_disk(&opts.cfg.disk);
        let mut m = maker.machine(h.seed).map_err(|e| format!("cannot build the machine: {e:#}"))?;
        let mine = m.state_hash();
        if mine != h.state_hash {
            return Err(format!(
                "the initial machine states differ (primary {:016x}, secondary {mine:016x})",
                h.state_hash
            ));
        }
        built = Some((m, maker, h.seed));
        Ok(())
    };
    let stop = console.stop_flag();
    let key = opts.key.clone().map(Arc::new);
    let paired = SecondaryLink::accept(listener, arbiter.clone(), opts.cfg.clone(), &mut check, key, &|| {
        stop.load(std::sync::atomic::Ordering::Relaxed)
    })?;
    let (link, m, maker, base, through, kept) = match paired {
        Paired::Boot(link) => {
            let (m, maker, seed) = built.take().context("paired without a machine")?;
            if let Some(t) = &tracker {
                // Paired at boot, the disks compared equal: a generation begins.
                t.begin(changes::boot_generation(&seed), true).context("cannot record the disk generation")?;
            }
            let kept = kept.map(|k| k.start(&vm, disk_hash.clone().flatten())).transpose()?;
            if let Some(k) = &kept {
                tracing::info!("keeping this side's log in '{}'", k.path.display());
            }
            (link, m, maker, 0, 0, kept)
        }
        Paired::Join(mut j) => {
            if kept.is_some() {
                tracing::warn!("--keep-log: a log kept from a join could not be replayed (no boot); not kept");
            }
            drop(kept);
            let maker = MachineMaker::new(&vm, opts.hash_every).watching_disk(&opts.cfg.disk);
            let t = std::time::Instant::now();
            let r = match super::sync::receive_state(&mut j, &vm, &vm_id, &maker) {
                Ok(r) => r,
                Err(e) => {
                    j.refuse(&format!("{e:#}"));
                    return Err(e.context("joining the running primary"));
                }
            };
            tracing::info!(
                "received the primary's state at position {} in {} ms; state hash {:016x} matches{}",
                r.at,
                t.elapsed().as_millis(),
                r.state_hash,
                match r.kept {
                    Some(g) => format!(" (this replica was kept: only what changed since generation {g:016x} came)"),
                    None => String::new(),
                }
            );
            let through = r.base + r.at;
            let link =
                j.synced(r.state_hash, arbiter.clone(), opts.cfg.clone(), through).map_err(anyhow::Error::msg)?;
            (link, r.machine, maker, r.base, through, None)
        }
    };
    let records = replica::RecordWriter::new(&vm, &vm_id);
    let switch = Arc::new(AtomicBool::new(false));
    let migrate: super::Migrate = Arc::default();
    let policy = super::policy::Policy::start(opts.policy.clone(), vm.net.as_ref().map(|(name, _)| name.as_str()));
    let status = StatusSlot::serve(opts.metrics.as_deref(), switch.clone(), migrate.clone(), Arc::new(policy))?;
    let mut host = SideHost { vm_id: vm_id.clone(), console, tap, status, switch, migrate, records, arbiter };
    let from = Replay { m, maker, base, through, late: Vec::new(), forward: false };
    let next = replay(&vm, opts, &mut host, link, kept, from)?;
    drive(&vm, opts, &mut host, next)
}

/// Where a replay starts: the machine (at `through`, `base` counting the
/// guest's earlier boots), and after a switchover (`forward`) the frames
/// that reached this side late.
struct Replay {
    m: Machine,
    maker: MachineMaker,
    base: u64,
    through: u64,
    late: Vec<Vec<u8>>,
    forward: bool,
}

/// Replay `link`'s log (see [`serve`]), with the input mirror on the tap.
fn replay(
    vm: &LinuxVm,
    opts: &PairOpts,
    host: &mut SideHost,
    link: SecondaryLink,
    kept: Option<KeptLog>,
    from: Replay,
) -> Result<Next> {
    let mac = vm.net.as_ref().map(|(_, mac)| *mac);
    let forward = from.forward.then(|| link.forwarder());
    let mirror = start_mirror(host, mac, from.late, forward)?;
    let tally = mirror.as_ref().map(InputMirror::tally);
    let replayer = Replayer::resume(
        LinkSource(link, kept, tally, None, false),
        from.m,
        from.maker,
        ReplayOpts { hash_every: opts.hash_every, print_hashes: opts.print_hashes, mac, keep_unreleased: true },
        from.base,
        from.through,
    );
    serve(host, replayer, mirror)
}

/// The input mirror on the side's tap, if the VM has a network card (see
/// [`InputMirror::start`] for `earlier` and `forward`).
fn start_mirror(
    host: &SideHost,
    mac: Option<[u8; 6]>,
    earlier: Vec<Vec<u8>>,
    forward: Option<ft::link::Forwarder>,
) -> Result<Option<InputMirror>> {
    Ok(match (&host.tap, mac) {
        (Some(t), Some(mac)) => Some(
            InputMirror::start(t.try_clone()?, mac, earlier, forward)
                .with_context(|| format!("cannot read tap '{}'", t.name()))?,
        ),
        _ => None,
    })
}

/// A switchover made this side, the old primary, the secondary: it replays
/// the new primary's log from the handover point, on the machine it ran.
pub fn resume(
    vm: &LinuxVm,
    opts: &PairOpts,
    host: &mut SideHost,
    m: Machine,
    maker: MachineMaker,
    switched: Switched,
    late: Vec<Vec<u8>>,
) -> Result<Next> {
    let (base, at) = (switched.base, switched.at);
    let link = SecondaryLink::resume(switched, host.arbiter.clone(), opts.cfg.clone());
    replay(vm, opts, host, link, None, Replay { m, maker, base, through: at, late, forward: true })
}

/// The secondary's life from a paired link on: see [`Phase`].
fn serve(host: &mut SideHost, mut replayer: Replayer<LinkSource>, mut mirror: Option<InputMirror>) -> Result<Next> {
    let epoch = replayer.source().0.epoch;
    host.records.ran_at(epoch);
    host.status.set(status_fn(replayer.source().0.shared.clone(), None));
    let mut phase = Phase::Replaying;
    let mut flipped = false;
    loop {
        phase = match phase {
            Phase::Replaying => {
                if host.console.signalled() {
                    bail!("stopped by a signal");
                }
                let link = &replayer.source().0;
                link.executed(replayer.position());
                crate::host::failpoint::stall_while_file("secondary-replay-stall");
                if !flipped && crate::host::failpoint::file_armed("secondary-flip-a-ram-bit") {
                    // A silent fault in this side's memory: the next state
                    // hash must catch it.
                    flipped = true;
                    let ram = &mut replayer.machine_mut().board.ram;
                    let addr = ram.base() + ram.len() / 2;
                    let mut byte = [0u8];
                    ram.read(addr, &mut byte);
                    ram.write(addr, &[byte[0] ^ 1]);
                    tracing::warn!("failpoint secondary-flip-a-ram-bit: flipped a bit at {addr:#x}");
                }
                match replayer.step(LOG_WAIT) {
                    Ok(Step::Progress | Step::NeedMore) => Phase::Replaying,
                    Ok(Step::Ended(reason)) => Phase::Ended(reason),
                    Ok(Step::Exhausted(why)) => Phase::Claiming { why, fresh_boot: false },
                    Ok(Step::RebootUnseeded(why)) => Phase::Claiming { why, fresh_boot: true },
                    Err(e @ ReplayError::Diverged { .. }) => {
                        let kept = replayer.source_mut().1.take().map(|k| format!("; {}", k.close()));
                        replayer.source().0.resign(&format!("it diverged from this primary ({e})"));
                        bail!("{e}; this secondary resigns{}", kept.unwrap_or_default())
                    }
                    Err(ReplayError::Log(e)) => bail!("the primary's log has {e}"),
                    Err(ReplayError::Host(e)) => match e.downcast_ref::<machine::RunError>() {
                        Some(machine::RunError::HostFault(fault)) => {
                            replayer.source().0.resign(&format!("its disk replica failed ({fault})"));
                            bail!("this secondary's disk replica failed ({fault}): it resigns, and the primary goes on")
                        }
                        _ => return Err(e),
                    },
                }
            }
            Phase::Claiming { why, fresh_boot } => {
                let pos = replayer.machine().hart.position().0;
                let arbiter = host.arbiter.clone();
                if replayer.source().4 {
                    // The primary claims the next epoch as it lets go. One
                    // that died in between left the VM to this side.
                    let epoch = replayer.source().0.epoch;
                    if claimed_past(arbiter.as_ref(), epoch, RELEASE_WAIT) {
                        tracing::info!("the primary released this secondary (the VM moves elsewhere); it stops");
                        print_final(replayer.machine_mut());
                        return Ok(Next::Done(Outcome::Success));
                    }
                    tracing::warn!(
                        "the primary released this secondary but did not claim the next epoch within {} s: it is \
                         taken for lost",
                        RELEASE_WAIT.as_secs()
                    );
                    replayer.source_mut().4 = false;
                }
                if let Some((at, end)) = replayer.source_mut().3.take() {
                    match switch_over(&mut replayer, at, end, &host.records) {
                        Switch::Done(switched) => {
                            let (machine, maker, takeover) = replayer.into_parts();
                            let input = mirror.take().map(mirrored_input).unwrap_or_default();
                            return Ok(Next::Primary { machine, maker, switched: *switched, input, takeover });
                        }
                        Switch::Alone(epoch) => {
                            phase = Phase::Live { fresh_boot: false, epoch };
                            continue;
                        }
                        Switch::Failed => {}
                    }
                }
                if fresh_boot {
                    tracing::info!(
                        "lost the primary: {why}; it was lost while the guest rebooted, before the next boot began; \
                         asking the arbiter ({})",
                        arbiter.describe()
                    );
                } else {
                    tracing::info!(
                        "lost the primary: {why}; replayed its log to position {pos} (its last mark: {}); asking \
                         the arbiter ({})",
                        replayer.last_mark(),
                        arbiter.describe()
                    );
                }
                if crate::host::failpoint::named("secondary-slow-go-live") {
                    // A takeover that takes long enough for a client's
                    // packet to reach the dead primary's port first.
                    std::thread::sleep(Duration::from_millis(300));
                }
                match replayer.source().0.claim() {
                    Claim::Won(epoch) if fresh_boot => {
                        host.records.ran_at(epoch);
                        tracing::info!("won epoch {epoch}: going live with the next boot (NOT PROTECTED)");
                        Phase::Live { fresh_boot, epoch }
                    }
                    Claim::Won(epoch) => {
                        host.records.ran_at(epoch);
                        tracing::info!("won epoch {epoch}: going live at position {pos} (NOT PROTECTED)");
                        Phase::Live { fresh_boot, epoch }
                    }
                    Claim::Lost(h) => {
                        print_final(replayer.machine_mut());
                        bail!("lost arbitration: epoch {} belongs to '{}'; this secondary stops", h.epoch, h.owner);
                    }
                }
            }
            Phase::Live { fresh_boot, epoch } => {
                let base = replayer.base();
                let (machine, maker, takeover) = replayer.into_parts();
                // A new boot has no use for the old one's traffic.
                let input = mirror.take().filter(|_| !fresh_boot).map(mirrored_input).unwrap_or_default();
                return Ok(Next::Alone { machine, maker, takeover, input, epoch, base, fresh_boot });
            }
            Phase::Ended(reason) => {
                tracing::info!("the primary ended the VM ({reason:?}); the secondary stops with it");
                print_final(replayer.machine_mut());
                let outcome = if reason == EndReason::Panic { Outcome::GuestFailure } else { Outcome::Success };
                return Ok(Next::Done(outcome));
            }
        };
    }
}

/// How a switchover's second half went.
enum Switch {
    /// This side is the primary now, the old primary its secondary.
    Done(Box<Switched>),
    /// This side won the epoch, but the old primary is gone: live alone.
    Alone(u64),
    /// Not taken over: the primary counts as lost (the usual claim).
    Failed,
}

/// The primary handed over at `at` (the replay has run to its last mark):
/// take over there, if the replay is exactly there.
fn switch_over(
    replayer: &mut Replayer<LinkSource>,
    at: u64,
    end: ft::link::HandoverEnd,
    records: &replica::RecordWriter,
) -> Switch {
    crate::host::failpoint::kill_if("secondary-at-handover");
    let here = replayer.position();
    if here != at {
        tracing::error!("the primary handed over at position {at}, but this side's replay stands at {here}");
        return Switch::Failed;
    }
    let claimed = || crate::host::failpoint::kill_if("secondary-after-takeover-claim");
    match replayer.source().0.take_over(end, at, replayer.base(), claimed) {
        Ok(switched) => {
            records.ran_at(switched.epoch);
            tracing::info!(
                "switchover: replayed to the handover point {at}; now the primary at epoch {}",
                switched.epoch
            );
            Switch::Done(Box::new(switched))
        }
        Err((why, Some(epoch))) => {
            records.ran_at(epoch);
            tracing::warn!("switchover: won epoch {epoch}, but the old primary is gone ({why}): going live alone");
            Switch::Alone(epoch)
        }
        Err((why, None)) => {
            tracing::warn!("switchover: cannot take over ({why})");
            Switch::Failed
        }
    }
}

/// What reached this side's tap for the guest and the primary's log did
/// not deliver: its senders' packets to a dying primary (see [`super::mirror`]).
fn mirrored_input(mirror: InputMirror) -> Vec<Vec<u8>> {
    let (left, seen, matched) = mirror.finish();
    if !left.is_empty() {
        tracing::info!(
            "handing the guest {} frames this tap received and the primary's log did not deliver ({}; {seen} \
             received while replaying, {matched} matched in the log)",
            left.len(),
            super::mirror::summary(&left)
        );
    }
    left
}
