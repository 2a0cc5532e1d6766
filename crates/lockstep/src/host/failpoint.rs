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

/// A disk backend under the disk failpoints, while armed and their file
/// exists: `disk-full` fails every write with ENOSPC (a replica on a full
/// disk); `disk-slow-flush` makes every flush [`SLOW_FLUSH`] longer (a
/// replica on a disk busy with other writes: an fsync waits for them all).
pub struct FaultyDisk {
    inner: Box<dyn machine::virtio::blk::BlockBackend>,
    slow_flushes: u64,
}

/// How much longer a flush takes under `disk-slow-flush`: longer than the
/// default stall timeout plus the silence timeout (1.25 s).
pub const SLOW_FLUSH: std::time::Duration = std::time::Duration::from_millis(2000);

impl FaultyDisk {
    /// `inner` under the disk failpoint the environment names, if any.
    pub fn wrap(inner: Box<dyn machine::virtio::blk::BlockBackend>) -> Box<dyn machine::virtio::blk::BlockBackend> {
        if named("disk-full") || named("disk-slow-flush") {
            Box::new(FaultyDisk { inner, slow_flushes: 0 })
        } else {
            inner
        }
    }

    fn full() -> std::io::Result<()> {
        match file_armed("disk-full") {
            true => Err(std::io::Error::from_raw_os_error(nix::libc::ENOSPC)),
            false => Ok(()),
        }
    }
}

impl machine::virtio::blk::BlockBackend for FaultyDisk {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        FaultyDisk::full()?;
        self.inner.write_at(buf, offset)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if file_armed("disk-slow-flush") {
            self.slow_flushes += 1;
            let n = self.slow_flushes;
            tracing::warn!("failpoint disk-slow-flush: flush {n} takes {} ms longer", SLOW_FLUSH.as_millis());
            std::thread::sleep(SLOW_FLUSH);
        }
        self.inner.flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        FaultyDisk::full()?;
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        FaultyDisk::full()?;
        self.inner.write_zeroes(offset, len)
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
