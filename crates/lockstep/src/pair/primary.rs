//! The primary: the guest live on this host, its inputs streamed to the
//! secondary, its network output held until the secondary has them.

use super::{arbiter_for, status_fn, KeptReplica, PairOpts};
use crate::host::console::StdioConsole;
use crate::host::entropy::{host_seed, HostEntropy};
use crate::host::log::report;
use crate::vm::record::{InputLog, LogSink};
use crate::vm::{end_reason, outcome_of, print_final, replica, LinuxVm};
use crate::Outcome;
use anyhow::{bail, Context, Result};
use ft::gate::{FrameSink, OutputGate};
use ft::link::PrimaryLink;
use ft::wire::Hello;
use ft::State;
use machine::{HostInput, HostIo, Machine, Stop};
use replay::{Event, Record};
use std::sync::Arc;
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
    /// The replica's record, and the epoch recorded there.
    records: &'a replica::RecordWriter,
    recorded: u64,
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

/// Build and boot the VM with `seed`, its draws kept for the log.
fn boot(vm: &LinuxVm, seed: [u8; 32], draws: &crate::host::entropy::Draws, opts: &PairOpts) -> Result<Machine> {
    let mut m = vm.machine(seed, Box::new(HostEntropy::logged(draws)?))?;
    m.hash_every = opts.hash_every;
    // A disk error only this replica saw must not reach the guest: the
    // run stops, and the secondary goes on from the last mark.
    m.stop_on_host_errors(true);
    Ok(m)
}

/// Run the primary of a pair.
pub fn run(vm: &LinuxVm, opts: &PairOpts) -> Result<Outcome> {
    let vm_id = vm.identity()?;
    let arbiter = arbiter_for(opts, &vm_id)?;
    let mut console = StdioConsole::open();
    let mut sinks: Vec<Box<dyn FrameSink>> = Vec::new();
    if let Some((name, _)) = &vm.net {
        let tap = tap::Tap::open(name, true)?;
        sinks.push(Box::new(tap.try_clone().with_context(|| format!("cannot use tap '{name}'"))?));
        console.add_tap(tap).with_context(|| format!("cannot read tap '{name}'"))?;
    }
    let console_nic = sinks.len();
    sinks.push(Box::new(crate::host::output::GatedConsole));
    let gate = Arc::new(OutputGate::new(sinks));
    let seed = host_seed()?;
    // The machine exists before the link (its state hash is in the hello):
    // what it draws waits in `draws` until the link takes it.
    let draws = crate::host::entropy::Draws::default();
    let mut m = boot(vm, seed, &draws, opts)?;
    let hello = Hello {
        vm_id: vm_id.clone(),
        disk_hash: vm.disk_hash()?,
        seed,
        state_hash: m.state_hash(),
        mac: vm.net.as_ref().map(|(_, mac)| *mac),
        host: crate::host::identity::host_id(),
        shared_arbiter: arbiter.shared_across_hosts(),
        build: crate::host::identity::build_id(),
    };
    if let Some((disk, false)) = &vm.disk {
        replica::check_fresh(disk, &vm_id, arbiter.read()?.as_ref())?;
    }
    // The replica is copied now, before the guest runs on it.
    let kept = opts.keep_log.as_deref().map(|dir| KeptReplica::take(vm, dir, "primary")).transpose()?;
    let disk_hash = hello.disk_hash.clone();
    tracing::info!("primary: waiting for the secondary at {} (arbiter {})", opts.addr, arbiter.describe());
    let stop = console.stop_flag();
    let mut link =
        PrimaryLink::connect(&opts.addr, hello, arbiter, gate.clone(), opts.cfg, opts.key.as_ref(), &|| {
            stop.load(std::sync::atomic::Ordering::Relaxed)
        })?;
    if let Some(kept) = kept {
        let mut kept = kept.start(vm, disk_hash)?;
        tracing::info!("keeping this side's log in '{}'", kept.path.display());
        link.keep_log(Box::new(move |r| kept.append(r)));
    }
    let shared = link.shared.clone();
    let records = replica::RecordWriter::new(vm, &vm_id);
    records.ran_at(shared.epoch());
    if let Some(addr) = &opts.metrics {
        crate::host::status::serve(addr, Box::new(status_fn(shared.clone(), Some(gate.clone()))))?;
    }
    let mut log = InputLog::with_draws(link, draws);
    log.record(0, Event::Seed(seed));
    loop {
        let mut io = PrimaryIo {
            console: &mut console,
            log: &mut log,
            print_hashes: opts.print_hashes,
            console_nic,
            fenced: false,
            records: &records,
            recorded: shared.epoch(),
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
                bail!("this primary's disk replica failed ({fault}): it stops, and the secondary goes on with the VM");
            }
            Err(e) => return Err(e.into()),
        };
        let fenced = io.fenced;
        if fenced {
            print_final(&mut m);
            bail!("{}", shared.status().note);
        }
        if stop == Stop::Quit && console.signalled() {
            // Told to stop: this side goes, the VM does not. No end record:
            // the secondary sees the channel close and takes over.
            print_final(&mut m);
            bail!("stopped by a signal; the secondary goes on with the VM");
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
            m = boot(vm, seed, log.draws(), opts)?;
            log.sink.waiting(false);
            continue;
        }
        // Let the secondary have the end before this side goes.
        log.sink.finish(end, Duration::from_secs(5));
        print_final(&mut m);
        return outcome_of(stop, console.signalled(), opts.max_insns);
    }
}
