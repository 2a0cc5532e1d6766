//! A tiny assembler: encoders for the instructions that built-in programs
//! (the benchmark loops, the demo, unit tests) need. It is not a general
//! assembler; test programs written by hand are built with the host's
//! `riscv64-linux-gnu` toolchain instead.
//!
//! Not part of the engine: compiled only for tests and with the
//! `test-utils` feature (which `machine/test-utils` turns on).

pub const ZERO: u32 = 0;
pub const RA: u32 = 1;
pub const SP: u32 = 2;
pub const T0: u32 = 5;
pub const T1: u32 = 6;
pub const T2: u32 = 7;
pub const A0: u32 = 10;
pub const A1: u32 = 11;
pub const A2: u32 = 12;
pub const A3: u32 = 13;
pub const A4: u32 = 14;
pub const A5: u32 = 15;

/// Any R-type instruction.
pub fn r(op: u32, f3: u32, f7: u32, rd: u32, rs1: u32, rs2: u32) -> u32 {
    (f7 << 25) | (rs2 << 20) | (rs1 << 15) | (f3 << 12) | (rd << 7) | op
}
/// Any I-type instruction.
pub fn i(op: u32, f3: u32, rd: u32, rs1: u32, imm: i32) -> u32 {
    ((imm as u32 & 0xfff) << 20) | (rs1 << 15) | (f3 << 12) | (rd << 7) | op
}
/// Any S-type instruction.
pub fn s(op: u32, f3: u32, rs1: u32, rs2: u32, imm: i32) -> u32 {
    let imm = imm as u32;
    (((imm >> 5) & 0x7f) << 25) | (rs2 << 20) | (rs1 << 15) | (f3 << 12) | ((imm & 0x1f) << 7) | op
}
/// Any branch (`f3`: 0 beq, 1 bne, 4 blt, 5 bge, 6 bltu, 7 bgeu).
pub fn b(f3: u32, rs1: u32, rs2: u32, off: i32) -> u32 {
    let o = off as u32;
    (((o >> 12) & 1) << 31)
        | (((o >> 5) & 0x3f) << 25)
        | (rs2 << 20)
        | (rs1 << 15)
        | (f3 << 12)
        | (((o >> 1) & 0xf) << 8)
        | (((o >> 11) & 1) << 7)
        | 0x63
}

pub fn lui(rd: u32, imm20: u32) -> u32 {
    (imm20 << 12) | (rd << 7) | 0x37
}
pub fn auipc(rd: u32, imm20: u32) -> u32 {
    (imm20 << 12) | (rd << 7) | 0x17
}
pub fn jal(rd: u32, off: i32) -> u32 {
    let o = off as u32;
    (((o >> 20) & 1) << 31)
        | (((o >> 1) & 0x3ff) << 21)
        | (((o >> 11) & 1) << 20)
        | (((o >> 12) & 0xff) << 12)
        | (rd << 7)
        | 0x6f
}
pub fn jalr(rd: u32, rs1: u32, imm: i32) -> u32 {
    i(0x67, 0, rd, rs1, imm)
}
pub fn beq(rs1: u32, rs2: u32, off: i32) -> u32 {
    b(0, rs1, rs2, off)
}
pub fn bne(rs1: u32, rs2: u32, off: i32) -> u32 {
    b(1, rs1, rs2, off)
}
pub fn addi(rd: u32, rs1: u32, imm: i32) -> u32 {
    i(0x13, 0, rd, rs1, imm)
}
pub fn xori(rd: u32, rs1: u32, imm: i32) -> u32 {
    i(0x13, 4, rd, rs1, imm)
}
pub fn slli(rd: u32, rs1: u32, sh: u32) -> u32 {
    i(0x13, 1, rd, rs1, sh as i32)
}
pub fn srli(rd: u32, rs1: u32, sh: u32) -> u32 {
    i(0x13, 5, rd, rs1, sh as i32)
}
pub fn add(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r(0x33, 0, 0, rd, rs1, rs2)
}
pub fn sub(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r(0x33, 0, 0x20, rd, rs1, rs2)
}
pub fn xor(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r(0x33, 4, 0, rd, rs1, rs2)
}
pub fn mul(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r(0x33, 0, 1, rd, rs1, rs2)
}
pub fn ld(rd: u32, rs1: u32, imm: i32) -> u32 {
    i(0x03, 3, rd, rs1, imm)
}
pub fn lw(rd: u32, rs1: u32, imm: i32) -> u32 {
    i(0x03, 2, rd, rs1, imm)
}
pub fn sd(rs2: u32, rs1: u32, imm: i32) -> u32 {
    s(0x23, 3, rs1, rs2, imm)
}
pub fn sw(rs2: u32, rs1: u32, imm: i32) -> u32 {
    s(0x23, 2, rs1, rs2, imm)
}
pub fn csrrw(rd: u32, csr: u16, rs1: u32) -> u32 {
    i(0x73, 1, rd, rs1, csr as i32)
}
pub fn csrrs(rd: u32, csr: u16, rs1: u32) -> u32 {
    i(0x73, 2, rd, rs1, csr as i32)
}
pub fn csrrc(rd: u32, csr: u16, rs1: u32) -> u32 {
    i(0x73, 3, rd, rs1, csr as i32)
}
pub fn csrrwi(rd: u32, csr: u16, uimm: u32) -> u32 {
    i(0x73, 5, rd, uimm, csr as i32)
}
pub const ECALL: u32 = 0x0000_0073;
pub const EBREAK: u32 = 0x0010_0073;
pub const MRET: u32 = 0x3020_0073;
pub const SRET: u32 = 0x1020_0073;
pub const WFI: u32 = 0x1050_0073;
pub const FENCE_I: u32 = 0x0000_100f;
pub fn sfence_vma(rs1: u32, rs2: u32) -> u32 {
    r(0x73, 0, 0x09, 0, rs1, rs2)
}

/// Load a 64-bit constant into `rd`: 11-bit chunks shifted in, always 12
/// instructions so that programs have a fixed layout.
pub fn li64(rd: u32, v: u64) -> Vec<u32> {
    let mut out = vec![addi(rd, ZERO, 0)];
    for (n, shift) in [53u32, 42, 31, 20, 9].into_iter().enumerate() {
        if n > 0 {
            out.push(slli(rd, rd, 11));
        }
        out.push(xori(rd, rd, ((v >> shift) & 0x7ff) as i32));
    }
    out.push(slli(rd, rd, 9));
    out.push(xori(rd, rd, (v & 0x1ff) as i32));
    out
}

/// Little-endian bytes of a program.
pub fn to_bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{decode, Kind};

    #[test]
    fn encoders_round_trip_through_the_decoder() {
        let op = decode(addi(A0, A1, -5));
        assert_eq!((op.kind, op.rd, op.rs1, op.imm), (Kind::Addi, 10, 11, -5));
        let op = decode(sd(A2, SP, -16));
        assert_eq!((op.kind, op.rs1, op.rs2, op.imm), (Kind::Sd, 2, 12, -16));
        let op = decode(bne(T0, ZERO, -28));
        assert_eq!((op.kind, op.rs1, op.imm), (Kind::Bne, 5, -28));
        let op = decode(jal(RA, 0x1_0000));
        assert_eq!((op.kind, op.rd, op.imm), (Kind::Jal, 1, 0x1_0000));
        let op = decode(csrrw(A0, 0x305, A1));
        assert_eq!((op.kind, op.imm), (Kind::Csrrw, 0x305));
        assert_eq!(decode(sfence_vma(0, 0)).kind, Kind::SfenceVma);
        assert_eq!(decode(WFI).kind, Kind::Wfi);
    }
}
