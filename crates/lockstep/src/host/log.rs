//! lockstep's own lines on stderr, kept apart from the guest's console on
//! stdout. Diagnostics are `tracing` events (levels, `RUST_LOG`, default
//! `info`), printed as `lockstep: …`, `lockstep: warning: …`,
//! `lockstep: error: …`; result lines that scripts read (`position N`,
//! `state-hash H`, `hash P H`, `snapshot …`) are [`report`]ed as they are.
//! While the terminal is raw (a guest console), every line ends in `\r\n`.

use std::fmt;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The end of a line on stderr now.
pub fn line_end() -> &'static str {
    if crate::host::console::terminal_is_raw() {
        "\r\n"
    } else {
        "\n"
    }
}

/// A result line (not a diagnostic): printed whatever `RUST_LOG` says,
/// after the guest's output so far.
pub fn report(line: &str) {
    crate::host::output::flush();
    eprint!("{line}{}", line_end());
}

/// The one line a failed command ends with.
pub fn error_line(msg: &str) {
    crate::host::output::flush();
    eprint!("lockstep: error: {msg}{}", line_end());
}

/// `lockstep: …` lines, with the UTC time of day in front when asked for
/// (`times`: `LOCKSTEP_LOG_TIMES` set), to line up two sides' logs.
struct Lines {
    times: bool,
}

impl<S, N> FormatEvent<S, N> for Lines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let level = match *event.metadata().level() {
            Level::ERROR => "error: ",
            Level::WARN => "warning: ",
            Level::INFO => "",
            Level::DEBUG => "debug: ",
            Level::TRACE => "trace: ",
        };
        if self.times {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let (secs, ms) = (now.as_secs() % 86_400, now.subsec_millis());
            write!(w, "{:02}:{:02}:{:02}.{ms:03} ", secs / 3600, secs / 60 % 60, secs % 60)?;
        }
        write!(w, "lockstep: {level}")?;
        ctx.field_format().format_fields(w.by_ref(), event)?;
        write!(w, "{}", line_end())
    }
}

/// Install the stderr subscriber (once, at the start of `main`).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| {
            // Ahead of the guest's console output still queued: a
            // diagnostic must not wait for stdout.
            std::io::stderr()
        })
        .event_format(Lines { times: std::env::var_os("LOCKSTEP_LOG_TIMES").is_some() })
        .try_init();
}
