//! RV64I and M semantics (unprivileged ISA chapters 2, 5 and 7).
//!
//! The block loop (`block.rs`) executes these ops inline in its one
//! `match`: the RV64I ops, branches, loads and stores are one expression
//! or one macro each and stay there. The M extension's results with
//! special cases (Table 7.1: division by zero and signed overflow never
//! trap) are here, as `#[inline(always)]` functions of the operand values,
//! so they compile to exactly what an inline arm would.

/// High 64 bits of signed x signed.
#[inline(always)]
pub(crate) fn mulh(a: u64, b: u64) -> u64 {
    ((a as i64 as i128 * b as i64 as i128) >> 64) as u64
}

/// High 64 bits of signed x unsigned.
#[inline(always)]
pub(crate) fn mulhsu(a: u64, b: u64) -> u64 {
    ((a as i64 as i128).wrapping_mul(b as i128) >> 64) as u64
}

/// High 64 bits of unsigned x unsigned.
#[inline(always)]
pub(crate) fn mulhu(a: u64, b: u64) -> u64 {
    ((a as u128 * b as u128) >> 64) as u64
}

/// Signed division: x/0 = -1, MIN/-1 = MIN (Table 7.1).
#[inline(always)]
pub(crate) fn div(a: u64, b: u64) -> u64 {
    match (a as i64, b as i64) {
        (_, 0) => u64::MAX,
        (i64::MIN, -1) => a,
        (a, b) => (a / b) as u64,
    }
}

/// Unsigned division: x/0 = 2^64 - 1.
#[inline(always)]
pub(crate) fn divu(a: u64, b: u64) -> u64 {
    a.checked_div(b).unwrap_or(u64::MAX)
}

/// Signed remainder: x%0 = x, MIN%-1 = 0.
#[inline(always)]
pub(crate) fn rem(a: u64, b: u64) -> u64 {
    match (a as i64, b as i64) {
        (_, 0) => a,
        (i64::MIN, -1) => 0,
        (a, b) => (a % b) as u64,
    }
}

/// Unsigned remainder: x%0 = x.
#[inline(always)]
pub(crate) fn remu(a: u64, b: u64) -> u64 {
    a.checked_rem(b).unwrap_or(a)
}

/// The W forms work on the low 32 bits and sign-extend the 32-bit result.
#[inline(always)]
pub(crate) fn mulw(a: u64, b: u64) -> u64 {
    (a as i32).wrapping_mul(b as i32) as i64 as u64
}

#[inline(always)]
pub(crate) fn divw(a: u64, b: u64) -> u64 {
    match (a as i32, b as i32) {
        (_, 0) => u64::MAX,
        (i32::MIN, -1) => i32::MIN as i64 as u64,
        (a, b) => (a / b) as i64 as u64,
    }
}

#[inline(always)]
pub(crate) fn divuw(a: u64, b: u64) -> u64 {
    match (a as u32).checked_div(b as u32) {
        Some(q) => q as i32 as i64 as u64,
        None => u64::MAX,
    }
}

#[inline(always)]
pub(crate) fn remw(a: u64, b: u64) -> u64 {
    match (a as i32, b as i32) {
        (a, 0) => a as i64 as u64,
        (i32::MIN, -1) => 0,
        (a, b) => (a % b) as i64 as u64,
    }
}

#[inline(always)]
pub(crate) fn remuw(a: u64, b: u64) -> u64 {
    (a as u32).checked_rem(b as u32).unwrap_or(a as u32) as i32 as i64 as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::asm::*;
    use crate::test_utils::*;

    const DIV: (u32, u32) = (4, 1);
    const DIVU: (u32, u32) = (5, 1);
    const REM: (u32, u32) = (6, 1);
    const REMU: (u32, u32) = (7, 1);

    fn m_op(op: u32, (f3, f7): (u32, u32), rd: u32, rs1: u32, rs2: u32) -> u32 {
        r(op, f3, f7, rd, rs1, rs2)
    }

    /// Table 7.1, on the functions themselves.
    #[test]
    fn table_7_1_special_cases() {
        let min = i64::MIN as u64;
        let m1 = u64::MAX; // -1
        assert_eq!((div(7, 0), divu(7, 0), rem(7, 0), remu(7, 0)), (m1, m1, 7, 7));
        assert_eq!((div(min, m1), rem(min, m1)), (min, 0));
        let wmin = 0x8000_0000;
        assert_eq!((divw(7, 0), divuw(7, 0), remw(7, 0), remuw(7, 0)), (m1, m1, 7, 7));
        assert_eq!((divw(wmin, m1), remw(wmin, m1)), (0xffff_ffff_8000_0000, 0));
        // W forms sign-extend their 32-bit result, remainders included.
        assert_eq!(remw(0x8000_0005, 0), 0xffff_ffff_8000_0005);
        assert_eq!(remuw(0x8000_0005, 0), 0xffff_ffff_8000_0005);
        assert_eq!(divuw(0xffff_fffe, 1), 0xffff_ffff_ffff_fffe);
    }

    /// The signed high halves from the unsigned one by the usual identity
    /// (subtract the other operand for each negative operand, mod 2^64),
    /// and the unsigned one from four 32-bit partial products.
    #[test]
    fn high_products_match_an_independent_oracle() {
        let hu = |a: u64, b: u64| {
            let (a0, a1, b0, b1) = (a & 0xffff_ffff, a >> 32, b & 0xffff_ffff, b >> 32);
            let mid = ((a0 * b0) >> 32) + ((a1 * b0) & 0xffff_ffff) + ((a0 * b1) & 0xffff_ffff);
            a1 * b1 + ((a1 * b0) >> 32) + ((a0 * b1) >> 32) + (mid >> 32)
        };
        let neg = |v: u64, other: u64| if (v as i64) < 0 { other } else { 0 };
        let vals = [0, 1, 2, 3, 0x7fff_ffff_ffff_ffff, 0x8000_0000_0000_0000, u64::MAX, 0x1234_5678_9abc_def0];
        for &a in &vals {
            for &b in &vals {
                assert_eq!(mulhu(a, b), hu(a, b), "{a:#x} * {b:#x}");
                assert_eq!(mulh(a, b), hu(a, b).wrapping_sub(neg(a, b)).wrapping_sub(neg(b, a)), "{a:#x} * {b:#x}");
                assert_eq!(mulhsu(a, b), hu(a, b).wrapping_sub(neg(a, b)), "{a:#x} * {b:#x}");
            }
        }
    }

    #[test]
    fn division_by_zero_and_overflow() {
        // 7.2: x/0 = -1 (all ones), x%0 = x; MIN/-1 = MIN, MIN%-1 = 0.
        let h = run(&with_regs(
            &[(A0, 7), (A1, 0), (A2, i64::MIN as u64), (A3, u64::MAX)],
            &[
                m_op(0x33, DIV, T0, A0, A1),
                m_op(0x33, DIVU, T1, A0, A1),
                m_op(0x33, REM, T2, A0, A1),
                m_op(0x33, REMU, A4, A0, A1),
                m_op(0x33, DIV, A5, A2, A3),
                m_op(0x33, REM, 16, A2, A3),
                // W forms: 0x8000_0000 / -1 and / 0, results sign-extended.
                m_op(0x3b, DIV, 17, A2, A3),
            ],
        ));
        assert_eq!(h.x(5), u64::MAX);
        assert_eq!(h.x(6), u64::MAX);
        assert_eq!(h.x(7), 7);
        assert_eq!(h.x(14), 7);
        assert_eq!(h.x(15), i64::MIN as u64);
        assert_eq!(h.x(16), 0);
        // low word of i64::MIN is 0: 0 / -1 = 0
        assert_eq!(h.x(17), 0);
        let h = run(&with_regs(
            &[(A0, 0x8000_0000), (A1, u64::MAX), (A2, 0)],
            &[m_op(0x3b, DIV, T0, A0, A1), m_op(0x3b, REM, T1, A0, A1), m_op(0x3b, DIVU, T2, A0, A2)],
        ));
        assert_eq!(h.x(5), 0xffff_ffff_8000_0000);
        assert_eq!(h.x(6), 0);
        assert_eq!(h.x(7), u64::MAX);
    }

    #[test]
    fn shifts_use_only_the_low_bits_of_the_amount() {
        let sll = |rd, a, b| r(0x33, 1, 0, rd, a, b);
        let sllw = |rd, a, b| r(0x3b, 1, 0, rd, a, b);
        let sraw = |rd, a, b| r(0x3b, 5, 0x20, rd, a, b);
        let h = run(&with_regs(
            &[(A0, 1), (A1, 63), (A2, 64), (A3, 32), (A4, 0x8000_0000)],
            &[sll(T0, A0, A1), sll(T1, A0, A2), sllw(T2, A0, A3), sraw(A5, A4, A1), slli(16, A0, 63)],
        ));
        assert_eq!(h.x(5), 1 << 63);
        assert_eq!(h.x(6), 1); // shift by 64 is shift by 0
        assert_eq!(h.x(7), 1); // sllw by 32 is by 0
        assert_eq!(h.x(15), u64::MAX); // 0x8000_0000 >> 31 arithmetic, sign-extended
        assert_eq!(h.x(16), 1 << 63);
    }

    #[test]
    fn w_forms_sign_extend() {
        let addw = |rd, a, b| r(0x3b, 0, 0, rd, a, b);
        let mulw = |rd, a, b| r(0x3b, 0, 1, rd, a, b);
        let h = run(&with_regs(
            &[(A0, 0x7fff_ffff), (A1, 1), (A2, 0x1_0000_0000)],
            &[addw(T0, A0, A1), mulw(T1, A0, A0), i(0x1b, 0, T2, A2, -1)],
        ));
        assert_eq!(h.x(5), 0xffff_ffff_8000_0000);
        assert_eq!(h.x(6), 1); // 0x3fff_ffff_0000_0001 truncated
        assert_eq!(h.x(7), u64::MAX); // addiw of 0x1_0000_0000 - 1 = 0xffff_ffff -> -1
    }
}
