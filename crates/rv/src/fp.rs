//! IEEE 754 arithmetic for the F and D extensions, with RISC-V's rules.
//!
//! Values travel as raw bits (`u64`; single precision uses the low 32 bits).
//! Every function returns the result bits and the exception flags it raised,
//! in `fflags` layout (Unprivileged ISA 11.2: NV DZ OF UF NX).
//!
//! * Add, subtract, multiply, divide, square root, fused multiply-add and the
//!   double-to-single narrowing run on the host's SSE unit with MXCSR set to
//!   the requested rounding mode: x86-64 rounds exactly as IEEE 754 requires
//!   and, like RISC-V, detects tininess after rounding, so its flags map one to
//!   one. MXCSR is saved and restored around each operation inside one `asm!`
//!   block, so no Rust code ever runs with a changed floating-point environment.
//! * Round-to-nearest-ties-to-away (RMM), which SSE lacks, goes through
//!   `rustc_apfloat` (a port of LLVM's APFloat).
//! * The portable path: on other hosts, or with the `portable-fp` feature,
//!   everything goes the way RMM does, and the square root is integer code
//!   (`soft_sqrt`). Tests cross-check it against SSE on random operands.
//! * Conversions to and from integers, min/max, compares, classify and sign
//!   injection are plain integer code: their RISC-V rules (saturation, NaN
//!   results, which NaNs signal) differ from x86's.
//! * A NaN result is always the canonical NaN (11.3).

use rustc_apfloat::ieee::{Double, Single};
use rustc_apfloat::{Float, FloatConvert, Round, Status};
#[cfg(target_arch = "x86_64")]
use std::arch::asm;

/// Whether every operation takes the portable path (no SSE).
const PORTABLE: bool = cfg!(any(not(target_arch = "x86_64"), feature = "portable-fp"));

pub const NX: u8 = 0x01;
pub const UF: u8 = 0x02;
pub const OF: u8 = 0x04;
pub const DZ: u8 = 0x08;
pub const NV: u8 = 0x10;

pub const CANON_NAN_S: u64 = 0x7fc0_0000;
pub const CANON_NAN_D: u64 = 0x7ff8_0000_0000_0000;

/// The five rounding modes (11.2, Table 11.1), numbered as in `frm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rm {
    Rne = 0,
    Rtz = 1,
    Rdn = 2,
    Rup = 3,
    Rmm = 4,
}

impl Rm {
    /// A rounding mode from a 3-bit field; `None` for the reserved 5, 6, 7.
    pub fn from_bits(v: u8) -> Option<Rm> {
        Some(match v {
            0 => Rm::Rne,
            1 => Rm::Rtz,
            2 => Rm::Rdn,
            3 => Rm::Rup,
            4 => Rm::Rmm,
            _ => return None,
        })
    }

    /// MXCSR.RC for the four modes SSE has.
    #[cfg(target_arch = "x86_64")]
    fn mxcsr_rc(self) -> u32 {
        match self {
            Rm::Rne => 0,
            Rm::Rdn => 1,
            Rm::Rup => 2,
            Rm::Rtz => 3,
            Rm::Rmm => unreachable!("RMM never reaches SSE"),
        }
    }

    fn apfloat(self) -> Round {
        match self {
            Rm::Rne => Round::NearestTiesToEven,
            Rm::Rtz => Round::TowardZero,
            Rm::Rdn => Round::TowardNegative,
            Rm::Rup => Round::TowardPositive,
            Rm::Rmm => Round::NearestTiesToAway,
        }
    }
}

/// Layout of one binary format.
#[derive(Clone, Copy, Debug)]
pub struct Fmt {
    pub sign: u64,
    pub exp_mask: u64,
    pub mant_mask: u64,
    pub quiet: u64,
    pub canon: u64,
    /// Stored mantissa bits (23 or 52).
    pub mant_bits: u32,
    pub bias: i32,
}

pub const S: Fmt = Fmt {
    sign: 0x8000_0000,
    exp_mask: 0x7f80_0000,
    mant_mask: 0x007f_ffff,
    quiet: 0x0040_0000,
    canon: CANON_NAN_S,
    mant_bits: 23,
    bias: 127,
};

pub const D: Fmt = Fmt {
    sign: 0x8000_0000_0000_0000,
    exp_mask: 0x7ff0_0000_0000_0000,
    mant_mask: 0x000f_ffff_ffff_ffff,
    quiet: 0x0008_0000_0000_0000,
    canon: CANON_NAN_D,
    mant_bits: 52,
    bias: 1023,
};

impl Fmt {
    pub fn is_nan(&self, x: u64) -> bool {
        x & self.exp_mask == self.exp_mask && x & self.mant_mask != 0
    }
    pub fn is_snan(&self, x: u64) -> bool {
        self.is_nan(x) && x & self.quiet == 0
    }
    fn is_inf(&self, x: u64) -> bool {
        x & !self.sign == self.exp_mask
    }
    fn is_zero(&self, x: u64) -> bool {
        x & !self.sign == 0
    }
    fn snan_flag(&self, xs: &[u64]) -> u8 {
        if xs.iter().any(|&x| self.is_snan(x)) {
            NV
        } else {
            0
        }
    }
    /// Replace a NaN result by the canonical NaN.
    fn canonical(&self, x: u64) -> u64 {
        if self.is_nan(x) {
            self.canon
        } else {
            x
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn mxcsr_flags(m: u32) -> u8 {
    let mut f = 0;
    if m & 0x01 != 0 {
        f |= NV;
    }
    if m & 0x04 != 0 {
        f |= DZ;
    }
    if m & 0x08 != 0 {
        f |= OF;
    }
    if m & 0x10 != 0 {
        f |= UF;
    }
    if m & 0x20 != 0 {
        f |= NX;
    }
    f
}

/// MXCSR with all exceptions masked, flags clear, DAZ/FTZ off, and `rc`.
#[cfg(target_arch = "x86_64")]
fn mxcsr_for(rm: Rm) -> u32 {
    0x1f80 | (rm.mxcsr_rc() << 13)
}

macro_rules! sse_binop {
    ($name:ident, $ty:ty, $insn:literal) => {
        #[cfg(target_arch = "x86_64")]
        fn $name(a: $ty, b: $ty, rm: Rm) -> ($ty, u8) {
            let mut saved: u32 = 0;
            let mut ctl: u32 = mxcsr_for(rm);
            let out: $ty;
            // SAFETY: the block touches only the two named xmm registers and
            // MXCSR; MXCSR is saved first and restored last, so code outside
            // the block always runs in the default environment.
            unsafe {
                asm!(
                    "stmxcsr [{saved}]",
                    "ldmxcsr [{ctl}]",
                    concat!($insn, " {a}, {b}"),
                    "stmxcsr [{ctl}]",
                    "ldmxcsr [{saved}]",
                    saved = in(reg) &mut saved,
                    ctl = in(reg) &mut ctl,
                    a = inout(xmm_reg) a => out,
                    b = in(xmm_reg) b,
                    options(nostack),
                );
            }
            (out, mxcsr_flags(ctl))
        }
    };
}

sse_binop!(sse_add_s, f32, "addss");
sse_binop!(sse_sub_s, f32, "subss");
sse_binop!(sse_mul_s, f32, "mulss");
sse_binop!(sse_div_s, f32, "divss");
sse_binop!(sse_sqrt_s, f32, "sqrtss");
sse_binop!(sse_add_d, f64, "addsd");
sse_binop!(sse_sub_d, f64, "subsd");
sse_binop!(sse_mul_d, f64, "mulsd");
sse_binop!(sse_div_d, f64, "divsd");
sse_binop!(sse_sqrt_d, f64, "sqrtsd");

macro_rules! sse_fma {
    ($name:ident, $ty:ty, $insn:literal) => {
        /// `a * b + c`, rounded once.
        #[cfg(target_arch = "x86_64")]
        fn $name(a: $ty, b: $ty, c: $ty, rm: Rm) -> ($ty, u8) {
            let mut saved: u32 = 0;
            let mut ctl: u32 = mxcsr_for(rm);
            let out: $ty;
            // SAFETY: as in `sse_binop`; the instruction needs FMA3, which
            // `has_fma()` checked before any call.
            unsafe {
                asm!(
                    "stmxcsr [{saved}]",
                    "ldmxcsr [{ctl}]",
                    concat!($insn, " {c}, {a}, {b}"),
                    "stmxcsr [{ctl}]",
                    "ldmxcsr [{saved}]",
                    saved = in(reg) &mut saved,
                    ctl = in(reg) &mut ctl,
                    c = inout(xmm_reg) c => out,
                    a = in(xmm_reg) a,
                    b = in(xmm_reg) b,
                    options(nostack),
                );
            }
            (out, mxcsr_flags(ctl))
        }
    };
}

sse_fma!(sse_fma_s, f32, "vfmadd231ss");
sse_fma!(sse_fma_d, f64, "vfmadd231sd");

#[cfg(target_arch = "x86_64")]
fn sse_narrow(a: f64, rm: Rm) -> (f32, u8) {
    let mut saved: u32 = 0;
    let mut ctl: u32 = mxcsr_for(rm);
    let out: f32;
    // SAFETY: as in `sse_binop`.
    unsafe {
        asm!(
            "stmxcsr [{saved}]",
            "ldmxcsr [{ctl}]",
            "cvtsd2ss {o}, {a}",
            "stmxcsr [{ctl}]",
            "ldmxcsr [{saved}]",
            saved = in(reg) &mut saved,
            ctl = in(reg) &mut ctl,
            o = out(xmm_reg) out,
            a = in(xmm_reg) a,
            options(nostack),
        );
    }
    (out, mxcsr_flags(ctl))
}

#[cfg(target_arch = "x86_64")]
fn has_fma() -> bool {
    use std::sync::OnceLock;
    static FMA: OnceLock<bool> = OnceLock::new();
    *FMA.get_or_init(|| std::arch::is_x86_feature_detected!("fma"))
}

fn ap_flags(s: Status) -> u8 {
    let mut f = 0;
    if s.contains(Status::INVALID_OP) {
        f |= NV;
    }
    if s.contains(Status::DIV_BY_ZERO) {
        f |= DZ;
    }
    if s.contains(Status::OVERFLOW) {
        f |= OF;
    }
    if s.contains(Status::UNDERFLOW) {
        f |= UF;
    }
    if s.contains(Status::INEXACT) {
        f |= NX;
    }
    f
}

/// Binary arithmetic operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
}

fn ap_binop<F: Float>(op: BinOp, x: F, y: F, rm: Rm) -> rustc_apfloat::StatusAnd<F> {
    match op {
        BinOp::Add => x.add_r(y, rm.apfloat()),
        BinOp::Sub => x.sub_r(y, rm.apfloat()),
        BinOp::Mul => x.mul_r(y, rm.apfloat()),
        BinOp::Div => x.div_r(y, rm.apfloat()),
    }
}

/// `x` widened exactly: a single as a double, a double as a quad.
fn wide_s(x: u64) -> Double {
    Single::from_bits(x as u32 as u128).convert(&mut false).value
}
fn wide_d(x: u64) -> rustc_apfloat::ieee::Quad {
    Double::from_bits(x as u128).convert(&mut false).value
}

/// APFloat rounds a result past the range to the largest finite number in
/// the directed modes that call for it, with NX but without OF. Whether it
/// was past the range: `exact`, the same operation rounded toward zero in a
/// wider format, is at least 2^(emax + 1) (exact there, so no doubt).
fn overflow_fixed(f: &Fmt, bits: u64, flags: u8, exact: impl FnOnce() -> bool) -> u8 {
    let max_finite = (f.exp_mask - (1 << f.mant_bits)) | f.mant_mask;
    if bits & !f.sign == max_finite && flags & NX != 0 && flags & OF == 0 && exact() {
        flags | OF
    } else {
        flags
    }
}

/// APFloat calls a result tiny when it is subnormal once rounded to the
/// format; RISC-V (like x86) when, rounded to the format's precision with
/// an unbounded exponent, it would be below 2^emin. They differ only for
/// a result delivered as ±2^emin: it is tiny (UF, being inexact) unless
/// its exact magnitude rounds to 2^emin at full precision. `wide`: the
/// operation rounded toward zero in a wider format (`mant`, `bias`: its
/// layout), and whether that was inexact.
fn underflow_fixed<W: Float>(
    f: &Fmt,
    bits: u64,
    flags: u8,
    rm: Rm,
    (mant, bias): (u32, i32),
    wide: impl FnOnce() -> (W, bool),
) -> u8 {
    if bits & !f.sign != 1 << f.mant_bits || flags & NX == 0 || flags & UF != 0 {
        return flags;
    }
    let p = f.mant_bits + 1;
    let below_emin = ((bias + (1 - f.bias) - 1) as u128) << mant;
    // The largest p-bit number below 2^emin, and the midpoint above it.
    let below = W::from_bits(below_emin | (((1u128 << (p - 1)) - 1) << (mant - (p - 1))));
    let mid = W::from_bits(below_emin | (((1u128 << p) - 1) << (mant - p)));
    let (w, inexact) = wide();
    let w = w.abs();
    let negative = bits & f.sign != 0;
    let reaches = match rm {
        Rm::Rne | Rm::Rmm => w >= mid,
        Rm::Rup if !negative => w > below || (w == below && inexact),
        Rm::Rdn if negative => w > below || (w == below && inexact),
        // Toward zero, only a magnitude of 2^emin or more gives 2^emin.
        _ => true,
    };
    if reaches {
        flags
    } else {
        flags | UF
    }
}

const WIDE_S: (u32, i32) = (52, 1023);
const WIDE_D: (u32, i32) = (112, 16383);

/// 2^128 as a double and 2^1024 as a quad: one past single's and double's range.
fn past_s(x: Double) -> bool {
    x.abs() >= Double::from_bits(((1023 + 128) as u128) << 52)
}
fn past_d(x: rustc_apfloat::ieee::Quad) -> bool {
    x.abs() >= rustc_apfloat::ieee::Quad::from_bits(((16383 + 1024) as u128) << 112)
}

/// `a op b` in single precision, the portable way.
fn soft_binop_s(op: BinOp, a: u64, b: u64, rm: Rm) -> (u64, u8) {
    let r = ap_binop(op, Single::from_bits(a as u32 as u128), Single::from_bits(b as u32 as u128), rm);
    let bits = r.value.to_bits() as u64;
    let flags = ap_flags(r.status) | S.snan_flag(&[a, b]);
    let wide = || ap_binop(op, wide_s(a), wide_s(b), Rm::Rtz);
    let flags = overflow_fixed(&S, bits, flags, || past_s(wide().value));
    let flags = underflow_fixed(&S, bits, flags, rm, WIDE_S, || {
        let r = wide();
        (r.value, r.status.contains(Status::INEXACT))
    });
    (S.canonical(bits), flags)
}

/// `a op b` in double precision, the portable way.
fn soft_binop_d(op: BinOp, a: u64, b: u64, rm: Rm) -> (u64, u8) {
    let r = ap_binop(op, Double::from_bits(a as u128), Double::from_bits(b as u128), rm);
    let bits = r.value.to_bits() as u64;
    let flags = ap_flags(r.status) | D.snan_flag(&[a, b]);
    let wide = || ap_binop(op, wide_d(a), wide_d(b), Rm::Rtz);
    let flags = overflow_fixed(&D, bits, flags, || past_d(wide().value));
    let flags = underflow_fixed(&D, bits, flags, rm, WIDE_D, || {
        let r = wide();
        (r.value, r.status.contains(Status::INEXACT))
    });
    (D.canonical(bits), flags)
}

/// `a op b` in single precision.
pub fn binop_s(op: BinOp, a: u64, b: u64, rm: Rm) -> (u64, u8) {
    #[cfg(target_arch = "x86_64")]
    if !PORTABLE && rm != Rm::Rmm {
        let (fa, fb) = (f32::from_bits(a as u32), f32::from_bits(b as u32));
        let (r, f) = match op {
            BinOp::Add => sse_add_s(fa, fb, rm),
            BinOp::Sub => sse_sub_s(fa, fb, rm),
            BinOp::Mul => sse_mul_s(fa, fb, rm),
            BinOp::Div => sse_div_s(fa, fb, rm),
        };
        return (S.canonical(r.to_bits() as u64), f);
    }
    soft_binop_s(op, a, b, rm)
}

/// `a op b` in double precision.
pub fn binop_d(op: BinOp, a: u64, b: u64, rm: Rm) -> (u64, u8) {
    #[cfg(target_arch = "x86_64")]
    if !PORTABLE && rm != Rm::Rmm {
        let (fa, fb) = (f64::from_bits(a), f64::from_bits(b));
        let (r, f) = match op {
            BinOp::Add => sse_add_d(fa, fb, rm),
            BinOp::Sub => sse_sub_d(fa, fb, rm),
            BinOp::Mul => sse_mul_d(fa, fb, rm),
            BinOp::Div => sse_div_d(fa, fb, rm),
        };
        return (D.canonical(r.to_bits()), f);
    }
    soft_binop_d(op, a, b, rm)
}

/// Square root. A square root is never exactly halfway between two floats,
/// so RMM rounds as RNE.
pub fn sqrt_s(a: u64, rm: Rm) -> (u64, u8) {
    let rm = if rm == Rm::Rmm { Rm::Rne } else { rm };
    #[cfg(target_arch = "x86_64")]
    if !PORTABLE {
        let (r, f) = sse_sqrt_s(0.0, f32::from_bits(a as u32), rm);
        return (S.canonical(r.to_bits() as u64), f);
    }
    soft_sqrt(&S, a, rm)
}

pub fn sqrt_d(a: u64, rm: Rm) -> (u64, u8) {
    let rm = if rm == Rm::Rmm { Rm::Rne } else { rm };
    #[cfg(target_arch = "x86_64")]
    if !PORTABLE {
        let (r, f) = sse_sqrt_d(0.0, f64::from_bits(a), rm);
        return (D.canonical(r.to_bits()), f);
    }
    soft_sqrt(&D, a, rm)
}

/// A correctly rounded square root in integer arithmetic: the significand,
/// scaled to an even exponent and by enough bits that the integer root has
/// two bits past the precision, then rounded with the remainder as sticky
/// bit. The result is always normal (the root of the smallest subnormal is
/// about 2^-537 or 2^-75), and never overflows.
fn soft_sqrt(f: &Fmt, a: u64, rm: Rm) -> (u64, u8) {
    if f.is_nan(a) {
        return (f.canon, f.snan_flag(&[a]));
    }
    if f.is_zero(a) || (f.is_inf(a) && a & f.sign == 0) {
        return (a, 0);
    }
    if a & f.sign != 0 {
        return (f.canon, NV);
    }
    let p = f.mant_bits + 1;
    let biased = ((a & f.exp_mask) >> f.mant_bits) as i32;
    let frac = a & f.mant_mask;
    // a = m * 2^e, m an integer of p bits.
    let (mut m, mut e) = if biased == 0 {
        (frac, 1 - f.bias - f.mant_bits as i32)
    } else {
        (frac | (1 << f.mant_bits), biased - f.bias - f.mant_bits as i32)
    };
    while m < 1 << f.mant_bits {
        m <<= 1;
        e -= 1;
    }
    // m * 2^s has 2p + 3 or 2p + 4 bits for s = p + 3 or p + 4 (whichever
    // makes e - s even): its root has p + 2.
    let mut s = p as i32 + 3;
    if (e - s).rem_euclid(2) != 0 {
        s += 1;
    }
    let big = (m as u128) << s;
    let r = big.isqrt();
    let sticky = r * r != big;
    // The root is r * 2^((e - s) / 2): keep p bits of r's p + 2.
    let (mut q, low) = (r >> 2, r & 3);
    let inexact = low != 0 || sticky;
    let above_half = low == 3 || (low == 2 && sticky);
    let half = low == 2 && !sticky;
    let up = match rm {
        Rm::Rne => above_half || (half && q & 1 == 1),
        Rm::Rmm => above_half || half,
        Rm::Rup => inexact,
        Rm::Rtz | Rm::Rdn => false,
    };
    let mut exp = (e - s) / 2 + 2;
    if up {
        q += 1;
        if q == 1 << p {
            q >>= 1;
            exp += 1;
        }
    }
    let biased = (exp + f.mant_bits as i32 + f.bias) as u64;
    ((biased << f.mant_bits) | (q as u64 & f.mant_mask), if inexact { NX } else { 0 })
}

/// Fused multiply-add variants (11.6): the sign flips are exact, so each is
/// one `a * b + c` with negated inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FmaOp {
    /// a*b + c
    Madd,
    /// a*b - c
    Msub,
    /// -(a*b) + c
    Nmsub,
    /// -(a*b) - c
    Nmadd,
}

/// `portable`: take the portable path whatever the host has.
fn fma_generic(f: &Fmt, op: FmaOp, a: u64, b: u64, c: u64, rm: Rm, portable: bool) -> (u64, u8) {
    let single = f.mant_bits == S.mant_bits;
    let (a2, c2) = match op {
        FmaOp::Madd => (a, c),
        FmaOp::Msub => (a, c ^ f.sign),
        FmaOp::Nmsub => (a ^ f.sign, c),
        FmaOp::Nmadd => (a ^ f.sign, c ^ f.sign),
    };
    // 11.6: inf * 0 raises NV even when the addend is a quiet NaN.
    let inf_times_zero = (f.is_inf(a) && f.is_zero(b)) || (f.is_zero(a) && f.is_inf(b));
    if inf_times_zero {
        return (f.canon, NV);
    }
    #[cfg(target_arch = "x86_64")]
    let hardware = !portable && rm != Rm::Rmm && has_fma();
    #[cfg(not(target_arch = "x86_64"))]
    let hardware = {
        let _ = portable;
        false
    };
    let (bits, flags) = if !hardware {
        if single {
            let r = Single::from_bits(a2 as u32 as u128).mul_add_r(
                Single::from_bits(b as u32 as u128),
                Single::from_bits(c2 as u32 as u128),
                rm.apfloat(),
            );
            (r.value.to_bits() as u64, ap_flags(r.status) | f.snan_flag(&[a, b, c]))
        } else {
            let r = Double::from_bits(a2 as u128).mul_add_r(
                Double::from_bits(b as u128),
                Double::from_bits(c2 as u128),
                rm.apfloat(),
            );
            (r.value.to_bits() as u64, ap_flags(r.status) | f.snan_flag(&[a, b, c]))
        }
    } else {
        sse_fma(a2, b, c2, rm, single)
    };
    let rtz = Round::TowardZero;
    let flags = if hardware {
        flags
    } else if single {
        let wide = || wide_s(a2).mul_add_r(wide_s(b), wide_s(c2), rtz);
        let flags = overflow_fixed(f, bits, flags, || past_s(wide().value));
        underflow_fixed(f, bits, flags, rm, WIDE_S, || {
            let r = wide();
            (r.value, r.status.contains(Status::INEXACT))
        })
    } else {
        let wide = || wide_d(a2).mul_add_r(wide_d(b), wide_d(c2), rtz);
        let flags = overflow_fixed(f, bits, flags, || past_d(wide().value));
        underflow_fixed(f, bits, flags, rm, WIDE_D, || {
            let r = wide();
            (r.value, r.status.contains(Status::INEXACT))
        })
    };
    // A NaN result from a NaN input raises NV only for signalling inputs.
    let flags = if f.is_nan(bits) && !f.is_nan(a) && !f.is_nan(b) && !f.is_nan(c) {
        flags | NV
    } else if f.is_nan(a) || f.is_nan(b) || f.is_nan(c) {
        (flags & !NV) | f.snan_flag(&[a, b, c])
    } else {
        flags
    };
    (f.canonical(bits), flags)
}

#[cfg(target_arch = "x86_64")]
fn sse_fma(a: u64, b: u64, c: u64, rm: Rm, single: bool) -> (u64, u8) {
    if single {
        let (r, fl) = sse_fma_s(f32::from_bits(a as u32), f32::from_bits(b as u32), f32::from_bits(c as u32), rm);
        (r.to_bits() as u64, fl)
    } else {
        let (r, fl) = sse_fma_d(f64::from_bits(a), f64::from_bits(b), f64::from_bits(c), rm);
        (r.to_bits(), fl)
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn sse_fma(_: u64, _: u64, _: u64, _: Rm, _: bool) -> (u64, u8) {
    unreachable!("no SSE off x86-64: `hardware` is false")
}

pub fn fma_s(op: FmaOp, a: u64, b: u64, c: u64, rm: Rm) -> (u64, u8) {
    fma_generic(&S, op, a, b, c, rm, PORTABLE)
}

pub fn fma_d(op: FmaOp, a: u64, b: u64, c: u64, rm: Rm) -> (u64, u8) {
    fma_generic(&D, op, a, b, c, rm, PORTABLE)
}

/// fcvt.s.d
pub fn narrow_d_to_s(a: u64, rm: Rm) -> (u64, u8) {
    #[cfg(target_arch = "x86_64")]
    if !PORTABLE && rm != Rm::Rmm {
        let (r, f) = sse_narrow(f64::from_bits(a), rm);
        return (S.canonical(r.to_bits() as u64), f);
    }
    soft_narrow(a, rm)
}

fn soft_narrow(a: u64, rm: Rm) -> (u64, u8) {
    let mut lost = false;
    let r: rustc_apfloat::StatusAnd<Single> = Double::from_bits(a as u128).convert_r(rm.apfloat(), &mut lost);
    let bits = r.value.to_bits() as u64;
    let flags = ap_flags(r.status) | D.snan_flag(&[a]);
    let flags = overflow_fixed(&S, bits, flags, || past_s(Double::from_bits(a as u128)));
    let flags = underflow_fixed(&S, bits, flags, rm, WIDE_S, || (Double::from_bits(a as u128), false));
    (S.canonical(bits), flags)
}

/// fcvt.d.s: always exact.
pub fn widen_s_to_d(a: u64) -> (u64, u8) {
    if S.is_nan(a) {
        return (CANON_NAN_D, S.snan_flag(&[a]));
    }
    ((f32::from_bits(a as u32) as f64).to_bits(), 0)
}

/// fmin/fmax (11.6, version 2.2 semantics): -0 < +0; a single NaN operand
/// yields the other operand; only signalling NaNs raise NV.
pub fn minmax(f: &Fmt, a: u64, b: u64, max: bool) -> (u64, u8) {
    let flags = f.snan_flag(&[a, b]);
    let (an, bn) = (f.is_nan(a), f.is_nan(b));
    let r = match (an, bn) {
        (true, true) => f.canon,
        (true, false) => b,
        (false, true) => a,
        _ => {
            let a_lt_b = lt_ordered(f, a, b) || (f.is_zero(a) && f.is_zero(b) && a & f.sign != 0);
            if a_lt_b != max {
                a
            } else {
                b
            }
        }
    };
    (r, flags)
}

/// Total order of two non-NaN values, `a < b`, with -0 == +0.
fn lt_ordered(f: &Fmt, a: u64, b: u64) -> bool {
    let (sa, sb) = (a & f.sign != 0, b & f.sign != 0);
    if f.is_zero(a) && f.is_zero(b) {
        return false;
    }
    match (sa, sb) {
        (false, false) => a < b,
        (true, true) => a > b,
        (true, false) => true,
        (false, true) => false,
    }
}

/// Comparison kind for feq/flt/fle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Lt,
    Le,
}

/// feq is quiet (NV only for signalling NaNs); flt and fle signal on any NaN.
pub fn compare(f: &Fmt, cmp: Cmp, a: u64, b: u64) -> (u64, u8) {
    if f.is_nan(a) || f.is_nan(b) {
        let flags = if cmp == Cmp::Eq { f.snan_flag(&[a, b]) } else { NV };
        return (0, flags);
    }
    let eq = a == b || (f.is_zero(a) && f.is_zero(b));
    let r = match cmp {
        Cmp::Eq => eq,
        Cmp::Lt => lt_ordered(f, a, b),
        Cmp::Le => eq || lt_ordered(f, a, b),
    };
    (r as u64, 0)
}

/// fclass (Table 11.5): one bit set.
pub fn classify(f: &Fmt, a: u64) -> u64 {
    let neg = a & f.sign != 0;
    let exp = a & f.exp_mask;
    let mant = a & f.mant_mask;
    let bit = if exp == f.exp_mask {
        if mant == 0 {
            if neg {
                0
            } else {
                7
            }
        } else if a & f.quiet != 0 {
            9
        } else {
            8
        }
    } else if exp == 0 {
        match (mant == 0, neg) {
            (true, true) => 3,
            (true, false) => 4,
            (false, true) => 2,
            (false, false) => 5,
        }
    } else if neg {
        1
    } else {
        6
    };
    1 << bit
}

/// Shift `m` right by `shift`, rounding by `rm` for a value of sign `neg`.
/// Returns the rounded magnitude and whether it is inexact.
fn round_shift(m: u128, shift: u32, neg: bool, rm: Rm) -> (u128, bool) {
    if shift == 0 {
        return (m, false);
    }
    let (q, rem, half) = if shift >= 128 {
        // Everything is below the rounding point and below half of it.
        (0, m, u128::MAX)
    } else {
        (m >> shift, m & ((1u128 << shift) - 1), 1u128 << (shift - 1))
    };
    if rem == 0 {
        return (q, false);
    }
    let up = match rm {
        Rm::Rne => rem > half || (rem == half && q & 1 == 1),
        Rm::Rmm => rem >= half,
        Rm::Rtz => false,
        Rm::Rdn => neg,
        Rm::Rup => !neg,
    };
    (q + up as u128, true)
}

/// Integer target of a float-to-integer conversion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntTy {
    W,
    Wu,
    L,
    Lu,
}

impl IntTy {
    /// (minimum, maximum) as i128.
    fn range(self) -> (i128, i128) {
        match self {
            IntTy::W => (i32::MIN as i128, i32::MAX as i128),
            IntTy::Wu => (0, u32::MAX as i128),
            IntTy::L => (i64::MIN as i128, i64::MAX as i128),
            IntTy::Lu => (0, u64::MAX as i128),
        }
    }
    /// The register value of an integer result (W forms sign-extend).
    fn to_reg(self, v: i128) -> u64 {
        match self {
            IntTy::W | IntTy::Wu => v as i32 as i64 as u64,
            IntTy::L | IntTy::Lu => v as u64,
        }
    }
}

/// fcvt.{w,wu,l,lu}.{s,d} (11.7, Table 11.4): saturate out-of-range values,
/// NaN gives the maximum, NV replaces NX.
pub fn to_int(f: &Fmt, a: u64, ty: IntTy, rm: Rm) -> (u64, u8) {
    let (min, max) = ty.range();
    if f.is_nan(a) {
        return (ty.to_reg(max), NV);
    }
    let neg = a & f.sign != 0;
    let exp = ((a & f.exp_mask) >> f.mant_bits) as i32;
    let mant = a & f.mant_mask;
    let rounded: Option<(i128, bool)> = if exp == (f.exp_mask >> f.mant_bits) as i32 {
        None // infinity
    } else {
        // value = sig * 2^(e)
        let (sig, e) = if exp == 0 {
            (mant as u128, 1 - f.bias - f.mant_bits as i32)
        } else {
            ((mant | (1u64 << f.mant_bits)) as u128, exp - f.bias - f.mant_bits as i32)
        };
        if e >= 0 {
            if e > 70 {
                None
            } else {
                Some(((sig << e) as i128, false))
            }
        } else {
            let (q, inexact) = round_shift(sig, (-e) as u32, neg, rm);
            Some((q as i128, inexact))
        }
    };
    match rounded {
        Some((mag, inexact)) => {
            let v = if neg { -mag } else { mag };
            if v < min || v > max {
                (ty.to_reg(if neg { min } else { max }), NV)
            } else {
                (ty.to_reg(v), if inexact { NX } else { 0 })
            }
        }
        None => (ty.to_reg(if neg { min } else { max }), NV),
    }
}

/// fcvt.{s,d}.{w,wu,l,lu}: `neg`/`mag` is the integer's sign and magnitude.
pub fn from_int(f: &Fmt, neg: bool, mag: u64, rm: Rm) -> (u64, u8) {
    if mag == 0 {
        return (0, 0);
    }
    let p = f.mant_bits + 1;
    let msb = 63 - mag.leading_zeros();
    let sign = if neg { f.sign } else { 0 };
    let (sig, mut e, inexact) = if msb < p {
        ((mag as u128) << (p - 1 - msb), msb, false)
    } else {
        let (q, inexact) = round_shift(mag as u128, msb - (p - 1), neg, rm);
        (q, msb, inexact)
    };
    let mut sig = sig;
    if sig >> p != 0 {
        sig >>= 1;
        e += 1;
    }
    let bits = sign | ((e as u64 + f.bias as u64) << f.mant_bits) | (sig as u64 & f.mant_mask);
    (bits, if inexact { NX } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Operands that reach the corners: a third any bits, a third special
    /// values, a third random significands at exponents near the ends
    /// and the middle of the range (subnormals, underflow, overflow).
    struct Operands(u64);

    impl Operands {
        fn next_u64(&mut self) -> u64 {
            // SplitMix64.
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn of(&mut self, f: &Fmt) -> u64 {
            let r = self.next_u64();
            let width = f.mant_bits + (if f.mant_bits == 23 { 9 } else { 12 });
            let all = if width == 64 { u64::MAX } else { (1 << width) - 1 };
            let max_exp = f.exp_mask >> f.mant_bits;
            match r % 3 {
                0 => r.rotate_left(17) & all,
                1 => {
                    let specials =
                        [0, f.sign, f.exp_mask, f.exp_mask | f.sign, f.canon, f.exp_mask | 1, 1, f.mant_mask];
                    specials[(r >> 8) as usize % specials.len()] | ((r >> 20) & f.sign)
                }
                _ => {
                    let exps =
                        [0, 1, 2, (f.bias - 1) as u64, f.bias as u64, (f.bias + 1) as u64, max_exp - 2, max_exp - 1];
                    let e = exps[(r >> 3) as usize % exps.len()];
                    ((r >> 11) & f.sign) | (e << f.mant_bits) | (self.next_u64() & f.mant_mask)
                }
            }
        }
    }

    /// The portable path gives SSE's bits and flags, everywhere: the
    /// reference here is the hardware, itself checked against QEMU by the
    /// differential tests. (With `portable-fp`, the public functions are
    /// the portable path too, and this compares it with itself.)
    #[test]
    fn the_portable_path_matches_the_hardware() {
        let mut g = Operands(0x5eed);
        let modes = [Rm::Rne, Rm::Rtz, Rm::Rdn, Rm::Rup];
        let ops = [BinOp::Add, BinOp::Sub, BinOp::Mul, BinOp::Div];
        let fmas = [FmaOp::Madd, FmaOp::Msub, FmaOp::Nmsub, FmaOp::Nmadd];
        for i in 0..200_000 {
            let rm = modes[i % 4];
            let (op, fop) = (ops[(i / 4) % 4], fmas[(i / 16) % 4]);
            let (a, b, c) = (g.of(&S), g.of(&S), g.of(&S));
            let what = format!("single {op:?}/{fop:?} {a:#x} {b:#x} {c:#x} {rm:?}");
            assert_eq!(soft_binop_s(op, a, b, rm), binop_s(op, a, b, rm), "{what}");
            assert_eq!(soft_sqrt(&S, a, rm), sqrt_s(a, rm), "sqrt {what}");
            assert_eq!(fma_generic(&S, fop, a, b, c, rm, true), fma_s(fop, a, b, c, rm), "fma {what}");
            let (a, b, c) = (g.of(&D), g.of(&D), g.of(&D));
            let what = format!("double {op:?}/{fop:?} {a:#x} {b:#x} {c:#x} {rm:?}");
            assert_eq!(soft_binop_d(op, a, b, rm), binop_d(op, a, b, rm), "{what}");
            assert_eq!(soft_sqrt(&D, a, rm), sqrt_d(a, rm), "sqrt {what}");
            assert_eq!(fma_generic(&D, fop, a, b, c, rm, true), fma_d(fop, a, b, c, rm), "fma {what}");
            assert_eq!(soft_narrow(a, rm), narrow_d_to_s(a, rm), "narrow {what}");
        }
    }

    #[test]
    fn the_portable_square_root_is_exact_where_it_can_be() {
        for rm in [Rm::Rne, Rm::Rtz, Rm::Rdn, Rm::Rup, Rm::Rmm] {
            assert_eq!(soft_sqrt(&D, 4f64.to_bits(), rm), (2f64.to_bits(), 0));
            assert_eq!(soft_sqrt(&S, 0.25f32.to_bits() as u64, rm), (0.5f32.to_bits() as u64, 0));
            // The smallest subnormal: 2^-1074, whose root is 2^-537.
            assert_eq!(soft_sqrt(&D, 1, rm), (2f64.powi(-537).to_bits(), 0));
        }
        assert_eq!(soft_sqrt(&D, (-1f64).to_bits(), Rm::Rne), (CANON_NAN_D, NV));
        assert_eq!(soft_sqrt(&D, (-0f64).to_bits(), Rm::Rne), ((-0f64).to_bits(), 0));
        // The nearest double to sqrt(2) is above it.
        let two = soft_sqrt(&D, 2f64.to_bits(), Rm::Rne);
        assert_eq!(two, (std::f64::consts::SQRT_2.to_bits(), NX));
        assert_eq!(soft_sqrt(&D, 2f64.to_bits(), Rm::Rup), two);
        assert_eq!(soft_sqrt(&D, 2f64.to_bits(), Rm::Rdn), (two.0 - 1, NX));
    }

    fn d(x: f64) -> u64 {
        x.to_bits()
    }
    fn s(x: f32) -> u64 {
        x.to_bits() as u64
    }

    #[test]
    fn add_flags_and_rounding_modes() {
        // 1 + 2^-60 is inexact; RUP rounds up one ulp, RNE/RTZ/RDN keep 1.
        let tiny = d(2f64.powi(-60));
        assert_eq!(binop_d(BinOp::Add, d(1.0), tiny, Rm::Rne), (d(1.0), NX));
        assert_eq!(binop_d(BinOp::Add, d(1.0), tiny, Rm::Rup), (d(1.0) + 1, NX));
        assert_eq!(binop_d(BinOp::Add, d(1.0), tiny, Rm::Rdn), (d(1.0), NX));
        assert_eq!(binop_d(BinOp::Add, d(1.0), tiny, Rm::Rmm), (d(1.0), NX));
        assert_eq!(binop_d(BinOp::Add, d(1.5), d(2.5), Rm::Rne), (d(4.0), 0));
    }

    #[test]
    fn ties_to_even_versus_away() {
        // 1 + 2^-53 is exactly halfway between 1 and 1+2^-52.
        let half_ulp = d(2f64.powi(-53));
        assert_eq!(binop_d(BinOp::Add, d(1.0), half_ulp, Rm::Rne), (d(1.0), NX));
        assert_eq!(binop_d(BinOp::Add, d(1.0), half_ulp, Rm::Rmm), (d(1.0) + 1, NX));
        let half_ulp_s = s(2f32.powi(-24));
        assert_eq!(binop_s(BinOp::Add, s(1.0), half_ulp_s, Rm::Rmm), (s(1.0) + 1, NX));
    }

    #[test]
    fn x_minus_x_is_negative_zero_only_rounding_down() {
        assert_eq!(binop_d(BinOp::Sub, d(3.0), d(3.0), Rm::Rne).0, d(0.0));
        assert_eq!(binop_d(BinOp::Sub, d(3.0), d(3.0), Rm::Rdn).0, d(-0.0));
    }

    #[test]
    fn nan_results_are_canonical_and_snan_signals() {
        let snan = 0x7ff0_0000_0000_0001;
        let qnan_payload = 0xfff8_0000_0000_1234;
        assert_eq!(binop_d(BinOp::Add, snan, d(1.0), Rm::Rne), (CANON_NAN_D, NV));
        assert_eq!(binop_d(BinOp::Add, qnan_payload, d(1.0), Rm::Rne), (CANON_NAN_D, 0));
        assert_eq!(binop_d(BinOp::Add, snan, d(1.0), Rm::Rmm), (CANON_NAN_D, NV));
        assert_eq!(binop_d(BinOp::Sub, d(f64::INFINITY), d(f64::INFINITY), Rm::Rne), (CANON_NAN_D, NV));
        assert_eq!(sqrt_d(d(-1.0), Rm::Rne), (CANON_NAN_D, NV));
        assert_eq!(sqrt_d(d(-0.0), Rm::Rne), (d(-0.0), 0));
    }

    #[test]
    fn divide_by_zero_overflow_underflow() {
        assert_eq!(binop_d(BinOp::Div, d(1.0), d(0.0), Rm::Rne), (d(f64::INFINITY), DZ));
        assert_eq!(binop_d(BinOp::Mul, d(f64::MAX), d(2.0), Rm::Rne), (d(f64::INFINITY), OF | NX));
        assert_eq!(binop_d(BinOp::Mul, d(f64::MAX), d(2.0), Rm::Rtz), (d(f64::MAX), OF | NX));
        // Smallest subnormal halved: tiny and inexact.
        let (r, f) = binop_d(BinOp::Mul, 1, d(0.5), Rm::Rne);
        assert_eq!((r, f), (0, UF | NX));
        // Exact subnormal result: no underflow flag.
        assert_eq!(binop_d(BinOp::Mul, 2, d(0.5), Rm::Rne), (1, 0));
    }

    #[test]
    fn fma_rounds_once() {
        // (1+2^-52)*(1-2^-52) = 1 - 2^-104: one rounding keeps the tail.
        let a = d(1.0) + 1;
        let b = d(1.0 - 2f64.powi(-52));
        let (r, f) = fma_d(FmaOp::Msub, a, b, d(1.0), Rm::Rne);
        assert_eq!(f64::from_bits(r), -(2f64.powi(-104)));
        assert_eq!(f, 0);
        // inf * 0 + qNaN signals invalid.
        assert_eq!(fma_d(FmaOp::Madd, d(f64::INFINITY), d(0.0), CANON_NAN_D, Rm::Rne), (CANON_NAN_D, NV));
        // RMM through apfloat agrees on an exact case.
        assert_eq!(fma_d(FmaOp::Nmadd, d(2.0), d(3.0), d(1.0), Rm::Rmm), (d(-7.0), 0));
    }

    #[test]
    fn min_max_rules() {
        let snan = 0x7ff0_0000_0000_0001;
        assert_eq!(minmax(&D, d(-0.0), d(0.0), false), (d(-0.0), 0));
        assert_eq!(minmax(&D, d(0.0), d(-0.0), true), (d(0.0), 0));
        assert_eq!(minmax(&D, CANON_NAN_D, d(2.0), false), (d(2.0), 0));
        assert_eq!(minmax(&D, snan, d(2.0), true), (d(2.0), NV));
        assert_eq!(minmax(&D, snan, CANON_NAN_D, true), (CANON_NAN_D, NV));
    }

    #[test]
    fn compares_signal_as_specified() {
        assert_eq!(compare(&D, Cmp::Eq, CANON_NAN_D, d(1.0)), (0, 0));
        assert_eq!(compare(&D, Cmp::Lt, CANON_NAN_D, d(1.0)), (0, NV));
        assert_eq!(compare(&D, Cmp::Le, d(-0.0), d(0.0)), (1, 0));
        assert_eq!(compare(&D, Cmp::Lt, d(-2.0), d(-1.0)), (1, 0));
        assert_eq!(compare(&S, Cmp::Eq, s(-0.0), s(0.0)), (1, 0));
    }

    #[test]
    fn float_to_int_saturates_and_rounds() {
        assert_eq!(to_int(&D, d(2.5), IntTy::W, Rm::Rne), (2, NX));
        assert_eq!(to_int(&D, d(2.5), IntTy::W, Rm::Rmm), (3, NX));
        assert_eq!(to_int(&D, d(-2.5), IntTy::W, Rm::Rdn), ((-3i64) as u64, NX));
        assert_eq!(to_int(&D, d(-2.5), IntTy::W, Rm::Rup), ((-2i64) as u64, NX));
        assert_eq!(to_int(&D, d(1e20), IntTy::L, Rm::Rne), (i64::MAX as u64, NV));
        assert_eq!(to_int(&D, d(-1.0), IntTy::Lu, Rm::Rne), (0, NV));
        assert_eq!(to_int(&D, d(-0.5), IntTy::Lu, Rm::Rtz), (0, NX));
        assert_eq!(to_int(&D, CANON_NAN_D, IntTy::W, Rm::Rne), (i32::MAX as u64, NV));
        assert_eq!(to_int(&D, CANON_NAN_D, IntTy::Wu, Rm::Rne), (u64::MAX, NV)); // sign-extended
        assert_eq!(to_int(&D, d(f64::NEG_INFINITY), IntTy::L, Rm::Rne), (i64::MIN as u64, NV));
        assert_eq!(to_int(&S, s(4294967040.0), IntTy::Wu, Rm::Rne), (0xffff_ffff_ffff_ff00, 0));
    }

    #[test]
    fn int_to_float_rounds() {
        assert_eq!(from_int(&D, false, u64::MAX, Rm::Rne), (d(18446744073709551616.0), NX));
        assert_eq!(from_int(&D, false, u64::MAX, Rm::Rtz), (d(18446744073709549568.0), NX));
        assert_eq!(from_int(&S, true, 16777217, Rm::Rne), (s(-16777216.0), NX));
        assert_eq!(from_int(&S, true, 16777217, Rm::Rdn), (s(-16777218.0), NX));
        assert_eq!(from_int(&D, true, 5, Rm::Rne), (d(-5.0), 0));
        assert_eq!(from_int(&D, false, 0, Rm::Rne), (0, 0));
    }

    #[test]
    fn classify_each_class() {
        assert_eq!(classify(&D, d(f64::NEG_INFINITY)), 1 << 0);
        assert_eq!(classify(&D, d(-1.0)), 1 << 1);
        assert_eq!(classify(&D, D.sign | 1), 1 << 2);
        assert_eq!(classify(&D, d(-0.0)), 1 << 3);
        assert_eq!(classify(&D, d(0.0)), 1 << 4);
        assert_eq!(classify(&D, 1), 1 << 5);
        assert_eq!(classify(&D, d(1.0)), 1 << 6);
        assert_eq!(classify(&D, d(f64::INFINITY)), 1 << 7);
        assert_eq!(classify(&D, 0x7ff0_0000_0000_0001), 1 << 8);
        assert_eq!(classify(&D, CANON_NAN_D), 1 << 9);
    }

    #[test]
    fn narrowing_and_widening() {
        assert_eq!(narrow_d_to_s(d(1.0 + 2f64.powi(-30)), Rm::Rne), (s(1.0), NX));
        assert_eq!(narrow_d_to_s(d(1.0 + 2f64.powi(-30)), Rm::Rup), (s(1.0) + 1, NX));
        assert_eq!(narrow_d_to_s(d(1e300), Rm::Rne), (s(f32::INFINITY), OF | NX));
        assert_eq!(narrow_d_to_s(0x7ff0_0000_0000_0001, Rm::Rne), (CANON_NAN_S, NV));
        assert_eq!(widen_s_to_d(0x7f80_0001), (CANON_NAN_D, NV));
        assert_eq!(widen_s_to_d(1), ((f32::from_bits(1) as f64).to_bits(), 0));
    }

    #[test]
    fn sse_environment_is_restored() {
        let _ = binop_d(BinOp::Div, d(1.0), d(3.0), Rm::Rup);
        // Rust arithmetic after the call still rounds to nearest.
        let third = std::hint::black_box(1.0f64) / std::hint::black_box(3.0f64);
        assert_eq!(third.to_bits(), 0x3fd5_5555_5555_5555);
    }
}
