//! The A extension (unprivileged ISA chapter 8): LR/SC and the AMOs.
//!
//! Out of line from the block loop. AMOs are aligned and never split; their
//! faults are store/AMO faults (LR's are load faults). One hart: an SC
//! succeeds if the reservation still holds the same physical address, and
//! any trap, xRET or SC clears it.

use crate::bus::Bus;
use crate::decode::{Kind, Op};
use crate::hart::{x, Core};
use crate::mmu::Access;
use crate::trap::Trap;

impl Core {
    /// A-extension ops (chapter 8). Returns whether the block must end.
    #[inline(never)]
    pub(crate) fn exec_amo<B: Bus>(&mut self, bus: &mut B, op: &Op, pos: u64) -> Result<bool, Trap> {
        use Kind::*;
        let vaddr = x!(self, op.rs1);
        let word = matches!(
            op.kind,
            LrW | ScW | AmoswapW | AmoaddW | AmoxorW | AmoandW | AmoorW | AmominW | AmomaxW | AmominuW | AmomaxuW
        );
        let size = if word { 4 } else { 8 };
        let ext = |v: u64| {
            if word {
                v as u32 as i32 as i64 as u64
            } else {
                v
            }
        };
        match op.kind {
            LrW | LrD => {
                let pa = self.amo_addr(bus, vaddr, size, true)?;
                let v = self.phys_load(bus, pa, size, pos).ok_or(Access::Read.access_fault(vaddr))?;
                self.reservation = pa;
                x!(self, op.rd) = ext(v);
                Ok(false)
            }
            ScW | ScD => {
                let pa = self.amo_addr(bus, vaddr, size, false)?;
                let ok = self.reservation == pa;
                self.reservation = u64::MAX;
                let mut end = false;
                if ok {
                    end = self
                        .phys_store(bus, pa, size, x!(self, op.rs2), pos)
                        .ok_or(Access::Write.access_fault(vaddr))?;
                }
                x!(self, op.rd) = (!ok) as u64;
                Ok(end)
            }
            _ => {
                let pa = self.amo_addr(bus, vaddr, size, false)?;
                let old = ext(self.phys_load(bus, pa, size, pos).ok_or(Access::Write.access_fault(vaddr))?);
                let src = ext(x!(self, op.rs2));
                let new = match op.kind {
                    AmoswapW | AmoswapD => src,
                    AmoaddW | AmoaddD => old.wrapping_add(src),
                    AmoxorW | AmoxorD => old ^ src,
                    AmoandW | AmoandD => old & src,
                    AmoorW | AmoorD => old | src,
                    AmominW | AmominD => (old as i64).min(src as i64) as u64,
                    AmomaxW | AmomaxD => (old as i64).max(src as i64) as u64,
                    AmominuW | AmominuD => old.min(src),
                    _ => old.max(src),
                };
                let end = self.phys_store(bus, pa, size, new, pos).ok_or(Access::Write.access_fault(vaddr))?;
                x!(self, op.rd) = old;
                Ok(end)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::asm::*;
    use crate::test_utils::*;
    use crate::trap;
    use crate::Position;

    #[test]
    fn lr_sc_reservation_is_single_use_and_cleared_by_traps() {
        let lr_d = |rd, rs1| r(0x2f, 3, 0x02 << 2, rd, rs1, 0);
        let sc_d = |rd, rs1, rs2| r(0x2f, 3, 0x03 << 2, rd, rs1, rs2);
        let (mut h, mut bus) = setup(&with_regs(
            &[(A0, BASE + 0x4000), (A1, 9)],
            &[lr_d(A2, A0), sc_d(A3, A0, A1), sc_d(A4, A0, A1), lr_d(A2, A0), ECALL],
        ));
        h.run(&mut bus, Position(200));
        assert_eq!(h.x(13), 0, "first sc succeeds");
        assert_eq!(h.x(14), 1, "second sc fails");
        assert_eq!(h.csrs().mcause, trap::ECALL_FROM_M);
        assert_eq!(h.core.reservation, u64::MAX, "the trap cleared the reservation");
    }
}
