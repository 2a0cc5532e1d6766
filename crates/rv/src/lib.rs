//! `rv`: one RISC-V RV64GC hart.
//!
//! Owns decode, execute, CSRs, privilege modes M/S/U, traps, the Sv39/Sv48
//! MMU with its software TLB, the decoded-block cache, and the exact
//! instruction counter (the [`Position`]). It talks to memory through the
//! [`Bus`] trait and must not know about devices, files or sockets.
//!
//! See `../../shared/DESIGN.md` (layers) and `ENGINE-NOTES.md` (why the
//! interpreter is shaped the way it is).

pub mod asm;
pub mod bitmap;
pub mod block;
pub mod bus;
pub mod csr;
pub mod decode;
pub mod fp;
pub mod hart;
pub mod mmu;
pub mod trap;

pub use bus::Bus;
pub use hart::{Exit, Hart, HartConfig, HartState, Position};
