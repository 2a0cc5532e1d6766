//! Recording: every non-deterministic input that reaches the guest, with
//! its position, into an event log (crate `replay`). [`InputLog`] turns
//! what the run loop reports into records for any [`LogSink`]: the
//! [`Recorder`]'s file here, or the primary's link to its secondary.
//!
//! A recording's header carries the VM description as JSON ([`Meta`]:
//! [`LinuxVm`] plus hashes of the kernel, initrd and the disk's contents
//! at the start), so `replay` can rebuild the same machine.

use super::{file_hash, LinuxVm};
use crate::host::entropy::Draws;
use anyhow::{bail, Context, Result};
use machine::HostInput;
use replay::{Event, LogWriter, Record};
use serde::{Deserialize, Serialize};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};

/// The header of a recording.
#[derive(Debug, Serialize, Deserialize)]
pub struct Meta {
    pub vm: LinuxVm,
    pub kernel_hash: String,
    pub initrd_hash: Option<String>,
    /// The disk's contents when the recording started.
    pub disk_hash: Option<String>,
}

impl Meta {
    /// The header for a recording of `vm`, with absolute paths so that the
    /// log replays from any directory.
    pub fn of(vm: &LinuxVm) -> Result<Meta> {
        Meta::with_disk_hash(vm, vm.disk_hash()?)
    }

    /// As [`Meta::of`], with the disk's hash already known.
    pub fn with_disk_hash(vm: &LinuxVm, disk_hash: Option<String>) -> Result<Meta> {
        let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let mut recorded = vm.clone();
        recorded.kernel = abs(&recorded.kernel);
        recorded.initrd = recorded.initrd.as_deref().map(abs);
        if let Some((p, _)) = &mut recorded.disk {
            *p = abs(p);
        }
        Ok(Meta {
            vm: recorded,
            kernel_hash: file_hash(&vm.kernel)?,
            initrd_hash: vm.initrd.as_deref().map(file_hash).transpose()?,
            disk_hash,
        })
    }
}

/// Where the snapshots of a recording go.
pub fn snapshot_dir(log: &Path) -> PathBuf {
    let mut name = log.file_name().unwrap_or_default().to_os_string();
    name.push(".snapshots");
    log.with_file_name(name)
}

/// Where records go.
pub trait LogSink {
    fn append(&mut self, record: Record);
}

/// The inputs of a run, as records for a sink: console bytes and frames
/// where they took effect, time skips, state hashes, and the entropy the
/// guest drew (stamped with the position of the record before it).
pub struct InputLog<S> {
    pub sink: S,
    draws: Draws,
    /// Position of the last record.
    last: u64,
}

impl<S: LogSink> InputLog<S> {
    pub fn new(sink: S) -> InputLog<S> {
        InputLog::with_draws(sink, Draws::default())
    }

    /// A log that takes the draws of a source made before it.
    pub fn with_draws(sink: S, draws: Draws) -> InputLog<S> {
        InputLog { sink, draws, last: 0 }
    }

    /// Where the guest's entropy draws are kept until they are logged
    /// (give it to [`crate::host::entropy::HostEntropy::logged`]).
    pub fn draws(&self) -> &Draws {
        &self.draws
    }

    /// Log the entropy drawn so far: before any other record, and before a
    /// mark that says "everything before P is sent".
    pub fn take_draws(&mut self) {
        for bytes in self.draws.take() {
            self.sink.append(Record { position: self.last, event: Event::Entropy(bytes) });
        }
    }

    pub fn record(&mut self, position: u64, event: Event) {
        self.take_draws();
        self.last = position;
        self.sink.append(Record { position, event });
    }

    /// An input took effect (`HostIo::delivered`).
    pub fn delivered(&mut self, position: u64, input: &HostInput) {
        let event = match input {
            HostInput::Console(b) => Event::Console(b.clone()),
            HostInput::Frame { nic, data } => Event::Frame { nic: *nic as u8, data: data.clone() },
            HostInput::Nothing | HostInput::Quit => return,
        };
        self.record(position, event);
    }
}

/// What the run loop hands the log-writer thread.
enum LogMsg {
    Record(Record),
    /// Flush, then answer.
    Sync(SyncSender<()>),
}

/// An event log being written to a file. Encoding, checksums and writes
/// happen on a thread of their own, so the guest does not wait for the
/// disk; the thread flushes whenever it has nothing queued, so a killed
/// recorder leaves a log that replays up to its last whole record.
pub struct Recorder {
    tx: SyncSender<LogMsg>,
    path: PathBuf,
    error: Arc<Mutex<Option<String>>>,
}

/// Records queued for the writer thread before the run loop waits.
const LOG_QUEUE: usize = 4096;

impl Recorder {
    /// Create the log at `path` with `meta` as its header.
    pub fn create(path: &Path, meta: &Meta) -> Result<Recorder> {
        let file =
            std::fs::File::create(path).with_context(|| format!("cannot create the event log '{}'", path.display()))?;
        let log = LogWriter::new(BufWriter::new(file), &serde_json::to_vec(meta)?)
            .with_context(|| format!("cannot write the event log '{}'", path.display()))?;
        Ok(Recorder::start(log, path.to_path_buf()))
    }

    fn start(mut log: LogWriter<BufWriter<std::fs::File>>, path: PathBuf) -> Recorder {
        let (tx, rx) = sync_channel::<LogMsg>(LOG_QUEUE);
        let error = Arc::new(Mutex::new(None));
        let err = error.clone();
        std::thread::spawn(move || {
            let mut failed = false;
            let fail = |e: std::io::Error, failed: &mut bool| {
                *failed = true;
                *err.lock().unwrap() = Some(e.to_string());
            };
            while let Ok(first) = rx.recv() {
                for msg in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                    let result = match msg {
                        LogMsg::Record(r) if !failed => log.append(&r),
                        LogMsg::Record(_) => Ok(()),
                        LogMsg::Sync(ack) => {
                            let r = if failed { Ok(()) } else { log.flush() };
                            let _ = ack.send(());
                            r
                        }
                    };
                    if let Err(e) = result {
                        fail(e, &mut failed);
                    }
                }
                if !failed {
                    if let Err(e) = log.flush() {
                        fail(e, &mut failed);
                    }
                }
            }
        });
        Recorder { tx, path, error }
    }

    /// The writer's first error, if any.
    pub fn check(&self) -> Result<()> {
        match self.error.lock().unwrap().as_ref() {
            Some(e) => bail!("cannot write the event log '{}': {e}", self.path.display()),
            None => Ok(()),
        }
    }

    /// Wait until everything appended so far is in the file.
    pub fn flush(&mut self) -> Result<()> {
        let (ack, done) = sync_channel(1);
        if self.tx.send(LogMsg::Sync(ack)).is_ok() {
            let _ = done.recv();
        }
        self.check()
    }
}

impl LogSink for Recorder {
    fn append(&mut self, record: Record) {
        // A send fails only if the writer thread is gone; its error is kept.
        let _ = self.tx.send(LogMsg::Record(record));
    }
}
