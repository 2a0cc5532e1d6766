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
    /// Every record before this position has been fetched (counted across
    /// guest reboots, see [`Replayer::position`]).
    Through(u64),
    /// Nothing arrived within the wait.
    Nothing,
    /// Nothing more will come, and why.
    Closed(String),
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
/// the guest's own addresses.
struct ReplayIo {
    frames_out: u64,
    print_hashes: bool,
    mac: Option<[u8; 6]>,
    addresses: Vec<IpAddr>,
}

impl HostIo for ReplayIo {
    fn console_write(&mut self, bytes: &[u8]) {
        crate::host::output::write(bytes);
    }
    fn wait(&mut self, _: Duration) -> HostInput {
        HostInput::Nothing
    }
    fn send_frame(&mut self, _: usize, frame: &[u8]) {
        self.frames_out += 1;
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
}

/// Builds machines whose entropy comes from the log.
pub struct MachineMaker {
    vm: LinuxVm,
    feed: Rc<RefCell<Feed>>,
    hash_every: Option<u64>,
}

impl MachineMaker {
    pub fn new(vm: &LinuxVm, hash_every: Option<u64>) -> MachineMaker {
        MachineMaker { vm: vm.clone(), feed: Rc::default(), hash_every }
    }

    /// The VM, booted from `seed`, drawing entropy from the log.
    pub fn machine(&self, seed: [u8; 32]) -> anyhow::Result<Machine> {
        let mut m = self.vm.machine(seed, Box::new(LoggedEntropy(self.feed.clone())))?;
        m.hash_every = self.hash_every;
        // A replica's disk error is this host's fault, not the guest's.
        m.stop_on_host_errors(true);
        Ok(m)
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
        let io = ReplayIo { frames_out: 0, print_hashes: opts.print_hashes, mac: opts.mac, addresses: Vec::new() };
        let (pending, through, base, last_good, closed) = (VecDeque::new(), 0, 0, 0, None);
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

    /// Where the replay is, counted across guest reboots (as marks are).
    pub fn position(&self) -> u64 {
        self.base + self.machine.hart.position().0
    }

    /// The last mark received, in this boot's positions: every record
    /// before it has been fetched.
    pub fn last_mark(&self) -> u64 {
        self.through.saturating_sub(self.base)
    }

    /// Frames the guest sent (not delivered).
    pub fn frames_out(&self) -> u64 {
        self.io.frames_out
    }

    /// The machine, to run live from here: its entropy now comes from the
    /// host. Also the guest addresses seen in its frames.
    pub fn go_live(self) -> anyhow::Result<(Machine, Vec<IpAddr>)> {
        self.maker.feed.borrow_mut().host = Some(HostEntropy::open()?);
        Ok((self.machine, self.io.addresses))
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
                Fetched::Through(p) => self.through = self.through.max(p),
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
        let (m, io) = (&mut self.machine, &mut self.io);
        loop {
            let before = m.hart.position().0;
            let bound = match m.hash_every {
                Some(n) => target.min((before / n + 1) * n),
                None => target,
            };
            let r = m.run_to(io, bound)?;
            let pos = m.hart.position().0;
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
