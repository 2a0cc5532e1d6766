//! `rv`: one RISC-V RV64GC hart.
//!
//! Owns decode, execute, CSRs, privilege modes M/S/U, traps, the Sv39/Sv48
//! MMU with its software TLB, the decoded-block cache, and the exact
//! instruction counter (the [`Position`]). It talks to memory through the
//! [`Bus`] trait and must not know about devices, files or sockets.
//!
//! Where things live:
//!
//! | Module | What |
//! |---|---|
//! | [`hart`] | [`Hart`], its state ([`HartState`], [`Position`]) and public API |
//! | [`csr`] | CSR numbers and fields; the CSR file's semantics (`csr/file.rs`) |
//! | `mem` | loads, stores, translation glue, TLB fill, dirty and code pages |
//! | `exec` | instruction semantics: the block loop, integer, A, F/D, system |
//! | `run` | [`Hart::run`]: the dispatcher, block fetch and decode |
//! | `jit` | the translation tier: hot blocks to x86-64 code (x86-64 hosts) |
//! | [`decode`] | instruction words to [`decode::Op`]s |
//! | [`block`] | the decoded-block cache |
//! | [`mmu`] | Sv39/Sv48 page walks and the TLB |
//! | [`trap`] | exception causes as data |
//! | [`fp`] | IEEE 754 arithmetic for F/D, done exactly in software |
//! | [`bitmap`] | the dirty-page bitmap |
//! | [`bus`] | the [`Bus`] trait: RAM and MMIO as the hart sees them |
//! | `asm` | a tiny assembler for tests and `machine::programs` (feature `test-utils`) |
//!
//! See `../../shared/DESIGN.md` (layers) and `ENGINE-NOTES.md` (why the
//! interpreter is shaped the way it is).

#[cfg(any(test, feature = "test-utils"))]
pub mod asm;
pub mod bitmap;
pub mod block;
pub mod bus;
pub mod csr;
pub mod decode;
mod exec;
pub mod fp;
pub mod hart;
#[cfg(target_arch = "x86_64")]
mod jit;
mod mem;
pub mod mmu;
mod run;
#[cfg(test)]
mod test_utils;
pub mod trap;

pub use bus::Bus;
pub use hart::{Engine, Exit, Hart, HartConfig, HartState, JitStats, Position};
