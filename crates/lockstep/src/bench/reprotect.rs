//! `bench reprotect`: re-protection of the default guest (512 MiB of RAM,
//! a 1 GiB root disk) under the numbered-write client, on one pair whose
//! sides know each other (`--peer` both ways). Three joins, one after the
//! other:
//!
//! - **new replica**: the secondary is killed and started again on an
//!   empty disk (a new host): the whole disk goes over;
//! - **returning secondary**: the secondary is killed, the primary runs
//!   alone for a while under the client, and the secondary comes back on
//!   its old replica: only the chunks changed since their shared
//!   generation go over;
//! - **returning primary**: the primary is killed, the secondary goes live
//!   alone, and the old primary comes back as its secondary, on its old
//!   replica (which may hold writes its secondary never saw).
//!
//! For each: restart to protected, the disk and machine state sent, the
//! rounds, the guest's pauses (first full snapshot, last round) and the
//! client's longest pause meanwhile. `--fill-mb N` first has the guest
//! write N MB of data to its disk, so that a new replica has that much
//! more to copy.

use anyhow::{bail, Result};
use lab::pair::{type_line, Client, Pair, LOG_PORT};
use lab::pairnet::PairNet;
use lab::stats::number_after;
use std::time::{Duration, Instant};

/// One join, as the primary's log line and the clock saw it.
struct Join {
    case: &'static str,
    seconds: f64,
    line: String,
    client_pause_ms: f64,
}

/// Wait until `file` says "joined at position" once more than `before`
/// times; returns the join's log line.
fn wait_join(pair: &Pair, file: &str, before: usize, t: Instant) -> Result<String> {
    while pair.text(file).matches("joined at position").count() == before {
        if t.elapsed() > Duration::from_secs(300) {
            bail!("no join within 300 s: {}", pair.tails());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let said = pair.text(file);
    Ok(said.lines().rev().find(|l| l.contains("machine state in")).unwrap_or("").to_string())
}

pub fn reprotect(fill_mb: u64) -> Result<()> {
    let (exe, g, dir) = super::pair::setup("reprotect")?;
    let net = PairNet::new("brepro", 52)?;
    let (a_addr, b_addr) = (net.primary_log_addr(LOG_PORT), net.log_addr(LOG_PORT));
    let mut pair = Pair::start_with_secondary_args(&exe, &g, &net, &dir, &[], &["--peer", &a_addr])?;
    pair.wait_for("primary.err", "the VM is protected", Duration::from_secs(180))?;
    pair.wait_for("primary.out", crate::guest::READY_LINE, Duration::from_secs(180))?;
    if fill_mb > 0 {
        eprintln!("bench reprotect: the guest writes {fill_mb} MB to its disk");
        type_line(
            &mut pair.primary,
            &format!(
                "dd if=/dev/zero bs=1048576 count={fill_mb} 2>/dev/null | tr '\\000' L > /fill; sync; ls -l /fill; \
                 echo filled-$((6*7))"
            ),
        )?;
        pair.wait_for("primary.out", "filled-42", Duration::from_secs(60 + fill_mb))?;
    }
    let disk_size = std::fs::metadata(dir.join("primary.img"))?.len();
    let allocated = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(dir.join("primary.img"))?.blocks() * 512
    };
    let client = Client::start(&net);
    client.advance(50, Duration::from_secs(60), &pair)?;
    let mut joins = Vec::new();
    // Start a secondary in `side`'s namespace with `peer`, named `name`, and
    // time its join as the primary's `said` file reports it.
    let join = |pair: &mut Pair, side: &str, peer: &str, name: &str, said: &str, case| -> Result<Join> {
        let before = pair.text(said).matches("joined at position").count();
        let t = Instant::now();
        pair.restart_as_secondary(&exe, &g, &net, side, &["--peer", peer], name, &[])?;
        let line = wait_join(pair, said, before, t)?;
        let seconds = t.elapsed().as_secs_f64();
        client.advance(30, Duration::from_secs(60), pair)?;
        let client_pause_ms = client.longest_pause_since(t).as_secs_f64() * 1e3;
        Ok(Join { case, seconds, line, client_pause_ms })
    };

    // A new replica: the secondary's host comes back with an empty disk.
    pair.secondary.kill()?;
    pair.secondary.wait()?;
    client.advance(20, Duration::from_secs(60), &pair)?;
    let replica = dir.join("secondary.img");
    for old in [crate::vm::replica::record_path(&replica), crate::vm::changes::history_path(&replica)] {
        let _ = std::fs::remove_file(old);
    }
    std::fs::File::create(&replica)?.set_len(disk_size)?;
    joins.push(join(&mut pair, "secondary", &a_addr, "new", "primary.err", "new replica")?);

    // The same secondary comes back on its replica after the primary ran
    // on alone under the client.
    pair.secondary.kill()?;
    pair.secondary.wait()?;
    client.advance(200, Duration::from_secs(60), &pair)?;
    joins.push(join(&mut pair, "secondary", &a_addr, "back", "primary.err", "returning secondary")?);

    // The primary dies; the secondary goes live; the old primary comes
    // back as its secondary.
    pair.primary.kill()?;
    pair.primary.wait()?;
    client.advance(200, Duration::from_secs(60), &pair)?;
    pair.wait_for("back.err", "going live at position", Duration::from_secs(30))?;
    joins.push(join(&mut pair, "primary", &b_addr, "oldprimary", "back.err", "returning primary")?);
    let w = client.finish(&pair)?;

    println!(
        "re-protection of the default guest (512 MiB RAM, {} MiB root disk, {} MiB of it allocated) under the \
         numbered-write client:",
        disk_size >> 20,
        allocated >> 20
    );
    println!(
        "{:<20} {:>12} {:>8} {:>7} {:>11} {:>7} {:>12} {:>11} {:>11} {:>13}",
        "replica",
        "to protected",
        "disk MB",
        "chunks",
        "machine MB",
        "rounds",
        "first pause",
        "RAM steps",
        "last pause",
        "client pause"
    );
    for j in &joins {
        let l = &j.line;
        let chunks = number_after(l, "(the ").map_or("all".to_string(), |c| format!("{c:.0}"));
        let field = |v: Option<f64>, unit: &str| v.map_or("?".to_string(), |v| format!("{v:.0}{unit}"));
        println!(
            "{:<20} {:>11.2}s {:>8} {:>7} {:>11} {:>7} {:>12} {:>11} {:>11} {:>11.0}ms",
            j.case,
            j.seconds,
            field(number_after(l, "sent "), ""),
            chunks,
            field(number_after(l, "and "), ""),
            field(number_after(l, "machine state in "), ""),
            field(number_after(l, "the first round's start "), "ms"),
            field(number_after(l, "at most "), "ms"),
            field(number_after(l, "the last paused it "), "ms"),
            j.client_pause_ms
        );
    }
    println!("{} writes acknowledged in all, every one read back", w.acked);
    drop(pair);
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
