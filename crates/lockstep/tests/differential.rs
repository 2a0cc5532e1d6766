//! Differential tests of the hart against QEMU.
//!
//! Random RV64GC instruction sequences (integer, M, A, F, D, C through the
//! assembler's automatic compression, loads and stores, forward branches and
//! jumps, FP CSR accesses) are wrapped in one harness and built twice from
//! the same source and linker script: for `lockstep`'s bare-metal runner
//! (M-mode) and for `qemu-riscv64` (user mode). Both load every register from
//! one table, run the body at the same address, then dump x1..x31, f0..f31,
//! fcsr and the 2 KiB scratch memory the body used. The dumps must be equal
//! byte for byte.
//!
//! `LOCKSTEP_DIFF_PROGRAMS` (default 240) and `LOCKSTEP_DIFF_LEN` (default
//! 300) set the volume; `LOCKSTEP_DIFF_SEED` picks another seed. A failing
//! program's source is kept under the target's tmp directory.

mod common;

use machine::{loader, BareOutcome, Machine};
use std::fmt::Write as _;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

const SCRATCH_BYTES: usize = 2048;
/// x0..x31, f0..f31, fcsr.
const DUMP_BYTES: usize = 8 * 65;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
}

/// Integer values worth testing, plus random ones.
fn int_value(r: &mut Rng) -> u64 {
    const SPECIAL: [u64; 18] = [
        0,
        1,
        u64::MAX,
        2,
        0x8000_0000_0000_0000,
        0x7fff_ffff_ffff_ffff,
        0x8000_0000,
        0x7fff_ffff,
        0xffff_ffff,
        0xffff_ffff_8000_0000,
        63,
        64,
        32,
        0xffff_ffff_ffff_fffe,
        // Exact ties when converted to single or double precision.
        0x100_0001,
        0xffff_ffff_feff_ffff,
        0x20_0000_0000_0001,
        0x8000_0000_0000_0400,
    ];
    match r.below(3) {
        0 => *r.pick(&SPECIAL),
        1 => r.below(4096),
        _ => r.next(),
    }
}

/// FP register contents worth testing: doubles, boxed singles, unboxed junk.
fn fp_value(r: &mut Rng) -> u64 {
    const D: [u64; 19] = [
        0,
        0x8000_0000_0000_0000,
        0x3ff0_0000_0000_0000, // 1.0
        0xbff0_0000_0000_0000, // -1.0
        0x7ff0_0000_0000_0000, // inf
        0xfff0_0000_0000_0000, // -inf
        0x7ff8_0000_0000_0000, // qNaN
        0x7ff4_0000_0000_0001, // sNaN
        0x0000_0000_0000_0001, // min subnormal
        0x000f_ffff_ffff_ffff, // max subnormal
        0x0010_0000_0000_0000, // min normal
        0x7fef_ffff_ffff_ffff, // max
        0x3fe0_0000_0000_0000, // 0.5
        0x4004_0000_0000_0000, // 2.5
        0x43e0_0000_0000_0000, // 2^63
        0xc1e0_0000_0000_0000, // -2^31
        0x3ff8_0000_0000_0000, // 1.5
        0xc004_0000_0000_0000, // -2.5
        0x3ff0_0000_1000_0000, // 1 + 2^-24: a tie narrowing to single
    ];
    const S: [u32; 14] = [
        0,
        0x8000_0000,
        0x3f80_0000,
        0xbf80_0000,
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0000,
        0x7fa0_0001,
        0x0000_0001,
        0x007f_ffff,
        0x0080_0000,
        0x7f7f_ffff,
        0x3fc0_0000,
        0x4f00_0000,
    ];
    match r.below(6) {
        0 | 1 => *r.pick(&D),
        2 | 3 => 0xffff_ffff_0000_0000 | *r.pick(&S) as u64,
        4 => {
            // A random double near 1 with a random exponent.
            let exp = 1023 - 60 + r.below(120);
            (r.next() & 0x800f_ffff_ffff_ffff) | (exp << 52)
        }
        _ => 0xffff_ffff_0000_0000 | (r.next() & 0xffff_ffff),
    }
}

/// Integer registers the body may read and write: x1..x29 (x30 is the
/// address temporary, x31 the scratch base).
fn xreg(r: &mut Rng) -> String {
    format!("x{}", 1 + r.below(29))
}

fn freg(r: &mut Rng) -> String {
    format!("f{}", r.below(32))
}

fn rm(r: &mut Rng) -> &'static str {
    const MODES: [&str; 6] = ["rne", "rtz", "rdn", "rup", "rmm", "dyn"];
    MODES[r.below(6) as usize]
}

/// Instruction mix of a program.
#[derive(Clone, Copy)]
enum Mix {
    /// Everything.
    All,
    /// Mostly F/D, with AMOs and FP CSRs.
    Fp,
}

/// One random program body.
fn gen_body(r: &mut Rng, len: usize, mix: Mix) -> String {
    let mut out = String::new();
    let mut pending: Vec<(usize, usize)> = Vec::new(); // (label, instructions left)
    let mut label = 0usize;
    let mut emitted = 0;
    while emitted < len {
        let text = gen_insn(r, mix, &mut label, &mut pending);
        out.push_str(&text);
        emitted += 1;
        for p in pending.iter_mut() {
            p.1 = p.1.saturating_sub(1);
        }
        pending.retain(|&(l, left)| {
            if left == 0 {
                let _ = writeln!(out, "L{l}:");
                false
            } else {
                true
            }
        });
    }
    for (l, _) in pending {
        let _ = writeln!(out, "L{l}:");
    }
    out
}

fn gen_insn(r: &mut Rng, mix: Mix, label: &mut usize, pending: &mut Vec<(usize, usize)>) -> String {
    let (rd, rs1, rs2) = (xreg(r), xreg(r), xreg(r));
    let (fd, fs1, fs2, fs3) = (freg(r), freg(r), freg(r), freg(r));
    let mut new_label = |r: &mut Rng| {
        *label += 1;
        pending.push((*label, 1 + r.below(3) as usize));
        *label
    };
    let roll = match mix {
        Mix::All => r.below(100),
        Mix::Fp => 65 + r.below(35),
    };
    match roll {
        0..=17 => {
            let op = r.pick(&[
                "add", "sub", "sll", "slt", "sltu", "xor", "srl", "sra", "or", "and", "addw", "subw", "sllw", "srlw",
                "sraw",
            ]);
            format!("  {op} {rd}, {rs1}, {rs2}\n")
        }
        18..=27 => {
            let op = r.pick(&[
                "mul", "mulh", "mulhsu", "mulhu", "div", "divu", "rem", "remu", "mulw", "divw", "divuw", "remw",
                "remuw",
            ]);
            format!("  {op} {rd}, {rs1}, {rs2}\n")
        }
        28..=37 => {
            let imm = r.below(4096) as i64 - 2048;
            match r.below(10) {
                0 => format!("  slli {rd}, {rs1}, {}\n", r.below(64)),
                1 => format!("  srli {rd}, {rs1}, {}\n", r.below(64)),
                2 => format!("  srai {rd}, {rs1}, {}\n", r.below(64)),
                3 => format!("  slliw {rd}, {rs1}, {}\n", r.below(32)),
                4 => format!("  srliw {rd}, {rs1}, {}\n", r.below(32)),
                5 => format!("  sraiw {rd}, {rs1}, {}\n", r.below(32)),
                6 => format!("  lui {rd}, {}\n", r.below(1 << 20)),
                7 => format!("  auipc {rd}, {}\n", r.below(1 << 20)),
                _ => {
                    let op = r.pick(&["addi", "slti", "sltiu", "xori", "ori", "andi", "addiw"]);
                    format!("  {op} {rd}, {rs1}, {imm}\n")
                }
            }
        }
        38..=41 => {
            // Small immediates and x2-relative forms make compressed encodings likely.
            let small = r.below(64) as i64 - 32;
            let op = r.pick(&["addi", "andi", "addiw"]);
            format!("  {op} {rd}, {rd}, {small}\n  mv {rs1}, {rs2}\n")
        }
        42..=51 => {
            let (op, size) = *r.pick(&[("lb", 1), ("lh", 2), ("lw", 4), ("ld", 8), ("lbu", 1), ("lhu", 2), ("lwu", 4)]);
            let off = r.below((SCRATCH_BYTES / size) as u64) * size as u64;
            format!("  {op} {rd}, {off}(x31)\n")
        }
        52..=57 => {
            let (op, size) = *r.pick(&[("sb", 1), ("sh", 2), ("sw", 4), ("sd", 8)]);
            let off = r.below((SCRATCH_BYTES / size) as u64) * size as u64;
            format!("  {op} {rs2}, {off}(x31)\n")
        }
        58..=62 => {
            let op = r.pick(&["beq", "bne", "blt", "bge", "bltu", "bgeu"]);
            let l = new_label(r);
            format!("  {op} {rs1}, {rs2}, L{l}\n")
        }
        63 => {
            let l = new_label(r);
            format!("  jal {rd}, L{l}\n")
        }
        64 => {
            let l = new_label(r);
            format!("  la x30, L{l}\n  jalr {rd}, 0(x30)\n")
        }
        65..=69 => {
            let w = r.below(2) == 0;
            let size = if w { 4 } else { 8 };
            let sfx = if w { "w" } else { "d" };
            let off = r.below((SCRATCH_BYTES / size) as u64) * size as u64;
            let mut s = format!("  addi x30, x31, {off}\n");
            if r.below(4) == 0 {
                let rd2 = xreg(r);
                let _ = writeln!(s, "  lr.{sfx} {rd}, (x30)\n  sc.{sfx} {rd2}, {rs2}, (x30)");
            } else if r.below(8) == 0 {
                // sc with no reservation fails.
                let _ = writeln!(s, "  sc.{sfx} {rd}, {rs2}, (x30)");
            } else {
                let op = r.pick(&[
                    "amoswap", "amoadd", "amoxor", "amoand", "amoor", "amomin", "amomax", "amominu", "amomaxu",
                ]);
                let _ = writeln!(s, "  {op}.{sfx} {rd}, {rs2}, (x30)");
            }
            s
        }
        70..=71 => {
            let (op, size) = *r.pick(&[("flw", 4), ("fld", 8), ("fsw", 4), ("fsd", 8)]);
            let off = r.below((SCRATCH_BYTES / size) as u64) * size as u64;
            let reg = if op.starts_with("fl") { &fd } else { &fs2 };
            format!("  {op} {reg}, {off}(x31)\n")
        }
        72..=81 => {
            let p = r.pick(&["s", "d"]);
            let op = r.pick(&["fadd", "fsub", "fmul", "fdiv"]);
            format!("  {op}.{p} {fd}, {fs1}, {fs2}, {}\n", rm(r))
        }
        82..=84 => {
            let p = r.pick(&["s", "d"]);
            let op = r.pick(&["fmadd", "fmsub", "fnmsub", "fnmadd"]);
            format!("  {op}.{p} {fd}, {fs1}, {fs2}, {fs3}, {}\n", rm(r))
        }
        85 => {
            let p = r.pick(&["s", "d"]);
            format!("  fsqrt.{p} {fd}, {fs1}, {}\n", rm(r))
        }
        86..=87 => {
            let p = r.pick(&["s", "d"]);
            let op = r.pick(&["fsgnj", "fsgnjn", "fsgnjx", "fmin", "fmax"]);
            format!("  {op}.{p} {fd}, {fs1}, {fs2}\n")
        }
        88..=89 => {
            let p = r.pick(&["s", "d"]);
            let op = r.pick(&["feq", "flt", "fle"]);
            format!("  {op}.{p} {rd}, {fs1}, {fs2}\n")
        }
        90..=92 => {
            let p = r.pick(&["s", "d"]);
            let i = r.pick(&["w", "wu", "l", "lu"]);
            if r.below(2) == 0 {
                format!("  fcvt.{i}.{p} {rd}, {fs1}, {}\n", rm(r))
            } else if *p == "d" && i.starts_with('w') {
                // Exact: the assembler takes no rounding mode here.
                format!("  fcvt.{p}.{i} {fd}, {rs1}\n")
            } else {
                format!("  fcvt.{p}.{i} {fd}, {rs1}, {}\n", rm(r))
            }
        }
        93 => match r.below(2) {
            0 => format!("  fcvt.s.d {fd}, {fs1}, {}\n", rm(r)),
            _ => format!("  fcvt.d.s {fd}, {fs1}\n"),
        },
        94..=95 => match r.below(6) {
            0 => format!("  fmv.x.w {rd}, {fs1}\n"),
            1 => format!("  fmv.x.d {rd}, {fs1}\n"),
            2 => format!("  fmv.w.x {fd}, {rs1}\n"),
            3 => format!("  fmv.d.x {fd}, {rs1}\n"),
            4 => format!("  fclass.s {rd}, {fs1}\n"),
            _ => format!("  fclass.d {rd}, {fs1}\n"),
        },
        96..=97 => match r.below(4) {
            0 => format!("  csrrwi {rd}, frm, {}\n", r.below(5)),
            1 => format!("  csrrs {rd}, fflags, x0\n"),
            2 => format!("  csrrc {rd}, fflags, {rs1}\n"),
            _ => format!("  csrrw {rd}, fflags, {rs1}\n"),
        },
        _ => format!("  fence\n  c.nop\n  addi {rd}, {rs1}, 0\n"),
    }
}

/// The harness around a body. `BARE` selects the M-mode flavour.
fn program(r: &mut Rng, body: &str) -> String {
    let mut s = String::from(
        r#"
    .section .text.init
    .globl _start
_start:
#ifdef BARE
    li t0, 0x2000
    csrs mstatus, t0
#endif
    la x30, init_fcsr
    ld x1, 0(x30)
    fscsr x1
    la x30, init_f
"#,
    );
    for i in 0..32 {
        let _ = writeln!(s, "    fld f{i}, {}(x30)", i * 8);
    }
    s.push_str("    la x30, init_x\n");
    for i in 1..30 {
        let _ = writeln!(s, "    ld x{i}, {}(x30)", i * 8);
    }
    s.push_str("    la x31, scratch\n    j body\n    .text\n    .balign 4\nbody:\n");
    s.push_str(body);
    s.push_str("body_end:\n    la x30, dump\n");
    for i in 1..32 {
        let _ = writeln!(s, "    sd x{i}, {}(x30)", i * 8);
    }
    for i in 0..32 {
        let _ = writeln!(s, "    fsd f{i}, {}(x30)", 256 + i * 8);
    }
    s.push_str(&format!(
        r#"    frcsr x1
    sd x1, 512(x30)
#ifdef BARE
    li x1, 1
    la x30, tohost
    sd x1, 0(x30)
1:  j 1b
#else
    li a7, 64
    li a0, 1
    la a1, scratch
    li a2, {total}
    ecall
    li a7, 93
    li a0, 0
    ecall
#endif
    .data
    .balign 4096
scratch:
"#,
        total = SCRATCH_BYTES + DUMP_BYTES
    ));
    for _ in 0..SCRATCH_BYTES / 8 {
        let _ = writeln!(s, "    .quad {:#x}", int_value(r));
    }
    let _ = writeln!(s, "dump:\n    .zero {DUMP_BYTES}\ninit_x:");
    for _ in 0..32 {
        let _ = writeln!(s, "    .quad {:#x}", int_value(r));
    }
    s.push_str("init_f:\n");
    for _ in 0..32 {
        let _ = writeln!(s, "    .quad {:#x}", fp_value(r));
    }
    let _ = writeln!(s, "init_fcsr:\n    .quad {}", r.below(5) << 5);
    s.push_str("    .section .tohost, \"aw\"\n    .balign 8\n    .globl tohost\ntohost: .quad 0\n");
    s
}

/// The program's dump from lockstep, run with the interpreter and again
/// with every block translated at its first run: both must agree before
/// either is compared with QEMU.
fn lockstep_dump(elf: &std::path::Path) -> Vec<u8> {
    let dump = |engine: rv::Engine| {
        let mut m = Machine::new(8 << 20);
        m.hart.set_engine(engine);
        m.hart.set_jit_hot_runs(1);
        let l = loader::load_elf(elf, &mut m.board.ram).expect("load");
        m.hart.set_pc(l.entry);
        let outcome = m.run_bare(l.tohost.expect("tohost"), 10_000_000).expect("run");
        assert_eq!(outcome, BareOutcome::Pass, "{} ({engine:?}): did not finish", elf.display());
        let mut out = vec![0u8; SCRATCH_BYTES + DUMP_BYTES];
        assert!(m.board.ram.read(0x8010_0000, &mut out));
        out
    };
    let interp = dump(rv::Engine::Interp);
    let jit = dump(rv::Engine::Jit);
    assert!(interp == jit, "{}: the engines differ: {}", elf.display(), describe_difference(&interp, &jit));
    interp
}

fn qemu_dump(elf: &std::path::Path) -> Vec<u8> {
    let out = Command::new("timeout").args(["20", "qemu-riscv64"]).arg(elf).output().expect("run qemu-riscv64");
    assert!(out.status.success(), "{}: qemu failed: {}", elf.display(), String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn describe_difference(ours: &[u8], theirs: &[u8]) -> String {
    let word = |b: &[u8], i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
    let mut lines = Vec::new();
    for i in 0..(SCRATCH_BYTES + DUMP_BYTES) / 8 {
        let (a, b) = (word(ours, i), word(theirs, i));
        if a != b {
            let what = if i < SCRATCH_BYTES / 8 {
                format!("scratch+{:#x}", i * 8)
            } else {
                match i - SCRATCH_BYTES / 8 {
                    n @ 0..=31 => format!("x{n}"),
                    n @ 32..=63 => format!("f{}", n - 32),
                    _ => "fcsr".to_string(),
                }
            };
            lines.push(format!("  {what}: lockstep {a:#018x}, qemu {b:#018x}"));
        }
    }
    lines.join("\n")
}

/// Build `programs` random programs of `len` instructions with `mix`, run
/// each on both engines (two at a time) and compare the dumps.
fn compare_with_qemu(tag: &str, mix: Mix, default_programs: usize) {
    common::require("qemu-riscv64");
    let programs: usize =
        std::env::var("LOCKSTEP_DIFF_PROGRAMS").ok().and_then(|v| v.parse().ok()).unwrap_or(default_programs);
    let len: usize = std::env::var("LOCKSTEP_DIFF_LEN").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let seed: u64 = std::env::var("LOCKSTEP_DIFF_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x010c_57e9);
    let dir = common::tmp_dir(&format!("differential-{tag}"));
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let compared = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= programs {
                    break;
                }
                let mut r = Rng(seed.wrapping_mul(1_000_003).wrapping_add(i as u64));
                let body = gen_body(&mut r, len, mix);
                let src = program(&mut r, &body);
                let name = format!("p{i}");
                let bare = common::build_elf(&dir, &format!("{name}-bare"), &src, &["-DBARE"]);
                let user = common::build_elf(&dir, &format!("{name}-user"), &src, &[]);
                let (ours, theirs) = (lockstep_dump(&bare), qemu_dump(&user));
                compared.fetch_add(len, Ordering::Relaxed);
                if ours != theirs {
                    failures.lock().unwrap().push(format!(
                        "program {i} (source {}):\n{}",
                        dir.join(format!("{name}-bare.S")).display(),
                        describe_difference(&ours, &theirs)
                    ));
                } else {
                    let _ = std::fs::remove_file(&bare);
                    let _ = std::fs::remove_file(&user);
                    for f in ["bare.S", "user.S", "bare.ld", "user.ld"] {
                        let _ = std::fs::remove_file(dir.join(format!("{name}-{f}")));
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    eprintln!(
        "differential ({tag}): {programs} programs x {len} instructions = {} random instructions compared with qemu-riscv64",
        compared.load(Ordering::Relaxed)
    );
    assert!(failures.is_empty(), "{} of {programs} programs differ:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn random_programs_match_qemu() {
    compare_with_qemu("mixed", Mix::All, 240);
}

#[test]
fn random_fp_programs_match_qemu() {
    compare_with_qemu("fp", Mix::Fp, 160);
}
