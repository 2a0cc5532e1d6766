//! `primary`, `secondary` and `status`: the pair's settings resolved into
//! what the `pair` room runs.

use super::{PairArgs, StatusArgs};
use crate::host::status;
use crate::pair::{self, PairOpts};
use crate::vm::LinuxVm;
use crate::Outcome;
use anyhow::{bail, Context, Result};
use std::time::Duration;

/// Which side of a pair to run.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Primary,
    Secondary,
}

pub(super) fn side(args: PairArgs, side: Side) -> Result<Outcome> {
    // A stop signal from here on is seen once the side runs (see `stop_signal`).
    crate::host::console::stop_signal();
    let (spec, pair) = args.run.resolve(args.pair)?;
    machine::set_engine(spec.engine.unwrap_or_else(machine::default_engine));
    if spec.elf.is_some() || spec.record.is_some() || spec.snapshot_every.is_some() {
        bail!(
            "a pair runs a Linux VM and ships its log to the peer: --elf, --record and --snapshot-every do not apply"
        );
    }
    let (addr, what) = match side {
        Side::Primary => (pair.peer.clone(), "the primary needs --peer HOST:PORT (the secondary's --listen)"),
        Side::Secondary => (pair.listen.clone(), "the secondary needs --listen HOST:PORT"),
    };
    let addr = addr.context(what)?;
    // Running alone, a side looks for a secondary to join it at its peer.
    let peer = pair.peer;
    let defaults = ft::PairConfig::default();
    let millis = |ms: Option<u64>, default: Duration| ms.map_or(default, |ms| Duration::from_millis(ms.max(1)));
    let cfg = ft::PairConfig {
        heartbeat: millis(pair.heartbeat_ms, defaults.heartbeat),
        timeout: millis(pair.timeout_ms, defaults.timeout),
        max_lag: pair.max_lag.unwrap_or(defaults.max_lag),
        connect_timeout: defaults.connect_timeout,
        // A slow return path, so that output is held long enough for a
        // kill to land while some is (the test of resending it).
        ack_delay: if crate::host::failpoint::named("secondary-delay-acks") {
            Duration::from_millis(40)
        } else {
            Duration::ZERO
        },
        disk: ft::DiskWatch::default(),
    };
    if cfg.timeout <= cfg.heartbeat {
        bail!("--timeout-ms must be longer than --heartbeat-ms");
    }
    let uplinks: Vec<String> =
        pair.uplink.iter().flat_map(|u| u.split(',')).map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect();
    // A name that is wrong now would count as a network that is down: a
    // typo on the primary alone would move the VM to the secondary.
    for name in &uplinks {
        if tap::link_state(name).is_ok_and(|s| s == tap::LinkState::Missing) {
            bail!("--uplink '{name}': there is no network interface of that name on this host");
        }
    }
    let mut metrics = pair.metrics;
    if metrics.is_none() {
        let default = if side == Side::Primary { "127.0.0.1:9540" } else { "127.0.0.1:9541" };
        match std::net::TcpListener::bind(default) {
            Ok(_) => metrics = Some(default.to_string()),
            Err(e) => tracing::warn!("no status endpoint ({default}: {e}); use --metrics HOST:PORT"),
        }
    }
    let key = pair.key.as_deref().map(ft::auth::Key::load).transpose()?;
    if key.is_none() {
        tracing::info!(
            "the log channel is not authenticated (give both sides --key FILE; `lockstep key new FILE` makes one)"
        );
    }
    let opts = PairOpts {
        addr,
        peer,
        arbiter: pair.arbiter,
        cfg,
        metrics,
        hash_every: Some(spec.hash_every.unwrap_or(pair::DEFAULT_HASH_EVERY)),
        print_hashes: spec.hash_every.is_some(),
        max_insns: spec.max_insns,
        key,
        keep_log: pair.keep_log,
        policy: pair::policy::PolicyOpts {
            on_uplink_down: pair.on_uplink_down.unwrap_or_default(),
            grace: pair.uplink_grace_ms.map(Duration::from_millis),
            uplinks,
        },
    };
    let vm = LinuxVm::from_spec(&spec)?.context("a pair needs a Linux VM")?;
    match side {
        Side::Primary => pair::primary::run(&vm, &opts),
        Side::Secondary => pair::secondary::run(&vm, &opts),
    }
}

pub(super) fn status(args: StatusArgs) -> Result<Outcome> {
    let mut answered = 0;
    for addr in &args.addrs {
        match status::fetch(addr) {
            Ok(s) if args.json => {
                let mut v = serde_json::to_value(&s)?;
                v["endpoint"] = serde_json::Value::String(addr.clone());
                println!("{v}");
                answered += 1;
            }
            Ok(s) => {
                println!("{}", status::describe(addr, &s));
                answered += 1;
            }
            Err(e) => tracing::error!("{e:#}"),
        }
    }
    if answered == 0 {
        bail!("no side of a pair answered (asked {})", args.addrs.join(", "));
    }
    Ok(Outcome::Success)
}

/// `lockstep switchover`: ask the primary at `addr`, then watch it until it
/// is the protected secondary of the new pair.
pub(super) fn switchover(addr: &str, timeout: Duration) -> Result<Outcome> {
    let before = status::fetch(addr)?;
    let asked = status::post(addr, "/switchover").context("the switchover was refused")?;
    tracing::info!("{addr}: {asked}");
    let t = std::time::Instant::now();
    let mut last = before.clone();
    while t.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(20));
        // The endpoint is busy with the swap for a moment: ask again.
        let Ok(s) = status::fetch(addr) else { continue };
        if s.role == "secondary" && s.protected && s.epoch > before.epoch {
            println!(
                "switched over in {} ms: {addr} is now the secondary at epoch {}, replaying the new primary's log",
                t.elapsed().as_millis(),
                s.epoch
            );
            return Ok(Outcome::Success);
        }
        if s.role == "primary" && s.epoch > before.epoch {
            bail!("the switchover failed: {addr} is still the primary, now at epoch {} ({})", s.epoch, s.note);
        }
        last = s;
    }
    bail!("no new pair within {} s: {addr} says {}", timeout.as_secs(), status::one_line(&last))
}

/// The transfer's progress on a terminal (a person watching), redrawn in
/// place; nothing when stderr is a pipe or a file.
#[derive(Default)]
struct ProgressBar {
    drawn: bool,
}

impl ProgressBar {
    fn show(&mut self, p: Option<&ft::SyncProgress>) {
        use std::io::{IsTerminal, Write};
        let mut err = std::io::stderr();
        if !err.is_terminal() {
            return;
        }
        match p {
            Some(p) => {
                let filled = (p.percent / 100.0 * 30.0).round().clamp(0.0, 30.0) as usize;
                let _ = write!(err, "\r\x1b[K[{}{}] {}", "#".repeat(filled), ".".repeat(30 - filled), p.line());
                self.drawn = true;
            }
            None if self.drawn => {
                let _ = writeln!(err, "\r\x1b[Ktransfer done");
                self.drawn = false;
            }
            None => {}
        }
        let _ = err.flush();
    }
}

/// `lockstep migrate`: ask the primary at `addr` to move the VM to the
/// secondary at `to`, then watch it: done when it is that primary's
/// secondary (`keep`) or has stopped after the switchover.
pub(super) fn migrate(addr: &str, to: &str, keep: bool, timeout: Duration) -> Result<Outcome> {
    let before = status::fetch(addr)?;
    let path = format!("/migrate?to={to}&keep={}", u8::from(keep));
    let asked = status::post(addr, &path).context("the migration was refused")?;
    tracing::info!("{addr}: {asked}");
    let t = std::time::Instant::now();
    let mut last = before.clone();
    let mut joined = false;
    let mut bar = ProgressBar::default();
    while t.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(20));
        match status::fetch(addr) {
            Ok(s) if s.role == "released" && !keep => {
                println!("migrated to {to} in {} ms: {}", t.elapsed().as_millis(), s.note);
                return Ok(Outcome::Success);
            }
            Ok(s) => {
                bar.show(s.sync.as_ref());
                joined |= s.role == "primary" && s.protected && s.epoch > before.epoch;
                if s.role == "secondary" && s.epoch > before.epoch {
                    if keep && s.protected {
                        println!(
                            "migrated to {to} in {} ms: {addr} is now its secondary at epoch {}",
                            t.elapsed().as_millis(),
                            s.epoch
                        );
                        return Ok(Outcome::Success);
                    }
                    joined = true;
                }
                last = s;
            }
            // This side stops once the VM runs at its new place.
            Err(_) if joined && !keep => {
                println!("migrated to {to} in {} ms: {addr} has let the VM go", t.elapsed().as_millis());
                return Ok(Outcome::Success);
            }
            Err(_) => {}
        }
    }
    bail!("the VM did not move to {to} within {} s: {addr} says {}", timeout.as_secs(), status::one_line(&last))
}
