//! Running a pair of the default guest in a [`PairNet`]: the demo, the
//! pair benchmarks and the pair tests start and watch the two sides the
//! same way.

use crate::netns::{exec, in_netns};
use crate::pairnet::PairNet;
use crate::workload::Writer;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The guest's files and base command line.
pub struct GuestPaths {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub disk: PathBuf,
    pub append: String,
}

pub const GUEST_MAC: &str = "52:54:00:4c:53:50";
pub const LOG_PORT: u16 = 7300;
/// What the default guest prints once its services are up.
pub const GUEST_READY: &str = "lockstep-guest: ready";

/// The two processes of a pair in their namespaces, with their output in
/// files (`primary.out`/`.err`, `secondary.out`/`.err` in `dir`). Their
/// consoles are pipes (`type_line`): what is typed on the primary's is
/// logged and reaches both guests; the secondary's counts once it is live.
pub struct Pair {
    pub primary: Child,
    pub secondary: Child,
    pub dir: PathBuf,
    /// The output file names (without extension) of the processes now in
    /// the primary's and the secondary's namespace (for [`Pair::tails`]).
    pub names: [String; 2],
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

/// The command line of one side (`role`) in namespace `ns` on replica
/// `disk`, its output in `dir/NAME.out` and `dir/NAME.err` (the address
/// and status flags are the caller's).
#[allow(clippy::too_many_arguments)]
fn side_command(
    exe: &Path,
    g: &GuestPaths,
    net: &PairNet,
    dir: &Path,
    ns: &str,
    role: &str,
    name: &str,
    disk: &Path,
    extra: &[&str],
) -> Result<Command> {
    let append = format!("{} root=/dev/vda lockstep.ip={}/24", g.append, net.guest_ip());
    let arbiter = format!("file:{}", dir.join("arbiter.epoch").display());
    let mut c = exec(ns, exe.to_str().unwrap());
    c.arg(role)
        .args(["--kernel", g.kernel.to_str().unwrap(), "--initrd", g.initrd.to_str().unwrap()])
        .args(["--append", &append, "--disk", disk.to_str().unwrap()])
        .args(["--net", "tap:tap0", "--mac", GUEST_MAC])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(dir.join(format!("{name}.out")))?)
        .stderr(std::fs::File::create(dir.join(format!("{name}.err")))?);
    if !extra.contains(&"--arbiter") {
        c.args(["--arbiter", &arbiter]);
    }
    Ok(c)
}

impl Pair {
    /// The process ids of the primary and the secondary (as started: a
    /// side restarted or switched keeps its slot).
    pub fn pids(&self) -> [u32; 2] {
        [self.primary.id(), self.secondary.id()]
    }

    /// Start a secondary (as a supervisor would after a side died) in the
    /// namespace of `side` ("primary" or "secondary": the side it replaces),
    /// on that side's replica, listening at that side's log address and
    /// serving its status where that side did; its output goes to
    /// `dir/NAME.out` and `.err`; `env`: environment variables for it.
    #[allow(clippy::too_many_arguments)]
    pub fn restart_as_secondary(
        &mut self,
        exe: &Path,
        g: &GuestPaths,
        net: &PairNet,
        side: &str,
        extra: &[&str],
        name: &str,
        env: &[(&str, &str)],
    ) -> Result<()> {
        let (child, ns, listen, metrics, slot) = match side {
            "primary" => (&mut self.primary, &net.primary, net.primary_log_addr(LOG_PORT), "127.0.0.1:9540", 0),
            _ => (&mut self.secondary, &net.secondary, net.log_addr(LOG_PORT), "127.0.0.1:9541", 1),
        };
        let _ = child.kill();
        let _ = child.wait();
        let disk = self.dir.join(format!("{side}.img"));
        let mut c = side_command(exe, g, net, &self.dir, ns, "secondary", name, &disk, extra)?;
        c.args(["--listen", &listen, "--metrics", metrics]).envs(env.iter().copied());
        *child = c.spawn().context("cannot start a secondary again")?;
        self.names[slot] = name.to_string();
        Ok(())
    }

    /// Start secondary, then primary, of the guest `g` on `net`, with
    /// `lockstep` binary `exe`; `extra` flags go to both sides.
    pub fn start(exe: &Path, g: &GuestPaths, net: &PairNet, dir: &Path, extra: &[&str]) -> Result<Pair> {
        Pair::start_with_env(exe, g, net, dir, extra, &[])
    }

    /// As [`Pair::start`], with environment variables for both sides (e.g.
    /// a `LOCKSTEP_FAILPOINT`: their names say which side they act on).
    pub fn start_with_env(
        exe: &Path,
        g: &GuestPaths,
        net: &PairNet,
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Pair> {
        Pair::start_with_side_env(exe, g, net, dir, extra, env, env)
    }

    /// As [`Pair::start`], with environment variables for each side.
    pub fn start_with_side_env(
        exe: &Path,
        g: &GuestPaths,
        net: &PairNet,
        dir: &Path,
        extra: &[&str],
        primary_env: &[(&str, &str)],
        secondary_env: &[(&str, &str)],
    ) -> Result<Pair> {
        Pair::start_full(exe, g, net, dir, extra, primary_env, secondary_env, &[])
    }

    /// As [`Pair::start`], with flags for the secondary alone.
    pub fn start_with_secondary_args(
        exe: &Path,
        g: &GuestPaths,
        net: &PairNet,
        dir: &Path,
        extra: &[&str],
        secondary_extra: &[&str],
    ) -> Result<Pair> {
        Pair::start_full(exe, g, net, dir, extra, &[], &[], secondary_extra)
    }

    /// The general form: `extra` flags for both sides, environment
    /// variables for each, and flags for the secondary alone.
    #[allow(clippy::too_many_arguments)]
    pub fn start_full(
        exe: &Path,
        g: &GuestPaths,
        net: &PairNet,
        dir: &Path,
        extra: &[&str],
        primary_env: &[(&str, &str)],
        secondary_env: &[(&str, &str)],
        secondary_extra: &[&str],
    ) -> Result<Pair> {
        let (pdisk, sdisk) = replicas(&g.disk, dir)?;
        // A new pair from copies of the base image: no history. (The
        // arbiter's record of an earlier pair in `dir` would make these
        // fresh copies stale, as it should for real replicas.)
        for old in ["arbiter.epoch", "primary.img.lockstep", "secondary.img.lockstep"]
            .into_iter()
            .chain(["primary.img.lockstep-changes", "secondary.img.lockstep-changes"])
        {
            let _ = std::fs::remove_file(dir.join(old));
        }
        let spawn = |ns: &str, role: &str, disk: &Path, addr_flag: &str, metrics: &str| -> Result<Child> {
            let mut c = side_command(exe, g, net, dir, ns, role, role, disk, extra)?;
            c.args([addr_flag, &net.log_addr(LOG_PORT), "--metrics", metrics]);
            let env = if role == "primary" { primary_env } else { secondary_env };
            c.envs(env.iter().copied());
            if role == "secondary" {
                c.args(secondary_extra);
            }
            c.spawn().with_context(|| format!("cannot start the {role}"))
        };
        let secondary = spawn(&net.secondary, "secondary", &sdisk, "--listen", "127.0.0.1:9541")?;
        let primary = spawn(&net.primary, "primary", &pdisk, "--peer", "127.0.0.1:9540")?;
        Ok(Pair { primary, secondary, dir: dir.to_path_buf(), names: ["primary".into(), "secondary".into()] })
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
        let [a, b] = &self.names;
        format!("{a}: {} ;; {b}: {}", tail(&format!("{a}.err")), tail(&format!("{b}.err")))
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

/// The same guest alone (`lockstep run`) in the primary's namespace, on
/// the primary's tap: the baseline for the pair's figures.
pub fn start_solo(exe: &Path, g: &GuestPaths, net: &PairNet, dir: &Path, extra: &[&str]) -> Result<Child> {
    let disk = dir.join("solo.img");
    let ok = Command::new("cp").arg("--sparse=always").arg(&g.disk).arg(&disk).status()?.success();
    if !ok {
        bail!("cannot copy '{}'", g.disk.display());
    }
    let append = format!("{} root=/dev/vda lockstep.ip={}/24", g.append, net.guest_ip());
    let mut c = exec(&net.primary, exe.to_str().unwrap());
    c.arg("run")
        .args(["--kernel", g.kernel.to_str().unwrap(), "--initrd", g.initrd.to_str().unwrap()])
        .args(["--append", &append, "--disk", disk.to_str().unwrap()])
        .args(["--net", "tap:tap0", "--mac", GUEST_MAC])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(dir.join("solo.out"))?)
        .stderr(std::fs::File::create(dir.join("solo.err"))?);
    c.spawn().context("cannot start the solo run")
}

/// Type a line on a guest's console (a child started with a piped stdin).
pub fn type_line(child: &mut Child, line: &str) -> Result<()> {
    use std::io::Write;
    let stdin = child.stdin.as_mut().context("the console is not a pipe")?;
    stdin.write_all(format!("{line}\n").as_bytes())?;
    stdin.flush()?;
    Ok(())
}

/// The numbered-write client (`workload::Writer`) on its own thread in the
/// client namespace, recording when each step was acknowledged, until told
/// to stop; then it reads every acknowledged write back.
pub struct Client {
    acks: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Result<Result<Writer, String>>>,
}

impl Client {
    pub fn start(net: &PairNet) -> Client {
        let addr = format!("{}:6379", net.guest_ip());
        let (acks, stop) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
        let (a, s) = (acks.clone(), stop.clone());
        let handle = in_netns(&net.client, move || -> Result<Writer, String> {
            let mut w = Writer::connect(&addr, Duration::from_secs(30)).map_err(|e| format!("connect: {e}"))?;
            while !s.load(Ordering::Relaxed) {
                w.step()?;
                a.lock().unwrap().push(Instant::now());
            }
            w.verify_all()?;
            Ok(w)
        });
        Client { acks, stop, handle }
    }

    /// Steps acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acks.lock().unwrap().len() as u64
    }

    /// Has the client stopped on its own (an error)?
    pub fn failed(&self) -> bool {
        self.handle.is_finished()
    }

    /// When the first step after `t` was acknowledged, and the last before.
    pub fn acks_around(&self, t: Instant) -> (Option<Instant>, Option<Instant>) {
        let acks = self.acks.lock().unwrap();
        let i = acks.partition_point(|a| *a <= t);
        (acks.get(i).copied(), i.checked_sub(1).map(|j| acks[j]))
    }

    /// The longest wait between two acknowledged steps since `t` (the wait
    /// for the first one after `t` counts from `t`).
    pub fn longest_pause_since(&self, t: Instant) -> Duration {
        let acks = self.acks.lock().unwrap();
        let i = acks.partition_point(|a| *a <= t);
        let mut last = t;
        let mut longest = Duration::ZERO;
        for a in &acks[i..] {
            longest = longest.max(*a - last);
            last = *a;
        }
        longest
    }

    /// The longest wait between two acknowledged steps before `t`.
    pub fn longest_pause_before(&self, t: Instant) -> Duration {
        let acks = self.acks.lock().unwrap();
        acks.windows(2).filter(|w| w[1] <= t).map(|w| w[1] - w[0]).max().unwrap_or_default()
    }

    /// Wait for `n` more acknowledged steps, at most `timeout`; the error
    /// carries the pair's last words.
    pub fn advance(&self, n: u64, timeout: Duration, pair: &Pair) -> Result<()> {
        let target = self.acked() + n;
        let t = Instant::now();
        while self.acked() < target {
            if self.failed() {
                bail!("the client stopped early; {}", pair.tails());
            }
            if t.elapsed() > timeout {
                bail!("the client made no progress in {timeout:?}: {}", pair.tails());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Stop (if it has not failed already), and read everything back.
    pub fn finish(self, pair: &Pair) -> Result<Writer> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.join() {
            Ok(Ok(Ok(w))) => Ok(w),
            Ok(Ok(Err(e))) => bail!("client: {e}\n{}", pair.tails()),
            Ok(Err(e)) => Err(e),
            Err(_) => bail!("the client thread panicked"),
        }
    }
}

/// The `chunk`-byte chunks in which files `a` and `b` differ (a length
/// difference counts as the chunks past the shorter end).
pub fn differing_chunks(a: &Path, b: &Path, chunk: usize) -> Result<Vec<u64>> {
    use std::io::Read;
    let open = |p: &Path| std::fs::File::open(p).with_context(|| format!("cannot read '{}'", p.display()));
    let (mut fa, mut fb) = (std::io::BufReader::new(open(a)?), std::io::BufReader::new(open(b)?));
    let (mut ba, mut bb) = (vec![0u8; chunk], vec![0u8; chunk]);
    let mut differ = Vec::new();
    for n in 0.. {
        let fill = |f: &mut dyn Read, buf: &mut [u8]| -> Result<usize> {
            let mut got = 0;
            while got < buf.len() {
                match f.read(&mut buf[got..])? {
                    0 => break,
                    k => got += k,
                }
            }
            Ok(got)
        };
        let (na, nb) = (fill(&mut fa, &mut ba)?, fill(&mut fb, &mut bb)?);
        if na == 0 && nb == 0 {
            break;
        }
        if ba[..na] != bb[..nb] {
            differ.push(n);
        }
    }
    Ok(differ)
}
