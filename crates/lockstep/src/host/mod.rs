//! What touches the host: the console on stdio and the taps, the host's
//! entropy, the status endpoint, and the log on stderr.

pub mod console;
pub mod entropy;
pub mod failpoint;
pub mod identity;
pub mod log;
pub mod output;
pub mod status;
