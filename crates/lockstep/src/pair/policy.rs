//! Failure policies: what a side does when its own host fails it, rather
//! than waiting for the peer to notice silence (everRun's model).
//!
//! - **A disk replica fails** (an I/O error, ENOSPC): the failed side stops
//!   before its guest sees anything of the failed request, and tells its
//!   peer why ([`ft::link::PrimaryLink::resign`],
//!   [`ft::link::SecondaryLink::resign`]). A primary's secondary goes on
//!   from the last mark; a secondary's primary goes on alone and
//!   re-protects at its `--peer`. A side running alone is the VM: the
//!   error reaches its guest. This is the only safe choice (a guest that
//!   saw an error its twin did not would diverge), so it is not a setting.
//! - **The external network fails** on the primary (its tap, or an uplink
//!   named with `--uplink`: administratively down or without carrier) for
//!   longer than the grace time while the secondary's is up: a planned
//!   switchover moves the VM to the host that can reach its clients
//!   (`on-uplink-down = "switchover"`, the default; `"ignore"` leaves it).
//! - **The log link fails** while both are healthy: the arbiter decides,
//!   as for any loss of the peer.
//!
//! Each decision is logged with its cause and kept for `status`
//! ([`Policy::decided`]).

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tap::LinkState;

/// What the primary does when its external network is down.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnUplinkDown {
    /// Switch over to the secondary if its network is up.
    #[default]
    Switchover,
    /// Nothing (the clients wait for the network to come back).
    Ignore,
}

/// How long the network must stay down before the policy acts, unless
/// told otherwise: long enough to ride out a flap of a link.
pub const DEFAULT_GRACE: Duration = Duration::from_millis(500);
/// How often the watcher reads the interfaces' flags.
const WATCH_EVERY: Duration = Duration::from_millis(50);
/// After a switchover the policy asked for failed, when it may ask again.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// A side's failure-policy settings.
#[derive(Debug, Clone, Default)]
pub struct PolicyOpts {
    pub on_uplink_down: OnUplinkDown,
    pub grace: Option<Duration>,
    /// Interfaces to watch besides the tap (a bridge's uplink).
    pub uplinks: Vec<String>,
}

/// Why the network counts as down: the first interface that is not up.
fn first_problem(names: &[String]) -> Option<String> {
    names.iter().find_map(|name| match tap::link_state(name) {
        Ok(LinkState::Up) => None,
        Ok(LinkState::AdminDown) => Some(format!("'{name}' is down")),
        Ok(LinkState::NoCarrier) => Some(format!("'{name}' has no carrier")),
        Ok(LinkState::Missing) => Some(format!("'{name}' does not exist")),
        Err(e) => Some(format!("'{name}' cannot be read: {e}")),
    })
}

/// Since when the network has been down, and why.
type Outage = Option<(Instant, String)>;

/// The side's policies, and a thread that watches its network.
pub struct Policy {
    opts: PolicyOpts,
    outage: Arc<Mutex<Outage>>,
    watched: bool,
    stop: Arc<AtomicBool>,
    /// The last decision, in words, with the time it was taken.
    decision: Arc<Mutex<String>>,
    /// The outage (its start) the policy last acted on, and when.
    acted: Mutex<Option<(Instant, Instant)>>,
}

impl Policy {
    /// Start watching `tap` (the VM's, if it has one) and the uplinks.
    pub fn start(opts: PolicyOpts, tap: Option<&str>) -> Policy {
        let names: Vec<String> = tap.map(str::to_string).into_iter().chain(opts.uplinks.iter().cloned()).collect();
        let outage: Arc<Mutex<Outage>> = Arc::default();
        let stop: Arc<AtomicBool> = Arc::default();
        let watched = !names.is_empty();
        if watched {
            let (outage, stop) = (outage.clone(), stop.clone());
            tracing::info!("watching the network: {}", names.join(", "));
            let spawned = std::thread::Builder::new().name("link-watch".into()).spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let problem = first_problem(&names);
                    ft::health::set_uplink(Some(problem.is_none()));
                    let mut o = outage.lock().unwrap();
                    match (&*o, problem) {
                        (None, Some(why)) => {
                            tracing::warn!("this side's network is down: {why}");
                            *o = Some((Instant::now(), why));
                        }
                        (Some(_), None) => {
                            tracing::info!("this side's network is up again");
                            *o = None;
                        }
                        _ => {}
                    }
                    drop(o);
                    std::thread::sleep(WATCH_EVERY);
                }
            });
            if let Err(e) = spawned {
                tracing::warn!("cannot watch the network ({e}): the uplink policy is off");
            }
        }
        Policy { opts, outage, watched, stop, decision: Arc::default(), acted: Mutex::new(None) }
    }

    /// The uplink policy's call, between two slices of a protected
    /// primary: a switchover, with its cause, when this side's network has
    /// been down for the grace time and the secondary's is up
    /// (`peer_up`, asked only then). One outage asks once (again only if
    /// that switchover failed, after a while).
    pub fn uplink_switchover(&self, peer_up: impl FnOnce() -> Option<bool>) -> Option<String> {
        if self.opts.on_uplink_down == OnUplinkDown::Ignore || !self.watched {
            return None;
        }
        let (since, why) = self.outage.lock().unwrap().clone()?;
        let down = since.elapsed();
        if down < self.opts.grace.unwrap_or(DEFAULT_GRACE) {
            return None;
        }
        if let Some((outage, at)) = *self.acted.lock().unwrap() {
            if outage == since && at.elapsed() < RETRY_AFTER {
                return None;
            }
        }
        if peer_up() != Some(true) {
            return None;
        }
        *self.acted.lock().unwrap() = Some((since, Instant::now()));
        Some(format!("this side's network is down ({why}, for {} ms) and the secondary's is up", down.as_millis()))
    }

    /// Keep `what` as the last decision (for `status`) and log it.
    pub fn decided(&self, what: &str) {
        tracing::warn!("policy: {what}");
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        *self.decision.lock().unwrap() = format!("{what} (at {secs} s since the epoch)");
    }

    /// Add what the policies know to a side's status.
    pub fn fill(&self, s: &mut ft::Status) {
        if self.watched {
            s.uplink_up = Some(self.outage.lock().unwrap().is_none());
        }
        s.decision = self.decision.lock().unwrap().clone();
    }
}

impl Drop for Policy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A policy whose (unwatched) network has been down `down_for`.
    fn policy(on: OnUplinkDown, down_for: Duration) -> Policy {
        let outage = Some((Instant::now() - down_for, "'up0' has no carrier".to_string()));
        Policy {
            opts: PolicyOpts { on_uplink_down: on, grace: None, uplinks: vec![] },
            outage: Arc::new(Mutex::new(outage)),
            watched: true,
            stop: Arc::default(),
            decision: Arc::default(),
            acted: Mutex::new(None),
        }
    }

    #[test]
    fn a_down_uplink_asks_for_one_switchover_once_the_grace_is_over_and_the_peer_is_up() {
        let p = policy(OnUplinkDown::Switchover, Duration::from_millis(100));
        assert_eq!(p.uplink_switchover(|| Some(true)), None, "within the grace time");
        let p = policy(OnUplinkDown::Switchover, DEFAULT_GRACE * 2);
        assert_eq!(p.uplink_switchover(|| Some(false)), None, "the secondary's network is down too");
        assert_eq!(p.uplink_switchover(|| None), None, "the secondary says nothing of its network");
        let cause = p.uplink_switchover(|| Some(true)).expect("a switchover");
        assert!(cause.contains("'up0' has no carrier"), "{cause}");
        assert_eq!(p.uplink_switchover(|| Some(true)), None, "one outage, one switchover");
    }

    #[test]
    fn ignore_and_an_unwatched_network_never_ask() {
        let p = policy(OnUplinkDown::Ignore, DEFAULT_GRACE * 2);
        assert_eq!(p.uplink_switchover(|| Some(true)), None);
        let p = Policy::start(PolicyOpts::default(), None);
        assert_eq!(p.uplink_switchover(|| Some(true)), None);
        let mut s = ft::Status::default();
        p.fill(&mut s);
        assert_eq!(s.uplink_up, None);
    }

    #[test]
    fn the_watcher_sees_a_missing_interface_as_down() {
        assert_eq!(first_problem(&["lo".into()]), None);
        let why = first_problem(&["lo".into(), "no-such-if0".into()]).unwrap();
        assert_eq!(why, "'no-such-if0' does not exist");
    }
}
