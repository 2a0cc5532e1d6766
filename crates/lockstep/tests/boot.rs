//! End-to-end: boot the default guest (Debian's riscv64 kernel, busybox
//! initramfs and ext4 root disk, built by `lockstep guest build` on first
//! use) and drive its console as a user would.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

const READY: &str = "lockstep-guest: ready";
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

fn lockstep() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
}

/// Build the default guest once per test binary: (kernel, initramfs).
fn guest() -> &'static (PathBuf, PathBuf) {
    &guest_files().0
}

/// The default guest's root disk.
fn guest_disk() -> &'static PathBuf {
    &guest_files().1
}

fn guest_files() -> &'static ((PathBuf, PathBuf), PathBuf) {
    static GUEST: OnceLock<((PathBuf, PathBuf), PathBuf)> = OnceLock::new();
    GUEST.get_or_init(|| {
        let out = lockstep().args(["guest", "build"]).output().unwrap();
        assert!(out.status.success(), "guest build failed: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<PathBuf> = text.lines().map(PathBuf::from).collect();
        assert_eq!(lines.len(), 3, "guest build prints kernel, initramfs and disk: {text}");
        ((lines[0].clone(), lines[1].clone()), lines[2].clone())
    })
}

/// One guest at a time boots from the default root disk (a second `run`
/// would be refused while the first holds it).
fn default_disk() -> MutexGuard<'static, ()> {
    static DISK: Mutex<()> = Mutex::new(());
    DISK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running guest with its console; holds the default disk if it boots
/// from it.
struct Vm {
    console: common::GuestConsole,
    _disk: Option<MutexGuard<'static, ()>>,
}

impl Vm {
    fn start(extra: &[&str]) -> Vm {
        guest();
        let disk = (!extra.iter().any(|a| *a == "--disk" || *a == "--kernel")).then(default_disk);
        let console = common::GuestConsole::spawn(lockstep().arg("run").args(extra), BOOT_TIMEOUT);
        Vm { console, _disk: disk }
    }
}

impl std::ops::Deref for Vm {
    type Target = common::GuestConsole;
    fn deref(&self) -> &common::GuestConsole {
        &self.console
    }
}

impl std::ops::DerefMut for Vm {
    fn deref_mut(&mut self) -> &mut common::GuestConsole {
        &mut self.console
    }
}

#[test]
fn boots_to_a_shell_that_runs_commands_and_powers_off() {
    let mut vm = Vm::start(&[]);
    vm.wait_for(READY);
    vm.send("uname -m");
    vm.wait_for("riscv64\r\n");
    vm.send("grep -c '^hart' /proc/cpuinfo; grep '^isa' /proc/cpuinfo");
    vm.wait_for("isa\t\t: rv64imafdc");
    // A file written in the guest hashes as the same bytes do on the host.
    let data = b"lockstep checks its guest: 0123456789 abcdefghijklmnopqrstuvwxyz\n";
    let text = std::str::from_utf8(data).unwrap().trim_end();
    vm.send(&format!("printf '%s\\n' '{text}' > /tmp/f; sha256sum /tmp/f"));
    let want = format!("{}  /tmp/f", common::sha256_hex(data));
    vm.wait_for(&want);
    // virtio-rng: the driver bound, and it serves bytes.
    vm.send("cat /sys/class/misc/hw_random/rng_current");
    vm.wait_for("virtio_rng.0");
    vm.send("dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n' | wc -c; echo hwrng-done");
    vm.wait_for("64\r\nhwrng-done");
    vm.send("poweroff");
    let st = vm.wait_exit();
    assert!(st.success(), "exit {st}; console:\n{}", vm.text());
}

#[test]
fn reboot_boots_again() {
    let mut vm = Vm::start(&[]);
    vm.wait_for(READY);
    vm.send("reboot");
    vm.wait_for_n(READY, 2);
    vm.send("poweroff");
    assert!(vm.wait_exit().success());
}

#[test]
fn poweroff_workload_exits_zero_without_input() {
    let mut vm = Vm::start(&["--append", "console=ttyS0 quiet lockstep.run=poweroff"]);
    let st = vm.wait_exit();
    assert!(st.success(), "exit {st}; console:\n{}", vm.text());
    assert!(vm.text().contains(READY));
}

/// The root disk: redis-server answers and keeps what it was told across a
/// reboot, the HTTP server serves /srv/www, / is ext4 read-write, and a
/// power-off leaves the image clean.
#[test]
fn root_disk_serves_redis_and_http_and_powers_off_clean() {
    let mut vm = Vm::start(&[]);
    vm.wait_for(READY);
    vm.send("redis-cli set lockstep-key lockstep-value; echo set-done");
    vm.wait_for("OK\r\nset-done");
    vm.send("reboot");
    vm.wait_for_n(READY, 2);
    vm.send(
        "redis-cli get lockstep-key | tr -d '\"'; wget -qO- http://127.0.0.1/ | grep -c 'lockstep guest'; \
         grep -c ' / ext4 rw' /proc/mounts",
    );
    vm.wait_for("lockstep-value\r\n1\r\n1\r\n");
    vm.send("poweroff");
    let st = vm.wait_exit();
    assert!(st.success(), "exit {st}; console:\n{}", vm.text());
    // Still holding the disk (vm is alive): nothing else writes it now.
    let e2fsck = ["e2fsck", "/usr/sbin/e2fsck", "/sbin/e2fsck"]
        .iter()
        .find_map(|p| Command::new(p).arg("-fn").arg(guest_disk()).output().ok())
        .expect("e2fsck (e2fsprogs, which the guest build needs) is installed");
    assert!(
        e2fsck.status.success(),
        "the root disk is not clean after power-off:\n{}",
        String::from_utf8_lossy(&e2fsck.stdout)
    );
}

#[test]
fn kernel_panic_exits_nonzero_with_the_panic_text() {
    let mut vm = Vm::start(&[]);
    vm.wait_for(READY);
    vm.send("echo c > /proc/sysrq-trigger");
    let st = vm.wait_exit();
    assert_eq!(st.code(), Some(1), "console:\n{}", vm.text());
    assert!(vm.text().contains("Kernel panic - not syncing"));
}

#[test]
fn bad_kernels_and_initrds_get_one_line_errors() {
    let (kernel, initrd) = guest();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("boot-bad");
    std::fs::create_dir_all(&dir).unwrap();
    let run = |args: &[&str]| {
        let out = lockstep().arg("run").args(args).stdin(Stdio::null()).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let k = kernel.to_str().unwrap();
    // Missing kernel.
    let (code, err) = run(&["--kernel", "/nonexistent/Image"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("cannot read kernel '/nonexistent/Image'") && err.lines().count() == 1, "{err}");
    // Not a kernel.
    let junk = dir.join("junk");
    std::fs::write(&junk, vec![0x55u8; 4096]).unwrap();
    let (code, err) = run(&["--kernel", junk.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("is neither a RISC-V Image"), "{err}");
    // A kernel for another machine (an x86-64 ELF).
    let (code, err) = run(&["--kernel", env!("CARGO_BIN_EXE_lockstep")]);
    assert_eq!(code, Some(2));
    assert!(err.contains("not RISC-V"), "{err}");
    // Missing initrd.
    let (code, err) = run(&["--kernel", k, "--initrd", "/nonexistent/initrd"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("cannot read initrd"), "{err}");
    // Too little memory for kernel + initrd.
    let (code, err) = run(&["--kernel", k, "--initrd", initrd.to_str().unwrap(), "--mem", "16M"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("do not fit"), "{err}");
    // A corrupt initrd: the kernel cannot start init and panics: non-zero.
    let corrupt = dir.join("corrupt.cpio");
    let mut bytes = std::fs::read(initrd).unwrap();
    bytes.truncate(bytes.len() / 3);
    std::fs::write(&corrupt, bytes).unwrap();
    let out = lockstep()
        .args(["run", "--kernel", k, "--initrd", corrupt.to_str().unwrap(), "--append", "console=ttyS0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked at"), "no Rust panic");
}

#[test]
fn vm_toml_describes_a_guest_and_flags_override_it() {
    let (kernel, initrd) = guest();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vmtoml");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Relative paths are relative to the file.
    std::os::unix::fs::symlink(kernel, dir.join("Image")).unwrap();
    std::os::unix::fs::symlink(initrd, dir.join("initrd.cpio")).unwrap();
    let vm = dir.join("vm.toml");
    std::fs::write(
        &vm,
        "kernel = \"Image\"\ninitrd = \"initrd.cpio\"\nappend = \"console=ttyS0 quiet lockstep.run=poweroff\"\nmem = \"256M\"\n",
    )
    .unwrap();
    let out = lockstep().arg("run").arg(&vm).stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(READY));
    // A flag overrides the file: a tiny instruction limit stops the boot.
    let out = lockstep().arg("run").arg(&vm).args(["--max-insns", "1000000"]).stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("instruction limit"));
    // An unknown key is an error that names it.
    std::fs::write(&vm, "kernel = \"Image\"\nnot-a-flag = true\n").unwrap();
    let out = lockstep().arg("run").arg(&vm).stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not-a-flag") && err.trim_end().lines().count() == 1, "{err}");
}

/// Collects guest output; never types.
struct NullConsole(Vec<u8>);

impl machine::HostIo for NullConsole {
    fn console_write(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
    fn wait(&mut self, _: Duration) -> machine::HostInput {
        machine::HostInput::Nothing
    }
}

/// Determinism: with idle time taken from the guest's own deadlines (no
/// host clock), two boots of the real kernel to power-off end at the same
/// position with the same registers, RAM and console output.
#[test]
fn two_boots_without_host_time_are_identical() {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let (kernel, initrd) = guest();
    let boot = || {
        let mut m = machine::Machine::new_firmware(256 << 20);
        m.realtime = false;
        m.rng_seed = Some([7; 32]);
        m.boot_linux(kernel, Some(initrd), "console=ttyS0 quiet lockstep.run=poweroff").unwrap();
        let mut con = NullConsole(Vec::new());
        let stop = m.run_linux(&mut con, Some(20_000_000_000)).unwrap();
        assert_eq!(stop, machine::Stop::PowerOff, "console:\n{}", String::from_utf8_lossy(&con.0));
        let mut h = DefaultHasher::new();
        m.board.ram.bytes().hash(&mut h);
        (0..32).map(|i| m.hart.x(i)).collect::<Vec<_>>().hash(&mut h);
        (m.hart.position(), m.hart.pc(), h.finish(), con.0)
    };
    let a = boot();
    let b = boot();
    assert_eq!((a.0, a.1, a.2), (b.0, b.1, b.2));
    assert_eq!(a.3, b.3, "console output differs");
    assert!(String::from_utf8_lossy(&a.3).contains(READY));
}

/// virtio-blk: the guest reads the image byte-exact, writes land in the
/// file, a read-only disk refuses writes, and bad images are one-line errors.
#[test]
fn disk_reads_writes_and_bad_images() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("disk");
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("disk.img");
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| ((i / 512) % 251) as u8 ^ (i as u8)).collect();
    std::fs::write(&img, &data).unwrap();
    let mut vm = Vm::start(&["--disk", img.to_str().unwrap()]);
    vm.wait_for(READY);
    vm.send("dd if=/dev/vda bs=64k 2>/dev/null | sha256sum");
    vm.wait_for(&format!("{}  -", common::sha256_hex(&data)));
    vm.send("echo lockstep-disk-write | dd of=/dev/vda bs=512 seek=7 conv=sync,fsync 2>/dev/null; echo written");
    vm.wait_for("written\r\n");
    vm.send("poweroff");
    assert!(vm.wait_exit().success());
    let after = std::fs::read(&img).unwrap();
    assert_eq!(&after[7 * 512..7 * 512 + 20], b"lockstep-disk-write\n");
    assert_eq!(&after[..7 * 512], &data[..7 * 512], "the rest is untouched");
    assert_eq!(&after[8 * 512..], &data[8 * 512..]);

    // Read-only: a write fails in the guest and the file does not change.
    let mut vm = Vm::start(&["--disk", img.to_str().unwrap(), "--disk-readonly"]);
    vm.wait_for(READY);
    vm.send("echo x | dd of=/dev/vda bs=512 seek=9 conv=sync,fsync; echo rc=$?");
    vm.wait_for("rc=1");
    vm.send("poweroff");
    assert!(vm.wait_exit().success());
    assert_eq!(std::fs::read(&img).unwrap(), after);

    // Missing and too-short images.
    let run = |disk: &str| {
        let out = lockstep().args(["run", "--disk", disk]).stdin(Stdio::null()).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run("/nonexistent/disk.img");
    assert_eq!(code, Some(2));
    assert!(err.contains("cannot open disk '/nonexistent/disk.img'") && err.trim_end().lines().count() == 1, "{err}");
    let short = dir.join("short.img");
    std::fs::write(&short, [0u8; 100]).unwrap();
    let (code, err) = run(short.to_str().unwrap());
    assert_eq!(code, Some(2));
    assert!(err.contains("shorter than one 512-byte sector"), "{err}");
}

/// The network card end to end with the in-process backend (no tap, no
/// privileges): the guest pings a simulated host that answers ARP and ICMP
/// echo. Frames enter through `Machine::inject` at run-loop boundaries, and
/// with idle time from the guest's own deadlines the whole run is a
/// function of its inputs: two runs end at the same position and state.
#[test]
fn guest_pings_an_in_process_peer_deterministically() {
    use machine::virtio::net::{Net, HDR_LEN};
    use machine::virtio::netsim::Responder;
    use machine::{HostInput, HostIo};
    use std::collections::VecDeque;
    use std::hash::{DefaultHasher, Hash, Hasher};

    struct PeerIo {
        out: Vec<u8>,
        typed: bool,
        pending: VecDeque<HostInput>,
        peer: Responder,
    }
    impl HostIo for PeerIo {
        fn console_write(&mut self, bytes: &[u8]) {
            self.out.extend_from_slice(bytes);
        }
        fn wait(&mut self, _: Duration) -> HostInput {
            if !self.typed && String::from_utf8_lossy(&self.out).contains(READY) {
                self.typed = true;
                let cmd = "ip addr add 10.0.2.15/24 dev eth0; ip link set eth0 up; \
                           ping -c 3 -W 5 10.0.2.2; poweroff\n";
                return HostInput::Console(cmd.as_bytes().to_vec());
            }
            self.pending.pop_front().unwrap_or(HostInput::Nothing)
        }
        fn send_frame(&mut self, nic: usize, packet: &[u8]) {
            assert_eq!(nic, 0);
            // Frames cross the host boundary behind a 12-byte virtio-net
            // header (all zero without offloads).
            let (hdr, frame) = packet.split_at(HDR_LEN);
            assert!(hdr.iter().all(|&b| b == 0));
            if let Some(reply) = self.peer.answer(frame) {
                let mut data = vec![0u8; HDR_LEN];
                data.extend_from_slice(&reply);
                self.pending.push_back(HostInput::Frame { nic, data });
            }
        }
    }

    let (kernel, initrd) = guest();
    let run = || {
        let mut m = machine::Machine::new_firmware(256 << 20);
        m.realtime = false;
        m.rng_seed = Some([9; 32]);
        m.add_virtio(Box::new(Net::new([0x52, 0x54, 0, 0x12, 0x34, 0x56]))).unwrap();
        m.boot_linux(kernel, Some(initrd), "console=ttyS0 quiet cryptomgr.notests").unwrap();
        let mut io = PeerIo {
            out: Vec::new(),
            typed: false,
            pending: VecDeque::new(),
            peer: Responder::new([0x52, 0x54, 0, 0, 0, 2], [10, 0, 2, 2]),
        };
        let stop = m.run_linux(&mut io, Some(40_000_000_000)).unwrap();
        let text = String::from_utf8_lossy(&io.out).into_owned();
        assert_eq!(stop, machine::Stop::PowerOff, "console:\n{text}");
        let mut h = DefaultHasher::new();
        m.board.ram.bytes().hash(&mut h);
        (m.hart.position(), h.finish(), text, io.peer.echoes)
    };
    let a = run();
    assert!(a.2.contains("3 packets transmitted, 3 packets received"), "console:\n{}", a.2);
    assert_eq!(a.3, 3, "the peer answered three echo requests");
    let b = run();
    assert_eq!((a.0, a.1), (b.0, b.1), "same inputs at the same positions, same machine");
    assert_eq!(a.2, b.2);
}
