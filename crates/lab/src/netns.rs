//! Network namespaces: shell commands, code and programs run inside one,
//! and the one-guest network of the device benchmarks and network tests.
//!
//! ```text
//!  client ns                 host ns
//!  vc 10.N.M.1/24 ───────── vh ─ br0 ─ tap0 (the guest, 10.N.M.2)
//! ```

use anyhow::{bail, Context, Result};
use std::process::Command;

/// Run `cmd` with `sh -c`; its stdout, or an error with its stderr.
pub fn sh(cmd: &str) -> Result<String> {
    let out = Command::new("sh").arg("-c").arg(cmd).output().with_context(|| format!("cannot run `{cmd}`"))?;
    if !out.status.success() {
        bail!("`{cmd}` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `prog` run inside namespace `ns`.
pub fn exec(ns: &str, prog: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, prog]);
    c
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

/// Run `f` inside namespace `ns` and wait for it.
pub fn run_in<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    in_netns(ns, f).join().map_err(|_| anyhow::anyhow!("the thread in namespace {ns} panicked"))?
}

/// A bridge with a tap for one guest in a host namespace, and a client
/// namespace on a veth; both removed on drop.
pub struct GuestNet {
    /// The namespace of the bridge and the guest's tap (`tap0`).
    pub host: String,
    pub client: String,
    /// The /24 the client (.1) and the guest (.2) share, e.g. "10.77.3".
    pub subnet: String,
}

impl GuestNet {
    /// `tag` keeps concurrent users apart; `subnet` is the first three
    /// octets of the /24.
    pub fn new(tag: &str, subnet: &str) -> Result<GuestNet> {
        let n = GuestNet { host: format!("ls-h-{tag}"), client: format!("ls-c-{tag}"), subnet: subnet.to_string() };
        n.remove();
        let (h, c) = (&n.host, &n.client);
        let built = sh(&format!("ip netns add {h} && ip netns add {c}")).and_then(|_| {
            sh(&format!(
                "ip -n {h} link set lo up && ip -n {h} link add br0 type bridge && ip -n {h} link set br0 up && \
                 ip -n {h} tuntap add dev tap0 mode tap && ip -n {h} link set tap0 master br0 up && \
                 ip -n {h} link add vh type veth peer name vc netns {c} && ip -n {h} link set vh master br0 up && \
                 ip -n {c} link set lo up && ip -n {c} addr add {subnet}.1/24 dev vc && ip -n {c} link set vc up"
            ))
        });
        if let Err(e) = built {
            n.remove();
            return Err(e);
        }
        Ok(n)
    }

    pub fn guest_ip(&self) -> String {
        format!("{}.2", self.subnet)
    }

    /// `prog` run inside the client namespace.
    pub fn client_cmd(&self, prog: &str) -> Command {
        exec(&self.client, prog)
    }

    /// Run `f` inside the client namespace and wait for it.
    pub fn in_client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        run_in(&self.client, f)
    }

    fn remove(&self) {
        for ns in [&self.host, &self.client] {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(std::process::Stdio::null()).status();
        }
    }
}

impl Drop for GuestNet {
    fn drop(&mut self) {
        self.remove();
    }
}
