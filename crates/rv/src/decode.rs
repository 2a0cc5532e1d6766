//! Instruction decoding: a 16- or 32-bit RISC-V encoding becomes one [`Op`].
//!
//! Decoding happens once per instruction per block (see `block.rs`); execution
//! only ever sees `Op`s. Compressed (C) encodings expand onto the same kinds as
//! their 32-bit twins, so the executor has one handler per operation.
//!
//! ```text
//!  Op (16 bytes)
//!  +------+----+-----+-----+-----------+-----+----+-----+--------+
//!  | kind | rd | rs1 | rs2 |  imm: i32 | rs3 | rm | len | off:u16|
//!  +------+----+-----+-----+-----------+-----+----+-----+--------+
//! ```
//!
//! * `rd` of an integer destination that is `x0` is rewritten to [`X_SINK`], a
//!   scratch register slot, so handlers write unconditionally and `x0` stays 0.
//! * `imm` holds the sign-extended immediate, the CSR number for Zicsr, or the
//!   raw instruction bits for [`Kind::Illegal`] (that is what `mtval` reports).
//! * `off` is the byte offset of the instruction from its block's start; the
//!   program counter is only materialised when an instruction needs it.
//!
//! Encodings follow the RISC-V Unprivileged ISA (20191213), chapters 2 (RV32I),
//! 5 (RV64I), 7 (M), 8 (A), 11-12 (F, D), 16 (C) and the instruction listings of
//! chapter 24.

/// CSRs whose writes change nothing the run loop watches (interrupt
/// enables and pending bits, privilege, translation, timers): a write to one
/// does not end its block. Reads never do.
pub fn csr_is_quiet(csr: u16) -> bool {
    use crate::csr::*;
    matches!(csr, FFLAGS | FRM | FCSR | SSCRATCH | SEPC | SCAUSE | STVAL | MSCRATCH | MEPC | MCAUSE | MTVAL)
}

/// Register slot that receives writes to `x0`.
pub const X_SINK: u8 = 32;

macro_rules! kinds {
    ($($name:ident),* $(,)?) => {
        /// Every operation the executor knows. One handler each.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u8)]
        pub enum Kind { $($name),* }

        impl Kind {
            /// Lower-case mnemonic-like name, for traces and tests.
            pub fn name(self) -> &'static str {
                match self { $(Kind::$name => stringify!($name)),* }
            }
        }
    };
}

kinds! {
        Illegal, Nop,
    // A `jal` whose forward target in the same page the block continues at:
    // only the link is written (made by the block builder, never decoded).
    JalLink,
    // RV64I
    Lui, Auipc, Jal, Jalr, Beq, Bne, Blt, Bge, Bltu, Bgeu,
    Lb, Lh, Lw, Ld, Lbu, Lhu, Lwu, Sb, Sh, Sw, Sd,
    Addi, Slti, Sltiu, Xori, Ori, Andi, Slli, Srli, Srai,
    Add, Sub, Sll, Slt, Sltu, Xor, Srl, Sra, Or, And,
    Addiw, Slliw, Srliw, Sraiw, Addw, Subw, Sllw, Srlw, Sraw,
    Fence, FenceI, Ecall, Ebreak, Mret, Sret, Wfi, SfenceVma,
    Csrrw, Csrrs, Csrrc, Csrrwi, Csrrsi, Csrrci,
    // M
    Mul, Mulh, Mulhsu, Mulhu, Div, Divu, Rem, Remu, Mulw, Divw, Divuw, Remw, Remuw,
    // A
    LrW, ScW, LrD, ScD,
    AmoswapW, AmoaddW, AmoxorW, AmoandW, AmoorW, AmominW, AmomaxW, AmominuW, AmomaxuW,
    AmoswapD, AmoaddD, AmoxorD, AmoandD, AmoorD, AmominD, AmomaxD, AmominuD, AmomaxuD,
    // F and D
    Flw, Fld, Fsw, Fsd,
    FmaddS, FmsubS, FnmsubS, FnmaddS, FmaddD, FmsubD, FnmsubD, FnmaddD,
    FaddS, FsubS, FmulS, FdivS, FsqrtS, FaddD, FsubD, FmulD, FdivD, FsqrtD,
    FsgnjS, FsgnjnS, FsgnjxS, FsgnjD, FsgnjnD, FsgnjxD,
    FminS, FmaxS, FminD, FmaxD,
    FcvtSD, FcvtDS,
    FeqS, FltS, FleS, FeqD, FltD, FleD,
    FcvtWS, FcvtWuS, FcvtLS, FcvtLuS, FcvtWD, FcvtWuD, FcvtLD, FcvtLuD,
    FcvtSW, FcvtSWu, FcvtSL, FcvtSLu, FcvtDW, FcvtDWu, FcvtDL, FcvtDLu,
    FmvXW, FclassS, FmvXD, FclassD, FmvWX, FmvDX,
}

/// One decoded instruction. See the module documentation for the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    pub kind: Kind,
    pub rd: u8,
    pub rs1: u8,
    pub rs2: u8,
    pub imm: i32,
    pub rs3: u8,
    /// Rounding-mode field of F/D instructions (7 = dynamic, from `frm`).
    pub rm: u8,
    /// Encoding length in bytes: 2 or 4.
    pub len: u8,
    /// Byte offset from the start of the block.
    pub off: u16,
}

impl Op {
    fn new(kind: Kind, len: u8) -> Op {
        Op { kind, rd: 0, rs1: 0, rs2: 0, imm: 0, rs3: 0, rm: 0, len, off: 0 }
    }

    /// The instruction as an illegal-instruction trap would report it.
    pub fn illegal(raw: u32, len: u8) -> Op {
        Op { imm: raw as i32, ..Op::new(Kind::Illegal, len) }
    }

    /// Does this operation end a decoded block? Unconditional control
    /// transfers, and every operation that may change privilege,
    /// translation, interrupt enables or the code itself, so that the
    /// dispatcher sees the new state. Conditional branches do not: a taken
    /// branch exits the block early, a branch not taken falls through.
    pub fn ends_block(&self) -> bool {
        use Kind::*;
        matches!(self.kind, Illegal | Jal | Jalr | FenceI | Ecall | Ebreak | Mret | Sret | Wfi | SfenceVma)
            || (self.csr_writes() && !csr_is_quiet(self.imm as u16))
    }

    /// Does this Zicsr op read its CSR into rd? (csrrw/csrrwi with rd = x0
    /// do not read: `rs2` keeps the architectural rd.)
    pub fn csr_reads(&self) -> bool {
        !(matches!(self.kind, Kind::Csrrw | Kind::Csrrwi) && self.rs2 == 0)
    }

    /// Does this Zicsr op write its CSR? (csrrs/csrrc with rs1 = x0 and the
    /// immediate forms with uimm = 0 only read.)
    pub fn csr_writes(&self) -> bool {
        match self.kind {
            Kind::Csrrw | Kind::Csrrwi => true,
            Kind::Csrrs | Kind::Csrrc | Kind::Csrrsi | Kind::Csrrci => self.rs1 != 0,
            _ => false,
        }
    }

    /// Is this an F/D operation (needs `mstatus.FS != Off`)?
    pub fn is_fp(&self) -> bool {
        (self.kind as u8) >= (Kind::Flw as u8)
    }
}

/// Integer destination: `x0` goes to the sink slot.
#[inline]
fn xd(r: u32) -> u8 {
    if r == 0 {
        X_SINK
    } else {
        r as u8
    }
}

#[inline]
fn bits(raw: u32, hi: u32, lo: u32) -> u32 {
    (raw >> lo) & ((1u32 << (hi - lo + 1)) - 1)
}

/// Sign-extend the low `n` bits of `v`.
#[inline]
fn sext(v: u32, n: u32) -> i32 {
    ((v << (32 - n)) as i32) >> (32 - n)
}

fn imm_i(raw: u32) -> i32 {
    (raw as i32) >> 20
}
fn imm_s(raw: u32) -> i32 {
    (((raw & 0xfe00_0000) as i32) >> 20) | bits(raw, 11, 7) as i32
}
fn imm_b(raw: u32) -> i32 {
    let v = (bits(raw, 31, 31) << 12) | (bits(raw, 7, 7) << 11) | (bits(raw, 30, 25) << 5) | (bits(raw, 11, 8) << 1);
    sext(v, 13)
}
fn imm_j(raw: u32) -> i32 {
    let v =
        (bits(raw, 31, 31) << 20) | (bits(raw, 19, 12) << 12) | (bits(raw, 20, 20) << 11) | (bits(raw, 30, 21) << 1);
    sext(v, 21)
}

/// Is `rm` a legal static rounding mode field (0-4, or 7 = dynamic)?
fn rm_ok(rm: u32) -> bool {
    rm <= 4 || rm == 7
}

/// Decode a 32-bit instruction (`raw & 3 == 3`).
pub fn decode32(raw: u32) -> Op {
    use Kind::*;
    let rd = bits(raw, 11, 7);
    let rs1 = bits(raw, 19, 15) as u8;
    let rs2 = bits(raw, 24, 20) as u8;
    let f3 = bits(raw, 14, 12);
    let f7 = bits(raw, 31, 25);
    let ill = Op::illegal(raw, 4);
    // Integer register-writing op.
    let r = |kind: Kind, imm: i32| Op { rd: xd(rd), rs1, rs2, imm, ..Op::new(kind, 4) };
    match raw & 0x7f {
        0x37 => r(Lui, (raw & 0xffff_f000) as i32),
        0x17 => r(Auipc, (raw & 0xffff_f000) as i32),
        0x6f => r(Jal, imm_j(raw)),
        0x67 if f3 == 0 => r(Jalr, imm_i(raw)),
        0x63 => {
            let kind = match f3 {
                0 => Beq,
                1 => Bne,
                4 => Blt,
                5 => Bge,
                6 => Bltu,
                7 => Bgeu,
                _ => return ill,
            };
            Op { rs1, rs2, imm: imm_b(raw), ..Op::new(kind, 4) }
        }
        0x03 => {
            let kind = match f3 {
                0 => Lb,
                1 => Lh,
                2 => Lw,
                3 => Ld,
                4 => Lbu,
                5 => Lhu,
                6 => Lwu,
                _ => return ill,
            };
            r(kind, imm_i(raw))
        }
        0x23 => {
            let kind = match f3 {
                0 => Sb,
                1 => Sh,
                2 => Sw,
                3 => Sd,
                _ => return ill,
            };
            Op { rs1, rs2, imm: imm_s(raw), ..Op::new(kind, 4) }
        }
        0x13 => {
            let imm = imm_i(raw);
            let shamt = bits(raw, 25, 20) as i32;
            let kind = match f3 {
                0 => Addi,
                2 => Slti,
                3 => Sltiu,
                4 => Xori,
                6 => Ori,
                7 => Andi,
                1 if bits(raw, 31, 26) == 0 => return alu_or_nop(r(Slli, shamt)),
                5 if bits(raw, 31, 26) == 0 => return alu_or_nop(r(Srli, shamt)),
                5 if bits(raw, 31, 26) == 0x10 => return alu_or_nop(r(Srai, shamt)),
                _ => return ill,
            };
            alu_or_nop(r(kind, imm))
        }
        0x1b => {
            let shamt = bits(raw, 24, 20) as i32;
            let op = match (f3, f7) {
                (0, _) => r(Addiw, imm_i(raw)),
                (1, 0) => r(Slliw, shamt),
                (5, 0) => r(Srliw, shamt),
                (5, 0x20) => r(Sraiw, shamt),
                _ => return ill,
            };
            alu_or_nop(op)
        }
        0x33 => {
            let kind = match (f7, f3) {
                (0, 0) => Add,
                (0x20, 0) => Sub,
                (0, 1) => Sll,
                (0, 2) => Slt,
                (0, 3) => Sltu,
                (0, 4) => Xor,
                (0, 5) => Srl,
                (0x20, 5) => Sra,
                (0, 6) => Or,
                (0, 7) => And,
                (1, 0) => Mul,
                (1, 1) => Mulh,
                (1, 2) => Mulhsu,
                (1, 3) => Mulhu,
                (1, 4) => Div,
                (1, 5) => Divu,
                (1, 6) => Rem,
                (1, 7) => Remu,
                _ => return ill,
            };
            alu_or_nop(r(kind, 0))
        }
        0x3b => {
            let kind = match (f7, f3) {
                (0, 0) => Addw,
                (0x20, 0) => Subw,
                (0, 1) => Sllw,
                (0, 5) => Srlw,
                (0x20, 5) => Sraw,
                (1, 0) => Mulw,
                (1, 4) => Divw,
                (1, 5) => Divuw,
                (1, 6) => Remw,
                (1, 7) => Remuw,
                _ => return ill,
            };
            alu_or_nop(r(kind, 0))
        }
        // FENCE ignores its fields (unknown fm/pred/succ must act as a fence).
        0x0f if f3 == 0 => Op::new(Fence, 4),
        0x0f if f3 == 1 => Op::new(FenceI, 4),
        0x73 => match f3 {
            0 => {
                let kind = match raw {
                    0x0000_0073 => Ecall,
                    0x0010_0073 => Ebreak,
                    0x3020_0073 => Mret,
                    0x1020_0073 => Sret,
                    0x1050_0073 => Wfi,
                    _ if f7 == 0x09 && rd == 0 => SfenceVma,
                    _ => return ill,
                };
                Op { rs1, rs2, imm: raw as i32, ..Op::new(kind, 4) }
            }
            4 => ill,
            _ => {
                let kind = [Csrrw, Csrrw, Csrrs, Csrrc, Csrrw, Csrrwi, Csrrsi, Csrrci][f3 as usize];
                // rs1 holds the uimm for the immediate forms; rs2 keeps the
                // architectural rd (0 matters: csrrw with rd=x0 does not read).
                Op { rd: xd(rd), rs1, rs2: rd as u8, imm: bits(raw, 31, 20) as i32, ..Op::new(kind, 4) }
            }
        },
        0x2f => {
            let f5 = bits(raw, 31, 27);
            let kind = match (f3, f5) {
                (2, 0x02) if rs2 == 0 => LrW,
                (2, 0x03) => ScW,
                (2, 0x01) => AmoswapW,
                (2, 0x00) => AmoaddW,
                (2, 0x04) => AmoxorW,
                (2, 0x0c) => AmoandW,
                (2, 0x08) => AmoorW,
                (2, 0x10) => AmominW,
                (2, 0x14) => AmomaxW,
                (2, 0x18) => AmominuW,
                (2, 0x1c) => AmomaxuW,
                (3, 0x02) if rs2 == 0 => LrD,
                (3, 0x03) => ScD,
                (3, 0x01) => AmoswapD,
                (3, 0x00) => AmoaddD,
                (3, 0x04) => AmoxorD,
                (3, 0x0c) => AmoandD,
                (3, 0x08) => AmoorD,
                (3, 0x10) => AmominD,
                (3, 0x14) => AmomaxD,
                (3, 0x18) => AmominuD,
                (3, 0x1c) => AmomaxuD,
                _ => return ill,
            };
            r(kind, 0)
        }
        0x07 => match f3 {
            2 => Op { rd: rd as u8, rs1, imm: imm_i(raw), ..Op::new(Flw, 4) },
            3 => Op { rd: rd as u8, rs1, imm: imm_i(raw), ..Op::new(Fld, 4) },
            _ => ill,
        },
        0x27 => match f3 {
            2 => Op { rs1, rs2, imm: imm_s(raw), ..Op::new(Fsw, 4) },
            3 => Op { rs1, rs2, imm: imm_s(raw), ..Op::new(Fsd, 4) },
            _ => ill,
        },
        0x43 | 0x47 | 0x4b | 0x4f => {
            let fmt = bits(raw, 26, 25);
            if fmt > 1 || !rm_ok(f3) {
                return ill;
            }
            let idx = ((raw & 0x7f) - 0x43) / 4 + 4 * fmt;
            let kind = [FmaddS, FmsubS, FnmsubS, FnmaddS, FmaddD, FmsubD, FnmsubD, FnmaddD][idx as usize];
            Op { rd: rd as u8, rs1, rs2, rs3: bits(raw, 31, 27) as u8, rm: f3 as u8, ..Op::new(kind, 4) }
        }
        0x53 => decode_op_fp(raw),
        _ => ill,
    }
}

/// Register-to-register ALU ops whose destination is `x0` do nothing at all.
fn alu_or_nop(op: Op) -> Op {
    if op.rd == X_SINK {
        Op::new(Kind::Nop, op.len)
    } else {
        op
    }
}

fn decode_op_fp(raw: u32) -> Op {
    use Kind::*;
    let rd = bits(raw, 11, 7);
    let rs1 = bits(raw, 19, 15) as u8;
    let rs2 = bits(raw, 24, 20);
    let f3 = bits(raw, 14, 12);
    let f7 = bits(raw, 31, 25);
    let ill = Op::illegal(raw, 4);
    // F destination, with a rounding mode.
    let fr = |kind: Kind| -> Op {
        if rm_ok(f3) {
            Op { rd: rd as u8, rs1, rs2: rs2 as u8, rm: f3 as u8, ..Op::new(kind, 4) }
        } else {
            ill
        }
    };
    // F destination, funct3 selects the operation (no rounding).
    let fnr = |kind: Kind| Op { rd: rd as u8, rs1, rs2: rs2 as u8, ..Op::new(kind, 4) };
    // Integer destination.
    let xr = |kind: Kind, uses_rm: bool| -> Op {
        if uses_rm && !rm_ok(f3) {
            ill
        } else {
            Op { rd: xd(rd), rs1, rs2: rs2 as u8, rm: f3 as u8, ..Op::new(kind, 4) }
        }
    };
    match f7 {
        0x00 => fr(FaddS),
        0x01 => fr(FaddD),
        0x04 => fr(FsubS),
        0x05 => fr(FsubD),
        0x08 => fr(FmulS),
        0x09 => fr(FmulD),
        0x0c => fr(FdivS),
        0x0d => fr(FdivD),
        0x2c if rs2 == 0 => fr(FsqrtS),
        0x2d if rs2 == 0 => fr(FsqrtD),
        0x10 if f3 <= 2 => fnr([FsgnjS, FsgnjnS, FsgnjxS][f3 as usize]),
        0x11 if f3 <= 2 => fnr([FsgnjD, FsgnjnD, FsgnjxD][f3 as usize]),
        0x14 if f3 <= 1 => fnr([FminS, FmaxS][f3 as usize]),
        0x15 if f3 <= 1 => fnr([FminD, FmaxD][f3 as usize]),
        0x20 if rs2 == 1 => fr(FcvtSD),
        0x21 if rs2 == 0 => fr(FcvtDS),
        0x50 if f3 <= 2 => xr([FleS, FltS, FeqS][f3 as usize], false),
        0x51 if f3 <= 2 => xr([FleD, FltD, FeqD][f3 as usize], false),
        0x60 if rs2 <= 3 => xr([FcvtWS, FcvtWuS, FcvtLS, FcvtLuS][rs2 as usize], true),
        0x61 if rs2 <= 3 => xr([FcvtWD, FcvtWuD, FcvtLD, FcvtLuD][rs2 as usize], true),
        0x68 if rs2 <= 3 => fr([FcvtSW, FcvtSWu, FcvtSL, FcvtSLu][rs2 as usize]),
        0x69 if rs2 <= 3 => fr([FcvtDW, FcvtDWu, FcvtDL, FcvtDLu][rs2 as usize]),
        0x70 if rs2 == 0 && f3 == 0 => xr(FmvXW, false),
        0x70 if rs2 == 0 && f3 == 1 => xr(FclassS, false),
        0x71 if rs2 == 0 && f3 == 0 => xr(FmvXD, false),
        0x71 if rs2 == 0 && f3 == 1 => xr(FclassD, false),
        0x78 if rs2 == 0 && f3 == 0 => fnr(FmvWX),
        0x79 if rs2 == 0 && f3 == 0 => fnr(FmvDX),
        _ => ill,
    }
}

/// Decode a 16-bit compressed instruction (`raw & 3 != 3`), RV64C.
pub fn decode16(raw: u16) -> Op {
    use Kind::*;
    let raw32 = raw as u32;
    let b = |hi: u32, lo: u32| bits(raw32, hi, lo);
    let ill = Op::illegal(raw32, 2);
    let f3 = b(15, 13);
    let rdp = (b(4, 2) + 8) as u8; // rd' / rs2'
    let rs1p = (b(9, 7) + 8) as u8; // rs1' / rd'
    let rd_full = b(11, 7);
    let rs2_full = b(6, 2) as u8;
    let mk = |kind: Kind, rd: u8, rs1: u8, rs2: u8, imm: i32| Op { rd, rs1, rs2, imm, ..Op::new(kind, 2) };
    // Offsets of the scaled loads/stores.
    let uimm_w = (b(12, 10) << 3) | (b(6, 6) << 2) | (b(5, 5) << 6);
    let uimm_d = (b(12, 10) << 3) | (b(6, 5) << 6);
    let imm6 = sext((b(12, 12) << 5) | b(6, 2), 6);
    match (raw32 & 3, f3) {
        (0, 0) => {
            let nzuimm = (b(12, 11) << 4) | (b(10, 7) << 6) | (b(6, 6) << 2) | (b(5, 5) << 3);
            if nzuimm == 0 {
                return ill;
            }
            mk(Addi, rdp, 2, 0, nzuimm as i32)
        }
        (0, 1) => mk(Fld, rdp, rs1p, 0, uimm_d as i32),
        (0, 2) => mk(Lw, rdp, rs1p, 0, uimm_w as i32),
        (0, 3) => mk(Ld, rdp, rs1p, 0, uimm_d as i32),
        (0, 5) => mk(Fsd, 0, rs1p, rdp, uimm_d as i32),
        (0, 6) => mk(Sw, 0, rs1p, rdp, uimm_w as i32),
        (0, 7) => mk(Sd, 0, rs1p, rdp, uimm_d as i32),
        (1, 0) => {
            if rd_full == 0 {
                mk(Nop, 0, 0, 0, 0)
            } else {
                mk(Addi, rd_full as u8, rd_full as u8, 0, imm6)
            }
        }
        (1, 1) => {
            if rd_full == 0 {
                return ill;
            }
            mk(Addiw, rd_full as u8, rd_full as u8, 0, imm6)
        }
        (1, 2) => {
            if rd_full == 0 {
                mk(Nop, 0, 0, 0, 0)
            } else {
                mk(Addi, rd_full as u8, 0, 0, imm6)
            }
        }
        (1, 3) => {
            if rd_full == 2 {
                let v = (b(12, 12) << 9) | (b(6, 6) << 4) | (b(5, 5) << 6) | (b(4, 3) << 7) | (b(2, 2) << 5);
                if v == 0 {
                    return ill;
                }
                mk(Addi, 2, 2, 0, sext(v, 10))
            } else {
                let v = (b(12, 12) << 17) | (b(6, 2) << 12);
                if v == 0 {
                    return ill;
                }
                if rd_full == 0 {
                    return mk(Nop, 0, 0, 0, 0);
                }
                mk(Lui, rd_full as u8, 0, 0, sext(v, 18))
            }
        }
        (1, 4) => {
            let shamt = ((b(12, 12) << 5) | b(6, 2)) as i32;
            match b(11, 10) {
                0 => mk(Srli, rs1p, rs1p, 0, shamt),
                1 => mk(Srai, rs1p, rs1p, 0, shamt),
                2 => mk(Andi, rs1p, rs1p, 0, imm6),
                _ => {
                    let kind = match (b(12, 12), b(6, 5)) {
                        (0, 0) => Sub,
                        (0, 1) => Xor,
                        (0, 2) => Or,
                        (0, 3) => And,
                        (1, 0) => Subw,
                        (1, 1) => Addw,
                        _ => return ill,
                    };
                    mk(kind, rs1p, rs1p, rdp, 0)
                }
            }
        }
        (1, 5) => {
            let v = (b(12, 12) << 11)
                | (b(11, 11) << 4)
                | (b(10, 9) << 8)
                | (b(8, 8) << 10)
                | (b(7, 7) << 6)
                | (b(6, 6) << 7)
                | (b(5, 3) << 1)
                | (b(2, 2) << 5);
            mk(Jal, X_SINK, 0, 0, sext(v, 12))
        }
        (1, 6) | (1, 7) => {
            let v = (b(12, 12) << 8) | (b(11, 10) << 3) | (b(6, 5) << 6) | (b(4, 3) << 1) | (b(2, 2) << 5);
            mk(if f3 == 6 { Beq } else { Bne }, 0, rs1p, 0, sext(v, 9))
        }
        (2, 0) => {
            let shamt = ((b(12, 12) << 5) | b(6, 2)) as i32;
            if rd_full == 0 {
                return mk(Nop, 0, 0, 0, 0);
            }
            mk(Slli, rd_full as u8, rd_full as u8, 0, shamt)
        }
        (2, 1) => {
            let v = (b(12, 12) << 5) | (b(6, 5) << 3) | (b(4, 2) << 6);
            mk(Fld, rd_full as u8, 2, 0, v as i32)
        }
        (2, 2) | (2, 3) => {
            if rd_full == 0 {
                return ill;
            }
            if f3 == 2 {
                let v = (b(12, 12) << 5) | (b(6, 4) << 2) | (b(3, 2) << 6);
                mk(Lw, rd_full as u8, 2, 0, v as i32)
            } else {
                let v = (b(12, 12) << 5) | (b(6, 5) << 3) | (b(4, 2) << 6);
                mk(Ld, rd_full as u8, 2, 0, v as i32)
            }
        }
        (2, 4) => {
            let rs1 = rd_full as u8;
            match (b(12, 12), rs1, rs2_full) {
                (0, 0, 0) => ill,
                (0, _, 0) => mk(Jalr, X_SINK, rs1, 0, 0),
                (0, 0, _) => mk(Nop, 0, 0, 0, 0),
                (0, _, _) => mk(Add, rs1, 0, rs2_full, 0),
                (1, 0, 0) => Op { imm: raw32 as i32, ..Op::new(Ebreak, 2) },
                (1, _, 0) => mk(Jalr, 1, rs1, 0, 0),
                (1, 0, _) => mk(Nop, 0, 0, 0, 0),
                _ => mk(Add, rs1, rs1, rs2_full, 0),
            }
        }
        (2, 5) => {
            let v = (b(12, 10) << 3) | (b(9, 7) << 6);
            mk(Fsd, 0, 2, rs2_full, v as i32)
        }
        (2, 6) => {
            let v = (b(12, 9) << 2) | (b(8, 7) << 6);
            mk(Sw, 0, 2, rs2_full, v as i32)
        }
        (2, 7) => {
            let v = (b(12, 10) << 3) | (b(9, 7) << 6);
            mk(Sd, 0, 2, rs2_full, v as i32)
        }
        _ => ill,
    }
}

/// Decode the instruction whose low bits are in `raw` (the upper half is
/// ignored for compressed encodings).
pub fn decode(raw: u32) -> Op {
    if raw & 3 == 3 {
        decode32(raw)
    } else {
        decode16(raw as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every 16-bit word and a million 32-bit words decode without a panic,
    /// and report the length their low bits say.
    #[test]
    fn decoding_any_word_never_panics() {
        for raw in 0..=u16::MAX {
            if raw & 3 != 3 {
                assert_eq!(decode(raw as u32).len, 2);
            }
        }
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..1_000_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let raw = (x as u32) | 3;
            assert_eq!(decode(raw).len, 4);
        }
    }

    #[test]
    fn op_is_sixteen_bytes() {
        assert_eq!(std::mem::size_of::<Op>(), 16);
    }

    #[test]
    fn i_type_immediates_sign_extend() {
        // addi x5, x6, -1
        let op = decode(0xfff3_0293);
        assert_eq!((op.kind, op.rd, op.rs1, op.imm), (Kind::Addi, 5, 6, -1));
        // sd x7, -8(x2)
        let op = decode(0xfe71_3c23);
        assert_eq!((op.kind, op.rs1, op.rs2, op.imm), (Kind::Sd, 2, 7, -8));
    }

    #[test]
    fn branch_and_jump_offsets() {
        // beq x1, x2, -4   => 0xfe208ee3
        let op = decode(0xfe20_8ee3);
        assert_eq!((op.kind, op.imm), (Kind::Beq, -4));
        // jal x1, 2048     => 0x001000ef | ... (imm[11] set)
        let op = decode(0x0010_00ef);
        assert_eq!((op.kind, op.rd, op.imm), (Kind::Jal, 1, 2048));
        // jal x0, -2  (x0 target goes to the sink)
        let op = decode(0xfffff06f);
        assert_eq!((op.kind, op.rd, op.imm), (Kind::Jal, X_SINK, -2));
    }

    #[test]
    fn writes_to_x0_are_nops_or_sunk() {
        assert_eq!(decode(0x0000_0013).kind, Kind::Nop); // addi x0,x0,0
        assert_eq!(decode(0x0010_0033).kind, Kind::Nop); // add x0,x0,x1
        let op = decode(0x0000_3003); // ld x0, 0(x0): still loads (may fault)
        assert_eq!((op.kind, op.rd), (Kind::Ld, X_SINK));
    }

    #[test]
    fn shift_immediates_check_reserved_bits() {
        assert_eq!(decode(0x03f0_9093).kind, Kind::Slli); // slli x1,x1,63
        assert_eq!(decode(0x4000_d093).kind, Kind::Srai);
        assert_eq!(decode(0x8000_9093).kind, Kind::Illegal); // funct6 != 0
        assert_eq!(decode(0x0200_909b).kind, Kind::Illegal); // slliw shamt[5]
    }

    #[test]
    fn illegal_keeps_raw_bits_for_tval() {
        let op = decode(0xffff_ffff);
        assert_eq!((op.kind, op.imm as u32, op.len), (Kind::Illegal, 0xffff_ffff, 4));
        let op = decode(0x0000); // all-zero halfword is defined illegal
        assert_eq!((op.kind, op.imm, op.len), (Kind::Illegal, 0, 2));
    }

    #[test]
    fn compressed_forms_expand() {
        // c.addi4spn x8, sp, 16 => 0x0800
        let op = decode(0x0800);
        assert_eq!((op.kind, op.rd, op.rs1, op.imm), (Kind::Addi, 8, 2, 16));
        // c.li x10, -1 => 0x557d
        let op = decode(0x557d);
        assert_eq!((op.kind, op.rd, op.rs1, op.imm), (Kind::Addi, 10, 0, -1));
        // c.addi16sp sp, -64 => 0x7139
        let op = decode(0x7139);
        assert_eq!((op.kind, op.rd, op.imm), (Kind::Addi, 2, -64));
        // c.lui x15, 0xfffff => 0x77fd
        let op = decode(0x77fd);
        assert_eq!((op.kind, op.rd, op.imm), (Kind::Lui, 15, -4096));
        // c.ldsp x1, 8(sp) => 0x60a2
        let op = decode(0x60a2);
        assert_eq!((op.kind, op.rd, op.rs1, op.imm), (Kind::Ld, 1, 2, 8));
        // c.sdsp x1, 8(sp) => 0xe406
        let op = decode(0xe406);
        assert_eq!((op.kind, op.rs1, op.rs2, op.imm), (Kind::Sd, 2, 1, 8));
        // c.jr ra => 0x8082 ; c.jalr a0 => 0x9502 ; c.ebreak => 0x9002
        assert_eq!(decode(0x8082).kind, Kind::Jalr);
        let op = decode(0x9502);
        assert_eq!((op.kind, op.rd, op.rs1), (Kind::Jalr, 1, 10));
        assert_eq!(decode(0x9002).kind, Kind::Ebreak);
        // c.j -2 => 0xbffd ; c.beqz x8, -2 => 0xdc7d? (check kind/imm)
        let op = decode(0xbffd);
        assert_eq!((op.kind, op.imm), (Kind::Jal, -2));
        // c.subw x8, x9 => 0x9c05
        let op = decode(0x9c05);
        assert_eq!((op.kind, op.rd, op.rs1, op.rs2), (Kind::Subw, 8, 8, 9));
        // c.fld f8, 8(x9) => 0x2480
        let op = decode(0x2480);
        assert_eq!((op.kind, op.rd, op.rs1, op.imm), (Kind::Fld, 8, 9, 8));
    }

    #[test]
    fn compressed_reserved_encodings_are_illegal() {
        assert_eq!(decode(0x0000).kind, Kind::Illegal); // c.addi4spn imm=0
        assert_eq!(decode(0x6101).kind, Kind::Illegal); // c.addi16sp imm=0
        assert_eq!(decode(0x8002).kind, Kind::Illegal); // c.jr x0
        assert_eq!(decode(0x4002).kind, Kind::Illegal); // c.lwsp x0
        assert_eq!(decode(0x2001).kind, Kind::Illegal); // c.addiw x0
    }

    #[test]
    fn fp_rounding_mode_fields() {
        // fadd.d f1, f2, f3, rne  => 0x023100d3
        let op = decode(0x0231_00d3);
        assert_eq!((op.kind, op.rm), (Kind::FaddD, 0));
        // the same with rm=5 (reserved) is illegal
        assert_eq!(decode(0x0231_50d3).kind, Kind::Illegal);
        // fmadd.s f1,f2,f3,f4 dyn => 0x203170c3
        let op = decode(0x2031_70c3);
        assert_eq!((op.kind, op.rs3, op.rm), (Kind::FmaddS, 4, 7));
    }
}
