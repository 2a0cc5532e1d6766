//! Failpoints: named places where a test can make this process die at an
//! exact moment that no outside signal could hit reliably (the
//! `LOCKSTEP_FAILPOINT` environment variable names one). Unset, a
//! failpoint costs one comparison.

use std::sync::OnceLock;

/// Die here as SIGKILL would (no cleanup, no last words) if the
/// environment names this failpoint.
pub fn kill_if(name: &str) {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    if ARMED.get_or_init(|| std::env::var("LOCKSTEP_FAILPOINT").ok()).as_deref() == Some(name) {
        tracing::warn!("failpoint {name}: killing this process");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
