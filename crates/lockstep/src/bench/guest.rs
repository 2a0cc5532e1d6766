//! Benchmarks that boot the default Debian guest (root disk, network) and
//! measure it from the outside, side by side with QEMU or with itself:
//!
//! - `bench devices`: disk sequential write/read MB/s and 4 KiB random-read
//!   IOPS (ioping) inside the guest; network throughput both ways (iperf3),
//!   ping RTT and a redis PING round trip from a client namespace. lockstep
//!   and `qemu-system-riscv64` (TCG) alternate on the same guest files.
//! - `bench record`: the cost of recording (CPU-bound, idle and network-heavy
//!   guests), log bytes per second, replay speed, snapshot size and time,
//!   state-hash time.
//!
//! Everything runs in network namespaces the benchmark creates and removes
//! (a bridge, a tap for the guest, a veth to a client namespace). Needs root.

use anyhow::{bail, Context, Result};
use lab::capture::Captured;
use lab::netns::{sh, GuestNet};
use lab::stats::{median, number_before};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SUBNET: &str = "10.78.0";
const GUEST_IP: &str = "10.78.0.2";
const GUEST_MAC: &str = "52:54:00:4c:53:02";
const TIMEOUT: Duration = Duration::from_secs(300);

/// Which engine runs the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// lockstep with its default engine (the translation tier on x86-64).
    Lockstep,
    /// lockstep with `--engine interp`.
    LockstepInterp,
    LockstepRecording,
    Qemu,
}

/// A running guest with its console.
pub struct Session {
    console: Captured,
    seq: u32,
}

/// The guest files, copied so runs never change the cached guest.
pub struct GuestFiles {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub disk: PathBuf,
}

pub fn append() -> String {
    format!("{} root=/dev/vda lockstep.ip={GUEST_IP}/24", crate::guest::DEFAULT_APPEND)
}

impl Session {
    pub fn start(net: &GuestNet, engine: Engine, g: &GuestFiles, log: Option<&Path>) -> Result<Session> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &net.host]);
        match engine {
            Engine::Lockstep | Engine::LockstepInterp | Engine::LockstepRecording => {
                cmd.arg(std::env::current_exe()?).arg("run").arg("--kernel").arg(&g.kernel);
                if engine == Engine::LockstepInterp {
                    cmd.args(["--engine", "interp"]);
                }
                cmd.arg("--initrd").arg(&g.initrd).arg("--disk").arg(&g.disk);
                cmd.args(["--net", "tap:tap0", "--mac", GUEST_MAC, "--mem", "512M", "--append", &append()]);
                if engine == Engine::LockstepRecording {
                    cmd.arg("--record").arg(log.context("recording needs a log path")?);
                }
            }
            Engine::Qemu => {
                cmd.args(["qemu-system-riscv64", "-M", "virt", "-bios", "default", "-nographic", "-m", "512M"]);
                cmd.arg("-kernel").arg(&g.kernel).arg("-initrd").arg(&g.initrd);
                cmd.arg("-drive").arg(format!("file={},format=raw,if=none,id=d0", g.disk.display()));
                cmd.args(["-device", "virtio-blk-device,drive=d0"]);
                cmd.args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"]);
                cmd.args(["-device", &format!("virtio-net-device,netdev=n0,mac={GUEST_MAC}")]);
                cmd.args(["-device", "virtio-rng-device", "-append", &append()]);
            }
        }
        let mut console = Captured::spawn(&mut cmd)?;
        console.wait_for(crate::guest::READY_LINE, 0, TIMEOUT)?;
        Ok(Session { console, seq: 0 })
    }

    /// Run a shell command in the guest; returns its output and the host
    /// time it took (send to end marker).
    pub fn run(&mut self, cmd: &str) -> Result<(String, f64)> {
        self.seq += 1;
        // The dot ends the number: LSDONE1. is not a prefix of LSDONE10.
        let mark = format!("LSDONE{}.", self.seq);
        let start = self.console.len();
        let t = Instant::now();
        // The marker is built by the shell, so the echoed command line does
        // not match it.
        self.console.send(&format!("{cmd}; echo LSDONE$((0+{})).", self.seq))?;
        let end = self.console.wait_for(&mark, start, TIMEOUT)?;
        let secs = t.elapsed().as_secs_f64();
        let out = self.console.all.lock().unwrap()[start..end].to_vec();
        Ok((String::from_utf8_lossy(&out).into_owned(), secs))
    }

    /// The console's last lines, for an error message.
    fn tail(&self) -> String {
        let text = self.console.text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join(" | ")
    }

    pub fn poweroff(mut self) -> Result<()> {
        self.console.send("poweroff")?;
        self.console.wait_exit(TIMEOUT).map(drop)
    }
}

/// Fresh copies of the guest (the disk sparse), in `dir`.
pub fn guest_copies(dir: &Path) -> Result<GuestFiles> {
    let g = crate::guest::build(false)?;
    std::fs::create_dir_all(dir)?;
    let disk = dir.join("rootfs.ext4");
    sh(&format!("cp --sparse=always '{}' '{}'", g.disk.display(), disk.display()))?;
    Ok(GuestFiles { kernel: g.kernel, initrd: g.initrd, disk })
}

/// One engine's figures.
#[derive(Default, Clone)]
pub struct DeviceFigures {
    pub disk_write_mbs: f64,
    pub disk_read_mbs: f64,
    pub rand_read_iops: f64,
    pub net_to_guest_mbits: f64,
    pub net_from_guest_mbits: f64,
    pub ping_ms: f64,
    pub redis_rtt_ms: f64,
}

const DISK_MB: u64 = 64;

/// Measure disk and network figures on a booted guest.
pub fn measure(s: &mut Session, net: &GuestNet) -> Result<DeviceFigures> {
    let mut f = DeviceFigures::default();
    let (_, secs) =
        s.run(&format!("dd if=/dev/zero of=/root/bench.bin bs=1M count={DISK_MB} conv=fsync 2>/dev/null"))?;
    f.disk_write_mbs = DISK_MB as f64 * 1.048_576 / secs;
    let (_, secs) =
        s.run("sync; echo 3 > /proc/sys/vm/drop_caches; dd if=/root/bench.bin of=/dev/null bs=1M 2>/dev/null")?;
    f.disk_read_mbs = DISK_MB as f64 * 1.048_576 / secs;
    let (out, _) = s.run("ioping -R -D -q -w 3 /root/ 2>&1")?;
    f.rand_read_iops = out
        .lines()
        .find(|l| l.contains("requests completed"))
        .and_then(|l| number_before(l, "iops"))
        .with_context(|| format!("ioping said: {out}"))?;
    s.run("rm -f /root/bench.bin; iperf3 -s -D >/dev/null 2>&1; sleep 0.5")?;
    for reverse in [false, true] {
        // The server takes one test at a time: let it finish the last one.
        std::thread::sleep(Duration::from_secs(1));
        let mut c = net.client_cmd("iperf3");
        c.args(["-c", GUEST_IP, "-t", "5", "-f", "m"]);
        if reverse {
            c.arg("-R");
        }
        let out = c.output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().find(|l| l.contains("receiver")).with_context(|| {
            format!("iperf3 said: {text}{}; guest: {}", String::from_utf8_lossy(&out.stderr), s.tail())
        })?;
        let mbits = number_before(line, "Mbits/sec").context("iperf3 rate")?;
        if reverse {
            f.net_from_guest_mbits = mbits;
        } else {
            f.net_to_guest_mbits = mbits;
        }
    }
    let out = net.client_cmd("ping").args(["-c", "20", "-i", "0.05", "-q", GUEST_IP]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    f.ping_ms = text
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.split('/').nth(1))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("ping said: {text}"))?;
    f.redis_rtt_ms = net.in_client(|| -> Result<f64> {
        let s = TcpStream::connect_timeout(&format!("{GUEST_IP}:6379").parse()?, Duration::from_secs(10))?;
        s.set_nodelay(true)?;
        let mut r = BufReader::new(s);
        let n = 300;
        let t = Instant::now();
        let mut line = String::new();
        for _ in 0..n {
            r.get_mut().write_all(b"*1\r\n$4\r\nPING\r\n")?;
            line.clear();
            r.read_line(&mut line)?;
            if !line.starts_with("+PONG") {
                bail!("redis said {line:?}");
            }
        }
        Ok(t.elapsed().as_secs_f64() * 1e3 / n as f64)
    })??;
    Ok(f)
}

/// `lockstep bench devices`.
pub fn devices(reps: usize) -> Result<()> {
    let net = GuestNet::new(&std::process::id().to_string(), SUBNET)?;
    let dir = std::env::temp_dir().join(format!("lockstep-bench-{}", std::process::id()));
    let mut results: Vec<(Engine, DeviceFigures)> = Vec::new();
    for rep in 0..reps {
        for engine in [Engine::Lockstep, Engine::Qemu] {
            let g = guest_copies(&dir)?;
            let mut s = Session::start(&net, engine, &g, None)?;
            let f = measure(&mut s, &net).with_context(|| format!("{engine:?}, run {}", rep + 1))?;
            s.poweroff()?;
            results.push((engine, f));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    type Pick = fn(&DeviceFigures) -> f64;
    let rows: [(&str, Pick, bool); 7] = [
        ("disk sequential write (MB/s)", |f| f.disk_write_mbs, true),
        ("disk sequential read (MB/s)", |f| f.disk_read_mbs, true),
        ("disk 4k random read (IOPS)", |f| f.rand_read_iops, true),
        ("net host->guest (Mbit/s)", |f| f.net_to_guest_mbits, true),
        ("net guest->host (Mbit/s)", |f| f.net_from_guest_mbits, true),
        ("ping RTT (ms)", |f| f.ping_ms, false),
        ("redis PING round trip (ms)", |f| f.redis_rtt_ms, false),
    ];
    println!("default guest, root on virtio-blk, virtio-net on a tap, {reps} runs each, alternating (medians)");
    println!("{:<32}{:>12}{:>12}{:>18}", "", "lockstep", "qemu (TCG)", "lockstep vs qemu");
    for (name, pick, higher_better) in rows {
        let mut ours: Vec<f64> = results.iter().filter(|r| r.0 == Engine::Lockstep).map(|r| pick(&r.1)).collect();
        let mut qemu: Vec<f64> = results.iter().filter(|r| r.0 == Engine::Qemu).map(|r| pick(&r.1)).collect();
        let (a, b) = (median(&mut ours), median(&mut qemu));
        // The factor by which lockstep is worse (>1) or better (<1).
        let gap = if higher_better { b / a } else { a / b };
        println!("{name:<32}{a:>12.2}{b:>12.2}{:>17.2}x", gap);
    }
    println!("(last column: how many times worse lockstep is; below 1.00 it is better)");
    Ok(())
}

/// Host CPU seconds used by finished children so far.
fn children_cpu() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    match getrusage(UsageWho::RUSAGE_CHILDREN) {
        Ok(u) => {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        }
        Err(_) => f64::NAN,
    }
}

/// Run the initramfs guest with `script` typed on its console; returns
/// (wall seconds, host CPU seconds).
fn initramfs_run(g: &GuestFiles, script: &str, record: Option<&Path>, engine: rv::Engine) -> Result<(f64, f64)> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("run").arg("--kernel").arg(&g.kernel).arg("--initrd").arg(&g.initrd);
    cmd.args(["--engine", engine.name()]);
    cmd.args(["--mem", "512M", "--append", crate::guest::DEFAULT_APPEND]);
    if let Some(log) = record {
        cmd.arg("--record").arg(log);
    }
    let cpu0 = children_cpu();
    let t = Instant::now();
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    child.stdin.take().context("stdin")?.write_all(script.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("the guest run failed ({status})");
    }
    Ok((t.elapsed().as_secs_f64(), children_cpu() - cpu0))
}

fn replay_secs(log: &Path, disk: Option<&Path>, engine: rv::Engine) -> Result<f64> {
    let t = Instant::now();
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("replay").arg(log).args(["--engine", engine.name()]);
    if let Some(d) = disk {
        cmd.arg("--disk").arg(d);
    }
    let out = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).output()?;
    if !out.status.success() {
        bail!("replay failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(t.elapsed().as_secs_f64())
}

fn size(p: &Path) -> f64 {
    std::fs::metadata(p).map(|m| m.len() as f64).unwrap_or(f64::NAN)
}

/// One row of `bench record`'s overhead table: plain and recorded figures,
/// the overhead between them, the log rate, and the replay column.
fn print_overhead_row(label: &str, plain: f64, recorded: f64, log_rate: f64, replay: &str) {
    let overhead = (recorded / plain - 1.0) * 100.0;
    println!("{label:<34}{plain:>10.2}{recorded:>10.2}{overhead:>9.1}%{log_rate:>14.0}{replay:>12}");
}

/// `lockstep bench record`: the CPU-bound and idle cases with each of
/// `engines` (side by side, alternating), the rest with the first.
pub fn record(reps: usize, engines: &[rv::Engine]) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("lockstep-bench-rec-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let g = guest_copies(&dir)?;
    let log = dir.join("bench.log");

    // CPU-bound: boot, count to 300 000 in the shell, power off.
    let cpu_script = "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; poweroff\n";
    let mut figures = vec![(vec![], vec![], vec![], vec![]); engines.len()];
    for _ in 0..reps {
        for (&engine, (plain, rec, rep, rate)) in engines.iter().zip(&mut figures) {
            plain.push(initramfs_run(&g, cpu_script, None, engine)?.0);
            let (secs, _) = initramfs_run(&g, cpu_script, Some(&log), engine)?;
            rec.push(secs);
            rate.push(size(&log) / secs);
            rep.push(replay_secs(&log, None, engine)?);
        }
    }
    println!("recording overhead, {reps} runs each, alternating (medians)");
    println!("{:<34}{:>10}{:>10}{:>10}{:>14}{:>12}", "", "plain s", "record s", "overhead", "log bytes/s", "replay s");
    for (engine, (plain, rec, rep, rate)) in engines.iter().zip(&mut figures) {
        let label = format!("CPU-bound (shell loop), {}", engine.name());
        print_overhead_row(&label, median(plain), median(rec), median(rate), &format!("{:.2}", median(rep)));
    }

    // Idle: boot, sleep 10 s, power off; host CPU time is what matters.
    let idle_script = "sleep 10; poweroff\n";
    let mut figures = vec![(vec![], vec![], vec![]); engines.len()];
    for _ in 0..reps.min(3) {
        for (&engine, (plain, rec, rate)) in engines.iter().zip(&mut figures) {
            plain.push(initramfs_run(&g, idle_script, None, engine)?.1);
            let (secs, cpu) = initramfs_run(&g, idle_script, Some(&log), engine)?;
            rec.push(cpu);
            rate.push(size(&log) / secs);
        }
    }
    for (engine, (plain, rec, rate)) in engines.iter().zip(&mut figures) {
        let label = format!("idle 10 s (host CPU s), {}", engine.name());
        print_overhead_row(&label, median(plain), median(rec), median(rate), "-");
    }

    // Network-heavy: iperf3 host -> guest for 5 s on the root-disk guest.
    let net = GuestNet::new(&std::process::id().to_string(), SUBNET)?;
    let (mut plain, mut rec, mut rate) = (vec![], vec![], vec![]);
    for _ in 0..reps.min(3) {
        for recording in [false, true] {
            let g = guest_copies(&dir)?;
            let engine = if recording { Engine::LockstepRecording } else { Engine::Lockstep };
            let t = Instant::now();
            let mut s = Session::start(&net, engine, &g, Some(&log))?;
            s.run("iperf3 -s -D >/dev/null 2>&1; sleep 0.5")?;
            let out = net.client_cmd("iperf3").args(["-c", GUEST_IP, "-t", "5", "-f", "m"]).output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text.lines().find(|l| l.contains("receiver")).with_context(|| format!("iperf3: {text}"))?;
            let mbits = number_before(line, "Mbits/sec").context("iperf3 rate")?;
            s.poweroff()?;
            if recording {
                rec.push(mbits);
                rate.push(size(&log) * 8.0 / 1e6 / t.elapsed().as_secs_f64());
            } else {
                plain.push(mbits);
            }
        }
    }
    let (p, r) = (median(&mut plain), median(&mut rec));
    println!(
        "{:<28}{p:>10.1}{r:>10.1}{:>9.1}%{:>11.1} Mb/s{:>10}",
        "net-heavy (iperf3 Mbit/s)",
        (p / r - 1.0) * 100.0,
        median(&mut rate),
        "-"
    );
    drop(net);

    // Snapshots of a 512 MiB guest, and the state hash.
    let g = guest_copies(&dir)?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("run").arg("--kernel").arg(&g.kernel).arg("--initrd").arg(&g.initrd).arg("--disk").arg(&g.disk);
    cmd.args(["--mem", "512M", "--append", &format!("{} root=/dev/vda", crate::guest::DEFAULT_APPEND)]);
    cmd.arg("--record").arg(&log).args(["--snapshot-every", "1000000000"]);
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    child.stdin.take().context("stdin")?.write_all(b"sleep 3; poweroff\n")?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stderr);
    println!("snapshots of the 512 MiB root-disk guest every 1 G positions (kind, bytes, ms):");
    for l in text.lines().filter(|l| l.starts_with("snapshot ")) {
        let w: Vec<&str> = l.split_whitespace().collect();
        println!("  at {:>12}  {:<5} {:>11} bytes {:>5} ms", w[1], w[2], w[3], w[5]);
    }
    state_hash_figures();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The state hash of a 512 MiB machine: the first (every page), then
/// incremental ones after writing 0, 1,000 and 10,000 pages.
pub fn state_hash_figures() {
    let mut m = machine::Machine::new_firmware(512 << 20);
    let t = Instant::now();
    std::hint::black_box(m.state_hash());
    println!("state hash of a 512 MiB machine, first (every page): {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    let base = m.board.ram.base();
    for dirty in [0u64, 1_000, 10_000] {
        let mut times = Vec::new();
        for round in 0..5u64 {
            for p in 0..dirty {
                m.board.ram.write(base + ((p * 7 + round) % 131_072) * 4096, &[round as u8 + 1]);
            }
            let t = Instant::now();
            std::hint::black_box(m.state_hash());
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        println!("  incremental, {dirty:>6} pages written since the last: {:.3} ms (median of 5)", median(&mut times));
    }
    // A joining secondary's first copy: a full snapshot, taken with the
    // guest stopped. A quarter of the pages hold data (as the default
    // guest's 512 MiB after boot and some redis work: ~90 MB).
    for p in (0..131_072u64).step_by(4) {
        m.board.ram.write(base + p * 4096 + 4095, &[1]);
    }
    let ram = m.board.ram.bytes();
    let (mut bytewise, mut blocks) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        let n = ram.chunks_exact(4096).filter(|pg| pg.iter().any(|&b| b != 0)).count();
        bytewise.push((t.elapsed().as_secs_f64() * 1e3, n));
        let t = Instant::now();
        let n = ram.chunks_exact(4096).filter(|pg| !machine::snapshot::is_zero(pg)).count();
        blocks.push((t.elapsed().as_secs_f64() * 1e3, n));
    }
    let med = |v: &[(f64, usize)]| median(&mut v.iter().map(|x| x.0).collect::<Vec<_>>());
    println!(
        "zero-page scan of 512 MiB (a quarter of the pages non-zero), median of 5, alternating: byte by byte {:.1} ms, \
         by 64-byte blocks {:.1} ms",
        med(&bytewise),
        med(&blocks)
    );
    let mut full = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        std::hint::black_box(m.snapshot(None).map(|s| s.pages.len()).unwrap_or(0));
        full.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!("full snapshot of that machine (a join's first pause): {:.1} ms (median of 5)", median(&mut full));
}
