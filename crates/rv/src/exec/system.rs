//! Traps, interrupts and the system instructions other than Zicsr
//! (Privileged ISA chapter 3 and 4): trap entry and delegation, interrupt
//! priority, ECALL/EBREAK, MRET/SRET, WFI, SFENCE.VMA and FENCE.I.
//!
//! Every op here ends its block: each may change privilege, translation or
//! interrupt enables, which the dispatcher (`run.rs`) must see.

use crate::bus::Bus;
use crate::csr::*;
use crate::decode::{Kind, Op};
use crate::hart::{x, Core, Flush, Hart};
use crate::mmu::Access;
use crate::trap::{self, Trap, INTERRUPT_BIT, TVAL_INSN_BITS};

impl Core {
    /// The highest-priority interrupt that is pending and enabled (3.1.9).
    pub(crate) fn pending_interrupt(&self) -> Option<u64> {
        let pending = self.mip() & self.csr.mie;
        if pending == 0 {
            return None;
        }
        const ORDER: [u64; 6] = [11, 3, 7, 9, 1, 5];
        let m_enabled = self.prv < PRV_M || self.csr.mstatus & MSTATUS_MIE != 0;
        let m = pending & !self.csr.mideleg;
        if m_enabled && m != 0 {
            return ORDER.iter().copied().find(|&c| m & (1 << c) != 0);
        }
        let s_enabled = self.prv < PRV_S || (self.prv == PRV_S && self.csr.mstatus & MSTATUS_SIE != 0);
        let s = pending & self.csr.mideleg;
        if s_enabled && s != 0 {
            return ORDER.iter().copied().find(|&c| s & (1 << c) != 0);
        }
        None
    }

    /// Enter the trap handler (3.1.6.1, 3.1.7, 4.1.2).
    pub(crate) fn take_trap(&mut self, cause: u64, tval: u64) {
        let interrupt = cause & INTERRUPT_BIT != 0;
        let code = cause & !INTERRUPT_BIT;
        let deleg = if interrupt { self.csr.mideleg } else { self.csr.medeleg };
        let to_s = self.prv <= PRV_S && (deleg >> code) & 1 != 0;
        let s = &mut self.csr;
        let (tvec, status) = if to_s {
            s.scause = cause;
            s.sepc = self.pc;
            s.stval = tval;
            let mut st = s.mstatus & !(MSTATUS_SPP | MSTATUS_SPIE | MSTATUS_SIE);
            if s.mstatus & MSTATUS_SIE != 0 {
                st |= MSTATUS_SPIE;
            }
            if self.prv == PRV_S {
                st |= MSTATUS_SPP;
            }
            self.prv = PRV_S;
            (s.stvec, st)
        } else {
            s.mcause = cause;
            s.mepc = self.pc;
            s.mtval = tval;
            let mut st = s.mstatus & !(MSTATUS_MPP | MSTATUS_MPIE | MSTATUS_MIE);
            if s.mstatus & MSTATUS_MIE != 0 {
                st |= MSTATUS_MPIE;
            }
            st |= (self.prv as u64) << MSTATUS_MPP_SHIFT;
            self.prv = PRV_M;
            (s.mtvec, st)
        };
        s.mstatus = status;
        let base = tvec & !3;
        self.pc = if interrupt && tvec & 1 == 1 { base + 4 * code } else { base };
        self.reservation = u64::MAX;
        self.update_ctx();
    }

    /// System instructions other than Zicsr. `Ok(true)`: the hart waits (WFI).
    pub(crate) fn exec_system(&mut self, op: &Op) -> Result<bool, Trap> {
        self.attention = true;
        let ill = Trap::new(trap::ILLEGAL_INSTRUCTION, TVAL_INSN_BITS);
        match op.kind {
            Kind::Ecall => Err(Trap::new(trap::ECALL_FROM_U + self.prv as u64, 0)),
            Kind::Ebreak => Err(Trap::new(trap::BREAKPOINT, self.pc)),
            Kind::Mret => {
                if self.prv != PRV_M {
                    return Err(ill);
                }
                let st = self.csr.mstatus;
                let mpp = ((st & MSTATUS_MPP) >> MSTATUS_MPP_SHIFT) as u8;
                let mut n = st & !(MSTATUS_MIE | MSTATUS_MPP);
                if st & MSTATUS_MPIE != 0 {
                    n |= MSTATUS_MIE;
                }
                n |= MSTATUS_MPIE;
                if mpp != PRV_M {
                    n &= !MSTATUS_MPRV;
                }
                self.csr.mstatus = n;
                self.prv = mpp;
                self.pc = self.csr.mepc;
                self.reservation = u64::MAX;
                self.update_ctx();
                Ok(false)
            }
            Kind::Sret => {
                if self.prv < PRV_S || (self.prv == PRV_S && self.csr.mstatus & MSTATUS_TSR != 0) {
                    return Err(ill);
                }
                let st = self.csr.mstatus;
                let spp = if st & MSTATUS_SPP != 0 { PRV_S } else { PRV_U };
                let mut n = st & !(MSTATUS_SIE | MSTATUS_SPP | MSTATUS_MPRV);
                if st & MSTATUS_SPIE != 0 {
                    n |= MSTATUS_SIE;
                }
                n |= MSTATUS_SPIE;
                self.csr.mstatus = n;
                self.prv = spp;
                self.pc = self.csr.sepc;
                self.reservation = u64::MAX;
                self.update_ctx();
                Ok(false)
            }
            Kind::Wfi => {
                // 3.3.3: TW traps WFI below M; in U-mode WFI is always illegal here.
                if self.prv == PRV_U || (self.prv == PRV_S && self.csr.mstatus & MSTATUS_TW != 0) {
                    return Err(ill);
                }
                Ok(self.mip() & self.csr.mie == 0)
            }
            Kind::SfenceVma => {
                if self.prv == PRV_U || (self.prv == PRV_S && self.csr.mstatus & MSTATUS_TVM != 0) {
                    return Err(ill);
                }
                // rs1 = x0: every address; otherwise one address. ASIDs are
                // not implemented (ASIDLEN = 0), so rs2 does not narrow it.
                if op.rs1 == 0 {
                    self.tlb.flush_paged();
                } else {
                    self.tlb.flush_page(x!(self, op.rs1));
                }
                self.flush = Flush::Jumps;
                Ok(false)
            }
            Kind::FenceI => {
                // Stores to code pages already dropped their blocks; fence.i
                // only has to end the block (ENGINE-NOTES §4).
                Ok(false)
            }
            _ => unreachable!(),
        }
    }
}

impl Hart {
    /// Take a synchronous exception: one position step, not retired.
    pub(crate) fn exception<B: Bus>(&mut self, bus: &mut B, mut t: Trap) {
        if t.cause == trap::ILLEGAL_INSTRUCTION && t.tval == TVAL_INSN_BITS {
            t.tval = self.raw_insn_at_pc(bus).unwrap_or(0);
        }
        self.core.position += 1;
        self.core.exceptions += 1;
        self.core.take_trap(t.cause, t.tval);
    }

    /// Re-read the instruction bits at pc, for `xtval` of an instruction
    /// found illegal only at execution time (e.g. FP with FS = Off). The
    /// fetch already succeeded, so the translation does too.
    fn raw_insn_at_pc<B: Bus>(&mut self, bus: &mut B) -> Option<u64> {
        let pc = self.core.pc;
        let mut half = |core: &mut Core, va: u64| -> Option<u64> {
            let pa = core.translate(bus, va, Access::Fetch).ok()?;
            core.phys_load(bus, pa, 2, 0)
        };
        let lo = half(&mut self.core, pc)?;
        if lo & 3 != 3 {
            return Some(lo);
        }
        Some(lo | half(&mut self.core, pc.wrapping_add(2))? << 16)
    }
}

#[cfg(test)]
mod tests {
    use crate::asm::*;
    use crate::csr::*;
    use crate::test_utils::*;
    use crate::trap::{self, INTERRUPT_BIT};
    use crate::Position;

    #[test]
    fn a_faulting_instruction_does_not_retire_but_moves_the_position() {
        let (mut h, mut bus) = setup(&with_regs(&[(A0, 0x10)], &[ld(A1, A0, 0)]));
        let before = h.read_csr(crate::csr::MINSTRET).unwrap();
        h.run(&mut bus, Position(13));
        assert_eq!(h.csrs().mcause, trap::LOAD_ACCESS_FAULT);
        assert_eq!(h.csrs().mtval, 0x10);
        assert_eq!(h.position(), Position(13)); // 12 retired + 1 exception
        assert_eq!(h.read_csr(crate::csr::MINSTRET).unwrap() - before, 12);
    }

    #[test]
    fn interrupts_wait_for_the_enable_and_follow_priority() {
        let (mut h, mut bus) = setup(&[addi(A0, A0, 1); 100]);
        h.set_irq(IRQ_MTI, true);
        h.set_irq(IRQ_MSI, true);
        h.run(&mut bus, Position(5));
        assert_eq!(h.prv(), PRV_M);
        assert_eq!(h.pc(), BASE + 20, "MIE is off: nothing taken");
        h.core.csr.mie = IRQ_MTI | IRQ_MSI;
        h.core.csr.mstatus |= MSTATUS_MIE;
        h.run(&mut bus, Position(6));
        assert_eq!(h.csrs().mcause, INTERRUPT_BIT | 3, "MSI before MTI");
        assert_eq!(h.csrs().mepc, BASE + 20);
        assert_eq!(h.csrs().mstatus & MSTATUS_MIE, 0);
    }
}
