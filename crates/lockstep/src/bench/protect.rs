//! `bench protect`: continuous protection under the numbered-write client,
//! on one pair of the default guest whose sides know each other
//! (`--peer` both ways).
//!
//! - Planned switchovers, alternating direction: the time `lockstep
//!   switchover` reports, and the client's longest pause around each.
//! - Re-protection: the secondary is killed and started again on its old
//!   replica; the primary, alone, is joined by it: the time from the
//!   restart to protected, what went over, the guest's pause for the last
//!   round, and the client's longest pause meanwhile.

use anyhow::{bail, Context, Result};
use lab::pair::{Client, Pair, LOG_PORT};
use lab::pairnet::PairNet;
use lab::stats::median;
use std::time::{Duration, Instant};

fn status_of(ns: &str, exe: &std::path::Path, addr: &str) -> Result<serde_json::Value> {
    let out = lab::netns::exec(ns, exe.to_str().context("the executable's path is not UTF-8")?)
        .args(["status", "--json", addr])
        .output()?;
    if !out.status.success() {
        bail!("status {addr}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

pub fn protect(reps: usize) -> Result<()> {
    let (exe, g, dir) = super::pair::setup("protect")?;
    let net = PairNet::new("bprot", 62)?;
    let a_addr = net.primary_log_addr(LOG_PORT);
    let mut pair = Pair::start_with_secondary_args(&exe, &g, &net, &dir, &[], &["--peer", &a_addr])?;
    pair.wait_for("primary.err", "the VM is protected", Duration::from_secs(180))?;
    pair.wait_for("primary.out", crate::guest::READY_LINE, Duration::from_secs(180))?;
    let client = Client::start(&net);
    client.advance(50, Duration::from_secs(60), &pair)?;

    // Switchovers, alternating: (namespace, status address) of the primary.
    let sides = [(net.primary.clone(), "127.0.0.1:9540"), (net.secondary.clone(), "127.0.0.1:9541")];
    let (mut reported, mut pauses) = (Vec::new(), Vec::new());
    for i in 0..reps {
        let (ns, addr) = &sides[i % 2];
        let t = Instant::now();
        let out = lab::netns::exec(ns, exe.to_str().unwrap()).args(["switchover", addr]).output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!("switchover {} failed: {} {}", i + 1, text, String::from_utf8_lossy(&out.stderr));
        }
        let ms: f64 = text
            .split_whitespace()
            .skip_while(|w| *w != "in")
            .nth(1)
            .and_then(|w| w.parse().ok())
            .context("the switchover did not say how long it took")?;
        client.advance(30, Duration::from_secs(60), &pair)?;
        let pause = client.longest_pause_since(t);
        eprintln!(
            "bench protect: switchover {} of {reps}: {ms:.0} ms, client's longest pause {:.1} ms",
            i + 1,
            pause.as_secs_f64() * 1e3
        );
        reported.push(ms);
        pauses.push(pause.as_secs_f64() * 1e3);
    }
    // Whichever side is the secondary now is killed and restarted.
    let secondary_side = if reps.is_multiple_of(2) { "secondary" } else { "primary" };
    let (ns, addr) = if reps.is_multiple_of(2) { &sides[0] } else { &sides[1] };
    let primary_file = if reps.is_multiple_of(2) { "primary.err" } else { "secondary.err" };
    let peer = if secondary_side == "secondary" { a_addr.clone() } else { net.log_addr(LOG_PORT) };
    match secondary_side {
        "secondary" => pair.secondary.kill()?,
        _ => pair.primary.kill()?,
    }
    client.advance(20, Duration::from_secs(60), &pair)?;
    let before = pair.text(primary_file).matches("joined at position").count();
    let t = Instant::now();
    pair.restart_as_secondary(&exe, &g, &net, secondary_side, &["--peer", &peer], "rejoined", &[])?;
    while pair.text(primary_file).matches("joined at position").count() == before {
        if t.elapsed() > Duration::from_secs(180) {
            bail!("no join within 180 s: {}", pair.tails());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let joined = t.elapsed();
    client.advance(30, Duration::from_secs(60), &pair)?;
    let pause = client.longest_pause_since(t);
    let said = pair.text(primary_file);
    let sent =
        said.lines().rev().find(|l| l.contains("machine state in")).unwrap_or("").trim_start_matches("lockstep: ");
    let st = status_of(ns, &exe, addr)?;
    let w = client.finish(&pair)?;
    println!("continuous protection, one pair of the default guest under the numbered-write client:");
    println!(
        "planned switchover, {reps} alternating: lockstep switchover median {:.0} ms (max {:.0}); client's longest \
         pause median {:.1} ms (max {:.1})",
        median(&mut reported.clone()),
        reported.iter().cloned().fold(0.0, f64::max),
        median(&mut pauses.clone()),
        pauses.iter().cloned().fold(0.0, f64::max)
    );
    println!(
        "re-protection: a secondary restarted on its old replica was joined in {:.2} s (restart to protected); {sent}; \
         client's longest pause meanwhile {:.1} ms; the pair: {} {}",
        joined.as_secs_f64(),
        pause.as_secs_f64() * 1e3,
        st["role"],
        st["state"]
    );
    println!("{} writes acknowledged in all, every one read back", w.acked);
    drop(pair);
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
