//! The physical memory map, modelled on QEMU's `virt` board
//! (`hw/riscv/virt.c`, `virt_memmap`). The device tree (`fdt.rs`) and the
//! bus decode (`lib.rs`) both read these constants, so they cannot disagree.
//!
//! ```text
//!  0x0200_0000 ┌──────────────────────┐ CLINT: msip, mtimecmp, mtime
//!  0x0201_0000 ├──────────────────────┤
//!  0x0c00_0000 ├──────────────────────┤ PLIC (contexts: hart 0 M, hart 0 S)
//!  0x0c60_0000 ├──────────────────────┤
//!  0x1000_0000 ├──────────────────────┤ UART0, 16550A, PLIC source 10
//!  0x1000_0100 ├──────────────────────┤
//!  0x1000_1000 ├──────────────────────┤ virtio-mmio slots 0..7, 4 KiB each,
//!  0x1000_9000 ├──────────────────────┤   PLIC sources 1..8
//!  0x8000_0000 ├──────────────────────┤ RAM (size from --mem)
//!              │ kernel at +text_offset (2 MiB)   │
//!              │ ... initrd, then DTB at the top  │
//!              └──────────────────────┘
//! ```

pub const CLINT_BASE: u64 = 0x0200_0000;
pub const CLINT_SIZE: u64 = 0x1_0000;
pub const PLIC_BASE: u64 = 0x0c00_0000;
pub const PLIC_SIZE: u64 = 0x60_0000;
pub const UART0_BASE: u64 = 0x1000_0000;
pub const UART0_SIZE: u64 = 0x100;
pub const UART0_IRQ: usize = 10;
/// virtio-mmio slots, as on QEMU virt: slot i at VIRTIO_BASE + i *
/// VIRTIO_SIZE, PLIC source VIRTIO_IRQ + i.
pub const VIRTIO_BASE: u64 = 0x1000_1000;
pub const VIRTIO_SIZE: u64 = 0x1000;
pub const VIRTIO_SLOTS: usize = 8;
pub const VIRTIO_IRQ: usize = 1;
pub const RAM_BASE: u64 = 0x8000_0000;

/// The CLINT timebase: 10 MHz, as on QEMU `virt`.
pub const TIMEBASE_HZ: u64 = 10_000_000;
/// Guest instructions per timer tick: guest time advances 1 ns per
/// instruction, the rate QEMU's `-icount shift=0` uses.
pub const INSNS_PER_TICK: u64 = 100;
/// Guest nanoseconds per instruction, from the two constants above.
pub const NS_PER_INSN: u64 = 1_000_000_000 / TIMEBASE_HZ / INSNS_PER_TICK;

/// Room reserved at the top of RAM for the device tree.
pub const FDT_MAX_SIZE: u64 = 0x1_0000;
