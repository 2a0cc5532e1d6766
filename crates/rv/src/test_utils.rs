//! Fixtures for the unit tests: a hart over RAM-only or RAM-plus-device
//! buses, and small program builders.

use crate::asm::*;
use crate::bus::Bus;
use crate::{Engine, Hart, HartConfig, Position};

pub(crate) const BASE: u64 = 0x8000_0000;

/// RAM only; no devices.
pub(crate) struct TestBus(pub(crate) Vec<u8>);

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

/// The engine the unit tests' harts run: the interpreter, or with
/// `RV_TEST_ENGINE=jit` the translation tier with every block translated
/// at its first run (the test command runs the suite both ways).
pub(crate) fn test_engine() -> Engine {
    match std::env::var("RV_TEST_ENGINE").as_deref() {
        Ok("jit") => Engine::Jit,
        _ => Engine::Interp,
    }
}

/// A hart with `words` at the start of 64 KiB of RAM; traps go to a
/// `j .` at BASE + 0x8000.
pub(crate) fn setup(words: &[u32]) -> (Hart, TestBus) {
    setup_engine(words, test_engine())
}

/// `setup` with a chosen engine (a translation tier translates every block
/// at its first run).
pub(crate) fn setup_engine(words: &[u32], engine: Engine) -> (Hart, TestBus) {
    let mut bus = TestBus(vec![0; 64 << 10]);
    bus.0[..words.len() * 4].copy_from_slice(&to_bytes(words));
    bus.0[0x8000..0x8004].copy_from_slice(&jal(ZERO, 0).to_le_bytes());
    let cfg =
        HartConfig { hartid: 0, ram_base: BASE, ram_size: 64 << 10, insns_per_tick: 10, m_mode_exits: false, engine };
    let mut h = Hart::new(cfg);
    h.set_jit_hot_runs(1);
    h.set_pc(BASE);
    h.core.csr.mtvec = BASE + 0x8000;
    h.core.csr.mstatus |= 1 << 13; // FS = Initial
    (h, bus)
}

/// Run `words` to their end (the first instruction past them).
pub(crate) fn run(words: &[u32]) -> Hart {
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

pub(crate) fn with_regs(regs: &[(u32, u64)], body: &[u32]) -> Vec<u32> {
    let mut w = Vec::new();
    for &(r, v) in regs {
        w.extend(li64(r, v));
    }
    w.extend_from_slice(body);
    w
}

/// RAM plus one device at `DEV`: loads read `0x80 + offset` repeated
/// in every byte, stores are recorded.
pub(crate) struct DevBus {
    pub(crate) ram: Vec<u8>,
    pub(crate) stores: Vec<(u64, u32, u64, u64)>,
}

pub(crate) const DEV: u64 = 0x1000_0000;

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

pub(crate) fn setup_dev(words: &[u32]) -> (Hart, DevBus) {
    let (h, bus) = setup(words);
    (h, DevBus { ram: bus.0, stores: Vec::new() })
}
