//! `lockstep bench`: guest MIPS from the exact instruction counter.
//!
//! Each case runs `--reps` times, alternating between cases so that machine
//! noise hits both alike; the median is printed with min and max.

mod guest;
mod migrate;
mod nemesis;
mod pair;
mod protect;
mod reprotect;
mod work;

use anyhow::{bail, Result};
use lab::stats::median;
use machine::programs::{int_loop_m, int_loop_u_sv39, Program};
use machine::{BareOutcome, Machine};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchKind {
    /// Guest MIPS of the built-in integer loops, with each engine.
    Cpu,
    /// A fixed busybox workload (awk, sort, gzip, bzip2, fork+exec,
    /// sha256) in the default guest with each engine and in QEMU TCG, and
    /// under qemu-riscv64 and natively. Needs root (network namespaces).
    Work,
    /// Boot time of the default guest's kernel and initramfs (without its
    /// root disk), side by side with QEMU.
    Boot,
    /// Disk and network figures of the Debian guest (root disk, tap),
    /// side by side with QEMU. Needs root (network namespaces).
    Devices,
    /// Recording overhead, log bandwidth, replay speed, snapshot size and
    /// state-hash time. Needs root (network namespaces).
    Record,
    /// The state hash: first and incremental, on a 512 MiB machine.
    Hash,
    /// The fault-tolerant pair against the same guest alone: CPU-bound and
    /// request/response throughput, added latency, log rate, backup lag,
    /// and failover time over `--kills` SIGKILLs. Needs root.
    Pair,
    /// Continuous protection: `--reps` planned switchovers under a client,
    /// then a killed secondary restarted and joined. Needs root.
    Protect,
    /// Re-protection of the default guest: a join onto a new replica, and
    /// onto a returning secondary's and a returning primary's old replica
    /// (`--fill-mb`: data the guest writes first). Needs root.
    Reprotect,
    /// Random faults against a pair under the client for `--minutes`,
    /// each followed by re-protection and the invariants (`--seed` replays
    /// a run). Needs root.
    Nemesis,
    /// One live migration of the default guest with lockstep (`lockstep
    /// migrate`, disk included) and one with QEMU (TCG, shared disk), on
    /// this machine. Needs root.
    Migrate,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum, default_value_t = BenchKind::Cpu)]
    what: BenchKind,
    /// Guest instructions per run, in millions.
    #[arg(long, default_value_t = 300)]
    minsns: u64,
    /// Runs per case.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// `bench pair`: how many primary kills to time.
    #[arg(long, default_value_t = 10)]
    kills: usize,
    /// `bench pair`: in the throughput runs, give each side a CPU of its
    /// own, as two one-CPU hosts would (the solo VM and the primary CPU 0,
    /// the secondary CPU 1), instead of sharing this machine's CPUs among
    /// all their threads.
    #[arg(long)]
    core_per_side: bool,
    /// `bench pair`: only the engines' solo and FT runs (no pair with
    /// `--key`, none on a mirroring network): more reps in the same time
    /// when the engines' ratios are the question.
    #[arg(long)]
    engines_only: bool,
    /// `bench pair`: boot every engine's solo VM and pair at once and run
    /// each workload on all of them in turns every rep (a rep's ratios and
    /// engine differences then compare measurements seconds apart),
    /// instead of fresh ones per rep; only the engines are measured, as
    /// with `--engines-only`.
    #[arg(long)]
    interleave: bool,
    /// `bench pair` and `bench record`: the engines to compare, side by
    /// side (default: the host's default engine).
    #[arg(long, value_delimiter = ',', value_name = "interp,jit")]
    engines: Vec<rv::Engine>,
    /// `bench nemesis`: how long to go on.
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    /// `bench nemesis`: the seed of the faults (default: from the clock;
    /// printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// `bench reprotect`: MB the guest writes to its disk first.
    #[arg(long, default_value_t = 0)]
    fill_mb: u64,
}

/// Time from start to the ready line and to exit, for one command.
fn time_boot(cmd: &mut std::process::Command) -> Result<(f64, f64)> {
    use std::io::Read;
    let t = Instant::now();
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut out = child.stdout.take().expect("piped stdout");
    let mut seen = Vec::new();
    let mut ready = None;
    let mut buf = [0u8; 4096];
    loop {
        let n = out.read(&mut buf)?;
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        if ready.is_none()
            && seen.windows(crate::guest::READY_LINE.len()).any(|w| w == crate::guest::READY_LINE.as_bytes())
        {
            ready = Some(t.elapsed().as_secs_f64());
        }
    }
    let status = child.wait()?;
    let total = t.elapsed().as_secs_f64();
    match ready {
        Some(r) if status.success() => Ok((r, total)),
        _ => bail!("{cmd:?} did not boot to the ready line and power off ({status})"),
    }
}

fn boot(args: &BenchArgs) -> Result<()> {
    let g = crate::guest::build(false)?;
    // The plain line, without the default guest's blacklist of the jitter
    // entropy self-test: what a user who boots a kernel by hand would give.
    let append = "console=ttyS0 quiet lockstep.run=poweroff";
    let exe = std::env::current_exe()?;
    let engines = [rv::Engine::Interp, rv::Engine::Jit];
    let mut ours = vec![Vec::new(); engines.len()];
    let mut qemu = Vec::new();
    for _ in 0..args.reps {
        // The same kernel and initramfs as QEMU's, without the root disk.
        for (e, engine) in engines.iter().enumerate() {
            ours[e].push(time_boot(
                std::process::Command::new(&exe)
                    .arg("run")
                    .args(["--engine", engine.name()])
                    .arg("--kernel")
                    .arg(&g.kernel)
                    .arg("--initrd")
                    .arg(&g.initrd)
                    .arg("--append")
                    .arg(append)
                    .args(["--mem", "512M"]),
            )?);
        }
        qemu.push(time_boot(
            std::process::Command::new("qemu-system-riscv64")
                .args(["-M", "virt", "-bios", "default", "-nographic", "-m", "512M", "-kernel"])
                .arg(&g.kernel)
                .arg("-initrd")
                .arg(&g.initrd)
                .arg("-append")
                .arg(append),
        )?);
    }
    let med = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        median(&mut x)
    };
    println!("boot of the default guest's kernel and initramfs, `{append}`");
    println!("{} runs each, alternating (median seconds)", args.reps);
    println!("{:28} {:>10} {:>10}", "", "ready line", "power-off");
    let (qr, qt) = (med(&qemu, |p| p.0), med(&qemu, |p| p.1));
    for (engine, v) in engines.iter().zip(&ours) {
        let (or, ot) = (med(v, |p| p.0), med(v, |p| p.1));
        println!("{:28} {or:>10.2} {ot:>10.2}", format!("lockstep, {}", engine.name()));
        println!("{:28} {:>10.2} {:>10.2}", "  ratio to qemu", or / qr, ot / qt);
    }
    println!("{:28} {qr:>10.2} {qt:>10.2}", "qemu-system-riscv64 (TCG)");
    Ok(())
}

/// One timed run with `engine`: (guest instructions, seconds).
fn time_program(p: &Program, engine: rv::Engine) -> Result<(u64, f64)> {
    machine::set_engine(engine);
    let mut m = Machine::new(16 << 20);
    p.load(&mut m.board.ram);
    m.hart.set_pc(p.entry);
    let t = Instant::now();
    let outcome = m.run_bare(p.tohost, u64::MAX)?;
    let secs = t.elapsed().as_secs_f64();
    if outcome != BareOutcome::Pass {
        bail!("benchmark program failed: {outcome:?}");
    }
    Ok((m.hart.position().0, secs))
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.reps == 0 || args.minsns == 0 {
        bail!("--reps and --minsns must be positive");
    }
    // The engines `bench pair` and `bench record` compare: those named, or
    // the one every run gets by default.
    let engines = if args.engines.is_empty() { vec![machine::default_engine()] } else { args.engines.clone() };
    match args.what {
        BenchKind::Boot => return boot(&args),
        BenchKind::Devices => return guest::devices(args.reps),
        BenchKind::Record => return guest::record(args.reps, &engines),
        BenchKind::Pair => {
            return pair::pair(pair::PairBench {
                reps: args.reps,
                kills: args.kills,
                engines: &engines,
                core_per_side: args.core_per_side,
                engines_only: args.engines_only,
                interleave: args.interleave,
            })
        }
        BenchKind::Protect => return protect::protect(args.reps),
        BenchKind::Reprotect => return reprotect::reprotect(args.fill_mb),
        BenchKind::Nemesis => return nemesis::nemesis(args.minutes, args.seed),
        BenchKind::Migrate => return migrate::migrate(),
        BenchKind::Work => return work::work(args.reps),
        BenchKind::Hash => {
            guest::state_hash_figures();
            return Ok(());
        }
        BenchKind::Cpu => {}
    }
    let iters = args.minsns * 1_000_000 / machine::programs::LOOP_BODY;
    let cases: [(&str, Program); 2] =
        [("(a) integer loop, M-mode", int_loop_m(iters)), ("(b) integer loop, U-mode, Sv39", int_loop_u_sv39(iters))];
    let engines = [rv::Engine::Interp, rv::Engine::Jit];
    let mut mips: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); engines.len()]; cases.len()];
    for _ in 0..args.reps {
        for (i, (_, p)) in cases.iter().enumerate() {
            for (e, &engine) in engines.iter().enumerate() {
                let (insns, secs) = time_program(p, engine)?;
                mips[i][e].push(insns as f64 / secs / 1e6);
            }
        }
    }
    println!(
        "guest MIPS, {} M instructions per run, {} runs each, engines alternating (median [min .. max])",
        args.minsns, args.reps
    );
    for ((name, _), per_engine) in cases.iter().zip(mips.iter_mut()) {
        for (engine, v) in engines.iter().zip(per_engine.iter_mut()) {
            let (lo, hi) = (v.iter().copied().fold(f64::MAX, f64::min), v.iter().copied().fold(0.0, f64::max));
            println!("{name:34} {:6} {:8.1}   [{lo:.1} .. {hi:.1}]", engine.name(), median(v));
        }
    }
    Ok(())
}
