//! The main job: a protected pair of the default guest on this machine,
//! with a live client, and a kill of the primary to watch the secondary
//! take over. Everything runs in network namespaces the demo builds and
//! removes (`netlab`); the disks are sparse copies of the guest's root disk.

use anyhow::{bail, Context, Result};
use lab::netns::in_netns;
use lab::pair::{Client, GuestPaths, Pair, LOG_PORT};
use lab::pairnet::PairNet;
use std::io::BufRead;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct DemoOpts {
    /// Kill the primary after this many seconds of client traffic (it can
    /// also be killed by typing `k` and Enter).
    pub kill_after: u64,
    /// Keep the client going this long after the kill.
    pub after: u64,
}

pub fn run(opts: &DemoOpts) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the demo builds network namespaces, a bridge and taps: run it as root");
    }
    let dir = std::env::temp_dir().join(format!("lockstep-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let say = |s: &str| println!("demo: {s}");
    crate::guest::ensure_host_tools(&["ip"], "iproute2", "the demo's namespaces, bridges and taps")?;
    say("building (or reusing) the default guest ...");
    crate::guest::build(false)?;
    let net = PairNet::new("demo", 77)?;
    // As a hub would: a client's packet sent as the primary dies reaches
    // the secondary too, which hands it to the guest when it goes live.
    net.mirror_guest_frames(true)?;
    say(&format!(
        "network: client {} | bridge (delivering the guest's frames to both sides) | primary tap, secondary tap; \
         log channel on its own veth ({})",
        net.client,
        net.log_addr(LOG_PORT)
    ));
    let g = crate::guest::build(false)?;
    let paths =
        GuestPaths { kernel: g.kernel, initrd: g.initrd, disk: g.disk, append: crate::guest::DEFAULT_APPEND.into() };
    let mut pair = Pair::start(&std::env::current_exe()?, &paths, &net, &dir, &[])?;
    say(&format!("started secondary and primary (their output is in {})", dir.display()));
    pair.wait_for("primary.err", "the VM is protected", Duration::from_secs(120))?;
    say("paired: the primary ships its log, the secondary replays it");
    pair.wait_for("primary.out", crate::guest::READY_LINE, Duration::from_secs(120))?;
    say(&format!("guest is up: redis at {}:6379 behind the primary", net.guest_ip()));

    let client = Client::start(&net);
    say(&format!(
        "client: one TCP connection, numbered INCR+SET writes with read-backs; the primary is killed (SIGKILL) in {} s, \
         or type k and Enter",
        opts.kill_after
    ));
    let typed = Arc::new(AtomicBool::new(false));
    {
        let typed = typed.clone();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines().map_while(Result::ok) {
                if line.trim() == "k" {
                    typed.store(true, Ordering::Relaxed);
                }
            }
        });
    }
    let t = Instant::now();
    let mut last_print = Instant::now();
    while t.elapsed() < Duration::from_secs(opts.kill_after) && !typed.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if client.failed() {
            client.finish(&pair).context("the client failed before the kill")?;
            bail!("the client stopped before the kill");
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            say(&format!("client: {} writes acknowledged, protected", client.acked()));
        }
    }
    for (ns, addr) in [(&net.primary, "127.0.0.1:9540"), (&net.secondary, "127.0.0.1:9541")] {
        say(&format!("lockstep status: {}", side_status(ns, addr)));
    }
    let before = client.acked();
    pair.primary.kill()?;
    let killed = Instant::now();
    pair.primary.wait()?;
    let gap_before = client.longest_pause_before(killed);
    say(&format!("SIGKILL to the primary after {before} acknowledged writes"));
    // The first acknowledged write after the kill.
    let next = loop {
        if let (Some(next), _) = client.acks_around(killed) {
            break next;
        }
        if client.failed() {
            client.finish(&pair).context("the client failed after the kill")?;
            bail!("the client stopped after the kill");
        }
        if killed.elapsed() > Duration::from_secs(30) {
            bail!("no reply 30 s after the kill: {}", pair.tails());
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let failover = next - killed;
    for line in pair
        .text("secondary.err")
        .lines()
        .filter(|l| l.contains("lost the primary") || l.contains("won epoch") || l.contains("announcing"))
    {
        say(&format!("secondary said: {}", line.trim_start_matches("lockstep: ")));
    }
    say(&format!("the client's next write was acknowledged {} ms after the kill", failover.as_millis()));
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(opts.after) {
        std::thread::sleep(Duration::from_millis(1000));
        say(&format!("client: {} writes acknowledged, via the secondary (unprotected)", client.acked()));
    }
    say(&format!("lockstep status: {}", side_status(&net.secondary, "127.0.0.1:9541")));
    let w = client.finish(&pair)?;
    let mut lat = w.latencies_us.clone();
    lat.sort_unstable();
    let median = lat.get(lat.len() / 2).copied().unwrap_or(0);
    say(&format!(
        "done: {} writes on one connection, never reset; all {} read back intact after the failover",
        w.acked, w.acked
    ));
    say(&format!(
        "step latency median {:.2} ms; longest pause {} ms (before the kill: {} ms)",
        median as f64 / 1e3,
        w.max_gap.as_millis(),
        gap_before.as_millis()
    ));
    drop(pair);
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// One line of `lockstep status` for the side in namespace `ns`.
fn side_status(ns: &str, addr: &'static str) -> String {
    match in_netns(ns, move || crate::host::status::fetch(addr)).join() {
        Ok(Ok(Ok(s))) => crate::host::status::one_line(&s),
        Ok(Ok(Err(e))) | Ok(Err(e)) => format!("{addr} in {ns}: {e:#}"),
        Err(_) => "status thread panicked".to_string(),
    }
}
