//! The replayer: one machine advanced through a stream of logged records,
//! never past what the stream holds. `lockstep replay` feeds it from a
//! file ([`file::FileSource`]), a secondary from its link to the primary
//! (`pair::secondary::LinkSource`); both get the same checks (state hashes,
//! the guest idling or stopping where the log goes on, entropy drawn where
//! the log has none), the same handling of guest reboots, and the same
//! answers ([`Step`], or [`ReplayError::Diverged`] naming the interval).
//!
//! Under replay the machine has no host input at all: console bytes and
//! frames come from the log at their positions, entropy is the logged
//! bytes in the order drawn, and network output is not delivered (it is
//! read for the guest's own addresses, which a secondary announces when it
//! goes live).

pub mod file;

use crate::host::entropy::HostEntropy;
use crate::host::log::report;
use crate::vm::{end_reason, LinuxVm};
use machine::virtio::rng::EntropySource;
use machine::{HostInput, HostIo, Machine, RunTo};
use replay::{EndReason, Event, Record};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Where records come from.
pub trait Source {
    /// The next piece of the log, waiting up to `wait` for one.
    fn fetch(&mut self, wait: Duration) -> Result<Fetched, ReplayError>;
}

/// A piece of the log.
pub enum Fetched {
    /// Records, in log order.
    Records(Vec<Record>),
    /// Every record before `through` has been fetched, and output produced
    /// at or before `released` has left the recording side (both counted
    /// across guest reboots, see [`Replayer::position`]).
    Through { through: u64, released: u64 },
    /// Nothing arrived within the wait.
    Nothing,
    /// Nothing more will come, and why.
    Closed(String),
}

/// What a secondary going live takes over from its replay.
pub struct Takeover {
    /// The guest's addresses, seen in its frames (to announce).
    pub addresses: Vec<IpAddr>,
    /// Frames the primary may have died holding (nic, frame), in order.
    pub frames: Vec<(usize, Vec<u8>)>,
}

/// What one [`Replayer::step`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The machine ran or a record took effect: step again.
    Progress,
    /// Everything fetched has been executed; the source had nothing more
    /// within the wait.
    NeedMore,
    /// The log's end record: the VM stopped (not a reboot) exactly there.
    Ended(EndReason),
    /// The source closed (why), and everything it gave has been replayed.
    Exhausted(String),
    /// The source closed (why) after the guest rebooted and before the
    /// next boot's record: nothing of that boot exists yet, so a side that
    /// goes on boots it afresh.
    RebootUnseeded(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The machine does not do what the log says it did.
    #[error("replay diverged between positions {from} and {to}: {what}")]
    Diverged { from: u64, to: u64, what: String },
    /// The log is not a well-formed run.
    #[error("{0}")]
    Log(String),
    /// The host could not go on (a device, a file, the machine).
    #[error(transparent)]
    Host(#[from] anyhow::Error),
}

/// How many records to hold ahead of the machine.
const READ_AHEAD: usize = 1024;
/// The most the machine runs between two looks at the source, so that a
/// secondary reports its progress as it goes.
const SLICE: u64 = 1 << 22;
/// How long a reboot's next boot record may take to arrive.
const SEED_WAIT: Duration = Duration::from_secs(10);

/// The logged entropy, shared with the machine's entropy source: bytes in
/// the order drawn while replaying; the host's once live.
#[derive(Default)]
struct Feed {
    queue: VecDeque<Vec<u8>>,
    /// The first mismatch (drawn where the log has none, or another size).
    error: Option<String>,
    host: Option<HostEntropy>,
}

struct LoggedEntropy(Rc<RefCell<Feed>>);

impl EntropySource for LoggedEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        let mut feed = self.0.borrow_mut();
        if let Some(host) = &mut feed.host {
            return host.fill(buf);
        }
        match feed.queue.pop_front() {
            Some(bytes) if bytes.len() == buf.len() => buf.copy_from_slice(&bytes),
            other => {
                buf.fill(0);
                let got = other.map_or("none".to_string(), |b| format!("{} bytes", b.len()));
                let e = format!("the guest drew {} entropy bytes where the log has {got}", buf.len());
                feed.error.get_or_insert(e);
            }
        }
    }
}

/// The replaying host side: console output to stdout, no input; network
/// frames are counted, not delivered, and, given the guest's MAC, read for
/// the guest's own addresses. A secondary also keeps the frames the
/// primary may not have released yet (see [`Unreleased`]).
struct ReplayIo {
    frames_out: u64,
    print_hashes: bool,
    mac: Option<[u8; 6]>,
    addresses: Vec<IpAddr>,
    unreleased: Option<Unreleased>,
}

/// Frames this side produced past the primary's last known release point.
/// When the primary is lost, it may have died holding them (it releases a
/// frame only once the secondary acknowledged the log up to it): the side
/// that goes live sends them again, so that a client waiting for a reply
/// has it at once instead of after a retransmission timeout (or, over
/// UDP, never). Duplicates of frames the primary did release are harmless.
#[derive(Default)]
struct Unreleased {
    /// Frames of the run in progress, not yet given a position.
    fresh: Vec<(usize, Vec<u8>)>,
    /// Frames in order, each with a position at or after where the guest
    /// produced it (the end of the run that produced it).
    kept: VecDeque<(u64, usize, Vec<u8>)>,
    /// The primary's last reported release point: every frame it produced
    /// at or before it has left.
    released: u64,
}

/// At most this many unreleased frames are kept (the primary's gate pauses
/// its guest at about as many held items).
const MAX_UNRELEASED: usize = 4096;

impl Unreleased {
    /// The run that produced the fresh frames ended at `at`. A frame is
    /// produced at or before `at`, and the primary tags it with its next
    /// mark after the instruction that produced it; `released` is itself a
    /// mark, so `at <= released` means the primary has released it.
    fn settle(&mut self, at: u64) {
        for (nic, frame) in self.fresh.drain(..) {
            self.kept.push_back((at, nic, frame));
        }
        self.prune();
    }

    fn release(&mut self, released: u64) {
        self.released = self.released.max(released);
        self.prune();
    }

    fn prune(&mut self) {
        while self.kept.front().is_some_and(|(at, _, _)| *at <= self.released) || self.kept.len() > MAX_UNRELEASED {
            self.kept.pop_front();
        }
    }
}

impl HostIo for ReplayIo {
    fn console_write(&mut self, bytes: &[u8]) {
        crate::host::output::write(bytes);
    }
    fn wait(&mut self, _: Duration) -> HostInput {
        HostInput::Nothing
    }
    fn send_frame(&mut self, nic: usize, frame: &[u8]) {
        self.frames_out += 1;
        if let Some(u) = &mut self.unreleased {
            u.fresh.push((nic, frame.to_vec()));
        }
        if let Some(ip) = self.mac.and_then(|mac| crate::pair::announce::source_address(frame, &mac)) {
            if !self.addresses.contains(&ip) {
                self.addresses.push(ip);
            }
        }
    }
    fn state_hash(&mut self, pos: u64, hash: u64) {
        if self.print_hashes {
            report(&format!("hash {pos} {hash:016x}"));
        }
    }
}

/// What a replay is told besides the log.
#[derive(Clone, Copy, Default)]
pub struct ReplayOpts {
    pub hash_every: Option<u64>,
    /// Print each state hash (`hash P H` on stderr).
    pub print_hashes: bool,
    /// The guest's MAC: learn its addresses from its frames.
    pub mac: Option<[u8; 6]>,
    /// Keep the frames the recording side may not have released (a
    /// secondary, which sends them when it goes live).
    pub keep_unreleased: bool,
}

/// Builds machines whose entropy comes from the log.
pub struct MachineMaker {
    vm: LinuxVm,
    feed: Rc<RefCell<Feed>>,
    hash_every: Option<u64>,
    disk_watch: Option<ft::DiskWatch>,
}

impl MachineMaker {
    pub fn new(vm: &LinuxVm, hash_every: Option<u64>) -> MachineMaker {
        MachineMaker { vm: vm.clone(), feed: Rc::default(), hash_every, disk_watch: None }
    }

    /// The machines' disks report each operation to `watch` (a side of a
    /// pair: see [`ft::DiskWatch`]).
    pub fn watching_disk(mut self, watch: &ft::DiskWatch) -> MachineMaker {
        self.disk_watch = Some(watch.clone());
        self
    }

    /// The VM, booted from `seed`, drawing entropy from the log.
    pub fn machine(&self, seed: [u8; 32]) -> anyhow::Result<Machine> {
        let mut m = self.vm.machine(seed, Box::new(LoggedEntropy(self.feed.clone())), self.disk_watch.as_ref())?;
        m.hash_every = self.hash_every;
        // A replica's disk error is this host's fault, not the guest's.
        m.stop_on_host_errors(true);
        Ok(m)
    }

    /// Where the machines' entropy comes from from now on: the host's
    /// (`Some`, logged or not: a side running its guest live) or the log
    /// (`None`: replaying). A side whose role changes keeps its machine
    /// and changes this.
    pub fn set_host(&self, host: Option<HostEntropy>) {
        self.feed.borrow_mut().host = host;
    }

    /// Forget logged entropy held so far (a replay started at a snapshot).
    pub fn drop_entropy(&self) {
        self.feed.borrow_mut().queue.clear();
    }
}

/// One machine advancing through a log: see the module documentation.
pub struct Replayer<S> {
    source: S,
    machine: Machine,
    maker: MachineMaker,
    io: ReplayIo,
    /// Records fetched, not yet executed (entropy goes to the feed).
    pending: VecDeque<Record>,
    /// The last mark: every record before it has been fetched.
    through: u64,
    /// Positions of the boots before this one (marks count across boots;
    /// the log's positions restart at 0 with each boot).
    base: u64,
    /// The last position whose state hash matched.
    last_good: u64,
    closed: Option<String>,
}

impl<S: Source> Replayer<S> {
    /// Replay `source` on `machine`, built by `maker` from the log's first
    /// boot record.
    pub fn new(source: S, machine: Machine, maker: MachineMaker, opts: ReplayOpts) -> Replayer<S> {
        Replayer::resume(source, machine, maker, opts, 0, 0)
    }

    /// Replay `source` from where `machine` is (a switchover's new
    /// secondary): the log's positions so far count from `base` (the
    /// guest's earlier boots), and every record before `through` has been
    /// executed.
    pub fn resume(
        source: S,
        machine: Machine,
        maker: MachineMaker,
        opts: ReplayOpts,
        base: u64,
        through: u64,
    ) -> Replayer<S> {
        let io = ReplayIo {
            frames_out: 0,
            print_hashes: opts.print_hashes,
            mac: opts.mac,
            addresses: Vec::new(),
            unreleased: opts.keep_unreleased.then(Unreleased::default),
        };
        let last_good = through.saturating_sub(base);
        let (pending, closed) = (VecDeque::new(), None);
        Replayer { source, machine, maker, io, pending, through, base, last_good, closed }
    }

    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    pub fn machine_mut(&mut self) -> &mut Machine {
        &mut self.machine
    }

    pub fn source(&self) -> &S {
        &self.source
    }

    pub fn source_mut(&mut self) -> &mut S {
        &mut self.source
    }

    /// Where the replay is, counted across guest reboots (as marks are).
    pub fn position(&self) -> u64 {
        self.base + self.machine.hart.position().0
    }

    /// The last mark received, in this boot's positions: every record
    /// before it has been fetched.
    pub fn last_mark(&self) -> u64 {
        self.through.saturating_sub(self.base)
    }

    /// The positions of the guest's boots before this one.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Frames the guest sent (not delivered).
    pub fn frames_out(&self) -> u64 {
        self.io.frames_out
    }

    /// The machine and its maker, to run live from here (the caller sets
    /// where entropy comes from), and what the live side takes over.
    pub fn into_parts(self) -> (Machine, MachineMaker, Takeover) {
        let frames = self.io.unreleased.map(|mut u| {
            // Frames from applying the last records (none reach a wire
            // before the next run) are as unreleased as any.
            u.settle(u64::MAX);
            u.kept.into_iter().map(|(_, nic, f)| (nic, f)).collect()
        });
        let takeover = Takeover { addresses: self.io.addresses, frames: frames.unwrap_or_default() };
        (self.machine, self.maker, takeover)
    }

    /// Take in what the source has, waiting up to `wait` for the first
    /// piece, then without waiting while records keep coming.
    fn pull(&mut self, mut wait: Duration) -> Result<(), ReplayError> {
        while self.closed.is_none() && self.pending.len() < READ_AHEAD {
            match self.source.fetch(wait)? {
                Fetched::Records(records) => {
                    let mut feed = self.maker.feed.borrow_mut();
                    for r in records {
                        match r.event {
                            Event::Entropy(bytes) => feed.queue.push_back(bytes),
                            _ => self.pending.push_back(r),
                        }
                    }
                }
                Fetched::Through { through, released } => {
                    self.through = self.through.max(through);
                    if let Some(u) = &mut self.io.unreleased {
                        u.release(released);
                    }
                }
                Fetched::Nothing => break,
                Fetched::Closed(why) => self.closed = Some(why),
            }
            wait = Duration::ZERO;
        }
        Ok(())
    }

    fn diverged(&self, what: String) -> ReplayError {
        ReplayError::Diverged { from: self.last_good, to: self.machine.hart.position().0, what }
    }

    /// Run to the next record, or to the last mark, and apply what is due;
    /// wait up to `wait` for the source when everything held is executed.
    pub fn step(&mut self, wait: Duration) -> Result<Step, ReplayError> {
        self.pull(Duration::ZERO)?;
        let pos = self.machine.hart.position().0;
        // With no record ahead, the machine runs to the last mark, also
        // after the source closed: the primary's execution to there had no
        // further input, and output it released from that stretch must be
        // produced here under the same rules before this side goes live.
        let target = match (self.pending.front(), &self.closed) {
            (Some(r), _) => r.position,
            (None, Some(why)) if pos >= self.last_mark() => return Ok(Step::Exhausted(why.clone())),
            (None, _) => self.last_mark(),
        };
        if pos < target {
            let r = self.run_to(target.min(pos + SLICE))?;
            if let Some(e) = self.maker.feed.borrow().error.clone() {
                return Err(self.diverged(e));
            }
            let now = self.machine.hart.position().0;
            match r {
                RunTo::Reached => return Ok(Step::Progress),
                RunTo::Idle if self.pending.is_empty() => {
                    if let Some(why) = &self.closed {
                        // As far as the log goes: time from here on is live.
                        return Ok(Step::Exhausted(why.clone()));
                    }
                    // Waiting for the log as the guest waits for time.
                    self.pull(wait)?;
                    return Ok(Step::NeedMore);
                }
                RunTo::Idle => {
                    return Err(
                        self.diverged(format!("the guest idles at {now} but the log's next event is at {target}"))
                    )
                }
                RunTo::Stopped(stop) => match self.pending.front() {
                    Some(Record { event: Event::End(reason), position })
                        if *reason == end_reason(stop) && *position == now => {}
                    _ => return Err(self.diverged(format!("the guest stopped ({stop:?}) where the log continues"))),
                },
            }
        }
        let pos = self.machine.hart.position().0;
        match self.pending.front() {
            // The machine is past a record's position: the log and the
            // machine disagree about where that input happened.
            Some(r) if r.position < pos => {
                let what = format!("the log has a record at position {}, behind the machine", r.position);
                Err(self.diverged(what))
            }
            Some(r) if r.position == pos => {
                let rec = self.pending.pop_front().expect("a front record");
                self.apply(rec)
            }
            _ => {
                // Everything held is executed: wait for more.
                self.pull(wait)?;
                Ok(Step::NeedMore)
            }
        }
    }

    /// A record at the machine's position takes effect.
    fn apply(&mut self, rec: Record) -> Result<Step, ReplayError> {
        let m = &mut self.machine;
        match rec.event {
            Event::Console(b) => {
                m.inject(HostInput::Console(b));
            }
            Event::Frame { nic, data } => {
                m.inject(HostInput::Frame { nic: nic as usize, data });
            }
            Event::Skip(n) => {
                m.skip(n);
                // Hashed on arrival at a hash point, as a live run does.
                let pos = m.hart.position().0;
                if m.hash_every.is_some_and(|every| pos.is_multiple_of(every)) {
                    let h = m.state_hash();
                    self.io.state_hash(pos, h);
                }
            }
            Event::Hash(logged) => {
                let mine = m.state_hash();
                if mine != logged {
                    let what = format!("state hash {mine:016x}, the log's {logged:016x}");
                    return Err(ReplayError::Diverged { from: self.last_good, to: rec.position, what });
                }
                self.last_good = rec.position;
            }
            // The boot record this machine was built from.
            Event::Seed(_) if rec.position == 0 && m.hart.position().0 == 0 => {}
            Event::Seed(_) => return Err(ReplayError::Log("a boot record in the middle of a run".into())),
            Event::Entropy(_) | Event::Snapshot(_) => {}
            Event::End(EndReason::Reboot) => return self.reboot(),
            Event::End(reason) => return Ok(Step::Ended(reason)),
        }
        Ok(Step::Progress)
    }

    /// The guest rebooted: the next boot record follows the end, in the
    /// same batch or a later one.
    fn reboot(&mut self) -> Result<Step, ReplayError> {
        let t = Instant::now();
        while self.pending.is_empty() && self.closed.is_none() && t.elapsed() < SEED_WAIT {
            self.pull(Duration::from_millis(20))?;
        }
        let seed = match (self.pending.pop_front(), &self.closed) {
            (Some(Record { event: Event::Seed(seed), .. }), _) => seed,
            (None, Some(why)) => return Ok(Step::RebootUnseeded(why.clone())),
            _ => return Err(ReplayError::Log("a reboot without a boot record after it".into())),
        };
        self.base += self.machine.hart.position().0 + 1;
        // The old machine lets go of the disk (its lock) first: a bare
        // 1 MiB board, holding no file, stands in while the next is built.
        drop(std::mem::replace(&mut self.machine, Machine::new(1 << 20)));
        self.machine = self.maker.machine(seed)?;
        self.last_good = 0;
        Ok(Step::Progress)
    }

    /// `Machine::run_to`, stopping at each multiple of `hash_every` to
    /// report the state hash as a live run does.
    fn run_to(&mut self, target: u64) -> anyhow::Result<RunTo> {
        let (m, io, base) = (&mut self.machine, &mut self.io, self.base);
        loop {
            let before = m.hart.position().0;
            let bound = match m.hash_every {
                Some(n) => target.min((before / n + 1) * n),
                None => target,
            };
            let r = m.run_to(io, bound)?;
            let pos = m.hart.position().0;
            if let Some(u) = &mut io.unreleased {
                u.settle(base + pos);
            }
            if let Some(n) = m.hash_every {
                // Hashed on arrival only (a position reached earlier was hashed).
                if r == RunTo::Reached && pos.is_multiple_of(n) && pos > before {
                    let h = m.state_hash();
                    io.state_hash(pos, h);
                }
            }
            if r != RunTo::Reached || pos >= target {
                return Ok(r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame is dropped once the primary reports a release point at or
    /// after the end of the run that produced it, and kept otherwise.
    #[test]
    fn unreleased_frames_are_kept_until_the_primary_releases_past_them() {
        let mut u = Unreleased::default();
        u.fresh.push((0, vec![1]));
        u.settle(100);
        u.fresh.push((0, vec![2]));
        u.fresh.push((0, vec![3]));
        u.settle(200);
        u.release(150);
        let kept: Vec<u8> = u.kept.iter().map(|(_, _, f)| f[0]).collect();
        assert_eq!(kept, [2, 3]);
        // A release point never moves back.
        u.release(120);
        assert_eq!(u.kept.len(), 2);
        u.release(200);
        assert!(u.kept.is_empty());
        // Frames made while the primary's report is already past them
        // (this side lags) are dropped at once.
        u.fresh.push((0, vec![4]));
        u.settle(190);
        assert!(u.kept.is_empty());
    }

    #[test]
    fn unreleased_frames_are_bounded() {
        let mut u = Unreleased::default();
        for i in 0..MAX_UNRELEASED + 10 {
            u.fresh.push((0, vec![(i % 256) as u8]));
            u.settle(1000 + i as u64);
        }
        assert_eq!(u.kept.len(), MAX_UNRELEASED);
        assert_eq!(u.kept.front().unwrap().0, 1010, "the oldest go first");
    }
}
