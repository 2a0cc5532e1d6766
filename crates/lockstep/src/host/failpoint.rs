//! Failpoints: named places where a test can make this process die at an
//! exact moment that no outside signal could hit reliably (the
//! `LOCKSTEP_FAILPOINT` environment variable names one). Unset, a
//! failpoint costs one comparison.

use std::sync::OnceLock;

fn armed() -> Option<&'static str> {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED.get_or_init(|| std::env::var("LOCKSTEP_FAILPOINT").ok()).as_deref()
}

/// Die here as SIGKILL would (no cleanup, no last words) if the
/// environment names this failpoint.
pub fn kill_if(name: &str) {
    if armed() == Some(name) {
        tracing::warn!("failpoint {name}: killing this process");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Whether the environment names this failpoint and the file named by
/// `LOCKSTEP_FAILPOINT_FILE` exists now.
pub fn file_armed(name: &str) -> bool {
    armed() == Some(name)
        && std::env::var_os("LOCKSTEP_FAILPOINT_FILE").is_some_and(|f| std::path::Path::new(&f).exists())
}

/// A disk backend that fails every write with ENOSPC while the failpoint
/// `disk-full` is armed and its file exists (a replica on a full disk).
pub struct FillableDisk(pub Box<dyn machine::virtio::blk::BlockBackend>);

impl machine::virtio::blk::BlockBackend for FillableDisk {
    fn size_bytes(&self) -> u64 {
        self.0.size_bytes()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if file_armed("disk-full") {
            return Err(std::io::Error::from_raw_os_error(nix::libc::ENOSPC));
        }
        self.0.write_at(buf, offset)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Whether the environment names failpoint `name` at all.
pub fn named(name: &str) -> bool {
    armed() == Some(name)
}

/// Hang here (as a blocked write or a hung disk would) while the file
/// named by `LOCKSTEP_FAILPOINT_FILE` exists, if the environment names
/// this failpoint.
pub fn stall_while_file(name: &str) {
    if armed() != Some(name) {
        return;
    }
    let Some(file) = std::env::var_os("LOCKSTEP_FAILPOINT_FILE") else { return };
    let mut told = false;
    while std::path::Path::new(&file).exists() {
        if !told {
            told = true;
            tracing::warn!("failpoint {name}: stalling while {} exists", file.to_string_lossy());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
