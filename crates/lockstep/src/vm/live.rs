//! Running a Linux guest live on this host: console on stdio, network on
//! its tap, host entropy and host time; recording it if asked. A guest
//! reboot boots the same VM again with a fresh seed; the run ends when the
//! guest powers off, panics, reaches its instruction limit or is stopped.

use super::record::{snapshot_dir, InputLog, Meta, Recorder};
use super::{end_reason, outcome_of, print_final, LinuxVm};
use crate::host::console::StdioConsole;
use crate::host::entropy::{host_seed, HostEntropy};
use crate::host::log::report;
use crate::Outcome;
use anyhow::{bail, Context, Result};
use machine::{HostInput, HostIo, Machine, Stop};
use replay::Event;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Options of a run.
#[derive(Clone, Debug, Default)]
pub struct RunOpts {
    pub max_insns: Option<u64>,
    pub record: Option<PathBuf>,
    pub hash_every: Option<u64>,
    /// Snapshot every this many positions into `LOG.snapshots/`.
    pub snapshot_every: Option<u64>,
}

/// `lockstep run` of a Linux guest, recording it if asked.
pub fn run_live(vm: &LinuxVm, opts: &RunOpts) -> Result<Outcome> {
    let log = match &opts.record {
        None => None,
        Some(path) => Some(InputLog::new(Recorder::create(path, &Meta::of(vm)?)?)),
    };
    let snapshots = match (&opts.snapshot_every, &opts.record) {
        (Some(_), Some(log)) => {
            let d = snapshot_dir(log);
            std::fs::create_dir_all(&d).with_context(|| format!("cannot create '{}'", d.display()))?;
            Some(d)
        }
        (Some(_), None) => bail!("--snapshot-every needs --record (snapshots go beside the log)"),
        _ => None,
    };
    let mut console = StdioConsole::open();
    // The tap stays open across guest reboots.
    if let Some((name, _)) = &vm.net {
        // Offloads on both sides: the card offers them, the tap accepts them.
        let tap = tap::Tap::open(name, true)?;
        console.add_tap(tap).with_context(|| format!("cannot read tap '{name}'"))?;
    }
    let mut live = LiveRun { console: &mut console, log, snapshots, position: None, opts: opts.clone() };
    let m = live.boot(vm, host_seed()?)?;
    live.serve(vm, m)
}

/// A guest running live on this host, across its reboots.
pub struct LiveRun<'a> {
    pub console: &'a mut StdioConsole,
    /// The recording, if any.
    pub log: Option<InputLog<Recorder>>,
    /// Where snapshots go (with `snapshot_every`).
    pub snapshots: Option<PathBuf>,
    /// Where the run loop is, for a status endpoint.
    pub position: Option<Arc<AtomicU64>>,
    pub opts: RunOpts,
}

impl LiveRun<'_> {
    /// Build and boot `vm` with `seed` (logged when recording).
    pub fn boot(&mut self, vm: &LinuxVm, seed: [u8; 32]) -> Result<Machine> {
        let entropy = match &mut self.log {
            Some(log) => {
                log.record(0, Event::Seed(seed));
                HostEntropy::logged(log.draws())?
            }
            None => HostEntropy::open()?,
        };
        let mut m = vm.machine(seed, Box::new(entropy), None)?;
        m.hash_every = self.opts.hash_every;
        m.snapshot_every = self.opts.snapshot_every;
        Ok(m)
    }

    /// Run `m` until the guest stops for good, booting `vm` again (alone,
    /// with a fresh seed) each time it reboots.
    pub fn serve(&mut self, vm: &LinuxVm, mut m: Machine) -> Result<Outcome> {
        loop {
            let mut io = LiveIo {
                console: self.console,
                log: self.log.as_mut(),
                print_hashes: self.opts.hash_every.is_some(),
                snapshots: self.snapshots.as_ref(),
                position: self.position.as_ref(),
            };
            let stop = m.run_linux(&mut io, self.opts.max_insns)?;
            if let Some(log) = &mut self.log {
                log.record(m.hart.position().0, Event::End(end_reason(stop)));
                log.sink.flush()?;
            }
            if stop == Stop::Reboot {
                // The old machine lets go of the disk (its lock) first.
                drop(m);
                m = self.boot(vm, host_seed()?)?;
                continue;
            }
            print_final(&mut m);
            return outcome_of(stop, self.console.signalled(), self.opts.max_insns);
        }
    }
}

/// The live host side: the console and taps, optionally recording what
/// reaches the guest.
struct LiveIo<'a> {
    console: &'a mut StdioConsole,
    log: Option<&'a mut InputLog<Recorder>>,
    print_hashes: bool,
    snapshots: Option<&'a PathBuf>,
    position: Option<&'a Arc<AtomicU64>>,
}

impl HostIo for LiveIo<'_> {
    fn console_write(&mut self, bytes: &[u8]) {
        self.console.console_write(bytes);
    }
    fn wait(&mut self, timeout: Duration) -> HostInput {
        // A log that cannot be written (disk full) stops the run: going on
        // would leave a recording that does not replay.
        if self.log.as_ref().is_some_and(|l| l.sink.check().is_err()) {
            return HostInput::Quit;
        }
        self.console.wait(timeout)
    }
    fn send_frame(&mut self, nic: usize, frame: &[u8]) {
        self.console.send_frame(nic, frame);
    }
    fn progress(&mut self, pos: u64) {
        if let Some(p) = &self.position {
            p.store(pos, Ordering::Relaxed);
        }
    }
    fn delivered(&mut self, pos: u64, input: &HostInput) {
        if let Some(log) = &mut self.log {
            log.delivered(pos, input);
        }
    }
    fn skipped(&mut self, pos: u64, steps: u64) {
        if let Some(log) = &mut self.log {
            log.record(pos, Event::Skip(steps));
        }
    }
    fn snapshot_taken(&mut self, snap: machine::snapshot::Snapshot) -> Option<u64> {
        let (Some(dir), Some(log)) = (&self.snapshots, &mut self.log) else { return None };
        let t = std::time::Instant::now();
        match snap.write_in(dir) {
            Ok((id, path)) => {
                log.record(snap.position, Event::Snapshot(id));
                let kind = if snap.parent.is_some() { "delta" } else { "full" };
                let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                let ms = t.elapsed().as_secs_f64() * 1e3;
                report(&format!("snapshot {} {kind} {bytes} bytes {ms:.0} ms {}", snap.position, path.display()));
                Some(id)
            }
            Err(e) => {
                let e = anyhow::Error::from(e);
                tracing::warn!("snapshot at position {} failed: {e:#}", snap.position);
                None
            }
        }
    }
    fn state_hash(&mut self, pos: u64, hash: u64) {
        if let Some(log) = &mut self.log {
            log.record(pos, Event::Hash(hash));
        }
        if self.print_hashes {
            report(&format!("hash {pos} {hash:016x}"));
        }
    }
}
