//! Instruction semantics, as `impl Core` blocks, one file per extension.
//!
//! | File | What |
//! |---|---|
//! | `block.rs` | the block loop: one `match` over a block's ops; RV64I/M, branches, loads and stores inline |
//! | `int.rs` | RV64I/M helpers the block loop inlines (M's special cases) and the integer tests |
//! | `amo.rs` | A: LR/SC and AMOs (out of line) |
//! | `fp.rs` | F/D: `exec_fp` and the FP register helpers (out of line) |
//! | `system.rs` | trap entry, interrupts, ECALL/EBREAK, xRET, WFI, fences |
//!
//! Zicsr is `csr_op` in `crate::csr`; memory access is `crate::mem`.

mod amo;
mod block;
mod fp;
mod int;
mod system;

pub(crate) use block::End;
