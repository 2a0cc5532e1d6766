//! The block loop: executes one decoded block in a single tight `match`.
//!
//! This is the hot path of the interpreter (ENGINE-NOTES section 1): pc
//! and position stay in locals, each op is one arm, and the arms for RV64I
//! and M are written inline (M's special cases are `#[inline(always)]`
//! functions in `int.rs`), as are loads and stores with their TLB fast
//! path. Everything rare leaves the loop through an out-of-line call:
//! `load_slow`/`store_slow` (`mem.rs`), `exec_amo` (`amo.rs`), `exec_fp`
//! (`fp.rs`), `csr_op` (`csr/file.rs`) and `exec_system` (`system.rs`).
//!
//! An early exit (trap, device access, CSR write or system op that may
//! enable an interrupt) leaves `pc` and `position` exact: a faulting op
//! does not retire; a device access retires and ends the block.

use super::int;
use crate::bus::Bus;
use crate::decode::{Kind, Op};
use crate::hart::{x, Core};
use crate::mem::Loaded;
use crate::trap::Trap;

/// What a block's execution asks of the dispatcher.
pub(crate) enum End {
    Continue,
    Trap(Trap),
    Wfi,
    Device,
}

impl Core {
    /// Execute the block `ops` that starts at `self.pc`, for at most
    /// `budget` positions. A taken branch back to the block's own start
    /// (a tight loop) runs the block again without leaving, budget allowing.
    #[inline(always)]
    pub(crate) fn exec_block<B: Bus>(&mut self, bus: &mut B, ops: &[Op], budget: usize) -> End {
        use Kind::*;
        let base = self.pc;
        let mut start = self.position;
        let mut budget = budget;
        let mut n;
        'again: loop {
            n = ops.len().min(budget);
            for (i, op) in ops[..n].iter().enumerate() {
                let pos = start + i as u64;
                macro_rules! next_pc {
                    () => {
                        base.wrapping_add(op.off as u64 + op.len as u64)
                    };
                }
                macro_rules! fault {
                    ($t:expr) => {{
                        self.position = pos;
                        self.pc = base.wrapping_add(op.off as u64);
                        return End::Trap($t);
                    }};
                }
                // The op completed a device access (or wrote code): retire it
                // and leave, so the board can act before the next one.
                macro_rules! device_exit {
                    () => {{
                        self.pc = next_pc!();
                        self.position = pos + 1;
                        return End::Device;
                    }};
                }
                macro_rules! retire_jump {
                    ($target:expr) => {{
                        self.pc = $target;
                        self.position = pos + 1;
                        return End::Continue;
                    }};
                }
                // A taken branch leaves the block; a branch not taken falls
                // through to the next op (blocks run on past conditional
                // branches: one dispatch per taken branch, not per branch).
                macro_rules! branch {
                    ($cond:expr) => {{
                        if $cond {
                            let t = base.wrapping_add(op.off as u64).wrapping_add(op.imm as i64 as u64);
                            if t == base && budget > i + 1 {
                                budget -= i + 1;
                                start = pos + 1;
                                continue 'again;
                            }
                            retire_jump!(t)
                        }
                    }};
                }
                macro_rules! addr {
                    () => {
                        x!(self, op.rs1).wrapping_add(op.imm as i64 as u64)
                    };
                }
                macro_rules! ld {
                    ($n:literal, $conv:expr) => {{
                        let vaddr = addr!();
                        match self.load_hit::<B, $n>(bus, vaddr) {
                            Some(v) => x!(self, op.rd) = $conv(v),
                            None => match self.load_slow(bus, vaddr, $n, pos) {
                                Ok(Loaded::Value(v)) => x!(self, op.rd) = $conv(v),
                                Ok(Loaded::Device(v)) => {
                                    x!(self, op.rd) = $conv(v);
                                    device_exit!();
                                }
                                Err(t) => fault!(t),
                            },
                        }
                    }};
                }
                macro_rules! st {
                    ($n:literal) => {{
                        match self.store::<B, $n>(bus, addr!(), x!(self, op.rs2), pos) {
                            Ok(false) => {}
                            Ok(true) => {
                                device_exit!();
                            }
                            Err(t) => fault!(t),
                        }
                    }};
                }
                macro_rules! r1 {
                    () => {
                        x!(self, op.rs1)
                    };
                }
                macro_rules! r2 {
                    () => {
                        x!(self, op.rs2)
                    };
                }
                let imm = op.imm as i64 as u64;
                let sh = (op.imm & 63) as u32;
                match op.kind {
                    Nop | Fence => {}
                    Lui => x!(self, op.rd) = imm,
                    Auipc => x!(self, op.rd) = base.wrapping_add(op.off as u64).wrapping_add(imm),
                    JalLink => x!(self, op.rd) = next_pc!(),
                    Jal => {
                        x!(self, op.rd) = next_pc!();
                        retire_jump!(base.wrapping_add(op.off as u64).wrapping_add(imm))
                    }
                    Jalr => {
                        let t = r1!().wrapping_add(imm) & !1;
                        x!(self, op.rd) = next_pc!();
                        retire_jump!(t)
                    }
                    Beq => branch!(r1!() == r2!()),
                    Bne => branch!(r1!() != r2!()),
                    Blt => branch!((r1!() as i64) < (r2!() as i64)),
                    Bge => branch!((r1!() as i64) >= (r2!() as i64)),
                    Bltu => branch!(r1!() < r2!()),
                    Bgeu => branch!(r1!() >= r2!()),
                    Lb => ld!(1, |v: u64| v as i8 as i64 as u64),
                    Lh => ld!(2, |v: u64| v as i16 as i64 as u64),
                    Lw => ld!(4, |v: u64| v as i32 as i64 as u64),
                    Ld => ld!(8, |v: u64| v),
                    Lbu => ld!(1, |v: u64| v),
                    Lhu => ld!(2, |v: u64| v),
                    Lwu => ld!(4, |v: u64| v),
                    Sb => st!(1),
                    Sh => st!(2),
                    Sw => st!(4),
                    Sd => st!(8),
                    Addi => x!(self, op.rd) = r1!().wrapping_add(imm),
                    Slti => x!(self, op.rd) = ((r1!() as i64) < (imm as i64)) as u64,
                    Sltiu => x!(self, op.rd) = (r1!() < imm) as u64,
                    Xori => x!(self, op.rd) = r1!() ^ imm,
                    Ori => x!(self, op.rd) = r1!() | imm,
                    Andi => x!(self, op.rd) = r1!() & imm,
                    Slli => x!(self, op.rd) = r1!() << sh,
                    Srli => x!(self, op.rd) = r1!() >> sh,
                    Srai => x!(self, op.rd) = ((r1!() as i64) >> sh) as u64,
                    Add => x!(self, op.rd) = r1!().wrapping_add(r2!()),
                    Sub => x!(self, op.rd) = r1!().wrapping_sub(r2!()),
                    Sll => x!(self, op.rd) = r1!() << (r2!() & 63),
                    Slt => x!(self, op.rd) = ((r1!() as i64) < (r2!() as i64)) as u64,
                    Sltu => x!(self, op.rd) = (r1!() < r2!()) as u64,
                    Xor => x!(self, op.rd) = r1!() ^ r2!(),
                    Srl => x!(self, op.rd) = r1!() >> (r2!() & 63),
                    Sra => x!(self, op.rd) = ((r1!() as i64) >> (r2!() & 63)) as u64,
                    Or => x!(self, op.rd) = r1!() | r2!(),
                    And => x!(self, op.rd) = r1!() & r2!(),
                    Addiw => x!(self, op.rd) = r1!().wrapping_add(imm) as i32 as i64 as u64,
                    Slliw => x!(self, op.rd) = ((r1!() as u32) << (sh & 31)) as i32 as i64 as u64,
                    Srliw => x!(self, op.rd) = ((r1!() as u32) >> (sh & 31)) as i32 as i64 as u64,
                    Sraiw => x!(self, op.rd) = ((r1!() as i32) >> (sh & 31)) as i64 as u64,
                    Addw => x!(self, op.rd) = r1!().wrapping_add(r2!()) as i32 as i64 as u64,
                    Subw => x!(self, op.rd) = r1!().wrapping_sub(r2!()) as i32 as i64 as u64,
                    Sllw => x!(self, op.rd) = ((r1!() as u32) << (r2!() & 31)) as i32 as i64 as u64,
                    Srlw => x!(self, op.rd) = ((r1!() as u32) >> (r2!() & 31)) as i32 as i64 as u64,
                    Sraw => x!(self, op.rd) = ((r1!() as i32) >> (r2!() & 31)) as i64 as u64,
                    Mul => x!(self, op.rd) = r1!().wrapping_mul(r2!()),
                    Mulh => x!(self, op.rd) = int::mulh(r1!(), r2!()),
                    Mulhsu => x!(self, op.rd) = int::mulhsu(r1!(), r2!()),
                    Mulhu => x!(self, op.rd) = int::mulhu(r1!(), r2!()),
                    Div => x!(self, op.rd) = int::div(r1!(), r2!()),
                    Divu => x!(self, op.rd) = int::divu(r1!(), r2!()),
                    Rem => x!(self, op.rd) = int::rem(r1!(), r2!()),
                    Remu => x!(self, op.rd) = int::remu(r1!(), r2!()),
                    Mulw => x!(self, op.rd) = int::mulw(r1!(), r2!()),
                    Divw => x!(self, op.rd) = int::divw(r1!(), r2!()),
                    Divuw => x!(self, op.rd) = int::divuw(r1!(), r2!()),
                    Remw => x!(self, op.rd) = int::remw(r1!(), r2!()),
                    Remuw => x!(self, op.rd) = int::remuw(r1!(), r2!()),
                    LrW | ScW | LrD | ScD | AmoswapW | AmoaddW | AmoxorW | AmoandW | AmoorW | AmominW | AmomaxW
                    | AmominuW | AmomaxuW | AmoswapD | AmoaddD | AmoxorD | AmoandD | AmoorD | AmominD | AmomaxD
                    | AmominuD | AmomaxuD => match self.exec_amo(bus, op, pos) {
                        Ok(false) => {}
                        Ok(true) => {
                            device_exit!();
                        }
                        Err(t) => fault!(t),
                    },
                    Csrrw | Csrrs | Csrrc | Csrrwi | Csrrsi | Csrrci => {
                        self.position = pos;
                        self.pc = base.wrapping_add(op.off as u64);
                        if let Err(t) = self.csr_op(op) {
                            return End::Trap(t);
                        }
                        if self.attention {
                            retire_jump!(next_pc!())
                        }
                    }
                    Ecall | Ebreak | Mret | Sret | Wfi | SfenceVma | FenceI => {
                        self.position = pos;
                        self.pc = base.wrapping_add(op.off as u64);
                        match self.exec_system(op) {
                            Err(t) => return End::Trap(t),
                            Ok(wait) => {
                                if !matches!(op.kind, Mret | Sret) {
                                    self.pc = next_pc!();
                                }
                                self.position = pos + 1;
                                return if wait { End::Wfi } else { End::Continue };
                            }
                        }
                    }
                    Illegal => fault!(Trap::illegal(op.imm as u32)),
                    _ => match self.exec_fp(bus, op, pos) {
                        Ok(false) => {}
                        Ok(true) => {
                            device_exit!();
                        }
                        Err(t) => fault!(t),
                    },
                }
            }
            break;
        }
        // Fell off the end: the block was cut short (continue at its next
        // op, which may be a followed jump's target) or ended without a jump
        // (its last op is never a `JalLink`).
        self.pc = match ops.get(n) {
            Some(next) => base.wrapping_add(next.off as u64),
            None => {
                let last = ops[n - 1];
                base.wrapping_add(last.off as u64 + last.len as u64)
            }
        };
        self.position = start + n as u64;
        End::Continue
    }
}

#[cfg(test)]
mod tests {
    use crate::asm::*;
    use crate::test_utils::*;
    use crate::{Exit, Position};

    #[test]
    fn run_stops_exactly_at_the_target_inside_a_block() {
        let body: Vec<u32> = (0..40).map(|_| addi(A0, A0, 1)).collect();
        let (mut h, mut bus) = setup(&body);
        assert_eq!(h.run(&mut bus, Position(17)), Exit::Reached);
        assert_eq!(h.position(), Position(17));
        assert_eq!(h.x(10), 17);
        assert_eq!(h.pc(), BASE + 17 * 4);
        assert_eq!(h.run(&mut bus, Position(30)), Exit::Reached);
        assert_eq!(h.x(10), 30);
    }

    /// Blocks run on through forward jumps and untaken branches; stopping
    /// right after such a jump, or at a taken branch, leaves pc exact.
    #[test]
    fn stops_after_followed_jumps_and_branches_are_exact() {
        let w = [
            jal(RA, 12),        // 0: link = 4, continue at 12
            addi(A0, A0, 100),  // 4: skipped
            addi(A0, A0, 100),  // 8: skipped
            addi(A0, A0, 1),    // 12
            beq(A0, ZERO, 100), // 16: not taken
            addi(A0, A0, 1),    // 20
            bne(A0, ZERO, 8),   // 24: taken, to 32
            addi(A0, A0, 100),  // 28: skipped
            addi(A1, A0, 0),    // 32
        ];
        let (mut h, mut bus) = setup(&w);
        h.run(&mut bus, Position(1));
        assert_eq!((h.pc(), h.x(1)), (BASE + 12, BASE + 4), "after the followed jal");
        h.run(&mut bus, Position(3));
        assert_eq!(h.pc(), BASE + 20, "after the untaken branch");
        h.run(&mut bus, Position(5));
        assert_eq!(h.pc(), BASE + 32, "after the taken branch");
        h.run(&mut bus, Position(6));
        assert_eq!((h.x(10), h.x(11)), (2, 2));
        // The same program in one go gives the same state.
        let (mut g, mut bus2) = setup(&w);
        g.run(&mut bus2, Position(6));
        assert_eq!((g.pc(), g.x(1), g.x(10), g.x(11)), (h.pc(), h.x(1), h.x(10), h.x(11)));
    }

    /// A tight loop re-runs its block in place; a stop inside it is exact.
    #[test]
    fn tight_loops_stop_exactly_mid_iteration() {
        let w = [addi(T0, ZERO, 10), addi(A0, A0, 1), addi(T0, T0, -1), bne(T0, ZERO, -8), addi(A1, A0, 0)];
        let (mut h, mut bus) = setup(&w);
        h.run(&mut bus, Position(15));
        assert_eq!((h.x(10), h.x(5), h.pc()), (5, 5, BASE + 12));
        h.run(&mut bus, Position(32));
        assert_eq!((h.x(10), h.x(5), h.x(11), h.pc()), (10, 0, 10, BASE + 20));
        assert_eq!(h.position(), Position(32));
    }
}
