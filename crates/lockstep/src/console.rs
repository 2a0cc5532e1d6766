//! The guest console on the host's stdio: output to stdout, input from
//! stdin read by a thread. When stdin is a terminal it is put in raw mode,
//! restored on every exit path (drop, panic hook, and SIGTERM/SIGHUP/SIGINT,
//! which end the run cleanly), and `Ctrl-A x` quits, as in QEMU.

use machine::{Console, ConsoleInput};
use nix::sys::termios::{self, SetArg, Termios};
use std::io::{IsTerminal, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CTRL_A: u8 = 0x01;

/// The terminal settings to restore, shared with the panic hook.
static SAVED: Mutex<Option<Termios>> = Mutex::new(None);

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
}

pub struct StdioConsole {
    rx: Receiver<Msg>,
    eof: bool,
    /// Ctrl-A was the last byte typed.
    escape: bool,
    raw: bool,
    /// Set by SIGTERM, SIGHUP or SIGINT.
    signalled: Arc<AtomicBool>,
}

impl StdioConsole {
    pub fn new() -> StdioConsole {
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
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
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
        let signalled = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP, signal_hook::consts::SIGINT] {
            // Registration fails only for forbidden signals; these are not.
            let _ = signal_hook::flag::register(sig, signalled.clone());
        }
        StdioConsole { rx, eof: false, escape: false, raw, signalled }
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
        let _ = std::io::stdout().flush();
        restore_terminal();
    }
}

impl Console for StdioConsole {
    fn write(&mut self, bytes: &[u8]) {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(bytes);
        let _ = out.flush();
    }

    fn host_log(&mut self, line: &str) {
        // In raw mode the terminal does not turn \n into \r\n.
        let end = if self.raw { "\r\n" } else { "\n" };
        eprint!("lockstep: {line}{end}");
    }

    fn read(&mut self, timeout: Duration) -> ConsoleInput {
        if self.signalled() {
            return ConsoleInput::Quit;
        }
        if self.eof {
            std::thread::sleep(timeout);
            return ConsoleInput::Nothing;
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
                Some(b) if b.is_empty() => ConsoleInput::Nothing,
                Some(b) => ConsoleInput::Bytes(b),
                None => ConsoleInput::Quit,
            },
            Ok(Msg::Eof) | Err(RecvTimeoutError::Disconnected) => {
                self.eof = true;
                ConsoleInput::Nothing
            }
            Err(RecvTimeoutError::Timeout) => ConsoleInput::Nothing,
        }
    }
}
