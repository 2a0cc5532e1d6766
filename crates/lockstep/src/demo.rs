//! The main job: a protected pair of the default guest on this machine,
//! with a live client, and a kill of the primary to watch the secondary
//! take over. Everything runs in network namespaces the demo builds and
//! removes (`netlab`); the disks are sparse copies of the guest's root disk.

use crate::netlab::PairNet;
use crate::workload::Writer;
use anyhow::{anyhow, bail, Context, Result};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const GUEST_MAC: &str = "52:54:00:4c:53:50";
pub const LOG_PORT: u16 = 7300;

/// The two processes of a pair in their namespaces, with their output in
/// files (`primary.out`/`.err`, `secondary.out`/`.err` in `dir`).
pub struct Pair {
    pub primary: Child,
    pub secondary: Child,
    pub dir: PathBuf,
}

/// Sparse copies of the guest's root disk, one per side.
pub fn replicas(disk: &Path, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let (p, s) = (dir.join("primary.img"), dir.join("secondary.img"));
    for copy in [&p, &s] {
        let ok = Command::new("cp").arg("--sparse=always").arg(disk).arg(copy).status()?.success();
        if !ok {
            bail!("cannot copy '{}' to '{}'", disk.display(), copy.display());
        }
    }
    Ok((p, s))
}

impl Pair {
    /// Start secondary, then primary, of the default guest on `net`.
    pub fn start(net: &PairNet, dir: &Path, extra: &[&str]) -> Result<Pair> {
        let g = crate::guest::build(false)?;
        let (pdisk, sdisk) = replicas(&g.disk, dir)?;
        let exe = std::env::current_exe()?;
        let append = format!("{} root=/dev/vda lockstep.ip={}/24", crate::guest::DEFAULT_APPEND, net.guest_ip());
        let arbiter = format!("file:{}", dir.join("arbiter.epoch").display());
        let spawn = |ns: &str, role: &str, disk: &Path, addr_flag: &str, metrics: &str| -> Result<Child> {
            let mut c = PairNet::exec(ns, exe.to_str().unwrap());
            c.arg(role)
                .args(["--kernel", g.kernel.to_str().unwrap(), "--initrd", g.initrd.to_str().unwrap()])
                .args(["--append", &append, "--disk", disk.to_str().unwrap()])
                .args(["--net", "tap:tap0", "--mac", GUEST_MAC, addr_flag, &net.log_addr(LOG_PORT)])
                .args(["--arbiter", &arbiter, "--metrics", metrics])
                .args(extra)
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(dir.join(format!("{role}.out")))?)
                .stderr(std::fs::File::create(dir.join(format!("{role}.err")))?);
            c.spawn().with_context(|| format!("cannot start the {role}"))
        };
        let secondary = spawn(&net.secondary, "secondary", &sdisk, "--listen", "127.0.0.1:9541")?;
        let primary = spawn(&net.primary, "primary", &pdisk, "--peer", "127.0.0.1:9540")?;
        Ok(Pair { primary, secondary, dir: dir.to_path_buf() })
    }

    pub fn text(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    /// Wait until `file` contains `needle`, or fail after `timeout` (or
    /// when both sides have exited).
    pub fn wait_for(&mut self, file: &str, needle: &str, timeout: Duration) -> Result<()> {
        let t = Instant::now();
        while !self.text(file).contains(needle) {
            if t.elapsed() > timeout {
                bail!("no '{needle}' in {file} after {} s: {}", timeout.as_secs(), self.tails());
            }
            let p = self.primary.try_wait()?.is_some();
            let s = self.secondary.try_wait()?.is_some();
            if p && s {
                bail!("both sides exited before '{needle}': {}", self.tails());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    pub fn tails(&self) -> String {
        let tail = |f: &str| {
            let t = self.text(f);
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(6)..].join(" | ")
        };
        format!("primary: {} ;; secondary: {}", tail("primary.err"), tail("secondary.err"))
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for c in [&mut self.primary, &mut self.secondary] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Run `f` on a thread inside network namespace `ns`.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || -> Result<T> {
        let file = std::fs::File::open(&path).with_context(|| format!("no namespace {path}"))?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(f())
    })
}

/// What the client saw.
#[derive(Default)]
struct Progress {
    acked: AtomicU64,
    error: Mutex<Option<String>>,
    max_gap_ms: AtomicU64,
}

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
    say("building (or reusing) the default guest ...");
    crate::guest::build(false)?;
    let net = PairNet::new("demo", 77).map_err(|e| anyhow!(e))?;
    say(&format!(
        "network: client {} | bridge | primary tap, secondary tap; log channel on its own veth ({})",
        net.client,
        net.log_addr(LOG_PORT)
    ));
    let mut pair = Pair::start(&net, &dir, &[])?;
    say(&format!("started secondary and primary (their output is in {})", dir.display()));
    pair.wait_for("primary.err", "the VM is protected", Duration::from_secs(120))?;
    say("paired: the primary ships its log, the secondary replays it");
    pair.wait_for("primary.out", crate::guest::READY_LINE, Duration::from_secs(120))?;
    say(&format!("guest is up: redis at {}:6379 behind the primary", net.guest_ip()));

    let progress = Arc::new(Progress::default());
    let stop = Arc::new(AtomicBool::new(false));
    let addr = format!("{}:6379", net.guest_ip());
    let client = {
        let (progress, stop) = (progress.clone(), stop.clone());
        in_netns(&net.client, move || -> Result<Writer, String> {
            let mut w = Writer::connect(&addr, Duration::from_secs(30)).map_err(|e| e.to_string())?;
            while !stop.load(Ordering::Relaxed) {
                if let Err(e) = w.step() {
                    *progress.error.lock().unwrap() = Some(e.clone());
                    return Err(e);
                }
                progress.acked.store(w.acked, Ordering::Relaxed);
                progress.max_gap_ms.store(w.max_gap.as_millis() as u64, Ordering::Relaxed);
            }
            w.verify_all()?;
            Ok(w)
        })
    };
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
        if let Some(e) = progress.error.lock().unwrap().clone() {
            bail!("the client failed before the kill: {e}");
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            say(&format!("client: {} writes acknowledged, protected", progress.acked.load(Ordering::Relaxed)));
        }
    }
    let before = progress.acked.load(Ordering::Relaxed);
    let gap_before = progress.max_gap_ms.load(Ordering::Relaxed);
    pair.primary.kill()?;
    let killed = Instant::now();
    pair.primary.wait()?;
    say(&format!("SIGKILL to the primary after {before} acknowledged writes"));
    // The first acknowledged write after the kill.
    while progress.acked.load(Ordering::Relaxed) <= before + 1 {
        if let Some(e) = progress.error.lock().unwrap().clone() {
            bail!("the client failed after the kill: {e}\n{}", pair.tails());
        }
        if killed.elapsed() > Duration::from_secs(30) {
            bail!("no reply 30 s after the kill: {}", pair.tails());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let failover = killed.elapsed();
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
        say(&format!(
            "client: {} writes acknowledged, via the secondary (unprotected)",
            progress.acked.load(Ordering::Relaxed)
        ));
    }
    stop.store(true, Ordering::Relaxed);
    let w = client.join().map_err(|_| anyhow!("the client thread panicked"))??.map_err(|e| anyhow!("client: {e}"))?;
    let mut lat = w.latencies_us.clone();
    lat.sort_unstable();
    let median = lat.get(lat.len() / 2).copied().unwrap_or(0);
    say(&format!(
        "done: {} writes on one connection, never reset; all {} read back intact after the failover",
        w.acked, w.acked
    ));
    say(&format!(
        "step latency median {:.2} ms; longest pause {} ms (before the kill: {gap_before} ms)",
        median as f64 / 1e3,
        w.max_gap.as_millis()
    ));
    drop(pair);
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
