//! `lockstep bench`: guest MIPS from the exact instruction counter.
//!
//! Each case runs `--reps` times, alternating between cases so that machine
//! noise hits both alike; the median is printed with min and max.

use anyhow::{bail, Result};
use machine::programs::{int_loop_m, int_loop_u_sv39, Program};
use machine::{BareOutcome, Machine};
use std::time::Instant;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Guest instructions per run, in millions.
    #[arg(long, default_value_t = 300)]
    minsns: u64,
    /// Runs per case.
    #[arg(long, default_value_t = 5)]
    reps: usize,
}

/// One timed run: (guest instructions, seconds).
fn time_program(p: &Program) -> Result<(u64, f64)> {
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

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.reps == 0 || args.minsns == 0 {
        bail!("--reps and --minsns must be positive");
    }
    let iters = args.minsns * 1_000_000 / machine::programs::LOOP_BODY;
    let cases: [(&str, Program); 2] =
        [("(a) integer loop, M-mode", int_loop_m(iters)), ("(b) integer loop, U-mode, Sv39", int_loop_u_sv39(iters))];
    let mut mips: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for _ in 0..args.reps {
        for (i, (_, p)) in cases.iter().enumerate() {
            let (insns, secs) = time_program(p)?;
            mips[i].push(insns as f64 / secs / 1e6);
        }
    }
    println!("guest MIPS, {} M instructions per run, {} runs each (median [min .. max])", args.minsns, args.reps);
    for ((name, _), v) in cases.iter().zip(mips.iter_mut()) {
        let (lo, hi) = (v.iter().copied().fold(f64::MAX, f64::min), v.iter().copied().fold(0.0, f64::max));
        println!("{name:34} {:8.1}   [{lo:.1} .. {hi:.1}]", median(v));
    }
    Ok(())
}
