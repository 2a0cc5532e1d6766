//! `lockstep`: the command-line tool.
//!
//! Exit codes (the runner's contract in DESIGN.md): 0 the guest passed or
//! powered off; 1 a guest test failed; 2 usage error, instruction limit, or
//! host error.

#![forbid(unsafe_code)]

mod bench;
mod bench_guest;
mod console;
mod cpio;
mod guest;
mod vm;
mod vmfile;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use machine::layout::RAM_BASE;
use machine::{loader, BareOutcome, Machine};
use std::path::PathBuf;
use std::process::ExitCode;
use vm::{LinuxVm, Outcome, RunOpts};

#[derive(Parser)]
#[command(name = "lockstep", version, about = "Fault-tolerant virtual machines by instruction-level lockstep")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a guest: a Linux kernel (`--kernel`) or a bare-metal ELF (`--elf`).
    Run(Box<RunArgs>),
    /// Replay a recording made with `run --record`: the same machine, the
    /// same inputs at the same positions, no console or network needed. The
    /// guest writes its disk again: give a copy of the disk as it was when
    /// the recording started.
    Replay(ReplayArgs),
    /// Print guest MIPS for the built-in integer loops (M-mode, and U-mode
    /// under Sv39 paging).
    Bench(bench::BenchArgs),
    /// Run the built-in demo: M-mode firmware maps a page table, drops to
    /// U-mode, runs a loop, and returns with ecall.
    Demo,
    /// The default guest (Debian trixie riscv64 kernel, busybox initramfs,
    /// ext4 root disk with redis-server and an HTTP server).
    Guest {
        #[command(subcommand)]
        command: GuestCommand,
    },
}

#[derive(Subcommand)]
enum GuestCommand {
    /// Fetch the packages and build the guest (reused if already built).
    Build {
        /// Build again even if a guest exists.
        #[arg(long)]
        force: bool,
    },
    /// Print the paths of the built guest.
    Path,
}

#[derive(clap::Args)]
struct RunArgs {
    /// A VM description: its keys are these flags' long names; flags given
    /// here override it.
    #[arg(value_name = "VM.TOML")]
    vm: Option<PathBuf>,
    /// Bare-metal ELF: hart 0 starts in M-mode at its entry; the run ends
    /// when the program writes its `tohost` symbol.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kernel", "initrd", "append"])]
    elf: Option<PathBuf>,
    /// Linux kernel: a flat RISC-V `Image` (as Debian ships it) or an ELF.
    #[arg(long, value_name = "IMAGE")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Kernel command line (default: `console=ttyS0`, and for the default
    /// guest `console=ttyS0 quiet`).
    #[arg(long, value_name = "ARGS")]
    append: Option<String>,
    /// Stop with an error after this many instructions.
    #[arg(long, value_name = "N")]
    max_insns: Option<u64>,
    /// Raw disk image, the guest's /dev/vda (virtio-blk).
    #[arg(long, value_name = "FILE")]
    disk: Option<PathBuf>,
    /// Attach the disk read-only.
    #[arg(long)]
    disk_readonly: bool,
    /// Guest RAM size, e.g. 512M or 1G (default 512M).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    mem: Option<u64>,
    /// Network card (virtio-net) on a host tap device, created if missing:
    /// `tap:NAME`.
    #[arg(long, value_name = "tap:NAME")]
    net: Option<String>,
    /// The network card's MAC address (default: derived from the tap name,
    /// stable across runs).
    #[arg(long, value_name = "MAC")]
    mac: Option<String>,
    /// Record the run's non-deterministic inputs to this event log (replay
    /// it with `lockstep replay LOG`).
    #[arg(long, value_name = "LOG", conflicts_with = "elf")]
    record: Option<PathBuf>,
    /// Print the machine's state hash every N positions (and record it in
    /// the log, where replay checks it).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), conflicts_with = "elf")]
    hash_every: Option<u64>,
    /// With --record: snapshot the machine every N positions into
    /// `LOG.snapshots/` (full, then dirty-page deltas); replay can start
    /// from any of them (`replay --from`).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), conflicts_with = "elf")]
    snapshot_every: Option<u64>,
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// The event log.
    #[arg(value_name = "LOG")]
    log: PathBuf,
    /// Disk image to use instead of the recorded path (a copy of the disk
    /// as it was when the recording started).
    #[arg(long, value_name = "FILE")]
    disk: Option<PathBuf>,
    /// Print the machine's state hash every N positions.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    hash_every: Option<u64>,
    /// Start from a snapshot taken while recording (`--snapshot-every`)
    /// and the log after it. The disk must still be the copy from the
    /// start of the recording: the snapshots carry what was written since.
    #[arg(long, value_name = "SNAPSHOT")]
    from: Option<PathBuf>,
}

/// The devices of a Linux guest besides console and entropy.
struct Devices {
    /// Image file and whether it is read-only.
    disk: Option<(PathBuf, bool)>,
    /// Tap name and MAC address.
    net: Option<(String, [u8; 6])>,
}

impl RunArgs {
    fn devices(&self) -> Result<Devices> {
        let disk = self.disk.as_ref().map(|p| (p.clone(), self.disk_readonly));
        let net = match &self.net {
            None => {
                if self.mac.is_some() {
                    bail!("--mac needs a network card: add --net tap:NAME");
                }
                None
            }
            Some(spec) => {
                let Some(name) = spec.strip_prefix("tap:") else {
                    bail!("--net '{spec}': the network backend must be tap:NAME");
                };
                let mac = match &self.mac {
                    Some(m) => machine::virtio::net::parse_mac(m).map_err(|e| anyhow::anyhow!("--mac {e}"))?,
                    None => machine::virtio::net::mac_for(name),
                };
                Some((name.to_string(), mac))
            }
        };
        Ok(Devices { disk, net })
    }
}

const DEFAULT_MEM: u64 = 512 << 20;

impl RunArgs {
    /// Fill what the command line left out from the VM description.
    fn merge_vm_file(mut self) -> Result<RunArgs> {
        let Some(path) = self.vm.take() else { return Ok(self) };
        let vm = vmfile::VmFile::load(&path)?;
        self.kernel = self.kernel.or(vm.kernel);
        self.initrd = self.initrd.or(vm.initrd);
        self.append = self.append.or(vm.append);
        self.elf = self.elf.or(vm.elf);
        self.disk = self.disk.or(vm.disk);
        self.net = self.net.or(vm.net);
        self.mac = self.mac.or(vm.mac);
        self.disk_readonly |= vm.disk_readonly.unwrap_or(false);
        self.max_insns = self.max_insns.or(vm.max_insns);
        self.record = self.record.or(vm.record);
        self.hash_every = self.hash_every.or(vm.hash_every);
        self.snapshot_every = self.snapshot_every.or(vm.snapshot_every);
        if self.mem.is_none() {
            self.mem = match vm.mem {
                Some(vmfile::MemValue::Text(s)) => {
                    Some(parse_size(&s).map_err(|e| anyhow::anyhow!("'{}': mem: {e}", path.display()))?)
                }
                Some(vmfile::MemValue::Bytes(b)) => {
                    Some(parse_size(&b.to_string()).map_err(|e| anyhow::anyhow!("'{}': mem: {e}", path.display()))?)
                }
                None => None,
            };
        }
        if self.elf.is_some() && (self.kernel.is_some() || self.initrd.is_some()) {
            bail!("'{}': give either elf or kernel/initrd, not both", path.display());
        }
        Ok(self)
    }
}

/// Parse a memory size: a number with an optional K, M or G suffix.
fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size (examples: 512M, 1G)"))?;
    let bytes = n.checked_mul(mult).ok_or_else(|| format!("'{s}' is too large"))?;
    if bytes < 1 << 20 || bytes % 4096 != 0 || bytes > 64 << 30 {
        return Err(format!("'{s}': memory must be a multiple of 4K between 1M and 64G"));
    }
    Ok(bytes)
}

fn run(args: RunArgs) -> Result<Outcome> {
    let args = args.merge_vm_file()?;
    let mem = args.mem.unwrap_or(DEFAULT_MEM);
    let devices = args.devices()?;
    let opts = RunOpts {
        max_insns: args.max_insns,
        record: args.record.clone(),
        hash_every: args.hash_every,
        snapshot_every: args.snapshot_every,
    };
    if let Some(kernel) = &args.kernel {
        let append = args.append.as_deref().unwrap_or("console=ttyS0");
        let vm = LinuxVm {
            kernel: kernel.clone(),
            initrd: args.initrd.clone(),
            append: append.to_string(),
            mem,
            disk: devices.disk,
            net: devices.net,
        };
        return vm::run_live(&vm, &opts);
    }
    let Some(elf) = args.elf else {
        // No kernel: the default guest, built on first use; it boots from
        // its root disk unless --disk gives another disk.
        let g = guest::build(false)?;
        let mut append = args.append.clone().unwrap_or_else(|| guest::DEFAULT_APPEND.to_string());
        let mut disk = devices.disk;
        if disk.is_none() {
            // The disk image is locked while it runs (FileBackend::open),
            // so a second default run is refused, not a corrupted disk.
            disk = Some((g.disk.clone(), args.disk_readonly));
            append.push_str(" root=/dev/vda");
        }
        let initrd = args.initrd.clone().unwrap_or(g.initrd);
        let vm = LinuxVm { kernel: g.kernel, initrd: Some(initrd), append, mem, disk, net: devices.net };
        return vm::run_live(&vm, &opts);
    };
    let mut m = Machine::new(mem);
    let loaded = loader::load_elf(&elf, &mut m.board.ram)?;
    let tohost = loaded
        .tohost
        .with_context(|| format!("'{}' has no 'tohost' symbol: the runner cannot tell when it ends", elf.display()))?;
    if !m.board.ram.contains(tohost, 8) {
        bail!("'{}': tohost at {tohost:#x} is outside RAM (starts at {RAM_BASE:#x})", elf.display());
    }
    m.hart.set_pc(loaded.entry);
    let limit = args.max_insns.unwrap_or(u64::MAX);
    match m.run_bare(tohost, limit)? {
        BareOutcome::Pass => Ok(Outcome::Success),
        BareOutcome::Fail(n) => {
            println!("FAIL: test {n}");
            Ok(Outcome::GuestFailure)
        }
        BareOutcome::Limit => bail!(
            "instruction limit of {limit} reached before '{}' wrote tohost (pc {:#x})",
            elf.display(),
            m.hart.pc()
        ),
    }
}

fn demo() -> Result<Outcome> {
    let iters = 10_000_000;
    let p = machine::programs::int_loop_u_sv39(iters);
    let mut m = Machine::new(16 << 20);
    p.load(&mut m.board.ram);
    m.hart.set_pc(p.entry);
    let t = std::time::Instant::now();
    let outcome = m.run_bare(p.tohost, u64::MAX)?;
    let secs = t.elapsed().as_secs_f64();
    if outcome != BareOutcome::Pass {
        bail!("the demo program did not pass: {outcome:?}");
    }
    let pos = m.hart.position().0;
    println!("demo: M-mode firmware set up Sv39 paging and entered U-mode at 0x1000");
    println!("demo: U-mode ran {iters} loop iterations and returned with ecall (mcause {})", m.hart.csrs().mcause);
    println!("demo: a0 = {} (iterations counted by the guest), a2 = {:#x}", m.hart.x(10), m.hart.x(12));
    println!("demo: {pos} instructions in {secs:.3} s = {:.0} guest MIPS", pos as f64 / secs / 1e6);
    Ok(Outcome::Success)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run(*a),
        Command::Replay(a) => {
            vm::replay(&a.log, &vm::ReplayOpts { disk: a.disk, hash_every: a.hash_every, from: a.from })
        }
        Command::Bench(a) => bench::run(a).map(|_| Outcome::Success),
        Command::Demo => demo(),
        Command::Guest { command: GuestCommand::Build { force } } => guest::build(force).map(|g| {
            println!("{}\n{}\n{}", g.kernel.display(), g.initrd.display(), g.disk.display());
            Outcome::Success
        }),
        Command::Guest { command: GuestCommand::Path } => match guest::existing() {
            Ok(Some(g)) => {
                println!("{}\n{}\n{}", g.kernel.display(), g.initrd.display(), g.disk.display());
                Ok(Outcome::Success)
            }
            Ok(None) => Err(anyhow::anyhow!("the default guest is not built: run `lockstep guest build`")),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::GuestFailure) => ExitCode::from(1),
        Err(e) => {
            eprintln!("lockstep: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2097152"), Ok(2 << 20));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("1K").is_err());
        assert!(parse_size("").is_err());
    }
}
