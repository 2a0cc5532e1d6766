//! `bench pair`: the fault-tolerant pair against the same guest running
//! alone, side by side in one run (alternating), on this machine.
//!
//! - CPU-bound: a Lua loop inside the guest's redis (`EVAL`), timed from
//!   the client: FT/solo throughput.
//! - Request/response: redis `PING` round trips on one connection:
//!   FT/solo throughput and the latency the output rule adds.
//! - Bulk network into the guest: iperf3 from the client for 10 s, FT/solo
//!   throughput and the log bandwidth it takes.
//! - Log bandwidth, backup lag and output hold time from the primary's
//!   status endpoint.
//! - Failover: SIGKILL of the primary under the numbered-write client, time
//!   to the client's next acknowledged write, over `--kills` fresh pairs
//!   on each of two guest networks, alternating: a learning switch, and one
//!   that delivers the guest's frames to both sides (the input mirror).

use anyhow::{anyhow, bail, Context, Result};
use lab::netns::in_netns;
use lab::pair::{start_solo, type_line, Client, GuestPaths, Pair};
use lab::pairnet::PairNet;
use lab::stats::{median, number_before, pin_to_cpu, ThreadTime};
use lab::workload::{Redis, Reply};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const LUA: &str = "local x = 0 for i = 1, 3000000 do x = x + i % 7 end return x";
/// Long enough (about 5 s) that one slow stretch of the host does not
/// decide a run's figure.
const PINGS: usize = 10_000;
/// The two guest networks kills are timed on (see `PairNet::mirror_guest_frames`).
const NETWORKS: [&str; 2] = ["learning switch", "mirroring network"];
/// Typed on the guest's console to start the iperf3 server.
const IPERF_SERVER: &str = "iperf3 -s -D >/dev/null 2>&1";

#[derive(Clone, Default)]
struct Figures {
    cpu_secs: f64,
    ops_per_sec: f64,
    median_us: f64,
    p99_us: f64,
    log_bytes_per_sec: f64,
    lag_ms: f64,
    /// Time the primary waited for a lagging secondary during the
    /// CPU-bound workload.
    cpu_throttled_ms: f64,
    hold_us: f64,
    bulk_mbits: f64,
    bulk_log_mbits: f64,
    /// Host CPU time per PING, µs: the VM's process (solo or primary),
    /// then the secondary's (NaN alone).
    ping_cpu_us: [f64; 2],
    /// Host CPU time per Gbit the guest received, s: as `ping_cpu_us`.
    bulk_cpu_s_per_gbit: [f64; 2],
    /// Per PING, by thread name: µs on a CPU and µs runnable but waiting
    /// for one, and times put on a CPU; the processes as in `ping_cpu_us`.
    ping_threads: [BTreeMap<String, ThreadTime>; 2],
    /// Per Lua loop (the CPU-bound workload), ms, as `ping_threads`.
    cpu_threads: [BTreeMap<String, ThreadTime>; 2],
}

/// Each process's threads' times so far (empty for a process that is gone).
fn thread_times(pids: &[u32]) -> [BTreeMap<String, ThreadTime>; 2] {
    let mut v: [BTreeMap<String, ThreadTime>; 2] = Default::default();
    for (slot, pid) in v.iter_mut().zip(pids) {
        *slot = lab::stats::thread_times(*pid).unwrap_or_default();
    }
    v
}

/// Thread times between two readings, per one of `count` requests or
/// loops: times in `unit`s of a second (1e6: µs), times put on a CPU as
/// they are (threads that started or ended between the readings count
/// from or to zero).
fn thread_times_per(
    before: &[BTreeMap<String, ThreadTime>; 2],
    after: [BTreeMap<String, ThreadTime>; 2],
    count: f64,
    unit: f64,
) -> [BTreeMap<String, ThreadTime>; 2] {
    let mut out: [BTreeMap<String, ThreadTime>; 2] = Default::default();
    for ((out, before), after) in out.iter_mut().zip(before).zip(&after) {
        for (name, t) in after {
            let b = before.get(name).copied().unwrap_or_default();
            let d = ThreadTime {
                cpu_secs: (t.cpu_secs - b.cpu_secs).max(0.0) * unit / count,
                wait_secs: (t.wait_secs - b.wait_secs).max(0.0) * unit / count,
                slices: (t.slices - b.slices).max(0.0) / count,
            };
            out.insert(name.clone(), d);
        }
    }
    out
}

/// How long `bulk_in` runs iperf3, seconds.
const BULK_SECS: f64 = 10.0;

/// CPU seconds each process has used so far (NaN for a process that is
/// gone or none: the figure is then NaN, not an error).
fn cpu_secs(pids: &[u32]) -> [f64; 2] {
    let mut v = [f64::NAN; 2];
    for (slot, pid) in v.iter_mut().zip(pids) {
        *slot = lab::stats::process_cpu_secs(*pid).unwrap_or(f64::NAN);
    }
    v
}

/// CPU used between two readings, divided by `per`.
fn cpu_per(before: [f64; 2], after: [f64; 2], per: f64) -> [f64; 2] {
    [(after[0] - before[0]) / per, (after[1] - before[1]) / per]
}

/// Slow the guest's redis background work (its `serverCron`) from 10 to
/// 1 run a second. Idle, that work is almost all a booted guest does: it
/// costs 15-18 % of a host CPU with the interpreter, 5-8 % with the tier,
/// and 2 % at 1 Hz; `bench pair --interleave` keeps several VMs idle
/// beside the one it measures.
fn client_quiet(addr: String) -> Result<(), String> {
    let mut r = Redis::connect(&addr, Duration::from_secs(60)).map_err(|e| e.to_string())?;
    match r.command(&[b"CONFIG", b"SET", b"hz", b"1"]).map_err(|e| e.to_string())? {
        Reply::Simple(s) if s == "OK" => Ok(()),
        other => Err(format!("CONFIG SET hz 1 answered {other:?}")),
    }
}

/// The CPU-bound figure: the median of three `EVAL`s of [`LUA`], seconds.
fn client_cpu(addr: String) -> Result<f64, String> {
    let mut r = Redis::connect(&addr, Duration::from_secs(60)).map_err(|e| e.to_string())?;
    let mut cpu = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        match r.command(&[b"EVAL", LUA.as_bytes(), b"0"]).map_err(|e| e.to_string())? {
            Reply::Int(_) => cpu.push(t.elapsed().as_secs_f64()),
            other => return Err(format!("EVAL answered {other:?}")),
        }
    }
    Ok(median(&mut cpu))
}

/// The request/response figures: `PING`s per second, median and p99
/// latency in microseconds.
fn client_ping(addr: String) -> Result<(f64, f64, f64), String> {
    let mut r = Redis::connect(&addr, Duration::from_secs(60)).map_err(|e| e.to_string())?;
    let mut lat = Vec::with_capacity(PINGS);
    let t = Instant::now();
    for _ in 0..PINGS {
        let t1 = Instant::now();
        match r.command(&[b"PING"]).map_err(|e| e.to_string())? {
            Reply::Simple(s) if s == "PONG" => lat.push(t1.elapsed().as_secs_f64() * 1e6),
            other => return Err(format!("PING answered {other:?}")),
        }
    }
    let ops = PINGS as f64 / t.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p99 = lat[lat.len() * 99 / 100];
    Ok((ops, median(&mut lat), p99))
}

fn primary_status(net: &PairNet) -> Result<ft::Status> {
    in_netns(&net.primary, || crate::host::status::fetch("127.0.0.1:9540"))
        .join()
        .map_err(|_| anyhow!("status thread panicked"))??
}

/// iperf3 from the client into the guest for [`BULK_SECS`] (the guest's
/// server was started on its console); Mbit/s at the receiver.
fn bulk_in(net: &PairNet) -> Result<f64> {
    let out = lab::netns::exec(&net.client, "iperf3")
        .args(["-c", &net.guest_ip(), "-t", &BULK_SECS.to_string(), "-f", "m"])
        .output()
        .context("cannot run iperf3 (bash scripts/test-deps.sh installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("receiver"))
        .with_context(|| format!("iperf3 said: {text}{}", String::from_utf8_lossy(&out.stderr)))?;
    number_before(line, "Mbits/sec").context("iperf3 rate")
}

/// Run `client` in the client's namespace against the guest's redis.
fn in_client<T: Send + 'static>(net: &PairNet, client: fn(String) -> Result<T, String>) -> Result<T> {
    let addr = format!("{}:6379", net.guest_ip());
    in_netns(&net.client, move || client(addr))
        .join()
        .map_err(|_| anyhow!("client thread panicked"))??
        .map_err(|e| anyhow!("client: {e}"))
}

/// A VM under measurement: its network, whether it is a pair, and its
/// processes (the solo run's, or the primary's and the secondary's).
struct Subject<'a> {
    net: &'a PairNet,
    paired: bool,
    pids: Vec<u32>,
}

impl Subject<'_> {
    /// The primary's status and when it was read (`None` alone).
    fn status(&self) -> Result<Option<(ft::Status, Instant)>> {
        if self.paired {
            primary_status(self.net).map(|s| Some((s, Instant::now())))
        } else {
            Ok(None)
        }
    }
}

/// The phases of a measurement, each filling its part of [`Figures`]: one
/// after the other on one VM ([`measure`]), or each in turn on all VMs
/// (`bench pair --interleave`).
const PHASES: [fn(&Subject, &mut Figures) -> Result<()>; 3] = [measure_cpu, measure_ping, measure_bulk];

/// The CPU-bound workload: [`client_cpu`], the threads' time per loop and
/// how long flow control held the primary.
fn measure_cpu(s: &Subject, f: &mut Figures) -> Result<()> {
    let before = s.status()?;
    let threads0 = thread_times(&s.pids);
    f.cpu_secs = in_client(s.net, client_cpu)?;
    f.cpu_threads = thread_times_per(&threads0, thread_times(&s.pids), 3.0, 1e3);
    if let Some((s0, _)) = before {
        f.cpu_throttled_ms = primary_status(s.net)?.throttled_ms.saturating_sub(s0.throttled_ms) as f64;
    }
    Ok(())
}

/// Request/response: [`client_ping`], the host CPU per `PING`, and the
/// primary's log rate, lag and output hold time.
fn measure_ping(s: &Subject, f: &mut Figures) -> Result<()> {
    let before = s.status()?;
    let (cpu0, threads0) = (cpu_secs(&s.pids), thread_times(&s.pids));
    (f.ops_per_sec, f.median_us, f.p99_us) = in_client(s.net, client_ping)?;
    f.ping_cpu_us = cpu_per(cpu0, cpu_secs(&s.pids), PINGS as f64 / 1e6);
    f.ping_threads = thread_times_per(&threads0, thread_times(&s.pids), PINGS as f64, 1e6);
    if let Some((s0, t0)) = before {
        let s1 = primary_status(s.net)?;
        f.log_bytes_per_sec = (s1.log_bytes - s0.log_bytes) as f64 / t0.elapsed().as_secs_f64();
        f.lag_ms = s1.lag_ms;
        f.hold_us = s1.hold_us_mean;
    }
    Ok(())
}

/// Bulk into the guest: [`bulk_in`], the host CPU per Gbit and the log
/// bandwidth.
fn measure_bulk(s: &Subject, f: &mut Figures) -> Result<()> {
    let before = s.status()?;
    let cpu0 = cpu_secs(&s.pids);
    f.bulk_mbits = bulk_in(s.net)?;
    f.bulk_cpu_s_per_gbit = cpu_per(cpu0, cpu_secs(&s.pids), f.bulk_mbits * BULK_SECS / 1e3);
    if let Some((s0, t0)) = before {
        let s1 = primary_status(s.net)?;
        f.bulk_log_mbits = (s1.log_bytes - s0.log_bytes) as f64 * 8.0 / 1e6 / t0.elapsed().as_secs_f64();
    }
    Ok(())
}

/// The figures of a VM running in `net`, alone or paired; `pids`: the
/// solo run's process, or the primary's and the secondary's.
fn measure(net: &PairNet, paired: bool, pids: &[u32]) -> Result<Figures> {
    let s = Subject { net, paired, pids: pids.to_vec() };
    let mut f = Figures::default();
    measure_cpu(&s, &mut f)?;
    measure_ping(&s, &mut f)?;
    // The iperf3 server typed on the console a moment ago is up.
    std::thread::sleep(Duration::from_secs(1));
    measure_bulk(&s, &mut f)?;
    Ok(f)
}

fn wait_file(dir: &std::path::Path, file: &str, needle: &str, child: &mut std::process::Child) -> Result<()> {
    let t = Instant::now();
    while !std::fs::read_to_string(dir.join(file)).unwrap_or_default().contains(needle) {
        if child.try_wait()?.is_some() || t.elapsed() > Duration::from_secs(180) {
            bail!("no '{needle}' in {file}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// One failover: seconds from SIGKILL to the client's next acknowledged
/// write, and the client's pause (the gap between the acknowledged writes
/// either side of the kill: what a user sees).
fn failover_once(
    exe: &std::path::Path,
    g: &GuestPaths,
    net: &PairNet,
    dir: &std::path::Path,
    delay: Duration,
) -> Result<(f64, f64)> {
    let mut pair = Pair::start(exe, g, net, dir, &[])?;
    pair.wait_for("primary.err", "the VM is protected", Duration::from_secs(180))?;
    pair.wait_for("primary.out", crate::guest::READY_LINE, Duration::from_secs(180))?;
    let client = Client::start(net);
    client.advance(20, Duration::from_secs(60), &pair)?;
    std::thread::sleep(delay);
    pair.primary.kill()?;
    let killed = Instant::now();
    let (next, last_before) = loop {
        if let (Some(next), before) = client.acks_around(killed) {
            break (next, before.unwrap_or(killed));
        }
        if client.failed() || killed.elapsed() > Duration::from_secs(60) {
            client.finish(&pair)?;
            bail!("no write acknowledged after the kill: {}", pair.tails());
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    std::thread::sleep(Duration::from_millis(500));
    client.finish(&pair)?;
    Ok((next.duration_since(killed).as_secs_f64(), next.duration_since(last_before).as_secs_f64()))
}

/// What a pair benchmark (`bench NAME`) needs: root, this executable, the
/// default guest (built if missing) and a fresh directory.
pub(super) fn setup(name: &str) -> Result<(std::path::PathBuf, GuestPaths, std::path::PathBuf)> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("bench {name} builds network namespaces: run it as root");
    }
    let exe = std::env::current_exe()?;
    let built = crate::guest::build(false)?;
    let g = GuestPaths {
        kernel: built.kernel,
        initrd: built.initrd,
        disk: built.disk,
        append: crate::guest::DEFAULT_APPEND.into(),
    };
    let dir = std::env::temp_dir().join(format!("lockstep-bench-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok((exe, g, dir))
}

/// Start a pair with `flags` on both sides, wait until it is protected and
/// its guest is ready, and start the guest's iperf3 server.
fn start_pair(
    exe: &std::path::Path,
    g: &GuestPaths,
    net: &PairNet,
    dir: &std::path::Path,
    flags: &[&str],
    cpus: Option<Cpus>,
) -> Result<Pair> {
    let mut pair = Pair::start(exe, g, net, dir, flags)?;
    let pin = |pair: &Pair| match cpus {
        Some(c) => pin_to_cpu(pair.pids()[0], c.primary).and_then(|_| pin_to_cpu(pair.pids()[1], c.secondary)),
        None => Ok(()),
    };
    pin(&pair)?;
    pair.wait_for("primary.err", "the VM is protected", Duration::from_secs(180))?;
    pair.wait_for("primary.out", crate::guest::READY_LINE, Duration::from_secs(180))?;
    pin(&pair)?;
    type_line(&mut pair.primary, IPERF_SERVER)?;
    Ok(pair)
}

/// A solo VM, killed when dropped.
struct SoloVm(std::process::Child);

impl SoloVm {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for SoloVm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start the solo VM with `flags`, wait until its guest is ready, and
/// start the guest's iperf3 server.
fn start_solo_vm(
    exe: &std::path::Path,
    g: &GuestPaths,
    net: &PairNet,
    dir: &std::path::Path,
    flags: &[&str],
    cpus: Option<Cpus>,
) -> Result<SoloVm> {
    let mut vm = SoloVm(start_solo(exe, g, net, dir, flags)?);
    let pin = |vm: &SoloVm| cpus.map_or(Ok(()), |c| pin_to_cpu(vm.id(), c.solo));
    pin(&vm)?;
    wait_file(dir, "solo.out", crate::guest::READY_LINE, &mut vm.0).context("solo guest")?;
    pin(&vm)?;
    type_line(&mut vm.0, IPERF_SERVER)?;
    Ok(vm)
}

/// The CPU each process runs on (`bench pair --core-per-side`).
#[derive(Clone, Copy)]
struct Cpus {
    solo: usize,
    primary: usize,
    secondary: usize,
}

/// The figures of one engine: solo and FT runs.
#[derive(Default)]
struct EngineRuns {
    solo: Vec<Figures>,
    ft: Vec<Figures>,
}

fn med(v: &[Figures], f: fn(&Figures) -> f64) -> f64 {
    median(&mut v.iter().map(f).collect::<Vec<_>>())
}

fn print_ratios(engine: rv::Engine, runs: &EngineRuns) {
    let (solo, ft) = (&runs.solo, &runs.ft);
    let (s_cpu, f_cpu) = (med(solo, |f| f.cpu_secs), med(ft, |f| f.cpu_secs));
    let (s_ops, f_ops) = (med(solo, |f| f.ops_per_sec), med(ft, |f| f.ops_per_sec));
    let (s_med, f_med) = (med(solo, |f| f.median_us), med(ft, |f| f.median_us));
    let (s_p99, f_p99) = (med(solo, |f| f.p99_us), med(ft, |f| f.p99_us));
    let (s_bulk, f_bulk) = (med(solo, |f| f.bulk_mbits), med(ft, |f| f.bulk_mbits));
    let engine = engine.name();
    println!("engine {engine}: pair vs solo, same guest and tap, medians of {} alternating runs:", solo.len());
    println!("| | solo | FT pair | FT/solo |");
    println!("|---|---|---|---|");
    println!("| CPU-bound (redis EVAL Lua loop), s | {s_cpu:.3} | {f_cpu:.3} | {:.3} |", s_cpu / f_cpu);
    println!("| request/response (redis PING), ops/s | {s_ops:.0} | {f_ops:.0} | {:.3} |", f_ops / s_ops);
    println!("| PING latency median, us | {s_med:.0} | {f_med:.0} | +{:.0} us |", f_med - s_med);
    println!("| PING latency p99, us | {s_p99:.0} | {f_p99:.0} | +{:.0} us |", f_p99 - s_p99);
    println!(
        "| bulk into the guest (iperf3, {BULK_SECS} s), Mbit/s | {s_bulk:.0} | {f_bulk:.0} | {:.3} |",
        f_bulk / s_bulk
    );
    let (s_ping, f_ping) = (med(solo, |f| f.ping_cpu_us[0]), med(ft, |f| f.ping_cpu_us[0]));
    let (s_gbit, f_gbit) = (med(solo, |f| f.bulk_cpu_s_per_gbit[0]), med(ft, |f| f.bulk_cpu_s_per_gbit[0]));
    println!(
        "| host CPU per PING, the VM's process (solo / primary), us | {s_ping:.0} | {f_ping:.0} | {:.3} |",
        f_ping / s_ping
    );
    println!("| host CPU per PING, the secondary, us | | {:.0} | |", med(ft, |f| f.ping_cpu_us[1]));
    println!(
        "| host CPU per Gbit into the guest, the VM's process, s | {s_gbit:.2} | {f_gbit:.2} | {:.3} |",
        f_gbit / s_gbit
    );
    println!(
        "| host CPU per Gbit into the guest, the secondary, s | | {:.2} | |",
        med(ft, |f| f.bulk_cpu_s_per_gbit[1])
    );
    println!(
        "engine {engine}: the primary waited for a lagging secondary {:.0} ms of the CPU-bound workload's {:.1} s; log \
         rate during request/response {:.0} B/s, mean output hold {:.0} us, backup lag at its end {:.2} ms of guest \
         time; log bandwidth during the bulk transfer {:.0} Mbit/s",
        med(ft, |f| f.cpu_throttled_ms),
        3.0 * f_cpu,
        med(ft, |f| f.log_bytes_per_sec),
        med(ft, |f| f.hold_us),
        med(ft, |f| f.lag_ms),
        med(ft, |f| f.bulk_log_mbits),
    );
}

/// The three FT/solo throughput ratios of one rep (the FT run over the
/// solo run next to it in time): CPU-bound, request/response, bulk.
fn rep_ratios(solo: &Figures, ft: &Figures) -> [f64; 3] {
    [solo.cpu_secs / ft.cpu_secs, ft.ops_per_sec / solo.ops_per_sec, ft.bulk_mbits / solo.bulk_mbits]
}

const RATIO_NAMES: [&str; 3] = ["CPU-bound", "request/response", "bulk into the guest"];

/// Each rep's FT/solo ratios, per engine, and (with two engines or more)
/// each rep's difference from the first engine's ratio in that same rep.
/// How much a ratio moves from rep to rep is what a difference between
/// engines has to beat: the paired differences show whether it does.
fn print_rep_ratios(engines: &[rv::Engine], runs: &[EngineRuns]) {
    let ratios: Vec<Vec<[f64; 3]>> =
        runs.iter().map(|r| r.solo.iter().zip(&r.ft).map(|(s, f)| rep_ratios(s, f)).collect()).collect();
    let first = engines[0].name();
    println!(
        "FT/solo by rep (each FT run over the solo run next to it in time), and each engine's difference from {first} in \
         the same rep; then what the CPU-bound figure is made of, by rep:"
    );
    println!("| engine | what | by rep | median | min / max |");
    println!("|---|---|---|---|---|");
    let row = |name: &str, what: &str, mut v: Vec<f64>, signed: bool| {
        let show = |x: f64| if signed { format!("{x:+.3}") } else { format!("{x:.3}") };
        let by_rep = v.iter().map(|&x| show(x)).collect::<Vec<_>>().join(" ");
        let min = v.iter().copied().fold(f64::MAX, f64::min);
        let max = v.iter().copied().fold(f64::MIN, f64::max);
        let mid = median(&mut v);
        println!("| {name} | {what} | {by_rep} | {} | {} / {} |", show(mid), show(min), show(max));
    };
    for (e, engine) in engines.iter().enumerate() {
        let name = engine.name();
        for (k, what) in RATIO_NAMES.iter().enumerate() {
            let own: Vec<f64> = ratios[e].iter().map(|r| r[k]).collect();
            let diff: Vec<f64> = own.iter().zip(&ratios[0]).map(|(a, b)| a - b[k]).collect();
            row(name, what, own, false);
            if e > 0 {
                row(&format!("{name} - {first}"), what, diff, true);
            }
        }
    }
    /// The vCPU thread (named after the process) of each side.
    fn vcpu(f: &Figures, side: usize) -> f64 {
        f.cpu_threads[side].get("lockstep").map_or(f64::NAN, |t| t.cpu_secs)
    }
    /// A figure of one run: what it is, whether of the FT run (else the
    /// solo one), and how to read it.
    type Part = (&'static str, bool, fn(&Figures) -> f64);
    let parts: [Part; 6] = [
        ("Lua loop, s", false, |f| f.cpu_secs),
        ("the vCPU thread on a CPU, ms per loop", false, |f| vcpu(f, 0)),
        ("Lua loop, s", true, |f| f.cpu_secs),
        ("the primary waited for the secondary, ms per loop", true, |f| f.cpu_throttled_ms / 3.0),
        ("the primary's vCPU thread on a CPU, ms per loop", true, |f| vcpu(f, 0)),
        ("the secondary's vCPU thread on a CPU, ms per loop", true, |f| vcpu(f, 1)),
    ];
    for (engine, r) in engines.iter().zip(runs) {
        for (what, paired, of) in parts {
            let v = if paired { &r.ft } else { &r.solo };
            let side = if paired { "FT" } else { "solo" };
            row(&format!("{} {side}", engine.name()), what, v.iter().map(of).collect(), false);
        }
    }
}

/// Where each process's host time goes, by thread, per `PING` (µs) and per
/// Lua loop (ms): on a CPU, and runnable but waiting for one (a sign of two
/// emulators and their helpers sharing too few cores).
fn print_threads(engine: rv::Engine, runs: &EngineRuns) {
    type Of = fn(&Figures, usize) -> &BTreeMap<String, ThreadTime>;
    let per: [(&str, Of); 2] =
        [("PING, us", |f, side| &f.ping_threads[side]), ("Lua loop, ms", |f, side| &f.cpu_threads[side])];
    for (what, of) in per {
        let columns: [(&[Figures], usize); 3] = [(&runs.solo, 0), (&runs.ft, 0), (&runs.ft, 1)];
        let mut names: Vec<&String> =
            columns.iter().flat_map(|(v, side)| v.iter().flat_map(move |f| of(f, *side).keys())).collect();
        names.sort();
        names.dedup();
        let cell = |v: &[Figures], side: usize, name: &str, field: fn(&ThreadTime) -> f64| {
            median(&mut v.iter().map(|f| of(f, side).get(name).map_or(0.0, field)).collect::<Vec<_>>())
        };
        println!(
            "engine {}: host time per {what}, by thread: on a CPU / waiting for one / times put on a CPU (medians):",
            engine.name()
        );
        println!("| thread | solo | primary | secondary |");
        println!("|---|---|---|---|");
        for name in names {
            let cells: Vec<[f64; 3]> = columns
                .iter()
                .map(|(v, side)| {
                    [|t: &ThreadTime| t.cpu_secs, |t: &ThreadTime| t.wait_secs, |t: &ThreadTime| t.slices]
                        .map(|field| cell(v, *side, name, field))
                })
                .collect();
            if cells.iter().all(|[cpu, wait, _]| *cpu < 1.0 && *wait < 1.0) {
                continue;
            }
            let text: Vec<String> =
                cells.iter().map(|[cpu, wait, slices]| format!("{cpu:.0} / {wait:.0} / {slices:.1}")).collect();
            println!("| {name} | {} |", text.join(" | "));
        }
    }
}

/// One feature's cost: the pair with it against the plain pair.
fn print_cost(title: &str, plain: &[Figures], with: &[Figures]) {
    println!("{title}");
    for (what, f) in [
        ("CPU-bound, s (time)", (|f: &Figures| f.cpu_secs) as fn(&Figures) -> f64),
        ("request/response, ops/s", |f: &Figures| f.ops_per_sec),
        ("PING latency median, us", |f: &Figures| f.median_us),
        ("bulk into the guest, Mbit/s", |f: &Figures| f.bulk_mbits),
    ] {
        let (a, b) = (med(plain, f), med(with, f));
        println!("| {what} | {a:.1} | {b:.1} | {:.3} |", b / a);
    }
}

/// `bench pair --interleave`: every engine's solo VM and pair booted at
/// once, each on a network of its own and kept for all reps; each rep runs
/// every phase on all of them in turn before the next phase, in an order
/// that reverses every rep. A solo run and its FT run, and one engine's
/// runs and another's, are then seconds apart, so a slow stretch of the
/// host falls on all of them alike. What the idle ones cost is kept small
/// with [`client_quiet`].
fn interleaved(
    exe: &std::path::Path,
    g: &GuestPaths,
    dir: &std::path::Path,
    names: &[&str],
    reps: usize,
    cpus: Option<Cpus>,
    runs: &mut [EngineRuns],
) -> Result<()> {
    if names.len() > 4 {
        bail!("bench pair --interleave measures at most 4 engines at once");
    }
    let mut nets = Vec::new();
    for i in 0..names.len() as u8 {
        nets.push([PairNet::new(&format!("bsolo{i}"), 78 - 2 * i)?, PairNet::new(&format!("bench{i}"), 79 - 2 * i)?]);
    }
    let (mut solos, mut pairs) = (Vec::new(), Vec::new());
    for (name, [solo_net, pair_net]) in names.iter().zip(&nets) {
        let flags = ["--engine", *name];
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir)?;
        solos.push(start_solo_vm(exe, g, solo_net, &dir, &flags, cpus)?);
        pairs.push(start_pair(exe, g, pair_net, &dir, &flags, cpus)?);
        eprintln!("bench pair: engine {name}: solo VM and pair ready");
    }
    // Each engine's solo VM and pair next to each other, every other
    // engine's the other way round: interp solo, interp FT, jit FT, jit solo.
    let mut turns: Vec<(usize, bool, Subject)> = Vec::new();
    for (e, [solo_net, pair_net]) in nets.iter().enumerate() {
        let solo = (e, false, Subject { net: solo_net, paired: false, pids: vec![solos[e].id()] });
        let ft = (e, true, Subject { net: pair_net, paired: true, pids: pairs[e].pids().to_vec() });
        turns.extend(if e % 2 == 0 { [solo, ft] } else { [ft, solo] });
    }
    for (_, _, subject) in &turns {
        in_client(subject.net, client_quiet)?;
    }
    for rep in 0..reps {
        let mut figures: Vec<[Figures; 2]> = names.iter().map(|_| Default::default()).collect();
        for phase in PHASES {
            for (e, paired, subject) in &turns {
                phase(subject, &mut figures[*e][*paired as usize])?;
            }
        }
        for (r, [solo, ft]) in runs.iter_mut().zip(figures) {
            r.solo.push(solo);
            r.ft.push(ft);
        }
        turns.reverse();
        eprintln!("bench pair: rep {} of {reps} done", rep + 1);
    }
    Ok(())
}

/// What `bench pair` measures.
pub struct PairBench<'a> {
    pub reps: usize,
    pub kills: usize,
    /// At least one: compared side by side (each rep runs solo and FT with
    /// each in turn); the costs of `--key` and of a mirroring network are
    /// measured with the first.
    pub engines: &'a [rv::Engine],
    /// The solo VM and the primary on CPU 0, the secondary on CPU 1.
    pub core_per_side: bool,
    /// Only the engines' solo and FT runs: no pair with `--key`, none on a
    /// mirroring network (their costs are not measured).
    pub engines_only: bool,
    /// Every engine's solo VM and pair booted at once and kept for all
    /// reps, each workload measured on all of them in turns, instead of a
    /// fresh solo VM and pair for every rep (only the engines, as
    /// `engines_only`).
    pub interleave: bool,
}

pub fn pair(b: PairBench) -> Result<()> {
    let PairBench { reps, kills, engines, core_per_side, engines_only, interleave } = b;
    let (exe, g, dir) = setup("pair")?;
    let cpus = core_per_side.then_some(Cpus { solo: 0, primary: 0, secondary: 1 });
    if core_per_side {
        println!("each side on a CPU of its own (solo and primary: CPU 0; secondary: CPU 1)");
    }
    let net = PairNet::new("bench", 79)?;
    let key = dir.join("bench.key");
    let _ = std::fs::remove_file(&key);
    ft::auth::Key::generate()?.write_new(&key)?;
    let key_path = key.to_str().context("the temp directory's path is not UTF-8")?;
    let names: Vec<&str> = engines.iter().map(|e| e.name()).collect();
    let mut runs: Vec<EngineRuns> = engines.iter().map(|_| EngineRuns::default()).collect();
    let (mut keyed, mut mirrored) = (Vec::new(), Vec::new());
    if interleave {
        interleaved(&exe, &g, &dir, &names, reps, cpus, &mut runs)?;
    } else {
        for rep in 0..reps {
            for (i, name) in names.iter().enumerate() {
                let flags = ["--engine", *name];
                let vm = start_solo_vm(&exe, &g, &net, &dir, &flags, cpus)?;
                runs[i].solo.push(measure(&net, false, &[vm.id()])?);
                drop(vm);
                let pair = start_pair(&exe, &g, &net, &dir, &flags, cpus)?;
                runs[i].ft.push(measure(&net, true, &pair.pids())?);
                drop(pair);
            }
            if !engines_only {
                let first = ["--engine", names[0]];
                let pair = start_pair(&exe, &g, &net, &dir, &[&first[..], &["--key", key_path]].concat(), cpus)?;
                keyed.push(measure(&net, true, &pair.pids())?);
                drop(pair);
                net.mirror_guest_frames(true)?;
                let f =
                    start_pair(&exe, &g, &net, &dir, &first, cpus).and_then(|pair| measure(&net, true, &pair.pids()));
                net.mirror_guest_frames(false)?;
                mirrored.push(f?);
            }
            eprintln!("bench pair: rep {} of {reps} done", rep + 1);
        }
    }
    for (engine, r) in engines.iter().zip(&runs) {
        print_ratios(*engine, r);
        print_threads(*engine, r);
    }
    print_rep_ratios(engines, &runs);
    if !engines_only && !interleave {
        print_cost(
            &format!("the cost of --key (an authenticated channel), engine {}, keyed pair / unkeyed pair:", names[0]),
            &runs[0].ft,
            &keyed,
        );
        print_cost(
            &format!(
                "the cost of a mirroring network (the secondary reads every frame for the guest), engine {}, mirrored \
                 / learning:",
                names[0]
            ),
            &runs[0].ft,
            &mirrored,
        );
    }
    if kills > 0 {
        // Alternating: each kill on a learning network, then one on a
        // mirroring network, with the same delay.
        let mut times = [Vec::new(), Vec::new()];
        let mut pauses = [Vec::new(), Vec::new()];
        let mut rng = 0x2545_f491_4f6c_dd1du64 ^ std::process::id() as u64;
        for k in 0..kills {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            for (i, mirror) in [false, true].into_iter().enumerate() {
                net.mirror_guest_frames(mirror)?;
                let once = failover_once(&exe, &g, &net, &dir, Duration::from_millis(rng % 1000));
                net.mirror_guest_frames(false)?;
                let (t, pause) = once?;
                eprintln!(
                    "bench pair: kill {} of {kills} ({}): next write acknowledged {:.0} ms after the kill, client paused \
                     {:.0} ms",
                    k + 1,
                    NETWORKS[i],
                    t * 1e3,
                    pause * 1e3
                );
                times[i].push(t * 1e3);
                pauses[i].push(pause * 1e3);
            }
        }
        for (i, network) in NETWORKS.iter().enumerate() {
            for (what, v) in [
                ("SIGKILL of the primary to the client's next acknowledged write", &mut times[i]),
                ("the client's pause across the kill", &mut pauses[i]),
            ] {
                let max = v.iter().cloned().fold(0.0, f64::max);
                let min = v.iter().cloned().fold(f64::MAX, f64::min);
                let over = v.iter().filter(|&&t| t > 100.0).count();
                println!(
                    "failover ({network}), {what}, {kills} kills: median {:.0} ms, min {min:.0} ms, max {max:.0} ms, \
                     over 100 ms: {over}",
                    median(v)
                );
            }
        }
    }
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
