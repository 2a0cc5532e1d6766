//! The two sides of a fault-tolerant pair: the run loops around `ft`.
//!
//! The primary runs the guest live, as `run --record` does, but its log
//! goes to the secondary ([`ft::link::PrimaryLink`]) and its network output
//! waits in the output gate until the secondary has acknowledged the log
//! up to where that output was produced. The secondary builds the same
//! machine and replays the log as it arrives, never running past what it
//! has received. When the primary is lost and the secondary wins the next
//! epoch, it replays what it holds, goes live at exactly that position on
//! its own tap, and announces the guest's addresses so the bridge and the
//! clients' neighbours learn the new port.

use crate::announce;
use crate::console::StdioConsole;
use crate::vm::{
    self, apply_input, end_reason, print_final, run_to_hashing, HostEntropy, LinuxVm, LiveIo, Outcome, ReplayIo,
};
use anyhow::{bail, Context, Result};
use ft::arbiter::{Arbiter, Claim};
use ft::gate::{FrameSink, OutputGate};
use ft::link::{Incoming, PrimaryLink, SecondaryLink, Shared};
use ft::wire::Hello;
use ft::{PairConfig, State, Status};
use machine::virtio::rng::EntropySource;
use machine::{HostInput, HostIo, RunTo, Stop};
use replay::{EndReason, Event, Record};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Options of either side.
pub struct PairOpts {
    /// Primary: the secondary's address. Secondary: the address to listen on.
    pub addr: String,
    /// `file:PATH` or `etcd:http://HOST:PORT` (default: a file for this VM
    /// in the temp directory, for pairs on one host).
    pub arbiter: Option<String>,
    pub cfg: PairConfig,
    /// Serve `/metrics` and `/status` here.
    pub metrics: Option<String>,
    pub hash_every: Option<u64>,
    pub max_insns: Option<u64>,
}

/// What makes two VM descriptions the same VM: the kernel's and initrd's
/// contents, the command line, memory, and which devices exist (not paths,
/// tap names or MACs: each side has its own replica and tap).
fn vm_identity(vm: &LinuxVm) -> Result<String> {
    let text = format!(
        "{}|{}|{}|{}|{}|{}",
        vm::file_hash(&vm.kernel)?,
        vm.initrd.as_deref().map(vm::file_hash).transpose()?.unwrap_or_default(),
        vm.append,
        vm.mem,
        vm.disk.as_ref().map_or("nodisk", |(_, ro)| if *ro { "ro" } else { "rw" }),
        vm.net.is_some(),
    );
    Ok(format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes())))
}

fn arbiter_for(opts: &PairOpts, vm_id: &str) -> Result<Arc<dyn Arbiter>> {
    let spec = match &opts.arbiter {
        Some(s) => s.clone(),
        None => format!("file:{}", std::env::temp_dir().join(format!("lockstep-{vm_id}.epoch")).display()),
    };
    Ok(Arc::from(ft::arbiter::from_spec(&spec, vm_id).map_err(anyhow::Error::msg)?))
}

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The primary's log, shared by its host side and its entropy source.
struct PrimarySide {
    link: PrimaryLink,
    /// Position of the last record (entropy is stamped with it).
    last: u64,
}

impl PrimarySide {
    fn record(&mut self, position: u64, event: Event) {
        self.last = position;
        self.link.record(Record { position, event });
    }
}

struct PrimaryIo<'a> {
    console: &'a mut StdioConsole,
    side: Rc<RefCell<PrimarySide>>,
    print_hashes: bool,
    /// The pair's policy stopped this side (lost arbitration).
    fenced: bool,
}

impl PrimaryIo<'_> {
    fn print_notes(&mut self) {
        let notes = self.side.borrow().link.shared.take_notes();
        for n in notes {
            self.console.host_note(&format!("lockstep: {n}"));
        }
    }
}

impl HostIo for PrimaryIo<'_> {
    fn console_write(&mut self, bytes: &[u8]) {
        self.console.console_write(bytes);
    }
    fn wait(&mut self, timeout: Duration) -> HostInput {
        self.print_notes();
        if self.side.borrow().link.state() == State::Stopped {
            self.fenced = true;
            return HostInput::Quit;
        }
        if timeout.is_zero() {
            self.side.borrow_mut().link.throttle();
        }
        self.console.wait(timeout)
    }
    fn progress(&mut self, pos: u64) {
        self.side.borrow_mut().link.progress(pos);
    }
    fn send_frame(&mut self, nic: usize, frame: &[u8]) {
        self.side.borrow_mut().link.output(nic, frame);
    }
    fn host_log(&mut self, line: &str) {
        self.console.host_log(line);
    }
    fn delivered(&mut self, pos: u64, input: &HostInput) {
        let event = match input {
            HostInput::Console(b) => Event::Console(b.clone()),
            HostInput::Frame { nic, data } => Event::Frame { nic: *nic as u8, data: data.clone() },
            HostInput::Nothing | HostInput::Quit => return,
        };
        self.side.borrow_mut().record(pos, event);
    }
    fn skipped(&mut self, pos: u64, steps: u64) {
        self.side.borrow_mut().record(pos, Event::Skip(steps));
    }
    fn state_hash(&mut self, pos: u64, hash: u64) {
        self.side.borrow_mut().record(pos, Event::Hash(hash));
        if self.print_hashes {
            self.console.host_note(&format!("hash {pos} {hash:016x}"));
        }
    }
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

/// Run the primary of a pair.
pub fn run_primary(vm: &LinuxVm, opts: &PairOpts) -> Result<Outcome> {
    let vm_id = vm_identity(vm)?;
    let arbiter = arbiter_for(opts, &vm_id)?;
    let mut console = StdioConsole::new();
    let mut sinks: Vec<Box<dyn FrameSink>> = Vec::new();
    if let Some((name, _)) = &vm.net {
        let tap = tap::Tap::open(name, true)?;
        sinks.push(Box::new(tap.try_clone().with_context(|| format!("cannot use tap '{name}'"))?));
        console.add_tap(tap).with_context(|| format!("cannot read tap '{name}'"))?;
    }
    let gate = Arc::new(OutputGate::new(sinks));
    let seed = vm::host_seed()?;
    let disk_hash = vm.disk.as_ref().map(|(p, _)| vm::file_hash(p)).transpose()?;
    // The machine needs its entropy source before the link exists; the
    // source finds the link through this cell.
    let side: Rc<RefCell<Option<Rc<RefCell<PrimarySide>>>>> = Rc::new(RefCell::new(None));
    struct Deferred(Rc<RefCell<Option<Rc<RefCell<PrimarySide>>>>>, HostEntropy);
    impl EntropySource for Deferred {
        fn fill(&mut self, buf: &mut [u8]) {
            self.1.fill(buf);
            if let Some(side) = self.0.borrow().as_ref() {
                let mut s = side.borrow_mut();
                let pos = s.last;
                s.record(pos, Event::Entropy(buf.to_vec()));
            }
        }
    }
    let mut m = vm.machine(seed, Box::new(Deferred(side.clone(), HostEntropy::open()?)))?;
    m.hash_every = opts.hash_every;
    let hello = Hello {
        vm_id: vm_id.clone(),
        disk_hash,
        seed,
        state_hash: m.state_hash(),
        mac: vm.net.as_ref().map(|(_, mac)| *mac),
    };
    console.host_note(&format!(
        "lockstep: primary: waiting for the secondary at {} (arbiter {})",
        opts.addr,
        arbiter.describe()
    ));
    let link = PrimaryLink::connect(&opts.addr, hello, arbiter, gate.clone(), opts.cfg)?;
    let shared = link.shared.clone();
    if let Some(addr) = &opts.metrics {
        crate::metrics::serve(addr, Box::new(status_fn(shared.clone(), Some(gate.clone()))))?;
    }
    let s = Rc::new(RefCell::new(PrimarySide { link, last: 0 }));
    *side.borrow_mut() = Some(s.clone());
    s.borrow_mut().record(0, Event::Seed(seed));
    loop {
        let mut io = PrimaryIo {
            console: &mut console,
            side: s.clone(),
            print_hashes: opts.hash_every.is_some(),
            fenced: false,
        };
        let stop = m.run_linux(&mut io, opts.max_insns)?;
        io.print_notes();
        let fenced = io.fenced;
        drop(io);
        if fenced {
            print_final(&mut console, &m);
            bail!("{}", shared.status().note);
        }
        let end = m.hart.position().0;
        s.borrow_mut().record(end, Event::End(end_reason(stop)));
        if stop == Stop::Reboot {
            s.borrow_mut().link.rebooted(end);
            let seed = vm::host_seed()?;
            s.borrow_mut().record(0, Event::Seed(seed));
            // The old machine lets go of the disk (its lock) first.
            drop(m);
            m = vm.machine(seed, Box::new(Deferred(side.clone(), HostEntropy::open()?)))?;
            m.hash_every = opts.hash_every;
            continue;
        }
        // Let the secondary have the end before this side goes.
        s.borrow_mut().link.finish(end, Duration::from_secs(5));
        print_final(&mut console, &m);
        return match stop {
            Stop::Quit if console.signalled() => bail!("stopped by a signal"),
            Stop::PowerOff | Stop::Quit => Ok(Outcome::Success),
            Stop::Panic => {
                eprintln!("lockstep: the guest kernel panicked (its message is above)");
                Ok(Outcome::GuestFailure)
            }
            Stop::Reboot => unreachable!(),
            Stop::Limit => bail!("instruction limit of {} reached", opts.max_insns.unwrap_or(0)),
        };
    }
}

/// The secondary's entropy: the log's bytes while it replays, the host's
/// once it is live.
struct ReplicaEntropy {
    queue: Rc<RefCell<VecDeque<Vec<u8>>>>,
    error: Rc<RefCell<Option<String>>>,
    live: Rc<Cell<bool>>,
    host: HostEntropy,
}

impl EntropySource for ReplicaEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        if self.live.get() {
            return self.host.fill(buf);
        }
        match self.queue.borrow_mut().pop_front() {
            Some(bytes) if bytes.len() == buf.len() => buf.copy_from_slice(&bytes),
            other => {
                buf.fill(0);
                let got = other.map_or("none".to_string(), |b| format!("{} bytes", b.len()));
                self.error
                    .borrow_mut()
                    .get_or_insert(format!("the guest drew {} entropy bytes where the log has {got}", buf.len()));
            }
        }
    }
}

/// How the secondary's replay ended.
enum ReplayEnd {
    /// The primary ended the VM (the log's end record).
    Ended(EndReason),
    /// The primary is lost (why).
    Lost(String),
}

/// Run the secondary of a pair.
pub fn run_secondary(vm: &LinuxVm, opts: &PairOpts) -> Result<Outcome> {
    let vm_id = vm_identity(vm)?;
    let arbiter = arbiter_for(opts, &vm_id)?;
    let listener = ft::link::listen(&opts.addr)?;
    let mut console = StdioConsole::new();
    // Opened now so a bad tap is an error before pairing; read only once live.
    let mut tap = match &vm.net {
        Some((name, _)) => Some(tap::Tap::open(name, true)?),
        None => None,
    };
    let queue = Rc::new(RefCell::new(VecDeque::new()));
    let entropy_error = Rc::new(RefCell::new(None::<String>));
    let live = Rc::new(Cell::new(false));
    let entropy = || -> Result<Box<dyn EntropySource>> {
        Ok(Box::new(ReplicaEntropy {
            queue: queue.clone(),
            error: entropy_error.clone(),
            live: live.clone(),
            host: HostEntropy::open()?,
        }))
    };
    let disk_hash = vm.disk.as_ref().map(|(p, _)| vm::file_hash(p)).transpose()?;
    let mut vm = vm.clone();
    let mut built = None;
    console.host_note(&format!("lockstep: secondary: listening on {} (arbiter {})", opts.addr, arbiter.describe()));
    let mut check = |h: &Hello| -> Result<(), String> {
        if h.vm_id != vm_id {
            return Err(format!(
                "the primary runs another VM (identity {}, this secondary's is {vm_id}: kernel, initrd, command line, \
                 memory or devices differ)",
                h.vm_id
            ));
        }
        if h.disk_hash != disk_hash {
            return Err(format!(
                "the disk replicas differ (primary {}, secondary {}): copy the primary's image first",
                h.disk_hash.as_deref().unwrap_or("none"),
                disk_hash.as_deref().unwrap_or("none")
            ));
        }
        // Same guest MAC on both sides: the secondary takes over the address.
        if let (Some((_, mac)), Some(theirs)) = (&mut vm.net, h.mac) {
            *mac = theirs;
        }
        let m =
            entropy().and_then(|e| vm.machine(h.seed, e)).map_err(|e| format!("cannot build the machine: {e:#}"))?;
        let mine = m.state_hash();
        if mine != h.state_hash {
            return Err(format!(
                "the initial machine states differ (primary {:016x}, secondary {mine:016x})",
                h.state_hash
            ));
        }
        built = Some(m);
        Ok(())
    };
    let mut log = |line: &str| eprintln!("lockstep: {line}");
    let link = SecondaryLink::accept(listener, arbiter.clone(), opts.cfg, &mut check, &mut log)?;
    let mut m = built.take().context("paired without a machine")?;
    m.hash_every = opts.hash_every;
    let position = Arc::new(AtomicU64::new(0));
    if let Some(addr) = &opts.metrics {
        let shared = link.shared.clone();
        let pos = position.clone();
        let f = status_fn(shared, None);
        crate::metrics::serve(
            addr,
            Box::new(move || {
                let mut s = f();
                if s.state == Some(State::Alone) {
                    s.position = pos.load(Ordering::Relaxed);
                }
                s
            }),
        )?;
    }
    for n in link.shared.take_notes() {
        console.host_note(&format!("lockstep: {n}"));
    }
    let mac = vm.net.as_ref().map(|(_, mac)| *mac);
    // Network output is suppressed, but read for the guest's addresses.
    let mut io = ReplayIo::new(&mut console, opts.hash_every.is_some(), mac);
    let mut pending: VecDeque<Record> = VecDeque::new();
    let mut through = 0u64;
    // Marks and acks count across reboots; the log's positions restart.
    let mut base = 0u64;
    let mut last_good = 0u64;
    let mut lost: Option<String> = None;
    // The first record is the boot seed the machine was built with.
    let end = 'replay: loop {
        // Take in everything that has arrived.
        while lost.is_none() {
            match link.rx.try_recv() {
                Ok(msg) => requeue(msg, &mut pending, &queue, &mut through, &mut lost),
                Err(_) => break,
            }
        }
        if io.console.signalled() {
            bail!("stopped by a signal");
        }
        let pos = m.hart.position().0;
        link.executed(base + pos);
        // After the loss: replay everything held, then stop there.
        let target = match pending.front() {
            Some(r) => r.position,
            None if lost.is_some() => break 'replay ReplayEnd::Lost(lost.take().unwrap()),
            None => through.saturating_sub(base),
        };
        if pos < target {
            // In slices, so acks report execution as it goes.
            let r = run_to_hashing(&mut m, &mut io, target.min(pos + (1 << 22)))?;
            if let Some(e) = entropy_error.borrow().as_ref() {
                bail!("replay diverged between positions {last_good} and {}: {e}", m.hart.position().0);
            }
            let now = m.hart.position().0;
            match r {
                RunTo::Reached => continue,
                RunTo::Idle if pending.is_empty() => {
                    // Waiting for the log like the guest waits for time.
                    if let Ok(msg) = link.rx.recv_timeout(Duration::from_millis(20)) {
                        requeue(msg, &mut pending, &queue, &mut through, &mut lost);
                    }
                    continue;
                }
                RunTo::Idle => bail!(
                    "replay diverged between positions {last_good} and {now}: the guest idles at {now} but the \
                     log's next event is at {target}"
                ),
                RunTo::Stopped(stop) => match pending.front() {
                    Some(Record { event: Event::End(reason), position })
                        if *reason == end_reason(stop) && *position == now => {}
                    _ => bail!(
                        "replay diverged between positions {last_good} and {now}: the guest stopped ({stop:?}) where \
                         the log continues"
                    ),
                },
            }
        }
        let Some(rec) = pending.front().filter(|r| r.position <= m.hart.position().0).cloned() else {
            // Everything received is executed: wait for more.
            match link.rx.recv_timeout(Duration::from_millis(20)) {
                Ok(msg) => requeue(msg, &mut pending, &queue, &mut through, &mut lost),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => lost = Some("the log channel closed".into()),
            }
            continue;
        };
        pending.pop_front();
        let Some(event) = apply_input(&mut m, &mut io, rec.event) else { continue };
        match event {
            Event::Console(_) | Event::Frame { .. } | Event::Skip(_) => {}
            Event::Hash(h) => {
                let mine = m.state_hash();
                if mine != h {
                    bail!(
                        "replay diverged between positions {last_good} and {}: state hash {mine:016x}, the primary's \
                         {h:016x}; this secondary resigns",
                        rec.position
                    );
                }
                last_good = rec.position;
            }
            Event::Seed(_) if rec.position == 0 && m.hart.position().0 == 0 => {}
            Event::Seed(_) => bail!("the primary's log has a boot record in the middle of a run"),
            Event::Entropy(_) | Event::Snapshot(_) => {}
            Event::End(EndReason::Reboot) => {
                // The seed follows the end, in the same batch or a later one.
                let t = std::time::Instant::now();
                while pending.is_empty() && lost.is_none() && t.elapsed() < Duration::from_secs(10) {
                    if let Ok(msg) = link.rx.recv_timeout(Duration::from_millis(20)) {
                        requeue(msg, &mut pending, &queue, &mut through, &mut lost);
                    }
                }
                let Some(Record { event: Event::Seed(seed), .. }) = pending.pop_front() else {
                    bail!("the primary's log has a reboot without a boot record after it");
                };
                base += m.hart.position().0 + 1;
                // The old machine lets go of the disk (its lock) first.
                drop(m);
                m = vm.machine(seed, entropy()?)?;
                m.hash_every = opts.hash_every;
                last_good = 0;
            }
            Event::End(reason) => break 'replay ReplayEnd::Ended(reason),
        }
    };
    let addresses = std::mem::take(&mut io.addresses);
    drop(io);
    let why = match end {
        ReplayEnd::Ended(reason) => {
            for n in link.shared.take_notes() {
                console.host_note(&format!("lockstep: {n}"));
            }
            console.host_note(&format!("lockstep: the primary ended the VM ({reason:?}); the secondary stops with it"));
            print_final(&mut console, &m);
            return Ok(if reason == EndReason::Panic { Outcome::GuestFailure } else { Outcome::Success });
        }
        ReplayEnd::Lost(why) => why,
    };
    let pos = m.hart.position().0;
    console.host_note(&format!(
        "lockstep: lost the primary: {why}; replayed its log to position {pos}; asking the arbiter ({})",
        arbiter.describe()
    ));
    let mut log = |line: &str| eprintln!("lockstep: {line}");
    match link.claim(&mut log) {
        Claim::Won(epoch) => {
            console.host_note(&format!("lockstep: won epoch {epoch}: going live at position {pos} (NOT PROTECTED)"));
        }
        Claim::Lost(h) => {
            print_final(&mut console, &m);
            bail!("lost arbitration: epoch {} belongs to '{}'; this secondary stops", h.epoch, h.owner);
        }
    }
    // Live: the host's entropy, the host's clock, the tap, the console.
    live.set(true);
    let typed = console.discard_pending();
    if typed > 0 {
        console.host_note(&format!("lockstep: dropped {typed} console bytes typed before going live"));
    }
    m.resync_clock();
    if let (Some(t), Some(mac)) = (tap.take(), mac) {
        let name = t.name().to_string();
        let announcer = t.try_clone().with_context(|| format!("cannot use tap '{name}'"))?;
        console.add_tap(t).with_context(|| format!("cannot read tap '{name}'"))?;
        announce::spawn(announcer, mac, addresses.clone());
        let list: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
        console.host_note(&format!(
            "lockstep: announcing {} ({}) on tap '{name}'",
            mac_text(&mac),
            if list.is_empty() { "no address seen yet".to_string() } else { list.join(", ") }
        ));
    }
    let mut live_io = LiveIo::plain(&mut console);
    live_io.position = Some(position);
    live_io.print_hashes = opts.hash_every.is_some();
    let stop = loop {
        match m.run_linux(&mut live_io, opts.max_insns)? {
            // Live and alone, a reboot boots again as `run` does.
            Stop::Reboot => {
                let seed = vm::host_seed()?;
                drop(m);
                m = vm.machine(seed, entropy()?)?;
                m.hash_every = opts.hash_every;
            }
            stop => break stop,
        }
    };
    drop(live_io);
    print_final(&mut console, &m);
    match stop {
        Stop::Quit if console.signalled() => bail!("stopped by a signal"),
        Stop::PowerOff | Stop::Quit => Ok(Outcome::Success),
        Stop::Reboot => unreachable!("reboots boot again above"),
        Stop::Panic => {
            eprintln!("lockstep: the guest kernel panicked (its message is above)");
            Ok(Outcome::GuestFailure)
        }
        Stop::Limit => bail!("instruction limit of {} reached", opts.max_insns.unwrap_or(0)),
    }
}

fn requeue(
    msg: Incoming,
    pending: &mut VecDeque<Record>,
    queue: &Rc<RefCell<VecDeque<Vec<u8>>>>,
    through: &mut u64,
    lost: &mut Option<String>,
) {
    match msg {
        Incoming::Records(records) => {
            for r in records {
                match r.event {
                    Event::Entropy(bytes) => queue.borrow_mut().push_back(bytes),
                    _ => pending.push_back(r),
                }
            }
        }
        Incoming::Through(p) => *through = (*through).max(p),
        Incoming::Lost(why) => *lost = Some(why),
    }
}
