//! Address translation: Sv39/Sv48 page walks and the software TLB.
//!
//! The TLB maps a virtual page straight to an offset into guest RAM, so a hit
//! costs one compare. It is direct-mapped, 256 entries, with separate read,
//! write and fetch arrays, and one set of arrays per translation context:
//!
//! ```text
//!  ctx 0: U-mode under paging      ctx 1: S-mode under paging
//!  ctx 2: bare (M-mode, or satp.MODE = Bare): identity, no permission checks
//!  ctx 3: S-mode loads and stores under paging with mstatus.SUM set
//! ```
//!
//! so that U<->S traps and returns flush nothing, and neither does a flip of
//! SUM (Linux sets it around every copy to or from user memory and clears it
//! on every trap entry): with SUM set, S-mode may touch user pages, so its
//! data translations live apart from those made without it. Fetches never
//! use ctx 3 (S-mode cannot execute user pages whatever SUM says).
//!
//! Only RAM pages are entered; MMIO always takes the slow path. Each tag is the page address; a lookup
//! compares it with `vaddr & (!0xfff | (size - 1))`, so a misaligned access
//! misses by construction and is split by the slow path. An empty entry has a
//! tag with low bits set, which no lookup can produce.
//!
//! Write entries are only made for pages whose PTE is already dirty and which
//! hold no decoded code: a store to a code page always takes the slow path,
//! which lets the block cache drop the stale blocks (ENGINE-NOTES §4).
//!
//! Page walks follow the Privileged ISA 4.3.2 (Sv39: 4.4, Sv48: 4.5), with
//! A and D updated by the walker (the Svadu behaviour QEMU also has).

use crate::bitmap::PageBitmap;
use crate::csr::*;
use crate::trap::{self, Trap};

pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
pub const TLB_ENTRIES: usize = 256;
const EMPTY_TAG: u64 = u64::MAX;

pub const CTX_U: usize = 0;
pub const CTX_S: usize = 1;
pub const CTX_BARE: usize = 2;
pub const CTX_S_SUM: usize = 3;
/// The paged contexts: every one a satp write or `sfence.vma` flushes.
const PAGED: [usize; 3] = [CTX_U, CTX_S, CTX_S_SUM];

/// What an access is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Fetch,
}

impl Access {
    pub fn page_fault(self, vaddr: u64) -> Trap {
        let cause = match self {
            Access::Read => trap::LOAD_PAGE_FAULT,
            Access::Write => trap::STORE_PAGE_FAULT,
            Access::Fetch => trap::FETCH_PAGE_FAULT,
        };
        Trap::new(cause, vaddr)
    }
    pub fn access_fault(self, vaddr: u64) -> Trap {
        let cause = match self {
            Access::Read => trap::LOAD_ACCESS_FAULT,
            Access::Write => trap::STORE_ACCESS_FAULT,
            Access::Fetch => trap::FETCH_ACCESS_FAULT,
        };
        Trap::new(cause, vaddr)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlbEntry {
    pub tag: u64,
    /// Offset of the page in guest RAM.
    pub ram_off: u64,
}

const EMPTY: TlbEntry = TlbEntry { tag: EMPTY_TAG, ram_off: 0 };

/// One array per access kind.
#[derive(Clone)]
pub struct TlbSet {
    pub read: [TlbEntry; TLB_ENTRIES],
    pub write: [TlbEntry; TLB_ENTRIES],
    pub fetch: [TlbEntry; TLB_ENTRIES],
}

impl TlbSet {
    fn new() -> Self {
        TlbSet { read: [EMPTY; TLB_ENTRIES], write: [EMPTY; TLB_ENTRIES], fetch: [EMPTY; TLB_ENTRIES] }
    }
    fn array(&mut self, access: Access) -> &mut [TlbEntry; TLB_ENTRIES] {
        match access {
            Access::Read => &mut self.read,
            Access::Write => &mut self.write,
            Access::Fetch => &mut self.fetch,
        }
    }
}

#[inline(always)]
pub fn tlb_index(vaddr: u64) -> usize {
    (vaddr >> PAGE_SHIFT) as usize & (TLB_ENTRIES - 1)
}

/// The software TLB plus the physical-page "holds decoded code" bitmap.
#[derive(Clone)]
pub struct Tlb {
    pub sets: Box<[TlbSet; 4]>,
    /// One bit per RAM page: blocks were decoded from it.
    code_pages: PageBitmap,
    /// One bit per RAM page: written since the last harvest. A page's bit
    /// is set when a write entry for it is made (or a slow-path store hits
    /// it), so fast-path stores need no check; a harvest drops every write
    /// entry, so the next store to each page marks it again.
    dirty: PageBitmap,
    /// Virtual range covered by superpage translations in the paged
    /// contexts since their last full flush: a single-address sfence.vma
    /// inside it must flush everything.
    super_lo: u64,
    super_hi: u64,
}

impl Tlb {
    pub fn new(ram_pages: usize) -> Self {
        Tlb {
            sets: Box::new([TlbSet::new(), TlbSet::new(), TlbSet::new(), TlbSet::new()]),
            code_pages: PageBitmap::new(ram_pages),
            dirty: PageBitmap::new(ram_pages),
            super_lo: u64::MAX,
            super_hi: 0,
        }
    }

    /// Flush the paged contexts (satp write, sfence.vma).
    pub fn flush_paged(&mut self) {
        for ctx in PAGED {
            self.sets[ctx] = TlbSet::new();
        }
        self.super_lo = u64::MAX;
        self.super_hi = 0;
    }

    /// `sfence.vma vaddr`: drop the translations of one address (all of
    /// them if it may lie in a superpage).
    pub fn flush_page(&mut self, vaddr: u64) {
        if (self.super_lo..self.super_hi).contains(&vaddr) {
            self.flush_paged();
            return;
        }
        let tag = vaddr & !(PAGE_SIZE - 1);
        let i = tlb_index(vaddr);
        for ctx in PAGED {
            let set = &mut self.sets[ctx];
            for arr in [&mut set.read, &mut set.write, &mut set.fetch] {
                if arr[i].tag == tag {
                    arr[i] = EMPTY;
                }
            }
        }
    }

    /// Note a superpage translation of `[base, base + size)`.
    pub fn note_superpage(&mut self, base: u64, size: u64) {
        self.super_lo = self.super_lo.min(base);
        self.super_hi = self.super_hi.max(base.saturating_add(size));
    }

    /// Flush the read and write entries of the paged contexts (mstatus.MXR
    /// changed).
    pub fn flush_paged_data(&mut self) {
        for ctx in PAGED {
            self.sets[ctx].read = [EMPTY; TLB_ENTRIES];
            self.sets[ctx].write = [EMPTY; TLB_ENTRIES];
        }
    }

    pub fn insert(&mut self, ctx: usize, access: Access, vaddr: u64, ram_off: u64) {
        let page = vaddr & !(PAGE_SIZE - 1);
        if access == Access::Write {
            self.mark_dirty(ram_off >> PAGE_SHIFT);
        }
        self.sets[ctx].array(access)[tlb_index(vaddr)] = TlbEntry { tag: page, ram_off: ram_off & !(PAGE_SIZE - 1) };
    }

    pub fn is_code_page(&self, ram_page: u64) -> bool {
        self.code_pages.get(ram_page)
    }

    /// Mark a RAM page as holding decoded code and drop every write entry
    /// that maps it, so the next store to it is seen.
    pub fn mark_code_page(&mut self, ram_page: u64) {
        self.code_pages.set(ram_page);
        let off = ram_page << PAGE_SHIFT;
        for set in self.sets.iter_mut() {
            for e in set.write.iter_mut() {
                if e.tag != EMPTY_TAG && e.ram_off == off {
                    *e = EMPTY;
                }
            }
        }
    }

    pub fn clear_code_page(&mut self, ram_page: u64) {
        self.code_pages.clear(ram_page);
    }

    pub fn clear_all_code_pages(&mut self) {
        self.code_pages.clear_all();
    }

    pub fn mark_dirty(&mut self, ram_page: u64) {
        self.dirty.set(ram_page);
    }

    /// The RAM pages written since the last call, in ascending order; re-arms
    /// the tracking by dropping every write entry.
    pub fn take_dirty(&mut self) -> Vec<u64> {
        let pages = self.dirty.drain();
        for set in self.sets.iter_mut() {
            set.write = [EMPTY; TLB_ENTRIES];
        }
        pages
    }
}

// PTE bits (4.3.1).
pub const PTE_V: u64 = 1 << 0;
pub const PTE_R: u64 = 1 << 1;
pub const PTE_W: u64 = 1 << 2;
pub const PTE_X: u64 = 1 << 3;
pub const PTE_U: u64 = 1 << 4;
pub const PTE_A: u64 = 1 << 6;
pub const PTE_D: u64 = 1 << 7;
const PTE_PPN_SHIFT: u32 = 10;
const PTE_PPN_MASK: u64 = ((1 << 44) - 1) << PTE_PPN_SHIFT;
/// Bits 63:54 (N, PBMT, reserved): none of Svnapot/Svpbmt is implemented,
/// so a set bit makes the PTE invalid.
const PTE_RESERVED: u64 = 0x3ff << 54;

/// Result of a successful walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walk {
    pub paddr: u64,
    /// Size of the page (4 KiB, or a superpage's size).
    pub page_size: u64,
}

/// Physical memory as the page walker sees it: 8-byte PTE reads and writes.
pub trait PteMemory {
    fn read_pte(&mut self, paddr: u64) -> Option<u64>;
    fn write_pte(&mut self, paddr: u64, val: u64) -> bool;
}

/// Inputs of a walk that come from the CSRs.
#[derive(Clone, Copy, Debug)]
pub struct WalkCtx {
    pub satp: u64,
    /// Effective privilege of the access.
    pub prv: u8,
    pub sum: bool,
    pub mxr: bool,
}

/// Translate `vaddr` under `satp`'s Sv39/Sv48 (4.3.2). The caller has already
/// handled bare mode and M-mode.
pub fn walk(mem: &mut impl PteMemory, ctx: WalkCtx, vaddr: u64, access: Access) -> Result<Walk, Trap> {
    let mode = ctx.satp >> SATP_MODE_SHIFT;
    let levels: u32 = if mode == SATP_MODE_SV48 { 4 } else { 3 };
    let va_bits = 12 + 9 * levels;
    // The address must be sign-extended from bit va_bits-1.
    let shift = 64 - va_bits;
    if ((vaddr << shift) as i64 >> shift) as u64 != vaddr {
        return Err(access.page_fault(vaddr));
    }
    let mut table = (ctx.satp & SATP_PPN_MASK) << PAGE_SHIFT;
    let mut level = levels;
    loop {
        level -= 1;
        let vpn = (vaddr >> (12 + 9 * level)) & 0x1ff;
        let pte_addr = table + vpn * 8;
        let pte = mem.read_pte(pte_addr).ok_or(access.access_fault(vaddr))?;
        if pte & PTE_V == 0 || (pte & PTE_R == 0 && pte & PTE_W != 0) || pte & PTE_RESERVED != 0 {
            return Err(access.page_fault(vaddr));
        }
        let ppn = (pte & PTE_PPN_MASK) >> PTE_PPN_SHIFT;
        if pte & (PTE_R | PTE_X) == 0 {
            // Pointer to the next level; A/D/U must be clear in non-leaf PTEs.
            if level == 0 || pte & (PTE_A | PTE_D | PTE_U) != 0 {
                return Err(access.page_fault(vaddr));
            }
            table = ppn << PAGE_SHIFT;
            continue;
        }
        // Leaf: permissions.
        let user_page = pte & PTE_U != 0;
        match ctx.prv {
            PRV_U if !user_page => return Err(access.page_fault(vaddr)),
            PRV_S if user_page && (access == Access::Fetch || !ctx.sum) => return Err(access.page_fault(vaddr)),
            _ => {}
        }
        let allowed = match access {
            Access::Read => pte & PTE_R != 0 || (ctx.mxr && pte & PTE_X != 0),
            Access::Write => pte & PTE_W != 0,
            Access::Fetch => pte & PTE_X != 0,
        };
        if !allowed {
            return Err(access.page_fault(vaddr));
        }
        // Misaligned superpage.
        let low_ppn_mask = (1u64 << (9 * level)) - 1;
        if ppn & low_ppn_mask != 0 {
            return Err(access.page_fault(vaddr));
        }
        let mut new_pte = pte | PTE_A;
        if access == Access::Write {
            new_pte |= PTE_D;
        }
        if new_pte != pte && !mem.write_pte(pte_addr, new_pte) {
            return Err(access.access_fault(vaddr));
        }
        let page_offset_mask = (1u64 << (12 + 9 * level)) - 1;
        let paddr = ((ppn << PAGE_SHIFT) & !page_offset_mask) | (vaddr & page_offset_mask);
        return Ok(Walk { paddr, page_size: page_offset_mask + 1 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct Mem(BTreeMap<u64, u64>);
    impl PteMemory for Mem {
        fn read_pte(&mut self, paddr: u64) -> Option<u64> {
            if paddr >= 0x1_0000_0000 {
                return None;
            }
            Some(*self.0.get(&paddr).unwrap_or(&0))
        }
        fn write_pte(&mut self, paddr: u64, val: u64) -> bool {
            self.0.insert(paddr, val);
            true
        }
    }

    const ROOT: u64 = 0x8000_0000;
    const L1: u64 = 0x8000_1000;
    const L0: u64 = 0x8000_2000;

    fn pte(ppn_addr: u64, flags: u64) -> u64 {
        ((ppn_addr >> 12) << 10) | flags
    }

    fn sv39() -> u64 {
        (SATP_MODE_SV39 << 60) | (ROOT >> 12)
    }

    fn ctx(prv: u8) -> WalkCtx {
        WalkCtx { satp: sv39(), prv, sum: false, mxr: false }
    }

    /// vaddr 0x4000_1000 -> 0x9000_0000 through three levels, R|W|U.
    fn three_level() -> Mem {
        let mut m = BTreeMap::new();
        m.insert(ROOT + 8, pte(L1, PTE_V));
        m.insert(L1, pte(L0, PTE_V));
        m.insert(L0 + 8, pte(0x9000_0000, PTE_V | PTE_R | PTE_W | PTE_U));
        Mem(m)
    }

    /// Every paged context, the SUM one included, is flushed by a satp
    /// write or `sfence.vma` (all, or the one address) and by an MXR flip.
    #[test]
    fn flushes_reach_every_paged_context() {
        for ctx in [CTX_U, CTX_S, CTX_S_SUM] {
            let mut t = Tlb::new(16);
            let cached = |t: &Tlb| t.sets[ctx].read[tlb_index(0x4000_2000)].tag == 0x4000_2000;
            t.insert(ctx, Access::Read, 0x4000_2000, 0x2000);
            assert!(cached(&t));
            t.flush_paged();
            assert!(!cached(&t), "ctx {ctx}: satp write");
            t.insert(ctx, Access::Read, 0x4000_2000, 0x2000);
            t.flush_page(0x4000_2abc);
            assert!(!cached(&t), "ctx {ctx}: sfence.vma of the address");
            t.insert(ctx, Access::Read, 0x4000_2000, 0x2000);
            t.flush_paged_data();
            assert!(!cached(&t), "ctx {ctx}: MXR");
        }
        let mut t = Tlb::new(16);
        t.insert(CTX_BARE, Access::Read, 0x8000_2000, 0x2000);
        t.flush_paged();
        assert_eq!(t.sets[CTX_BARE].read[tlb_index(0x8000_2000)].tag, 0x8000_2000, "bare stays");
    }

    #[test]
    fn walk_sets_accessed_and_dirty() {
        let mut m = three_level();
        let w = walk(&mut m, ctx(PRV_U), 0x4000_1234, Access::Read).unwrap();
        assert_eq!(w.paddr, 0x9000_0234);
        assert_eq!(m.0[&(L0 + 8)] & (PTE_A | PTE_D), PTE_A);
        walk(&mut m, ctx(PRV_U), 0x4000_1234, Access::Write).unwrap();
        assert_eq!(m.0[&(L0 + 8)] & (PTE_A | PTE_D), PTE_A | PTE_D);
    }

    #[test]
    fn user_page_from_supervisor_needs_sum_and_never_executes() {
        let mut m = three_level();
        let e = walk(&mut m, ctx(PRV_S), 0x4000_1000, Access::Read).unwrap_err();
        assert_eq!((e.cause, e.tval), (trap::LOAD_PAGE_FAULT, 0x4000_1000));
        let c = WalkCtx { sum: true, ..ctx(PRV_S) };
        assert!(walk(&mut m, c, 0x4000_1000, Access::Read).is_ok());
        let e = walk(&mut m, c, 0x4000_1000, Access::Fetch).unwrap_err();
        assert_eq!(e.cause, trap::FETCH_PAGE_FAULT);
    }

    #[test]
    fn mxr_makes_execute_only_readable() {
        let mut m = three_level();
        m.0.insert(L0 + 8, pte(0x9000_0000, PTE_V | PTE_X | PTE_U));
        assert!(walk(&mut m, ctx(PRV_U), 0x4000_1000, Access::Read).is_err());
        let c = WalkCtx { mxr: true, ..ctx(PRV_U) };
        assert!(walk(&mut m, c, 0x4000_1000, Access::Read).is_ok());
    }

    #[test]
    fn superpages_and_misaligned_superpage() {
        let mut m = BTreeMap::new();
        // 1 GiB gigapage at vaddr 0x4000_0000 -> 0x8000_0000.
        m.insert(ROOT + 8, pte(0x8000_0000, PTE_V | PTE_R | PTE_X));
        // 2 MiB megapage misaligned (ppn[0] != 0).
        m.insert(ROOT + 16, pte(L1, PTE_V));
        m.insert(L1, pte(0x8000_1000, PTE_V | PTE_R));
        let mut m = Mem(m);
        let w = walk(&mut m, ctx(PRV_S), 0x4012_3456, Access::Fetch).unwrap();
        assert_eq!(w.paddr, 0x8012_3456);
        let e = walk(&mut m, ctx(PRV_S), 0x8000_0000, Access::Read).unwrap_err();
        assert_eq!(e.cause, trap::LOAD_PAGE_FAULT);
    }

    #[test]
    fn non_canonical_and_reserved_encodings_fault() {
        let mut m = three_level();
        let e = walk(&mut m, ctx(PRV_U), 0x0000_0080_0000_0000, Access::Write).unwrap_err();
        assert_eq!(e.cause, trap::STORE_PAGE_FAULT);
        m.0.insert(L0 + 8, pte(0x9000_0000, PTE_V | PTE_W | PTE_U)); // W without R
        assert!(walk(&mut m, ctx(PRV_U), 0x4000_1000, Access::Read).is_err());
        m.0.insert(L0 + 8, pte(0x9000_0000, PTE_V | PTE_R | PTE_U) | (1 << 60)); // reserved
        assert!(walk(&mut m, ctx(PRV_U), 0x4000_1000, Access::Read).is_err());
    }

    #[test]
    fn pte_outside_memory_is_an_access_fault() {
        let mut m = Mem(BTreeMap::new());
        let c = WalkCtx { satp: (SATP_MODE_SV39 << 60) | (0x2_0000_0000 >> 12), ..ctx(PRV_S) };
        let e = walk(&mut m, c, 0x1000, Access::Read).unwrap_err();
        assert_eq!(e.cause, trap::LOAD_ACCESS_FAULT);
    }

    #[test]
    fn sv48_has_four_levels() {
        let mut m = BTreeMap::new();
        let l2 = 0x8000_3000;
        m.insert(ROOT + 8, pte(l2, PTE_V)); // vpn[3] = 1 => vaddr bit 39
        m.insert(l2, pte(0xc000_0000, PTE_V | PTE_R | PTE_W)); // gigapage
        let mut m = Mem(m);
        let c = WalkCtx { satp: (SATP_MODE_SV48 << 60) | (ROOT >> 12), ..ctx(PRV_S) };
        let w = walk(&mut m, c, 0x80_0000_0010, Access::Read).unwrap();
        assert_eq!(w.paddr, 0xc000_0010);
    }

    /// Walk against a naive oracle: random leaf flags on one path.
    #[test]
    fn permissions_match_naive_oracle() {
        let mut seed = 0x1234_5678_u64;
        for _ in 0..2000 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let flags = (seed >> 33) & 0xff | PTE_V;
            let prv = [PRV_U, PRV_S][(seed >> 50) as usize & 1];
            let sum = seed >> 51 & 1 == 1;
            let mxr = seed >> 52 & 1 == 1;
            let access = [Access::Read, Access::Write, Access::Fetch][(seed >> 53) as usize % 3];
            let mut m = three_level();
            m.0.insert(L0 + 8, pte(0x9000_0000, flags));
            let c = WalkCtx { sum, mxr, ..ctx(prv) };
            let got = walk(&mut m, c, 0x4000_1000, access).is_ok();
            let (r, w, x, u) = (flags & PTE_R != 0, flags & PTE_W != 0, flags & PTE_X != 0, flags & PTE_U != 0);
            let leaf = r || x;
            let oracle = leaf
                && (r || !w)
                && match prv {
                    PRV_U => u,
                    _ => !u || (sum && access != Access::Fetch),
                }
                && match access {
                    Access::Read => r || (mxr && x),
                    Access::Write => w,
                    Access::Fetch => x,
                };
            // A non-leaf at level 0 is a fault too; it is covered by `leaf`.
            assert_eq!(got, oracle, "flags {flags:#x} prv {prv} sum {sum} mxr {mxr} {access:?}");
        }
    }
}
