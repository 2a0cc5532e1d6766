//! The CSR file's semantics, as `impl Core`: what reading and writing each
//! CSR does (Privileged ISA 20211203, chapters 2-4), the Zicsr instructions
//! (unprivileged ISA chapter 9), and the values derived from the position:
//! `time`, `cycle`, `instret` (3.3.1) and Sstc's STIP.
//!
//! The registers themselves are [`Csrs`]; the counters are not stored but
//! computed from the position with offsets, so M-mode writes to `mcycle`
//! and `minstret` stick and `mcountinhibit` freezes them.

use super::*;
use crate::decode::{Kind, Op};
use crate::hart::{x, Core, Flush};
use crate::trap::{self, Trap, TVAL_INSN_BITS};

impl Core {
    // ----- time, counters, interrupt lines -----

    pub(crate) fn time(&self) -> u64 {
        self.position / self.cfg.insns_per_tick
    }

    fn cycles(&self) -> u64 {
        self.cycle_frozen.unwrap_or(self.position.wrapping_add(self.cycle_offset))
    }

    fn instret(&self) -> u64 {
        self.instret_frozen.unwrap_or((self.position - self.exceptions - self.idle).wrapping_add(self.instret_offset))
    }

    pub(crate) fn mip(&self) -> u64 {
        self.csr.mip | self.mip_ext
    }

    /// Recompute Sstc's STIP and the position of its next change.
    pub(crate) fn update_stimer(&mut self) {
        if self.csr.menvcfg & MENVCFG_STCE == 0 {
            self.mip_ext &= !IRQ_STI;
            self.stimer_pos = u64::MAX;
            return;
        }
        if self.time() >= self.csr.stimecmp {
            self.mip_ext |= IRQ_STI;
            self.stimer_pos = u64::MAX;
        } else {
            self.mip_ext &= !IRQ_STI;
            self.stimer_pos = self.csr.stimecmp.saturating_mul(self.cfg.insns_per_tick);
        }
    }

    /// Where `update_stimer` last left the S-timer's next change, derived
    /// from a saved state without touching STIP. Guest time can pass
    /// `stimecmp` without the hart running (an idle skip, catching up
    /// with host time): STIP then rises at the run loop's next check, not
    /// during the skip. A state saved in between has STIP still to come,
    /// and the restored hart must raise it at the same check, not at once
    /// (its state, and so its state hash, would differ from the saved one).
    pub(crate) fn restore_stimer(&mut self) {
        self.stimer_pos = if self.csr.menvcfg & MENVCFG_STCE == 0 || self.mip_ext & IRQ_STI != 0 {
            u64::MAX
        } else {
            self.csr.stimecmp.saturating_mul(self.cfg.insns_per_tick)
        };
    }

    // ----- access checks, reads, writes -----

    fn counter_allowed(&self, csr: u16, prv: u8) -> bool {
        let bit = 1u64 << (csr & 31);
        match prv {
            PRV_M => true,
            PRV_S => self.csr.mcounteren & bit != 0,
            _ => self.csr.mcounteren & bit != 0 && self.csr.scounteren & bit != 0,
        }
    }

    fn stimecmp_allowed(&self, prv: u8) -> bool {
        match prv {
            PRV_M => true,
            _ => self.csr.menvcfg & MENVCFG_STCE != 0 && self.csr.mcounteren & 2 != 0,
        }
    }

    pub(crate) fn fs_on(&self) -> bool {
        self.csr.mstatus & MSTATUS_FS != 0
    }

    pub(crate) fn mark_fs_dirty(&mut self) {
        self.csr.mstatus |= MSTATUS_FS_DIRTY;
    }

    fn read_csr(&self, csr: u16) -> Option<u64> {
        self.read_csr_at(csr, self.prv)
    }

    /// Read a CSR as privilege `prv` would (`None`: no such CSR or no access).
    pub(crate) fn read_csr_at(&self, csr: u16, prv: u8) -> Option<u64> {
        let s = &self.csr;
        let sd = |st: u64| {
            if st & MSTATUS_FS == MSTATUS_FS || st & MSTATUS_XS == MSTATUS_XS {
                st | MSTATUS_SD
            } else {
                st
            }
        };
        Some(match csr {
            FFLAGS if self.fs_on() => s.fflags as u64,
            FRM if self.fs_on() => s.frm as u64,
            FCSR if self.fs_on() => ((s.frm as u64) << 5) | s.fflags as u64,
            CYCLE if self.counter_allowed(csr, prv) => self.cycles(),
            TIME if self.counter_allowed(csr, prv) => self.time(),
            INSTRET if self.counter_allowed(csr, prv) => self.instret(),
            HPMCOUNTER3..=HPMCOUNTER31 if self.counter_allowed(csr, prv) => 0,
            SSTATUS => sd(s.mstatus & SSTATUS_VISIBLE),
            SIE => s.mie & s.mideleg,
            STVEC => s.stvec,
            SCOUNTEREN => s.scounteren,
            SENVCFG => s.senvcfg,
            SSCRATCH => s.sscratch,
            SEPC => s.sepc,
            SCAUSE => s.scause,
            STVAL => s.stval,
            SIP => self.mip() & s.mideleg,
            STIMECMP if self.stimecmp_allowed(prv) => s.stimecmp,
            SATP if !(prv == PRV_S && s.mstatus & MSTATUS_TVM != 0) => s.satp,
            MVENDORID | MARCHID | MIMPID | MCONFIGPTR => 0,
            MHARTID => self.cfg.hartid,
            MSTATUS => sd(s.mstatus),
            MISA => MISA_VALUE,
            MEDELEG => s.medeleg,
            MIDELEG => s.mideleg,
            MIE => s.mie,
            MTVEC => s.mtvec,
            MCOUNTEREN => s.mcounteren,
            MENVCFG => s.menvcfg,
            MCOUNTINHIBIT => s.mcountinhibit,
            MHPMEVENT3..=MHPMEVENT31 => 0,
            MSCRATCH => s.mscratch,
            MEPC => s.mepc,
            MCAUSE => s.mcause,
            MTVAL => s.mtval,
            MIP => self.mip(),
            PMPCFG0..=PMPCFG15 if csr & 1 == 0 => s.pmpcfg[((csr - PMPCFG0) / 2) as usize],
            PMPADDR0..=PMPADDR63 => {
                let i = (csr - PMPADDR0) as usize;
                s.pmpaddr[i / 32][i % 32]
            }
            MCYCLE => self.cycles(),
            MINSTRET => self.instret(),
            MHPMCOUNTER3..=MHPMCOUNTER31 => 0,
            TSELECT | TDATA1 | TDATA2 | TDATA3 => 0,
            TINFO => 1,
            _ => return None,
        })
    }

    /// Write a CSR whose access was already checked. `false`: no such CSR.
    pub(crate) fn write_csr(&mut self, csr: u16, val: u64) -> bool {
        let fs_on = self.fs_on();
        let stimecmp_ok = self.stimecmp_allowed(self.prv);
        let s = &mut self.csr;
        match csr {
            FFLAGS if fs_on => {
                s.fflags = (val & 0x1f) as u8;
                self.mark_fs_dirty();
            }
            FRM if fs_on => {
                s.frm = (val & 7) as u8;
                self.mark_fs_dirty();
            }
            FCSR if fs_on => {
                s.fflags = (val & 0x1f) as u8;
                s.frm = ((val >> 5) & 7) as u8;
                self.mark_fs_dirty();
            }
            SSTATUS => {
                let v = (s.mstatus & !SSTATUS_WRITABLE) | (val & SSTATUS_WRITABLE);
                self.set_mstatus(v);
            }
            MSTATUS => {
                let mut v = (s.mstatus & !MSTATUS_WRITABLE) | (val & MSTATUS_WRITABLE);
                // MPP is WARL: the reserved encoding 2 reads as U.
                if (v & MSTATUS_MPP) >> MSTATUS_MPP_SHIFT == 2 {
                    v &= !MSTATUS_MPP;
                }
                self.set_mstatus(v);
            }
            SIE => s.mie = (s.mie & !s.mideleg) | (val & s.mideleg),
            STVEC => s.stvec = val & !2,
            SCOUNTEREN => s.scounteren = val & 0xffff_ffff,
            SENVCFG => s.senvcfg = val & ENVCFG_FIOM,
            SSCRATCH => s.sscratch = val,
            SEPC => s.sepc = val & !1,
            SCAUSE => s.scause = val,
            STVAL => s.stval = val,
            SIP => {
                let m = IRQ_SSI & s.mideleg;
                s.mip = (s.mip & !m) | (val & m);
            }
            STIMECMP if stimecmp_ok => {
                s.stimecmp = val;
                self.update_stimer();
            }
            SATP if !(self.prv == PRV_S && s.mstatus & MSTATUS_TVM != 0) => {
                let mode = val >> SATP_MODE_SHIFT;
                // Unsupported modes leave satp unchanged (4.1.11); no ASID bits.
                if matches!(mode, SATP_MODE_BARE | SATP_MODE_SV39 | SATP_MODE_SV48) {
                    s.satp = val & !SATP_ASID_MASK;
                    self.tlb.flush_paged();
                    self.flush = Flush::Jumps;
                    self.update_ctx();
                }
            }
            MEDELEG => s.medeleg = val & MEDELEG_WRITABLE,
            MIDELEG => s.mideleg = val & S_INTERRUPTS,
            MIE => s.mie = val & ALL_INTERRUPTS,
            MTVEC => s.mtvec = val & !2,
            MCOUNTEREN => s.mcounteren = val & 0xffff_ffff,
            MENVCFG => {
                s.menvcfg = val & (ENVCFG_FIOM | MENVCFG_STCE);
                self.update_stimer();
            }
            MCOUNTINHIBIT => {
                // Counter values as the next instruction would see them.
                let (cy, ir) = (self.cycles() + 1, self.instret() + 1);
                self.csr.mcountinhibit = val & 0b101;
                self.cycle_frozen = None;
                self.instret_frozen = None;
                self.set_cycles(cy);
                self.set_instret(ir);
                self.cycle_frozen = (val & 1 != 0).then_some(cy);
                self.instret_frozen = (val & 4 != 0).then_some(ir);
            }
            MHPMEVENT3..=MHPMEVENT31 | MHPMCOUNTER3..=MHPMCOUNTER31 => {}
            MSCRATCH => s.mscratch = val,
            MEPC => s.mepc = val & !1,
            MCAUSE => s.mcause = val,
            MTVAL => s.mtval = val,
            MIP => {
                let mut w = MIP_WRITABLE;
                if s.menvcfg & MENVCFG_STCE != 0 {
                    w &= !IRQ_STI;
                }
                s.mip = (s.mip & !w) | (val & w);
            }
            PMPCFG0..=PMPCFG15 if csr & 1 == 0 => s.pmpcfg[((csr - PMPCFG0) / 2) as usize] = val,
            PMPADDR0..=PMPADDR63 => {
                let i = (csr - PMPADDR0) as usize;
                s.pmpaddr[i / 32][i % 32] = val & ((1 << 54) - 1);
            }
            MCYCLE => self.set_cycles(val),
            MINSTRET => self.set_instret(val),
            MVENDORID | MARCHID | MIMPID | MHARTID | MCONFIGPTR | MISA => {}
            TSELECT | TDATA1 | TDATA2 | TDATA3 | TINFO => {}
            _ => return false,
        }
        true
    }

    /// A write to mcycle takes effect after the writing instruction
    /// completes: the next instruction reads `v` (3.3.1 "any CSR write takes
    /// effect after the writing instruction has otherwise completed").
    fn set_cycles(&mut self, v: u64) {
        if self.cycle_frozen.is_some() {
            self.cycle_frozen = Some(v);
        }
        self.cycle_offset = v.wrapping_sub(self.position + 1);
    }

    fn set_instret(&mut self, v: u64) {
        if self.instret_frozen.is_some() {
            self.instret_frozen = Some(v);
        }
        self.instret_offset = v.wrapping_sub(self.position + 1 - self.exceptions - self.idle);
    }

    fn set_mstatus(&mut self, v: u64) {
        let changed = self.csr.mstatus ^ v;
        self.csr.mstatus = v;
        if changed & MSTATUS_MXR != 0 {
            self.tlb.flush_paged_data();
        }
        // SUM picks the S-mode data context (`mmu`): no flush.
        if changed & (MSTATUS_MPRV | MSTATUS_MPP | MSTATUS_SUM) != 0 {
            self.update_ctx();
        }
    }

    /// Zicsr (chapter 9): access checks, then read and/or write.
    pub(crate) fn csr_op(&mut self, op: &Op) -> Result<(), Trap> {
        let csr = op.imm as u16;
        let (reads, writes) = (op.csr_reads(), op.csr_writes());
        // A write that may make an interrupt takeable has the dispatcher
        // look before the next instruction (`attention`). For the status
        // registers only a newly set MIE or SIE can: Linux writes sstatus
        // for every irq save/restore and user copy, mostly without that.
        let status = matches!(csr, MSTATUS | SSTATUS);
        if writes && !status && !crate::decode::csr_is_quiet(csr) {
            self.attention = true;
        }
        let status_before = self.csr.mstatus;
        let src = match op.kind {
            Kind::Csrrw | Kind::Csrrs | Kind::Csrrc => x!(self, op.rs1),
            _ => op.rs1 as u64,
        };
        let ill = Trap::new(trap::ILLEGAL_INSTRUCTION, TVAL_INSN_BITS);
        if (csr >> 8) & 3 > self.prv as u16 || (writes && csr >> 10 == 3) {
            return Err(ill);
        }
        // Reading decides existence even when the value is not needed.
        let old = self.read_csr(csr).ok_or(ill)?;
        if writes {
            let new = match op.kind {
                Kind::Csrrw | Kind::Csrrwi => src,
                Kind::Csrrs | Kind::Csrrsi => old | src,
                _ => old & !src,
            };
            if !self.write_csr(csr, new) {
                return Err(ill);
            }
            if status && self.csr.mstatus & !status_before & (MSTATUS_MIE | MSTATUS_SIE) != 0 {
                self.attention = true;
            }
        }
        if reads {
            x!(self, op.rd) = old;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::asm::*;
    use crate::csr::*;
    use crate::test_utils::*;
    use crate::trap;
    use crate::Position;

    /// What riscv-tests' breakpoint test (and a debugger) probes: a
    /// trigger module with no trigger. It used to be no CSRs at all, and
    /// the probe itself trapped.
    #[test]
    fn the_trigger_csrs_say_no_trigger_exists() {
        let mcontrol_exec_m = (2u64 << 60) | (1 << 6) | (1 << 2);
        let mut body = vec![csrrw(ZERO, TSELECT, ZERO), csrrs(A1, TSELECT, ZERO)];
        body.extend(li64(T0, mcontrol_exec_m));
        body.extend([csrrw(ZERO, TDATA1, T0), csrrs(A0, TDATA1, ZERO), csrrs(T0, TINFO, ZERO)]);
        body.extend(li64(A2, 0x8000_0000));
        body.extend([csrrw(ZERO, TDATA2, A2), csrrs(A2, TDATA2, ZERO)]);
        let h = run(&body);
        assert_eq!(h.csrs().mcause, 0, "no access trapped");
        assert_eq!((h.x(A1 as usize), h.x(A0 as usize) >> 60), (0, 0), "tselect 0, tdata1 of type 0: no trigger");
        assert_eq!((h.x(T0 as usize), h.x(A2 as usize)), (1, 0), "tinfo: only type 0; tdata2 keeps nothing");
    }

    /// A status write that enables no interrupt (here SUM) leaves the
    /// dispatcher alone, so the block runs on; one that sets SIE with an
    /// interrupt pending has it taken before the next instruction.
    #[test]
    fn only_status_writes_that_enable_an_interrupt_ask_the_dispatcher_to_look() {
        let prefix = li64(T0, MSTATUS_SUM).len() as u64;
        let body = [csrrs(ZERO, SSTATUS, T0), addi(A1, A1, 1), i(0x73, 6, 0, 2, SSTATUS as i32), addi(A2, A2, 1)];
        let (mut h, mut bus) = setup(&with_regs(&[(T0, MSTATUS_SUM)], &body));
        h.set_prv(PRV_S);
        h.core.csr.mideleg = S_INTERRUPTS;
        h.core.csr.mie = IRQ_SEI;
        h.core.csr.stvec = BASE + 0x8000;
        h.set_irq(IRQ_SEI, true);
        h.run(&mut bus, Position(prefix + 1));
        assert!(!h.core.attention, "setting SUM enables nothing");
        assert_eq!(h.csrs().mstatus & MSTATUS_SUM, MSTATUS_SUM);
        h.run(&mut bus, Position(100));
        assert_eq!(h.csrs().scause, trap::INTERRUPT_BIT | 9, "taken once SIE is set");
        assert_eq!(h.csrs().sepc, BASE + 4 * (prefix + 3), "before the instruction after csrrsi");
        assert_eq!((h.x(A1 as usize), h.x(A2 as usize)), (1, 0));
    }

    #[test]
    fn csr_write_to_counter_from_user_mode_is_illegal() {
        let (mut h, mut bus) = setup(&[csrrs(A0, crate::csr::CYCLE, ZERO)]);
        h.core.prv = PRV_U;
        h.core.update_ctx();
        h.run(&mut bus, Position(1));
        assert_eq!(h.csrs().mcause, trap::ILLEGAL_INSTRUCTION);
        assert_eq!(h.csrs().mtval, csrrs(A0, crate::csr::CYCLE, ZERO) as u64);
    }
}
