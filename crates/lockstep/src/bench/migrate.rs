//! `bench migrate`: one live migration of the default guest with lockstep
//! and one with QEMU, on this machine, the guest idle in both.
//!
//! - lockstep: a protected pair (sides A and B); `lockstep migrate --to B`
//!   lets B go, B is started again (as a supervisor would) and joins A by
//!   pre-copy, with the disk, and a switchover moves the VM there. Figures
//!   from the CLI and A's log: the whole move, the join's first and last
//!   pauses, the switchover.
//! - QEMU: `qemu-system-riscv64` (TCG) booted on a copy of the same disk,
//!   migrated over TCP to a second QEMU started with `-incoming` on the same
//!   disk (QEMU's usual shared storage: the disk is not copied), driven
//!   over QMP; figures from `query-migrate` (total time, downtime, RAM
//!   sent).

use anyhow::{bail, Context, Result};
use lab::capture::Captured;
use lab::pair::{Pair, LOG_PORT};
use lab::pairnet::PairNet;
use lab::stats::number_after;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(300);

fn lockstep_migration(exe: &Path, g: &lab::pair::GuestPaths, dir: &Path) -> Result<()> {
    let net = PairNet::new("bmig", 54)?;
    let mut pair = Pair::start(exe, g, &net, dir, &[])?;
    pair.wait_for("primary.err", "the VM is protected", BOOT)?;
    pair.wait_for("primary.out", crate::guest::READY_LINE, BOOT)?;
    let to = net.log_addr(LOG_PORT);
    let t = Instant::now();
    let (ns, exe_path, to2) = (net.primary.clone(), exe.to_path_buf(), to.clone());
    let cli = std::thread::spawn(move || {
        lab::netns::exec(&ns, exe_path.to_str().unwrap()).args(["migrate", "--to", &to2, "127.0.0.1:9540"]).output()
    });
    // B is let go; start it again at once as the target.
    while pair.secondary.try_wait()?.is_none() {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the secondary was not released: {}", pair.tails());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let released = t.elapsed();
    pair.restart_as_secondary(exe, g, &net, "secondary", &[], "target", &[])?;
    let out = cli.join().map_err(|_| anyhow::anyhow!("the migrate thread panicked"))??;
    let total = t.elapsed();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("lockstep migrate failed: {said} {}", String::from_utf8_lossy(&out.stderr));
    }
    let a = pair.text("primary.err");
    let sent = a.lines().find(|l| l.contains("machine state in")).unwrap_or("").to_string();
    let switch = a.lines().find(|l| l.contains("handing over to the secondary")).is_some();
    println!("lockstep (idle guest, 512 MiB, its disk copied too):");
    println!("  the move, `lockstep migrate` to exit 0: {} ms ({said})", total.as_millis(), said = said.trim());
    println!(
        "  of which: the old secondary released {} ms, then the target's start, join and switchover",
        released.as_millis()
    );
    println!("  {}", sent.trim_start_matches("lockstep: "));
    let first = number_after(&sent, "the first round's start ").unwrap_or(f64::NAN);
    let step = number_after(&sent, "at most ").unwrap_or(f64::NAN);
    let last = number_after(&sent, "the last paused it ").unwrap_or(f64::NAN);
    println!(
        "  the guest stopped: {first:.0} ms (the first round's start) + steps of at most {step:.0} ms (its RAM) + \
         {last:.0} ms (last round) + the switchover{}",
        if switch { "" } else { " (not seen in the log)" }
    );
    Ok(())
}

/// One QMP command; returns its `return` value (events are skipped).
fn qmp(r: &mut BufReader<UnixStream>, w: &mut UnixStream, cmd: &str) -> Result<serde_json::Value> {
    writeln!(w, "{cmd}")?;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            bail!("QMP closed the connection");
        }
        let v: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("QMP said {line}"))?;
        if let Some(ret) = v.get("return") {
            return Ok(ret.clone());
        }
        if let Some(e) = v.get("error") {
            bail!("QMP: {cmd}: {e}");
        }
    }
}

fn qemu_migration(g: &lab::pair::GuestPaths, dir: &Path) -> Result<()> {
    let disk = dir.join("qemu.img");
    if !Command::new("cp").arg("--sparse=always").arg(&g.disk).arg(&disk).status()?.success() {
        bail!("cannot copy the disk for QEMU");
    }
    let append = format!("{} root=/dev/vda", crate::guest::DEFAULT_APPEND);
    let qemu = |extra: &[String]| {
        let mut c = Command::new("qemu-system-riscv64");
        c.args(["-M", "virt", "-bios", "default", "-nographic", "-m", "512M", "-nic", "none"]);
        c.arg("-kernel").arg(&g.kernel).arg("-initrd").arg(&g.initrd).args(["-append", &append]);
        c.arg("-drive").arg(format!("file={},format=raw,if=none,id=d0,file.locking=off", disk.display()));
        c.args(["-device", "virtio-blk-device,drive=d0", "-device", "virtio-rng-device"]);
        c.args(extra);
        c
    };
    let sock = dir.join("qmp.sock");
    let _ = std::fs::remove_file(&sock);
    let mut source =
        Captured::spawn(&mut qemu(&["-qmp".into(), format!("unix:{},server=on,wait=off", sock.display())]))?;
    source.wait_for(crate::guest::READY_LINE, 0, BOOT)?;
    let port = 4455;
    let _target = Captured::spawn(&mut qemu(&["-incoming".into(), format!("tcp:127.0.0.1:{port}")]))?;
    std::thread::sleep(Duration::from_millis(500));
    let mut w = UnixStream::connect(&sock).context("QEMU's QMP socket")?;
    let mut r = BufReader::new(w.try_clone()?);
    let mut greeting = String::new();
    r.read_line(&mut greeting)?;
    qmp(&mut r, &mut w, r#"{"execute":"qmp_capabilities"}"#)?;
    let t = Instant::now();
    qmp(&mut r, &mut w, &format!(r#"{{"execute":"migrate","arguments":{{"uri":"tcp:127.0.0.1:{port}"}}}}"#))?;
    let info = loop {
        let info = qmp(&mut r, &mut w, r#"{"execute":"query-migrate"}"#)?;
        match info["status"].as_str() {
            Some("completed") => break info,
            Some("failed") | Some("cancelled") => bail!("QEMU's migration failed: {info}"),
            _ if t.elapsed() > Duration::from_secs(300) => bail!("QEMU's migration did not end: {info}"),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    println!("QEMU TCG (idle guest, 512 MiB, shared disk: not copied):");
    println!(
        "  total {} ms, downtime {} ms, setup {} ms; RAM sent {} MB in {} passes",
        info["total-time"],
        info["downtime"],
        info["setup-time"],
        info["ram"]["transferred"].as_u64().unwrap_or(0) >> 20,
        info["ram"]["dirty-sync-count"]
    );
    Ok(())
}

pub fn migrate() -> Result<()> {
    let (exe, g, dir) = super::pair::setup("migrate")?;
    println!("one live migration of the default guest each, on this machine:");
    lockstep_migration(&exe, &g, &dir)?;
    qemu_migration(&g, &dir)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
