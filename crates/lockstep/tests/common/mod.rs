//! Shared helpers for tests that build RISC-V programs with the host's cross
//! toolchain (installed by `scripts/test-deps.sh`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const CROSS_GCC: &str = "riscv64-linux-gnu-gcc";

/// Linker script for bare-metal programs: code at the start of RAM, the
/// differential-test body and data at fixed addresses so that both engines
/// see one layout.
pub const LINKER_SCRIPT: &str = r#"
OUTPUT_ARCH(riscv)
ENTRY(_start)
SECTIONS
{
  . = 0x80000000;
  .text.init : { *(.text.init) }
  . = 0x80010000;
  .text : { *(.text) *(.text.*) }
  . = 0x80100000;
  .data : { *(.data) *(.data.*) *(.sdata) *(.sdata.*) *(.rodata) *(.rodata.*) *(.bss) *(.sbss) }
  . = ALIGN(0x1000);
  .tohost : { *(.tohost) }
  /DISCARD/ : { *(.note.*) *(.comment) *(.eh_frame) }
}
"#;

pub fn tmp_dir(sub: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(sub);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Fail loudly (never skip) when a test tool is missing.
pub fn require(tool: &str) {
    let ok = Command::new(tool).arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(ok, "`{tool}` is missing: run `bash scripts/test-deps.sh` (the README's test command does)");
}

/// Assemble and link `src` (assembly, run through the C preprocessor) into
/// a static RV64GC ELF in `dir`. `extra` are further gcc arguments.
pub fn build_elf(dir: &Path, name: &str, src: &str, extra: &[&str]) -> PathBuf {
    require(CROSS_GCC);
    let s = dir.join(format!("{name}.S"));
    let ld = dir.join(format!("{name}.ld"));
    let elf = dir.join(format!("{name}.elf"));
    std::fs::write(&s, src).unwrap();
    std::fs::write(&ld, LINKER_SCRIPT).unwrap();
    let out = Command::new(CROSS_GCC)
        .args(["-march=rv64gc", "-mabi=lp64d", "-static", "-nostdlib", "-nostartfiles", "-mcmodel=medany"])
        .arg("-I")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bare"))
        .arg("-T")
        .arg(&ld)
        .args(extra)
        .arg("-o")
        .arg(&elf)
        .arg(&s)
        .output()
        .expect("run the cross compiler");
    assert!(out.status.success(), "{name}: assembling failed:\n{}", String::from_utf8_lossy(&out.stderr));
    elf
}

/// SHA-256 of `data` in hex, by the host's `sha256sum`.
pub fn sha256_hex(data: &[u8]) -> String {
    use std::io::Write;
    use std::process::Stdio;
    let mut c = Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    c.stdin.take().unwrap().write_all(data).unwrap();
    let out = c.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

/// Network tests build namespaces and taps: they need root, `ip` and
/// /dev/net/tun. Fail loudly (never skip) without them.
pub fn require_root_net() {
    assert!(nix::unistd::geteuid().is_root(), "network tests need root (namespaces, bridges, taps)");
    assert!(Path::new("/dev/net/tun").exists(), "network tests need /dev/net/tun");
    let ok = Command::new("ip").arg("-V").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(ok, "`ip` is missing: run `bash scripts/test-deps.sh` (the README's test command does)");
}

/// A guest's `lockstep run` driven through its console: stdin to type on,
/// stdout and stderr captured as they arrive (together, and each alone).
/// The process is killed when this is dropped. Every wait fails the test
/// after `timeout`, with the console so far.
pub struct GuestConsole {
    captured: lab::capture::Captured,
    timeout: Duration,
}

impl std::ops::Deref for GuestConsole {
    type Target = lab::capture::Captured;
    fn deref(&self) -> &Self::Target {
        &self.captured
    }
}

impl GuestConsole {
    pub fn spawn(cmd: &mut Command, timeout: Duration) -> GuestConsole {
        GuestConsole { captured: lab::capture::Captured::spawn(cmd).unwrap(), timeout }
    }

    /// Wait until `needle` has appeared `count` times.
    pub fn wait_for_n(&mut self, needle: &str, count: usize) {
        let t = Instant::now();
        while self.text().matches(needle).count() < count {
            if t.elapsed() > self.timeout {
                panic!("timed out waiting for {needle:?} (x{count}); console so far:\n{}", self.text());
            }
            if let Ok(Some(st)) = self.captured.child.try_wait() {
                panic!("lockstep exited ({st}) before {needle:?}; console:\n{}", self.text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_for(&mut self, needle: &str) {
        self.wait_for_n(needle, 1);
    }

    /// Type a line.
    pub fn send(&mut self, line: &str) {
        self.captured.send(line).unwrap();
    }

    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        self.captured.wait_exit(self.timeout).unwrap()
    }
}
