//! Built-in bare-metal programs, assembled in Rust with `rv::asm`: the
//! benchmark loops and the demo. They need no cross toolchain, so `lockstep
//! bench` and `lockstep demo` work on a machine with only Rust.

use crate::layout::RAM_BASE;
use crate::ram::Ram;
use rv::asm::*;
use rv::csr::{MEPC, MSTATUS, MTVEC, SATP};

/// A program: chunks to copy into RAM, the entry point, and `tohost`.
pub struct Program {
    pub chunks: Vec<(u64, Vec<u8>)>,
    pub entry: u64,
    pub tohost: u64,
    /// Guest instructions the measured loop retires (for MIPS figures).
    pub loop_insns: u64,
}

impl Program {
    pub fn load(&self, ram: &mut Ram) {
        for (addr, bytes) in &self.chunks {
            ram.write(*addr, bytes);
        }
    }
}

const TOHOST: u64 = RAM_BASE + 0x3000;
const M_CODE: u64 = RAM_BASE;
const M_HANDLER: u64 = RAM_BASE + 0x800;
const U_CODE_PHYS: u64 = RAM_BASE + 0x1000;
const DATA_PHYS: u64 = RAM_BASE + 0x2000;
const ROOT_PT: u64 = RAM_BASE + 0x10000;
const L1_PT: u64 = RAM_BASE + 0x11000;
const L0_PT: u64 = RAM_BASE + 0x12000;
/// User virtual addresses.
const U_CODE: u64 = 0x1000;
const U_DATA: u64 = 0x2000;

/// Instructions in one iteration of the benchmark loop.
pub const LOOP_BODY: u64 = 7;

/// The benchmark loop: one load, one store, five ALU ops and the branch,
/// `iters` times; `data` holds the data page address. Ends at its last
/// instruction, falling through.
fn loop_body(iters: u64, data: u64) -> Vec<u32> {
    let mut w = li64(T0, iters);
    w.extend(li64(A4, data));
    w.extend([
        ld(A5, A4, 0),
        addi(A0, A0, 1),
        xor(A1, A1, A0),
        add(A2, A2, A1),
        sd(A2, A4, 8),
        addi(T0, T0, -1),
        bne(T0, ZERO, -24),
    ]);
    w
}

/// "tohost = 1; spin" at the current point.
fn pass() -> Vec<u32> {
    let mut w = li64(T1, TOHOST);
    w.extend([addi(T2, ZERO, 1), sd(T2, T1, 0), jal(ZERO, 0)]);
    w
}

/// (a) the loop in M-mode, no translation.
pub fn int_loop_m(iters: u64) -> Program {
    let mut w = loop_body(iters, DATA_PHYS);
    w.extend(pass());
    Program { chunks: vec![(M_CODE, to_bytes(&w))], entry: M_CODE, tohost: TOHOST, loop_insns: iters * LOOP_BODY }
}

fn pte(phys: u64, flags: u64) -> u64 {
    ((phys >> 12) << 10) | flags
}

/// (b) the same loop in U-mode under Sv39 with 4 KiB pages; `ecall` back to
/// M-mode ends it.
pub fn int_loop_u_sv39(iters: u64) -> Program {
    const V: u64 = 1;
    const R: u64 = 2;
    const W: u64 = 4;
    const X: u64 = 8;
    const U: u64 = 16;
    const A: u64 = 64;
    const D: u64 = 128;
    let mut m = li64(T0, M_HANDLER);
    m.push(csrrw(ZERO, MTVEC, T0));
    m.extend(li64(T0, (8 << 60) | (ROOT_PT >> 12)));
    m.push(csrrw(ZERO, SATP, T0));
    m.push(sfence_vma(0, 0));
    // mstatus.MPP = U (0): clear both bits.
    m.extend(li64(T0, 3 << 11));
    m.push(csrrc(ZERO, MSTATUS, T0));
    m.extend(li64(T0, U_CODE));
    m.push(csrrw(ZERO, MEPC, T0));
    m.push(MRET);
    let mut u = loop_body(iters, U_DATA);
    u.push(ECALL);
    let handler = pass();
    let tables = [
        (ROOT_PT, pte(L1_PT, V)),
        (L1_PT, pte(L0_PT, V)),
        (L0_PT + 8 * (U_CODE >> 12), pte(U_CODE_PHYS, V | R | X | U | A)),
        (L0_PT + 8 * (U_DATA >> 12), pte(DATA_PHYS, V | R | W | U | A | D)),
    ];
    let mut chunks = vec![(M_CODE, to_bytes(&m)), (M_HANDLER, to_bytes(&handler)), (U_CODE_PHYS, to_bytes(&u))];
    chunks.extend(tables.iter().map(|&(a, v)| (a, v.to_le_bytes().to_vec())));
    Program { chunks, entry: M_CODE, tohost: TOHOST, loop_insns: iters * LOOP_BODY }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BareOutcome, Machine};

    fn run(p: &Program) -> Machine {
        let mut m = Machine::new(1 << 20);
        p.load(&mut m.board.ram);
        m.hart.set_pc(p.entry);
        assert_eq!(m.run_bare(p.tohost, 10_000_000).unwrap(), BareOutcome::Pass);
        m
    }

    #[test]
    fn m_mode_loop_computes_and_passes() {
        let m = run(&int_loop_m(1000));
        assert_eq!(m.hart.x(10), 1000); // a0 counted every iteration
        assert_eq!(m.hart.x(5), 0);
    }

    #[test]
    fn u_mode_loop_under_sv39_computes_the_same() {
        let mm = run(&int_loop_m(1000));
        let mu = run(&int_loop_u_sv39(1000));
        for r in [10, 11, 12, 15] {
            assert_eq!(mm.hart.x(r), mu.hart.x(r), "x{r}");
        }
        // The store went through the page table to the data page.
        assert_eq!(mu.board.ram.read_u64(DATA_PHYS + 8), Some(mu.hart.x(12)));
        // Ended by ecall from U.
        assert_eq!(mu.hart.csrs().mcause, 8);
    }

    #[test]
    fn dirty_pages_cover_loader_and_guest_writes() {
        let p = int_loop_m(10);
        let mut m = Machine::new(1 << 20);
        p.load(&mut m.board.ram);
        m.hart.set_pc(p.entry);
        let loaded = m.take_dirty_pages();
        assert_eq!(loaded, vec![0], "the program's one page");
        m.run_bare(p.tohost, 10_000).unwrap();
        // The loop stores to the data page (2), the end writes tohost (3).
        assert_eq!(m.take_dirty_pages(), vec![2, 3]);
        assert!(m.take_dirty_pages().is_empty());
    }

    #[test]
    fn position_is_exact_and_repeatable() {
        let a = run(&int_loop_m(5000));
        let b = run(&int_loop_m(5000));
        assert_eq!(a.hart.position(), b.hart.position());
    }
}
