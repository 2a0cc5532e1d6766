//! The physical memory map, modelled on QEMU's `virt` board
//! (`hw/riscv/virt.c`, `virt_memmap`). The device tree and the bus decode
//! both read these constants, so they cannot disagree.
//!
//! ```text
//!  0x0000_0000 ┌──────────────────────┐
//!              │ (unmapped)           │
//!  0x0200_0000 ├──────────────────────┤ CLINT: msip, mtimecmp, mtime
//!  0x0201_0000 ├──────────────────────┤
//!              │ (unmapped)           │
//!  0x8000_0000 ├──────────────────────┤ RAM (size from --mem)
//!              │                      │
//!              └──────────────────────┘
//! ```

pub const CLINT_BASE: u64 = 0x0200_0000;
pub const CLINT_SIZE: u64 = 0x1_0000;
pub const RAM_BASE: u64 = 0x8000_0000;

/// The CLINT timebase: 10 MHz, as on QEMU `virt`.
pub const TIMEBASE_HZ: u64 = 10_000_000;
/// Guest instructions per timer tick: guest time advances 1 ns per
/// instruction, the rate QEMU's `-icount shift=0` uses.
pub const INSNS_PER_TICK: u64 = 100;
