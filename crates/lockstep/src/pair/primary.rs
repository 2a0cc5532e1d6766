//! The primary: the guest live on this host, its inputs streamed to the
//! secondary, its network output held until the secondary has them.

use super::{announce, arbiter_for, drive, status_fn, KeptReplica, Next, PairOpts, SideHost, StatusSlot};
use crate::host::console::StdioConsole;
use crate::host::entropy::{host_seed, HostEntropy};
use crate::host::log::report;
use crate::replayer::{MachineMaker, Takeover};
use crate::vm::changes::{self, History};
use crate::vm::record::{InputLog, LogSink};
use crate::vm::{end_reason, outcome_of, print_final, replica, LinuxVm};
use crate::Outcome;
use anyhow::{bail, Context, Result};
use ft::gate::{FrameSink, OutputGate};
use ft::link::{Joining, PrimaryLink, Shared, Switched};
use ft::wire::Hello;
use ft::State;
use machine::{HostInput, HostIo, Machine, Stop};
use replay::{Event, Record};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

impl LogSink for PrimaryLink {
    fn append(&mut self, record: Record) {
        self.record(record);
    }
}

/// The primary's host side: the console and taps for input, the link for
/// the log, the output gate for frames.
struct PrimaryIo<'a> {
    console: &'a mut StdioConsole,
    log: &'a mut InputLog<PrimaryLink>,
    print_hashes: bool,
    /// The gate's sink number of the console (after the network cards').
    console_nic: usize,
    /// The pair's policy stopped this side (lost arbitration).
    fenced: bool,
    /// A switchover was asked for (the status endpoint sets it) ...
    switch: &'a AtomicBool,
    /// ... and the run loop stopped for it.
    switching: bool,
    /// A migration asked for (by the status endpoint), and the run loop
    /// stopped for it.
    migrate: &'a super::Migrate,
    migrating: Option<(String, bool)>,
    /// Running alone: a secondary to join, a transfer to it under way and
    /// its round through, and the run loop stopped for either.
    seeker: &'a Seeker,
    copying: bool,
    copy_done: &'a AtomicBool,
    joining: bool,
    /// The replica's record, and the epoch recorded there.
    records: &'a replica::RecordWriter,
    recorded: u64,
    /// The side's failure policies (an uplink down asks for a switchover).
    policy: &'a super::policy::Policy,
}

/// Output items (frames, console chunks) the gate may hold before the
/// guest is paused: with nobody to acknowledge them (the secondary lost,
/// the arbiter down) a running guest would grow the gate without bound.
const MAX_HELD: usize = 4096;

impl PrimaryIo<'_> {
    /// Pause the guest while the gate holds more than [`MAX_HELD`], until
    /// half of it is released, the pair's fate is decided, or a signal.
    fn bound_hold(&mut self) {
        let gate = &self.log.sink.gate;
        if gate.held() <= MAX_HELD {
            return;
        }
        tracing::warn!(
            "{} output items wait for an acknowledgement: the guest pauses until they can leave",
            gate.held()
        );
        // A deliberate pause, not a stuck run loop (the heartbeat's pulse).
        self.log.sink.waiting(true);
        while gate.held() > MAX_HELD / 2 && self.log.sink.state() != State::Stopped && !self.console.signalled() {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.log.sink.waiting(false);
    }
}

impl HostIo for PrimaryIo<'_> {
    fn console_write(&mut self, bytes: &[u8]) {
        // Console output is output: it waits in the gate like frames.
        self.log.sink.output(self.console_nic, bytes);
    }
    fn wait(&mut self, timeout: Duration) -> HostInput {
        if self.log.sink.state() == State::Stopped {
            self.fenced = true;
            return HostInput::Quit;
        }
        let seeker = self.seeker;
        if self.copying {
            seeker.want(0);
            if self.copy_done.swap(false, Ordering::SeqCst) {
                self.joining = true;
                return HostInput::Quit;
            }
        } else if self.log.sink.state() == State::Alone {
            seeker.want(self.log.sink.shared.epoch());
            if seeker.ready() {
                self.joining = true;
                return HostInput::Quit;
            }
        } else {
            seeker.want(0);
        }
        if let Some(m) = self.migrate.lock().unwrap().take() {
            self.migrating = Some(m);
            return HostInput::Quit;
        }
        if self.log.sink.state() == State::Protected {
            let shared = &self.log.sink.shared;
            if let Some(cause) = self.policy.uplink_switchover(|| shared.peer_uplink_up()) {
                self.policy.decided(&format!("switchover: {cause}"));
                self.switching = true;
                return HostInput::Quit;
            }
        }
        if self.switch.swap(false, Ordering::SeqCst) {
            if self.log.sink.state() == State::Protected {
                self.switching = true;
                return HostInput::Quit;
            }
            tracing::warn!("a switchover was asked for, but the VM is not protected: ignored");
        }
        let epoch = self.log.sink.shared.epoch();
        if epoch != self.recorded {
            // Won a new epoch (going on alone): this replica runs ahead.
            self.recorded = epoch;
            self.records.ran_at(epoch);
        }
        if timeout.is_zero() {
            self.log.sink.throttle();
        }
        self.bound_hold();
        // Waiting for input is not being stuck (the heartbeat's pulse).
        self.log.sink.waiting(true);
        let input = self.console.wait(timeout);
        self.log.sink.waiting(false);
        input
    }
    fn progress(&mut self, pos: u64) {
        crate::host::failpoint::stall_while_file("primary-run-loop-stall");
        // Entropy drawn in this slice goes before the mark that covers it.
        self.log.take_draws();
        self.log.sink.progress(pos);
    }
    fn send_frame(&mut self, nic: usize, frame: &[u8]) {
        self.log.sink.output(nic, frame);
    }
    fn delivered(&mut self, pos: u64, input: &HostInput) {
        self.log.delivered(pos, input);
    }
    fn skipped(&mut self, pos: u64, steps: u64) {
        self.log.record(pos, Event::Skip(steps));
    }
    fn state_hash(&mut self, pos: u64, hash: u64) {
        self.log.record(pos, Event::Hash(hash));
        if self.print_hashes {
            report(&format!("hash {pos} {hash:016x}"));
        }
    }
}

/// How long a planned switchover may take, each half (the secondary
/// acknowledging the log to the handover point, then taking over).
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// An output gate for the side's tap (a clone of its handle) and console;
/// also the console's sink number.
fn new_gate(host: &SideHost, vm: &LinuxVm) -> Result<(Arc<OutputGate>, usize)> {
    let mut sinks: Vec<Box<dyn FrameSink>> = Vec::new();
    if let (Some(tap), Some((name, _))) = (&host.tap, &vm.net) {
        sinks.push(Box::new(tap.try_clone().with_context(|| format!("cannot use tap '{name}'"))?));
    }
    let console_nic = sinks.len();
    sinks.push(Box::new(crate::host::output::GatedConsole));
    Ok((Arc::new(OutputGate::new(sinks)), console_nic))
}

/// The output gate, and the tap's reader started (after `earlier`).
fn attach_output(host: &mut SideHost, vm: &LinuxVm, earlier: Vec<Vec<u8>>) -> Result<(Arc<OutputGate>, usize)> {
    let gate = new_gate(host, vm)?;
    if let (Some(tap), Some((name, _))) = (&host.tap, &vm.net) {
        let reader = tap.try_clone().with_context(|| format!("cannot use tap '{name}'"))?;
        host.console.add_tap_after(reader, earlier).with_context(|| format!("cannot read tap '{name}'"))?;
    }
    Ok(gate)
}

/// Looks for a secondary at the side's `--peer` while the primary runs
/// alone, on a thread of its own: the run loop says at which epoch to
/// look (`want`, 0: not at all) and takes a greeted connection
/// ([`Joining`]) when there is one.
struct Seeker {
    peer: Arc<Mutex<Option<String>>>,
    want: Arc<AtomicU64>,
    found: Arc<Mutex<Option<(Joining, History)>>>,
    stop: Arc<AtomicBool>,
}

/// How often a primary running alone looks for a secondary.
const SEEK_EVERY: Duration = Duration::from_secs(1);

impl Seeker {
    fn start(peer: Option<String>, hello: Hello, key: Option<ft::auth::Key>) -> Seeker {
        let (want, found, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(Mutex::new(None)), Arc::default());
        let seeker = Seeker { peer: Arc::new(Mutex::new(peer)), want, found, stop };
        let (want, found, stop) = (seeker.want.clone(), seeker.found.clone(), seeker.stop.clone());
        let peer = seeker.peer.clone();
        std::thread::spawn(move || {
            let mut said = String::new();
            while !stop.load(Ordering::Relaxed) {
                let epoch = want.load(Ordering::Relaxed);
                let peer = peer.lock().unwrap().clone();
                if let Some(peer) = peer.filter(|_| epoch != 0 && found.lock().unwrap().is_none()) {
                    let greeted = Joining::connect(&peer, epoch, hello.clone(), key.as_ref(), SEEK_EVERY)
                        .map_err(anyhow::Error::from)
                        .and_then(|mut j| super::sync::peer_history(&mut j).map(|h| (j, h)));
                    match greeted {
                        Ok(found_one) => *found.lock().unwrap() = Some(found_one),
                        // Nobody there yet is the usual case: say only a
                        // refusal, once.
                        Err(e) if matches!(e.downcast_ref(), Some(ft::link::PairError::Unreachable { .. })) => {
                            tracing::debug!("{e}")
                        }
                        Err(e) => {
                            let text = format!("{e:#}");
                            if text != said {
                                tracing::warn!("no secondary joins from {peer}: {text}");
                                said = text;
                            }
                        }
                    }
                }
                std::thread::sleep(SEEK_EVERY);
            }
        });
        seeker
    }

    /// Look at `peer` from now on (a migration's target).
    fn look_at(&self, peer: &str) {
        *self.peer.lock().unwrap() = Some(peer.to_string());
    }

    /// Look at `epoch` (running alone), or not (0).
    fn want(&self, epoch: u64) {
        if self.want.swap(epoch, Ordering::Relaxed) != epoch && epoch != 0 && self.peer.lock().unwrap().is_some() {
            tracing::info!("looking for a secondary to protect the VM again");
        }
    }

    fn ready(&self) -> bool {
        self.found.lock().unwrap().is_some()
    }

    fn take(&self) -> Option<(Joining, History)> {
        self.found.lock().unwrap().take()
    }
}

impl Drop for Seeker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Run the primary of a pair.
pub fn run(vm: &LinuxVm, opts: &PairOpts) -> Result<Outcome> {
    let vm_id = vm.identity()?;
    let arbiter = arbiter_for(opts, &vm_id)?;
    // Before any machine exists: they all mark their writes.
    let tracker = super::track_replica(vm, &vm_id)?;
    let console = StdioConsole::open();
    let tap = match &vm.net {
        Some((name, _)) => Some(tap::Tap::open(name, true)?),
        None => None,
    };
    let seed = host_seed()?;
    // The machine exists before the link (its state hash is in the hello):
    // what it draws waits in `draws` until the link takes it.
    let draws = crate::host::entropy::Draws::default();
    let maker = MachineMaker::new(vm, opts.hash_every).watching_disk(&opts.cfg.disk);
    maker.set_host(Some(HostEntropy::logged(&draws)?));
    // A disk error only this replica saw must not reach the guest: the
    // run stops, and the secondary goes on from the last mark (the maker's
    // machines stop on host errors).
    let mut m = maker.machine(seed)?;
    let hello = Hello {
        vm_id: vm_id.clone(),
        disk_hash: vm.disk_hash()?,
        seed,
        state_hash: m.state_hash(),
        mac: vm.net.as_ref().map(|(_, mac)| *mac),
        host: crate::host::identity::host_id(),
        shared_arbiter: arbiter.shared_across_hosts(),
        build: crate::host::identity::build_id(),
        join: false,
    };
    if let Some((disk, false)) = &vm.disk {
        replica::check_fresh(disk, &vm_id, arbiter.read()?.as_ref())?;
    }
    // The replica is copied now, before the guest runs on it.
    let kept = opts.keep_log.as_deref().map(|dir| KeptReplica::take(vm, dir, "primary")).transpose()?;
    let disk_hash = hello.disk_hash.clone();
    let switch = Arc::new(AtomicBool::new(false));
    let migrate: super::Migrate = Arc::default();
    let policy = super::policy::Policy::start(opts.policy.clone(), vm.net.as_ref().map(|(name, _)| name.as_str()));
    let status = StatusSlot::serve(opts.metrics.as_deref(), switch.clone(), migrate.clone(), Arc::new(policy))?;
    let records = replica::RecordWriter::new(vm, &vm_id);
    let mut host =
        SideHost { vm_id: vm_id.clone(), console, tap, status, switch, migrate, records, arbiter: arbiter.clone() };
    let (gate, console_nic) = attach_output(&mut host, vm, Vec::new())?;
    tracing::info!("primary: waiting for the secondary at {} (arbiter {})", opts.addr, arbiter.describe());
    let stop = host.console.stop_flag();
    let mut link =
        PrimaryLink::connect(&opts.addr, hello, arbiter, gate, opts.cfg.clone(), opts.key.as_ref(), &|| {
            stop.load(std::sync::atomic::Ordering::Relaxed)
        })?;
    if let Some(t) = &tracker {
        // Paired at boot, the disks compared equal: a generation begins.
        t.begin(changes::boot_generation(&seed), true).context("cannot record the disk generation")?;
    }
    if let Some(kept) = kept {
        let mut kept = kept.start(vm, disk_hash)?;
        tracing::info!("keeping this side's log in '{}'", kept.path.display());
        link.keep_log(Box::new(move |r| kept.append(r)));
    }
    let mut log = InputLog::with_draws(link, draws);
    log.record(0, Event::Seed(seed));
    let next = serve(vm, opts, &mut host, m, maker, log, console_nic)?;
    drive(vm, opts, &mut host, next)
}

/// What a secondary that won the epoch takes over (see [`Next::Alone`]).
pub struct Live {
    pub takeover: Takeover,
    pub input: Vec<Vec<u8>>,
    pub epoch: u64,
    pub base: u64,
    pub fresh_boot: bool,
}

/// A secondary that lost its primary and won the epoch goes live here: the
/// host's entropy (logged, for a secondary that joins later), the host's
/// clock, the tap and the console; first the frames the primary may have
/// died holding, then the guest's addresses announced from this port, and
/// the frames the input mirror kept handed to the guest. It runs as a
/// primary alone, which a secondary at `--peer` can join.
pub fn alone(
    vm: &LinuxVm,
    opts: &PairOpts,
    host: &mut SideHost,
    mut m: Machine,
    maker: MachineMaker,
    live: Live,
) -> Result<Next> {
    let typed = host.console.discard_pending();
    if typed > 0 {
        tracing::info!("dropped {typed} console bytes typed before going live");
    }
    let draws = crate::host::entropy::Draws::default();
    maker.set_host(Some(HostEntropy::logged(&draws)?));
    let mut seed = None;
    if live.fresh_boot {
        // The old machine lets go of the disk (its lock) first.
        drop(m);
        let s = host_seed()?;
        m = maker.machine(s)?;
        seed = Some(s);
    }
    m.resync_clock();
    // Alone, a disk error reaches the guest as on any VM.
    m.stop_on_host_errors(false);
    if let (Some(tap), Some((name, _))) = (&host.tap, &vm.net) {
        // What the primary may have died holding goes out first: replies
        // its clients are waiting for (duplicates of what it did release
        // are harmless). From the new port, they also move the address.
        let mut t = tap.try_clone().with_context(|| format!("cannot use tap '{name}'"))?;
        let resent = live.takeover.frames.iter().filter(|(_, frame)| t.send(frame).is_ok()).count();
        if resent > 0 {
            tracing::info!("sent {resent} frames the primary may not have released");
        }
    }
    let (gate, console_nic) = attach_output(host, vm, live.input)?;
    if let (Some(tap), Some((name, mac))) = (&host.tap, &vm.net) {
        let announcer = tap.try_clone().with_context(|| format!("cannot use tap '{name}'"))?;
        let addresses = live.takeover.addresses;
        announce::spawn(announcer, *mac, addresses.clone());
        let list: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
        tracing::info!(
            "announcing {} ({}) on tap '{name}'",
            announce::mac_text(mac),
            if list.is_empty() { "no address seen yet".to_string() } else { list.join(", ") }
        );
    }
    let link = PrimaryLink::alone(live.epoch, host.arbiter.clone(), gate, opts.cfg.clone(), live.base);
    let mut log = InputLog::with_draws(link, draws);
    if let Some(seed) = seed {
        log.record(0, Event::Seed(seed));
    }
    serve(vm, opts, host, m, maker, log, console_nic)
}

/// A switchover made this side, the old secondary, the primary: its guest
/// goes on live from the handover point, its log to the old primary.
#[allow(clippy::too_many_arguments)]
pub fn resume(
    vm: &LinuxVm,
    opts: &PairOpts,
    host: &mut SideHost,
    mut m: Machine,
    maker: MachineMaker,
    switched: Switched,
    input: Vec<Vec<u8>>,
    takeover: Takeover,
) -> Result<Next> {
    let draws = crate::host::entropy::Draws::default();
    maker.set_host(Some(HostEntropy::logged(&draws)?));
    m.resync_clock();
    m.stop_on_host_errors(true);
    let (gate, console_nic) = attach_output(host, vm, input)?;
    let link = PrimaryLink::resume(switched, host.arbiter.clone(), gate, opts.cfg.clone());
    if let (Some(tap), Some((name, mac))) = (&host.tap, &vm.net) {
        // The guest's address now lives behind this port: say so at once,
        // so that a switch sends its frames here, not to the old port.
        let announcer = tap.try_clone().with_context(|| format!("cannot use tap '{name}'"))?;
        announce::spawn(announcer, *mac, takeover.addresses.clone());
    }
    let log = InputLog::with_draws(link, draws);
    serve(vm, opts, host, m, maker, log, console_nic)
}

/// The primary's run loop, from a booted machine (or one a switchover
/// handed over) and a paired link, across guest reboots; it ends with the
/// VM, or with a switchover that makes this side the secondary.
fn serve(
    vm: &LinuxVm,
    opts: &PairOpts,
    host: &mut SideHost,
    mut m: Machine,
    maker: MachineMaker,
    mut log: InputLog<PrimaryLink>,
    console_nic: usize,
) -> Result<Next> {
    let mut shared = log.sink.shared.clone();
    host.status.set(status_fn(shared.clone(), Some(log.sink.gate.clone())));
    log.sink.on_forward(Box::new(host.console.frame_sender(0)));
    host.records.ran_at(shared.epoch());
    // (The VM's identity was computed at start: hashing the kernel and
    // initrd again here would hold up a secondary going live.)
    let join_hello = Hello {
        vm_id: host.vm_id.clone(),
        disk_hash: None,
        seed: [0; 32],
        state_hash: 0,
        mac: vm.net.as_ref().map(|(_, mac)| *mac),
        host: crate::host::identity::host_id(),
        shared_arbiter: host.arbiter.shared_across_hosts(),
        build: crate::host::identity::build_id(),
        join: true,
    };
    let seeker = Seeker::start(opts.peer.clone(), join_hello, opts.key.clone());
    let mut transfer = Transfer { copy: None, done: Arc::new(AtomicBool::new(false)) };
    // A migration under way: whether this side stays as the secondary.
    let mut moving: Option<bool> = None;
    loop {
        let mut io = PrimaryIo {
            console: &mut host.console,
            log: &mut log,
            print_hashes: opts.print_hashes,
            console_nic,
            fenced: false,
            switch: &host.switch,
            switching: false,
            migrate: &host.migrate,
            migrating: None,
            seeker: &seeker,
            copying: transfer.copy.is_some(),
            copy_done: &transfer.done,
            joining: false,
            records: &host.records,
            recorded: shared.epoch(),
            policy: host.status.policy(),
        };
        let stop = match m.run_linux(&mut io, opts.max_insns) {
            Ok(stop) => stop,
            Err(machine::RunError::HostFault(fault)) if shared.state() == State::Alone => {
                // No secondary to go on from the last mark: this is the VM,
                // and a disk error reaches its guest as on any VM.
                tracing::error!(
                    "this primary's disk replica failed ({fault}); it runs alone, so the guest sees the error"
                );
                m.stop_on_host_errors(false);
                continue;
            }
            Err(machine::RunError::HostFault(fault)) => {
                // No end record: the secondary goes on from the last mark,
                // where the guest has not seen the failed request.
                log.sink.resign(&format!("its disk replica failed ({fault})"));
                bail!("this primary's disk replica failed ({fault}): it stops, and the secondary goes on with the VM");
            }
            Err(e) => return Err(e.into()),
        };
        let (fenced, switching, joining, migrating) = (io.fenced, io.switching, io.joining, io.migrating);
        if let Some((to, keep)) = migrating {
            // Let the present secondary go (it stops, and this side runs
            // alone at the next epoch), then look for one at `to`: once it
            // has joined, a switchover moves the VM there.
            tracing::info!(
                "migration to {to} asked for{}",
                if keep { " (this side stays as the secondary)" } else { "" }
            );
            log.sink
                .release(&format!("a migration to {to}"), || crate::host::failpoint::kill_if("primary-after-release"));
            seeker.look_at(&to);
            moving = Some(keep);
            continue;
        }
        if fenced {
            print_final(&mut m);
            bail!("{}", shared.status().note);
        }
        if joining {
            let found = if transfer.copy.is_none() { seeker.take() } else { None };
            if let Some(link) = join_step(vm, opts, host, &mut m, &mut log, &mut transfer, found)? {
                shared = link;
                if moving.is_some() {
                    // Joined at the migration's target: move the VM there.
                    host.switch.store(true, Ordering::SeqCst);
                }
            }
            continue;
        }
        if switching {
            let at = m.hart.position().0;
            // Entropy drawn before the stop goes before the handover.
            log.take_draws();
            tracing::info!("switchover: the guest stopped at position {at}; handing over to the secondary");
            match log.sink.handover(at, HANDOVER_TIMEOUT, || crate::host::failpoint::kill_if("primary-after-handover"))
            {
                Ok(switched) => {
                    maker.set_host(None);
                    // Frames that came after the handover point: the new
                    // secondary's mirror forwards those the new primary
                    // did not get itself.
                    let late = host.console.detach_taps();
                    let release = moving == Some(false);
                    return Ok(Next::Secondary { machine: m, maker, switched, late, release });
                }
                Err(why) => {
                    tracing::warn!("the switchover failed: {why}; this side goes on as the primary");
                    continue;
                }
            }
        }
        if stop == Stop::Quit && host.console.signalled() {
            print_final(&mut m);
            if shared.state() == State::Protected {
                // Told to stop: this side goes, the VM does not. No end
                // record: the secondary sees the channel close and takes over.
                bail!("stopped by a signal; the secondary goes on with the VM");
            }
            bail!("stopped by a signal");
        }
        let end = m.hart.position().0;
        log.record(end, Event::End(end_reason(stop)));
        if stop == Stop::Reboot {
            log.sink.rebooted(end);
            crate::host::failpoint::kill_if("primary-after-reboot-end");
            let seed = host_seed()?;
            log.record(0, Event::Seed(seed));
            // The old machine lets go of the disk (its lock) first. Building
            // the next takes a while: not a stuck run loop.
            log.sink.waiting(true);
            drop(m);
            m = maker.machine(seed)?;
            log.sink.waiting(false);
            continue;
        }
        // Let the secondary have the end before this side goes.
        log.sink.finish(end, Duration::from_secs(5));
        print_final(&mut m);
        return outcome_of(stop, host.console.signalled(), opts.max_insns).map(Next::Done);
    }
}

/// A join under way: its round on the wire, and the flag its thread sets
/// when the round is through.
struct Transfer {
    copy: Option<super::sync::Copy>,
    done: Arc<AtomicBool>,
}

/// A secondary joins this primary, running alone (see [`super::sync`]):
/// each call moves the transfer one step (the guest runs between steps),
/// and the last one puts the new link and gate in place, the pair running
/// on from the machine's position. A failed join leaves this side running
/// alone, looking again. Returns the new link's shared state when joined.
fn join_step(
    vm: &LinuxVm,
    opts: &PairOpts,
    host: &mut SideHost,
    m: &mut Machine,
    log: &mut InputLog<PrimaryLink>,
    transfer: &mut Transfer,
    j: Option<(Joining, History)>,
) -> Result<Option<Arc<Shared>>> {
    let Transfer { copy, done } = transfer;
    use super::sync::{next_round, start_copy, Round};
    let at = m.hart.position().0;
    let base = log.sink.base();
    // A deliberate pause, not a stuck run loop.
    log.sink.waiting(true);
    let step = match (copy.take(), j) {
        (Some(c), _) => next_round(c, m, base, done.clone()),
        (None, Some((j, theirs))) => {
            tracing::info!("a secondary at {} joins: sending the VM's state, from position {at} on", j.peer());
            let progress = super::sync::Progress::new(log.sink.shared.clone(), j.peer());
            start_copy(j, theirs, m, vm, done.clone(), progress).map(Round::Sending)
        }
        (None, None) => return Ok(None),
    };
    log.sink.waiting(false);
    match step {
        Ok(Round::Sending(c)) => {
            *copy = Some(c);
            Ok(None)
        }
        Ok(Round::Joined(j, sent)) => {
            // Protected again: a disk error only this replica sees must
            // stop this side (the secondary goes on), not reach the guest
            // as it did while this side ran alone.
            m.stop_on_host_errors(true);
            let (gate, _) = new_gate(host, vm)?;
            let link = j.joined(host.arbiter.clone(), gate.clone(), opts.cfg.clone(), base, base + at);
            let disk = match sent.disk_delta {
                Some((chunks, common)) => {
                    format!(
                        "{} MB of disk (the {chunks} chunks changed since generation {common:016x})",
                        sent.disk_bytes >> 20
                    )
                }
                None => format!("{} MB of disk", sent.disk_bytes >> 20),
            };
            tracing::info!(
                "sent {disk} and {} MB of machine state in {} rounds while the guest ran; the last paused it {} ms \
                 (the first round's start {} ms, then its RAM at most {} ms at a time)",
                sent.snapshot_bytes >> 20,
                sent.rounds,
                sent.pause_ms,
                sent.first_pause_ms,
                sent.step_pause_ms
            );
            let shared = link.shared.clone();
            link.on_forward(Box::new(host.console.frame_sender(0)));
            std::mem::replace(&mut log.sink, link).retire();
            host.status.set(status_fn(shared.clone(), Some(gate)));
            Ok(Some(shared))
        }
        Err(e) => {
            tracing::warn!("the secondary could not join: {e:#}; running on alone");
            log.sink.shared.set_sync(None);
            Ok(None)
        }
    }
}
