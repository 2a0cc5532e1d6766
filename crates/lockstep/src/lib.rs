//! `lockstep` as a library: the rooms of the command-line tool.
//!
//! | room | what lives there |
//! |---|---|
//! | [`cli`] | the commands and their flags; which room does the work |
//! | [`vm`] | one machine: its description (`vm.toml` and flags), building it, running it live, recording it |
//! | [`replayer`] | advancing a machine through logged records: a recording's `replay`, a secondary's replay |
//! | [`pair`] | the fault-tolerant pair's two sides: primary, secondary (go-live), address announcement |
//! | [`host`] | what touches the host: the terminal console and taps, entropy, the status endpoint, logging |
//! | [`guest`] | the default guest image builder (apt, cpio, root disk; its scripts in `guest/files/`) |
//! | [`bench`] | `lockstep bench`: figures, side by side |
//! | [`demo`] | the main job: a protected pair under a client, and a kill |
//!
//! What only tests, benchmarks and the demo need (namespaces, the pair
//! harness, the numbered-write client) is the `lab` crate.

#![forbid(unsafe_code)]

pub mod bench;
pub mod cli;
pub mod demo;
pub mod guest;
pub mod host;
pub mod pair;
pub mod replayer;
pub mod vm;

/// What a finished run means for the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    GuestFailure,
}
