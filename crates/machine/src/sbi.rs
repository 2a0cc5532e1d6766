//! The Supervisor Binary Interface, implemented in Rust in place of M-mode
//! firmware (RISC-V SBI specification v2.0). The hart exits to the board on
//! every `ecall` from S-mode; `handle` reads a7 (extension), a6 (function)
//! and a0..a5, and answers in a0 (error) and a1 (value).

use crate::Machine;
use rv::csr::{IRQ_SSI, MIP, STIMECMP};

pub const SUCCESS: i64 = 0;
pub const ERR_FAILED: i64 = -1;
pub const ERR_NOT_SUPPORTED: i64 = -2;
pub const ERR_INVALID_PARAM: i64 = -3;
pub const ERR_ALREADY_AVAILABLE: i64 = -6;

pub const EXT_BASE: u64 = 0x10;
pub const EXT_TIME: u64 = 0x5449_4d45;
pub const EXT_IPI: u64 = 0x0073_5049;
pub const EXT_RFENCE: u64 = 0x5246_4e43;
pub const EXT_HSM: u64 = 0x0048_534d;
pub const EXT_SRST: u64 = 0x5352_5354;
pub const EXT_DBCN: u64 = 0x4442_434e;
const LEGACY_PUTCHAR: u64 = 0x01;
const LEGACY_GETCHAR: u64 = 0x02;
const LEGACY_SHUTDOWN: u64 = 0x08;

/// SBI implementation ID reported by BASE (not a registered one).
pub const IMPL_ID: u64 = 0x4c53;
const SPEC_VERSION_2_0: u64 = 2 << 24;

/// What the board must do after the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SbiOutcome {
    Continue,
    Shutdown,
    Reboot,
}

fn supported(ext: u64) -> bool {
    matches!(
        ext,
        EXT_BASE
            | EXT_TIME
            | EXT_IPI
            | EXT_RFENCE
            | EXT_HSM
            | EXT_SRST
            | EXT_DBCN
            | LEGACY_PUTCHAR
            | LEGACY_GETCHAR
            | LEGACY_SHUTDOWN
    )
}

/// Does the hart mask (`mask`, `base`) include hart 0? (SBI 3.2: a base of
/// -1 means every hart.)
fn includes_hart0(mask: u64, base: u64) -> bool {
    base == u64::MAX || (base == 0 && mask & 1 != 0)
}

/// Handle the call the hart is stopped at.
pub fn handle(m: &mut Machine) -> SbiOutcome {
    let a = |i: usize| m.hart.x(10 + i);
    let (ext, fid) = (m.hart.x(17), m.hart.x(16));
    let mut outcome = SbiOutcome::Continue;
    // Legacy extensions return only a0.
    if ext < 0x10 {
        let ret = match ext {
            LEGACY_PUTCHAR => {
                m.board.console_out.push(a(0) as u8);
                0
            }
            LEGACY_GETCHAR => m.board.console_in.pop_front().map(|b| b as i64).unwrap_or(-1),
            LEGACY_SHUTDOWN => {
                outcome = SbiOutcome::Shutdown;
                0
            }
            _ => ERR_NOT_SUPPORTED,
        };
        m.hart.set_x(10, ret as u64);
        return outcome;
    }
    let (err, val): (i64, u64) = match (ext, fid) {
        (EXT_BASE, 0) => (SUCCESS, SPEC_VERSION_2_0),
        (EXT_BASE, 1) => (SUCCESS, IMPL_ID),
        (EXT_BASE, 2) => (SUCCESS, 1),
        (EXT_BASE, 3) => (SUCCESS, supported(a(0)) as u64),
        (EXT_BASE, 4..=6) => (SUCCESS, 0), // mvendorid, marchid, mimpid
        (EXT_TIME, 0) => {
            m.hart.write_csr_m(STIMECMP, a(0));
            (SUCCESS, 0)
        }
        (EXT_IPI, 0) => {
            if includes_hart0(a(0), a(1)) {
                let mip = m.hart.read_csr(MIP).unwrap_or(0);
                m.hart.write_csr_m(MIP, mip | IRQ_SSI);
            }
            (SUCCESS, 0)
        }
        // Remote fence.i needs nothing: stores to code already dropped the
        // stale blocks. sfence.vma (with or without ASID) flushes all.
        (EXT_RFENCE, 0) => (SUCCESS, 0),
        (EXT_RFENCE, 1 | 2) => {
            m.hart.flush_translations();
            (SUCCESS, 0)
        }
        (EXT_HSM, 0) => (if a(0) == 0 { ERR_ALREADY_AVAILABLE } else { ERR_INVALID_PARAM }, 0),
        (EXT_HSM, 1) => (ERR_FAILED, 0),
        (EXT_HSM, 2) => {
            if a(0) == 0 {
                (SUCCESS, 0) // STARTED
            } else {
                (ERR_INVALID_PARAM, 0)
            }
        }
        (EXT_SRST, 0) => match a(0) {
            0 => {
                outcome = SbiOutcome::Shutdown;
                (SUCCESS, 0)
            }
            1 | 2 => {
                outcome = SbiOutcome::Reboot;
                (SUCCESS, 0)
            }
            _ => (ERR_INVALID_PARAM, 0),
        },
        (EXT_DBCN, 0) => {
            // console_write(num_bytes, base_lo, base_hi)
            let (n, addr) = (a(0), a(1) | (a(2) << 32));
            let mut buf = vec![0u8; n.min(4096) as usize];
            if m.board.ram.read(addr, &mut buf) {
                m.board.console_out.extend_from_slice(&buf);
                (SUCCESS, buf.len() as u64)
            } else {
                (ERR_INVALID_PARAM, 0)
            }
        }
        (EXT_DBCN, 1) => {
            let (n, addr) = (a(0), a(1) | (a(2) << 32));
            let k = (n as usize).min(m.board.console_in.len());
            if !m.board.ram.contains(addr, k as u64) {
                (ERR_INVALID_PARAM, 0)
            } else {
                let bytes: Vec<u8> = m.board.console_in.drain(..k).collect();
                m.board.ram.write(addr, &bytes);
                (SUCCESS, k as u64)
            }
        }
        (EXT_DBCN, 2) => {
            m.board.console_out.push(a(0) as u8);
            (SUCCESS, 0)
        }
        _ => (ERR_NOT_SUPPORTED, 0),
    };
    m.hart.set_x(10, err as u64);
    m.hart.set_x(11, val);
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::RAM_BASE;
    use rv::csr::{MENVCFG, MENVCFG_STCE, PRV_S};

    /// A machine stopped at an `ecall` from S with the given registers.
    fn call(ext: u64, fid: u64, args: &[u64]) -> (Machine, SbiOutcome) {
        let mut m = Machine::new_firmware(1 << 20);
        m.hart.set_prv(PRV_S);
        m.hart.write_csr_m(MENVCFG, MENVCFG_STCE);
        m.hart.set_x(17, ext);
        m.hart.set_x(16, fid);
        for (i, &a) in args.iter().enumerate() {
            m.hart.set_x(10 + i, a);
        }
        let out = handle(&mut m);
        (m, out)
    }

    fn ret(m: &Machine) -> (i64, u64) {
        (m.hart.x(10) as i64, m.hart.x(11))
    }

    #[test]
    fn base_reports_version_and_probes() {
        assert_eq!(ret(&call(EXT_BASE, 0, &[]).0), (SUCCESS, 2 << 24));
        assert_eq!(ret(&call(EXT_BASE, 3, &[EXT_TIME]).0), (SUCCESS, 1));
        assert_eq!(ret(&call(EXT_BASE, 3, &[0x0123_4567]).0), (SUCCESS, 0));
    }

    #[test]
    fn unknown_extensions_and_functions_are_not_supported() {
        assert_eq!(ret(&call(0x0abc_def0, 0, &[]).0).0, ERR_NOT_SUPPORTED);
        assert_eq!(ret(&call(EXT_TIME, 7, &[]).0).0, ERR_NOT_SUPPORTED);
        assert_eq!(ret(&call(EXT_RFENCE, 3, &[]).0).0, ERR_NOT_SUPPORTED); // hfence
    }

    #[test]
    fn set_timer_programs_stimecmp() {
        let (m, _) = call(EXT_TIME, 0, &[12345]);
        assert_eq!(m.hart.read_csr(STIMECMP), Some(12345));
        assert!(m.hart.next_internal_deadline().is_some());
    }

    #[test]
    fn ipi_to_hart0_raises_ssip() {
        let (m, _) = call(EXT_IPI, 0, &[1, 0]);
        assert_eq!(m.hart.read_csr(MIP).unwrap() & IRQ_SSI, IRQ_SSI);
        let (m, _) = call(EXT_IPI, 0, &[2, 0]); // hart 1 does not exist
        assert_eq!(m.hart.read_csr(MIP).unwrap() & IRQ_SSI, 0);
    }

    #[test]
    fn system_reset_and_hsm() {
        assert_eq!(call(EXT_SRST, 0, &[0, 0]).1, SbiOutcome::Shutdown);
        assert_eq!(call(EXT_SRST, 0, &[1, 0]).1, SbiOutcome::Reboot);
        assert_eq!(ret(&call(EXT_SRST, 0, &[9, 0]).0).0, ERR_INVALID_PARAM);
        assert_eq!(ret(&call(EXT_HSM, 2, &[0]).0), (SUCCESS, 0));
        assert_eq!(ret(&call(EXT_HSM, 0, &[0, 0, 0]).0).0, ERR_ALREADY_AVAILABLE);
        assert_eq!(ret(&call(EXT_HSM, 2, &[3]).0).0, ERR_INVALID_PARAM);
    }

    #[test]
    fn debug_console_writes_guest_memory() {
        let mut m = Machine::new_firmware(1 << 20);
        m.board.ram.write(RAM_BASE + 0x100, b"hello");
        m.hart.set_x(17, EXT_DBCN);
        m.hart.set_x(16, 0);
        m.hart.set_x(10, 5);
        m.hart.set_x(11, RAM_BASE + 0x100);
        m.hart.set_x(12, 0);
        handle(&mut m);
        assert_eq!(ret(&m), (SUCCESS, 5));
        assert_eq!(m.board.console_out, b"hello");
        // An address outside RAM is refused, not a crash.
        m.hart.set_x(17, EXT_DBCN);
        m.hart.set_x(16, 0);
        m.hart.set_x(11, 0x10);
        handle(&mut m);
        assert_eq!(ret(&m).0, ERR_INVALID_PARAM);
    }
}
