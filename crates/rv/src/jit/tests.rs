//! The translation tier against the interpreter: the same programs, run to
//! the same stop positions, must leave the same state at every stop.

use crate::asm::*;
use crate::csr::*;
use crate::fp::{CANON_NAN_D, DZ, NV, NX};
use crate::test_utils::*;
use crate::{Engine, Exit, Hart, HartState, JitStats, Position};

thread_local! {
    /// Makes `Jit::new` fail as on a host that refuses writable executable
    /// memory (this thread only).
    pub(super) static REFUSE_REGION: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// A region of this many bytes instead of `REGION_BYTES`, unless 0
    /// (this thread only).
    pub(super) static REGION_BYTES_FOR_TESTS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// xorshift64: a fixed, seedable stream for generated programs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Everything a difference could show in: the architectural state (every
/// register, CSR and counter) and RAM.
fn state(h: &Hart, bus: &TestBus) -> (HartState, Vec<u8>) {
    (h.state(), bus.0.clone())
}

/// Run `words` in both engines through the same stops (`steps` of random
/// length, idling in `wfi` alike), comparing everything after each. The
/// JIT hart translates every block at its first run. Returns the JIT's
/// counters.
fn compare(words: &[u32], seed: u64, steps: usize, prepare: impl Fn(&mut Hart)) -> JitStats {
    let (mut a, mut abus) = setup_engine(words, Engine::Interp);
    let (mut b, mut bbus) = setup_engine(words, Engine::Jit);
    assert_eq!(b.engine(), Engine::Jit, "this host gives no executable memory");
    prepare(&mut a);
    prepare(&mut b);
    let mut rng = Rng(seed | 1);
    for step in 0..steps {
        let to = Position(a.position().0 + 1 + rng.below(if step % 4 == 0 { 7 } else { 400 }));
        // An interrupt line changes now and then, so interrupts arrive at
        // random positions (taken wherever the hart takes them, the same
        // in both engines when they are enabled).
        // A line stays up for one step (the handler does not lower it).
        for bit in [IRQ_MTI, IRQ_MEI, IRQ_MSI] {
            a.set_irq(bit, false);
            b.set_irq(bit, false);
        }
        if rng.below(10) == 0 {
            let bit = [IRQ_MTI, IRQ_MEI, IRQ_MSI][rng.below(3) as usize];
            a.set_irq(bit, true);
            b.set_irq(bit, true);
        }
        let (ea, eb) = (a.run(&mut abus, to), b.run(&mut bbus, to));
        assert_eq!(ea, eb, "seed {seed} step {step}: exits differ");
        if ea == Exit::Wfi {
            a.idle(5);
            b.idle(5);
        }
        let (sa, sb) = (state(&a, &abus), state(&b, &bbus));
        if sa != sb {
            let (a, b) = (&sa.0, &sb.0);
            let regs: Vec<_> = (0..32).filter(|&i| a.x[i] != b.x[i]).map(|i| (i, a.x[i], b.x[i])).collect();
            panic!(
                "seed {seed} step {step} (stop {}): interp pos {} pc {:#x} / jit pos {} pc {:#x}; \
                 regs differing (x, interp, jit): {regs:x?}; CSRs equal: {}; RAM equal: {}",
                to.0,
                a.position,
                a.pc,
                b.position,
                b.pc,
                a.csr == b.csr,
                sa.1 == sb.1
            );
        }
    }
    b.jit_stats().expect("the JIT hart has a translation tier")
}

/// Registers the generated programs may write; x2..x4 stay pointers into
/// the data area so that most loads and stores hit RAM.
const WRITABLE: [u32; 8] = [5, 6, 7, 10, 11, 12, 13, 14];
const DATA: u64 = BASE + 0x4000;

/// One random instruction: every RV64IM op, loads and stores (F/D too)
/// (mostly in the data area, sometimes misaligned or outside RAM), short
/// branches both ways, and now and then a CSR access or a random word.
fn random_insn(rng: &mut Rng, at: usize, len: usize) -> u32 {
    let rd = WRITABLE[rng.below(8) as usize];
    let any = |rng: &mut Rng| rng.below(16) as u32;
    let (rs1, rs2) = (any(rng), any(rng));
    let imm = match rng.below(4) {
        0 => rng.below(4096) as i32 - 2048,
        1 => rng.below(8) as i32 - 4,
        2 => 2047,
        _ => -2048,
    };
    match rng.below(20) {
        0..=3 => {
            // OP: R-type ALU and M.
            let (f3, f7) = [(0, 0), (0, 0x20), (1, 0), (2, 0), (3, 0), (4, 0), (5, 0), (5, 0x20), (6, 0), (7, 0)]
                [rng.below(10) as usize];
            let (f3, f7) = if rng.below(3) == 0 { (rng.below(8) as u32, 1) } else { (f3, f7) };
            let op = if rng.below(3) == 0 { 0x3b } else { 0x33 };
            let (f3, f7) = if op == 0x3b && f7 != 1 { ([0, 0, 1, 5, 5][rng.below(5) as usize], f7) } else { (f3, f7) };
            let f7 = if op == 0x3b && f3 == 1 { 0 } else { f7 };
            r(op, f3, f7, rd, rs1, rs2)
        }
        4..=6 => {
            // OP-IMM and OP-IMM-32.
            let f3 = rng.below(8) as u32;
            if rng.below(3) == 0 {
                let f3 = [0, 1, 5][rng.below(3) as usize];
                let imm = if f3 == 0 {
                    imm
                } else {
                    (rng.below(32) as i32) | if f3 == 5 && rng.below(2) == 0 { 0x400 } else { 0 }
                };
                i(0x1b, f3, rd, rs1, imm)
            } else {
                let imm = match f3 {
                    1 => rng.below(64) as i32,
                    5 => rng.below(64) as i32 | if rng.below(2) == 0 { 0x400 } else { 0 },
                    _ => imm,
                };
                i(0x13, f3, rd, rs1, imm)
            }
        }
        7..=9 => {
            // Loads from a pointer register; now and then from anywhere.
            let base = if rng.below(8) == 0 { rs1 } else { 2 + rng.below(3) as u32 };
            let off = if rng.below(6) == 0 { rng.below(64) as i32 - 8 } else { 8 * rng.below(32) as i32 };
            if rng.below(4) == 0 {
                // flw / fld into any FP register.
                i(0x07, 2 + rng.below(2) as u32, rng.below(32) as u32, base, off)
            } else {
                i(0x03, [0, 1, 2, 3, 4, 5, 6][rng.below(7) as usize], rd, base, off)
            }
        }
        10..=11 => {
            let base = if rng.below(8) == 0 { rs1 } else { 2 + rng.below(3) as u32 };
            let off = if rng.below(6) == 0 { rng.below(64) as i32 - 8 } else { 8 * rng.below(32) as i32 };
            if rng.below(4) == 0 {
                s(0x27, 2 + rng.below(2) as u32, base, rng.below(32) as u32, off)
            } else {
                s(0x23, rng.below(4) as u32, base, rs2, off)
            }
        }
        12..=14 => {
            // A short forward branch (random backward ones make endless
            // loops; the program's last jump makes it go round).
            let target = (at as i64 + 1 + rng.below(12) as i64).clamp(0, len as i64 - 1);
            b([0, 1, 4, 5, 6, 7][rng.below(6) as usize], rs1, rs2, ((target - at as i64) * 4) as i32)
        }
        15 => lui(rd, rng.below(1 << 20) as u32),
        16 => auipc(rd, rng.below(1 << 20) as u32),
        17 if rng.below(3) == 0 => {
            jalr(if rng.below(2) == 0 { ZERO } else { rd }, 8, 4 * (at as i32 + 2) + rng.below(2) as i32)
        }
        17 => {
            let target = (at as i64 + 1 + rng.below(12) as i64).clamp(0, len as i64 - 1);
            jal(if rng.below(2) == 0 { ZERO } else { rd }, ((target - at as i64) * 4) as i32)
        }
        // FP off (then FP ops trap), Initial (the first FP write makes it
        // Dirty) or Dirty: s1 = mstatus.FS, ra = its Initial value.
        18 if rng.below(4) == 0 => match rng.below(3) {
            0 => csrrc(ZERO, MSTATUS, 9),
            1 => csrrs(ZERO, MSTATUS, 1),
            _ => csrrs(ZERO, MSTATUS, 9),
        },
        18 => match rng.below(4) {
            0 => csrrs(rd, MSCRATCH, rs1),
            1 => csrrw(rd, MSCRATCH, rs1),
            2 => i(0x73, 2, rd, 0, 0xc00),                        // rdcycle
            _ => r(0x2f, 3, 0, rd, 2 + rng.below(3) as u32, rs2), // amoadd.d
        },
        _ => rng.next() as u32,
    }
}

/// A generated program (seed `seed`) with loops, loads, stores, branches
/// and traps, and its trap handler's address.
fn generated_program(seed: u64) -> (Vec<u32>, u64) {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let len = 400;
    let mut words: Vec<u32> = Vec::new();
    words.extend(li64(2, DATA));
    words.extend(li64(3, DATA + 0x100));
    words.extend(li64(4, DATA + 0x7f8));
    words.extend(li64(9, MSTATUS_FS));
    words.extend(li64(1, 1 << 13));
    for r in WRITABLE {
        words.extend(li64(r, rng.next()));
    }
    // s0 = the address just before the body, for `jalr`s to the
    // instruction after themselves.
    words.push(auipc(8, 0));
    let start = words.len();
    let body = len - start - 1;
    for at in 0..body {
        words.push(random_insn(&mut rng, at, body));
    }
    // Round again, with the registers as they are.
    words.push(jal(ZERO, -4 * body as i32));
    // The trap handler steps over the faulting instruction.
    let handler = BASE + 4 * words.len() as u64;
    words.extend([csrrs(T2, MEPC, ZERO), addi(T2, T2, 4), csrrw(ZERO, MEPC, T2), MRET]);
    // Random data for the loads, with every sign bit set now and then.
    let data = ((DATA - BASE) / 4) as usize;
    words.resize(data, 0);
    words.extend((0..0x800 / 4).map(|_| rng.next() as u32));
    (words, handler)
}

/// [`compare`] on generated program `seed`, 300 stops, with machine
/// interrupts enabled (a raised line traps at once).
fn compare_generated(seed: u64) -> JitStats {
    let (words, handler) = generated_program(seed);
    compare(&words, seed, 300, |h| {
        h.core.csr.mtvec = handler;
        h.core.csr.mie = IRQ_MTI | IRQ_MEI | IRQ_MSI;
        h.core.csr.mstatus |= MSTATUS_MIE;
    })
}

/// Generated programs with loops, loads, stores, branches and traps: the
/// same state at every stop, in M-mode and in S-mode under a page table.
#[test]
fn generated_programs_give_the_interpreters_state_at_every_stop() {
    let in_jit: u64 = (1..=60u64).map(|seed| compare_generated(seed).positions).sum();
    // The comparison means something only if translated code did most of
    // the work (each program runs about 45,000 positions).
    assert!(in_jit > 60 * 25_000, "translated code ran only {in_jit} positions");
}

/// A region that fills again and again: every time it does, all
/// translations drop and the shared chain must still be at the region's
/// start before the next translation chains through it. Same state at
/// every stop as the interpreter.
#[test]
fn translations_go_on_chaining_after_the_region_fills() {
    REGION_BYTES_FOR_TESTS.set(8 << 10);
    let stats: Vec<JitStats> = (1..=10u64).map(compare_generated).collect();
    REGION_BYTES_FOR_TESTS.set(0);
    let resets: u64 = stats.iter().map(|s| s.region_resets).sum();
    let in_jit: u64 = stats.iter().map(|s| s.positions).sum();
    assert!(resets > 10, "the region filled only {resets} times");
    assert!(in_jit > 10 * 20_000, "translated code ran only {in_jit} positions");
}

/// Random words as code, in M-mode and then in S-mode under a random
/// satp, as the interpreter's own no-panic test: same state at every stop.
#[test]
fn random_words_give_the_interpreters_state_at_every_stop() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for round in 0..30u64 {
        let words: Vec<u32> = (0..2048).map(|_| rng.next() as u32).collect();
        compare(&words, round + 1, 200, |h| {
            h.core.csr.mtvec = BASE + 0x100;
            if round % 2 == 1 {
                h.set_prv(PRV_S);
                h.core.csr.satp = (8 << 60) | ((BASE >> 12) + (round % 16));
                h.core.update_ctx();
                h.core.csr.stvec = BASE + 0x200;
            }
        });
    }
}

/// A loop body of loads, stores and arithmetic, stopped at every position
/// of its first passes: the tier must stop mid-block (by handing the block
/// to the interpreter) exactly where the interpreter does.
#[test]
fn budget_stops_at_every_instruction_are_exact() {
    let mut w = with_regs(&[(A2, DATA), (T0, 50)], &[]);
    let top = w.len();
    w.extend([
        ld(A0, A2, 0),
        addi(A0, A0, 3),
        sd(A0, A2, 8),
        lw(A1, A2, 8),
        mul(A3, A1, A0),
        xor(A4, A3, A1),
        sw(A4, A2, 16),
        addi(T0, T0, -1),
    ]);
    let back = -4 * (w.len() - top) as i32;
    w.push(bne(T0, ZERO, back));
    w.push(addi(A5, A0, 0));
    let total = 500u64;
    for stop in 1..total {
        let (mut a, mut abus) = setup_engine(&w, Engine::Interp);
        let (mut b, mut bbus) = setup_engine(&w, Engine::Jit);
        // Warm the JIT up to a different point each time, then stop at `stop`.
        let warm = Position(stop / 2);
        a.run(&mut abus, warm);
        b.run(&mut bbus, warm);
        a.run(&mut abus, Position(stop));
        b.run(&mut bbus, Position(stop));
        assert_eq!(state(&a, &abus), state(&b, &bbus), "stop {stop}");
    }
}

/// Every M-extension division, remainder and high multiply over pairs of
/// edge values (zero, ±1, the 64- and 32-bit extremes, values whose low
/// half is zero or all ones): the tier computes them in host code (no op
/// falls back to the interpreter) and gets the interpreter's results,
/// including a zero divisor and the signed overflow MIN / -1, where the
/// host's divide instruction would fault.
#[test]
fn divisions_and_high_multiplies_give_the_interpreters_results() {
    let values: [u64; 14] = [
        0,
        1,
        u64::MAX,
        2,
        -2i64 as u64,
        i64::MIN as u64,
        i64::MAX as u64,
        0x8000_0000,
        i32::MIN as i64 as u64,
        0xffff_ffff,
        1 << 32,
        7,
        -7i64 as u64,
        0x1234_5678_9abc_def1,
    ];
    let pairs: Vec<(u64, u64)> = values.iter().flat_map(|&x| values.iter().map(move |&y| (x, y))).collect();
    let (table, results) = (BASE + 0x4000, BASE + 0x9000);
    let (x, y, out) = (A4, A5, T1);
    let ops: Vec<u32> =
        (0..8).map(|f3| r(0x33, f3, 1, out, x, y)).chain((4..8).map(|f3| r(0x3b, f3, 1, out, x, y))).collect();
    let mut w = with_regs(&[(A2, table), (A3, results), (T0, pairs.len() as u64)], &[]);
    let top = w.len();
    w.extend([ld(x, A2, 0), ld(y, A2, 8)]);
    for (k, &op) in ops.iter().enumerate() {
        w.extend([op, sd(out, A3, 8 * k as i32)]);
    }
    w.extend([addi(A2, A2, 16), addi(A3, A3, 8 * ops.len() as i32), addi(T0, T0, -1)]);
    w.push(bne(T0, ZERO, -4 * (w.len() - top) as i32));
    w.push(jal(ZERO, 0));
    assert!(results + (pairs.len() * ops.len() * 8) as u64 <= BASE + (64 << 10));
    w.resize(((table - BASE) / 4) as usize, 0);
    for (x, y) in &pairs {
        w.extend([*x as u32, (*x >> 32) as u32, *y as u32, (*y >> 32) as u32]);
    }
    let stats = compare(&w, 11, 300, |_| {});
    assert_eq!(stats.fallback_ops, 0, "every op of the loop ran in host code");
    assert!(stats.positions > 5_000, "translated code ran the loop: {stats:?}");
    // And the interpreter's results are the spec's, for a few of them.
    let (mut h, mut bus) = setup_engine(&w, Engine::Jit);
    h.run(&mut bus, Position(100_000));
    let result = |pair: usize, op: usize| {
        let at = (results - BASE) as usize + 8 * (pair * ops.len() + op);
        u64::from_le_bytes(bus.0[at..at + 8].try_into().unwrap())
    };
    let index = |x: u64, y: u64| pairs.iter().position(|&p| p == (x, y)).unwrap();
    let min = i64::MIN as u64;
    // div, divu, rem, remu by zero; MIN / -1 and MIN % -1; divw of i32::MIN by -1.
    assert_eq!([4, 5, 6, 7].map(|op| result(index(7, 0), op)), [u64::MAX, u64::MAX, 7, 7]);
    assert_eq!([4, 6].map(|op| result(index(min, u64::MAX), op)), [min, 0]);
    assert_eq!(result(index(i32::MIN as i64 as u64, u64::MAX), 8), i32::MIN as i64 as u64);
    // divw by a divisor whose low half is zero.
    assert_eq!([8, 9, 10, 11].map(|op| result(index(7, 1 << 32), op)), [u64::MAX, u64::MAX, 7, 7]);
    // mulhsu of -1 and 2: the high half of -2 as a 128-bit number.
    assert_eq!(result(index(u64::MAX, 2), 2), u64::MAX);
}

/// Double-precision arithmetic, compares, sign injection and moves over
/// pairs of edge operands (zeros, denormals, extremes, infinities, quiet
/// and signaling NaNs with payloads): the tier runs them in host code (no
/// op falls back when the rounding is RNE) and gets the interpreter's
/// results, `fflags` (read and cleared after each pair) and `mstatus.FS`;
/// with `frm` another mode the dynamic-rounding ops go to the interpreter,
/// and with FP off every op traps as there.
#[test]
fn double_precision_ops_give_the_interpreters_results_and_flags() {
    let values: [u64; 16] = [
        0,
        1 << 63,
        1.0f64.to_bits(),
        (-1.5f64).to_bits(),
        1,
        (1u64 << 52) - 1,
        1 << 52,
        f64::MAX.to_bits(),
        f64::INFINITY.to_bits(),
        f64::NEG_INFINITY.to_bits(),
        0x7ff8_0000_0000_0000,
        0xfff8_0000_0000_0042,
        0x7ff0_0000_0000_0001,
        3.0f64.to_bits(),
        (1.0f64 / 3.0).to_bits(),
        1e300f64.to_bits(),
    ];
    let pairs: Vec<(u64, u64)> = values.iter().flat_map(|&x| values.iter().map(move |&y| (x, y))).collect();
    let (table, results) = (BASE + 0x4000, BASE + 0x9000);
    let fp = |f7: u32, rm: u32, rd: u32, rs1: u32, rs2: u32| r(0x53, rm, f7, rd, rs1, rs2);
    let (fld, fsd) = (|rd, rs1, imm| i(0x07, 3, rd, rs1, imm), |rs2, rs1, imm| s(0x27, 3, rs1, rs2, imm));
    let program = |read_flags: bool| {
        let mut w = with_regs(&[(A2, table), (A3, results), (T0, pairs.len() as u64)], &[]);
        let top = w.len();
        w.extend([fld(1, A2, 0), fld(2, A2, 8)]);
        // Static RNE and dynamic rounding, in turn.
        for (k, (f7, rm)) in
            [(0x01, 0), (0x05, 7), (0x09, 0), (0x0d, 7), (0x11, 0), (0x11, 1), (0x11, 2)].into_iter().enumerate()
        {
            w.extend([fp(f7, rm, 3, 1, 2), fsd(3, A3, 8 * k as i32)]);
        }
        for (k, f3) in [2, 1, 0].into_iter().enumerate() {
            w.extend([fp(0x51, f3, T1, 1, 2), sd(T1, A3, 56 + 8 * k as i32)]);
        }
        w.extend([fp(0x71, 0, T1, 1, 0), sd(T1, A3, 80), fp(0x79, 0, 3, T1, 0), fsd(3, A3, 88)]);
        if read_flags {
            w.extend([csrrw(T1, FFLAGS, ZERO), sd(T1, A3, 96)]);
        }
        w.extend([addi(A2, A2, 16), addi(A3, A3, 104), addi(T0, T0, -1)]);
        w.push(bne(T0, ZERO, -4 * (w.len() - top) as i32));
        w.push(jal(ZERO, 0));
        assert!(results + (pairs.len() * 104) as u64 <= BASE + 0x10000);
        w.resize(((table - BASE) / 4) as usize, 0);
        for (x, y) in &pairs {
            w.extend([*x as u32, (*x >> 32) as u32, *y as u32, (*y >> 32) as u32]);
        }
        w
    };
    let stats = compare(&program(false), 21, 300, |_| {});
    assert_eq!(stats.fallback_ops, 0, "every op of the loop ran in host code: {stats:?}");
    assert!(stats.positions > 5_000, "translated code ran the loop: {stats:?}");
    compare(&program(true), 22, 300, |_| {});
    // Round toward zero in `frm`: the dynamic ops take the interpreter.
    compare(&program(true), 23, 300, |h| h.core.csr.frm = 1);
    // FP off: the first op traps, in both.
    compare(&program(true), 24, 50, |h| h.core.csr.mstatus &= !MSTATUS_FS);
    // And the flags the loop recorded are the spec's for a few pairs.
    let (mut h, mut bus) = setup_engine(&program(true), Engine::Jit);
    h.run(&mut bus, Position(100_000));
    let slot = |pair: usize, k: usize| {
        let at = (results - BASE) as usize + 104 * pair + 8 * k;
        u64::from_le_bytes(bus.0[at..at + 8].try_into().unwrap())
    };
    let index = |x: u64, y: u64| pairs.iter().position(|&p| p == (x, y)).unwrap();
    let (one, three, snan, qnan) = (1.0f64.to_bits(), 3.0f64.to_bits(), 0x7ff0_0000_0000_0001, 0x7ff8_0000_0000_0000);
    // 1 / 3: inexact; 1 / 0: divide by zero, infinity; a signaling NaN: invalid, canonical NaN.
    assert_eq!((slot(index(one, three), 3), slot(index(one, three), 12)), ((1.0f64 / 3.0).to_bits(), NX as u64));
    assert_eq!((slot(index(one, 0), 3), slot(index(one, 0), 12)), (f64::INFINITY.to_bits(), DZ as u64));
    assert_eq!((slot(index(snan, one), 0), slot(index(snan, one), 12)), (CANON_NAN_D, NV as u64));
    // feq on a quiet NaN is quiet; flt on it signals.
    assert_eq!([7, 8, 12].map(|k| slot(index(qnan, one), k)), [0, 0, NV as u64]);
}

/// A block reached alternately at two virtual pcs in one jump-cache set
/// (two mappings of its page): the chain finds both ways of the set, so
/// the loop runs on in translated code instead of returning to the
/// dispatcher at every jump.
#[test]
fn the_chain_finds_both_entries_of_a_jump_cache_set() {
    const ROOT: u64 = 0x5000;
    let (va1, va2) = (BASE + 0x1000, 0x4000_1000u64);
    assert_eq!(crate::block::BlockCache::jump_index(va1), crate::block::BlockCache::jump_index(va2));
    let w = with_regs(&[(A1, va1), (A2, va1 ^ va2)], &[jalr(ZERO, A1, 0)]);
    let (mut h, mut bus) = setup_engine(&w, Engine::Jit);
    let leaf = ((BASE >> 12) << 10) | 0xcf; // V R W X A D, a gigapage onto RAM
    bus.0[ROOT as usize + 8..][..8].copy_from_slice(&leaf.to_le_bytes()); // VA 0x4000_0000
    bus.0[ROOT as usize + 16..][..8].copy_from_slice(&leaf.to_le_bytes()); // VA 0x8000_0000

    // The loop: switch a1 to the other mapping and jump there.
    bus.0[0x1000..0x1008].copy_from_slice(&to_bytes(&[xor(A1, A1, A2), jalr(ZERO, A1, 0)]));
    h.core.csr.satp = (SATP_MODE_SV39 << 60) | ((BASE + ROOT) >> 12);
    h.set_prv(PRV_S);
    let start = w.len() as u64;
    assert_eq!(h.run(&mut bus, Position(start + 2000)), Exit::Reached);
    assert_eq!(h.csrs().mcause, 0, "no trap");
    assert_eq!(h.pc(), va1, "1000 passes, the last to the first mapping");
    let stats = h.jit_stats().unwrap();
    assert!(stats.positions > 1900, "translated code ran the loop ({} positions)", stats.positions);
    assert!(stats.entries < 10, "the dispatcher entered translated code {} times", stats.entries);
}

/// Every Zicsr form on `fflags`, with x0 and other registers as source
/// and destination, over values with bits in and out of the field: the
/// interpreter's results at random stops, no call into the interpreter
/// while FP is on; with FP off each access traps, in both.
#[test]
fn fflags_accesses_give_the_interpreters_results() {
    let values: [u64; 8] = [0, 0x1f, 0xff, 0x15, 0x0a, u64::MAX, 0x20, 0x13];
    let (table, results) = (BASE + 0x4000, BASE + 0x8800);
    let (csrrsi, csrrci) =
        (|rd, csr: u16, uimm| i(0x73, 6, rd, uimm, csr as i32), |rd, csr: u16, uimm| i(0x73, 7, rd, uimm, csr as i32));
    let mut w = with_regs(&[(A2, table), (A3, results), (T0, values.len() as u64)], &[]);
    let top = w.len();
    w.extend([ld(T1, A2, 0), srli(T2, T1, 3)]);
    w.extend([
        csrrw(A0, FFLAGS, T1),
        csrrs(A1, FFLAGS, ZERO),
        csrrs(A4, FFLAGS, T2),
        csrrc(A5, FFLAGS, T1),
        csrrwi(16, FFLAGS, 0x15),
        csrrsi(17, FFLAGS, 0x2),
        csrrci(18, FFLAGS, 0x5),
        csrrw(ZERO, FFLAGS, T2),
        csrrs(19, FFLAGS, ZERO),
        csrrwi(ZERO, FFLAGS, 3),
        csrrsi(20, FFLAGS, 0),
        csrrci(21, FFLAGS, 0),
    ]);
    for (k, r) in [A0, A1, A4, A5, 16, 17, 18, 19, 20, 21].into_iter().enumerate() {
        w.push(sd(r, A3, 8 * k as i32));
    }
    w.extend([addi(A2, A2, 8), addi(A3, A3, 80), addi(T0, T0, -1)]);
    w.push(bne(T0, ZERO, -4 * (w.len() - top) as i32));
    w.push(jal(ZERO, 0));
    w.resize(((table - BASE) / 4) as usize, 0);
    for v in values {
        w.extend([v as u32, (v >> 32) as u32]);
    }
    let stats = compare(&w, 31, 200, |h| h.core.csr.fflags = 0x1f);
    assert_eq!(stats.fallback_ops, 0, "every op of the loop ran in host code: {stats:?}");
    compare(&w, 32, 50, |h| h.core.csr.mstatus &= !MSTATUS_FS);
    // The spec's results for the value 0xff (third pass).
    let (mut h, mut bus) = setup_engine(&w, Engine::Jit);
    h.run(&mut bus, Position(10_000));
    assert_eq!(h.csrs().mstatus & MSTATUS_FS, MSTATUS_FS, "FS is Dirty after a write");
    let slot = |pass: usize, k: usize| {
        let at = (results - BASE) as usize + 80 * pass + 8 * k;
        u64::from_le_bytes(bus.0[at..at + 8].try_into().unwrap())
    };
    // The last pass left 3; csrrw keeps the five bits (0xff -> 0x1f);
    // csrrs with 0xff >> 3 = 0x1f; csrrc clears all; csrrwi 0x15; csrrsi 2
    // -> 0x17; csrrci 5 -> 0x12, then csrrw x0 writes 0x1f; csrrwi x0 3.
    let want = [0x03, 0x1f, 0x1f, 0x1f, 0x00, 0x15, 0x17, 0x1f, 0x03, 0x03];
    assert_eq!((0..10).map(|k| slot(2, k)).collect::<Vec<_>>(), want);
}

/// Code that rewrites an instruction of a block the tier already
/// translated: the next pass runs the new instruction.
#[test]
fn a_store_into_translated_code_takes_effect_at_once() {
    // Loop 4 times over: a0 += 1 (patched to a0 += 100 in pass 3).
    let patch = addi(A0, A0, 100);
    let mut w = with_regs(&[(A1, patch as u64), (T0, 4)], &[]);
    let top = w.len();
    w.extend([
        auipc(A2, 0),       // top
        addi(A0, A0, 1),    // top + 4: the patched instruction
        addi(T0, T0, -1),   // top + 8
        addi(T1, T0, -1),   // top + 12
        bne(T1, ZERO, 8),   // top + 16: patch when t0 == 1
        sw(A1, A2, 4),      // top + 20
        bne(T0, ZERO, -24), // top + 24
        addi(A3, A0, 0),
    ]);
    let _ = top;
    let end = BASE + 4 * w.len() as u64;
    let (mut h, mut bus) = setup_engine(&w, Engine::Jit);
    while h.pc() != end && h.position().0 < 10_000 {
        let p = h.position().0;
        h.run(&mut bus, Position(p + 1000));
    }
    // Passes 1-3 add 1, the patch lands in pass 3, pass 4 adds 100.
    assert_eq!(h.x(13), 103);
    assert!(h.jit_stats().unwrap().positions > 0);
    compare(&w, 7, 40, |_| {});
}

/// A host that refuses executable memory: asking for the tier leaves the
/// interpreter, which says so (`engine`) and runs the program exactly as a
/// hart that asked for it; a later ask, once memory is given, gets the tier.
#[test]
fn a_host_without_executable_memory_runs_the_interpreter() {
    let w = with_regs(&[(T0, 1000)], &[addi(A0, A0, 3), addi(T0, T0, -1), bne(T0, ZERO, -8), addi(A1, A0, 0)]);
    REFUSE_REGION.set(true);
    let (mut refused, mut rbus) = setup_engine(&w, Engine::Jit);
    assert_eq!(refused.engine(), Engine::Interp);
    assert!(refused.jit_stats().is_none());
    let (mut interp, mut ibus) = setup_engine(&w, Engine::Interp);
    for stop in [5, 17, 300, 3001, 5000] {
        refused.run(&mut rbus, Position(stop));
        interp.run(&mut ibus, Position(stop));
        assert_eq!(state(&refused, &rbus), state(&interp, &ibus), "at {stop}");
    }
    assert_eq!(refused.x(11), 3000);
    REFUSE_REGION.set(false);
    refused.set_engine(Engine::Jit);
    assert_eq!(refused.engine(), Engine::Jit);
}
