//! `lockstep`: the command-line tool.
//!
//! Exit codes (the runner's contract in DESIGN.md): 0 the guest passed or
//! powered off; 1 a guest test failed; 2 usage error, instruction limit, or
//! host error.

#![forbid(unsafe_code)]

mod announce;
mod bench;
mod bench_guest;
mod bench_pair;
mod console;
mod cpio;
mod demo;
mod guest;
mod metrics;
mod netlab;
mod pair;
mod pairlab;
mod vm;
mod vmfile;
mod workload;

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
    /// Run a VM as the primary of a fault-tolerant pair: it boots the guest,
    /// streams its event log to the secondary (`--peer`), and holds every
    /// network frame until the secondary has acknowledged the log up to it.
    Primary(Box<PairArgs>),
    /// Run a VM as the secondary of a pair (`--listen`): it replays the
    /// primary's log on its own disk replica and goes live in its place
    /// when the primary is lost and it wins arbitration.
    Secondary(Box<PairArgs>),
    /// Show each side of a pair: role, epoch, position, lag, log rate,
    /// output hold time, heartbeats, protected or not.
    Status(StatusArgs),
    /// Print guest MIPS for the built-in integer loops (M-mode, and U-mode
    /// under Sv39 paging).
    Bench(bench::BenchArgs),
    /// The main job: a protected pair of the default guest on this machine
    /// (in network namespaces it builds and removes; needs root) with a live
    /// redis client; the primary is killed and the secondary takes over.
    /// `--bare-metal`: the small M-mode/U-mode CPU demo instead.
    Demo(DemoArgs),
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
struct PairArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Primary: the secondary's log channel, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    peer: Option<String>,
    /// Secondary: where to wait for the primary, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,
    /// Who decides which side goes on alone: `file:PATH` (pairs on one
    /// host; default: a file for this VM in the temp directory) or
    /// `etcd:http://HOST:PORT`.
    #[arg(long, value_name = "SPEC")]
    arbiter: Option<String>,
    /// Serve `/metrics` (Prometheus) and `/status` (JSON) on HOST:PORT
    /// (default 127.0.0.1:9540 for the primary, 9541 for the secondary,
    /// skipped with a warning if taken).
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<String>,
    /// Heartbeat interval on the log channel.
    #[arg(long, value_name = "MS")]
    heartbeat_ms: Option<u64>,
    /// Silence after which the peer is lost.
    #[arg(long, value_name = "MS")]
    timeout_ms: Option<u64>,
    /// The primary waits while the secondary's execution lags by more than
    /// this many positions (bounds failover time; 1 position = 1 ns of
    /// guest time).
    #[arg(long, value_name = "N")]
    max_lag: Option<u64>,
}

#[derive(clap::Args)]
struct DemoArgs {
    /// SIGKILL the primary after this many seconds of client traffic.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    kill_after: u64,
    /// Keep the client going this long after the takeover.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    after: u64,
    /// Run the bare-metal CPU demo (Sv39, U-mode loop) instead.
    #[arg(long)]
    bare_metal: bool,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// Status endpoints to ask (the sides' --metrics addresses).
    #[arg(value_name = "HOST:PORT", default_values = ["127.0.0.1:9540", "127.0.0.1:9541"])]
    addrs: Vec<String>,
    /// One JSON object per side, one per line.
    #[arg(long)]
    json: bool,
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

/// The Linux VM the arguments describe: `--kernel`, or the default guest
/// (built on first use) when neither a kernel nor an ELF is given.
fn linux_vm(args: &RunArgs) -> Result<Option<LinuxVm>> {
    let mem = args.mem.unwrap_or(DEFAULT_MEM);
    let devices = args.devices()?;
    if let Some(kernel) = &args.kernel {
        let append = args.append.as_deref().unwrap_or("console=ttyS0");
        return Ok(Some(LinuxVm {
            kernel: kernel.clone(),
            initrd: args.initrd.clone(),
            append: append.to_string(),
            mem,
            disk: devices.disk,
            net: devices.net,
        }));
    }
    if args.elf.is_some() {
        return Ok(None);
    }
    // No kernel: the default guest, built on first use; it boots from its
    // root disk unless --disk gives another disk.
    let g = guest::build(false)?;
    let mut append = args.append.clone().unwrap_or_else(|| guest::DEFAULT_APPEND.to_string());
    let mut disk = devices.disk;
    if disk.is_none() {
        // The disk image is locked while it runs (FileBackend::open), so a
        // second default run is refused, not a corrupted disk.
        disk = Some((g.disk.clone(), args.disk_readonly));
        append.push_str(" root=/dev/vda");
    }
    let initrd = args.initrd.clone().unwrap_or(g.initrd);
    Ok(Some(LinuxVm { kernel: g.kernel, initrd: Some(initrd), append, mem, disk, net: devices.net }))
}

fn run(args: RunArgs) -> Result<Outcome> {
    let args = args.merge_vm_file()?;
    let mem = args.mem.unwrap_or(DEFAULT_MEM);
    let opts = RunOpts {
        max_insns: args.max_insns,
        record: args.record.clone(),
        hash_every: args.hash_every,
        snapshot_every: args.snapshot_every,
    };
    if let Some(vm) = linux_vm(&args)? {
        return vm::run_live(&vm, &opts);
    }
    let Some(elf) = args.elf else { unreachable!("linux_vm covers every run without an ELF") };
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

/// Which side of a pair to run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Primary,
    Secondary,
}

fn pair(args: PairArgs, side: Side) -> Result<Outcome> {
    let vm_path = args.run.vm.clone();
    let file = match &vm_path {
        Some(p) => Some(vmfile::VmFile::load(p)?),
        None => None,
    };
    let run = args.run.merge_vm_file()?;
    if run.elf.is_some() || run.record.is_some() || run.snapshot_every.is_some() {
        bail!(
            "a pair runs a Linux VM and ships its log to the peer: --elf, --record and --snapshot-every do not apply"
        );
    }
    let f = file.unwrap_or_default();
    let (addr, what) = match side {
        Side::Primary => (args.peer.or(f.peer), "the primary needs --peer HOST:PORT (the secondary's --listen)"),
        Side::Secondary => (args.listen.or(f.listen), "the secondary needs --listen HOST:PORT"),
    };
    let addr = addr.context(what)?;
    let defaults = ft::PairConfig::default();
    let cfg = ft::PairConfig {
        heartbeat: std::time::Duration::from_millis(
            args.heartbeat_ms.or(f.heartbeat_ms).unwrap_or(defaults.heartbeat.as_millis() as u64).max(1),
        ),
        timeout: std::time::Duration::from_millis(
            args.timeout_ms.or(f.timeout_ms).unwrap_or(defaults.timeout.as_millis() as u64).max(1),
        ),
        max_lag: args.max_lag.or(f.max_lag).unwrap_or(defaults.max_lag),
        connect_timeout: defaults.connect_timeout,
    };
    if cfg.timeout <= cfg.heartbeat {
        bail!("--timeout-ms must be longer than --heartbeat-ms");
    }
    let mut metrics = args.metrics.or(f.metrics);
    if metrics.is_none() {
        let default = if side == Side::Primary { "127.0.0.1:9540" } else { "127.0.0.1:9541" };
        match std::net::TcpListener::bind(default) {
            Ok(_) => metrics = Some(default.to_string()),
            Err(e) => eprintln!("lockstep: warning: no status endpoint ({default}: {e}); use --metrics HOST:PORT"),
        }
    }
    let opts = pair::PairOpts {
        addr,
        arbiter: args.arbiter.or(f.arbiter),
        cfg,
        metrics,
        hash_every: run.hash_every,
        max_insns: run.max_insns,
    };
    let vm = linux_vm(&run)?.context("a pair needs a Linux VM")?;
    match side {
        Side::Primary => pair::run_primary(&vm, &opts),
        Side::Secondary => pair::run_secondary(&vm, &opts),
    }
}

fn status(args: StatusArgs) -> Result<Outcome> {
    let mut answered = 0;
    for addr in &args.addrs {
        match metrics::fetch(addr) {
            Ok(s) if args.json => {
                let mut v = serde_json::to_value(&s)?;
                v["endpoint"] = serde_json::Value::String(addr.clone());
                println!("{v}");
                answered += 1;
            }
            Ok(s) => {
                println!("{}", metrics::describe(addr, &s));
                answered += 1;
            }
            Err(e) => eprintln!("lockstep: {e:#}"),
        }
    }
    if answered == 0 {
        bail!("no side of a pair answered (asked {})", args.addrs.join(", "));
    }
    Ok(Outcome::Success)
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
        Command::Primary(a) => pair(*a, Side::Primary),
        Command::Secondary(a) => pair(*a, Side::Secondary),
        Command::Status(a) => status(a),
        Command::Bench(a) => bench::run(a).map(|_| Outcome::Success),
        Command::Demo(a) if a.bare_metal => demo(),
        Command::Demo(a) => {
            demo::run(&demo::DemoOpts { kill_after: a.kill_after, after: a.after }).map(|_| Outcome::Success)
        }
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
