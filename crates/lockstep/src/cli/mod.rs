//! The commands: what each subcommand takes and which room does the work.

mod pair;
mod run;

use crate::vm::spec::{PairSpec, VmSpec};
use crate::Outcome;
use anyhow::{anyhow, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "lockstep", version, about = "Fault-tolerant virtual machines by instruction-level lockstep")]
pub struct Cli {
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
    /// Swap the roles of a protected pair with nothing lost: the primary
    /// stops its guest once the secondary holds everything up to there,
    /// the secondary goes on as the primary, and the old primary becomes
    /// its secondary. Exits 0 once the new pair is protected.
    Switchover(SwitchoverArgs),
    /// Move a running VM (protected or alone) to a secondary listening at
    /// --to: its present secondary, if any, is let go; the one at --to
    /// joins (the VM's state goes over while it runs) and a switchover
    /// makes it the primary; this side then stops (or, with --keep, stays
    /// as its secondary). Exits 0 once the VM runs there.
    Migrate(MigrateArgs),
    /// Print guest MIPS for the built-in integer loops (M-mode, and U-mode
    /// under Sv39 paging).
    Bench(crate::bench::BenchArgs),
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
    /// Keys that authenticate a pair's log channel (`--key`).
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Write a new random key to FILE (mode 0600; an existing file is
    /// never overwritten). Give the same file to both sides with `--key`.
    New {
        #[arg(value_name = "FILE")]
        file: PathBuf,
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

/// `run`: a VM description file and flags that override it.
#[derive(clap::Args)]
struct RunArgs {
    /// A VM description: its keys are these flags' long names; flags given
    /// here override it.
    #[arg(value_name = "VM.TOML")]
    file: Option<PathBuf>,
    #[command(flatten)]
    vm: VmSpec,
}

/// `primary` / `secondary`: `run`'s settings and the pair's.
#[derive(clap::Args)]
struct PairArgs {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    pair: PairSpec,
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
struct SwitchoverArgs {
    /// The primary's status endpoint (its --metrics address).
    #[arg(value_name = "HOST:PORT", default_value = "127.0.0.1:9540")]
    addr: String,
    /// Give up (exit 1) if the new pair is not protected within this long.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    timeout: u64,
}

#[derive(clap::Args)]
struct MigrateArgs {
    /// The target: a `lockstep secondary` listening there (its --listen).
    #[arg(long, value_name = "HOST:PORT")]
    to: String,
    /// The primary's status endpoint (its --metrics address).
    #[arg(value_name = "HOST:PORT", default_value = "127.0.0.1:9540")]
    addr: String,
    /// Keep this side as the secondary of the VM at its new place.
    #[arg(long)]
    keep: bool,
    /// Give up (exit 1) if the VM does not run there within this long.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    timeout: u64,
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
    /// How the CPU runs (`interp` or `jit`, default `jit` on x86-64); a
    /// recording replays exactly with either, whichever recorded it.
    #[arg(long, value_name = "interp|jit")]
    engine: Option<rv::Engine>,
    /// Start from a snapshot taken while recording (`--snapshot-every`)
    /// and the log after it. The disk must still be the copy from the
    /// start of the recording: the snapshots carry what was written since.
    #[arg(long, value_name = "SNAPSHOT")]
    from: Option<PathBuf>,
}

impl RunArgs {
    /// The VM description: the file's settings under the command line's.
    fn resolve(self, pair: PairSpec) -> Result<(VmSpec, PairSpec)> {
        let Some(path) = &self.file else { return Ok((self.vm, pair)) };
        let file = crate::vm::spec::VmFile::load(path)?;
        let vm = crate::vm::spec::overlay(self.vm, file.vm)?;
        let pair = crate::vm::spec::overlay(pair, file.pair)?;
        if vm.elf.is_some() && (vm.kernel.is_some() || vm.initrd.is_some()) {
            anyhow::bail!("'{}': give either elf or kernel/initrd, not both", path.display());
        }
        Ok((vm, pair))
    }
}

/// Carry out the command line.
pub fn execute(cli: Cli) -> Result<Outcome> {
    match cli.command {
        Command::Run(a) => run::run(*a),
        Command::Replay(a) => {
            machine::set_engine(a.engine.unwrap_or_else(machine::default_engine));
            crate::replayer::file::replay(
                &a.log,
                &crate::replayer::file::ReplayOpts { disk: a.disk, hash_every: a.hash_every, from: a.from },
            )
        }
        Command::Primary(a) => pair::side(*a, pair::Side::Primary),
        Command::Secondary(a) => pair::side(*a, pair::Side::Secondary),
        Command::Status(a) => pair::status(a),
        Command::Switchover(a) => pair::switchover(&a.addr, std::time::Duration::from_secs(a.timeout)),
        Command::Migrate(a) => pair::migrate(&a.addr, &a.to, a.keep, std::time::Duration::from_secs(a.timeout)),
        Command::Bench(a) => crate::bench::run(a).map(|_| Outcome::Success),
        Command::Demo(a) if a.bare_metal => run::bare_metal_demo(),
        Command::Demo(a) => crate::demo::run(&crate::demo::DemoOpts { kill_after: a.kill_after, after: a.after })
            .map(|_| Outcome::Success),
        Command::Guest { command: GuestCommand::Build { force } } => crate::guest::build(force).map(|g| {
            println!("{}\n{}\n{}", g.kernel.display(), g.initrd.display(), g.disk.display());
            Outcome::Success
        }),
        Command::Key { command: KeyCommand::New { file } } => {
            ft::auth::Key::generate()?.write_new(&file)?;
            println!("{}", file.display());
            Ok(Outcome::Success)
        }
        Command::Guest { command: GuestCommand::Path } => {
            let g = crate::guest::existing()?
                .ok_or_else(|| anyhow!("the default guest is not built: run `lockstep guest build`"))?;
            println!("{}\n{}\n{}", g.kernel.display(), g.initrd.display(), g.disk.display());
            Ok(Outcome::Success)
        }
    }
}
