//! `bench work`: a fixed CPU-heavy userspace workload in the default guest,
//! run by lockstep with each engine and by QEMU TCG, alternating; and the
//! same script under `qemu-riscv64` (user mode, the guest's static
//! busybox) and natively (the host's busybox), when those exist.
//!
//! The workload is busybox in a tmpfs: awk generates 100,000 numbered
//! lines from a linear congruential generator (exact in doubles, so every
//! platform computes the same digits), then sort, gzip, bzip2, an awk
//! aggregate, 300 fork+execs of `true`, and a sha256 over everything: the
//! digest printed at the end must be the same everywhere.

use super::guest::{guest_copies, Engine, Session};
use anyhow::{bail, Context, Result};
use lab::netns::GuestNet;
use lab::stats::median;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const SUBNET: &str = "10.79.0";

/// The workload, for busybox `sh` with its applets on PATH, in directory
/// `$W`. Prints one line: `digest <sha256>`.
const SCRIPT: &str = r#"cd "$W" &&
awk 'BEGIN { x = 1; for (i = 0; i < 100000; i++) { x = (x * 69069 + 1) % 4294967296; print x, i, x % 1000 } }' > d.txt &&
sort -n d.txt > s.txt &&
sort -k3,3n -k1,1n d.txt > t.txt &&
gzip -6 -c s.txt > s.gz &&
bzip2 -9 -c t.txt > t.bz2 &&
awk '{ n[$3 % 17]++; s[$3 % 17] += $1 } END { for (k = 0; k < 17; k++) print k, n[k], s[k] }' d.txt > a.txt &&
i=0 && while [ $i -lt 300 ]; do true; /bin/true; i=$((i + 1)); done &&
echo digest $(cat s.gz t.bz2 a.txt | sha256sum | cut -c1-64)"#;

/// Guest-side: run the script in a fresh tmpfs, timed by the guest's own
/// clock too (the host's figure includes the console round trip).
fn guest_command() -> String {
    format!("mkdir -p /w && mount -t tmpfs tmpfs /w && W=/w; {}; umount /w", SCRIPT.replace('\n', " "))
}

fn digest_of(out: &str) -> Option<String> {
    out.lines().rev().find_map(|l| l.trim().strip_prefix("digest ").map(|d| d.trim().to_string()))
}

/// The script under `runner` (e.g. `qemu-riscv64`) with `busybox` as the
/// shell and applets, in a temporary directory; (seconds, digest).
fn host_run(runner: Option<&Path>, busybox: &Path, dir: &Path) -> Result<(f64, String)> {
    let w = dir.join("w");
    let _ = std::fs::remove_dir_all(&w);
    std::fs::create_dir_all(&w)?;
    // PATH holds one entry per applet. Natively that is a link to busybox;
    // under user-mode emulation a host script that starts the emulator
    // again, since an applet busybox execs is a riscv64 binary the host
    // kernel cannot run (no binfmt registration is assumed).
    let bin = dir.join("bin");
    if !bin.exists() {
        std::fs::create_dir_all(&bin)?;
        for applet in ["sh", "awk", "sort", "gzip", "bzip2", "sha256sum", "cut", "cat", "true", "echo", "mkdir"] {
            match runner {
                None => std::os::unix::fs::symlink(busybox, bin.join(applet))?,
                Some(r) => {
                    let script = format!("#!/bin/sh\nexec '{}' '{}' {applet} \"$@\"\n", r.display(), busybox.display());
                    let path = bin.join(applet);
                    std::fs::write(&path, script)?;
                    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
                }
            }
        }
    }
    let script = SCRIPT.replace("/bin/true", &bin.join("true").display().to_string());
    let mut cmd = match runner {
        Some(r) => {
            let mut c = Command::new(r);
            c.arg(busybox);
            c
        }
        None => Command::new(busybox),
    };
    cmd.args(["sh", "-c", &script]).env("W", &w).env("PATH", &bin);
    let t = Instant::now();
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let secs = t.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    let digest = digest_of(&text)
        .with_context(|| format!("{cmd:?} printed no digest: {text}{}", String::from_utf8_lossy(&out.stderr)))?;
    Ok((secs, digest))
}

/// The guest's static busybox (from the guest's package cache), unpacked.
fn riscv_busybox(dir: &Path) -> Option<PathBuf> {
    let debs = crate::guest::cache_dir().ok()?.join("debs");
    let deb = std::fs::read_dir(&debs)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("busybox-static_")))?;
    let root = dir.join("bb-riscv64");
    let ok = Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root).status().ok()?.success();
    let bb = root.join("usr/bin/busybox");
    (ok && bb.exists()).then_some(bb)
}

pub fn work(reps: usize) -> Result<()> {
    let net = GuestNet::new(&format!("w{}", std::process::id()), SUBNET)?;
    let dir = std::env::temp_dir().join(format!("lockstep-bench-work-{}", std::process::id()));
    let engines = [Engine::LockstepInterp, Engine::Lockstep, Engine::Qemu];
    let mut secs: Vec<Vec<f64>> = vec![Vec::new(); engines.len()];
    let mut digest: Option<String> = None;
    let mut check = |who: &str, d: String| -> Result<()> {
        match &digest {
            Some(first) if *first != d => bail!("{who} computed digest {d}, not {first}: the engines disagree"),
            _ => digest = Some(d),
        }
        Ok(())
    };
    for rep in 0..reps {
        for (e, &engine) in engines.iter().enumerate() {
            let g = guest_copies(&dir)?;
            let mut s = Session::start(&net, engine, &g, None)?;
            let (out, t) = s.run(&guest_command()).with_context(|| format!("{engine:?}, run {}", rep + 1))?;
            s.poweroff()?;
            let d = digest_of(&out).with_context(|| format!("{engine:?} printed no digest: {out}"))?;
            check(&format!("{engine:?}"), d)?;
            secs[e].push(t);
        }
    }
    // User mode and native, where they exist: same script, same digest.
    let mut user = Vec::new();
    let mut native = Vec::new();
    let bb = riscv_busybox(&dir);
    let host_bb = which("busybox");
    for _ in 0..reps {
        if let Some(bb) = &bb {
            // By full path: the command's own PATH is the applets'.
            if let Some(qemu) = which("qemu-riscv64") {
                let (t, d) = host_run(Some(&qemu), bb, &dir.join("user"))?;
                check("qemu-riscv64", d)?;
                user.push(t);
            }
        }
        if let Some(hb) = &host_bb {
            let (t, d) = host_run(None, hb, &dir.join("native"))?;
            check("native busybox", d)?;
            native.push(t);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let qemu = median(&mut secs[2].clone());
    println!("a busybox workload in a tmpfs (awk, sort, gzip, bzip2, 600 fork+execs, sha256), {reps} runs each,");
    println!("alternating; digest {} everywhere (median seconds, ratio to QEMU TCG)", digest.unwrap_or_default());
    let row = |name: &str, v: &mut Vec<f64>| {
        if v.is_empty() {
            println!("{name:34} {:>8}", "n/a");
        } else {
            let m = median(v);
            println!("{name:34} {m:8.2} {:8.2}x", m / qemu);
        }
    };
    row("lockstep, interp", &mut secs[0]);
    row("lockstep, jit", &mut secs[1]);
    row("qemu-system-riscv64 (TCG)", &mut secs[2]);
    row("qemu-riscv64 (user mode)", &mut user);
    row("native (host busybox)", &mut native);
    Ok(())
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(program)).find(|p| p.is_file())
}
