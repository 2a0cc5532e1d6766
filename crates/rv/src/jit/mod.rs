//! The translation tier: hot decoded blocks become x86-64 host code.
//!
//! A block the dispatcher has run [`HOT_RUNS`] times is translated from the
//! same [`Op`]s the interpreter runs (`emit.rs`), into one executable region
//! (`region.rs`). The translation is exact by construction:
//!
//! * It is entered only when the whole block fits in the budget (the
//!   distance to the stop position); otherwise the interpreter runs it, op
//!   by op, and stops mid-block exactly as before.
//! * The integer ops (M's divisions included), branches, jumps, the TLB
//!   hit of loads and stores (F/D too), and double-precision arithmetic,
//!   compares and moves under RNE, and `fflags` accesses are host code.
//!   Every other op (a TLB miss, MMIO, A, the rest of F/D, other CSRs,
//!   system) calls [`fallback`], which
//!   runs that one op through the interpreter's own block loop and says
//!   whether the host code may go on: the same semantics, the same exits.
//! * Every exit leaves `pc` and `position` as the interpreter would, so the
//!   dispatcher's checks (stop position, interrupts, devices, flushes) run
//!   at the same positions with either engine.
//!
//! Translations are indexed by block number in the decoded-block cache and
//! dropped with it: a dropped page's blocks are never looked up again, and a
//! full flush (which renumbers blocks) clears every translation.

mod emit;
mod region;
#[cfg(test)]
mod tests;

use crate::block::{BlockCache, JumpEntry};
use crate::bus::Bus;
use crate::decode::Op;
use crate::exec::End;
use crate::hart::{Core, Flush, JitStats};
use crate::trap::Trap;
use region::CodeRegion;
use std::time::Instant;

/// Dispatcher runs of a block before it is translated.
pub const HOT_RUNS: u16 = 16;
/// Size of the executable region; when it fills, every translation drops.
const REGION_BYTES: usize = 64 << 20;

/// What translated code returns (the `End` of the interpreter, as a number).
pub(crate) const GO_ON: u64 = 0;
pub(crate) const EXIT_CONTINUE: u64 = 1;
pub(crate) const EXIT_DEVICE: u64 = 2;
pub(crate) const EXIT_WFI: u64 = 3;
pub(crate) const EXIT_TRAP: u64 = 4;

/// What the translated code and its helpers share during one call: the
/// helpers get a pointer to it in their first argument.
#[repr(C)]
pub(crate) struct Frame {
    core: *mut Core,
    /// The `B: Bus` of the `enter::<B>` call, type-erased.
    bus: *mut u8,
    /// For going from one translation straight into the next (`emit`'s
    /// chain): the jump cache, the key its entries must have for the
    /// current fetch context, the translations by block number, and the
    /// address a translation's offset plus one is turned into to reach its
    /// body (past the prologue).
    jump: *const JumpEntry,
    key: u64,
    code: *const u32,
    code_len: u64,
    body_base: u64,
    /// Where every translation's exits jump: the shared chain
    /// (`emit::chain`), kept at the region's start.
    chain: u64,
    trap: Option<Trap>,
    /// F/D arithmetic in host code (`emit`): the MXCSR it loads before an
    /// op (round to nearest even, every exception masked, no flags: the
    /// process's default control bits, which the ABI has callers keep),
    /// and where it stores MXCSR after the op to read the op's flags.
    mxcsr: [u32; 2],
}

/// MXCSR for an FP op in host code: see `Frame::mxcsr`.
const MXCSR_RNE: u32 = 0x1f80;

pub(crate) struct Jit {
    region: CodeRegion,
    /// Bytes before a translation's body (the same for all).
    prologue: usize,
    /// Per block number: offset of its code in the region plus one, or 0.
    code: Vec<u32>,
    /// Per block number: dispatcher runs so far (saturating at `u16::MAX`).
    heat: Vec<u16>,
    /// Runs that make a block hot (`HOT_RUNS` unless a test lowers it).
    pub(crate) hot_runs: u16,
    /// The ops each translation's fallback calls point into; boxed so they
    /// never move while the code holding their addresses lives.
    op_copies: Vec<Box<[Op]>>,
    /// Address of the `fallback::<B>` the current translations call: code
    /// made for one bus type is dropped before it could run with another.
    bus_key: usize,
    pub(crate) stats: JitStats,
}

impl Jit {
    /// `None` when the host refuses executable memory.
    pub(crate) fn new() -> Option<Jit> {
        #[cfg(test)]
        if tests::REFUSE_REGION.get() {
            return None;
        }
        #[cfg(not(test))]
        let len = REGION_BYTES;
        #[cfg(test)]
        let len = match tests::REGION_BYTES_FOR_TESTS.get() {
            0 => REGION_BYTES,
            n => n,
        };
        Some(Jit {
            region: CodeRegion::new(len, &emit::chain())?,
            prologue: emit::prologue_len(),
            code: Vec::new(),
            heat: Vec::new(),
            hot_runs: HOT_RUNS,
            op_copies: Vec::new(),
            bus_key: 0,
            stats: JitStats::default(),
        })
    }

    /// Drop every translation (the block cache renumbers its blocks).
    pub(crate) fn clear(&mut self) {
        self.code.clear();
        self.heat.clear();
        self.op_copies.clear();
        self.region.reset();
    }

    /// The translation of block `block` (ops `ops`), translating it now if
    /// it just became hot. Returns the code's address.
    #[inline(always)]
    pub(crate) fn code_for<B: Bus>(&mut self, block: u32, ops: &[Op]) -> Option<usize> {
        let i = block as usize;
        if let Some(&c) = self.code.get(i) {
            if c != 0 {
                return Some(self.region.addr(c - 1));
            }
        }
        self.warm::<B>(i, ops)
    }

    /// Grow the per-block tables to hold block number `i`.
    fn make_room(&mut self, i: usize) {
        if self.heat.len() <= i {
            self.heat.resize(i + 1, 0);
            self.code.resize(i + 1, 0);
        }
    }

    #[inline(never)]
    fn warm<B: Bus>(&mut self, i: usize, ops: &[Op]) -> Option<usize> {
        if i == crate::block::SCRATCH_BLOCK as usize {
            return None;
        }
        self.make_room(i);
        self.heat[i] = self.heat[i].saturating_add(1);
        if self.heat[i] < self.hot_runs {
            return None;
        }
        let key = fallback::<B> as *const () as usize;
        if key != self.bus_key {
            self.clear();
            self.bus_key = key;
            self.make_room(i);
        }
        let t0 = Instant::now();
        let copy: Box<[Op]> = ops.into();
        let (bytes, fallbacks) = emit::translate(&copy, fallback::<B> as *const () as usize);
        let off = match self.region.push(&bytes) {
            Some(off) => off,
            None => {
                self.stats.region_resets += 1;
                self.clear();
                self.make_room(i);
                self.region.push(&bytes)?
            }
        };
        self.op_copies.push(copy);
        self.code[i] = off + 1;
        self.stats.blocks += 1;
        self.stats.ops += ops.len() as u64;
        self.stats.fallback_ops += fallbacks as u64;
        self.stats.code_bytes += bytes.len() as u64;
        self.stats.translate_ns += t0.elapsed().as_nanos() as u64;
        Some(self.region.addr(off))
    }
}

/// The signature of translated code: frame, RAM, budget.
type Entry = unsafe extern "sysv64" fn(*mut Frame, *mut u8, u64) -> u64;

/// Run the translation at `code` of the block at `core.pc` (and the
/// translations it chains into). The caller guarantees `budget >=` the
/// block's op count, and that `code` is a live translation of `jit`, made
/// for this bus type.
#[inline(always)]
pub(crate) fn enter<B: Bus>(
    core: &mut Core,
    cache: &BlockCache,
    jit: &Jit,
    bus: &mut B,
    code: usize,
    budget: usize,
) -> End {
    let ram = bus.ram().as_mut_ptr();
    let mut frame = Frame {
        key: cache.key(core.fetch_ctx) as u64,
        core: core as *mut Core,
        bus: bus as *mut B as *mut u8,
        jump: cache.jump_table(),
        code: jit.code.as_ptr(),
        code_len: jit.code.len() as u64,
        body_base: (jit.region.addr(0) + jit.prologue) as u64 - 1,
        chain: jit.region.addr(0) as u64,
        trap: None,
        mxcsr: [MXCSR_RNE, 0],
    };
    // SAFETY: `code` is the start of a translation in the live region,
    // made by `emit::translate` with this bus type's `fallback`, so it
    // follows `Entry`'s ABI. It touches only the core and the bus through
    // the frame's pointers (valid and unaliased for the call: `core` and
    // `bus` are not used until it returns), RAM within the TLB's offsets,
    // which are inside `bus.ram()`, and reads the jump cache and the
    // translation table, which nothing changes during the call.
    let exit = unsafe {
        let f: Entry = std::mem::transmute::<usize, Entry>(code);
        f(&mut frame, ram, budget as u64)
    };
    match exit {
        EXIT_CONTINUE => End::Continue,
        EXIT_DEVICE => End::Device,
        EXIT_WFI => End::Wfi,
        _ => End::Trap(frame.trap.take().expect("a translation's trap exit carries a trap")),
    }
}

/// Run one op through the interpreter for translated code: `op` is at
/// position `pos`, in the block whose first op is at `base`. Returns
/// `GO_ON` when the op fell through with nothing for the dispatcher to do
/// (the code goes on; `pc` and `position` are left as the code had them),
/// otherwise the exit, with `pc` and `position` set as the interpreter set
/// them and a trap in the frame.
pub(crate) extern "sysv64" fn fallback<B: Bus>(frame: *mut Frame, op: *const Op, base: u64, pos: u64) -> u64 {
    // SAFETY: translated code passes the frame `enter` made for
    // this call, whose pointers are valid and not otherwise in use, and a
    // pointer into one of `Jit::op_copies`, which outlive the code.
    let (frame, op) = unsafe { (&mut *frame, std::slice::from_ref(&*op)) };
    // SAFETY: as above; the bus pointer was made from a `&mut B`.
    let (core, bus) = unsafe { (&mut *frame.core, &mut *(frame.bus as *mut B)) };
    let start = core.position;
    let fetch_ctx = core.fetch_ctx;
    core.pc = base;
    core.position = pos;
    let next = base.wrapping_add(op[0].off as u64 + op[0].len as u64);
    match core.exec_block(bus, op, 1) {
        End::Continue => {
            // Going on in host code needs everything it assumes unchanged
            // (the chain's jump-cache key comes from the fetch context).
            if core.pc == next && !core.attention && core.flush == Flush::None && core.fetch_ctx == fetch_ctx {
                core.position = start;
                core.pc = base;
                GO_ON
            } else {
                EXIT_CONTINUE
            }
        }
        End::Device => EXIT_DEVICE,
        End::Wfi => EXIT_WFI,
        End::Trap(t) => {
            frame.trap = Some(t);
            EXIT_TRAP
        }
    }
}
