//! Exceptions and interrupts as architectural data (Privileged ISA 3.1.15,
//! Table 3.6). A guest fault is never a Rust error: it is a [`Trap`] value
//! that the hart turns into a trap entry.

pub const FETCH_MISALIGNED: u64 = 0;
pub const FETCH_ACCESS_FAULT: u64 = 1;
pub const ILLEGAL_INSTRUCTION: u64 = 2;
pub const BREAKPOINT: u64 = 3;
pub const LOAD_MISALIGNED: u64 = 4;
pub const LOAD_ACCESS_FAULT: u64 = 5;
pub const STORE_MISALIGNED: u64 = 6;
pub const STORE_ACCESS_FAULT: u64 = 7;
pub const ECALL_FROM_U: u64 = 8;
pub const ECALL_FROM_S: u64 = 9;
pub const ECALL_FROM_M: u64 = 11;
pub const FETCH_PAGE_FAULT: u64 = 12;
pub const LOAD_PAGE_FAULT: u64 = 13;
pub const STORE_PAGE_FAULT: u64 = 15;

/// Bit 63 of `xcause` marks an interrupt.
pub const INTERRUPT_BIT: u64 = 1 << 63;

/// `tval` placeholder of an illegal-instruction trap raised at execution
/// time: "the raw bits of the instruction at pc", which trap entry re-reads.
pub(crate) const TVAL_INSN_BITS: u64 = u64::MAX;

/// A synchronous exception: its cause and the value for `xtval`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trap {
    pub cause: u64,
    pub tval: u64,
}

impl Trap {
    pub fn new(cause: u64, tval: u64) -> Trap {
        Trap { cause, tval }
    }
    pub fn illegal(raw: u32) -> Trap {
        Trap::new(ILLEGAL_INSTRUCTION, raw as u64)
    }
}
