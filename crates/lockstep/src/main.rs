//! `lockstep`: the command-line tool. Parsing and exit codes only; the
//! commands live in the `lockstep` library (`cli`).
//!
//! Exit codes (the runner's contract in DESIGN.md): 0 the guest passed or
//! powered off; 1 a guest test failed; 2 usage error, instruction limit, or
//! host error.

#![forbid(unsafe_code)]

use clap::Parser;
use lockstep::cli::{self, Cli};
use lockstep::Outcome;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    lockstep::host::log::init();
    let result = cli::execute(cli);
    lockstep::host::output::flush();
    let dropped = lockstep::host::output::dropped();
    if dropped > 0 {
        tracing::warn!("{dropped} bytes of console output were dropped (stdout did not keep up)");
    }
    match result {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::GuestFailure) => ExitCode::from(1),
        Err(e) => {
            lockstep::host::log::error_line(&format!("{e:#}"));
            ExitCode::from(2)
        }
    }
}
