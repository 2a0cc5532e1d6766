//! One machine: what a Linux VM is made of ([`LinuxVm`]), its description
//! ([`spec`]: flags and `vm.toml`), running it live ([`live`]) and
//! recording it ([`record`]).

pub mod changes;
pub mod live;
pub mod record;
pub mod replica;
pub mod spec;

use crate::host::log::report;
use crate::Outcome;
use anyhow::{bail, Context, Result};
use machine::virtio::rng::EntropySource;
use machine::{Machine, Stop};
use replay::EndReason;
use serde::{Deserialize, Serialize};
use spec::VmSpec;
use std::path::{Path, PathBuf};

/// Guest RAM when the description gives none.
pub const DEFAULT_MEM: u64 = 512 << 20;

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

impl LinuxVm {
    /// The Linux VM a description gives: `kernel`, or the default guest
    /// (built on first use) when neither a kernel nor an ELF is given;
    /// `None` for a bare-metal ELF.
    pub fn from_spec(spec: &VmSpec) -> Result<Option<LinuxVm>> {
        let mem = spec.mem.unwrap_or(DEFAULT_MEM);
        let read_only = spec.disk_readonly.unwrap_or(false);
        let disk = spec.disk.as_ref().map(|p| (p.clone(), read_only));
        let net = match &spec.net {
            None if spec.mac.is_some() => bail!("--mac needs a network card: add --net tap:NAME"),
            None => None,
            Some(net) => {
                let Some(name) = net.strip_prefix("tap:") else {
                    bail!("--net '{net}': the network backend must be tap:NAME");
                };
                let mac = match &spec.mac {
                    Some(m) => machine::virtio::net::parse_mac(m).map_err(|e| anyhow::anyhow!("--mac {e}"))?,
                    None => machine::virtio::net::mac_for(name),
                };
                Some((name.to_string(), mac))
            }
        };
        if let Some(kernel) = &spec.kernel {
            let append = spec.append.as_deref().unwrap_or("console=ttyS0").to_string();
            return Ok(Some(LinuxVm { kernel: kernel.clone(), initrd: spec.initrd.clone(), append, mem, disk, net }));
        }
        if spec.elf.is_some() {
            return Ok(None);
        }
        // No kernel: the default guest, built on first use; it boots from its
        // root disk unless the description gives another disk.
        let g = crate::guest::build(false)?;
        let mut append = spec.append.clone().unwrap_or_else(|| crate::guest::DEFAULT_APPEND.to_string());
        let disk = match disk {
            Some(d) => Some(d),
            None => {
                // The disk image is locked while it runs (FileBackend::open), so
                // a second default run is refused, not a corrupted disk.
                append.push_str(" root=/dev/vda");
                Some((g.disk.clone(), read_only))
            }
        };
        let initrd = spec.initrd.clone().unwrap_or(g.initrd);
        Ok(Some(LinuxVm { kernel: g.kernel, initrd: Some(initrd), append, mem, disk, net }))
    }

    /// A machine with this VM's devices, not yet booted; its disk reports
    /// each operation to `disk_watch` (a pair's liveness checks).
    pub fn machine(
        &self,
        seed: [u8; 32],
        entropy: Box<dyn EntropySource>,
        disk_watch: Option<&ft::DiskWatch>,
    ) -> Result<Machine> {
        let mut m = Machine::new_firmware(self.mem);
        m.rng_seed = Some(seed);
        if let Some((path, read_only)) = &self.disk {
            let mut backend: Box<dyn machine::virtio::blk::BlockBackend> =
                Box::new(machine::virtio::blk::FileBackend::open(path, *read_only)?);
            if !*read_only {
                match changes::tracker(path) {
                    Some(tracker) => backend = Box::new(changes::TrackedDisk { inner: backend, tracker }),
                    None => changes::untracked_writer(path)?,
                }
            }
            backend = crate::host::failpoint::FaultyDisk::wrap(backend);
            if let Some(watch) = disk_watch {
                backend = Box::new(WatchedDisk { inner: backend, watch: watch.clone() });
            }
            let blk = machine::virtio::blk::Block::new(backend, *read_only, "lockstep-disk0");
            m.add_virtio(Box::new(blk))?;
        }
        if let Some((_, mac)) = &self.net {
            let nic = machine::virtio::net::Net::with_offloads(*mac);
            m.add_virtio(Box::new(nic))?;
        }
        m.add_virtio(Box::new(machine::virtio::rng::Rng::new(entropy)))?;
        m.boot_linux(&self.kernel, self.initrd.as_deref(), &self.append)?;
        Ok(m)
    }

    /// What makes two descriptions the same VM: the kernel's and initrd's
    /// contents, the command line, memory, and which devices exist (not
    /// paths, tap names or MACs: each side of a pair has its own replica
    /// and tap).
    pub fn identity(&self) -> Result<String> {
        let text = format!(
            "{}|{}|{}|{}|{}|{}",
            file_hash(&self.kernel)?,
            self.initrd.as_deref().map(file_hash).transpose()?.unwrap_or_default(),
            self.append,
            self.mem,
            self.disk.as_ref().map_or("nodisk", |(_, ro)| if *ro { "ro" } else { "rw" }),
            self.net.is_some(),
        );
        Ok(format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes())))
    }

    /// xxh3 of the disk replica's contents, if there is a disk.
    pub fn disk_hash(&self) -> Result<Option<String>> {
        self.disk.as_ref().map(|(p, _)| file_hash(p)).transpose()
    }
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

/// How the log records the way a run stopped.
pub fn end_reason(stop: Stop) -> EndReason {
    match stop {
        Stop::PowerOff => EndReason::PowerOff,
        Stop::Reboot => EndReason::Reboot,
        Stop::Panic => EndReason::Panic,
        Stop::Quit => EndReason::Quit,
        Stop::Limit => EndReason::Limit,
    }
}

/// The closing lines every Linux run prints: where it ended and its state.
pub fn print_final(m: &mut Machine) {
    report(&format!("position {}", m.hart.position().0));
    report(&format!("state-hash {:016x}", m.state_hash()));
    if let Some(j) = m.hart.jit_stats() {
        let ran = (j.positions + j.interp_positions).max(1);
        report(&format!(
            "engine jit: {} blocks translated ({} ops, {} of them through the interpreter), {} KiB of code, \
             {:.1} us per block; {:.1} % of the instructions ran in translated code",
            j.blocks,
            j.ops,
            j.fallback_ops,
            j.code_bytes / 1024,
            j.translate_ns as f64 / 1e3 / j.blocks.max(1) as f64,
            100.0 * j.positions as f64 / ran as f64
        ));
    }
}

/// What a guest's last stop (not a reboot) means for the process.
pub fn outcome_of(stop: Stop, signalled: bool, max_insns: Option<u64>) -> Result<Outcome> {
    match stop {
        Stop::Quit if signalled => bail!("stopped by a signal"),
        Stop::PowerOff | Stop::Quit => Ok(Outcome::Success),
        Stop::Panic => {
            tracing::error!("the guest kernel panicked (its message is above)");
            Ok(Outcome::GuestFailure)
        }
        Stop::Limit => bail!("instruction limit of {} reached", max_insns.unwrap_or(0)),
        Stop::Reboot => unreachable!("a reboot boots the guest again; it is not the end of a run"),
    }
}

/// A disk whose every operation is marked as under way on a watch while it
/// runs (the outermost layer: the change tracker's own flushes count).
struct WatchedDisk {
    inner: Box<dyn machine::virtio::blk::BlockBackend>,
    watch: ft::DiskWatch,
}

impl machine::virtio::blk::BlockBackend for WatchedDisk {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.watch.during(|| self.inner.read_at(buf, offset))
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.watch.during(|| self.inner.write_at(buf, offset))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.watch.during(|| self.inner.flush())
    }
    fn discard(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.watch.during(|| self.inner.discard(offset, len))
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.watch.during(|| self.inner.write_zeroes(offset, len))
    }
}
