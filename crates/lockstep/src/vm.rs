//! Running a Linux guest live, recording it, and replaying a recording.
//!
//! A recording is an event log (crate `replay`) whose header carries the VM
//! description as JSON ([`LinuxVm`] plus hashes of the kernel, initrd and
//! the disk's contents at the start). Replay rebuilds the same machine from
//! it and feeds the logged inputs back at their positions: no console, no
//! network device, no host clock. The guest writes its disk during replay
//! as it did while recording, so replay needs the disk as it was when the
//! recording started: record on a copy, or keep one.

use anyhow::{bail, Context, Result};
use machine::virtio::rng::EntropySource;
use machine::{HostInput, HostIo, Machine, RunTo, Stop};
use replay::{EndReason, Event, LogReader, LogWriter, Record};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

/// What a Linux guest is made of: enough to build the same machine again.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LinuxVm {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub append: String,
    pub mem: u64,
    /// Image file and whether it is read-only.
    pub disk: Option<(PathBuf, bool)>,
    /// Tap name and MAC address of the network card.
    pub net: Option<(String, [u8; 6])>,
}

/// The header of a recording.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    vm: LinuxVm,
    kernel_hash: String,
    initrd_hash: Option<String>,
    /// The disk's contents when the recording started.
    disk_hash: Option<String>,
}

/// Options of a run.
#[derive(Clone, Debug, Default)]
pub struct RunOpts {
    pub max_insns: Option<u64>,
    pub record: Option<PathBuf>,
    pub hash_every: Option<u64>,
    /// Snapshot every this many positions into `LOG.snapshots/`.
    pub snapshot_every: Option<u64>,
}

/// Where the snapshots of a recording go.
pub fn snapshot_dir(log: &Path) -> PathBuf {
    let mut name = log.file_name().unwrap_or_default().to_os_string();
    name.push(".snapshots");
    log.with_file_name(name)
}

/// What a finished run means for the process.
pub enum Outcome {
    Success,
    GuestFailure,
}

/// xxh3 of a file's contents, in hex.
pub fn file_hash(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot read '{}'", path.display()))?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("cannot read '{}'", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:016x}", h.digest()))
}

impl LinuxVm {
    /// A machine with this VM's devices, not yet booted.
    pub(crate) fn machine(&self, seed: [u8; 32], entropy: Box<dyn EntropySource>) -> Result<Machine> {
        let mut m = Machine::new_firmware(self.mem);
        m.rng_seed = Some(seed);
        if let Some((path, read_only)) = &self.disk {
            let backend = machine::virtio::blk::FileBackend::open(path, *read_only)?;
            let blk = machine::virtio::blk::Block::new(Box::new(backend), *read_only, "lockstep-disk0");
            m.add_virtio(Box::new(blk)).map_err(anyhow::Error::msg)?;
        }
        if let Some((_, mac)) = &self.net {
            let nic = machine::virtio::net::Net::with_offloads(*mac);
            m.add_virtio(Box::new(nic)).map_err(anyhow::Error::msg)?;
        }
        m.add_virtio(Box::new(machine::virtio::rng::Rng::new(entropy))).map_err(anyhow::Error::msg)?;
        m.boot_linux(&self.kernel, self.initrd.as_deref(), &self.append)?;
        Ok(m)
    }
}

/// The host's random source behind virtio-rng.
pub(crate) struct HostEntropy(std::fs::File);

impl HostEntropy {
    pub(crate) fn open() -> Result<HostEntropy> {
        Ok(HostEntropy(std::fs::File::open("/dev/urandom").context("cannot open /dev/urandom for virtio-rng")?))
    }
}

impl EntropySource for HostEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        use std::io::Read;
        // /dev/urandom does not fail once open; if it ever did, the guest
        // would get zeros rather than the run stopping.
        if self.0.read_exact(buf).is_err() {
            buf.fill(0);
        }
    }
}

/// 32 bytes from the host's random source, for the guest's rng-seed.
pub(crate) fn host_seed() -> Result<[u8; 32]> {
    use std::io::Read;
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .context("cannot read /dev/urandom for the guest's rng-seed")?;
    Ok(seed)
}

/// What the run loop hands the log-writer thread.
enum LogMsg {
    Record(Record),
    /// Flush, then answer.
    Sync(std::sync::mpsc::SyncSender<()>),
}

/// The log being written, shared by the host side and the entropy source.
/// Encoding, checksums and writes happen on a thread of their own, so the
/// guest does not wait for the disk; the thread flushes whenever it has
/// nothing queued, so a killed recorder leaves a log that replays up to its
/// last whole record.
struct Recorder {
    tx: std::sync::mpsc::SyncSender<LogMsg>,
    path: PathBuf,
    /// Position of the last record (entropy is stamped with it).
    position: u64,
    error: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

/// Records queued for the writer thread before the run loop waits.
const LOG_QUEUE: usize = 4096;

impl Recorder {
    fn start(mut log: LogWriter<BufWriter<std::fs::File>>, path: PathBuf) -> Recorder {
        let (tx, rx) = std::sync::mpsc::sync_channel::<LogMsg>(LOG_QUEUE);
        let error = std::sync::Arc::new(std::sync::Mutex::new(None));
        let err = error.clone();
        std::thread::spawn(move || {
            let mut failed = false;
            let handle = |msg: LogMsg, log: &mut LogWriter<BufWriter<std::fs::File>>, failed: &mut bool| {
                let result = match msg {
                    LogMsg::Record(r) if !*failed => log.append(&r),
                    LogMsg::Record(_) => Ok(()),
                    LogMsg::Sync(ack) => {
                        let r = if *failed { Ok(()) } else { log.flush() };
                        let _ = ack.send(());
                        r
                    }
                };
                if let Err(e) = result {
                    *failed = true;
                    *err.lock().unwrap() = Some(e.to_string());
                }
            };
            while let Ok(msg) = rx.recv() {
                handle(msg, &mut log, &mut failed);
                while let Ok(msg) = rx.try_recv() {
                    handle(msg, &mut log, &mut failed);
                }
                if !failed {
                    if let Err(e) = log.flush() {
                        failed = true;
                        *err.lock().unwrap() = Some(e.to_string());
                    }
                }
            }
        });
        Recorder { tx, path, position: 0, error }
    }

    fn append(&mut self, position: u64, event: Event) {
        self.position = position;
        // A send fails only if the writer thread is gone; its error is kept.
        let _ = self.tx.send(LogMsg::Record(Record { position, event }));
    }

    /// The writer's first error, if any.
    fn check(&self) -> Result<()> {
        match self.error.lock().unwrap().as_ref() {
            Some(e) => bail!("cannot write the event log '{}': {e}", self.path.display()),
            None => Ok(()),
        }
    }

    /// Wait until everything appended so far is in the file.
    fn flush(&mut self) -> Result<()> {
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        if self.tx.send(LogMsg::Sync(ack)).is_ok() {
            let _ = done.recv();
        }
        self.check()
    }
}

type SharedRecorder = Rc<RefCell<Recorder>>;

struct RecordingEntropy {
    inner: HostEntropy,
    rec: SharedRecorder,
}

impl EntropySource for RecordingEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        self.inner.fill(buf);
        let mut r = self.rec.borrow_mut();
        let pos = r.position;
        r.append(pos, Event::Entropy(buf.to_vec()));
    }
}

/// The live host side, optionally recording what reaches the guest.
pub(crate) struct LiveIo<'a> {
    pub(crate) console: &'a mut crate::console::StdioConsole,
    rec: Option<SharedRecorder>,
    pub(crate) print_hashes: bool,
    snapshot_dir: Option<PathBuf>,
    /// Where the run loop is, for a status endpoint.
    pub(crate) position: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

impl<'a> LiveIo<'a> {
    /// A live host side that records nothing.
    pub(crate) fn plain(console: &'a mut crate::console::StdioConsole) -> LiveIo<'a> {
        LiveIo { console, rec: None, print_hashes: false, snapshot_dir: None, position: None }
    }
}

impl HostIo for LiveIo<'_> {
    fn console_write(&mut self, bytes: &[u8]) {
        self.console.console_write(bytes);
    }
    fn wait(&mut self, timeout: Duration) -> HostInput {
        // A log that cannot be written (disk full) stops the run: going on
        // would leave a recording that does not replay.
        if self.rec.as_ref().is_some_and(|r| r.borrow().check().is_err()) {
            return HostInput::Quit;
        }
        self.console.wait(timeout)
    }
    fn send_frame(&mut self, nic: usize, frame: &[u8]) {
        self.console.send_frame(nic, frame);
    }
    fn progress(&mut self, pos: u64) {
        if let Some(p) = &self.position {
            p.store(pos, std::sync::atomic::Ordering::Relaxed);
        }
    }
    fn host_log(&mut self, line: &str) {
        self.console.host_log(line);
    }
    fn delivered(&mut self, pos: u64, input: &HostInput) {
        let Some(r) = &self.rec else { return };
        let event = match input {
            HostInput::Console(b) => Event::Console(b.clone()),
            HostInput::Frame { nic, data } => Event::Frame { nic: *nic as u8, data: data.clone() },
            HostInput::Nothing | HostInput::Quit => return,
        };
        r.borrow_mut().append(pos, event);
    }
    fn skipped(&mut self, pos: u64, steps: u64) {
        if let Some(r) = &self.rec {
            r.borrow_mut().append(pos, Event::Skip(steps));
        }
    }
    fn snapshot_taken(&mut self, snap: machine::snapshot::Snapshot) -> Option<u64> {
        let (Some(dir), Some(r)) = (&self.snapshot_dir, &self.rec) else { return None };
        let t = std::time::Instant::now();
        match snap.write_in(dir) {
            Ok((id, path)) => {
                r.borrow_mut().append(snap.position, Event::Snapshot(id));
                let kind = if snap.parent.is_some() { "delta" } else { "full" };
                let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                let ms = t.elapsed().as_secs_f64() * 1e3;
                self.console.host_note(&format!(
                    "snapshot {} {kind} {bytes} bytes {ms:.0} ms {}",
                    snap.position,
                    path.display()
                ));
                Some(id)
            }
            Err(e) => {
                self.console.host_log(&e.to_string());
                None
            }
        }
    }
    fn state_hash(&mut self, pos: u64, hash: u64) {
        if let Some(r) = &self.rec {
            r.borrow_mut().append(pos, Event::Hash(hash));
        }
        if self.print_hashes {
            self.console.host_note(&format!("hash {pos} {hash:016x}"));
        }
    }
}

pub(crate) fn end_reason(stop: Stop) -> EndReason {
    match stop {
        Stop::PowerOff => EndReason::PowerOff,
        Stop::Reboot => EndReason::Reboot,
        Stop::Panic => EndReason::Panic,
        Stop::Quit => EndReason::Quit,
        Stop::Limit => EndReason::Limit,
    }
}

/// The closing lines both modes print: where the run ended and its state.
pub(crate) fn print_final(console: &mut crate::console::StdioConsole, m: &Machine) {
    console.host_note(&format!("position {}", m.hart.position().0));
    console.host_note(&format!("state-hash {:016x}", m.state_hash()));
}

/// Run a Linux guest on the host's console (and tap), recording it if asked.
pub fn run_live(vm: &LinuxVm, opts: &RunOpts) -> Result<Outcome> {
    let rec = match &opts.record {
        None => None,
        Some(path) => {
            // Absolute paths, so the log replays from any directory.
            let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
            let mut recorded = vm.clone();
            recorded.kernel = abs(&recorded.kernel);
            recorded.initrd = recorded.initrd.as_deref().map(abs);
            if let Some((p, _)) = &mut recorded.disk {
                *p = abs(p);
            }
            let meta = Meta {
                vm: recorded,
                kernel_hash: file_hash(&vm.kernel)?,
                initrd_hash: vm.initrd.as_deref().map(file_hash).transpose()?,
                disk_hash: vm.disk.as_ref().map(|(p, _)| file_hash(p)).transpose()?,
            };
            let file = std::fs::File::create(path)
                .with_context(|| format!("cannot create the event log '{}'", path.display()))?;
            let log = LogWriter::new(BufWriter::new(file), &serde_json::to_vec(&meta)?)
                .with_context(|| format!("cannot write the event log '{}'", path.display()))?;
            Some(Rc::new(RefCell::new(Recorder::start(log, path.clone()))))
        }
    };
    let snap_dir = match (&opts.snapshot_every, &opts.record) {
        (Some(_), Some(log)) => {
            let d = snapshot_dir(log);
            std::fs::create_dir_all(&d).with_context(|| format!("cannot create '{}'", d.display()))?;
            Some(d)
        }
        (Some(_), None) => bail!("--snapshot-every needs --record (snapshots go beside the log)"),
        _ => None,
    };
    let mut console = crate::console::StdioConsole::new();
    // The tap stays open across guest reboots.
    if let Some((name, _)) = &vm.net {
        // Offloads on both sides: the card offers them, the tap accepts them.
        let tap = tap::Tap::open(name, true)?;
        console.add_tap(tap).with_context(|| format!("cannot read tap '{name}'"))?;
    }
    loop {
        let seed = host_seed()?;
        let entropy: Box<dyn EntropySource> = match &rec {
            Some(r) => {
                r.borrow_mut().append(0, Event::Seed(seed));
                Box::new(RecordingEntropy { inner: HostEntropy::open()?, rec: r.clone() })
            }
            None => Box::new(HostEntropy::open()?),
        };
        let mut m = vm.machine(seed, entropy)?;
        m.hash_every = opts.hash_every;
        m.snapshot_every = opts.snapshot_every;
        let mut io = LiveIo {
            console: &mut console,
            rec: rec.clone(),
            print_hashes: opts.hash_every.is_some(),
            snapshot_dir: snap_dir.clone(),
            position: None,
        };
        let stop = m.run_linux(&mut io, opts.max_insns)?;
        if let Some(r) = &rec {
            let mut r = r.borrow_mut();
            r.append(m.hart.position().0, Event::End(end_reason(stop)));
            r.flush()?;
        }
        if stop != Stop::Reboot {
            print_final(&mut console, &m);
        }
        match stop {
            Stop::Quit if console.signalled() => bail!("stopped by a signal"),
            Stop::PowerOff | Stop::Quit => return Ok(Outcome::Success),
            Stop::Reboot => continue,
            Stop::Panic => {
                eprintln!("lockstep: the guest kernel panicked (its message is above)");
                return Ok(Outcome::GuestFailure);
            }
            Stop::Limit => bail!("instruction limit of {} reached", opts.max_insns.unwrap_or(0)),
        }
    }
}

/// Entropy from the log, in the order it was drawn.
struct ReplayEntropy(Rc<RefCell<VecDeque<Vec<u8>>>>, Rc<RefCell<Option<String>>>);

impl EntropySource for ReplayEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        match self.0.borrow_mut().pop_front() {
            Some(bytes) if bytes.len() == buf.len() => buf.copy_from_slice(&bytes),
            other => {
                buf.fill(0);
                let got = other.map_or("none".to_string(), |b| format!("{} bytes", b.len()));
                self.1
                    .borrow_mut()
                    .get_or_insert(format!("the guest drew {} entropy bytes where the log has {got}", buf.len()));
            }
        }
    }
}

/// Replay's host side (a recording's, or a secondary's): console output to
/// stdout, no input; network frames are not delivered but counted, and,
/// given the guest's MAC, read for the guest's own addresses (what a
/// secondary announces when it goes live).
pub(crate) struct ReplayIo<'a> {
    pub(crate) console: &'a mut crate::console::StdioConsole,
    frames_out: u64,
    print_hashes: bool,
    mac: Option<[u8; 6]>,
    pub(crate) addresses: Vec<std::net::IpAddr>,
}

impl<'a> ReplayIo<'a> {
    pub(crate) fn new(
        console: &'a mut crate::console::StdioConsole,
        print_hashes: bool,
        mac: Option<[u8; 6]>,
    ) -> ReplayIo<'a> {
        ReplayIo { console, frames_out: 0, print_hashes, mac, addresses: Vec::new() }
    }
}

impl HostIo for ReplayIo<'_> {
    fn console_write(&mut self, bytes: &[u8]) {
        self.console.console_write(bytes);
    }
    fn wait(&mut self, _: Duration) -> HostInput {
        HostInput::Nothing
    }
    fn send_frame(&mut self, _: usize, frame: &[u8]) {
        self.frames_out += 1;
        if let Some(ip) = self.mac.and_then(|mac| crate::announce::source_address(frame, &mac)) {
            if !self.addresses.contains(&ip) {
                self.addresses.push(ip);
            }
        }
    }
    fn host_log(&mut self, line: &str) {
        self.console.host_log(line);
    }
    fn state_hash(&mut self, pos: u64, hash: u64) {
        if self.print_hashes {
            self.console.host_note(&format!("hash {pos} {hash:016x}"));
        }
    }
}

/// Overrides for a replay.
#[derive(Default)]
pub struct ReplayOpts {
    /// Use this disk image instead of the recorded path.
    pub disk: Option<PathBuf>,
    pub hash_every: Option<u64>,
    /// Start from this snapshot (and the log after its marker).
    pub from: Option<PathBuf>,
}

/// Replay a recording. Stops with an error at the first divergence.
pub fn replay(log_path: &Path, opts: &ReplayOpts) -> Result<Outcome> {
    let file =
        std::fs::File::open(log_path).with_context(|| format!("cannot open the event log '{}'", log_path.display()))?;
    let where_ = |e: replay::LogError| anyhow::anyhow!("'{}': {e}", log_path.display());
    let (mut reader, meta) = LogReader::new(BufReader::new(file)).map_err(where_)?;
    let meta: Meta = serde_json::from_slice(&meta)
        .map_err(|e| anyhow::anyhow!("'{}': the header's VM description is unreadable: {e}", log_path.display()))?;
    let mut vm = meta.vm.clone();
    if file_hash(&vm.kernel)? != meta.kernel_hash {
        bail!("kernel '{}' is not the one this log was recorded with", vm.kernel.display());
    }
    if let (Some(p), Some(h)) = (&vm.initrd, &meta.initrd_hash) {
        if &file_hash(p)? != h {
            bail!("initrd '{}' is not the one this log was recorded with", p.display());
        }
    }
    if let Some(d) = &opts.disk {
        match &mut vm.disk {
            Some((p, _)) => *p = d.clone(),
            None => bail!("--disk: this recording had no disk"),
        }
    }
    if let (Some((p, _)), Some(h)) = (&vm.disk, &meta.disk_hash) {
        if &file_hash(p)? != h {
            bail!(
                "disk '{}' does not hold what it held when the recording started: replay needs a copy \
                 taken before recording (--disk COPY)",
                p.display()
            );
        }
    }
    // Replay has no network: the card stays, its input comes from the log.
    let mut console = crate::console::StdioConsole::new();
    let entropy = Rc::new(RefCell::new(VecDeque::new()));
    let entropy_error = Rc::new(RefCell::new(None::<String>));
    let mut pending: Option<Record> = None;
    // The next record that is not entropy (entropy goes to the queue).
    let mut next = |reader: &mut LogReader<BufReader<std::fs::File>>| -> Result<Option<Record>> {
        if let Some(r) = pending.take() {
            return Ok(Some(r));
        }
        loop {
            match reader.next_record().map_err(where_)? {
                Some(Record { event: Event::Entropy(b), .. }) => entropy.borrow_mut().push_back(b),
                other => return Ok(other),
            }
        }
    };
    let seed = match next(&mut reader)? {
        Some(Record { event: Event::Seed(s), .. }) => s,
        _ => bail!("'{}': the log does not start with a boot record", log_path.display()),
    };
    let mut m = vm.machine(seed, Box::new(ReplayEntropy(entropy.clone(), entropy_error.clone())))?;
    if let Some(from) = &opts.from {
        let chain = machine::snapshot::Snapshot::read_chain(from)?;
        let id = chain.last().map(|(_, id)| *id).unwrap_or(0);
        m.restore(&chain)?;
        // Skip the log up to this snapshot's marker.
        loop {
            match next(&mut reader)? {
                Some(Record { event: Event::Snapshot(i), .. }) if i == id => break,
                Some(_) => {}
                None => bail!("'{}' has no marker of snapshot '{}'", log_path.display(), from.display()),
            }
        }
        entropy.borrow_mut().clear();
        console.host_note(&format!("replay: starting from the snapshot at position {}", m.hart.position().0));
    }
    m.hash_every = opts.hash_every;
    let mut io = ReplayIo::new(&mut console, opts.hash_every.is_some(), None);
    let mut last_good = 0u64;
    let outcome = loop {
        let Some(rec) = next(&mut reader)? else {
            let end = match reader.truncated_at {
                Some(off) => format!("the log is truncated at byte {off} (the recorder stopped there)"),
                None => "the log ends without an end record".to_string(),
            };
            drop(io);
            let pos = m.hart.position().0;
            console.host_note(&format!("replay stopped at position {pos}: {end}"));
            print_final(&mut console, &m);
            bail!("{end}; replayed up to position {pos}");
        };
        let target = rec.position;
        // Run to the record's position, hashing on the way if asked.
        let r = run_to_hashing(&mut m, &mut io, target)?;
        if let Some(e) = entropy_error.borrow().as_ref() {
            bail!("replay diverged between positions {last_good} and {}: {e}", m.hart.position().0);
        }
        let pos = m.hart.position().0;
        match r {
            RunTo::Reached => {}
            RunTo::Idle => bail!(
                "replay diverged between positions {last_good} and {pos}: the guest idles at {pos} but the log's \
                 next event is at {target}"
            ),
            RunTo::Stopped(stop) => match rec.event {
                Event::End(reason) if reason == end_reason(stop) && pos == target => {}
                _ => bail!(
                    "replay diverged between positions {last_good} and {pos}: the guest stopped ({stop:?}) where \
                     the log continues"
                ),
            },
        }
        let Some(event) = apply_input(&mut m, &mut io, rec.event) else { continue };
        match event {
            Event::Console(_) | Event::Frame { .. } | Event::Skip(_) => {}
            Event::Hash(h) => {
                let mine = m.state_hash();
                if mine != h {
                    bail!(
                        "replay diverged between positions {last_good} and {target}: state hash {mine:016x}, \
                         recorded {h:016x}"
                    );
                }
                last_good = target;
            }
            Event::Entropy(_) => unreachable!("entropy records are queued by `next`"),
            Event::Snapshot(_) => {}
            Event::Seed(_) => bail!("'{}': a boot record in the middle of a run", log_path.display()),
            Event::End(reason) => {
                if reason == EndReason::Reboot {
                    let Some(Record { event: Event::Seed(seed), .. }) = next(&mut reader)? else {
                        bail!("'{}': a reboot without a boot record after it", log_path.display());
                    };
                    m = vm.machine(seed, Box::new(ReplayEntropy(entropy.clone(), entropy_error.clone())))?;
                    m.hash_every = opts.hash_every;
                    last_good = 0;
                    continue;
                }
                break match reason {
                    EndReason::Panic => Outcome::GuestFailure,
                    _ => Outcome::Success,
                };
            }
        }
    };
    let frames = io.frames_out;
    drop(io);
    if frames > 0 {
        console.host_note(&format!("replay: the guest sent {frames} network frames (not delivered)"));
    }
    print_final(&mut console, &m);
    Ok(outcome)
}

/// Apply a logged input (console bytes, a frame, a time skip, hashed on
/// arrival at a hash point as a live run does); other events go back to the
/// caller.
pub(crate) fn apply_input(m: &mut Machine, io: &mut dyn HostIo, event: Event) -> Option<Event> {
    match event {
        Event::Console(b) => {
            m.inject(HostInput::Console(b));
        }
        Event::Frame { nic, data } => {
            m.inject(HostInput::Frame { nic: nic as usize, data });
        }
        Event::Skip(n) => {
            m.skip(n);
            let pos = m.hart.position().0;
            if m.hash_every.is_some_and(|every| pos.is_multiple_of(every)) {
                let h = m.state_hash();
                io.state_hash(pos, h);
            }
        }
        other => return Some(other),
    }
    None
}

/// `Machine::run_to`, stopping at each multiple of `hash_every` to report
/// the state hash as a live run does.
pub(crate) fn run_to_hashing(m: &mut Machine, io: &mut dyn HostIo, target: u64) -> Result<RunTo> {
    loop {
        let pos = m.hart.position().0;
        let bound = match m.hash_every {
            Some(n) => target.min((pos / n + 1) * n),
            None => target,
        };
        let r = m.run_to(io, bound)?;
        let before = pos;
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

impl crate::console::StdioConsole {
    /// A line of lockstep's own on stderr (kept apart from guest output).
    pub fn host_note(&mut self, line: &str) {
        let _ = std::io::stdout().flush();
        let end = if self.is_raw() { "\r\n" } else { "\n" };
        eprint!("{line}{end}");
    }
}
