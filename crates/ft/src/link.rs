//! The two ends of the log channel, with heartbeats, failure detection and
//! the primary's arbitration. The run loops (with the CLI) call in here:
//! the primary hands over records, progress marks and output; the secondary
//! takes records and marks out and reports what it has executed.
//!
//! What happens to the pair is a `tracing` event at the point it happens
//! (info: paired; warn: a peer lost, a connection refused, an unreachable
//! arbiter, running unprotected; error: lost arbitration); the same text
//! becomes [`Status::note`].

use crate::arbiter::{Arbiter, Claim, Holder};
use crate::auth::{self, Key, Seal};
use crate::datagram::{AckSender, AckSocket, Acked};
use crate::gate::OutputGate;
use crate::greet::{greet, refuse_latecomers, Deadline, Greeting, SealedStream};
use crate::liveness::{Awake, DiskWatch, Lease, PeerDisk, Pulse};
use crate::wire::{self, Hello, Message, WireError};
use crate::{ErrorChain, PairConfig, State, Status};
use replay::Record;
use std::collections::VecDeque;
use std::io::{BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Why a pair could not be formed. `RefusedByPeer` and `Refused` carry
/// refusal texts, which travel between the sides in `Message::Refuse`.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    #[error("cannot reach the secondary at {addr} within {secs} s")]
    Unreachable { addr: String, secs: u64, source: std::io::Error },
    #[error("the peer at {addr}")]
    Wire { addr: String, source: WireError },
    #[error("the peer at {addr} sent {got:?} at epoch {got_epoch} where a welcome at epoch {epoch} belongs")]
    NoWelcome { addr: String, epoch: u64, got_epoch: u64, got: Box<Message> },
    #[error("the secondary refused to pair: {0}")]
    RefusedByPeer(String),
    #[error("refused to pair with the primary at {addr}: {why}")]
    Refused { addr: String, why: String },
    #[error("cannot listen on {addr}")]
    Listen { addr: String, source: std::io::Error },
    #[error("cannot accept a connection")]
    Accept(#[source] std::io::Error),
    #[error(transparent)]
    Arbiter(#[from] crate::arbiter::ArbiterError),
    #[error("the arbiter's epoch moved while this primary started (now {0} held by '{1}')")]
    EpochMoved(u64, String),
    #[error("stopped before the pair formed")]
    Stopped,
    #[error("the secondary at {addr} does not hold this pair's key (--key)")]
    WrongKey { addr: String },
}

/// A `tracing` event at `$level` whose text also becomes the status note
/// (what `lockstep status` shows as the last thing that happened).
macro_rules! note {
    ($shared:expr, $level:ident, $($arg:tt)+) => {{
        let line = format!($($arg)+);
        tracing::$level!("{line}");
        $shared.note(line);
    }};
}

/// State both threads and the run loop see.
pub struct Shared {
    status: Mutex<Status>,
    cond: Condvar,
    /// For the log rate: (when, bytes) at the last status read.
    rate: Mutex<(Instant, u64)>,
}

impl Shared {
    fn new(role: &str, epoch: u64) -> Arc<Shared> {
        let status = Status { role: role.into(), state: Some(State::Protected), epoch, ..Status::default() };
        Arc::new(Shared { status: Mutex::new(status), cond: Condvar::new(), rate: Mutex::new((Instant::now(), 0)) })
    }

    /// The last thing that happened (see the `note!` macro, which also
    /// emits it as an event).
    fn note(&self, line: String) {
        self.status.lock().unwrap().note = line;
    }

    pub fn state(&self) -> State {
        self.status.lock().unwrap().state.unwrap_or(State::Pairing)
    }

    /// Primary: how far a joining secondary's transfer has come (`None`:
    /// none under way).
    pub fn set_sync(&self, progress: Option<crate::SyncProgress>) {
        self.update(|s| s.sync = progress);
    }

    /// Primary: whether the secondary's network is up, as it last said.
    pub fn peer_uplink_up(&self) -> Option<bool> {
        self.status.lock().unwrap().peer_uplink_up
    }

    /// The epoch this side runs at.
    pub fn epoch(&self) -> u64 {
        self.status.lock().unwrap().epoch
    }

    fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().unwrap());
        self.cond.notify_all();
    }

    /// A copy of the figures, with the log rate over the time since the
    /// previous call.
    pub fn status(&self) -> Status {
        let mut s = self.status.lock().unwrap().clone();
        s.protected = s.state == Some(State::Protected);
        let mut rate = self.rate.lock().unwrap();
        let dt = rate.0.elapsed().as_secs_f64();
        if dt >= 0.5 {
            let bytes = s.log_bytes.saturating_sub(rate.1);
            self.status.lock().unwrap().log_bytes_per_sec = bytes as f64 / dt;
            s.log_bytes_per_sec = bytes as f64 / dt;
            *rate = (Instant::now(), s.log_bytes);
        }
        s
    }
}

fn owner_name(role: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{role}@{}:{}", host.trim(), std::process::id())
}

/// The log channel's write side, shared by the run loop (which writes the
/// log itself: no thread hand-off between an output and the mark that
/// releases it) and the heartbeat thread (which only writes when the run
/// loop has been quiet, and never waits for it).
struct LogWriter {
    stream: TcpStream,
    /// The last mark written (what a heartbeat repeats).
    through: u64,
    /// When anything was last written.
    written: Instant,
    /// Tags the messages with `--key` (in the order they are written).
    seal: Option<Seal>,
}

impl LogWriter {
    /// Write `messages` (the last of them the mark `through`); returns the
    /// bytes written.
    fn write(&mut self, messages: &[Message], epoch: u64, through: u64) -> std::io::Result<usize> {
        let mut bytes = Vec::new();
        for m in messages {
            bytes.extend(wire::encode_sealed(m, epoch, self.seal.as_mut()));
        }
        self.stream.write_all(&bytes)?;
        self.through = through;
        self.written = Instant::now();
        Ok(bytes.len())
    }
}

/// Where frames a secondary forwards go ([`PrimaryLink::on_forward`]).
pub type ForwardFn = Box<dyn Fn(Vec<u8>) + Send>;

/// Where a copy of each record goes ([`PrimaryLink::keep_log`]).
pub type KeepFn = Box<dyn FnMut(&Record) + Send>;

/// The primary's end.
pub struct PrimaryLink {
    pub shared: Arc<Shared>,
    pub gate: Arc<OutputGate>,
    lost: Lost,
    cfg: PairConfig,
    epoch: u64,
    /// The run loop's pulse, which the heartbeat thread checks.
    pulse: Arc<Pulse>,
    /// Records not yet written, and their approximate size.
    pending: Vec<Record>,
    pending_bytes: usize,
    /// Some of them are inputs from outside (frames, console bytes).
    pending_input: bool,
    last_through: u64,
    /// ... and whether it asked for an acknowledgement at once.
    last_urgent: bool,
    /// A copy of every record, for a log kept beside the pair's.
    keep: Option<KeepFn>,
    /// The position on the channel: marks, acks and the gate count across
    /// guest reboots (the log's positions restart at 0 after each), so
    /// this is `base` plus the run loop's position.
    position: u64,
    base: u64,
    /// The channel (`None`: a primary that runs alone from the start of
    /// this link, a secondary gone live).
    stream: Option<TcpStream>,
    writer: Option<Arc<Mutex<LogWriter>>>,
    peer: String,
    /// The receiver's hand-back of its end after a handover.
    switched: Receiver<HandBack>,
}

/// The reading end of a channel, with its seal (what a side's receiver
/// hands back when the roles swap), and the new epoch.
type HandBack = (BufReader<Deadline>, Option<Seal>, u64);

/// A connection between the sides after its greeting, in either role:
/// both directions, and with `--key` the seal of each (a side keeps its
/// seals when the roles swap: each direction goes on with its sequence).
pub struct Channel {
    stream: TcpStream,
    w: TcpStream,
    r: BufReader<Deadline>,
    seal_out: Option<Seal>,
    seal_in: Option<Seal>,
    peer: String,
}

impl Switched {
    /// Do not go on with the swapped roles: this side (the old primary)
    /// stops, telling the new primary why (it then runs alone).
    pub fn release(mut self, why: &str) {
        let msg = Message::Refuse(why.to_string());
        let _ = wire::send(&mut self.channel.w, self.epoch, &msg, self.channel.seal_out.as_mut());
    }
}

/// A planned switchover done: the channel, to go on with the roles swapped
/// at `epoch`, from the channel position `at` (`base`: the positions of
/// the guest's earlier boots).
pub struct Switched {
    channel: Channel,
    pub epoch: u64,
    pub at: u64,
    pub base: u64,
}

/// Records are written at least this often while the guest runs (the
/// secondary cannot run past the last mark).
const MARK_EVERY: Duration = Duration::from_millis(2);
/// ... or when this many bytes of records are waiting (small enough that a
/// mark follows soon on a slow link).
const FLUSH_BYTES: usize = 16 << 10;

fn record_size(r: &Record) -> usize {
    16 + match &r.event {
        replay::Event::Frame { data, .. } => data.len(),
        replay::Event::Console(b) | replay::Event::Entropy(b) => b.len(),
        _ => 8,
    }
}

impl PrimaryLink {
    /// Claim the next epoch, connect to the secondary at `peer` and pair.
    pub fn connect(
        peer: &str,
        hello: Hello,
        arbiter: Arc<dyn Arbiter>,
        gate: Arc<OutputGate>,
        cfg: PairConfig,
        key: Option<&Key>,
        stop: &dyn Fn() -> bool,
    ) -> Result<PrimaryLink, PairError> {
        let owner = owner_name("primary");
        let current = arbiter.read()?.map_or(0, |h| h.epoch);
        let epoch = match arbiter.claim(current, &owner, false)? {
            Claim::Won(e) => e,
            Claim::Lost(h) => return Err(PairError::EpochMoved(h.epoch, h.owner)),
        };
        let started = Instant::now();
        let stream = loop {
            let err = match peer.to_socket_addrs().map(|mut a| a.next()) {
                Ok(Some(addr)) => match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                    Ok(s) => break s,
                    Err(e) => e,
                },
                Ok(None) => std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
                Err(e) => e,
            };
            if stop() {
                return Err(PairError::Stopped);
            }
            if started.elapsed() >= cfg.connect_timeout {
                return Err(PairError::Unreachable {
                    addr: peer.into(),
                    secs: cfg.connect_timeout.as_secs(),
                    source: err,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let ch = handshake(stream, peer, epoch, hello, key)?;
        let link = PrimaryLink::start(ch, epoch, arbiter, gate, cfg, 0, 0);
        note!(link.shared, info, "paired with the secondary at {peer}, epoch {epoch}: the VM is protected");
        Ok(link)
    }

    /// This side's end of `ch` as the primary at `epoch`, the channel's
    /// positions counting from `base` (the boots before this one) and
    /// every record before `through` already in the secondary's hands.
    fn start(
        ch: Channel,
        epoch: u64,
        arbiter: Arc<dyn Arbiter>,
        gate: Arc<OutputGate>,
        cfg: PairConfig,
        base: u64,
        through: u64,
    ) -> PrimaryLink {
        let Channel { stream, w, r, seal_out, seal_in, peer } = ch;
        let shared = Shared::new("primary", epoch);
        // A resumed pair starts in step: no lag to throttle for.
        shared.update(|s| (s.position, s.peer_position) = (through, through));
        let pulse = Arc::new(Pulse::new(&cfg));
        watch_arbiter(arbiter.clone(), shared.clone());
        let heard = Arc::new(Lease::new(cfg.timeout));
        let ctx = Lost {
            shared: shared.clone(),
            arbiter,
            gate: gate.clone(),
            stream: stream.try_clone().ok().map(Arc::new),
            lost: Arc::default(),
            handing: Arc::default(),
            forward: Arc::default(),
            owner: owner_name("primary"),
            pulse: pulse.clone(),
            peer_disk: Arc::default(),
        };
        let writer = Arc::new(Mutex::new(LogWriter { stream: w, through, written: Instant::now(), seal: seal_out }));
        // The secondary's heartbeats come by datagram as well: a deep queue
        // on the link toward it holds up its acknowledgements on the channel.
        match AckSocket::bind(&stream, epoch, seal_in.as_ref()) {
            Ok((socket, port, secret)) => {
                let _ = writer.lock().unwrap().write(&[Message::AckTo { port, secret }], epoch, through);
                let (ctx, heard) = (ctx.clone(), heard.clone());
                crate::urgent::spawn("ft-acks-udp", move || datagram_loop(socket, ctx, heard));
            }
            Err(e) => tracing::warn!("acknowledgements come on the log channel only (no datagram socket: {e})"),
        }
        {
            let (ctx, heard, writer, cfg) = (ctx.clone(), heard.clone(), writer.clone(), cfg.clone());
            crate::spawn_named("ft-heartbeat", move || heartbeat_loop(writer, ctx, heard, cfg, epoch));
        }
        let (handback, switched) = mpsc::channel();
        {
            let ctx = ctx.clone();
            crate::urgent::spawn("ft-acks", move || ack_loop(r, seal_in, ctx, heard, epoch, handback));
        }
        PrimaryLink {
            shared,
            gate,
            writer: Some(writer),
            pulse,
            lost: ctx,
            cfg,
            epoch,
            pending: Vec::new(),
            pending_bytes: 0,
            pending_input: false,
            last_through: through,
            last_urgent: false,
            keep: None,
            position: through,
            base,
            stream: Some(stream),
            peer,
            switched,
        }
    }

    /// A primary without a secondary (a secondary gone live): the VM runs
    /// alone at `epoch`, which this side won, its output not held; it can
    /// be joined ([`Joining::joined`] then replaces this link).
    pub fn alone(
        epoch: u64,
        arbiter: Arc<dyn Arbiter>,
        gate: Arc<OutputGate>,
        cfg: PairConfig,
        base: u64,
    ) -> PrimaryLink {
        let shared = Shared::new("primary", epoch);
        shared.update(|s| s.state = Some(State::Alone));
        gate.open();
        watch_arbiter(arbiter.clone(), shared.clone());
        let pulse = Arc::new(Pulse::new(&cfg));
        let lost = Lost {
            shared: shared.clone(),
            arbiter,
            gate: gate.clone(),
            stream: None,
            lost: Arc::new(AtomicBool::new(true)),
            handing: Arc::default(),
            forward: Arc::default(),
            owner: owner_name("primary"),
            pulse: pulse.clone(),
            peer_disk: Arc::default(),
        };
        PrimaryLink {
            shared,
            gate,
            writer: None,
            pulse,
            lost,
            cfg,
            epoch,
            pending: Vec::new(),
            pending_bytes: 0,
            pending_input: false,
            last_through: 0,
            last_urgent: false,
            keep: None,
            position: 0,
            base,
            stream: None,
            peer: String::new(),
            switched: mpsc::channel().1,
        }
    }

    /// The new primary after a planned switchover ([`SecondaryLink::take_over`]).
    pub fn resume(s: Switched, arbiter: Arc<dyn Arbiter>, gate: Arc<OutputGate>, cfg: PairConfig) -> PrimaryLink {
        let (epoch, at) = (s.epoch, s.at);
        let link = PrimaryLink::start(s.channel, epoch, arbiter, gate, cfg, s.base, at);
        note!(link.shared, info, "switched over at position {at}: now the primary, epoch {epoch}: the VM is protected");
        link
    }

    /// A planned switchover: the guest stopped at `at` (this boot's
    /// position). Everything before it goes to the secondary, which must
    /// acknowledge it all (so all output is released), then the handover;
    /// once the secondary has replayed to `at` and won the next epoch, this
    /// side's end of the channel comes back for [`SecondaryLink::resume`].
    /// On an error the pair's usual rules apply (a lost secondary is
    /// arbitrated for), and this side goes on as the primary.
    ///
    /// `sent` runs once the handover is on the wire (a test's failpoint).
    pub fn handover(&mut self, at: u64, timeout: Duration, sent: impl FnOnce()) -> Result<Switched, String> {
        let at = self.base + at;
        self.position = at;
        self.flush(at, true);
        let t = Instant::now();
        while self.protected() && self.gate.acked() < at {
            if t.elapsed() >= timeout {
                return Err(format!(
                    "the secondary did not acknowledge the log to {at} within {} s",
                    timeout.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let (Some(writer), Some(stream), true) = (self.writer.clone(), &self.stream, self.protected()) else {
            return Err(format!("the pair broke: {}", self.shared.status().note));
        };
        {
            let mut w = writer.lock().unwrap();
            // No heartbeat after the handover: the next message on this
            // direction is the new secondary's first acknowledgement.
            self.lost.handing.store(true, Ordering::SeqCst);
            if let Err(e) = w.write(&[Message::Handover { at }], self.epoch, at) {
                drop(w);
                self.lost.peer_lost(format!("the log channel failed: {e}"));
                return Err(format!("cannot send the handover: {e}"));
            }
        }
        sent();
        let wait = timeout.saturating_sub(t.elapsed()).max(Duration::from_secs(1));
        let asked = Instant::now();
        // The answer, unless the secondary is lost first (the channel
        // closed: the loss is being arbitrated, and waiting out the
        // timeout would only hold the guest).
        let answer = loop {
            match self.switched.recv_timeout(Duration::from_millis(5)) {
                Ok(answer) => break Ok(answer),
                Err(RecvTimeoutError::Timeout) if !self.lost.lost.load(Ordering::SeqCst) && asked.elapsed() < wait => {}
                Err(_) => break Err(()),
            }
        };
        match answer {
            Ok((r, seal_in, epoch)) => {
                // This side's primary role is over: nothing of it may act.
                self.lost.lost.store(true, Ordering::SeqCst);
                self.shared.update(|s| s.state = Some(State::Stopped));
                let mut w = writer.lock().unwrap();
                let stream = stream.try_clone().map_err(|e| format!("cannot keep the channel: {e}"))?;
                let w = LogWriter {
                    stream: w.stream.try_clone().map_err(|e| format!("cannot keep the channel: {e}"))?,
                    through: w.through,
                    written: w.written,
                    seal: w.seal.take(),
                };
                let channel = Channel { stream, w: w.stream, r, seal_out: w.seal, seal_in, peer: self.peer.clone() };
                Ok(Switched { channel, epoch, at, base: self.base })
            }
            Err(()) if self.lost.lost.load(Ordering::SeqCst) => {
                Err(format!("the secondary was lost during the handover: {}", self.shared.status().note))
            }
            Err(()) => {
                let why = format!("the secondary did not take over within {} s of the handover", wait.as_secs());
                self.lost.peer_lost(why.clone());
                Err(why)
            }
        }
    }

    fn protected(&self) -> bool {
        self.shared.state() == State::Protected
    }

    /// The positions of the guest's boots before this one (the channel
    /// counts across reboots).
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Send `msg` as this side's last word on the channel (no heartbeat
    /// after it); false if the pair is not protected.
    fn last_word(&mut self, msg: Message) -> bool {
        if !self.protected() {
            return false;
        }
        if let Some(writer) = &self.writer {
            let mut w = writer.lock().unwrap();
            self.lost.handing.store(true, Ordering::SeqCst);
            let through = w.through;
            let _ = w.write(&[msg], self.epoch, through);
        }
        true
    }

    /// Let the secondary go (it stops without going live, see
    /// [`Message::Release`]) and run alone: the next epoch is claimed as
    /// after a loss, so the released replica counts as stale. `sent` runs
    /// between the release and the claim (a test's failpoint: a primary
    /// that dies there leaves its secondary to go live).
    pub fn release(&mut self, why: &str, sent: impl FnOnce()) {
        if self.last_word(Message::Release) {
            sent();
            self.lost.peer_lost(format!("released it: {why}"));
        }
    }

    /// This side stops (a host fault: its disk replica failed): tell the
    /// secondary why, so that its takeover says so. It goes on from the
    /// last mark, as after any loss of the primary.
    pub fn resign(&mut self, why: &str) {
        if !self.protected() {
            return;
        }
        // Lost first: the secondary closes the channel once it reads the
        // refusal, and the ack loop must not take that for a loss to
        // arbitrate (it did, won the next epoch, and locked the secondary
        // out: no VM).
        if self.lost.lost.swap(true, Ordering::SeqCst) {
            return;
        }
        self.last_word(Message::Refuse(why.to_string()));
        self.lost.resigned(why);
    }

    /// Frames the secondary forwards (see [`Message::Forward`]) go to `f`.
    pub fn on_forward(&self, f: ForwardFn) {
        *self.lost.forward.lock().unwrap() = Some(f);
    }

    /// This link is replaced (a secondary joined the side running alone):
    /// nothing of it acts any more.
    pub fn retire(&self) {
        self.lost.lost.store(true, Ordering::SeqCst);
        self.shared.update(|s| s.state = Some(State::Stopped));
    }

    /// Hand every record from now on to `keep` as well (paired or alone).
    pub fn keep_log(&mut self, keep: KeepFn) {
        self.keep = Some(keep);
    }

    /// A record of the log, in order.
    pub fn record(&mut self, record: Record) {
        if let Some(keep) = &mut self.keep {
            keep(&record);
        }
        if self.protected() {
            self.pending_bytes += record_size(&record);
            self.pending_input |= matches!(record.event, replay::Event::Frame { .. } | replay::Event::Console(_));
            self.pending.push(record);
            if self.pending_bytes >= FLUSH_BYTES {
                self.flush(self.last_through, false);
            }
        }
    }

    /// Write the pending records and the mark `through`, asking for its
    /// acknowledgement at once when output waits for it or `urgent`.
    fn flush(&mut self, through: u64, urgent: bool) {
        if !self.protected() {
            self.pending.clear();
            self.pending_bytes = 0;
            return;
        }
        let mut messages = Vec::with_capacity(2);
        self.pending_input = false;
        if !self.pending.is_empty() {
            messages.push(Message::Records(std::mem::take(&mut self.pending)));
            self.pending_bytes = 0;
        }
        let urgent = urgent || self.gate.held() > 0;
        messages.push(Message::Through { through, released: self.gate.acked(), urgent });
        self.last_through = through;
        self.last_urgent = urgent;
        let Some(writer) = &self.writer else { return };
        let result = writer.lock().unwrap().write(&messages, self.epoch, through);
        match result {
            Ok(n) => self.shared.status.lock().unwrap().log_bytes += n as u64,
            Err(e) => self.lost.peer_lost(format!("the log channel failed: {e}")),
        }
    }

    /// The run loop reached `position`: every record before it is handed
    /// over. It goes out at once if it carries inputs (so that a secondary
    /// taking over has the requests the guest was working on, and answers
    /// them itself), else at least every `MARK_EVERY`. Inputs arrive in
    /// batches between slices, so this is one write per batch, not per
    /// frame. Output does not need it: `output` sends the mark a frame
    /// waits for (once more slices ended while output waited, each with a
    /// mark the secondary acknowledged at once: more writes and
    /// acknowledgements on both sides for nothing the gate needed).
    pub fn progress(&mut self, position: u64) {
        self.pulse.beat();
        let position = self.base + position;
        self.position = position;
        self.shared.status.lock().unwrap().position = position;
        if position <= self.last_through || !self.protected() {
            return;
        }
        let quiet = self.writer.as_ref().map_or(Duration::ZERO, |w| w.lock().unwrap().written.elapsed());
        if self.pending_input || quiet >= MARK_EVERY {
            self.flush(position, false);
        }
    }

    /// A frame produced before the last progress position: into the gate,
    /// and the mark that releases it onto the wire now (again, if the mark
    /// already sent did not ask for an acknowledgement at once).
    pub fn output(&mut self, nic: usize, frame: &[u8]) {
        self.gate.push(self.position, nic, frame);
        if self.gate.held() > 0 && (self.position > self.last_through || !self.last_urgent) {
            self.flush(self.position.max(self.last_through), true);
        }
    }

    /// How long the secondary's execution may stand still while it holds
    /// log: longer while it says its run loop is inside a disk operation.
    fn peer_stall_timeout(&self) -> Duration {
        if self.lost.peer_disk.busy() {
            self.cfg.disk_stall_timeout()
        } else {
            self.cfg.stall_timeout()
        }
    }

    /// Flow control: wait while the secondary's execution lags by more
    /// than `max_lag` (until it catches up to half of that, or the pair
    /// breaks).
    pub fn throttle(&mut self) {
        {
            let s = self.shared.status.lock().unwrap();
            if s.state != Some(State::Protected) || self.position.saturating_sub(s.peer_position) <= self.cfg.max_lag {
                return;
            }
        }
        // The secondary can only catch up to what it has: send it all first.
        if self.position > self.last_through || !self.pending.is_empty() {
            self.flush(self.position.max(self.last_through), true);
        }
        let mut s = self.shared.status.lock().unwrap();
        let lag = |s: &Status| self.position.saturating_sub(s.peer_position);
        if s.state != Some(State::Protected) || lag(&s) <= self.cfg.max_lag {
            return;
        }
        let t = Instant::now();
        // Waiting for the secondary is not a stuck run loop.
        self.pulse.waiting(true);
        // Progress, not mere presence: a secondary whose acknowledgements
        // arrive but whose execution stands still for a timeout is lost.
        let (mut seen, mut moved) = (s.peer_position, Instant::now());
        let mut awake = Awake::new(self.cfg.heartbeat, self.cfg.timeout);
        let mut was_in_disk = self.lost.peer_disk.busy();
        while s.state == Some(State::Protected) && lag(&s) > self.cfg.max_lag / 2 {
            s = self.shared.cond.wait_timeout(s, self.cfg.heartbeat).unwrap().0;
            awake.round();
            // Stuck means: it holds log it does not execute. A secondary
            // that has executed all it received waits for the link, which
            // is slow, not dead (the heartbeats say so).
            let holds_more = self.gate.acked() > s.peer_position;
            // The end of a disk operation the secondary reported is a sign
            // of life, as its execution moving is (the next may follow).
            let disk_ended = self.lost.peer_disk.ended(&mut was_in_disk);
            if s.peer_position != seen || !holds_more || disk_ended {
                (seen, moved) = (s.peer_position, Instant::now());
            } else if awake.ran_since(moved) >= self.peer_stall_timeout() {
                let why = format!(
                    "its execution has stood at position {seen} for {} ms although it holds the log to {}",
                    moved.elapsed().as_millis(),
                    self.gate.acked()
                );
                drop(s);
                self.lost.peer_lost(why);
                s = self.shared.status.lock().unwrap();
                break;
            }
        }
        s.throttled_ms += t.elapsed().as_millis() as u64;
        drop(s);
        self.pulse.waiting(false);
    }

    pub fn state(&self) -> State {
        self.shared.state()
    }

    /// The run loop waits for input (up to a timeout it chose): it is not
    /// stuck while it waits (`true` before the wait, `false` after).
    pub fn waiting(&self, waiting: bool) {
        self.pulse.waiting(waiting);
    }

    /// The guest rebooted at `end` (its end record is queued; the next
    /// boot's positions start at 0): send everything, and count on from
    /// there on the channel.
    pub fn rebooted(&mut self, end: u64) {
        let next = self.base + end + 1;
        self.position = next;
        self.flush(next, false);
        self.base = next;
    }

    /// The run ended at `end` (its end record is queued): wait until the
    /// secondary holds it, or `timeout`, or the pair breaks.
    pub fn finish(&mut self, end: u64, timeout: Duration) {
        let end = self.base + end;
        self.position = end + 1;
        self.flush(end + 1, true);
        let t = Instant::now();
        while self.protected() && self.gate.acked() <= end && t.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The primary's half of opening a connection: the preamble, the key
/// exchange (with `key`), the hello at `epoch` and the secondary's welcome.
fn handshake(stream: TcpStream, peer: &str, epoch: u64, hello: Hello, key: Option<&Key>) -> Result<Channel, PairError> {
    let wire_err = |source: WireError| PairError::Wire { addr: peer.into(), source };
    let _ = stream.set_nodelay(true);
    // The secondary builds the machine and hashes its disk before it
    // answers: give it time.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let mut w = stream.try_clone().map_err(|e| wire_err(e.into()))?;
    let reader = stream.try_clone().map_err(|e| wire_err(e.into()))?;
    let mut r = BufReader::new(Deadline { stream: reader, at: None, heard: None });
    wire::write_preamble(&mut w).map_err(|e| wire_err(e.into()))?;
    wire::read_preamble(&mut r).map_err(wire_err)?;
    let (mut seal_out, mut seal_in) = (None, None);
    if let Some(key) = key {
        let np = auth::random32().map_err(|e| wire_err(e.into()))?;
        wire::write_message(&mut w, epoch, &Message::AuthInit { nonce: np }).map_err(|e| wire_err(e.into()))?;
        match wire::read_message(&mut r).map_err(wire_err)? {
            (_, Message::AuthChallenge { nonce: ns, proof }) => {
                if !auth::same(&proof, &key.secondary_proof(&np, &ns)) {
                    return Err(PairError::WrongKey { addr: peer.into() });
                }
                let proof = key.primary_proof(&np, &ns);
                wire::write_message(&mut w, epoch, &Message::AuthProof { proof }).map_err(|e| wire_err(e.into()))?;
                let (out, into) = key.seals(&np, &ns);
                (seal_out, seal_in) = (Some(out), Some(into));
            }
            (_, Message::Refuse(why)) => return Err(PairError::RefusedByPeer(why)),
            (got_epoch, got) => {
                return Err(PairError::NoWelcome { addr: peer.into(), epoch, got_epoch, got: Box::new(got) })
            }
        }
    }
    wire::send(&mut w, epoch, &Message::Hello(hello), seal_out.as_mut()).map_err(|e| wire_err(e.into()))?;
    match wire::receive(&mut r, seal_in.as_mut()).map_err(wire_err)? {
        (e, Message::Welcome) if e == epoch => {}
        (_, Message::Refuse(why)) => return Err(PairError::RefusedByPeer(why)),
        (got_epoch, got) => {
            return Err(PairError::NoWelcome { addr: peer.into(), epoch, got_epoch, got: Box::new(got) })
        }
    }
    let _ = stream.set_read_timeout(None);
    Ok(Channel { stream, w, r, seal_out, seal_in, peer: peer.to_string() })
}

/// A connection to a secondary that is joining a running primary: the
/// primary's state goes over it ([`Joining::send`]), the secondary says
/// it is in place ([`Joining::synced`]), and the pair starts from there.
/// Both sides hold one; no heartbeats run while it lasts.
pub struct Joining {
    ch: Channel,
    pub epoch: u64,
}

impl Joining {
    /// Primary: one attempt to reach a secondary listening at `peer`
    /// (within `wait`) and greet it with `hello` (whose `join` is set) at
    /// `epoch`, the epoch this side runs at.
    pub fn connect(
        peer: &str,
        epoch: u64,
        hello: Hello,
        key: Option<&Key>,
        wait: Duration,
    ) -> Result<Joining, PairError> {
        let unreachable = |source| PairError::Unreachable { addr: peer.into(), secs: wait.as_secs(), source };
        let addr = match peer.to_socket_addrs().map(|mut a| a.next()) {
            Ok(Some(addr)) => addr,
            Ok(None) => return Err(unreachable(std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))),
            Err(e) => return Err(unreachable(e)),
        };
        let stream = TcpStream::connect_timeout(&addr, wait).map_err(unreachable)?;
        let ch = handshake(stream, peer, epoch, hello, key)?;
        // The transfer has no deadline of its own: the secondary writes a
        // disk and RAM before it answers.
        let _ = ch.stream.set_read_timeout(None);
        Ok(Joining { ch, epoch })
    }

    pub fn peer(&self) -> &str {
        &self.ch.peer
    }

    /// How long a read may wait (`None`: for ever, the default).
    pub fn set_wait(&self, wait: Option<Duration>) {
        let _ = self.ch.stream.set_read_timeout(wait);
    }

    /// A piece of the state (or, from the secondary, of what it holds).
    pub fn send(&mut self, piece: Vec<u8>) -> std::io::Result<()> {
        wire::send(&mut self.ch.w, self.epoch, &Message::Sync(piece), self.ch.seal_out.as_mut())
    }

    /// The peer's next piece.
    pub fn receive(&mut self) -> Result<Vec<u8>, String> {
        match wire::receive(&mut self.ch.r, self.ch.seal_in.as_mut()) {
            Ok((e, Message::Sync(piece))) if e == self.epoch => Ok(piece),
            Ok((_, Message::Refuse(why))) => Err(format!("the peer gave up the transfer: {why}")),
            Ok((e, m)) => Err(format!("the peer sent {m:?} at epoch {e} during the transfer")),
            Err(e) => Err(format!("the transfer broke: {}", ErrorChain(&e))),
        }
    }

    /// Primary: wait for the secondary's state hash.
    pub fn wait_synced(&mut self) -> Result<u64, String> {
        match wire::receive(&mut self.ch.r, self.ch.seal_in.as_mut()) {
            Ok((e, Message::Synced { state_hash })) if e == self.epoch => Ok(state_hash),
            Ok((_, Message::Refuse(why))) => Err(format!("the secondary refused the transfer: {why}")),
            Ok((e, m)) => Err(format!("the secondary sent {m:?} at epoch {e} instead of its state hash")),
            Err(e) => Err(format!("the transfer broke: {}", ErrorChain(&e))),
        }
    }

    /// Secondary: a round of the state is in place, and hashes to
    /// `state_hash`.
    pub fn ack(&mut self, state_hash: u64) -> std::io::Result<()> {
        wire::send(&mut self.ch.w, self.epoch, &Message::Synced { state_hash }, self.ch.seal_out.as_mut())
    }

    /// Either side: give up, saying why.
    pub fn refuse(mut self, why: &str) {
        let _ = wire::send(&mut self.ch.w, self.epoch, &Message::Refuse(why.into()), self.ch.seal_out.as_mut());
    }

    /// Secondary: the state is in place and hashes to `state_hash`; the
    /// log follows from the channel position `through` on.
    pub fn synced(
        mut self,
        state_hash: u64,
        arbiter: Arc<dyn Arbiter>,
        cfg: PairConfig,
        through: u64,
    ) -> Result<SecondaryLink, String> {
        let msg = Message::Synced { state_hash };
        wire::send(&mut self.ch.w, self.epoch, &msg, self.ch.seal_out.as_mut()).map_err(|e| e.to_string())?;
        let (epoch, peer) = (self.epoch, self.ch.peer.clone());
        let link = SecondaryLink::start(self.ch, epoch, arbiter, cfg, through);
        note!(
            link.shared,
            info,
            "joined the primary at {peer} at position {through}, epoch {epoch}: replaying its log"
        );
        Ok(link)
    }

    /// Primary: the secondary holds the state at `through` (`base`: the
    /// positions of the guest's earlier boots): the pair runs from here.
    pub fn joined(
        self,
        arbiter: Arc<dyn Arbiter>,
        gate: Arc<OutputGate>,
        cfg: PairConfig,
        base: u64,
        through: u64,
    ) -> PrimaryLink {
        let (epoch, peer) = (self.epoch, self.ch.peer.clone());
        let link = PrimaryLink::start(self.ch, epoch, arbiter, gate, cfg, base, through);
        note!(
            link.shared,
            info,
            "the secondary at {peer} joined at position {through}, epoch {epoch}: the VM is protected"
        );
        link
    }
}

/// What a side needs to handle the loss of its peer.
#[derive(Clone)]
struct Lost {
    shared: Arc<Shared>,
    arbiter: Arc<dyn Arbiter>,
    gate: Arc<OutputGate>,
    stream: Option<Arc<TcpStream>>,
    lost: Arc<AtomicBool>,
    /// A planned switchover is under way: no more heartbeats.
    handing: Arc<AtomicBool>,
    /// Where frames the secondary forwards go (the guest's input).
    forward: Arc<Mutex<Option<ForwardFn>>>,
    owner: String,
    /// The run loop's pulse: a primary whose run loop is stuck does not
    /// claim (it could not run the VM; its secondary must win), until the
    /// run loop moves again.
    pulse: Arc<Pulse>,
    /// What the secondary's acknowledgements say of its disk (its
    /// execution may stand still that much longer inside an operation).
    peer_disk: Arc<PeerDisk>,
}

impl Lost {
    /// Whether `holder` of the epoch after `epoch` is the secondary that
    /// this side handed over to, which won that epoch as a paired primary
    /// (not alone) and then fell silent before its answer arrived. Such a
    /// primary releases output only on this side's acknowledgements, and
    /// this side never gave one (it never heard the answer), so nothing of
    /// its run left it: this side, still at the handover point, may claim
    /// past it. The two then race for the same next epoch, and exactly one
    /// wins. A secondary that went live instead claims alone, and is never
    /// passed over.
    fn superseded_by_a_silent_takeover(&self, epoch: u64, holder: &Holder) -> bool {
        self.handing.load(Ordering::SeqCst) && holder.epoch == epoch + 1 && holder.alone < holder.epoch
    }

    /// This side stops: cut the channel and keep what is not yet
    /// acknowledged from leaving; no claim, the secondary goes on.
    /// (`lost` is set already: see [`PrimaryLink::resign`].)
    fn resigned(&self, why: &str) {
        if let Some(s) = &self.stream {
            let _ = s.shutdown(Shutdown::Both);
        }
        let dropped = self.gate.discard();
        self.shared.update(|s| s.state = Some(State::Stopped));
        note!(
            self.shared,
            error,
            "resigned: {why}; the secondary goes on from the last mark ({dropped} unacknowledged frames never left)"
        );
    }

    /// The secondary is gone (once): cut the channel, then claim the next
    /// epoch; run alone if it is ours, stop if the secondary took it.
    fn peer_lost(&self, why: String) {
        if self.lost.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(s) = &self.stream {
            let _ = s.shutdown(Shutdown::Both);
        }
        let epoch = self.shared.status.lock().unwrap().epoch;
        note!(self.shared, warn, "lost the secondary: {why}; asking the arbiter ({})", self.arbiter.describe());
        self.shared.update(|s| s.state = Some(State::Arbitrating));
        let ctx = self.clone();
        std::thread::spawn(move || {
            let mut told = false;
            let mut epoch = epoch;
            loop {
                if ctx.pulse.stuck_for(|t| t.elapsed()).is_some() {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                match ctx.arbiter.claim(epoch, &ctx.owner, true) {
                    Ok(Claim::Lost(h)) if ctx.superseded_by_a_silent_takeover(epoch, &h) => {
                        note!(
                            ctx.shared,
                            warn,
                            "epoch {} was won for the switchover by '{}', which never answered: claiming the next",
                            h.epoch,
                            h.owner
                        );
                        epoch = h.epoch;
                        continue;
                    }
                    Ok(Claim::Won(e)) => {
                        ctx.gate.open();
                        ctx.shared.update(|s| {
                            s.state = Some(State::Alone);
                            s.epoch = e;
                        });
                        note!(ctx.shared, warn, "won epoch {e}: running alone, the VM is NOT PROTECTED");
                        return;
                    }
                    Ok(Claim::Lost(Holder { epoch, owner, .. })) => {
                        let dropped = ctx.gate.discard();
                        ctx.shared.update(|s| s.state = Some(State::Stopped));
                        note!(
                            ctx.shared,
                            error,
                            "lost arbitration: epoch {epoch} belongs to '{owner}'; stopping this guest \
                             ({dropped} unacknowledged frames never left)"
                        );
                        return;
                    }
                    Err(e) if !told => {
                        told = true;
                        note!(ctx.shared, warn, "{}; holding output and retrying", ErrorChain(&e));
                    }
                    Err(_) => {}
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
    }
}

/// The primary's heartbeat: repeats the last mark when the run loop has
/// written nothing for a heartbeat interval (skipping a beat rather than
/// waiting if the run loop is writing), and watches for silence from the
/// secondary.
fn heartbeat_loop(writer: Arc<Mutex<LogWriter>>, ctx: Lost, heard: Arc<Lease>, cfg: PairConfig, epoch: u64) {
    let mut missed_at = Instant::now();
    let mut told = false;
    let mut awake = Awake::new(cfg.heartbeat, cfg.timeout);
    while !ctx.lost.load(Ordering::SeqCst) {
        std::thread::sleep(cfg.heartbeat);
        if ctx.handing.load(Ordering::SeqCst) {
            return;
        }
        awake.heartbeat_round();
        let heard_at = heard.heard_at();
        let silent = heard_at.elapsed();
        if awake.ran_since(heard_at) >= cfg.timeout {
            return ctx.peer_lost(format!("no word from it for {} ms", silent.as_millis()));
        }
        if silent >= cfg.timeout {
            // The silence spans a pause of this side: the lease has lapsed
            // (waiting acks release nothing), but the secondary may still
            // be there. Ask it; its answer renews the lease.
            // Not behind a run loop blocked in a write (a secondary that
            // stopped reading): this thread must stay free to give it up.
            let Ok(mut w) = writer.try_lock() else { continue };
            let nonce = heard.probe();
            let through = w.through;
            if let Err(e) = w.write(&[Message::Probe { nonce }], epoch, through) {
                drop(w);
                return ctx.peer_lost(format!("the log channel failed: {e}"));
            }
            continue;
        }
        if silent >= cfg.heartbeat && missed_at.elapsed() >= cfg.heartbeat {
            missed_at = Instant::now();
            ctx.shared.status.lock().unwrap().missed_heartbeats += 1;
        }
        if ctx.shared.state() != State::Protected {
            return;
        }
        // A heartbeat says the run loop is alive: a stuck one (a blocked
        // write, a hung disk) gets none, so the secondary takes over.
        if let Some(stuck) = ctx.pulse.stuck_for(|t| awake.ran_since(t)) {
            if !told {
                told = true;
                note!(
                    ctx.shared,
                    error,
                    "the run loop has been stuck for {} ms: no more heartbeats",
                    stuck.as_millis()
                );
            }
            continue;
        }
        let Ok(mut w) = writer.try_lock() else { continue };
        if ctx.handing.load(Ordering::SeqCst) {
            return;
        }
        if w.written.elapsed() >= cfg.heartbeat {
            let through = w.through;
            let mark = Message::Through { through, released: ctx.gate.acked(), urgent: ctx.gate.held() > 0 };
            if let Err(e) = w.write(&[mark], epoch, through) {
                drop(w);
                return ctx.peer_lost(format!("the log channel failed: {e}"));
            }
        }
    }
}

/// An acknowledgement from the secondary (on the channel or by datagram):
/// word from it, and output it releases, unless the lease has lapsed (then
/// it only says how far the secondary has run).
fn acknowledged(ctx: &Lost, lease: &Lease, a: Acked) {
    if lease.renew().is_ok() {
        ctx.gate.acknowledge(a.received);
    }
    ctx.peer_disk.report(a.in_disk);
    ctx.shared.update(|s| {
        s.peer_position = s.peer_position.max(a.executed);
        s.lag_positions = s.position.saturating_sub(s.peer_position);
        s.lag_ms = s.lag_positions as f64 / 1e6;
    });
}

/// The primary's receiver of acknowledgements by datagram (see
/// [`crate::datagram`]), until the link is lost or handed over.
fn datagram_loop(mut socket: AckSocket, ctx: Lost, lease: Arc<Lease>) {
    let over = || ctx.lost.load(Ordering::SeqCst) || ctx.handing.load(Ordering::SeqCst);
    let mut first = true;
    while !over() {
        let Some(acked) = socket.receive(Duration::from_millis(100)) else { continue };
        if std::mem::take(&mut first) {
            tracing::debug!("the secondary's acknowledgements arrive by datagram too");
        }
        if over() {
            return;
        }
        acknowledged(&ctx, &lease, acked);
    }
}

/// The primary's receiver: acks release output while the [`Lease`] holds.
fn ack_loop(
    mut r: BufReader<Deadline>,
    mut seal: Option<Seal>,
    ctx: Lost,
    lease: Arc<Lease>,
    epoch: u64,
    handback: Sender<HandBack>,
) {
    loop {
        match wire::receive(&mut r, seal.as_mut()) {
            Ok((e, Message::Switched { epoch: new })) if e == epoch && ctx.handing.load(Ordering::SeqCst) => {
                // The rest of this direction is the new primary's.
                let _ = handback.send((r, seal, new));
                return;
            }
            Ok((e, Message::Ack { received, executed, in_disk })) if e == epoch => {
                // Once the lease has lapsed, acks release nothing: the
                // heartbeat thread probes the secondary, or gives it up.
                acknowledged(&ctx, &lease, Acked { received, executed, in_disk });
            }
            Ok((e, Message::Probed { nonce })) if e == epoch => {
                if lease.confirm(nonce) {
                    note!(ctx.shared, info, "the secondary answered after a pause of this side: still paired");
                }
            }
            Ok((e, Message::Forward(frame))) if e == epoch => {
                if let Some(f) = &*ctx.forward.lock().unwrap() {
                    f(frame);
                }
            }
            Ok((e, Message::Uplink { up })) if e == epoch => {
                ctx.shared.update(|s| s.peer_uplink_up = Some(up));
            }
            Ok((_, Message::Refuse(why))) => return ctx.peer_lost(format!("it refused to go on: {why}")),
            Ok((e, m)) => {
                return ctx.peer_lost(format!("it sent {m:?} at epoch {e} (paired at epoch {epoch}); dropped"));
            }
            Err(WireError::Closed) => return ctx.peer_lost("it closed the log channel".into()),
            Err(e) => return ctx.peer_lost(ErrorChain(&e).to_string()),
        }
    }
}

/// What the secondary's run loop gets from the channel.
#[derive(Debug)]
pub enum Incoming {
    Records(Vec<Record>),
    /// Every record before `through` has arrived; the primary's output up
    /// to `released` has left it.
    Through {
        through: u64,
        released: u64,
    },
    /// The primary is gone (why).
    Lost(String),
    /// A planned switchover: the primary stopped at `at` (a mark before
    /// this said so) and waits for [`SecondaryLink::take_over`].
    Handover {
        at: u64,
        end: HandoverEnd,
    },
    /// The primary let this secondary go: it stops, without going live.
    Released,
}

/// The reading end of the channel, handed over with [`Incoming::Handover`].
pub struct HandoverEnd(BufReader<Deadline>, Option<Seal>);

impl std::fmt::Debug for HandoverEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HandoverEnd")
    }
}

/// The secondary's end.
pub struct SecondaryLink {
    pub shared: Arc<Shared>,
    pub rx: Receiver<Incoming>,
    executed: Arc<AtomicU64>,
    pub epoch: u64,
    pub peer: String,
    arbiter: Arc<dyn Arbiter>,
    stream: Arc<TcpStream>,
    writer: Arc<Mutex<SealedStream>>,
    lost: Arc<AtomicBool>,
}

/// How a secondary was paired: with a primary that boots the guest with
/// it, or with one whose guest runs already (the state comes first).
pub enum Paired {
    Boot(SecondaryLink),
    Join(Joining),
}

/// Bind the secondary's listening socket.
pub fn listen(addr: &str) -> Result<TcpListener, PairError> {
    TcpListener::bind(addr).map_err(|source| PairError::Listen { addr: addr.into(), source })
}

impl SecondaryLink {
    /// Wait for a primary on `listener` and pair with it if `check` accepts
    /// its hello. Connections that are not lockstep primaries, speak another
    /// version or an old epoch are refused and waited past (a warning says
    /// so); a primary of another VM or disk ends the wait with an error.
    /// `check`'s `Err` is the refusal text: it is sent to the primary (which
    /// prints it) and returned in [`PairError::Refused`].
    ///
    /// Each connection says hello on a thread of its own, within
    /// [`HELLO_DEADLINE`], so a peer that trickles bytes holds up nobody;
    /// `stop` is asked every few milliseconds (a signal ends the wait).
    pub fn accept(
        listener: TcpListener,
        arbiter: Arc<dyn Arbiter>,
        cfg: PairConfig,
        check: &mut dyn FnMut(&Hello) -> Result<(), String>,
        key: Option<Arc<Key>>,
        stop: &dyn Fn() -> bool,
    ) -> Result<Paired, PairError> {
        listener.set_nonblocking(true).map_err(PairError::Accept)?;
        let (hellos, said) = mpsc::channel::<Greeting>();
        loop {
            if stop() {
                return Err(PairError::Stopped);
            }
            match listener.accept() {
                Ok((stream, from)) => {
                    let (hellos, key) = (hellos.clone(), key.clone());
                    std::thread::spawn(move || {
                        if let Some(g) = greet(stream, from.to_string(), key.as_deref()) {
                            let _ = hellos.send(g);
                        }
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(PairError::Accept(e)),
            }
            let Ok(Greeting { stream, from, mut w, r, epoch, hello, mut seal_out, seal_in }) =
                said.recv_timeout(ACCEPT_POLL)
            else {
                continue;
            };
            let current = arbiter.read()?;
            if current.as_ref().map(|h| h.epoch) != Some(epoch) {
                let why = match current {
                    Some(h) => format!(
                        "stale epoch: the primary speaks for epoch {epoch}, the arbiter is at epoch {} held by '{}'",
                        h.epoch, h.owner
                    ),
                    None => {
                        format!("the primary speaks for epoch {epoch}, the arbiter ({}) has none", arbiter.describe())
                    }
                };
                let _ = wire::send(&mut w, 0, &Message::Refuse(why.clone()), seal_out.as_mut());
                tracing::warn!("refused the primary at {from}: {why}");
                continue;
            }
            if let Err(why) = check(&hello) {
                let _ = wire::send(&mut w, epoch, &Message::Refuse(why.clone()), seal_out.as_mut());
                return Err(PairError::Refused { addr: from, why });
            }
            wire::send(&mut w, epoch, &Message::Welcome, seal_out.as_mut())
                .map_err(|e| PairError::Wire { addr: from.clone(), source: e.into() })?;
            let _ = stream.set_read_timeout(None);
            let ch = Channel { stream, w, r, seal_out, seal_in, peer: from.clone() };
            let paired = if hello.join {
                tracing::info!("the primary at {from} runs already: receiving its state (epoch {epoch})");
                Paired::Join(Joining { ch, epoch })
            } else {
                let link = SecondaryLink::start(ch, epoch, arbiter, cfg, 0);
                note!(link.shared, info, "paired with the primary at {from}, epoch {epoch}: replaying its log");
                Paired::Boot(link)
            };
            let _ = listener.set_nonblocking(false);
            std::thread::spawn(move || refuse_latecomers(listener, epoch, from));
            return Ok(paired);
        }
    }

    /// This side's end of `ch` as the secondary at `epoch`, holding the log
    /// up to `received` already.
    fn start(ch: Channel, epoch: u64, arbiter: Arc<dyn Arbiter>, cfg: PairConfig, received: u64) -> SecondaryLink {
        let Channel { stream, w, mut r, seal_out, seal_in, peer } = ch;
        let shared = Shared::new("secondary", epoch);
        shared.update(|s| (s.position, s.peer_position) = (received, received));
        watch_arbiter(arbiter.clone(), shared.clone());
        let (tx, rx) = mpsc::channel();
        let executed = Arc::new(AtomicU64::new(received));
        let heard = Arc::new(Mutex::new(Instant::now()));
        r.get_mut().heard = Some(heard.clone());
        let lost = Arc::new(AtomicBool::new(false));
        let stream = Arc::new(stream);
        let writer = Arc::new(Mutex::new(SealedStream { stream: w, seal: seal_out }));
        let end = SecondaryEnd {
            shared: shared.clone(),
            tx,
            lost: lost.clone(),
            handing: Arc::default(),
            stream: stream.clone(),
            writer: writer.clone(),
            executed: executed.clone(),
            received: Arc::new(AtomicU64::new(received)),
            delayed: Arc::default(),
            ack_delay: cfg.ack_delay,
            disk: cfg.disk.clone(),
            heard,
            epoch,
            datagrams: Arc::default(),
        };
        {
            let end = end.clone();
            crate::urgent::spawn("ft-receive", move || end.receive_loop(r, seal_in));
        }
        crate::spawn_named("ft-heartbeat", move || end.heartbeat_loop(cfg));
        SecondaryLink { shared, rx, executed, epoch, peer, arbiter, stream, writer, lost }
    }

    /// The new secondary after a planned switchover ([`PrimaryLink::handover`]).
    pub fn resume(s: Switched, arbiter: Arc<dyn Arbiter>, cfg: PairConfig) -> SecondaryLink {
        let (epoch, at) = (s.epoch, s.at);
        let link = SecondaryLink::start(s.channel, epoch, arbiter, cfg, at);
        note!(link.shared, info, "switched over at position {at}: now the secondary, epoch {epoch}, replaying");
        link
    }

    /// The switchover's second half, once this side has replayed to the
    /// handover point `at`: win the next epoch as the primary and tell the
    /// old primary, which becomes this side's secondary. An error (the
    /// arbiter unreachable or taken) leaves the pair to its usual rules:
    /// the caller treats the primary as lost, unless the epoch was won
    /// (`Some`: the old primary is gone; this side goes on alone).
    ///
    /// `claimed` runs once the epoch is won (a test's failpoint).
    pub fn take_over(
        &self,
        end: HandoverEnd,
        at: u64,
        base: u64,
        claimed: impl FnOnce(),
    ) -> Result<Switched, (String, Option<u64>)> {
        let epoch = match self.arbiter.claim(self.epoch, &owner_name("primary"), false) {
            Ok(Claim::Won(e)) => e,
            Ok(Claim::Lost(h)) => return Err((format!("epoch {} belongs to '{}'", h.epoch, h.owner), None)),
            Err(e) => return Err((ErrorChain(&e).to_string(), None)),
        };
        claimed();
        self.shared.update(|s| s.epoch = epoch);
        let mut guard = self.writer.lock().unwrap();
        let w = &mut *guard;
        let sent = w.send(self.epoch, &Message::Switched { epoch });
        if let Err(e) = sent {
            // The old primary may still be there, and may claim past this
            // paired epoch (see `Lost::superseded_by_a_silent_takeover`):
            // going on alone takes an alone claim of the next one.
            let why = format!("cannot answer the handover: {e}");
            let t = Instant::now();
            loop {
                match self.arbiter.claim(epoch, &owner_name("secondary"), true) {
                    Ok(Claim::Won(alone)) => return Err((why, Some(alone))),
                    Ok(Claim::Lost(h)) => {
                        return Err((format!("{why}; epoch {} belongs to '{}'", h.epoch, h.owner), None));
                    }
                    Err(_) if t.elapsed() < Duration::from_secs(5) => std::thread::sleep(Duration::from_millis(100)),
                    Err(e) => return Err((format!("{why}; {}", ErrorChain(&e)), None)),
                }
            }
        }
        // This side's secondary role is over.
        self.lost.store(true, Ordering::SeqCst);
        self.shared.update(|s| s.state = Some(State::Stopped));
        let keep =
            |r: std::io::Result<TcpStream>| r.map_err(|e| (format!("cannot keep the channel: {e}"), Some(epoch)));
        let channel = Channel {
            stream: keep(self.stream.try_clone())?,
            w: keep(w.stream.try_clone())?,
            r: end.0,
            seal_out: w.seal.take(),
            seal_in: end.1,
            peer: self.peer.clone(),
        };
        Ok(Switched { channel, epoch, at, base })
    }

    /// Something that sends frames to the primary ([`Message::Forward`])
    /// from another thread, for as long as this link is paired.
    pub fn forwarder(&self) -> Forwarder {
        Forwarder { writer: self.writer.clone(), lost: self.lost.clone(), epoch: self.epoch }
    }

    /// This side stops (a host fault: its disk replica failed): tell the
    /// primary why, so that it goes on alone saying so.
    pub fn resign(&self, why: &str) {
        let mut w = self.writer.lock().unwrap();
        if self.lost.swap(true, Ordering::SeqCst) {
            return;
        }
        let _ = w.send(self.epoch, &Message::Refuse(why.to_string()));
        self.shared.update(|s| s.state = Some(State::Stopped));
    }

    /// The run loop executed up to `position`.
    pub fn executed(&self, position: u64) {
        self.executed.store(position, Ordering::Relaxed);
        self.shared.status.lock().unwrap().position = position;
    }

    /// Ask the arbiter for the next epoch (retrying while it is
    /// unreachable, with a warning the first time); `Won` means go live.
    /// The outcome is left in the status note; the caller reports it.
    pub fn claim(&self) -> Claim {
        self.shared.update(|s| s.state = Some(State::Arbitrating));
        let mut told = false;
        loop {
            match self.arbiter.claim(self.epoch, &owner_name("secondary"), true) {
                Ok(c) => {
                    self.shared.update(|s| {
                        s.state = Some(if matches!(c, Claim::Won(_)) { State::Alone } else { State::Stopped });
                        match &c {
                            Claim::Won(e) => {
                                s.epoch = *e;
                                s.note = format!("won epoch {e}: live, the VM is NOT PROTECTED");
                            }
                            Claim::Lost(h) => {
                                s.note = format!("lost arbitration: epoch {} belongs to '{}'", h.epoch, h.owner)
                            }
                        }
                    });
                    return c;
                }
                Err(e) => {
                    if !told {
                        tracing::warn!("{}; not going live, retrying", ErrorChain(&e));
                        told = true;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

/// See [`SecondaryLink::forwarder`].
#[derive(Clone)]
pub struct Forwarder {
    writer: Arc<Mutex<SealedStream>>,
    lost: Arc<AtomicBool>,
    epoch: u64,
}

impl Forwarder {
    /// Send `frame` to the primary; false once the link is gone.
    pub fn send(&self, frame: Vec<u8>) -> bool {
        let mut w = self.writer.lock().unwrap();
        if self.lost.load(Ordering::SeqCst) {
            return false;
        }
        w.send(self.epoch, &Message::Forward(frame)).is_ok()
    }
}

/// How often a paired side checks that its arbiter answers.
const ARBITER_CHECK: Duration = Duration::from_secs(2);

/// Check the arbiter every [`ARBITER_CHECK`] while the side runs, so a
/// healthy pair whose arbiter is down says so (`arbiter_up`, a warning)
/// before it needs it.
fn watch_arbiter(arbiter: Arc<dyn Arbiter>, shared: Arc<Shared>) {
    shared.update(|s| s.arbiter_up = true);
    std::thread::spawn(move || {
        let mut up = true;
        while shared.state() != State::Stopped {
            std::thread::sleep(ARBITER_CHECK);
            match arbiter.read() {
                Ok(_) if !up => {
                    up = true;
                    tracing::info!("arbiter {} answers again", arbiter.describe());
                }
                Ok(_) => {}
                Err(e) if up => {
                    up = false;
                    tracing::warn!("{}: the pair cannot fail over until it is back", ErrorChain(&e));
                }
                Err(_) => {}
            }
            shared.update(|s| s.arbiter_up = up);
        }
    });
}

/// How often the accept loop looks for connections, hellos and `stop`.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

#[derive(Clone)]
struct SecondaryEnd {
    shared: Arc<Shared>,
    tx: Sender<Incoming>,
    lost: Arc<AtomicBool>,
    /// A planned switchover is under way: no more acknowledgements.
    handing: Arc<AtomicBool>,
    stream: Arc<TcpStream>,
    writer: Arc<Mutex<SealedStream>>,
    executed: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    /// Marks not yet acknowledged (only with [`PairConfig::ack_delay`]).
    delayed: Arc<Mutex<VecDeque<(Instant, u64)>>>,
    ack_delay: Duration,
    /// This side's disk: its acknowledgements say when its run loop is
    /// inside an operation.
    disk: DiskWatch,
    heard: Arc<Mutex<Instant>>,
    epoch: u64,
    /// Where heartbeats go by datagram as well, once the primary has said.
    datagrams: Arc<Mutex<Option<AckSender>>>,
}

impl SecondaryEnd {
    /// Mark `p` arrived: acknowledge it (now, or after the ack delay).
    fn arrived(&self, p: u64) {
        if self.ack_delay.is_zero() {
            self.received.fetch_max(p, Ordering::Relaxed);
        } else {
            self.delayed.lock().unwrap().push_back((Instant::now(), p));
        }
    }

    fn lose(&self, why: String) {
        if !self.lost.swap(true, Ordering::SeqCst) {
            let _ = self.stream.shutdown(Shutdown::Both);
            let _ = self.tx.send(Incoming::Lost(why));
        }
    }

    /// Acknowledge what arrived and what ran; a heartbeat's also goes by
    /// datagram (`datagram`).
    fn ack(&self, datagram: bool) -> std::io::Result<()> {
        let mut delayed = self.delayed.lock().unwrap();
        while let Some(&(at, p)) = delayed.front() {
            if at.elapsed() < self.ack_delay {
                break;
            }
            self.received.fetch_max(p, Ordering::Relaxed);
            delayed.pop_front();
        }
        drop(delayed);
        let (received, executed) = (self.received.load(Ordering::Relaxed), self.executed.load(Ordering::Relaxed));
        let in_disk = self.disk.busy();
        if datagram && !self.handing.load(Ordering::SeqCst) {
            if let Some(d) = self.datagrams.lock().unwrap().as_mut() {
                d.send(Acked { received, executed, in_disk });
            }
        }
        self.send(&Message::Ack { received, executed, in_disk })
    }

    /// Send `msg` to the primary, unless the link is gone or handed over.
    fn send(&self, msg: &Message) -> std::io::Result<()> {
        let mut w = self.writer.lock().unwrap();
        if self.handing.load(Ordering::SeqCst) || self.lost.load(Ordering::SeqCst) {
            return Ok(());
        }
        w.send(self.epoch, msg)
    }

    /// Hand the records that wait to the replay thread; `false` when it is
    /// gone.
    fn pass_on(&self, deferred: &mut Vec<Record>) -> bool {
        deferred.is_empty() || self.tx.send(Incoming::Records(std::mem::take(deferred))).is_ok()
    }

    fn receive_loop(self, mut r: BufReader<Deadline>, mut seal: Option<Seal>) {
        // Records whose mark is already in the read buffer wait here for it:
        // the mark is acknowledged before they go to the replay thread, so
        // waking that thread (which may take this CPU) never delays the
        // acknowledgement the primary's output waits for.
        let mut deferred: Vec<Record> = Vec::new();
        loop {
            let received = wire::receive(&mut r, seal.as_mut());
            // Whatever ends the loop or is not a mark: what waits goes first
            // (the replay thread runs all it was given before going live).
            if !matches!(received, Ok((_, Message::Records(_) | Message::Through { .. })))
                && !self.pass_on(&mut deferred)
            {
                return;
            }
            let (epoch, msg) = match received {
                Ok(m) => m,
                Err(WireError::Closed) => return self.lose("it closed the log channel".into()),
                Err(e) => return self.lose(ErrorChain(&e).to_string()),
            };
            *self.heard.lock().unwrap() = Instant::now();
            if epoch != self.epoch {
                return self.lose(format!("it sent a message of epoch {epoch}, paired at epoch {}", self.epoch));
            }
            let size = match &msg {
                Message::Records(r) => r.len() as u64 * 16,
                _ => 16,
            };
            match msg {
                Message::Records(records) => {
                    let bytes: u64 = records
                        .iter()
                        .map(|r| match &r.event {
                            replay::Event::Frame { data, .. } => data.len() as u64,
                            replay::Event::Console(b) | replay::Event::Entropy(b) => b.len() as u64,
                            _ => 8,
                        })
                        .sum();
                    self.shared.status.lock().unwrap().log_bytes += bytes + size;
                    deferred.extend(records);
                    // Nothing more read yet: the mark may be far (a slow
                    // link); the replay thread gets them now.
                    if r.buffer().is_empty() && !self.pass_on(&mut deferred) {
                        return;
                    }
                }
                Message::Through { through: p, released, urgent } => {
                    self.arrived(p);
                    // A mark nobody waits on is acknowledged with the next
                    // heartbeat: half the messages in request/response
                    // traffic, nearly all while the guest only computes.
                    if urgent {
                        if let Err(e) = self.ack(false) {
                            return self.lose(format!("cannot acknowledge: {e}"));
                        }
                    }
                    self.shared.update(|s| {
                        s.peer_position = s.peer_position.max(p);
                        s.log_bytes += size;
                        s.lag_positions = s.peer_position.saturating_sub(s.position);
                        s.lag_ms = s.lag_positions as f64 / 1e6;
                    });
                    if !self.pass_on(&mut deferred) {
                        return;
                    }
                    if self.tx.send(Incoming::Through { through: p, released }).is_err() {
                        return;
                    }
                }
                Message::Probe { nonce } => {
                    // The primary paused and asks whether this side is still
                    // its secondary: it is (going live closes the channel
                    // first). The answer goes out at once, ahead of the next
                    // heartbeat.
                    if let Err(e) = self.send(&Message::Probed { nonce }) {
                        return self.lose(format!("cannot answer: {e}"));
                    }
                }
                Message::AckTo { port, secret } => {
                    let primary = match self.stream.peer_addr() {
                        Ok(a) => a.ip(),
                        Err(e) => return self.lose(format!("cannot tell its address: {e}")),
                    };
                    // Keyed under this direction's session key (the primary's
                    // incoming seal is the same).
                    let sender = {
                        let w = self.writer.lock().unwrap();
                        AckSender::new(primary, port, &secret, w.seal.as_ref(), self.epoch)
                    };
                    match sender {
                        Ok(sender) => *self.datagrams.lock().unwrap() = Some(sender),
                        Err(e) => {
                            tracing::warn!("acknowledgements go on the log channel only (no datagram socket: {e})")
                        }
                    }
                }
                Message::Release => {
                    self.lost.store(true, Ordering::SeqCst);
                    let _ = self.tx.send(Incoming::Released);
                    return;
                }
                Message::Handover { at } => {
                    self.handing.store(true, Ordering::SeqCst);
                    let _ = self.tx.send(Incoming::Handover { at, end: HandoverEnd(r, seal) });
                    return;
                }
                Message::Refuse(why) => return self.lose(format!("it ended the pair: {why}")),
                m => return self.lose(format!("it sent {m:?} on a paired channel")),
            }
        }
    }

    fn heartbeat_loop(self, cfg: PairConfig) {
        let mut last_missed = Instant::now();
        // What this side last said of its network, and when.
        let mut uplink_told: Option<(bool, Instant)> = None;
        let mut awake = Awake::new(cfg.heartbeat, cfg.timeout);
        while !self.lost.load(Ordering::SeqCst) {
            std::thread::sleep(cfg.heartbeat);
            if self.handing.load(Ordering::SeqCst) {
                return;
            }
            // After a pause of this side, the primary's word may be waiting
            // unread: silence counts from the end of the pause.
            awake.heartbeat_round();
            let heard = *self.heard.lock().unwrap();
            let silent = heard.elapsed();
            if awake.ran_since(heard) >= cfg.timeout {
                return self.lose(format!("no word from it for {} ms", silent.as_millis()));
            }
            if silent >= cfg.heartbeat && last_missed.elapsed() >= cfg.heartbeat {
                last_missed = Instant::now();
                self.shared.status.lock().unwrap().missed_heartbeats += 1;
            }
            if let Err(e) = self.ack(true) {
                return self.lose(format!("cannot send a heartbeat: {e}"));
            }
            if let Some(up) = crate::health::uplink() {
                let due = uplink_told.is_none_or(|(told, at)| told != up || at.elapsed() >= UPLINK_EVERY);
                if due {
                    if let Err(e) = self.send(&Message::Uplink { up }) {
                        return self.lose(format!("cannot send a heartbeat: {e}"));
                    }
                    uplink_told = Some((up, Instant::now()));
                }
            }
        }
    }
}

/// A secondary that watches its network repeats its state this often (and
/// says a change at once).
const UPLINK_EVERY: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arbiter::FileArbiter;
    use crate::gate::Wire;

    /// A primary and a secondary paired on loopback, with heartbeats far
    /// apart: within a test, only a mark's own acknowledgement moves the
    /// gate.
    fn pair(name: &str) -> (PrimaryLink, SecondaryLink, Arc<OutputGate>, Wire, std::path::PathBuf) {
        let cfg = PairConfig {
            heartbeat: Duration::from_secs(20),
            timeout: Duration::from_secs(60),
            ..PairConfig::default()
        };
        pair_with(name, cfg.clone(), cfg)
    }

    /// A pair on loopback with each side's own timing and disk watch.
    fn pair_with(
        name: &str,
        cfg: PairConfig,
        secondary_cfg: PairConfig,
    ) -> (PrimaryLink, SecondaryLink, Arc<OutputGate>, Wire, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("ft-link-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let arbiter: Arc<dyn Arbiter> = Arc::new(FileArbiter::new(dir.join("epoch")));
        let listener = listen("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let hello = Hello {
            vm_id: "vm".into(),
            disk_hash: None,
            seed: [0; 32],
            state_hash: 0,
            mac: None,
            host: String::new(),
            shared_arbiter: false,
            build: String::new(),
            join: false,
        };
        let secondary = {
            let arbiter = arbiter.clone();
            std::thread::spawn(move || {
                SecondaryLink::accept(listener, arbiter, secondary_cfg, &mut |_| Ok(()), None, &|| false)
            })
        };
        let wire = Wire::default();
        let gate = Arc::new(OutputGate::new(vec![Box::new(wire.clone())]));
        let primary = PrimaryLink::connect(&addr, hello, arbiter, gate.clone(), cfg, None, &|| false).unwrap();
        let Ok(Paired::Boot(secondary)) = secondary.join().unwrap() else { panic!("not paired for a boot") };
        (primary, secondary, gate, wire, dir)
    }

    fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let t = Instant::now();
        while !cond() {
            assert!(t.elapsed() < Duration::from_secs(10), "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Marks nobody waits on are acknowledged with the heartbeat; a frame
    /// in the gate gets its acknowledgement at once, also when the mark
    /// covering it already went out without asking for one.
    #[test]
    fn only_marks_that_output_waits_on_are_acknowledged_at_once() {
        let (mut primary, secondary, gate, wire, dir) = pair("urgent");
        let input = Record { position: 50, event: replay::Event::Console(b"x".to_vec()) };
        primary.record(input.clone());
        primary.progress(100);
        // The secondary has the records and the mark ...
        let mut got = Vec::new();
        while !got.iter().any(|m| matches!(m, Incoming::Through { through: 100, .. })) {
            got.push(secondary.rx.recv_timeout(Duration::from_secs(10)).expect("the mark"));
        }
        assert!(matches!(&got[0], Incoming::Records(r) if r == &vec![input]));
        // ... and does not answer it before its heartbeat.
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(gate.acked(), 0, "a mark nothing waits on was acknowledged at once");
        // Output produced at the position of that mark: the mark is sent
        // again, asking, and the frame leaves.
        primary.output(0, b"reply");
        wait_until("the held frame was never released", || gate.acked() >= 100);
        wait_until("the frame did not leave", || wire.0.lock().unwrap().len() == 1);
        // Output past the last mark: its own urgent mark.
        primary.progress(200);
        primary.output(0, b"second");
        wait_until("the second frame was never released", || wire.0.lock().unwrap().len() == 2);
        assert_eq!(gate.acked(), 200);
        drop(secondary);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Output already has its mark (sent with it): slices that end while
    /// it waits for the acknowledgement send no marks of their own (each
    /// would cost a write here and an immediate acknowledgement there, for
    /// every slice of every request).
    #[test]
    fn slices_while_output_waits_send_no_marks() {
        let (mut primary, secondary, gate, wire, dir) = pair("held");
        primary.record(Record { position: 50, event: replay::Event::Console(b"x".to_vec()) });
        primary.progress(100);
        primary.output(0, b"reply");
        // Slices end while the frame is (almost surely) still held.
        for position in [110, 120, 130] {
            primary.progress(position);
        }
        wait_until("the held frame was never released", || wire.0.lock().unwrap().len() == 1);
        let t = std::time::Instant::now();
        let mut marks = Vec::new();
        while t.elapsed() < Duration::from_millis(200) {
            if let Ok(Incoming::Through { through, .. }) = secondary.rx.recv_timeout(Duration::from_millis(20)) {
                marks.push(through);
            }
        }
        assert!(marks.iter().all(|&m| m <= 100), "marks from slices with nothing new: {marks:?}");
        assert_eq!(gate.acked(), 100);
        // An input is news: the next slice sends it with its mark.
        primary.record(Record { position: 140, event: replay::Event::Console(b"y".to_vec()) });
        primary.progress(150);
        let mut got = Vec::new();
        while !got.iter().any(|m| matches!(m, Incoming::Through { through: 150, .. })) {
            got.push(secondary.rx.recv_timeout(Duration::from_secs(10)).expect("the input's mark"));
        }
        drop(secondary);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Flow control gives a secondary inside a disk operation the disk
    /// allowance, and counts the end of one as a sign of life: its run
    /// loop may go on a while before its executed position next moves, or
    /// start the next operation at once (seen in CI: back-to-back slow
    /// flushes, the standstill measured from before the first, taken for
    /// a hang). Only the time since the last end counts.
    #[test]
    fn a_secondary_between_two_slow_disk_operations_is_not_given_up() {
        let cfg = PairConfig {
            heartbeat: Duration::from_millis(20),
            timeout: Duration::from_millis(100),
            max_lag: 1000,
            ..PairConfig::default()
        };
        let secondary_disk = DiskWatch::default();
        let secondary_cfg = PairConfig { disk: secondary_disk.clone(), ..cfg.clone() };
        let stall = cfg.stall_timeout();
        let (mut primary, secondary, gate, _wire, dir) = pair_with("disk", cfg, secondary_cfg);
        primary.record(Record { position: 10, event: replay::Event::Console(b"x".to_vec()) });
        primary.progress(5000);
        // The secondary holds the log but has executed none of it.
        wait_until("the log was never acknowledged", || gate.acked() >= 5000);
        let replay = std::thread::spawn(move || {
            for _ in 0..2 {
                // An operation longer than the compute allowance, then
                // less than that allowance before the next.
                secondary_disk.during(|| std::thread::sleep(stall * 3 / 2));
                std::thread::sleep(stall / 2);
            }
            secondary.executed(5000);
            secondary
        });
        primary.throttle();
        let secondary = replay.join().unwrap();
        assert_eq!(primary.state(), State::Protected, "the secondary was given up");
        drop(secondary);
        let _ = std::fs::remove_dir_all(dir);
    }
}
