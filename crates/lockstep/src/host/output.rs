//! The guest's console output on stdout, written by a thread of its own
//! behind a bounded queue: a stdout that blocks (a full pipe, a stopped
//! terminal) never blocks the run loop or the output gate. When the queue
//! is full, bytes are dropped, counted and reported; they are the
//! console's copy, never the guest's state.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Chunks queued for stdout before bytes are dropped.
const QUEUE: usize = 8192;
/// How long a flush waits for stdout.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

enum Out {
    Bytes(Vec<u8>),
    Flush(SyncSender<()>),
}

struct Writer {
    tx: SyncSender<Out>,
    dropped: AtomicU64,
    warned: AtomicBool,
}

static WRITER: OnceLock<Writer> = OnceLock::new();

fn writer() -> &'static Writer {
    WRITER.get_or_init(|| {
        let (tx, rx) = sync_channel::<Out>(QUEUE);
        std::thread::Builder::new().name("output".into()).spawn(move || write_loop(rx)).expect("cannot start a thread");
        Writer { tx, dropped: AtomicU64::new(0), warned: AtomicBool::new(false) }
    })
}

fn write_loop(rx: Receiver<Out>) {
    let mut out = std::io::stdout();
    while let Ok(msg) = rx.recv() {
        match msg {
            Out::Bytes(b) => {
                let _ = out.write_all(&b);
                let _ = out.flush();
            }
            Out::Flush(done) => {
                let _ = out.flush();
                let _ = done.send(());
            }
        }
    }
}

/// Queue guest console bytes for stdout; never waits.
pub fn write(bytes: &[u8]) {
    let w = writer();
    if w.tx.try_send(Out::Bytes(bytes.to_vec())).is_err() {
        w.dropped.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if !w.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!("stdout does not keep up with the guest's console: dropping console output");
        }
    }
}

/// Wait, a bounded time, until everything queued is on stdout.
pub fn flush() {
    let Some(w) = WRITER.get() else { return };
    let (done, wait) = sync_channel(1);
    let mut msg = Out::Flush(done);
    let t = Instant::now();
    loop {
        match w.tx.try_send(msg) {
            Ok(()) => break,
            Err(TrySendError::Full(m)) if t.elapsed() < FLUSH_WAIT => {
                msg = m;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(_) => return,
        }
    }
    let _ = wait.recv_timeout(FLUSH_WAIT);
}

/// Console bytes dropped so far.
pub fn dropped() -> u64 {
    WRITER.get().map_or(0, |w| w.dropped.load(Ordering::Relaxed))
}

/// The console as a sink of the output gate: the primary's console output
/// waits for the secondary's acknowledgement like its frames do.
pub struct GatedConsole;

impl ft::gate::FrameSink for GatedConsole {
    fn send(&mut self, bytes: &[u8]) {
        write(bytes);
    }
}
