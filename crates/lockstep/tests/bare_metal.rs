//! Hand-written M-mode test programs (`tests/bare/*.S`) for traps,
//! delegation, interrupts, the MMU, CSRs and atomics, each run through the
//! bare-metal runner exactly as a user would: `lockstep run --elf`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn lockstep() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
}

fn build(name: &str) -> PathBuf {
    let src_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bare").join(format!("{name}.S"));
    let src = std::fs::read_to_string(&src_path).unwrap();
    common::build_elf(&common::tmp_dir("bare"), name, &src, &[])
}

fn run_elf(elf: &Path, extra: &[&str]) -> Output {
    lockstep().arg("run").arg("--elf").arg(elf).args(extra).output().unwrap()
}

fn assert_passes(name: &str) {
    let out = run_elf(&build(name), &["--max-insns", "50000000"]);
    assert!(
        out.status.success(),
        "{name}: exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn traps() {
    assert_passes("traps");
}

#[test]
fn interrupts() {
    assert_passes("interrupts");
}

#[test]
fn delegation() {
    assert_passes("delegation");
}

#[test]
fn mmu() {
    assert_passes("mmu");
}

#[test]
fn csrs() {
    assert_passes("csrs");
}

#[test]
fn atomics_and_self_modifying_code() {
    assert_passes("atomics");
}

/// The same programs, built with `-DQEMU`, pass on QEMU's `spike` board
/// too: a check of the tests themselves against an independent
/// implementation (QEMU's HTIF ends the run when `tohost` is written).
#[test]
fn hand_written_programs_also_pass_on_qemu() {
    common::require("qemu-system-riscv64");
    let dir = common::tmp_dir("bare-qemu");
    for name in ["traps", "interrupts", "delegation", "mmu", "csrs", "atomics"] {
        let src_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bare").join(format!("{name}.S"));
        let src = std::fs::read_to_string(&src_path).unwrap();
        let elf = common::build_elf(&dir, name, &src, &["-DQEMU"]);
        let out = Command::new("timeout")
            .args(["30", "qemu-system-riscv64", "-M", "spike", "-bios", "none", "-nographic", "-kernel"])
            .arg(&elf)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name} fails on QEMU: test {:?}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn tiny(dir: &str, name: &str, body: &str) -> PathBuf {
    let src = format!("#include \"macros.h\"\nmain:\n{body}\n");
    common::build_elf(&common::tmp_dir(dir), name, &src, &[])
}

#[test]
fn failing_test_number_is_reported_with_exit_1() {
    let elf = tiny("cli", "fail3", "    TEST(3)\n    j fail");
    let out = run_elf(&elf, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "FAIL: test 3");
}

#[test]
fn instruction_limit_exits_2_with_one_line() {
    let elf = tiny("cli", "spin", "1:  j 1b");
    let out = run_elf(&elf, &["--max-insns", "100000"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("lockstep: error: instruction limit of 100000 reached"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn guest_stuck_in_wfi_is_an_error_not_a_hang() {
    let elf = tiny("cli", "wfi", "    csrw mie, x0\n1:  wfi\n    j 1b");
    let out = run_elf(&elf, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("waits for an interrupt"));
}

#[test]
fn bad_inputs_get_one_line_errors() {
    let dir = common::tmp_dir("cli");
    // Missing file.
    let out = run_elf(Path::new("/nonexistent/x.elf"), &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/x.elf") && err.lines().count() == 1, "{err}");
    // Not an ELF.
    let junk = dir.join("junk.elf");
    std::fs::write(&junk, b"this is not an ELF file at all").unwrap();
    let out = run_elf(&junk, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a 64-bit ELF"));
    // An ELF for another machine: the test binary itself.
    let out = run_elf(&std::env::current_exe().unwrap(), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not RISC-V"));
    // A segment outside RAM: link at address 0.
    let src = "    .text\n    .globl _start\n_start: j _start\n    .data\n    .globl tohost\ntohost: .quad 0\n";
    let elf =
        common::build_elf(&dir, "low", src, &["-Wl,--section-start=.text.init=0x1000,--section-start=.text=0x1000"]);
    let out = run_elf(&elf, &["--mem", "16M"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("outside RAM"), "{err}");
    // No tohost symbol.
    let src = "    .section .text.init\n    .globl _start\n_start: j _start\n";
    let elf = common::build_elf(&dir, "notohost", src, &[]);
    let out = run_elf(&elf, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no 'tohost' symbol"));
    // A wrong flag: clap's usage error, exit 2.
    let out = lockstep().args(["run", "--no-such-flag"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    // No panic backtrace anywhere.
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}
