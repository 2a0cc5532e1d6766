//! End to end on the network and the root disk: the default Debian guest
//! (root on ext4 over virtio-blk, network over virtio-net on a tap) serves
//! clients in a network namespace the test builds and removes itself:
//!
//! ```text
//!  ns ls-h-*:  lockstep ── tap0 ─┐
//!                                br0
//!              vh ───────────────┘
//!               │ (veth)
//!  ns ls-c-*:  vc 10.77.x.1/24  ── the test's client threads
//!  guest:      eth0 10.77.x.2/24, redis-server :6379, darkhttpd :80
//! ```
//! Needs root (namespaces, taps); everything stays inside the namespaces.

mod common;

use lab::netns::GuestNet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

const READY: &str = "lockstep-guest: ready";
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

fn lockstep() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
}

/// The default guest: kernel, initramfs, root disk image.
fn guest() -> &'static [PathBuf; 3] {
    static GUEST: OnceLock<[PathBuf; 3]> = OnceLock::new();
    GUEST.get_or_init(|| {
        let out = lockstep().args(["guest", "build"]).output().unwrap();
        assert!(out.status.success(), "guest build failed: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let l: Vec<PathBuf> = text.lines().map(PathBuf::from).collect();
        assert_eq!(l.len(), 3, "guest build prints kernel, initrd and disk: {text}");
        [l[0].clone(), l[1].clone(), l[2].clone()]
    })
}

fn sh(cmd: &str) {
    lab::netns::sh(cmd).unwrap();
}

/// Bridge, tap and veth in two fresh namespaces (10.77.`net`.0/24);
/// removed on drop.
fn topology(net: u8) -> GuestNet {
    common::require_root_net();
    GuestNet::new(&format!("{}-{net}", std::process::id()), &format!("10.77.{net}")).unwrap()
}

/// A private copy of the root disk (sparse), so tests never touch the
/// cached image and can run side by side.
fn disk_copy(name: &str) -> PathBuf {
    let dir = common::tmp_dir("network");
    let img = dir.join(format!("{name}.ext4"));
    sh(&format!("cp --sparse=always '{}' '{}'", guest()[2].display(), img.display()));
    img
}

/// The guest running in the host namespace with its console.
type Vm = common::GuestConsole;

fn start_vm(topo: &GuestNet, disk: &Path, extra: &[&str]) -> Vm {
    let [kernel, initrd, _] = guest();
    let append = format!(
        "console=ttyS0 quiet cryptomgr.notests initcall_blacklist=jent_mod_init root=/dev/vda lockstep.ip={}/24",
        topo.guest_ip()
    );
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &topo.host, env!("CARGO_BIN_EXE_lockstep"), "run", "--kernel"])
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .arg("--disk")
        .arg(disk)
        .args(["--net", "tap:tap0", "--append", &append])
        .args(extra);
    common::GuestConsole::spawn(&mut cmd, BOOT_TIMEOUT)
}

/// A minimal RESP client for the guest's redis-server.
struct Redis(BufReader<TcpStream>);

impl Redis {
    fn connect(addr: &str) -> Redis {
        let s = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(30)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        Redis(BufReader::new(s))
    }

    fn command(&mut self, args: &[&[u8]]) -> Option<Vec<u8>> {
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a);
            req.extend_from_slice(b"\r\n");
        }
        self.0.get_mut().write_all(&req).unwrap();
        let mut line = String::new();
        self.0.read_line(&mut line).unwrap();
        match line.as_bytes().first() {
            Some(b'+') | Some(b':') => Some(line.trim_end().as_bytes()[1..].to_vec()),
            Some(b'$') => {
                let n: i64 = line[1..].trim().parse().unwrap();
                if n < 0 {
                    return None;
                }
                let mut buf = vec![0u8; n as usize + 2];
                self.0.read_exact(&mut buf).unwrap();
                buf.truncate(n as usize);
                Some(buf)
            }
            _ => panic!("redis error: {line}"),
        }
    }
}

fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn host_e2fsck(img: &Path, fix: bool) -> (i32, String) {
    let out = Command::new("e2fsck").arg(if fix { "-fy" } else { "-fn" }).arg(img).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn debugfs_cat(img: &Path, file: &str) -> Vec<u8> {
    let out = Command::new("debugfs").arg("-R").arg(format!("cat {file}")).arg(img).output().unwrap();
    assert!(out.status.success(), "debugfs cat {file}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// The guest serves redis and HTTP to a client in another namespace; bulk
/// data crosses byte-exact both ways; what the guest wrote is on the image
/// after power-off, and the image checks clean.
#[test]
fn guest_serves_clients_in_a_namespace_and_its_disk_checks_clean() {
    let topo = topology(1);
    let disk = disk_copy("serve");
    let mut vm = start_vm(&topo, &disk, &[]);
    vm.wait_for(READY);
    let ip = topo.guest_ip();

    let addr = format!("{ip}:6379");
    let (pong, got, equal_len) = topo
        .in_client(move || {
            let mut r = Redis::connect(&addr);
            let pong = r.command(&[b"PING"]).unwrap();
            // 2 MiB up (client → guest) and back down (guest → client).
            let blob = pseudo_random(2 << 20, 42);
            assert_eq!(r.command(&[b"SET", b"blob", &blob]).unwrap(), b"OK");
            let got = r.command(&[b"GET", b"blob"]).unwrap();
            let equal = got == blob;
            for i in 0..50u32 {
                r.command(&[b"SET", format!("key{i}").as_bytes(), format!("value{i}").as_bytes()]);
            }
            (pong, got.len(), equal)
        })
        .unwrap();
    assert_eq!(pong, b"PONG");
    assert_eq!(got, 2 << 20);
    assert!(equal_len, "the 2 MiB value came back byte-exact");

    let url_host = ip.clone();
    let page = topo
        .in_client(move || {
            let mut s = TcpStream::connect_timeout(&format!("{url_host}:80").parse().unwrap(), Duration::from_secs(30))
                .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            s.write_all(format!("GET / HTTP/1.0\r\nHost: {url_host}\r\n\r\n").as_bytes()).unwrap();
            let mut resp = Vec::new();
            s.read_to_end(&mut resp).unwrap();
            String::from_utf8_lossy(&resp).into_owned()
        })
        .unwrap();
    assert!(page.starts_with("HTTP/1.1 200") || page.starts_with("HTTP/1.0 200"), "{page}");

    // A file written in the guest and synced, then a clean power-off.
    // (The marker is built by the shell, so the echoed command never matches.)
    vm.send("head -c 300000 /dev/urandom > /root/data.bin && sync && echo SUM$((1)):$(sha256sum < /root/data.bin)");
    vm.wait_for("SUM1:");
    vm.wait_for(" -\r\n");
    let text = vm.text();
    let guest_sum = text
        .lines()
        .find_map(|l| l.strip_prefix("SUM1:"))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .unwrap();
    vm.send("poweroff");
    assert!(vm.wait_exit().success(), "{}", vm.text());

    let (code, report) = host_e2fsck(&disk, false);
    assert_eq!(code, 0, "the root file system checks clean after power-off:\n{report}");
    assert_eq!(common::sha256_hex(&debugfs_cat(&disk, "/root/data.bin")), guest_sum);
}

/// Kill the machine mid-write: what the guest fsync'ed before is on the
/// image after the host's e2fsck replays the journal.
#[test]
fn fsynced_data_survives_killing_the_machine_mid_write() {
    let topo = topology(2);
    let disk = disk_copy("crash");
    let mut vm = start_vm(&topo, &disk, &[]);
    vm.wait_for(READY);
    vm.send("head -c 500000 /dev/urandom > /root/kept.bin && sync /root/kept.bin && sha256sum /root/kept.bin");
    vm.wait_for("  /root/kept.bin\r\n");
    let sum = vm
        .text()
        .lines()
        .find(|l| l.ends_with("  /root/kept.bin\r") || l.ends_with("  /root/kept.bin"))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .unwrap();
    // Unsynced writes in flight, then the host process dies.
    vm.send("(while true; do head -c 1000000 /dev/urandom > /root/churn.bin; done) & echo churning");
    vm.wait_for("churning");
    std::thread::sleep(Duration::from_millis(1500));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(vm.child.id() as i32), nix::sys::signal::SIGKILL).ok();
    let _ = vm.wait_exit();
    // The lockstep process is the namespace-exec'd child's only child.
    std::thread::sleep(Duration::from_millis(200));
    let (code, report) = host_e2fsck(&disk, true);
    assert!(code == 0 || code == 1, "e2fsck repaired the image (journal replay): code {code}\n{report}");
    let (code, report) = host_e2fsck(&disk, false);
    assert_eq!(code, 0, "clean after repair:\n{report}");
    assert_eq!(common::sha256_hex(&debugfs_cat(&disk, "/root/kept.bin")), sum);
}

/// `hash`, `position` and `state-hash` lines of a run's stderr.
fn hash_lines(stderr: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter(|l| l.starts_with("hash ") || l.starts_with("position ") || l.starts_with("state-hash "))
        .map(str::to_string)
        .collect()
}

/// Record the Debian guest serving a client in a namespace, writing its
/// disk and reading entropy; replay it offline (no tap, no client): same
/// console, same hash sequence, same final disk. Then again from a snapshot
/// taken in the middle.
#[test]
fn a_recorded_network_session_replays_offline_with_the_same_disk() {
    let topo = topology(3);
    let disk = disk_copy("record");
    let start = disk_copy("record-start");
    let dir = common::tmp_dir("network");
    let log = dir.join("session.log");
    let _ = std::fs::remove_dir_all(dir.join("session.log.snapshots"));
    let args = ["--record", log.to_str().unwrap(), "--hash-every", "500000000", "--snapshot-every", "1000000000"];
    let mut vm = start_vm(&topo, &disk, &args);
    vm.wait_for(READY);
    let addr = format!("{}:6379", topo.guest_ip());
    let got = topo
        .in_client(move || {
            let mut r = Redis::connect(&addr);
            let blob = pseudo_random(300_000, 7);
            r.command(&[b"SET", b"recorded", &blob]);
            r.command(&[b"GET", b"recorded"]).unwrap() == blob
        })
        .unwrap();
    assert!(got);
    vm.send("head -c 64 /dev/hwrng | od -An -tx1 | head -2; head -c 100000 /dev/urandom > /root/r.bin; sync; echo D$((1))ONE");
    vm.wait_for("D1ONE");
    vm.send("poweroff");
    assert!(vm.wait_exit().success(), "{}", vm.text());
    let console = vm.stdout.lock().unwrap().clone();
    let stderr = vm.stderr.lock().unwrap().clone();
    let hashes = hash_lines(&stderr);
    assert!(hashes.len() > 4, "{hashes:?}");
    let recorded_disk = std::fs::read(&disk).unwrap();

    let replay = |from: Option<&str>| {
        let copy = disk_copy("replayed");
        std::fs::copy(&start, &copy).unwrap();
        let mut c = lockstep();
        c.arg("replay").arg(&log).arg("--disk").arg(&copy).args(["--hash-every", "500000000"]);
        if let Some(f) = from {
            c.args(["--from", f]);
        }
        let out = c.stdin(Stdio::null()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (out, std::fs::read(&copy).unwrap())
    };
    let (out, replayed_disk) = replay(None);
    assert_eq!(hash_lines(&out.stderr), hashes, "same hash sequence and final state");
    assert_eq!(out.stdout, console, "same console output");
    assert!(replayed_disk == recorded_disk, "same disk image");

    let snaps: Vec<String> = String::from_utf8_lossy(&stderr)
        .lines()
        .filter(|l| l.starts_with("snapshot "))
        .map(|l| l.split_whitespace().last().unwrap().to_string())
        .collect();
    assert!(snaps.len() >= 2, "{snaps:?}");
    let middle = &snaps[snaps.len() / 2];
    let (out, replayed_disk) = replay(Some(middle));
    let tail = hash_lines(&out.stderr);
    assert!(tail.len() >= 2 && hashes.ends_with(&tail), "the hashes after the snapshot agree: {tail:?}");
    assert!(replayed_disk == recorded_disk, "same disk image from the snapshot");
}
