//! The hart: its state, its public API, and where the rest of it lives.
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
//!
//! # Where things live
//!
//! [`Core`] is everything the executor touches; [`Hart`] is a core plus its
//! decoded-block cache. Their behaviour is split into `impl` blocks by topic:
//!
//! | File | What |
//! |---|---|
//! | `hart.rs` (here) | the types, `Core::new`, the public API of [`Hart`] |
//! | `csr/file.rs` | the CSR file: reads, writes, Zicsr, counters, time, `mip`, Sstc |
//! | `mem.rs` | loads, stores, AMO addresses, translation and TLB fill, dirty and code pages |
//! | `exec/block.rs` | the block loop: one `match` over the ops, integer ops inline |
//! | `exec/int.rs` | RV64I/M semantics that take more than an expression |
//! | `exec/amo.rs`, `exec/fp.rs` | the A and F/D extensions |
//! | `exec/system.rs` | traps, interrupts, xRET, WFI, fences |
//! | `run.rs` | `Hart::run`, block fetch and decode, cache flushes |

use crate::block::BlockCache;
use crate::csr::*;
use crate::decode::{Kind, Op};
use crate::mmu::{Tlb, CTX_BARE, PAGE_SIZE};

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
    /// Interpreter only, or hot blocks translated to host code. Either
    /// gives the same state at every position.
    pub engine: Engine,
}

/// The translation tier's counters, for benches and notes; not guest state.
#[derive(Clone, Copy, Debug, Default)]
pub struct JitStats {
    pub blocks: u64,
    pub ops: u64,
    /// Ops translated as calls to the interpreter.
    pub fallback_ops: u64,
    pub code_bytes: u64,
    pub translate_ns: u64,
    /// Times the region filled and every translation was dropped.
    pub region_resets: u64,
    /// Positions retired inside translated code.
    pub positions: u64,
    /// Times the dispatcher entered translated code (each entry runs on
    /// through the translations it chains into).
    pub entries: u64,
    /// Positions the interpreter retired while the tier was on (cold
    /// blocks, and blocks cut short by a stop); idle steps count in
    /// neither.
    pub interp_positions: u64,
}

/// How a hart executes: the interpreter alone, or with the translation
/// tier for hot blocks (x86-64 hosts only; elsewhere it means the
/// interpreter). Both are exact and interchangeable: a recording made with
/// one replays with the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Interp,
    Jit,
}

impl Engine {
    /// The engine to use when nobody chose: the translation tier where it
    /// exists.
    pub const fn host_default() -> Engine {
        if cfg!(target_arch = "x86_64") {
            Engine::Jit
        } else {
            Engine::Interp
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Engine::Interp => "interp",
            Engine::Jit => "jit",
        }
    }
}

impl std::str::FromStr for Engine {
    type Err = String;
    fn from_str(s: &str) -> Result<Engine, String> {
        match s {
            "interp" => Ok(Engine::Interp),
            "jit" => Ok(Engine::Jit),
            _ => Err(format!("unknown engine {s:?} (expected interp or jit)")),
        }
    }
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
    /// (`mcause`, `mepc`, `mtval`) are set; resume with `Hart::mret_to`.
    MachineTrap,
}

/// Cache maintenance an instruction requested (the cache lives beside the
/// core, so the executor cannot reach it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flush {
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
    pub(crate) mip_ext: u64,
    pub(crate) position: u64,
    pub(crate) exceptions: u64,
    pub(crate) idle: u64,
    /// Offsets so that M-mode writes to mcycle/minstret stick.
    pub(crate) cycle_offset: u64,
    pub(crate) instret_offset: u64,
    /// Values frozen by mcountinhibit.
    pub(crate) cycle_frozen: Option<u64>,
    pub(crate) instret_frozen: Option<u64>,
    /// Physical address of the LR reservation, or `u64::MAX`.
    pub(crate) reservation: u64,
    pub(crate) data_ctx: usize,
    pub(crate) fetch_ctx: usize,
    /// Position at which Sstc's STIP next becomes pending.
    pub(crate) stimer_pos: u64,
    /// An instruction changed state that interrupt delivery depends on
    /// (CSRs, privilege): the run loop must check before the next block.
    pub(crate) attention: bool,
    pub(crate) tlb: Tlb,
    pub(crate) flush: Flush,
    pub(crate) cfg: HartConfig,
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
    pub(crate) core: Core,
    pub(crate) cache: BlockCache,
    /// The translation tier, when it is on.
    #[cfg(target_arch = "x86_64")]
    pub(crate) jit: Option<Box<crate::jit::Jit>>,
}

/// Integer register `$r` of core `$c`, as a place: `x!(self, op.rd) = v`.
/// Indices 32..63 are the sink for writes to x0 (`decode::X_SINK`); the
/// mask lets the compiler drop the bounds check.
macro_rules! x {
    ($c:ident, $r:expr) => {
        $c.x[($r as usize) & 63]
    };
}
pub(crate) use x;

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
}

impl Hart {
    /// A hart in M-mode at `pc = 0` with everything zero, as after reset.
    pub fn new(cfg: HartConfig) -> Hart {
        assert!(cfg.insns_per_tick > 0, "insns_per_tick must be positive");
        let mut h = Hart {
            core: Core::new(cfg),
            cache: BlockCache::new(),
            #[cfg(target_arch = "x86_64")]
            jit: None,
        };
        h.set_engine(cfg.engine);
        h
    }

    /// Switch engines at any point between two `run`s (the state is the
    /// same with either; translations are only a cache). Asking for `Jit`
    /// where it does not exist leaves the interpreter (see `engine`).
    pub fn set_engine(&mut self, engine: Engine) {
        #[cfg(target_arch = "x86_64")]
        match engine {
            Engine::Interp => self.jit = None,
            Engine::Jit if self.jit.is_none() => self.jit = crate::jit::Jit::new().map(Box::new),
            Engine::Jit => {}
        }
        let _ = engine;
    }

    /// The engine actually running: `Interp` if the translation tier was
    /// asked for but the host has none (not x86-64, or no executable
    /// memory).
    pub fn engine(&self) -> Engine {
        #[cfg(target_arch = "x86_64")]
        if self.jit.is_some() {
            return Engine::Jit;
        }
        Engine::Interp
    }

    /// Translate a block after `runs` dispatcher runs of it instead of the
    /// default (tests translate everything at once with 1). No effect on
    /// the interpreter.
    pub fn set_jit_hot_runs(&mut self, runs: u16) {
        #[cfg(target_arch = "x86_64")]
        if let Some(jit) = &mut self.jit {
            jit.hot_runs = runs.max(1);
        }
        let _ = runs;
    }

    /// The translation tier's counters, when it is on.
    pub fn jit_stats(&self) -> Option<JitStats> {
        #[cfg(target_arch = "x86_64")]
        if let Some(jit) = &self.jit {
            return Some(jit.stats);
        }
        None
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
        c.restore_stimer();
        self.core.tlb.flush_paged();
        self.flush_all_blocks();
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
}
