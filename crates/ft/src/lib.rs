//! `ft`: the fault-tolerant pair.
//!
//! The primary runs the guest and streams its event log (crate `replay`)
//! to the secondary over one TCP connection ([`wire`]); the secondary acks
//! what it has received and replays it. Output waits in the [`gate`] until
//! the ack covers the position where it was produced. Each side watches the
//! other's heartbeats; on silence it may go on (primary alone, secondary
//! live) only after winning a compare-and-swap on the epoch in the
//! [`arbiter`]. [`link`] holds the two ends of the log channel and that
//! policy; the run loops that drive the machine live with the CLI.
//!
//! What happens to the pair (paired, peer lost, arbitration won or lost, a
//! connection refused) is reported as `tracing` events where it happens;
//! the binary installs the subscriber. The last of them is also kept in
//! [`Status::note`].

pub mod arbiter;
pub mod auth;
pub mod datagram;
pub mod gate;
mod greet;
pub mod health;
pub mod link;
pub mod liveness;
pub mod urgent;
pub mod wire;

pub use liveness::DiskWatch;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A thread with a name (in `top -H`, `perf` and panics), for the pair's
/// long-lived threads.
pub(crate) fn spawn_named(name: &str, f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new().name(name.into()).spawn(f).expect("cannot start a thread");
}

/// An error and its sources, `a: b: c`, as anyhow's `{:#}` prints it: for
/// the texts that quote an error (events, a lost peer's reason), since an
/// error's own message leaves its source out.
pub(crate) struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

/// Timing and limits of a pair, and this side's watch on its disk.
#[derive(Clone, Debug)]
pub struct PairConfig {
    /// How often each side speaks when it has nothing else to say.
    pub heartbeat: Duration,
    /// Silence after which the peer counts as lost.
    pub timeout: Duration,
    /// The primary waits when the secondary's executed position lags its
    /// own by more than this many positions (bounds failover time).
    pub max_lag: u64,
    /// How long the primary tries to reach the secondary at start.
    pub connect_timeout: Duration,
    /// Fault injection (tests only; zero otherwise): the secondary
    /// acknowledges each mark this long after it arrived, as over a slow
    /// return path, so the primary holds its output that much longer.
    pub ack_delay: Duration,
    /// Where this side's disk says an operation is under way (see
    /// [`DiskWatch`]): the same watch for every link of the side.
    pub disk: DiskWatch,
}

impl PairConfig {
    /// How long a run loop may stand still before its side counts as
    /// stuck: a primary whose run loop completed no slice for this long
    /// sends no more heartbeats (and does not claim the epoch), and a
    /// secondary that holds log it does not execute for this long is given
    /// up. Longer than the silence timeout: a run loop in a slow disk flush
    /// or starved by a busy host for a few hundred milliseconds is slow,
    /// not hung, and failing it over leaves the VM unprotected.
    pub fn stall_timeout(&self) -> Duration {
        self.timeout * 4
    }

    /// How long a run loop may stand inside one disk operation before its
    /// side counts as stuck (at least [`DISK_STALL`]): a flush on a busy
    /// host is slow, a disk that does not answer for this long is hung.
    pub fn disk_stall_timeout(&self) -> Duration {
        self.stall_timeout().max(DISK_STALL)
    }
}

/// The least time a disk operation has before its side counts as stuck:
/// Linux gives a SCSI command 30 s before it calls the disk hung.
pub const DISK_STALL: Duration = Duration::from_secs(30);

impl Default for PairConfig {
    fn default() -> PairConfig {
        PairConfig {
            heartbeat: Duration::from_millis(25),
            timeout: Duration::from_millis(250),
            max_lag: 100_000_000,
            connect_timeout: Duration::from_secs(60),
            ack_delay: Duration::ZERO,
            disk: DiskWatch::default(),
        }
    }
}

/// Where a side is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Waiting for the peer.
    Pairing,
    /// Paired: output waits for acks (primary) or the log is replayed
    /// (secondary).
    Protected,
    /// The peer is lost; asking the arbiter.
    Arbitrating,
    /// Running with no peer: the primary alone, or the secondary gone live.
    Alone,
    /// Lost arbitration, or the VM stopped.
    Stopped,
}

/// What `lockstep status` and `/metrics` show for one side.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub role: String,
    pub state: Option<State>,
    /// `state` is protected (kept apart for readers of the JSON and metrics).
    pub protected: bool,
    pub epoch: u64,
    /// This side's executed position.
    pub position: u64,
    /// Primary: the secondary's executed position. Secondary: the end of
    /// the log received (the primary's `Through`).
    pub peer_position: u64,
    /// How far the secondary's execution trails the primary's, in
    /// positions and in milliseconds of replay at the measured rate.
    pub lag_positions: u64,
    pub lag_ms: f64,
    /// Log bytes sent (primary) or received (secondary), and their rate.
    pub log_bytes: u64,
    pub log_bytes_per_sec: f64,
    pub frames_held: u64,
    pub frames_released: u64,
    pub hold_us_mean: f64,
    pub hold_us_max: u64,
    /// Heartbeat intervals that passed with nothing from the peer.
    pub missed_heartbeats: u64,
    /// Time the primary spent waiting for a lagging secondary.
    pub throttled_ms: u64,
    /// The last thing that happened to the pair, in words.
    pub note: String,
    /// The arbiter answered its last check (checked every few seconds
    /// while the pair runs: a pair whose arbiter is down cannot fail over).
    #[serde(default)]
    pub arbiter_up: bool,
    /// This side's external network (its tap and the uplinks it watches)
    /// is up; absent when the side watches none.
    #[serde(default)]
    pub uplink_up: Option<bool>,
    /// Primary: the secondary's, as it last said ([`wire::Message::Uplink`]).
    #[serde(default)]
    pub peer_uplink_up: Option<bool>,
    /// The last failure-policy decision, with its cause and when (empty:
    /// none yet).
    #[serde(default)]
    pub decision: String,
    /// Primary: a secondary joining, its state on the way.
    #[serde(default)]
    pub sync: Option<SyncProgress>,
}

/// How far the transfer of a running primary's state to a joining
/// secondary has come.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncProgress {
    /// The joining secondary's address.
    pub peer: String,
    /// `disk`, `memory`, `round N` (what changed meanwhile), `final round`.
    pub phase: String,
    /// Bytes looked at (the disk's zero blocks count, unsent) ...
    pub bytes_done: u64,
    /// ... of this many known so far (each round adds its own).
    pub bytes_total: u64,
    pub percent: f64,
    /// At the rate so far; absent until there is one.
    pub eta_s: Option<f64>,
}

impl SyncProgress {
    /// `memory 63% (310 of 492 MB, 2 s left) to HOST:PORT`.
    pub fn line(&self) -> String {
        let eta = self.eta_s.map(|s| format!(", {s:.0} s left")).unwrap_or_default();
        format!(
            "{} {:.0}% ({} of {} MB{eta}) to {}",
            self.phase,
            self.percent,
            self.bytes_done >> 20,
            self.bytes_total >> 20,
            self.peer
        )
    }
}

impl Status {
    /// Prometheus text exposition of these figures. Figures that only grow
    /// are counters named `..._total`; the rest are gauges; units are base
    /// units (seconds, bytes).
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let role = if self.role.is_empty() { "unknown" } else { &self.role };
        let state = self.state.map_or("unknown".to_string(), |s| format!("{s:?}").to_lowercase());
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            out.push_str(&format!(
                "# HELP lockstep_{name} {help}\n# TYPE lockstep_{name} {kind}\nlockstep_{name}{{role=\"{role}\"}} {value}\n"
            ));
        };
        let (gauge, counter) = ("gauge", "counter");
        metric("protected", gauge, "1 if the VM has a working secondary", (self.protected as u8).to_string());
        metric("arbiter_up", gauge, "1 if the arbiter answered its last check", (self.arbiter_up as u8).to_string());
        if let Some(up) = self.uplink_up {
            metric("uplink_up", gauge, "1 if this side's external network is up", (up as u8).to_string());
        }
        metric("epoch", gauge, "arbiter epoch this side runs at", self.epoch.to_string());
        metric("position", gauge, "executed position", self.position.to_string());
        metric("peer_position", gauge, "peer position (see lockstep status)", self.peer_position.to_string());
        metric("lag_positions", gauge, "secondary execution lag in positions", self.lag_positions.to_string());
        metric("lag_seconds", gauge, "secondary execution lag in seconds", format!("{}", self.lag_ms / 1e3));
        metric("log_bytes_total", counter, "log bytes sent or received", self.log_bytes.to_string());
        metric("log_bytes_per_second", gauge, "log rate", format!("{:.0}", self.log_bytes_per_sec));
        metric("frames_held", gauge, "frames waiting in the output gate", self.frames_held.to_string());
        metric(
            "frames_released_total",
            counter,
            "frames released by the output gate",
            self.frames_released.to_string(),
        );
        metric("hold_seconds_mean", gauge, "mean output hold time", format!("{}", self.hold_us_mean / 1e6));
        metric("hold_seconds_max", gauge, "largest output hold time", format!("{}", self.hold_us_max as f64 / 1e6));
        metric(
            "missed_heartbeats_total",
            counter,
            "heartbeat intervals without word from the peer",
            self.missed_heartbeats.to_string(),
        );
        metric(
            "throttled_seconds_total",
            counter,
            "time the primary waited for the secondary",
            format!("{}", self.throttled_ms as f64 / 1e3),
        );
        out.push_str(&format!("# HELP lockstep_state current state\n# TYPE lockstep_state gauge\nlockstep_state{{role=\"{role}\",state=\"{state}\"}} 1\n"));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_has_every_figure_once() {
        let s = Status {
            role: "primary".into(),
            state: Some(State::Protected),
            protected: true,
            epoch: 3,
            ..Status::default()
        };
        let text = s.prometheus();
        assert!(text.contains("lockstep_protected{role=\"primary\"} 1\n"));
        assert!(text.contains("lockstep_epoch{role=\"primary\"} 3\n"));
        assert!(text.contains("lockstep_state{role=\"primary\",state=\"protected\"} 1\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("lockstep_"), "{line}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    /// Prometheus conventions: a counter's name ends in `_total` and only a
    /// counter's does; every figure has one HELP and one TYPE.
    #[test]
    fn counters_end_in_total_and_gauges_do_not() {
        let text = Status::default().prometheus();
        let types: Vec<(&str, &str)> =
            text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).map(|l| l.split_once(' ').unwrap()).collect();
        for (name, kind) in &types {
            assert_eq!(name.ends_with("_total"), *kind == "counter", "{name} is a {kind}");
            assert_eq!(text.matches(&format!("# HELP {name} ")).count(), 1, "{name}");
        }
        for name in [
            "lockstep_log_bytes_total",
            "lockstep_frames_released_total",
            "lockstep_missed_heartbeats_total",
            "lockstep_throttled_seconds_total",
        ] {
            assert!(types.contains(&(name, "counter")), "{name}");
        }
        assert!(types.contains(&("lockstep_frames_held", "gauge")));
    }

    #[test]
    fn an_error_chain_prints_each_source_once() {
        let io = std::io::Error::other("disk on fire");
        let e = crate::link::PairError::Listen { addr: "127.0.0.1:1".into(), source: io };
        assert_eq!(ErrorChain(&e).to_string(), "cannot listen on 127.0.0.1:1: disk on fire");
    }
}
