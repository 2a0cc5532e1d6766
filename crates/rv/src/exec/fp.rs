//! The F and D extensions (unprivileged ISA chapters 11 and 12): `exec_fp`
//! and the FP register helpers (NaN boxing, dynamic rounding mode, flags,
//! `mstatus.FS`).
//!
//! Out of line from the block loop: FP is rare in kernels. The arithmetic
//! itself (exact IEEE 754 results and flags in software) is `crate::fp`.

use crate::bus::Bus;
use crate::decode::{Kind, Op};
use crate::fp::{self, BinOp, Cmp, FmaOp, IntTy, Rm};
use crate::hart::{x, Core};
use crate::mem::Loaded;
use crate::trap::{self, Trap, TVAL_INSN_BITS};

impl Core {
    // ----- FP registers and flags -----

    #[inline]
    fn rm(&self, op: &Op) -> Result<Rm, Trap> {
        let rm = if op.rm == 7 { self.csr.frm } else { op.rm };
        Rm::from_bits(rm).ok_or(Trap::new(trap::ILLEGAL_INSTRUCTION, TVAL_INSN_BITS))
    }

    /// Single-precision operand: an improperly NaN-boxed value reads as the
    /// canonical NaN (11.2).
    #[inline]
    fn fs(&self, r: u8) -> u64 {
        let v = self.f[r as usize & 31];
        if v >> 32 == 0xffff_ffff {
            v & 0xffff_ffff
        } else {
            fp::CANON_NAN_S
        }
    }

    #[inline]
    fn fd(&self, r: u8) -> u64 {
        self.f[r as usize & 31]
    }

    #[inline]
    fn set_fs(&mut self, r: u8, v: u64) {
        self.f[r as usize & 31] = 0xffff_ffff_0000_0000 | v;
        self.mark_fs_dirty();
    }

    #[inline]
    fn set_fd(&mut self, r: u8, v: u64) {
        self.f[r as usize & 31] = v;
        self.mark_fs_dirty();
    }

    #[inline]
    fn raise(&mut self, flags: u8) {
        if flags != 0 {
            self.csr.fflags |= flags;
            self.mark_fs_dirty();
        }
    }

    /// Execute one F/D op (out of line: FP is rare in kernels).
    #[inline(never)]
    pub(crate) fn exec_fp<B: Bus>(&mut self, bus: &mut B, op: &Op, pos: u64) -> Result<bool, Trap> {
        use Kind::*;
        if !self.fs_on() {
            return Err(Trap::new(trap::ILLEGAL_INSTRUCTION, TVAL_INSN_BITS));
        }
        let (a_s, b_s, c_s) = (self.fs(op.rs1), self.fs(op.rs2), self.fs(op.rs3));
        let (a_d, b_d, c_d) = (self.fd(op.rs1), self.fd(op.rs2), self.fd(op.rs3));
        match op.kind {
            Flw | Fld => {
                let vaddr = x!(self, op.rs1).wrapping_add(op.imm as i64 as u64);
                let loaded = if op.kind == Flw {
                    self.load::<B, 4>(bus, vaddr, pos)
                } else {
                    self.load::<B, 8>(bus, vaddr, pos)
                };
                let (v, device) = match loaded? {
                    Loaded::Value(v) => (v, false),
                    Loaded::Device(v) => (v, true),
                };
                if op.kind == Flw {
                    self.set_fs(op.rd, v);
                } else {
                    self.set_fd(op.rd, v);
                }
                return Ok(device);
            }
            Fsw => {
                let raw = self.f[op.rs2 as usize & 31];
                return self.store::<B, 4>(bus, x!(self, op.rs1).wrapping_add(op.imm as i64 as u64), raw, pos);
            }
            Fsd => {
                let raw = self.f[op.rs2 as usize & 31];
                return self.store::<B, 8>(bus, x!(self, op.rs1).wrapping_add(op.imm as i64 as u64), raw, pos);
            }
            FmaddS | FmsubS | FnmsubS | FnmaddS => {
                let f = [FmaOp::Madd, FmaOp::Msub, FmaOp::Nmsub, FmaOp::Nmadd][(op.kind as u8 - FmaddS as u8) as usize];
                let (r, fl) = fp::fma_s(f, a_s, b_s, c_s, self.rm(op)?);
                self.raise(fl);
                self.set_fs(op.rd, r);
            }
            FmaddD | FmsubD | FnmsubD | FnmaddD => {
                let f = [FmaOp::Madd, FmaOp::Msub, FmaOp::Nmsub, FmaOp::Nmadd][(op.kind as u8 - FmaddD as u8) as usize];
                let (r, fl) = fp::fma_d(f, a_d, b_d, c_d, self.rm(op)?);
                self.raise(fl);
                self.set_fd(op.rd, r);
            }
            FaddS | FsubS | FmulS | FdivS => {
                let b = [BinOp::Add, BinOp::Sub, BinOp::Mul, BinOp::Div][(op.kind as u8 - FaddS as u8) as usize];
                let (r, fl) = fp::binop_s(b, a_s, b_s, self.rm(op)?);
                self.raise(fl);
                self.set_fs(op.rd, r);
            }
            FaddD | FsubD | FmulD | FdivD => {
                let b = [BinOp::Add, BinOp::Sub, BinOp::Mul, BinOp::Div][(op.kind as u8 - FaddD as u8) as usize];
                let (r, fl) = fp::binop_d(b, a_d, b_d, self.rm(op)?);
                self.raise(fl);
                self.set_fd(op.rd, r);
            }
            FsqrtS => {
                let (r, fl) = fp::sqrt_s(a_s, self.rm(op)?);
                self.raise(fl);
                self.set_fs(op.rd, r);
            }
            FsqrtD => {
                let (r, fl) = fp::sqrt_d(a_d, self.rm(op)?);
                self.raise(fl);
                self.set_fd(op.rd, r);
            }
            FsgnjS => self.set_fs(op.rd, (a_s & !fp::S.sign) | (b_s & fp::S.sign)),
            FsgnjnS => self.set_fs(op.rd, (a_s & !fp::S.sign) | (!b_s & fp::S.sign)),
            FsgnjxS => self.set_fs(op.rd, a_s ^ (b_s & fp::S.sign)),
            FsgnjD => self.set_fd(op.rd, (a_d & !fp::D.sign) | (b_d & fp::D.sign)),
            FsgnjnD => self.set_fd(op.rd, (a_d & !fp::D.sign) | (!b_d & fp::D.sign)),
            FsgnjxD => self.set_fd(op.rd, a_d ^ (b_d & fp::D.sign)),
            FminS | FmaxS => {
                let (r, fl) = fp::minmax(&fp::S, a_s, b_s, op.kind == FmaxS);
                self.raise(fl);
                self.set_fs(op.rd, r);
            }
            FminD | FmaxD => {
                let (r, fl) = fp::minmax(&fp::D, a_d, b_d, op.kind == FmaxD);
                self.raise(fl);
                self.set_fd(op.rd, r);
            }
            FcvtSD => {
                let (r, fl) = fp::narrow_d_to_s(a_d, self.rm(op)?);
                self.raise(fl);
                self.set_fs(op.rd, r);
            }
            FcvtDS => {
                self.rm(op)?;
                let (r, fl) = fp::widen_s_to_d(a_s);
                self.raise(fl);
                self.set_fd(op.rd, r);
            }
            FeqS | FltS | FleS | FeqD | FltD | FleD => {
                let cmp = match op.kind {
                    FeqS | FeqD => Cmp::Eq,
                    FltS | FltD => Cmp::Lt,
                    _ => Cmp::Le,
                };
                let (r, fl) = if matches!(op.kind, FeqS | FltS | FleS) {
                    fp::compare(&fp::S, cmp, a_s, b_s)
                } else {
                    fp::compare(&fp::D, cmp, a_d, b_d)
                };
                self.raise(fl);
                x!(self, op.rd) = r;
            }
            FcvtWS | FcvtWuS | FcvtLS | FcvtLuS => {
                let ty = [IntTy::W, IntTy::Wu, IntTy::L, IntTy::Lu][(op.kind as u8 - FcvtWS as u8) as usize];
                let (r, fl) = fp::to_int(&fp::S, a_s, ty, self.rm(op)?);
                self.raise(fl);
                x!(self, op.rd) = r;
            }
            FcvtWD | FcvtWuD | FcvtLD | FcvtLuD => {
                let ty = [IntTy::W, IntTy::Wu, IntTy::L, IntTy::Lu][(op.kind as u8 - FcvtWD as u8) as usize];
                let (r, fl) = fp::to_int(&fp::D, a_d, ty, self.rm(op)?);
                self.raise(fl);
                x!(self, op.rd) = r;
            }
            FcvtSW | FcvtSWu | FcvtSL | FcvtSLu | FcvtDW | FcvtDWu | FcvtDL | FcvtDLu => {
                let v = x!(self, op.rs1);
                let (neg, mag) = match op.kind {
                    FcvtSW | FcvtDW => ((v as i32) < 0, (v as i32 as i64).unsigned_abs()),
                    FcvtSWu | FcvtDWu => (false, v & 0xffff_ffff),
                    FcvtSL | FcvtDL => ((v as i64) < 0, (v as i64).unsigned_abs()),
                    _ => (false, v),
                };
                let rm = self.rm(op)?;
                if matches!(op.kind, FcvtSW | FcvtSWu | FcvtSL | FcvtSLu) {
                    let (r, fl) = fp::from_int(&fp::S, neg, mag, rm);
                    self.raise(fl);
                    self.set_fs(op.rd, r);
                } else {
                    let (r, fl) = fp::from_int(&fp::D, neg, mag, rm);
                    self.raise(fl);
                    self.set_fd(op.rd, r);
                }
            }
            FmvXW => x!(self, op.rd) = self.f[op.rs1 as usize & 31] as u32 as i32 as i64 as u64,
            FmvXD => x!(self, op.rd) = self.f[op.rs1 as usize & 31],
            FclassS => x!(self, op.rd) = fp::classify(&fp::S, a_s),
            FclassD => x!(self, op.rd) = fp::classify(&fp::D, a_d),
            FmvWX => self.set_fs(op.rd, x!(self, op.rs1) & 0xffff_ffff),
            FmvDX => self.set_fd(op.rd, x!(self, op.rs1)),
            _ => unreachable!("exec_fp called on {:?}", op.kind),
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use crate::asm::*;
    use crate::csr::*;
    use crate::test_utils::*;
    use crate::trap;
    use crate::Position;

    /// FP needs `mstatus.FS` on, else it is illegal and `mtval` holds the
    /// instruction (11.1); an FP write sets FS to Dirty; single-precision
    /// operands that are not NaN-boxed read as the canonical NaN (11.2).
    #[test]
    fn fp_needs_fs_on_and_dirties_it() {
        let fadd_s = r(0x53, 0, 0, 1, 2, 3);
        let (mut h, mut bus) = setup(&[fadd_s]);
        h.core.csr.mstatus &= !MSTATUS_FS;
        h.run(&mut bus, Position(1));
        assert_eq!((h.csrs().mcause, h.csrs().mtval), (trap::ILLEGAL_INSTRUCTION, fadd_s as u64));
        let h = run(&[fadd_s]);
        assert_eq!(h.csrs().mcause, 0, "no trap");
        assert_eq!(h.csrs().mstatus & MSTATUS_FS, MSTATUS_FS_DIRTY);
        assert_eq!(h.f(1), 0xffff_ffff_7fc0_0000, "canonical NaN, boxed");
    }
}
