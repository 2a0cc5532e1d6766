//! `run`: one machine on this host (a Linux guest or a bare-metal ELF), and
//! the bare-metal CPU demo.

use super::RunArgs;
use crate::vm::live::RunOpts;
use crate::vm::spec::PairSpec;
use crate::vm::{self, LinuxVm};
use crate::Outcome;
use anyhow::{bail, Context, Result};
use machine::layout::RAM_BASE;
use machine::{loader, BareOutcome, Machine};

pub(super) fn run(args: RunArgs) -> Result<Outcome> {
    // A stop signal from here on is seen once the VM runs (see `stop_signal`).
    crate::host::console::stop_signal();
    let file = args.file.clone();
    let (spec, pair) = args.resolve(PairSpec::default())?;
    if let Some(key) = crate::vm::spec::first_key(&pair)? {
        bail!(
            "'{}': {key} is a pair setting (for `lockstep primary` and `secondary`); `run` does not take it",
            file.unwrap_or_default().display()
        );
    }
    machine::set_engine(spec.engine.unwrap_or_else(machine::default_engine));
    let opts = RunOpts {
        max_insns: spec.max_insns,
        record: spec.record.clone(),
        hash_every: spec.hash_every,
        snapshot_every: spec.snapshot_every,
    };
    if let Some(vm) = LinuxVm::from_spec(&spec)? {
        return vm::live::run_live(&vm, &opts);
    }
    let Some(elf) = spec.elf else { unreachable!("from_spec covers every run without an ELF") };
    let mut m = Machine::new(spec.mem.unwrap_or(vm::DEFAULT_MEM));
    let loaded = loader::load_elf(&elf, &mut m.board.ram)?;
    let tohost = loaded
        .tohost
        .with_context(|| format!("'{}' has no 'tohost' symbol: the runner cannot tell when it ends", elf.display()))?;
    if !m.board.ram.contains(tohost, 8) {
        bail!("'{}': tohost at {tohost:#x} is outside RAM (starts at {RAM_BASE:#x})", elf.display());
    }
    m.hart.set_pc(loaded.entry);
    let limit = spec.max_insns.unwrap_or(u64::MAX);
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

/// `demo --bare-metal`: M-mode firmware sets up Sv39 and runs a U-mode loop.
pub(super) fn bare_metal_demo() -> Result<Outcome> {
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
