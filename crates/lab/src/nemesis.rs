//! A nemesis for a pair: faults chosen at random, one after another, under
//! the numbered-write client on one connection, each followed by what a
//! supervisor does (start a stopped side again as a secondary, which the
//! survivor joins) and by the invariants: the VM answers, no acknowledged
//! write is lost, the connection is never reset, and the pair is protected
//! again. The seed picks the faults and their timing, so a failure can be
//! replayed (`--seed`).
//!
//! The pair is the default guest in a [`PairNet`]; each side knows the
//! other (`--peer`), watches its uplink (`--uplink up0`), and has a disk
//! failpoint armed by a file (`fill`), so every fault below is reachable
//! from outside the processes.

use crate::netns::exec;
use crate::pair::{Client, GuestPaths, Pair, LOG_PORT};
use crate::pairnet::PairNet;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One fault the nemesis can inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL the primary: the secondary goes live.
    KillPrimary,
    /// SIGKILL the secondary: the primary goes on alone.
    KillSecondary,
    /// SIGSTOP the primary past the silence timeout, then SIGCONT: the
    /// secondary takes over and the old primary stops itself.
    PausePrimary,
    /// Cut the log link: the arbiter picks one side, the other stops.
    CutLogLink,
    /// Cap the log link at a crawl for a while: correct, only slower.
    SlowLogLink,
    /// Fill one side's replica (its writes fail with ENOSPC): that side
    /// stops, the other goes on.
    FillReplica,
    /// Take the primary's uplink down: the policy switches over.
    UplinkDown,
    /// A planned switchover.
    Switchover,
    /// SIGKILL the secondary, restart it, and SIGKILL it again while the
    /// primary sends it the VM's state: the primary goes on alone and the
    /// next join works.
    KillJoiner,
    /// SIGKILL either side a few milliseconds into a planned switchover:
    /// one VM goes on, from the handover point or before it.
    KillInSwitchover,
}

impl Fault {
    pub const ALL: [Fault; 10] = [
        Fault::KillPrimary,
        Fault::KillSecondary,
        Fault::PausePrimary,
        Fault::CutLogLink,
        Fault::SlowLogLink,
        Fault::FillReplica,
        Fault::UplinkDown,
        Fault::Switchover,
        Fault::KillJoiner,
        Fault::KillInSwitchover,
    ];
}

/// SplitMix64: small, seeded, the same sequence everywhere.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// What one step did.
#[derive(Debug, Clone)]
pub struct Step {
    pub fault: Fault,
    /// Which side it hit, and what followed.
    pub what: String,
    /// From the fault to the pair being protected again.
    pub recovered: Duration,
    /// The client's longest wait for an acknowledgement during the step.
    pub client_pause: Duration,
}

/// The whole run.
#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    pub steps: Vec<Step>,
    /// Writes acknowledged (and all read back at the end).
    pub writes: u64,
}

/// How long a run goes on, and with which faults.
pub struct Options {
    pub seed: u64,
    /// Stop after this many steps ...
    pub steps: Option<u32>,
    /// ... or once this much time has gone (whichever comes first).
    pub duration: Option<Duration>,
    pub faults: Vec<Fault>,
}

/// The sides' namespaces ("primary" and "secondary": where each started)
/// and their names in reports: host A and host B, whatever their roles.
const SIDES: [&str; 2] = ["primary", "secondary"];
const HOSTS: [&str; 2] = ["A", "B"];
const METRICS: [&str; 2] = ["127.0.0.1:9540", "127.0.0.1:9541"];
/// A side's way back: joining, with the whole state to copy.
const REPROTECT: Duration = Duration::from_secs(180);

/// The pair under the nemesis: side 0 lives in the primary's namespace,
/// side 1 in the secondary's, whatever their roles are now.
struct Run<'a> {
    exe: &'a Path,
    guest: &'a GuestPaths,
    net: &'a PairNet,
    pair: Pair,
    /// Each side's disk failpoint file (present: its writes fail).
    full: [PathBuf; 2],
    /// Processes started so far, to name their output files.
    started: u32,
}

impl Run<'_> {
    fn ns(&self, side: usize) -> &str {
        if side == 0 {
            &self.net.primary
        } else {
            &self.net.secondary
        }
    }

    /// `lockstep status --json` of a side, squeezed ("" if it does not
    /// answer).
    fn status(&self, side: usize) -> String {
        let out = exec(self.ns(side), self.exe.to_str().unwrap()).args(["status", "--json", METRICS[side]]).output();
        match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).replace([' ', '\n'], ""),
            _ => String::new(),
        }
    }

    fn role(&self, side: usize) -> String {
        let s = self.status(side);
        let role = s.split("\"role\":\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("");
        role.to_string()
    }

    fn protected(&self, side: usize) -> bool {
        self.status(side).contains("\"protected\":true")
    }

    /// The side that is the primary now (waiting up to `timeout`).
    fn primary(&self, timeout: Duration) -> Result<usize> {
        let t = Instant::now();
        loop {
            for side in 0..2 {
                if self.role(side) == "primary" {
                    return Ok(side);
                }
            }
            if t.elapsed() > timeout {
                bail!("no side is the primary after {timeout:?}: {}", self.pair.tails());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until the pair is protected: one side the primary, the other
    /// its secondary. Returns the primary's side.
    fn protected_again(&self, timeout: Duration) -> Result<usize> {
        let t = Instant::now();
        loop {
            let p = self.primary(timeout.saturating_sub(t.elapsed()))?;
            if self.protected(p) && self.role(1 - p) == "secondary" && self.protected(1 - p) {
                return Ok(p);
            }
            if t.elapsed() > timeout {
                bail!("not protected again after {timeout:?}: {}", self.pair.tails());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn child(&mut self, side: usize) -> &mut std::process::Child {
        if side == 0 {
            &mut self.pair.primary
        } else {
            &mut self.pair.secondary
        }
    }

    /// Wait for a side's process to exit (it stops itself).
    fn exited(&mut self, side: usize, timeout: Duration) -> Result<()> {
        let t = Instant::now();
        while self.child(side).try_wait()?.is_none() {
            if t.elapsed() > timeout {
                bail!("host {} did not stop within {timeout:?}: {}", HOSTS[side], self.pair.tails());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// What a supervisor does: start the side again as a secondary (on its
    /// old replica) that the primary joins.
    fn restart(&mut self, side: usize) -> Result<()> {
        self.started += 1;
        let name = format!("{}{}", SIDES[side], self.started);
        let peer = if side == 0 { self.net.log_addr(LOG_PORT) } else { self.net.primary_log_addr(LOG_PORT) };
        let full = self.full[side].to_str().unwrap().to_string();
        let env = [("LOCKSTEP_FAILPOINT", "disk-full"), ("LOCKSTEP_FAILPOINT_FILE", full.as_str())];
        let extra = ["--peer", peer.as_str(), "--uplink", "up0"];
        let (exe, guest, net) = (self.exe, self.guest, self.net);
        self.pair.restart_as_secondary(exe, guest, net, SIDES[side], &extra, &name, &env)
    }

    /// One fault and the recovery after it; says what happened.
    fn inject(&mut self, fault: Fault, rng: &mut Rng) -> Result<String> {
        let p = self.primary(Duration::from_secs(30))?;
        let s = 1 - p;
        Ok(match fault {
            Fault::KillPrimary | Fault::KillSecondary => {
                let hit = if fault == Fault::KillPrimary { p } else { s };
                self.child(hit).kill()?;
                self.child(hit).wait()?;
                let live = self.primary(Duration::from_secs(30))?;
                if live == hit {
                    bail!("the killed side ({}) still answers as the primary", HOSTS[hit]);
                }
                self.restart(hit)?;
                format!("killed the {} ({})", if hit == p { "primary" } else { "secondary" }, HOSTS[hit])
            }
            Fault::PausePrimary => {
                let pid = nix::unistd::Pid::from_raw(self.child(p).id() as i32);
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)?;
                // Past the silence timeout (250 ms) and a takeover.
                let held = Duration::from_millis(1500 + rng.below(1500));
                std::thread::sleep(held);
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT)?;
                self.exited(p, Duration::from_secs(30))?;
                self.restart(p)?;
                format!("paused the primary ({}) for {} ms", HOSTS[p], held.as_millis())
            }
            Fault::CutLogLink => {
                self.net.set_log_link(false)?;
                let t = Instant::now();
                let loser = loop {
                    if self.child(0).try_wait()?.is_some() {
                        break 0;
                    }
                    if self.child(1).try_wait()?.is_some() {
                        break 1;
                    }
                    if t.elapsed() > Duration::from_secs(30) {
                        self.net.set_log_link(true)?;
                        bail!("neither side stopped with the log link cut: {}", self.pair.tails());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                };
                self.net.set_log_link(true)?;
                self.restart(loser)?;
                let role = if loser == p { "primary" } else { "secondary" };
                format!("cut the log link for {} ms: the {role} ({}) stopped", t.elapsed().as_millis(), HOSTS[loser])
            }
            Fault::SlowLogLink => {
                let kbit = 2000 + 1000 * rng.below(8) as u32;
                self.net.slow_log(kbit, 50)?;
                let held = Duration::from_millis(2000 + rng.below(2000));
                std::thread::sleep(held);
                self.net.heal_log()?;
                format!("log link at {kbit} kbit/s for {} ms", held.as_millis())
            }
            Fault::FillReplica => {
                let hit = rng.below(2) as usize;
                std::fs::write(&self.full[hit], b"")?;
                let stopped = self.exited(hit, Duration::from_secs(60));
                std::fs::remove_file(&self.full[hit])?;
                stopped?;
                self.restart(hit)?;
                format!("filled the {}'s replica ({})", if hit == p { "primary" } else { "secondary" }, HOSTS[hit])
            }
            Fault::UplinkDown => {
                self.net.set_uplink(self.ns(p), false)?;
                let t = Instant::now();
                while self.role(p) != "secondary" {
                    if t.elapsed() > Duration::from_secs(30) {
                        self.net.set_uplink(self.ns(p), true)?;
                        bail!("no switchover with the primary's uplink down: {}", self.pair.tails());
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                self.net.set_uplink(self.ns(p), true)?;
                format!("the primary's uplink down ({}): switched over", HOSTS[p])
            }
            Fault::Switchover => {
                let out = exec(self.ns(p), self.exe.to_str().unwrap()).args(["switchover", METRICS[p]]).output()?;
                if !out.status.success() {
                    bail!("switchover failed: {}", String::from_utf8_lossy(&out.stderr).trim());
                }
                format!("switchover from {} to {}", HOSTS[p], HOSTS[s])
            }
            Fault::KillJoiner => {
                self.child(s).kill()?;
                self.child(s).wait()?;
                let said = format!("{}.err", self.pair.names[p]);
                let joins = |pair: &Pair| pair.text(&said).matches("joins: sending the VM's state").count();
                let before = joins(&self.pair);
                self.restart(s)?;
                let t = Instant::now();
                while joins(&self.pair) == before {
                    if t.elapsed() > Duration::from_secs(60) {
                        bail!("no join began: {}", self.pair.tails());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                let into = Duration::from_millis(rng.below(600));
                std::thread::sleep(into);
                self.child(s).kill()?;
                self.child(s).wait()?;
                self.restart(s)?;
                format!("killed the joining secondary ({}) {} ms into the transfer", HOSTS[s], into.as_millis())
            }
            Fault::KillInSwitchover => {
                let mut asked = exec(self.ns(p), self.exe.to_str().unwrap())
                    .args(["switchover", "--timeout", "20", METRICS[p]])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()?;
                let hit = if rng.below(2) == 0 { p } else { s };
                let into = Duration::from_millis(rng.below(40));
                std::thread::sleep(into);
                self.child(hit).kill()?;
                self.child(hit).wait()?;
                // The command waits for a protected pair, which needs the
                // restart below: the operator gives up on it.
                let _ = asked.kill();
                let _ = asked.wait();
                let live = self.primary(Duration::from_secs(30))?;
                if live == hit {
                    bail!("the killed side ({}) still answers as the primary", HOSTS[hit]);
                }
                self.restart(hit)?;
                let role = if hit == p { "primary" } else { "secondary" };
                format!("killed the {role} ({}) {} ms into a switchover", HOSTS[hit], into.as_millis())
            }
        })
    }
}

/// Run the nemesis on a pair of `guest` (with `lockstep` binary `exe`) in
/// a network tagged `tag` on 10.`net_id`.0.0/16, its files in `dir`;
/// `say` hears a line per step.
pub fn run(
    exe: &Path,
    guest: &GuestPaths,
    dir: &Path,
    tag: &str,
    net_id: u8,
    opts: &Options,
    say: &mut dyn FnMut(&str),
) -> Result<Report> {
    if opts.faults.is_empty() {
        bail!("the nemesis needs at least one fault");
    }
    let net = PairNet::new(tag, net_id)?;
    let full = [dir.join("primary.full"), dir.join("secondary.full")];
    for f in &full {
        let _ = std::fs::remove_file(f);
    }
    let a = net.primary_log_addr(LOG_PORT);
    let (fa, fb) = (full[0].to_str().unwrap(), full[1].to_str().unwrap());
    let penv = [("LOCKSTEP_FAILPOINT", "disk-full"), ("LOCKSTEP_FAILPOINT_FILE", fa)];
    let senv = [("LOCKSTEP_FAILPOINT", "disk-full"), ("LOCKSTEP_FAILPOINT_FILE", fb)];
    let pair = Pair::start_full(exe, guest, &net, dir, &["--uplink", "up0"], &penv, &senv, &["--peer", &a])
        .context("cannot start the pair")?;
    let mut run = Run { exe, guest, net: &net, pair, full, started: 0 };
    run.protected_again(Duration::from_secs(300))?;
    run.pair.wait_for("primary.out", crate::pair::GUEST_READY, Duration::from_secs(300))?;
    let client = Client::start(&net);
    client.advance(20, Duration::from_secs(120), &run.pair)?;

    let mut rng = Rng::new(opts.seed);
    let t = Instant::now();
    let mut steps = Vec::new();
    loop {
        if opts.steps.is_some_and(|n| steps.len() as u32 >= n) || opts.duration.is_some_and(|d| t.elapsed() >= d) {
            break;
        }
        let fault = opts.faults[rng.below(opts.faults.len() as u64) as usize];
        // A few seconds of quiet work between faults.
        std::thread::sleep(Duration::from_millis(500 + rng.below(2500)));
        let at = Instant::now();
        let what = run.inject(fault, &mut rng).with_context(|| format!("step {} ({fault:?})", steps.len() + 1))?;
        run.protected_again(REPROTECT).with_context(|| format!("step {} ({fault:?}): {what}", steps.len() + 1))?;
        let recovered = at.elapsed();
        client
            .advance(20, Duration::from_secs(60), &run.pair)
            .with_context(|| format!("step {} ({fault:?}): {what}", steps.len() + 1))?;
        let client_pause = client.longest_pause_since(at);
        let step = Step { fault, what, recovered, client_pause };
        say(&format!(
            "step {}: {}; protected again after {} ms; the client's longest pause {} ms",
            steps.len() + 1,
            step.what,
            step.recovered.as_millis(),
            step.client_pause.as_millis()
        ));
        steps.push(step);
    }
    let w = client.finish(&run.pair)?;
    Ok(Report { seed: opts.seed, steps, writes: w.acked })
}
