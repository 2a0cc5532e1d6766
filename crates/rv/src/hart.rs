//! The hart: architectural state, the run loop, and instruction semantics.
//!
//! # Position
//!
//! `position` counts retired instructions plus synchronous exceptions taken
//! (each trap entry is one step, so a guest stuck in a trap loop still moves
//! forward and stops at its limit). It is exact and identical across runs:
//! every asynchronous event is injected at a position, and guest time is a
//! function of it. `minstret` is the position less the exceptions and the
//! idle steps the board added while the hart waited in `wfi`.
//!
//! # Run loop
//!
//! `run` repeats: stop if the target is reached; raise Sstc's STIP if its
//! deadline passed; take a pending interrupt; fetch the block at `pc`
//! (decoding it on a miss); execute at most `target - position` of its ops.
//! Interrupts are therefore checked at block boundaries, and every operation
//! that can enable one (CSR writes, xRET, WFI, MMIO stores) ends its block.

use crate::block::{BlockCache, MAX_BLOCK_OPS};
use crate::bus::Bus;
use crate::csr::*;
use crate::decode::{decode, Kind, Op};
use crate::fp::{self, BinOp, Cmp, FmaOp, IntTy, Rm};
use crate::mmu::{self, Access, PteMemory, Tlb, WalkCtx, CTX_BARE, CTX_S, CTX_U, PAGE_SIZE};
use crate::trap::{self, Trap, INTERRUPT_BIT};

/// A point in a hart's execution: see the module documentation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position(pub u64);

/// Fixed facts about a hart and its board.
#[derive(Clone, Copy, Debug)]
pub struct HartConfig {
    pub hartid: u64,
    /// Physical address of the first byte of `Bus::ram()`.
    pub ram_base: u64,
    pub ram_size: u64,
    /// Guest time: `time = position / insns_per_tick`.
    pub insns_per_tick: u64,
    /// Return `Exit::MachineTrap` instead of running M-mode code when a
    /// trap enters M-mode.
    pub m_mode_exits: bool,
}

/// Why `run` returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The position reached the target.
    Reached,
    /// The hart executed `wfi` with no interrupt pending; `pc` is past it.
    /// The board may advance time (`idle`) or wait for an event.
    Wfi,
    /// An MMIO access happened; the board may need to act on it.
    Device,
    /// A trap entered M-mode while `HartConfig::m_mode_exits` is set: the
    /// board implements the M-mode firmware (SBI) itself. The trap CSRs
    /// (`mcause`, `mepc`, `mtval`) are set; resume with `Hart::mret`.
    MachineTrap,
}

/// tval placeholder: "the raw bits of the instruction at pc".
const TVAL_INSN_BITS: u64 = u64::MAX;

/// A load that did not trap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loaded {
    /// From RAM (or split into byte loads, when misaligned): the block goes on.
    Value(u64),
    /// Served by a device: the instruction retires and the block ends, so
    /// the board can act on the access before the next instruction.
    Device(u64),
}

/// What a block's execution asks of the dispatcher.
enum End {
    Continue,
    Trap(Trap),
    Wfi,
    Device,
}

/// Cache maintenance an instruction requested (the cache lives beside the
/// core, so the executor cannot reach it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flush {
    None,
    Jumps,
    Page(u64),
    /// More than one page: drop every block.
    All,
}

/// Everything the executor touches.
pub struct Core {
    /// x0..x31, then the sink slot for writes to x0 (see `decode::X_SINK`).
    pub x: [u64; 64],
    pub f: [u64; 32],
    pub pc: u64,
    pub prv: u8,
    pub csr: Csrs,
    /// Device-driven interrupt lines (MSIP, MTIP, MEIP, SEIP) and Sstc's STIP.
    mip_ext: u64,
    position: u64,
    exceptions: u64,
    idle: u64,
    /// Offsets so that M-mode writes to mcycle/minstret stick.
    cycle_offset: u64,
    instret_offset: u64,
    /// Values frozen by mcountinhibit.
    cycle_frozen: Option<u64>,
    instret_frozen: Option<u64>,
    /// Physical address of the LR reservation, or `u64::MAX`.
    reservation: u64,
    data_ctx: usize,
    fetch_ctx: usize,
    /// Position at which Sstc's STIP next becomes pending.
    stimer_pos: u64,
    /// An instruction changed state that interrupt delivery depends on
    /// (CSRs, privilege): the run loop must check before the next block.
    attention: bool,
    tlb: Tlb,
    flush: Flush,
    cfg: HartConfig,
}

/// A hart's architectural state: what a snapshot saves and a state hash
/// covers. Caches, the TLB and decoded blocks are derived, not state.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct HartState {
    pub x: [u64; 32],
    pub f: [u64; 32],
    pub pc: u64,
    pub prv: u8,
    pub csr: Csrs,
    pub mip_ext: u64,
    pub position: u64,
    pub exceptions: u64,
    pub idle: u64,
    pub cycle_offset: u64,
    pub instret_offset: u64,
    pub cycle_frozen: Option<u64>,
    pub instret_frozen: Option<u64>,
    pub reservation: u64,
}

/// One RISC-V hart.
pub struct Hart {
    core: Core,
    cache: BlockCache,
}

struct RamPtes<'a> {
    ram: &'a mut [u8],
    base: u64,
    /// RAM offset of a PTE the walk updated (A/D bits).
    wrote: Option<u64>,
}

impl PteMemory for RamPtes<'_> {
    fn read_pte(&mut self, paddr: u64) -> Option<u64> {
        let off = paddr.checked_sub(self.base)? as usize;
        let b = self.ram.get(off..off.checked_add(8)?)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }
    fn write_pte(&mut self, paddr: u64, val: u64) -> bool {
        let Some(off) = paddr.checked_sub(self.base) else {
            return false;
        };
        match self.ram.get_mut(off as usize..off as usize + 8) {
            Some(b) => {
                b.copy_from_slice(&val.to_le_bytes());
                self.wrote = Some(off);
                true
            }
            None => false,
        }
    }
}

macro_rules! x {
    ($c:ident, $r:expr) => {
        $c.x[($r as usize) & 63]
    };
}

impl Core {
    fn new(cfg: HartConfig) -> Core {
        let mut c = Core {
            x: [0; 64],
            f: [0; 32],
            pc: 0,
            prv: PRV_M,
            csr: Csrs::default(),
            mip_ext: 0,
            position: 0,
            exceptions: 0,
            idle: 0,
            cycle_offset: 0,
            instret_offset: 0,
            cycle_frozen: None,
            instret_frozen: None,
            reservation: u64::MAX,
            data_ctx: CTX_BARE,
            fetch_ctx: CTX_BARE,
            stimer_pos: u64::MAX,
            attention: false,
            tlb: Tlb::new((cfg.ram_size / PAGE_SIZE) as usize),
            flush: Flush::None,
            cfg,
        };
        c.csr.mstatus = (2 << 32) | (2 << 34); // UXL = SXL = 64
        c
    }

    // ----- contexts and counters -----

    fn update_ctx(&mut self) {
        let paged = self.csr.satp >> SATP_MODE_SHIFT != SATP_MODE_BARE;
        let ctx_of = |prv: u8| match prv {
            _ if !paged => CTX_BARE,
            PRV_U => CTX_U,
            PRV_S => CTX_S,
            _ => CTX_BARE,
        };
        self.fetch_ctx = ctx_of(self.prv);
        self.data_ctx = ctx_of(self.data_prv());
    }

    /// Effective privilege of loads and stores (MPRV, 3.1.6.3).
    fn data_prv(&self) -> u8 {
        if self.prv == PRV_M && self.csr.mstatus & MSTATUS_MPRV != 0 {
            ((self.csr.mstatus & MSTATUS_MPP) >> MSTATUS_MPP_SHIFT) as u8
        } else {
            self.prv
        }
    }

    fn time(&self) -> u64 {
        self.position / self.cfg.insns_per_tick
    }

    fn cycles(&self) -> u64 {
        self.cycle_frozen.unwrap_or(self.position.wrapping_add(self.cycle_offset))
    }

    fn instret(&self) -> u64 {
        self.instret_frozen.unwrap_or((self.position - self.exceptions - self.idle).wrapping_add(self.instret_offset))
    }

    fn mip(&self) -> u64 {
        self.csr.mip | self.mip_ext
    }

    /// Recompute Sstc's STIP and the position of its next change.
    fn update_stimer(&mut self) {
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

    // ----- traps -----

    /// The highest-priority interrupt that is pending and enabled (3.1.9).
    fn pending_interrupt(&self) -> Option<u64> {
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
    fn take_trap(&mut self, cause: u64, tval: u64) {
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

    // ----- memory -----

    fn ram_off(&self, paddr: u64) -> Option<u64> {
        let off = paddr.wrapping_sub(self.cfg.ram_base);
        (off < self.cfg.ram_size).then_some(off)
    }

    /// Translate and, for RAM, fill the TLB.
    fn translate<B: Bus>(&mut self, bus: &mut B, vaddr: u64, access: Access) -> Result<u64, Trap> {
        let ctx = if access == Access::Fetch { self.fetch_ctx } else { self.data_ctx };
        let paddr = if ctx == CTX_BARE {
            vaddr
        } else {
            let wctx = WalkCtx {
                satp: self.csr.satp,
                prv: if access == Access::Fetch { self.prv } else { self.data_prv() },
                sum: self.csr.mstatus & MSTATUS_SUM != 0,
                mxr: self.csr.mstatus & MSTATUS_MXR != 0,
            };
            let mut mem = RamPtes { ram: bus.ram(), base: self.cfg.ram_base, wrote: None };
            let walked = mmu::walk(&mut mem, wctx, vaddr, access);
            if let Some(off) = mem.wrote {
                self.note_ram_write(off >> 12);
            }
            let w = walked?;
            if w.page_size > PAGE_SIZE {
                self.tlb.note_superpage(vaddr & !(w.page_size - 1), w.page_size);
            }
            w.paddr
        };
        if let Some(off) = self.ram_off(paddr) {
            if access != Access::Write || !self.tlb.is_code_page(off >> 12) {
                self.tlb.insert(ctx, access, vaddr, off);
            }
        }
        Ok(paddr)
    }

    /// A slow-path write into RAM page `page`: mark it dirty, and if it
    /// holds decoded code, have its blocks dropped. Returns whether the
    /// block must end.
    fn note_ram_write(&mut self, page: u64) -> bool {
        self.tlb.mark_dirty(page);
        if self.tlb.is_code_page(page) {
            self.flush = match self.flush {
                Flush::None => Flush::Page(page),
                Flush::Page(p) if p == page => Flush::Page(p),
                _ => Flush::All,
            };
            return true;
        }
        false
    }

    /// The physical address of `vaddr` from the TLB (any alignment inside
    /// the page), or from a walk that refills it.
    fn lookup_or_translate<B: Bus>(&mut self, bus: &mut B, vaddr: u64, access: Access) -> Result<u64, Trap> {
        let set = if access == Access::Fetch { &self.tlb.sets[self.fetch_ctx] } else { &self.tlb.sets[self.data_ctx] };
        let array = match access {
            Access::Read => &set.read,
            Access::Write => &set.write,
            Access::Fetch => &set.fetch,
        };
        let e = array[mmu::tlb_index(vaddr)];
        if e.tag == vaddr & !0xfff {
            return Ok(self.cfg.ram_base + (e.ram_off | (vaddr & 0xfff)));
        }
        self.translate(bus, vaddr, access)
    }

    fn phys_load<B: Bus>(&mut self, bus: &mut B, paddr: u64, size: u32, pos: u64) -> Option<u64> {
        match self.ram_off(paddr) {
            Some(off) if off + size as u64 <= self.cfg.ram_size => {
                let ram = bus.ram();
                let mut b = [0u8; 8];
                b[..size as usize].copy_from_slice(&ram[off as usize..off as usize + size as usize]);
                Some(u64::from_le_bytes(b))
            }
            Some(_) => None,
            None => bus.mmio_load(paddr, size, pos),
        }
    }

    /// Returns `Some(true)` when the store must end the block (MMIO, or a
    /// write into a page holding decoded code).
    fn phys_store<B: Bus>(&mut self, bus: &mut B, paddr: u64, size: u32, val: u64, pos: u64) -> Option<bool> {
        match self.ram_off(paddr) {
            Some(off) if off + size as u64 <= self.cfg.ram_size => {
                let ram = bus.ram();
                ram[off as usize..off as usize + size as usize].copy_from_slice(&val.to_le_bytes()[..size as usize]);
                Some(self.note_ram_write(off >> 12))
            }
            Some(_) => None,
            None => bus.mmio_store(paddr, size, val, pos).then_some(true),
        }
    }

    /// The fast path of a load of `N` bytes: a TLB hit is one compare and
    /// one load and gives a plain value; `None` sends the caller to
    /// `load_slow` (miss, misaligned, device). The block loop keeps the two
    /// apart so that a hit never builds a [`Loaded`].
    #[inline(always)]
    fn load_hit<B: Bus, const N: usize>(&self, bus: &mut B, vaddr: u64) -> Option<u64> {
        let e = self.tlb.sets[self.data_ctx].read[mmu::tlb_index(vaddr)];
        if e.tag == vaddr & (!0xfff | (N as u64 - 1)) {
            let off = (e.ram_off | (vaddr & 0xfff)) as usize;
            let ram = bus.ram();
            let mut b = [0u8; 8];
            b[..N].copy_from_slice(&ram[off..off + N]);
            return Some(u64::from_le_bytes(b));
        }
        None
    }

    /// A whole load of `N` bytes, for callers off the hot path.
    #[inline(always)]
    fn load<B: Bus, const N: usize>(&mut self, bus: &mut B, vaddr: u64, pos: u64) -> Result<Loaded, Trap> {
        match self.load_hit::<B, N>(bus, vaddr) {
            Some(v) => Ok(Loaded::Value(v)),
            None => self.load_slow(bus, vaddr, N as u32, pos),
        }
    }

    #[cold]
    #[inline(never)]
    fn load_slow<B: Bus>(&mut self, bus: &mut B, vaddr: u64, size: u32, pos: u64) -> Result<Loaded, Trap> {
        if vaddr & (size as u64 - 1) != 0 && (vaddr & 0xfff) + size as u64 <= PAGE_SIZE {
            // Misaligned inside one page (the kernel's unaligned-access
            // probe does millions): one translation, then plain bytes.
            let paddr = self.lookup_or_translate(bus, vaddr, Access::Read)?;
            if self.ram_off(paddr).is_some() {
                return self
                    .phys_load(bus, paddr, size, pos)
                    .map(Loaded::Value)
                    .ok_or(Access::Read.access_fault(vaddr));
            }
        }
        if vaddr & (size as u64 - 1) != 0 {
            // Misaligned: emulated byte by byte, both pages checked first.
            let last = vaddr.wrapping_add(size as u64 - 1);
            let p0 = self.translate(bus, vaddr, Access::Read)?;
            let p1 = self.translate(bus, last, Access::Read)?;
            let mut v = 0u64;
            for i in 0..size as u64 {
                let va = vaddr.wrapping_add(i);
                let pa = if (va ^ vaddr) >> 12 == 0 { p0 + i } else { p1 - (size as u64 - 1 - i) };
                let b = self.phys_load(bus, pa, 1, pos).ok_or(Access::Read.access_fault(vaddr))?;
                v |= b << (8 * i);
            }
            // Even if some bytes came from a device: split accesses do not
            // end the block.
            return Ok(Loaded::Value(v));
        }
        let paddr = self.translate(bus, vaddr, Access::Read)?;
        let v = self.phys_load(bus, paddr, size, pos).ok_or(Access::Read.access_fault(vaddr))?;
        if self.ram_off(paddr).is_none() {
            return Ok(Loaded::Device(v));
        }
        Ok(Loaded::Value(v))
    }

    /// Returns whether the block must end after this store.
    #[inline(always)]
    fn store<B: Bus, const N: usize>(&mut self, bus: &mut B, vaddr: u64, val: u64, pos: u64) -> Result<bool, Trap> {
        let e = self.tlb.sets[self.data_ctx].write[mmu::tlb_index(vaddr)];
        if e.tag == vaddr & (!0xfff | (N as u64 - 1)) {
            let off = (e.ram_off | (vaddr & 0xfff)) as usize;
            let ram = bus.ram();
            ram[off..off + N].copy_from_slice(&val.to_le_bytes()[..N]);
            return Ok(false);
        }
        self.store_slow(bus, vaddr, N as u32, val, pos)
    }

    #[cold]
    #[inline(never)]
    fn store_slow<B: Bus>(&mut self, bus: &mut B, vaddr: u64, size: u32, val: u64, pos: u64) -> Result<bool, Trap> {
        if vaddr & (size as u64 - 1) != 0 && (vaddr & 0xfff) + size as u64 <= PAGE_SIZE {
            let paddr = self.lookup_or_translate(bus, vaddr, Access::Write)?;
            if self.ram_off(paddr).is_some() {
                return self.phys_store(bus, paddr, size, val, pos).ok_or(Access::Write.access_fault(vaddr));
            }
        }
        if vaddr & (size as u64 - 1) != 0 {
            let last = vaddr.wrapping_add(size as u64 - 1);
            let p0 = self.translate(bus, vaddr, Access::Write)?;
            let p1 = self.translate(bus, last, Access::Write)?;
            let mut end = false;
            for i in 0..size as u64 {
                let va = vaddr.wrapping_add(i);
                let pa = if (va ^ vaddr) >> 12 == 0 { p0 + i } else { p1 - (size as u64 - 1 - i) };
                end |= self.phys_store(bus, pa, 1, val >> (8 * i), pos).ok_or(Access::Write.access_fault(vaddr))?;
            }
            return Ok(end);
        }
        let paddr = self.translate(bus, vaddr, Access::Write)?;
        self.phys_store(bus, paddr, size, val, pos).ok_or(Access::Write.access_fault(vaddr))
    }

    /// LR, SC and AMOs: aligned, translated for writing (AMO faults are
    /// store/AMO faults, 8.4), never split.
    fn amo_addr<B: Bus>(&mut self, bus: &mut B, vaddr: u64, size: u32, lr: bool) -> Result<u64, Trap> {
        if vaddr & (size as u64 - 1) != 0 {
            let cause = if lr { trap::LOAD_MISALIGNED } else { trap::STORE_MISALIGNED };
            return Err(Trap::new(cause, vaddr));
        }
        self.translate(bus, vaddr, if lr { Access::Read } else { Access::Write })
    }

    // ----- CSRs -----

    fn counter_allowed(&self, csr: u16, prv: u8) -> bool {
        let bit = 1u64 << (csr & 31);
        match prv {
            PRV_M => true,
            PRV_S => self.csr.mcounteren & bit != 0,
            _ => self.csr.mcounteren & bit != 0 && self.csr.scounteren & bit != 0,
        }
    }

    fn fs_on(&self) -> bool {
        self.csr.mstatus & MSTATUS_FS != 0
    }

    fn mark_fs_dirty(&mut self) {
        self.csr.mstatus |= MSTATUS_FS_DIRTY;
    }

    fn read_csr(&self, csr: u16) -> Option<u64> {
        self.read_csr_at(csr, self.prv)
    }

    /// Read a CSR as privilege `prv` would (`None`: no such CSR or no access).
    fn read_csr_at(&self, csr: u16, prv: u8) -> Option<u64> {
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
            _ => return None,
        })
    }

    fn stimecmp_allowed(&self, prv: u8) -> bool {
        match prv {
            PRV_M => true,
            _ => self.csr.menvcfg & MENVCFG_STCE != 0 && self.csr.mcounteren & 2 != 0,
        }
    }

    /// Write a CSR whose access was already checked. `false`: no such CSR.
    fn write_csr(&mut self, csr: u16, val: u64) -> bool {
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
        if changed & (MSTATUS_SUM | MSTATUS_MXR) != 0 {
            self.tlb.flush_paged_data();
        }
        if changed & (MSTATUS_MPRV | MSTATUS_MPP) != 0 {
            self.update_ctx();
        }
    }

    /// Zicsr (chapter 9): access checks, then read and/or write.
    fn csr_op(&mut self, op: &Op) -> Result<(), Trap> {
        if op.csr_writes() && !crate::decode::csr_is_quiet(op.imm as u16) {
            self.attention = true;
        }
        let csr = op.imm as u16;
        let rd_arch = op.rs2;
        let src = match op.kind {
            Kind::Csrrw | Kind::Csrrs | Kind::Csrrc => x!(self, op.rs1),
            _ => op.rs1 as u64,
        };
        let writes = match op.kind {
            Kind::Csrrw | Kind::Csrrwi => true,
            _ => op.rs1 != 0,
        };
        let reads = !(matches!(op.kind, Kind::Csrrw | Kind::Csrrwi) && rd_arch == 0);
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
        }
        if reads {
            x!(self, op.rd) = old;
        }
        Ok(())
    }

    // ----- FP helpers -----

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
    fn exec_fp<B: Bus>(&mut self, bus: &mut B, op: &Op, pos: u64) -> Result<bool, Trap> {
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

    /// A-extension ops (chapter 8). Returns whether the block must end.
    #[inline(never)]
    fn exec_amo<B: Bus>(&mut self, bus: &mut B, op: &Op, pos: u64) -> Result<bool, Trap> {
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

    /// System instructions other than Zicsr. `Ok(true)`: the hart waits (WFI).
    fn exec_system(&mut self, op: &Op) -> Result<bool, Trap> {
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

    /// Execute the block `ops` that starts at `self.pc`, for at most
    /// `budget` positions. A taken branch back to the block's own start
    /// (a tight loop) runs the block again without leaving, budget allowing.
    #[inline(always)]
    fn exec_block<B: Bus>(&mut self, bus: &mut B, ops: &[Op], budget: usize) -> End {
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
                    Mulh => x!(self, op.rd) = ((r1!() as i64 as i128 * r2!() as i64 as i128) >> 64) as u64,
                    Mulhsu => x!(self, op.rd) = ((r1!() as i64 as i128).wrapping_mul(r2!() as i128) >> 64) as u64,
                    Mulhu => x!(self, op.rd) = ((r1!() as u128 * r2!() as u128) >> 64) as u64,
                    Div => {
                        x!(self, op.rd) = match (r1!() as i64, r2!() as i64) {
                            (_, 0) => u64::MAX,
                            (i64::MIN, -1) => r1!(),
                            (a, b) => (a / b) as u64,
                        }
                    }
                    Divu => x!(self, op.rd) = r1!().checked_div(r2!()).unwrap_or(u64::MAX),
                    Rem => {
                        x!(self, op.rd) = match (r1!() as i64, r2!() as i64) {
                            (_, 0) => r1!(),
                            (i64::MIN, -1) => 0,
                            (a, b) => (a % b) as u64,
                        }
                    }
                    Remu => x!(self, op.rd) = r1!().checked_rem(r2!()).unwrap_or(r1!()),
                    Mulw => x!(self, op.rd) = (r1!() as i32).wrapping_mul(r2!() as i32) as i64 as u64,
                    Divw => {
                        x!(self, op.rd) = match (r1!() as i32, r2!() as i32) {
                            (_, 0) => u64::MAX,
                            (i32::MIN, -1) => i32::MIN as i64 as u64,
                            (a, b) => (a / b) as i64 as u64,
                        }
                    }
                    Divuw => {
                        x!(self, op.rd) = match (r1!() as u32).checked_div(r2!() as u32) {
                            Some(q) => q as i32 as i64 as u64,
                            None => u64::MAX,
                        }
                    }
                    Remw => {
                        x!(self, op.rd) = match (r1!() as i32, r2!() as i32) {
                            (a, 0) => a as i64 as u64,
                            (i32::MIN, -1) => 0,
                            (a, b) => (a % b) as i64 as u64,
                        }
                    }
                    Remuw => {
                        x!(self, op.rd) =
                            (r1!() as u32).checked_rem(r2!() as u32).unwrap_or(r1!() as u32) as i32 as i64 as u64
                    }
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

impl Hart {
    /// A hart in M-mode at `pc = 0` with everything zero, as after reset.
    pub fn new(cfg: HartConfig) -> Hart {
        assert!(cfg.insns_per_tick > 0, "insns_per_tick must be positive");
        Hart { core: Core::new(cfg), cache: BlockCache::new() }
    }

    pub fn position(&self) -> Position {
        Position(self.core.position)
    }

    pub fn pc(&self) -> u64 {
        self.core.pc
    }

    pub fn set_pc(&mut self, pc: u64) {
        self.core.pc = pc;
    }

    pub fn prv(&self) -> u8 {
        self.core.prv
    }

    /// Integer register `i` (0..32).
    pub fn x(&self, i: usize) -> u64 {
        if i == 0 {
            0
        } else {
            self.core.x[i]
        }
    }

    pub fn set_x(&mut self, i: usize, v: u64) {
        if i != 0 && i < 32 {
            self.core.x[i] = v;
        }
    }

    pub fn f(&self, i: usize) -> u64 {
        self.core.f[i]
    }

    pub fn csrs(&self) -> &Csrs {
        &self.core.csr
    }

    /// Read a CSR as M-mode software would (for tests and debugging).
    pub fn read_csr(&self, csr: u16) -> Option<u64> {
        self.core.read_csr_at(csr, PRV_M)
    }

    /// Guest time, in ticks of the board's timebase.
    pub fn time(&self) -> u64 {
        self.core.time()
    }

    pub fn config(&self) -> HartConfig {
        self.core.cfg
    }

    /// Drive a device interrupt line (`IRQ_MSI`, `IRQ_MTI`, `IRQ_MEI`,
    /// `IRQ_SEI`).
    pub fn set_irq(&mut self, bit: u64, level: bool) {
        if level {
            self.core.mip_ext |= bit;
        } else {
            self.core.mip_ext &= !bit;
        }
    }

    /// Would an interrupt wake the hart from `wfi` (pending and enabled in
    /// `mie`, whatever the global enables)?
    pub fn wakeup_pending(&self) -> bool {
        self.core.mip() & self.core.csr.mie != 0
    }

    /// Position at which the hart's own timer (Sstc) fires, if armed.
    pub fn next_internal_deadline(&self) -> Option<Position> {
        (self.core.stimer_pos != u64::MAX).then_some(Position(self.core.stimer_pos))
    }

    /// Advance the position by `steps` while the hart idles in `wfi`.
    pub fn idle(&mut self, steps: u64) {
        self.core.position += steps;
        self.core.idle += steps;
    }

    /// RAM pages the hart wrote since the last call (ascending page
    /// numbers from the start of RAM). Re-arms the tracking.
    pub fn take_dirty_pages(&mut self) -> Vec<u64> {
        self.core.tlb.take_dirty()
    }

    /// Device (DMA) writes into RAM: drop decoded code in those pages.
    pub fn invalidate_ram(&mut self, ram_off: u64, len: u64) {
        if len == 0 {
            return;
        }
        for page in (ram_off >> 12)..=((ram_off + len - 1) >> 12) {
            if self.core.tlb.is_code_page(page) {
                self.cache.drop_page(page);
                self.core.tlb.clear_code_page(page);
            }
        }
    }

    fn exception<B: Bus>(&mut self, bus: &mut B, mut t: Trap) {
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

    fn apply_flush(&mut self) {
        match std::mem::replace(&mut self.core.flush, Flush::None) {
            Flush::None => {}
            Flush::Jumps => self.cache.flush_jumps(),
            Flush::Page(p) => {
                self.cache.drop_page(p);
                self.core.tlb.clear_code_page(p);
            }
            Flush::All => {
                self.cache.flush_all();
                self.core.tlb.clear_all_code_pages();
            }
        }
    }

    /// Find or decode the block at pc (after a jump-cache miss).
    #[inline(never)]
    fn fetch_block<B: Bus>(&mut self, bus: &mut B) -> Result<u32, Trap> {
        let pc = self.core.pc;
        let ctx = self.core.fetch_ctx;
        let paddr = self.core.lookup_or_translate(bus, pc, Access::Fetch)?;
        let ram_off = self.core.ram_off(paddr).ok_or(Access::Fetch.access_fault(pc))?;
        if let Some(b) = self.cache.find_paddr(paddr) {
            self.cache.remember(pc, ctx, b);
            return Ok(b);
        }
        let page_end = (ram_off | 0xfff) + 1;
        let mut ops: [Op; MAX_BLOCK_OPS] = [Op::illegal(0, 2); MAX_BLOCK_OPS];
        let mut n = 0;
        let mut off = ram_off;
        let ram_size = self.core.cfg.ram_size;
        let ram = bus.ram();
        let half = |ram: &[u8], o: u64| u16::from_le_bytes([ram[o as usize], ram[o as usize + 1]]);
        while n < MAX_BLOCK_OPS && off < page_end && off + 2 <= ram_size {
            let lo = half(ram, off);
            let raw = if lo & 3 == 3 {
                if off + 4 > page_end || off + 4 > ram_size {
                    if n == 0 {
                        return self.straddling_block(bus, lo);
                    }
                    break;
                }
                lo as u32 | (half(ram, off + 2) as u32) << 16
            } else {
                lo as u32
            };
            let mut op = decode(raw);
            op.off = (off - ram_off) as u16;
            // A direct jump forward within the page: write the link and
            // keep decoding at the target, so the block runs on through it.
            let target = off.wrapping_add(op.imm as i64 as u64);
            let follow = op.kind == Kind::Jal && target > off && target < page_end;
            if follow {
                op.kind = Kind::JalLink;
            }
            ops[n] = op;
            n += 1;
            off = if follow { target } else { off + op.len as u64 };
            if op.ends_block() {
                break;
            }
        }
        // A block never ends on a followed jump: make the last one a real jump.
        if ops[n - 1].kind == Kind::JalLink {
            ops[n - 1].kind = Kind::Jal;
        }
        let page = ram_off >> 12;
        if !self.core.tlb.is_code_page(page) {
            self.core.tlb.mark_code_page(page);
        }
        let idx = match self.cache.insert(paddr, page, &ops[..n]) {
            Some(i) => i,
            None => {
                self.cache.flush_all();
                self.core.tlb.clear_all_code_pages();
                self.core.tlb.mark_code_page(page);
                self.cache.insert(paddr, page, &ops[..n]).expect("an empty cache holds one block")
            }
        };
        self.cache.remember(pc, ctx, idx);
        Ok(idx)
    }

    /// A 32-bit instruction whose upper half is on the next page: decoded
    /// each time into the scratch block, never cached.
    #[cold]
    fn straddling_block<B: Bus>(&mut self, bus: &mut B, lo: u16) -> Result<u32, Trap> {
        let pc2 = self.core.pc.wrapping_add(2);
        let paddr2 = self.core.translate(bus, pc2, Access::Fetch)?;
        let off2 = self.core.ram_off(paddr2).ok_or(Access::Fetch.access_fault(pc2))? as usize;
        let ram = bus.ram();
        let hi = u16::from_le_bytes([ram[off2], ram[off2 + 1]]);
        let op = decode(lo as u32 | (hi as u32) << 16);
        Ok(self.cache.set_scratch(op))
    }

    /// Did a trap just enter M-mode that the board must handle?
    fn in_firmware(&self) -> bool {
        self.core.cfg.m_mode_exits && self.core.prv == PRV_M
    }

    /// Leave M-mode as `mret` would, at `pc` (the board's firmware path:
    /// after an SBI call, `mepc + 4`).
    pub fn mret_to(&mut self, pc: u64) {
        let op = Op { kind: Kind::Mret, ..Op::illegal(0, 4) };
        let prv = self.core.prv;
        self.core.prv = PRV_M;
        if self.core.exec_system(&op).is_err() {
            self.core.prv = prv;
        }
        self.core.pc = pc;
    }

    /// Write a CSR with M-mode privilege (board firmware and boot setup).
    /// `false` if there is no such CSR.
    pub fn write_csr_m(&mut self, csr: u16, val: u64) -> bool {
        let prv = self.core.prv;
        self.core.prv = PRV_M;
        let ok = self.core.write_csr(csr, val);
        self.core.prv = prv;
        if self.core.flush != Flush::None {
            self.apply_flush();
        }
        ok
    }

    /// The architectural state.
    pub fn state(&self) -> HartState {
        let c = &self.core;
        HartState {
            x: c.x[..32].try_into().unwrap(),
            f: c.f,
            pc: c.pc,
            prv: c.prv,
            csr: c.csr.clone(),
            mip_ext: c.mip_ext,
            position: c.position,
            exceptions: c.exceptions,
            idle: c.idle,
            cycle_offset: c.cycle_offset,
            instret_offset: c.instret_offset,
            cycle_frozen: c.cycle_frozen,
            instret_frozen: c.instret_frozen,
            reservation: c.reservation,
        }
    }

    /// Load an architectural state (a snapshot's); drops every derived
    /// cache so nothing from before survives.
    pub fn restore(&mut self, s: &HartState) {
        let c = &mut self.core;
        c.x = [0; 64];
        c.x[..32].copy_from_slice(&s.x);
        c.x[0] = 0;
        c.f = s.f;
        c.pc = s.pc;
        c.prv = s.prv;
        c.csr = s.csr.clone();
        c.mip_ext = s.mip_ext;
        c.position = s.position;
        c.exceptions = s.exceptions;
        c.idle = s.idle;
        c.cycle_offset = s.cycle_offset;
        c.instret_offset = s.instret_offset;
        c.cycle_frozen = s.cycle_frozen;
        c.instret_frozen = s.instret_frozen;
        c.reservation = s.reservation;
        c.flush = Flush::None;
        c.attention = true;
        c.update_ctx();
        c.update_stimer();
        self.core.tlb.flush_paged();
        self.cache.flush_all();
    }

    /// Enter privilege `prv` directly (boot: the kernel starts in S-mode).
    pub fn set_prv(&mut self, prv: u8) {
        self.core.prv = prv;
        self.core.update_ctx();
    }

    /// Flush every translation and cached block (SBI remote fences).
    pub fn flush_translations(&mut self) {
        self.core.tlb.flush_paged();
        self.cache.flush_jumps();
    }

    /// Run until the position reaches `target`, the hart waits in `wfi`,
    /// a device is accessed, or (with `m_mode_exits`) a trap enters M-mode.
    pub fn run<B: Bus>(&mut self, bus: &mut B, target: Position) -> Exit {
        loop {
            let stop = target.0.min(self.core.stimer_pos);
            if self.core.position >= stop {
                if self.core.position >= target.0 {
                    return Exit::Reached;
                }
                self.core.update_stimer();
                continue;
            }
            if self.core.mip() & self.core.csr.mie != 0 {
                if let Some(code) = self.core.pending_interrupt() {
                    self.core.take_trap(code | INTERRUPT_BIT, 0);
                    if self.in_firmware() {
                        return Exit::MachineTrap;
                    }
                }
            }
            // Blocks back to back until something needs the checks above:
            // the stop position, or an instruction that may have made an
            // interrupt takeable (CSR access, xRET; traps leave this loop).
            self.core.attention = false;
            loop {
                let (start, count) = match self.cache.lookup(self.core.pc, self.core.fetch_ctx) {
                    Some(span) => span,
                    None => match self.fetch_block(bus) {
                        Ok(b) => self.cache.span(b),
                        Err(t) => {
                            self.exception(bus, t);
                            if self.in_firmware() {
                                return Exit::MachineTrap;
                            }
                            break;
                        }
                    },
                };
                let budget = (stop - self.core.position) as usize;
                let ops = self.cache.ops(start, count as usize);
                let end = self.core.exec_block(bus, ops, budget);
                if self.core.flush != Flush::None {
                    self.apply_flush();
                }
                match end {
                    End::Continue => {
                        if self.core.position >= stop || self.core.attention {
                            break;
                        }
                    }
                    End::Trap(t) => {
                        self.exception(bus, t);
                        if self.in_firmware() {
                            return Exit::MachineTrap;
                        }
                        break;
                    }
                    End::Wfi => return Exit::Wfi,
                    End::Device => return Exit::Device,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::asm::*;

    const BASE: u64 = 0x8000_0000;

    /// RAM only; no devices.
    struct TestBus(Vec<u8>);

    impl Bus for TestBus {
        fn ram(&mut self) -> &mut [u8] {
            &mut self.0
        }
        fn mmio_load(&mut self, _: u64, _: u32, _: u64) -> Option<u64> {
            None
        }
        fn mmio_store(&mut self, _: u64, _: u32, _: u64, _: u64) -> bool {
            false
        }
    }

    /// A hart with `words` at the start of 64 KiB of RAM; traps go to a
    /// `j .` at BASE + 0x8000.
    fn setup(words: &[u32]) -> (Hart, TestBus) {
        let mut bus = TestBus(vec![0; 64 << 10]);
        bus.0[..words.len() * 4].copy_from_slice(&to_bytes(words));
        bus.0[0x8000..0x8004].copy_from_slice(&jal(ZERO, 0).to_le_bytes());
        let cfg = HartConfig { hartid: 0, ram_base: BASE, ram_size: 64 << 10, insns_per_tick: 10, m_mode_exits: false };
        let mut h = Hart::new(cfg);
        h.set_pc(BASE);
        h.core.csr.mtvec = BASE + 0x8000;
        h.core.csr.mstatus |= 1 << 13; // FS = Initial
        (h, bus)
    }

    /// Run `words` to their end (the first instruction past them).
    fn run(words: &[u32]) -> Hart {
        let (mut h, mut bus) = setup(words);
        let end = BASE + 4 * words.len() as u64;
        for _ in 0..10_000 {
            if h.pc() == end {
                return h;
            }
            let p = h.position().0;
            h.run(&mut bus, Position(p + 1));
        }
        panic!("did not reach the end; pc {:#x}, mcause {}", h.pc(), h.csrs().mcause);
    }

    fn with_regs(regs: &[(u32, u64)], body: &[u32]) -> Vec<u32> {
        let mut w = Vec::new();
        for &(r, v) in regs {
            w.extend(li64(r, v));
        }
        w.extend_from_slice(body);
        w
    }

    const DIV: (u32, u32) = (4, 1);
    const DIVU: (u32, u32) = (5, 1);
    const REM: (u32, u32) = (6, 1);
    const REMU: (u32, u32) = (7, 1);

    fn m_op(op: u32, (f3, f7): (u32, u32), rd: u32, rs1: u32, rs2: u32) -> u32 {
        r(op, f3, f7, rd, rs1, rs2)
    }

    /// Random words as code, in M-mode and then in S-mode under a random
    /// satp: whatever they do (traps, loads from anywhere, CSR writes), the
    /// hart must not panic, and two runs must agree exactly.
    #[test]
    fn random_code_never_panics_and_is_deterministic() {
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for round in 0..40 {
            let words: Vec<u32> = (0..2048)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u32
                })
                .collect();
            let run_once = || {
                let (mut h, mut bus) = setup(&words);
                // Traps land back in the random code.
                h.core.csr.mtvec = BASE + 0x100;
                if round % 2 == 1 {
                    h.set_prv(PRV_S);
                    h.core.csr.satp = (8 << 60) | ((BASE >> 12) + (round as u64 % 16));
                    h.core.update_ctx();
                    h.core.csr.stvec = BASE + 0x200;
                }
                for _ in 0..200 {
                    let p = h.position().0;
                    if let Exit::Wfi = h.run(&mut bus, Position(p + 500)) {
                        h.idle(10);
                    }
                }
                (h.position(), h.pc(), (0..32).map(|i| h.x(i)).collect::<Vec<_>>(), bus.0)
            };
            assert!(run_once() == run_once(), "round {round}: two runs differ");
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

    #[test]
    fn misaligned_access_across_a_page_is_emulated() {
        let h = run(&with_regs(
            &[(A0, BASE + 0x1ffd), (A1, 0x0102_0304_0506_0708)],
            &[sd(A1, A0, 0), ld(A2, A0, 0), lw(A3, A0, 1)],
        ));
        assert_eq!(h.x(12), 0x0102_0304_0506_0708);
        assert_eq!(h.x(13), 0x0405_0607);
        assert_eq!(h.csrs().mcause, 0, "no trap");
        // Inside one page: the TLB path.
        let h = run(&with_regs(
            &[(A0, BASE + 0x1003), (A1, 0x1122_3344_5566_7788)],
            &[ld(A2, A0, 0), sd(A1, A0, 0), ld(A2, A0, 0), lw(A3, A0, 2), sw(A1, A0, 5), ld(A4, A0, 0)],
        ));
        assert_eq!(h.x(12), 0x1122_3344_5566_7788);
        assert_eq!(h.x(13), 0x3344_5566);
        assert_eq!(h.x(14), 0x6677_8844_5566_7788);
        assert_eq!(h.csrs().mcause, 0, "no trap");
    }

    /// RAM plus one device at `DEV`: loads read `0x80 + offset` repeated
    /// in every byte, stores are recorded.
    struct DevBus {
        ram: Vec<u8>,
        stores: Vec<(u64, u32, u64, u64)>,
    }

    const DEV: u64 = 0x1000_0000;

    impl Bus for DevBus {
        fn ram(&mut self) -> &mut [u8] {
            &mut self.ram
        }
        fn mmio_load(&mut self, paddr: u64, size: u32, _: u64) -> Option<u64> {
            let off = paddr.checked_sub(DEV).filter(|&o| o < 0x100)?;
            let b = 0x80 + off;
            Some((0..size).fold(0, |v, i| v | b << (8 * i)))
        }
        fn mmio_store(&mut self, paddr: u64, size: u32, val: u64, pos: u64) -> bool {
            let ok = (DEV..DEV + 0x100).contains(&paddr);
            if ok {
                self.stores.push((paddr, size, val, pos));
            }
            ok
        }
    }

    fn setup_dev(words: &[u32]) -> (Hart, DevBus) {
        let (h, bus) = setup(words);
        (h, DevBus { ram: bus.0, stores: Vec::new() })
    }

    /// A load served by a device retires, writes rd (sign-extended as the
    /// load says) and ends the block with `Exit::Device` before the next
    /// instruction; the device sees the load at its exact position.
    #[test]
    fn device_loads_retire_and_end_the_block() {
        let lb = |rd, rs1, imm| i(0x03, 0, rd, rs1, imm);
        let lbu = |rd, rs1, imm| i(0x03, 4, rd, rs1, imm);
        let prefix = li64(A0, DEV).len() as u64;
        let (mut h, mut bus) =
            setup_dev(&with_regs(&[(A0, DEV)], &[lb(A1, A0, 0), lbu(A2, A0, 1), ld(A3, A0, 8), addi(A4, A4, 1)]));
        let loads = [(A1, 0xffff_ffff_ffff_ff80), (A2, 0x81), (A3, 0x8888_8888_8888_8888)];
        for (k, (rd, want)) in loads.into_iter().enumerate() {
            let done = prefix + k as u64 + 1;
            assert_eq!(h.run(&mut bus, Position(100)), Exit::Device, "load {k}");
            assert_eq!(h.x(rd as usize), want, "load {k}");
            assert_eq!((h.position(), h.pc()), (Position(done), BASE + 4 * done), "load {k} retired alone");
            assert_eq!(h.x(A4 as usize), 0, "the op after the loads has not run");
        }
        assert_eq!(h.run(&mut bus, Position(prefix + 4)), Exit::Reached);
        assert_eq!(h.x(A4 as usize), 1);
        assert_eq!(h.csrs().mcause, 0, "no trap");
    }

    /// FP loads from a device take the same exit (F/D: 11.5, 12.3).
    #[test]
    fn device_fp_loads_retire_and_end_the_block() {
        let flw = |rd, rs1, imm| i(0x07, 2, rd, rs1, imm);
        let fld = |rd, rs1, imm| i(0x07, 3, rd, rs1, imm);
        let prefix = li64(A0, DEV).len() as u64;
        let (mut h, mut bus) = setup_dev(&with_regs(&[(A0, DEV)], &[flw(1, A0, 4), fld(2, A0, 16), addi(A4, A4, 1)]));
        assert_eq!(h.run(&mut bus, Position(100)), Exit::Device);
        assert_eq!(h.f(1), 0xffff_ffff_8484_8484, "NaN-boxed");
        assert_eq!(h.position(), Position(prefix + 1));
        assert_eq!(h.run(&mut bus, Position(100)), Exit::Device);
        assert_eq!(h.f(2), 0x9090_9090_9090_9090);
        assert_eq!((h.position(), h.x(A4 as usize)), (Position(prefix + 2), 0));
        assert_eq!(h.csrs().mcause, 0, "no trap");
    }

    /// Where no device answers, a load or a store is an access fault
    /// (3.7.1) and does not retire.
    #[test]
    fn unanswered_device_accesses_fault() {
        let (mut h, mut bus) = setup_dev(&with_regs(&[(A0, DEV + 0x200)], &[ld(A1, A0, 0)]));
        h.run(&mut bus, Position(100));
        assert_eq!((h.csrs().mcause, h.csrs().mtval), (trap::LOAD_ACCESS_FAULT, DEV + 0x200));
        let (mut h, mut bus) = setup_dev(&with_regs(&[(A0, DEV + 0x200)], &[sd(A1, A0, 0)]));
        h.run(&mut bus, Position(100));
        assert_eq!((h.csrs().mcause, h.csrs().mtval), (trap::STORE_ACCESS_FAULT, DEV + 0x200));
        assert!(bus.stores.is_empty());
    }

    #[test]
    fn device_stores_end_the_block_at_their_position() {
        let prefix = li64(A0, DEV).len() as u64 + li64(A1, 0x1234).len() as u64;
        let (mut h, mut bus) = setup_dev(&with_regs(&[(A0, DEV), (A1, 0x1234)], &[sw(A1, A0, 4), addi(A4, A4, 1)]));
        assert_eq!(h.run(&mut bus, Position(100)), Exit::Device);
        assert_eq!(bus.stores, vec![(DEV + 4, 4, 0x1234, prefix)]);
        assert_eq!((h.position(), h.x(A4 as usize)), (Position(prefix + 1), 0));
    }

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
    fn store_into_decoded_code_is_seen_by_the_next_fetch() {
        // Overwrite the instruction after the store with `addi a0, a0, 100`.
        let patch = addi(A0, A0, 100);
        let mut w = with_regs(&[(A1, patch as u64)], &[]);
        let target_idx = w.len() + 2; // after auipc + sw
        w.push(auipc(A2, 0));
        w.push(sw(A1, A2, 8));
        w.push(addi(A0, A0, 1));
        assert_eq!(w.len(), target_idx + 1);
        let h = run(&w);
        assert_eq!(h.x(10), 100);
    }

    /// Dirty tracking against an oracle: the pages a program stores to,
    /// by fast path, slow path (misaligned) and AMO, are exactly the pages
    /// harvested, and a second harvest after more stores sees them again.
    #[test]
    fn dirty_pages_match_the_stores() {
        let amoadd = |rd, rs1, rs2| r(0x2f, 3, 0, rd, rs1, rs2);
        let mut w = Vec::new();
        let mut oracle = std::collections::BTreeSet::new();
        let mut seed = 7u64;
        for k in 0..40 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let page = 2 + (seed >> 40) % 12; // RAM pages 2..14, away from the code
            let off = ((seed >> 20) % 4088) & !7;
            let addr = BASE + page * 4096 + off + (k % 3 == 1) as u64 * 3;
            w.extend(li64(A0, addr));
            w.push(match k % 3 {
                0 => sd(A1, A0, 0),
                1 => sw(A1, A0, 0), // misaligned (slow path)
                _ => amoadd(A2, A0, A1),
            });
            oracle.insert(page);
            if addr & 0xfff > 4092 {
                oracle.insert(page + 1);
            }
        }
        let (mut h, mut bus) = setup(&w);
        h.take_dirty_pages(); // start clean
        let end = BASE + 4 * w.len() as u64;
        while h.pc() != end {
            let p = h.position().0;
            h.run(&mut bus, Position(p + 1));
            assert_eq!(h.csrs().mcause, 0, "no trap");
        }
        let got: std::collections::BTreeSet<u64> = h.take_dirty_pages().into_iter().collect();
        assert_eq!(got, oracle);
        assert!(h.take_dirty_pages().is_empty(), "harvest clears");
        // A store to an already-harvested page marks it again.
        let page = *oracle.iter().next().unwrap();
        let again = [li64(A0, BASE + page * 4096), vec![sd(A1, A0, 0)]].concat();
        bus.0[0x9000..0x9000 + 4 * again.len()].copy_from_slice(&to_bytes(&again));
        h.set_pc(BASE + 0x9000);
        let p = h.position().0;
        h.run(&mut bus, Position(p + again.len() as u64));
        assert_eq!(h.take_dirty_pages(), vec![page]);
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
