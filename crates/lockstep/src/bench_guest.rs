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

use anyhow::{anyhow, bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SUBNET: &str = "10.78.0";
const GUEST_IP: &str = "10.78.0.2";
const GUEST_MAC: &str = "52:54:00:4c:53:02";
const TIMEOUT: Duration = Duration::from_secs(300);

fn sh(cmd: &str) -> Result<String> {
    let out = Command::new("sh").arg("-c").arg(cmd).output().with_context(|| format!("cannot run `{cmd}`"))?;
    if !out.status.success() {
        bail!("`{cmd}` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Bridge, tap and veth in two fresh namespaces; removed on drop.
pub struct Topology {
    pub host: String,
    pub client: String,
}

impl Topology {
    pub fn new() -> Result<Topology> {
        let id = std::process::id();
        let t = Topology { host: format!("lsb-h-{id}"), client: format!("lsb-c-{id}") };
        let (h, c) = (&t.host, &t.client);
        sh(&format!("ip netns add {h} && ip netns add {c}"))?;
        sh(&format!(
            "ip -n {h} link set lo up && ip -n {h} link add br0 type bridge && ip -n {h} link set br0 up && \
             ip -n {h} tuntap add dev tap0 mode tap && ip -n {h} link set tap0 master br0 up && \
             ip -n {h} link add vh type veth peer name vc netns {c} && ip -n {h} link set vh master br0 up && \
             ip -n {c} link set lo up && ip -n {c} addr add {SUBNET}.1/24 dev vc && ip -n {c} link set vc up"
        ))?;
        Ok(t)
    }

    /// A command run inside the client namespace.
    pub fn client_cmd(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.client, prog]);
        c
    }

    /// Run `f` on a thread inside the client namespace.
    pub fn in_client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = format!("/var/run/netns/{}", self.client);
        std::thread::spawn(move || -> Result<T> {
            let ns = std::fs::File::open(&path)?;
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow!("client thread panicked"))?
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.host]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.client]).status();
    }
}

/// Which engine runs the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Lockstep,
    LockstepRecording,
    Qemu,
}

/// A running guest with its console.
pub struct Session {
    child: Child,
    stdin: ChildStdin,
    out: Arc<Mutex<Vec<u8>>>,
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
    pub fn start(topo: &Topology, engine: Engine, g: &GuestFiles, log: Option<&Path>) -> Result<Session> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &topo.host]);
        match engine {
            Engine::Lockstep | Engine::LockstepRecording => {
                cmd.arg(std::env::current_exe()?).arg("run").arg("--kernel").arg(&g.kernel);
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
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let out = Arc::new(Mutex::new(Vec::new()));
        for mut pipe in [
            Box::new(child.stdout.take().context("stdout")?) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().context("stderr")?),
        ] {
            let out = out.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    out.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
        let s = Session { child, stdin, out, seq: 0 };
        s.wait_for(crate::guest::READY_LINE, 0)?;
        Ok(s)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// Wait for `needle` to appear after byte `from`; returns where it ends.
    fn wait_for(&self, needle: &str, from: usize) -> Result<usize> {
        let t = Instant::now();
        loop {
            {
                let out = self.out.lock().unwrap();
                if let Some(i) = out[from.min(out.len())..].windows(needle.len()).position(|w| w == needle.as_bytes()) {
                    return Ok(from + i + needle.len());
                }
            }
            if t.elapsed() > TIMEOUT {
                bail!("timed out waiting for {needle:?}; console tail: {}", tail(&self.text()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Run a shell command in the guest; returns its output and the host
    /// time it took (send to end marker).
    pub fn run(&mut self, cmd: &str) -> Result<(String, f64)> {
        self.seq += 1;
        let mark = format!("LSDONE{}", self.seq);
        let start = self.out.lock().unwrap().len();
        let t = Instant::now();
        // The marker is built by the shell, so the echoed command line does
        // not match it.
        writeln!(self.stdin, "{cmd}; echo LSDONE$((0+{}))", self.seq)?;
        self.stdin.flush()?;
        let end =
            self.wait_for(&format!("{mark}\r\n"), start).or_else(|_| self.wait_for(&format!("{mark}\n"), start))?;
        let secs = t.elapsed().as_secs_f64();
        let out = self.out.lock().unwrap()[start..end].to_vec();
        Ok((String::from_utf8_lossy(&out).into_owned(), secs))
    }

    pub fn poweroff(mut self) -> Result<()> {
        writeln!(self.stdin, "poweroff")?;
        let t = Instant::now();
        loop {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            if t.elapsed() > TIMEOUT {
                let _ = self.child.kill();
                bail!("the guest did not power off");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(8)..].join(" | ")
}

/// Fresh copies of the guest (the disk sparse), in `dir`.
pub fn guest_copies(dir: &Path) -> Result<GuestFiles> {
    let g = crate::guest::build(false)?;
    std::fs::create_dir_all(dir)?;
    let disk = dir.join("rootfs.ext4");
    sh(&format!("cp --sparse=always '{}' '{}'", g.disk.display(), disk.display()))?;
    Ok(GuestFiles { kernel: g.kernel, initrd: g.initrd, disk })
}

/// Median of a sample.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// The first number before `unit` in `text` (e.g. "3.95 k iops").
pub fn number_before(text: &str, unit: &str) -> Option<f64> {
    let i = text.find(unit)?;
    let words: Vec<&str> = text[..i].split_whitespace().collect();
    let (num, scale) = match words.last()? {
        &"k" => (words.get(words.len() - 2)?, 1e3),
        &"M" => (words.get(words.len() - 2)?, 1e6),
        w => (w, 1.0),
    };
    num.parse::<f64>().ok().map(|n| n * scale)
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
pub fn measure(s: &mut Session, topo: &Topology) -> Result<DeviceFigures> {
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
        let mut c = topo.client_cmd("iperf3");
        c.args(["-c", GUEST_IP, "-t", "5", "-f", "m"]);
        if reverse {
            c.arg("-R");
        }
        let out = c.output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().find(|l| l.contains("receiver")).with_context(|| {
            format!("iperf3 said: {text}{}; guest: {}", String::from_utf8_lossy(&out.stderr), tail(&s.text()))
        })?;
        let mbits = number_before(line, "Mbits/sec").context("iperf3 rate")?;
        if reverse {
            f.net_from_guest_mbits = mbits;
        } else {
            f.net_to_guest_mbits = mbits;
        }
    }
    let out = topo.client_cmd("ping").args(["-c", "20", "-i", "0.05", "-q", GUEST_IP]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    f.ping_ms = text
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.split('/').nth(1))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("ping said: {text}"))?;
    f.redis_rtt_ms = topo.in_client(|| -> Result<f64> {
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
    let topo = Topology::new()?;
    let dir = std::env::temp_dir().join(format!("lockstep-bench-{}", std::process::id()));
    let mut results: Vec<(Engine, DeviceFigures)> = Vec::new();
    for rep in 0..reps {
        for engine in [Engine::Lockstep, Engine::Qemu] {
            let g = guest_copies(&dir)?;
            let mut s = Session::start(&topo, engine, &g, None)?;
            let f = measure(&mut s, &topo).with_context(|| format!("{engine:?}, run {}", rep + 1))?;
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
fn initramfs_run(g: &GuestFiles, script: &str, record: Option<&Path>) -> Result<(f64, f64)> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("run").arg("--kernel").arg(&g.kernel).arg("--initrd").arg(&g.initrd);
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

fn replay_secs(log: &Path, disk: Option<&Path>) -> Result<f64> {
    let t = Instant::now();
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("replay").arg(log);
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

/// `lockstep bench record`.
pub fn record(reps: usize) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("lockstep-bench-rec-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let g = guest_copies(&dir)?;
    let log = dir.join("bench.log");

    // CPU-bound: boot, count to 300 000 in the shell, power off.
    let cpu_script = "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; poweroff\n";
    let (mut plain, mut rec, mut rep, mut rate) = (vec![], vec![], vec![], vec![]);
    for _ in 0..reps {
        plain.push(initramfs_run(&g, cpu_script, None)?.0);
        let (secs, _) = initramfs_run(&g, cpu_script, Some(&log))?;
        rec.push(secs);
        rate.push(size(&log) / secs);
        rep.push(replay_secs(&log, None)?);
    }
    let (p, r) = (median(&mut plain), median(&mut rec));
    println!("recording overhead, {reps} runs each, alternating (medians)");
    println!("{:<28}{:>10}{:>10}{:>10}{:>14}{:>12}", "", "plain s", "record s", "overhead", "log bytes/s", "replay s");
    println!(
        "{:<28}{p:>10.2}{r:>10.2}{:>9.1}%{:>14.0}{:>12.2}",
        "CPU-bound (shell loop)",
        (r / p - 1.0) * 100.0,
        median(&mut rate),
        median(&mut rep)
    );

    // Idle: boot, sleep 10 s, power off; host CPU time is what matters.
    let idle_script = "sleep 10; poweroff\n";
    let (mut plain, mut rec, mut rate, mut wall) = (vec![], vec![], vec![], vec![]);
    for _ in 0..reps.min(3) {
        plain.push(initramfs_run(&g, idle_script, None)?.1);
        let (secs, cpu) = initramfs_run(&g, idle_script, Some(&log))?;
        rec.push(cpu);
        wall.push(secs);
        rate.push(size(&log) / secs);
    }
    let (p, r) = (median(&mut plain), median(&mut rec));
    println!(
        "{:<28}{p:>10.2}{r:>10.2}{:>9.1}%{:>14.0}{:>12}",
        "idle 10 s (host CPU s)",
        (r / p - 1.0) * 100.0,
        median(&mut rate),
        "-"
    );

    // Network-heavy: iperf3 host -> guest for 5 s on the root-disk guest.
    let topo = Topology::new()?;
    let (mut plain, mut rec, mut rate) = (vec![], vec![], vec![]);
    for _ in 0..reps.min(3) {
        for recording in [false, true] {
            let g = guest_copies(&dir)?;
            let engine = if recording { Engine::LockstepRecording } else { Engine::Lockstep };
            let t = Instant::now();
            let mut s = Session::start(&topo, engine, &g, Some(&log))?;
            s.run("iperf3 -s -D >/dev/null 2>&1; sleep 0.5")?;
            let out = topo.client_cmd("iperf3").args(["-c", GUEST_IP, "-t", "5", "-f", "m"]).output()?;
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
    drop(topo);

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
    let m = machine::Machine::new_firmware(512 << 20);
    let t = Instant::now();
    let n = 5;
    for _ in 0..n {
        std::hint::black_box(m.state_hash());
    }
    println!("state hash of a 512 MiB machine: {:.1} ms", t.elapsed().as_secs_f64() * 1e3 / n as f64);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
