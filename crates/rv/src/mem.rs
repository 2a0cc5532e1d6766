//! Memory access from the hart, as `impl Core`: loads, stores and AMO
//! addresses; translation around [`mmu::walk`] with the TLB fill; the
//! translation contexts (privilege, MPRV); and the marks a slow-path write
//! leaves (dirty page, dropped code).
//!
//! # Fast and slow paths
//!
//! A TLB hit is one compare and one load or store: the tag compare also
//! rejects misaligned accesses, so `load_hit` and `store` stay tiny and
//! inline, and everything else (TLB miss, misaligned access, device) goes
//! out of line to `load_slow` / `store_slow`. The block loop calls
//! `load_hit` and `load_slow` separately, so that a hit yields a plain
//! value and never builds the richer [`Loaded`] that the slow path returns.
//!
//! # Devices
//!
//! An address outside RAM goes to [`Bus::mmio_load`] / [`Bus::mmio_store`].
//! A device load comes back as [`Loaded::Device`] and a device store as
//! `Ok(true)`: either way the instruction retires and its block ends, so the
//! board acts on the access before the next instruction. A device that does
//! not answer is an access fault (a [`Trap`]). Misaligned accesses are split
//! into byte accesses; those never end the block, even on a device.

use crate::bus::Bus;
use crate::csr::*;
use crate::hart::{Core, Flush};
use crate::mmu::{self, Access, PteMemory, WalkCtx, CTX_BARE, CTX_S, CTX_S_SUM, CTX_U, PAGE_SIZE};
use crate::trap::{self, Trap};

/// A load that did not trap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Loaded {
    /// From RAM (or split into byte loads, when misaligned): the block goes on.
    Value(u64),
    /// Served by a device: the instruction retires and the block ends, so
    /// the board can act on the access before the next instruction.
    Device(u64),
}

/// The page-table walker's view of guest RAM.
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

impl Core {
    // ----- translation contexts -----

    /// Recompute the TLB contexts of fetches and of loads and stores, after
    /// a change of privilege, `satp`, or `mstatus.MPRV`/`MPP`/`SUM`.
    pub(crate) fn update_ctx(&mut self) {
        let paged = self.csr.satp >> SATP_MODE_SHIFT != SATP_MODE_BARE;
        let ctx_of = |prv: u8| match prv {
            _ if !paged => CTX_BARE,
            PRV_U => CTX_U,
            PRV_S => CTX_S,
            _ => CTX_BARE,
        };
        self.fetch_ctx = ctx_of(self.prv);
        self.data_ctx = match ctx_of(self.data_prv()) {
            CTX_S if self.csr.mstatus & MSTATUS_SUM != 0 => CTX_S_SUM,
            ctx => ctx,
        };
    }

    /// Effective privilege of loads and stores (MPRV, 3.1.6.3).
    fn data_prv(&self) -> u8 {
        if self.prv == PRV_M && self.csr.mstatus & MSTATUS_MPRV != 0 {
            ((self.csr.mstatus & MSTATUS_MPP) >> MSTATUS_MPP_SHIFT) as u8
        } else {
            self.prv
        }
    }

    // ----- translation, loads, stores -----

    /// The offset of `paddr` into RAM, if it is in RAM.
    pub(crate) fn ram_off(&self, paddr: u64) -> Option<u64> {
        let off = paddr.wrapping_sub(self.cfg.ram_base);
        (off < self.cfg.ram_size).then_some(off)
    }

    /// Translate and, for RAM, fill the TLB.
    pub(crate) fn translate<B: Bus>(&mut self, bus: &mut B, vaddr: u64, access: Access) -> Result<u64, Trap> {
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
    pub(crate) fn lookup_or_translate<B: Bus>(&mut self, bus: &mut B, vaddr: u64, access: Access) -> Result<u64, Trap> {
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

    pub(crate) fn phys_load<B: Bus>(&mut self, bus: &mut B, paddr: u64, size: u32, pos: u64) -> Option<u64> {
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
    pub(crate) fn phys_store<B: Bus>(
        &mut self,
        bus: &mut B,
        paddr: u64,
        size: u32,
        val: u64,
        pos: u64,
    ) -> Option<bool> {
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
    pub(crate) fn load_hit<B: Bus, const N: usize>(&self, bus: &mut B, vaddr: u64) -> Option<u64> {
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
    pub(crate) fn load<B: Bus, const N: usize>(&mut self, bus: &mut B, vaddr: u64, pos: u64) -> Result<Loaded, Trap> {
        match self.load_hit::<B, N>(bus, vaddr) {
            Some(v) => Ok(Loaded::Value(v)),
            None => self.load_slow(bus, vaddr, N as u32, pos),
        }
    }

    #[cold]
    #[inline(never)]
    pub(crate) fn load_slow<B: Bus>(&mut self, bus: &mut B, vaddr: u64, size: u32, pos: u64) -> Result<Loaded, Trap> {
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
    pub(crate) fn store<B: Bus, const N: usize>(
        &mut self,
        bus: &mut B,
        vaddr: u64,
        val: u64,
        pos: u64,
    ) -> Result<bool, Trap> {
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
    pub(crate) fn amo_addr<B: Bus>(&mut self, bus: &mut B, vaddr: u64, size: u32, lr: bool) -> Result<u64, Trap> {
        if vaddr & (size as u64 - 1) != 0 {
            let cause = if lr { trap::LOAD_MISALIGNED } else { trap::STORE_MISALIGNED };
            return Err(Trap::new(cause, vaddr));
        }
        self.translate(bus, vaddr, if lr { Access::Read } else { Access::Write })
    }
}

#[cfg(test)]
mod tests {
    use crate::asm::*;
    use crate::test_utils::*;
    use crate::trap;
    use crate::{Exit, Position};

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

    /// mstatus.SUM picks the S-mode data context instead of flushing
    /// (Linux flips it around every user copy and on every trap entry):
    /// a user page read with SUM set faults again once SUM is clear, and
    /// the supervisor translations made before the flips are still cached.
    #[test]
    fn sum_switches_the_data_context_without_a_flush() {
        use crate::csr::*;
        use crate::mmu::{CTX_S, CTX_S_SUM};
        // Sv39, two gigapages onto RAM: VA 0x8000_0000 for S (identity,
        // the code runs there) and VA 0x4000_0000 for U.
        const ROOT: u64 = 0x5000;
        const USER: u64 = 0x4000_0000;
        let leaf = |u: u64| ((BASE >> 12) << 10) | 0xcf | u << 4; // V R W X A D (+ U)
        let body = [
            ld(A3, A4, 0),            // S page, SUM clear: cached in ctx S
            csrrs(ZERO, SSTATUS, T0), // SUM on
            ld(A1, A0, 0),            // U page: allowed
            csrrc(ZERO, SSTATUS, T0), // SUM off
            ld(A2, A0, 0),            // U page: a load page fault
        ];
        let w = with_regs(&[(T0, MSTATUS_SUM), (A0, USER + 0x2000), (A4, BASE + 0x3000)], &body);
        let (mut h, mut bus) = setup(&w);
        bus.0[ROOT as usize + 8..][..8].copy_from_slice(&leaf(1).to_le_bytes());
        bus.0[ROOT as usize + 16..][..8].copy_from_slice(&leaf(0).to_le_bytes());
        // On TLB indexes of their own: a flush, not a collision, must be
        // what removes an entry.
        bus.0[0x2000..0x2008].copy_from_slice(&[0x11; 8]);
        bus.0[0x3000..0x3008].copy_from_slice(&[0x22; 8]);
        h.core.csr.satp = (SATP_MODE_SV39 << 60) | ((BASE + ROOT) >> 12);
        h.set_prv(PRV_S);
        let before_fault = w.len() as u64 - 1;
        h.run(&mut bus, Position(before_fault));
        assert_eq!((h.x(A3 as usize), h.x(A1 as usize)), (0x2222_2222_2222_2222, 0x1111_1111_1111_1111));
        assert_eq!(h.csrs().mcause, 0, "no trap yet");
        assert_eq!(h.core.data_ctx, CTX_S, "SUM is clear again");
        let s_page = h.core.tlb.sets[CTX_S].read.iter().any(|e| e.tag == BASE + 0x3000);
        assert!(s_page, "the supervisor translation survived two flips of SUM");
        let u_page = h.core.tlb.sets[CTX_S_SUM].read.iter().any(|e| e.tag == USER + 0x2000);
        assert!(u_page, "the user page is cached for SUM set only");
        h.run(&mut bus, Position(before_fault + 1));
        assert_eq!((h.csrs().mcause, h.csrs().mtval), (trap::LOAD_PAGE_FAULT, USER + 0x2000));
        assert_eq!(h.x(A2 as usize), 0, "the faulting load wrote nothing");
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
}
