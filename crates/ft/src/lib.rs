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

pub mod arbiter;
pub mod gate;
pub mod link;
pub mod wire;

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Timing and limits of a pair.
#[derive(Clone, Copy, Debug)]
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
}

impl Default for PairConfig {
    fn default() -> PairConfig {
        PairConfig {
            heartbeat: Duration::from_millis(25),
            timeout: Duration::from_millis(250),
            max_lag: 100_000_000,
            connect_timeout: Duration::from_secs(60),
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
}

impl Status {
    /// Prometheus text exposition of these figures.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let role = if self.role.is_empty() { "unknown" } else { &self.role };
        let state = self.state.map_or("unknown".to_string(), |s| format!("{s:?}").to_lowercase());
        let mut metric = |name: &str, help: &str, value: String| {
            out.push_str(&format!(
                "# HELP lockstep_{name} {help}\n# TYPE lockstep_{name} gauge\nlockstep_{name}{{role=\"{role}\"}} {value}\n"
            ));
        };
        metric("protected", "1 if the VM has a working secondary", (self.protected as u8).to_string());
        metric("epoch", "arbiter epoch this side runs at", self.epoch.to_string());
        metric("position", "executed position", self.position.to_string());
        metric("peer_position", "peer position (see lockstep status)", self.peer_position.to_string());
        metric("lag_positions", "secondary execution lag in positions", self.lag_positions.to_string());
        metric("lag_seconds", "secondary execution lag in seconds", format!("{}", self.lag_ms / 1e3));
        metric("log_bytes", "log bytes sent or received", self.log_bytes.to_string());
        metric("log_bytes_per_second", "log rate", format!("{:.0}", self.log_bytes_per_sec));
        metric("frames_held", "frames waiting in the output gate", self.frames_held.to_string());
        metric("frames_released", "frames released by the output gate", self.frames_released.to_string());
        metric("hold_seconds_mean", "mean output hold time", format!("{}", self.hold_us_mean / 1e6));
        metric("hold_seconds_max", "largest output hold time", format!("{}", self.hold_us_max as f64 / 1e6));
        metric(
            "missed_heartbeats",
            "heartbeat intervals without word from the peer",
            self.missed_heartbeats.to_string(),
        );
        metric(
            "throttled_seconds",
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
}
