//! The decoded-block cache.
//!
//! A block is a run of decoded [`Op`]s starting at one physical address and
//! ending at a control transfer, a system instruction, [`MAX_BLOCK_OPS`], or
//! the end of the page: blocks never cross a page, so dropping one page's
//! blocks on a store to it is exact.
//!
//! Lookup goes through a two-way "jump cache" keyed by the virtual pc and
//! the fetch context (QEMU's tb-jmp-cache), then through a map keyed by the
//! physical address. The jump cache is flushed with the paged TLB
//! contexts (satp writes, `sfence.vma`) and whenever a page's blocks drop.
//!
//! Nothing here is guest-visible: the map is only ever looked up, never
//! iterated, and a cold cache decodes the same ops a warm one holds, because
//! every store to a code page drops that page's blocks before the next block
//! is fetched.

use crate::decode::Op;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A fast hasher for the u64 keys of the block maps (SipHash's DoS
/// resistance buys nothing here: the maps are only looked up, never
/// iterated, so their order never reaches the guest).
#[derive(Default)]
struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ b as u64).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (v ^ (v >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type AddrMap<V> = HashMap<u64, V, BuildHasherDefault<AddrHasher>>;

/// Upper bound on ops per block.
pub const MAX_BLOCK_OPS: usize = 64;
/// Jump-cache sets, of `JUMP_WAYS` entries (24 bytes each). The guest
/// kernel's path for one network request runs several thousand distinct
/// blocks, every one once per request: direct-mapped, even at 64 Ki
/// entries, the pairs of them that collide missed every time (a hundred
/// misses per request, each a trip through the dispatcher). Two ways keep
/// such pairs; the newest entry goes first, the older moves second.
pub(crate) const JUMP_SETS: usize = 32768;
pub(crate) const JUMP_WAYS: usize = 2;
/// Flush everything when the op arena grows past this (dead blocks are only
/// reclaimed by a full flush).
const MAX_OPS: usize = 1 << 21;
/// Block 0 is a scratch block for an instruction that straddles two pages;
/// it is rebuilt each time and never entered in the maps.
pub const SCRATCH_BLOCK: u32 = 0;

#[derive(Clone, Copy, Debug)]
pub struct Block {
    /// Index of the first op in the arena.
    pub start: u32,
    pub count: u32,
    pub paddr: u64,
}

/// One jump-cache entry. `repr(C)`: translated code reads it (`jit`).
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct JumpEntry {
    pub(crate) pc: u64,
    /// Fetch context in the low 2 bits, the flush generation above them.
    pub(crate) key: u32,
    /// The block's ops in the arena, copied here to save a lookup.
    pub(crate) start: u32,
    pub(crate) count: u32,
    pub(crate) block: u32,
}

const EMPTY_JUMP: JumpEntry = JumpEntry { pc: u64::MAX, key: u32::MAX, start: 0, count: 0, block: 0 };

#[derive(Clone)]
pub struct BlockCache {
    pub ops: Vec<Op>,
    pub blocks: Vec<Block>,
    by_paddr: AddrMap<u32>,
    /// RAM page number -> blocks decoded from it.
    by_page: AddrMap<Vec<u32>>,
    jump: Vec<JumpEntry>,
    /// Bumped to flush the jump cache in O(1).
    generation: u32,
}

impl Default for BlockCache {
    fn default() -> Self {
        Self::new()
    }
}

impl BlockCache {
    pub fn new() -> Self {
        let mut c = BlockCache {
            ops: Vec::new(),
            blocks: Vec::new(),
            by_paddr: AddrMap::default(),
            by_page: AddrMap::default(),
            jump: vec![EMPTY_JUMP; JUMP_SETS * JUMP_WAYS],
            generation: 0,
        };
        c.reset_arena();
        c
    }

    fn reset_arena(&mut self) {
        self.ops.clear();
        self.blocks.clear();
        self.ops.push(Op::illegal(0, 2));
        self.blocks.push(Block { start: 0, count: 1, paddr: u64::MAX });
    }

    /// The jump cache's entries, for translated code's own lookups (valid
    /// until the next call that changes the cache).
    pub(crate) fn jump_table(&self) -> *const JumpEntry {
        self.jump.as_ptr()
    }

    /// The first entry of the set for `pc`. Translated code computes the
    /// same index inline (`jit/emit.rs`, the chain): change both together.
    #[inline(always)]
    pub(crate) fn jump_index(pc: u64) -> usize {
        (((pc >> 1) ^ (pc >> 13)) as usize & (JUMP_SETS - 1)) * JUMP_WAYS
    }

    #[inline(always)]
    /// The ops span `(start, count)` and the number of the block cached
    /// for `pc`.
    pub fn lookup(&self, pc: u64, ctx: usize) -> Option<(u32, u32, u32)> {
        let i = Self::jump_index(pc);
        let key = self.key(ctx);
        self.jump[i..i + JUMP_WAYS].iter().find(|e| e.pc == pc && e.key == key).map(|e| (e.start, e.count, e.block))
    }

    pub fn remember(&mut self, pc: u64, ctx: usize, block: u32) {
        let b = self.blocks[block as usize];
        let i = Self::jump_index(pc);
        self.jump.copy_within(i..i + JUMP_WAYS - 1, i + 1);
        self.jump[i] = JumpEntry { pc, key: self.key(ctx), start: b.start, count: b.count, block };
    }

    /// The ops span of a block, and its number.
    pub fn span(&self, block: u32) -> (u32, u32, u32) {
        let b = self.blocks[block as usize];
        (b.start, b.count, block)
    }

    pub fn find_paddr(&self, paddr: u64) -> Option<u32> {
        self.by_paddr.get(&paddr).copied()
    }

    /// Enter a new block decoded at `paddr` from RAM page `page`. Returns
    /// `None` when the arena is full: the caller flushes and retries.
    pub fn insert(&mut self, paddr: u64, page: u64, ops: &[Op]) -> Option<u32> {
        if self.ops.len() + ops.len() > MAX_OPS {
            return None;
        }
        let idx = self.blocks.len() as u32;
        self.blocks.push(Block { start: self.ops.len() as u32, count: ops.len() as u32, paddr });
        self.ops.extend_from_slice(ops);
        self.by_paddr.insert(paddr, idx);
        self.by_page.entry(page).or_default().push(idx);
        Some(idx)
    }

    /// Put one op in the scratch block.
    pub fn set_scratch(&mut self, op: Op) -> u32 {
        self.ops[0] = op;
        SCRATCH_BLOCK
    }

    /// Drop every block decoded from RAM page `page`. Returns whether any
    /// existed.
    pub fn drop_page(&mut self, page: u64) -> bool {
        let Some(blocks) = self.by_page.remove(&page) else {
            return false;
        };
        for b in blocks {
            let paddr = self.blocks[b as usize].paddr;
            self.by_paddr.remove(&paddr);
        }
        self.flush_jumps();
        true
    }

    #[inline(always)]
    pub(crate) fn key(&self, ctx: usize) -> u32 {
        (self.generation << 2) | ctx as u32
    }

    pub fn flush_jumps(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 1 << 29 {
            // The key has 30 bits of generation room: start over, truly empty.
            self.generation = 0;
            self.jump.iter_mut().for_each(|e| *e = EMPTY_JUMP);
        }
    }

    /// Drop every block.
    pub fn flush_all(&mut self) {
        self.by_paddr.clear();
        self.by_page.clear();
        self.reset_arena();
        self.flush_jumps();
    }

    /// The first `n` ops of a span.
    #[inline(always)]
    pub fn ops(&self, start: u32, n: usize) -> &[Op] {
        &self.ops[start as usize..start as usize + n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks whose pcs share a jump-cache set: the last two remembered
    /// are both found (a pair that alternates never misses); a third
    /// pushes out the oldest; a flush empties every way.
    #[test]
    fn a_jump_cache_set_keeps_the_two_newest_blocks() {
        let mut c = BlockCache::new();
        let pcs: Vec<u64> = {
            let first = 0x8020_1234u64;
            let set = BlockCache::jump_index(first);
            let mut same = (first..).step_by(2).filter(|&pc| BlockCache::jump_index(pc) == set);
            vec![same.next().unwrap(), same.next().unwrap(), same.next().unwrap()]
        };
        let blocks: Vec<u32> =
            (0..3).map(|k| c.insert(0x8000_0000 + 0x100 * k, 0x80000, &[Op::illegal(0, 4)]).unwrap()).collect();
        c.remember(pcs[0], 1, blocks[0]);
        c.remember(pcs[1], 1, blocks[1]);
        for _ in 0..3 {
            assert_eq!(c.lookup(pcs[0], 1).map(|s| s.2), Some(blocks[0]));
            assert_eq!(c.lookup(pcs[1], 1).map(|s| s.2), Some(blocks[1]));
        }
        assert_eq!(c.lookup(pcs[0], 0), None, "another fetch context");
        c.remember(pcs[2], 1, blocks[2]);
        assert_eq!(c.lookup(pcs[0], 1), None, "the oldest went");
        assert_eq!(c.lookup(pcs[1], 1).map(|s| s.2), Some(blocks[1]));
        assert_eq!(c.lookup(pcs[2], 1).map(|s| s.2), Some(blocks[2]));
        c.flush_jumps();
        assert!(pcs.iter().all(|&pc| c.lookup(pc, 1).is_none()));
    }
}
