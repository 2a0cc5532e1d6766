//! `lockstep`: the command-line tool.
//!
//! Exit codes (the runner's contract in DESIGN.md): 0 the guest passed or
//! powered off; 1 a guest test failed; 2 usage error, instruction limit, or
//! host error.

#![forbid(unsafe_code)]

mod bench;
mod console;
mod cpio;
mod guest;
mod vmfile;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use machine::layout::RAM_BASE;
use machine::{loader, BareOutcome, Machine, Stop};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "lockstep", version, about = "Fault-tolerant virtual machines by instruction-level lockstep")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a guest: a Linux kernel (`--kernel`) or a bare-metal ELF (`--elf`).
    Run(RunArgs),
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
        self.disk_readonly |= vm.disk_readonly.unwrap_or(false);
        self.max_insns = self.max_insns.or(vm.max_insns);
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

/// What a finished run means for the process.
enum Outcome {
    Success,
    GuestFailure,
}

fn run(args: RunArgs) -> Result<Outcome> {
    let args = args.merge_vm_file()?;
    let mem = args.mem.unwrap_or(DEFAULT_MEM);
    let disk = args.disk.as_ref().map(|p| (p.clone(), args.disk_readonly));
    if let Some(kernel) = &args.kernel {
        let append = args.append.as_deref().unwrap_or("console=ttyS0");
        return run_linux(kernel, args.initrd.as_deref(), append, mem, args.max_insns, &disk);
    }
    let Some(elf) = args.elf else {
        // No kernel: the default guest, built on first use; it boots from
        // its root disk unless --disk gives another disk.
        let g = guest::build(false)?;
        let mut append = args.append.clone().unwrap_or_else(|| guest::DEFAULT_APPEND.to_string());
        let mut disk = disk;
        let _lock = if disk.is_none() {
            disk = Some((g.disk.clone(), args.disk_readonly));
            append.push_str(" root=/dev/vda");
            Some(guest::lock_disk(&g.disk)?)
        } else {
            None
        };
        let initrd = args.initrd.as_deref().unwrap_or(&g.initrd);
        return run_linux(&g.kernel, Some(initrd), &append, mem, args.max_insns, &disk);
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

fn run_linux(
    kernel: &std::path::Path,
    initrd: Option<&std::path::Path>,
    append: &str,
    mem: u64,
    max_insns: Option<u64>,
    disk: &Option<(PathBuf, bool)>,
) -> Result<Outcome> {
    let mut console = console::StdioConsole::new();
    loop {
        let mut m = Machine::new_firmware(mem);
        m.rng_seed = Some(host_entropy()?);
        if let Some((path, read_only)) = disk {
            let backend = machine::virtio::blk::FileBackend::open(path, *read_only)?;
            let blk = machine::virtio::blk::Block::new(Box::new(backend), *read_only, "lockstep-disk0");
            m.add_virtio(Box::new(blk)).map_err(anyhow::Error::msg)?;
        }
        let rng = machine::virtio::rng::Rng::new(Box::new(HostEntropy::open()?));
        m.add_virtio(Box::new(rng)).map_err(anyhow::Error::msg)?;
        m.boot_linux(kernel, initrd, append)?;
        // Workaround, belongs in `Machine::boot_linux`: firmware leaves user
        // access to `time` on (OpenSBI sets scounteren; Linux keeps TM), or
        // every vDSO clock_gettime in the guest dies with SIGILL.
        m.hart.write_csr_m(rv::csr::SCOUNTEREN, 0b10);
        match m.run_linux(&mut console, max_insns)? {
            Stop::Quit if console.signalled() => bail!("stopped by a signal"),
            Stop::PowerOff | Stop::Quit => return Ok(Outcome::Success),
            Stop::Reboot => continue,
            Stop::Panic => {
                eprintln!("lockstep: the guest kernel panicked (its message is above)");
                return Ok(Outcome::GuestFailure);
            }
            Stop::Limit => bail!("instruction limit of {} reached", max_insns.unwrap_or(0)),
        }
    }
}

/// The host's random source behind virtio-rng.
struct HostEntropy(std::fs::File);

impl HostEntropy {
    fn open() -> Result<HostEntropy> {
        Ok(HostEntropy(std::fs::File::open("/dev/urandom").context("cannot open /dev/urandom for virtio-rng")?))
    }
}

impl machine::virtio::rng::EntropySource for HostEntropy {
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
fn host_entropy() -> Result<[u8; 32]> {
    use std::io::Read;
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .context("cannot read /dev/urandom for the guest's rng-seed")?;
    Ok(seed)
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
        Command::Run(a) => run(a),
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
