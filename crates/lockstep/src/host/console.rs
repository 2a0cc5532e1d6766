//! The host side of a running guest: the console on the host's stdio
//! (output to stdout, input from stdin read by a thread) and the network
//! cards' tap devices (each read by a thread). All input arrives on one
//! channel, so the run loop waits for console and network at once. When
//! stdin is a terminal it is put in raw mode, restored on every exit path
//! (drop, panic hook, and SIGTERM/SIGHUP/SIGINT, which end the run cleanly),
//! and `Ctrl-A x` quits, as in QEMU.

use machine::{HostInput, HostIo};
use nix::sys::termios::{self, SetArg, Termios};
use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Set once SIGTERM, SIGHUP or SIGINT arrives. The handlers are installed
/// at the first call, which a VM's command makes as it starts (before the
/// slow parts of start-up), so a signal that comes before its console is
/// open is remembered and stops it there, not lost to the default action.
pub fn stop_signal() -> Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP, signal_hook::consts::SIGINT] {
            // Registration fails only for forbidden signals; these are not.
            let _ = signal_hook::flag::register(sig, flag.clone());
        }
        flag
    })
    .clone()
}

const CTRL_A: u8 = 0x01;

/// The terminal settings to restore, shared with the panic hook.
static SAVED: Mutex<Option<Termios>> = Mutex::new(None);

/// Whether this process put the terminal in raw mode (and has not yet
/// restored it): lines on stderr then need "\r\n".
pub fn terminal_is_raw() -> bool {
    SAVED.lock().is_ok_and(|s| s.is_some())
}

fn restore_terminal() {
    if let Ok(mut saved) = SAVED.lock() {
        if let Some(t) = saved.take() {
            let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, &t);
        }
    }
}

enum Msg {
    Bytes(Vec<u8>),
    Eof,
    Frame(usize, Vec<u8>),
}

/// Input messages buffered between the reader threads and the run loop;
/// a tap reader blocks when it is full (and the host's tap queue drops).
const CHANNEL_DEPTH: usize = 1024;

pub struct StdioConsole {
    rx: Receiver<Msg>,
    tx: SyncSender<Msg>,
    /// Write ends of the network cards' taps, by card number.
    taps: Vec<tap::Tap>,
    /// Their reader threads, and what wakes each to stop.
    tap_readers: Vec<(UnixStream, std::thread::JoinHandle<()>)>,
    /// Frames the host would not take (tap down or gone), reported once.
    tap_errors: Vec<bool>,
    /// Ctrl-A was the last byte typed.
    escape: bool,
    raw: bool,
    /// Set by SIGTERM, SIGHUP or SIGINT.
    signalled: Arc<AtomicBool>,
}

impl StdioConsole {
    /// Take over the terminal (raw mode when stdin is one) and start reading it.
    pub fn open() -> StdioConsole {
        let stdin = std::io::stdin();
        let raw = stdin.is_terminal();
        if raw {
            if let Ok(orig) = termios::tcgetattr(&stdin) {
                let mut t = orig.clone();
                termios::cfmakeraw(&mut t);
                if termios::tcsetattr(&stdin, SetArg::TCSANOW, &t).is_ok() {
                    *SAVED.lock().unwrap() = Some(orig);
                    let prev = std::panic::take_hook();
                    std::panic::set_hook(Box::new(move |info| {
                        restore_terminal();
                        prev(info);
                    }));
                }
            }
        }
        let (tx, rx) = mpsc::sync_channel(CHANNEL_DEPTH);
        let stdin_tx = tx.clone();
        std::thread::spawn(move || {
            let tx = stdin_tx;
            let mut buf = [0u8; 256];
            let mut stdin = std::io::stdin().lock();
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(Msg::Eof);
                        return;
                    }
                    Ok(n) => {
                        if tx.send(Msg::Bytes(buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let signalled = stop_signal();
        StdioConsole {
            rx,
            tx,
            taps: Vec::new(),
            tap_readers: Vec::new(),
            tap_errors: Vec::new(),
            escape: false,
            raw,
            signalled,
        }
    }

    /// Attach the next network card to `tap`: a thread reads its frames.
    pub fn add_tap(&mut self, tap: tap::Tap) -> std::io::Result<()> {
        self.add_tap_after(tap, Vec::new())
    }

    /// [`Self::add_tap`], the card receiving `earlier` (frames that reached
    /// this host for the guest before anything read the tap) first.
    pub fn add_tap_after(&mut self, tap: tap::Tap, earlier: Vec<Vec<u8>>) -> std::io::Result<()> {
        let nic = self.taps.len();
        let mut reader = tap.try_clone()?;
        let tx = self.tx.clone();
        let (wake, wait) = UnixStream::pair()?;
        let thread = std::thread::Builder::new().name(format!("tap{nic}-in")).spawn(move || {
            // The guest's input: the primary logs it and waits for nothing,
            // but a request's answer waits for it.
            ft::urgent::run_urgently();
            for frame in earlier {
                if tx.send(Msg::Frame(nic, frame)).is_err() {
                    return;
                }
            }
            let mut buf = vec![0u8; tap::MAX_PACKET];
            loop {
                match reader.recv_until(&mut buf, wait.as_fd(), None) {
                    Ok(tap::Received::Frame(n)) => {
                        if tx.send(Msg::Frame(nic, buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                    // Told to stop: what is queued stays for the next reader.
                    Ok(_) => return,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    // The tap went away: the card sees no more input.
                    Err(_) => return,
                }
            }
        })?;
        self.taps.push(tap);
        self.tap_readers.push((wake, thread));
        self.tap_errors.push(false);
        Ok(())
    }

    /// Let go of the network cards' taps (a primary that becomes a
    /// secondary): their readers stop and nothing more is sent. Returns the
    /// frames they had read for the first card and the guest had not taken
    /// (others are dropped).
    pub fn detach_taps(&mut self) -> Vec<Vec<u8>> {
        let (mut frames, mut keep) = (Vec::new(), Vec::new());
        let mut sort = |msg: Msg| match msg {
            Msg::Frame(0, frame) => frames.push(frame),
            Msg::Frame(..) => {}
            other => keep.push(other),
        };
        for (mut wake, thread) in self.tap_readers.drain(..) {
            let _ = wake.write_all(&[1]);
            // A reader blocked on a full channel needs room to see it.
            while !thread.is_finished() {
                if let Ok(msg) = self.rx.recv_timeout(Duration::from_millis(1)) {
                    sort(msg);
                }
            }
            let _ = thread.join();
        }
        while let Ok(msg) = self.rx.try_recv() {
            sort(msg);
        }
        self.taps.clear();
        self.tap_errors.clear();
        // Console input stays, in order, for whoever reads it next.
        for msg in keep {
            let _ = self.tx.try_send(msg);
        }
        frames
    }

    /// Something that hands frames to network card `nic` from another
    /// thread, as if its tap had them (a secondary's forwarded frames).
    pub fn frame_sender(&self, nic: usize) -> impl Fn(Vec<u8>) + Send + 'static {
        let tx = self.tx.clone();
        move |frame| {
            // A full queue drops the frame, as a full tap queue would.
            let _ = tx.try_send(Msg::Frame(nic, frame));
        }
    }

    /// Drop input that arrived while nothing was reading it (a secondary's
    /// console before it goes live: that typing was for no guest).
    pub fn discard_pending(&mut self) -> usize {
        let mut n = 0;
        while let Ok(msg) = self.rx.try_recv() {
            if let Msg::Bytes(b) = msg {
                n += b.len();
            }
        }
        n
    }

    /// The flag a signal sets, for waits outside the run loop.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.signalled.clone()
    }

    /// Did a signal end the run?
    pub fn signalled(&self) -> bool {
        self.signalled.load(Ordering::Relaxed)
    }

    /// Strip the Ctrl-A escapes; `None` means quit.
    fn filter(&mut self, bytes: Vec<u8>) -> Option<Vec<u8>> {
        if !self.raw {
            return Some(bytes);
        }
        let mut out = Vec::with_capacity(bytes.len());
        for b in bytes {
            if self.escape {
                self.escape = false;
                match b {
                    b'x' | b'X' => return None,
                    CTRL_A => out.push(CTRL_A),
                    _ => {}
                }
            } else if b == CTRL_A {
                self.escape = true;
            } else {
                out.push(b);
            }
        }
        Some(out)
    }
}

impl Drop for StdioConsole {
    fn drop(&mut self) {
        crate::host::output::flush();
        restore_terminal();
    }
}

impl HostIo for StdioConsole {
    fn console_write(&mut self, bytes: &[u8]) {
        crate::host::output::write(bytes);
    }

    fn send_frame(&mut self, nic: usize, frame: &[u8]) {
        let Some(tap) = self.taps.get_mut(nic) else { return };
        match tap.send(frame) {
            Ok(()) => self.tap_errors[nic] = false,
            // A frame that cannot leave is lost, as on a wire; say so once.
            Err(e) if !self.tap_errors[nic] => {
                self.tap_errors[nic] = true;
                tracing::warn!("tap '{}' did not take a frame: {e}", tap.name());
            }
            Err(_) => {}
        }
    }

    fn wait(&mut self, timeout: Duration) -> HostInput {
        if self.signalled() {
            return HostInput::Quit;
        }
        let msg = if timeout.is_zero() {
            self.rx.try_recv().map_err(|e| match e {
                mpsc::TryRecvError::Empty => RecvTimeoutError::Timeout,
                mpsc::TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
            })
        } else {
            self.rx.recv_timeout(timeout)
        };
        match msg {
            Ok(Msg::Bytes(b)) => match self.filter(b) {
                Some(b) if b.is_empty() => HostInput::Nothing,
                Some(b) => HostInput::Console(b),
                None => HostInput::Quit,
            },
            Ok(Msg::Frame(nic, data)) => HostInput::Frame { nic, data },
            // End of stdin: the guest just gets no more typing.
            Ok(Msg::Eof) | Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => HostInput::Nothing,
        }
    }
}
