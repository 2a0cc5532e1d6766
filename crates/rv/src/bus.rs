//! The hart's view of the physical address space.

/// Physical memory as seen by a hart: one contiguous RAM region that the
/// hart accesses directly (through its TLB), and everything else, which is
/// memory-mapped I/O routed by the board.
///
/// Contract: `ram()` returns the same region, of the same length, for the
/// whole life of the hart; RAM starts at the physical address given to the
/// hart in its [`crate::HartConfig`].
pub trait Bus {
    /// Guest RAM.
    fn ram(&mut self) -> &mut [u8];

    /// Load `size` (1, 2, 4 or 8) bytes from a non-RAM physical address at
    /// instruction position `pos`. `None` means no device answers there:
    /// the hart raises an access fault.
    fn mmio_load(&mut self, paddr: u64, size: u32, pos: u64) -> Option<u64>;

    /// Store to a non-RAM physical address. `false` means no device answers
    /// there. The hart ends its block after every MMIO store, so the board
    /// can act on it (timer compare, power-off) before the next instruction.
    fn mmio_store(&mut self, paddr: u64, size: u32, val: u64, pos: u64) -> bool;
}
