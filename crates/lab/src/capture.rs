//! A child process whose stdout and stderr are read by threads as they
//! arrive: together (in arrival order) and each alone.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes shared with a reader thread.
pub type Buffer = Arc<Mutex<Vec<u8>>>;

/// A running child with a piped stdin and captured output; killed on drop.
pub struct Captured {
    pub child: Child,
    stdin: ChildStdin,
    /// stdout and stderr as they arrived.
    pub all: Buffer,
    pub stdout: Buffer,
    pub stderr: Buffer,
}

impl Captured {
    pub fn spawn(cmd: &mut Command) -> Result<Captured> {
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let all = Buffer::default();
        let (stdout, stderr) = (Buffer::default(), Buffer::default());
        for (mut pipe, alone) in [
            (Box::new(child.stdout.take().context("stdout")?) as Box<dyn Read + Send>, stdout.clone()),
            (Box::new(child.stderr.take().context("stderr")?), stderr.clone()),
        ] {
            let all = all.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    all.lock().unwrap().extend_from_slice(&buf[..n]);
                    alone.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
        Ok(Captured { child, stdin, all, stdout, stderr })
    }

    /// Everything printed so far, stdout and stderr as they arrived.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.all.lock().unwrap()).into_owned()
    }

    /// How many bytes have arrived.
    pub fn len(&self) -> usize {
        self.all.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wait up to `timeout` for `needle` to appear after byte `from`;
    /// returns where it ends. Fails early if the child exits.
    pub fn wait_for(&mut self, needle: &str, from: usize, timeout: Duration) -> Result<usize> {
        let t = Instant::now();
        loop {
            {
                let out = self.all.lock().unwrap();
                let tail = &out[from.min(out.len())..];
                if let Some(i) = tail.windows(needle.len()).position(|w| w == needle.as_bytes()) {
                    return Ok(from + i + needle.len());
                }
            }
            if t.elapsed() > timeout {
                bail!("timed out waiting for {needle:?}; output so far:\n{}", self.text());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                // What it printed last may still be in the pipe.
                std::thread::sleep(Duration::from_millis(100));
                if !self.text()[from.min(self.len())..].contains(needle) {
                    bail!("the process exited ({st}) before {needle:?}; output:\n{}", self.text());
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Type a line on its stdin.
    pub fn send(&mut self, line: &str) -> Result<()> {
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        Ok(())
    }

    /// Wait up to `timeout` for it to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            if t.elapsed() > timeout {
                let _ = self.child.kill();
                bail!("the process did not exit; output:\n{}", self.text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Captured {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
