//! One block's ops to x86-64 code.
//!
//! Registers while translated code runs (all callee-saved, so helper calls
//! keep them):
//!
//! | host | holds |
//! |---|---|
//! | `rbx` | the `Core` |
//! | `r12` | the `Frame` (first argument of every helper) |
//! | `r13` | guest RAM's first byte |
//! | `r14` | the block's first pc (`base`) |
//! | `r15` | the data TLB set of the current `data_ctx` |
//! | `rbp` | the budget left, counting from this pass's first op |
//!
//! Guest registers stay in `Core::x` (memory operands are cheap on x86);
//! `rax`, `rcx`, `rdx` are scratch. `Core::position` holds the position of
//! the pass's first op while the code runs; every exit adds the ops retired.
//!
//! A load or store (integer or F/D) does the TLB compare inline, as
//! `load_hit` does; on a miss it calls the interpreter for that op (out of
//! line, after the block's code), which handles misses, misalignment,
//! devices and faults.
//!
//! A block ends at the chain (one copy for all, at the region's start): the
//! next pc is looked up in the jump cache as the dispatcher would, and if
//! its block is translated and fits in the budget left, the code jumps into
//! that translation past its prologue (the fixed registers stay; `r14`
//! becomes the new block's pc).

use super::{Frame, EXIT_CONTINUE};
use crate::block::{JumpEntry, JUMP_SETS, JUMP_WAYS};
use crate::csr::{Csrs, FFLAGS as CSR_FFLAGS, MSTATUS_FS, MSTATUS_FS_DIRTY};
use crate::decode::{Kind, Op};
use crate::fp::{CANON_NAN_D, DZ, NV, NX, OF, UF};
use crate::hart::Core;
use crate::mmu::{Tlb, TlbEntry, TlbSet, TLB_ENTRIES};
use dynasmrt::x64::X64Relocation;
use dynasmrt::{dynasm, DynamicLabel, DynasmApi, DynasmLabelApi, VecAssembler};
use std::mem::{offset_of, size_of};

type Asm = VecAssembler<X64Relocation>;

const _: () = assert!(size_of::<TlbEntry>() == 16 && TLB_ENTRIES == 256, "the inline TLB index assumes 256 x 16 bytes");
const _: () = assert!(JUMP_WAYS == 2, "the chain looks at two entries per jump-cache set");

fn xo(r: u8) -> i32 {
    (offset_of!(Core, x) + 8 * (r as usize & 63)) as i32
}
/// Offset of FP register `r` (`f` has 32 entries; the mask keeps it there).
fn fo(r: u8) -> i32 {
    (offset_of!(Core, f) + 8 * (r as usize & 31)) as i32
}
const POS: i32 = offset_of!(Core, position) as i32;
const MSTATUS: i32 = (offset_of!(Core, csr) + offset_of!(Csrs, mstatus)) as i32;
const PC: i32 = offset_of!(Core, pc) as i32;
const SETS: i32 = (offset_of!(Core, tlb) + offset_of!(Tlb, sets)) as i32;
const DATA_CTX: i32 = offset_of!(Core, data_ctx) as i32;
const SET_BYTES: i32 = size_of::<TlbSet>() as i32;
const READ: i32 = offset_of!(TlbSet, read) as i32;
const WRITE: i32 = offset_of!(TlbSet, write) as i32;
const TAG: i32 = offset_of!(TlbEntry, tag) as i32;
const RAM_OFF: i32 = offset_of!(TlbEntry, ram_off) as i32;
const FRAME_CORE: i32 = offset_of!(Frame, core) as i32;
const F_JUMP: i32 = offset_of!(Frame, jump) as i32;
const F_KEY: i32 = offset_of!(Frame, key) as i32;
const F_CODE: i32 = offset_of!(Frame, code) as i32;
const F_CODE_LEN: i32 = offset_of!(Frame, code_len) as i32;
const F_BODY: i32 = offset_of!(Frame, body_base) as i32;
const F_CHAIN: i32 = offset_of!(Frame, chain) as i32;
const JE_BYTES: i32 = size_of::<JumpEntry>() as i32;
const JE_PC: i32 = offset_of!(JumpEntry, pc) as i32;
const JE_KEY: i32 = offset_of!(JumpEntry, key) as i32;
const JE_COUNT: i32 = offset_of!(JumpEntry, count) as i32;
const JE_BLOCK: i32 = offset_of!(JumpEntry, block) as i32;
const FFLAGS: i32 = (offset_of!(Core, csr) + offset_of!(Csrs, fflags)) as i32;
const FRM: i32 = (offset_of!(Core, csr) + offset_of!(Csrs, frm)) as i32;
const F_MXCSR_LOAD: i32 = offset_of!(Frame, mxcsr) as i32;
const F_MXCSR_SEEN: i32 = F_MXCSR_LOAD + 4;

/// MXCSR's six flag bits (IE DE ZE OE UE PE) as `fflags` (NV DZ OF UF NX);
/// DE (a denormal operand) has no RISC-V counterpart.
static MXCSR_FFLAGS: [u8; 64] = {
    const fn bit(m: usize, b: usize, f: u8) -> u8 {
        if m & (1 << b) != 0 {
            f
        } else {
            0
        }
    }
    let mut t = [0u8; 64];
    let mut m = 0;
    while m < 64 {
        t[m] = bit(m, 0, NV) | bit(m, 2, DZ) | bit(m, 3, OF) | bit(m, 4, UF) | bit(m, 5, NX);
        m += 1;
    }
    t
};

/// A TLB miss's call to the interpreter, emitted after the block's code.
struct Slow {
    at: DynamicLabel,
    back: DynamicLabel,
    op: usize,
}

/// Translate `ops` (the block's own copy, which must outlive the code) with
/// `fallback` as the helper for everything not done in host code. Returns
/// the position-independent code and how many ops call the interpreter.
pub(super) fn translate(ops: &[Op], fallback: usize) -> (Vec<u8>, usize) {
    let mut a = Asm::new(0);
    let count = ops.len() as i32;
    let mut slow = Vec::new();
    let mut fallbacks = 0;
    let top = a.new_dynamic_label();
    // Every exit jumps to the shared chain (next pc in rax, ops retired in
    // this pass in rdx) or to the epilogue (its code in eax).
    let epi = a.new_dynamic_label();
    prologue(&mut a);
    debug_assert_eq!(a.offset().0, prologue_len(), "every prologue has the same length");
    dynasm!(a ; .arch x64 ; =>top);
    for (i, op) in ops.iter().enumerate() {
        let done = i as i32 + 1;
        let next_off = op.off as i32 + op.len as i32;
        let imm = op.imm;
        let (rd, rs1, rs2) = (xo(op.rd), xo(op.rs1), xo(op.rs2));
        use Kind::*;
        match op.kind {
            Nop | Fence => {}
            Lui => dynasm!(a ; mov rax, QWORD imm as i64 ; mov [rbx + rd], rax),
            Auipc => dynasm!(a
                ; mov rax, QWORD op.off as i64 + imm as i64
                ; add rax, r14
                ; mov [rbx + rd], rax
            ),
            JalLink => dynasm!(a ; lea rax, [r14 + next_off] ; mov [rbx + rd], rax),
            Jal => {
                let target = op.off as i64 + imm as i64;
                dynasm!(a
                    ; lea rax, [r14 + next_off]
                    ; mov [rbx + rd], rax
                    ; mov rax, QWORD target
                    ; add rax, r14
                );
                dynasm!(a ; mov edx, done ; jmp QWORD [r12 + F_CHAIN]);
            }
            Jalr => {
                dynasm!(a
                    ; mov rax, [rbx + rs1]
                    ; add rax, imm
                    ; and rax, -2
                    ; lea rcx, [r14 + next_off]
                    ; mov [rbx + rd], rcx
                );
                dynasm!(a ; mov edx, done ; jmp QWORD [r12 + F_CHAIN]);
            }
            Beq | Bne | Blt | Bge | Bltu | Bgeu => {
                let skip = a.new_dynamic_label();
                dynasm!(a ; mov rax, [rbx + rs1] ; cmp rax, [rbx + rs2]);
                // Jump over the taken path on the opposite condition.
                match op.kind {
                    Beq => dynasm!(a ; jne =>skip),
                    Bne => dynasm!(a ; je =>skip),
                    Blt => dynasm!(a ; jge =>skip),
                    Bge => dynasm!(a ; jl =>skip),
                    Bltu => dynasm!(a ; jae =>skip),
                    _ => dynasm!(a ; jb =>skip),
                }
                let target = op.off as i32 + imm;
                if target == 0 {
                    // Back to the block's start (a tight loop): go round in
                    // host code while a whole pass fits in the budget, as
                    // the interpreter does.
                    let out = a.new_dynamic_label();
                    dynasm!(a
                        ; mov rcx, rbp
                        ; sub rcx, done
                        ; cmp rcx, count
                        ; jb =>out
                        ; add QWORD [rbx + POS], done
                        ; mov rbp, rcx
                        ; jmp =>top
                        ; =>out
                        ; mov rax, r14
                        ; mov edx, done
                        ; jmp QWORD [r12 + F_CHAIN]
                    );
                } else {
                    dynasm!(a ; lea rax, [r14 + target]);
                    dynasm!(a ; mov edx, done ; jmp QWORD [r12 + F_CHAIN]);
                }
                dynasm!(a ; =>skip);
            }
            Lb | Lh | Lw | Ld | Lbu | Lhu | Lwu => {
                let n = match op.kind {
                    Lb | Lbu => 1,
                    Lh | Lhu => 2,
                    Lw | Lwu => 4,
                    _ => 8,
                };
                let (at, back) = (a.new_dynamic_label(), a.new_dynamic_label());
                tlb_hit(&mut a, rs1, imm, n, READ, at);
                match op.kind {
                    Lb => dynasm!(a ; movsx rax, BYTE [r13 + rcx]),
                    Lbu => dynasm!(a ; movzx eax, BYTE [r13 + rcx]),
                    Lh => dynasm!(a ; movsx rax, WORD [r13 + rcx]),
                    Lhu => dynasm!(a ; movzx eax, WORD [r13 + rcx]),
                    Lw => dynasm!(a ; movsxd rax, DWORD [r13 + rcx]),
                    Lwu => dynasm!(a ; mov eax, DWORD [r13 + rcx]),
                    _ => dynasm!(a ; mov rax, QWORD [r13 + rcx]),
                }
                dynasm!(a ; mov [rbx + rd], rax ; =>back);
                slow.push(Slow { at, back, op: i });
            }
            Sb | Sh | Sw | Sd => {
                let n = match op.kind {
                    Sb => 1,
                    Sh => 2,
                    Sw => 4,
                    _ => 8,
                };
                let (at, back) = (a.new_dynamic_label(), a.new_dynamic_label());
                tlb_hit(&mut a, rs1, imm, n, WRITE, at);
                dynasm!(a ; mov rax, [rbx + rs2]);
                match op.kind {
                    Sb => dynasm!(a ; mov [r13 + rcx], al),
                    Sh => dynasm!(a ; mov [r13 + rcx], ax),
                    Sw => dynasm!(a ; mov [r13 + rcx], eax),
                    _ => dynasm!(a ; mov [r13 + rcx], rax),
                }
                dynasm!(a ; =>back);
                slow.push(Slow { at, back, op: i });
            }
            Flw | Fld | Fsw | Fsd => {
                // FP off (mstatus.FS = 0) traps: the interpreter does that.
                let (at, back) = (a.new_dynamic_label(), a.new_dynamic_label());
                dynasm!(a ; test DWORD [rbx + MSTATUS], MSTATUS_FS as i32 ; jz =>at);
                let (n, array) = match op.kind {
                    Flw => (4, READ),
                    Fld => (8, READ),
                    Fsw => (4, WRITE),
                    _ => (8, WRITE),
                };
                tlb_hit(&mut a, rs1, imm, n, array, at);
                match op.kind {
                    // NaN-boxed, and FS becomes Dirty, as `set_fs`/`set_fd`.
                    Flw => dynasm!(a
                        ; mov eax, DWORD [r13 + rcx]
                        ; mov rdx, QWORD -0x1_0000_0000
                        ; or rax, rdx
                        ; mov [rbx + fo(op.rd)], rax
                        ; or DWORD [rbx + MSTATUS], MSTATUS_FS_DIRTY as i32
                    ),
                    Fld => dynasm!(a
                        ; mov rax, QWORD [r13 + rcx]
                        ; mov [rbx + fo(op.rd)], rax
                        ; or DWORD [rbx + MSTATUS], MSTATUS_FS_DIRTY as i32
                    ),
                    Fsw => dynasm!(a ; mov rax, [rbx + fo(op.rs2)] ; mov [r13 + rcx], eax),
                    _ => dynasm!(a ; mov rax, [rbx + fo(op.rs2)] ; mov [r13 + rcx], rax),
                }
                dynasm!(a ; =>back);
                slow.push(Slow { at, back, op: i });
            }
            Addi => dynasm!(a ; mov rax, [rbx + rs1] ; add rax, imm ; mov [rbx + rd], rax),
            Slti => dynasm!(a ; xor ecx, ecx ; cmp QWORD [rbx + rs1], imm ; setl cl ; mov [rbx + rd], rcx),
            Sltiu => dynasm!(a ; xor ecx, ecx ; cmp QWORD [rbx + rs1], imm ; setb cl ; mov [rbx + rd], rcx),
            Xori => dynasm!(a ; mov rax, [rbx + rs1] ; xor rax, imm ; mov [rbx + rd], rax),
            Ori => dynasm!(a ; mov rax, [rbx + rs1] ; or rax, imm ; mov [rbx + rd], rax),
            Andi => dynasm!(a ; mov rax, [rbx + rs1] ; and rax, imm ; mov [rbx + rd], rax),
            Slli => dynasm!(a ; mov rax, [rbx + rs1] ; shl rax, (imm & 63) as i8 ; mov [rbx + rd], rax),
            Srli => dynasm!(a ; mov rax, [rbx + rs1] ; shr rax, (imm & 63) as i8 ; mov [rbx + rd], rax),
            Srai => dynasm!(a ; mov rax, [rbx + rs1] ; sar rax, (imm & 63) as i8 ; mov [rbx + rd], rax),
            Add => dynasm!(a ; mov rax, [rbx + rs1] ; add rax, [rbx + rs2] ; mov [rbx + rd], rax),
            Sub => dynasm!(a ; mov rax, [rbx + rs1] ; sub rax, [rbx + rs2] ; mov [rbx + rd], rax),
            Xor => dynasm!(a ; mov rax, [rbx + rs1] ; xor rax, [rbx + rs2] ; mov [rbx + rd], rax),
            Or => dynasm!(a ; mov rax, [rbx + rs1] ; or rax, [rbx + rs2] ; mov [rbx + rd], rax),
            And => dynasm!(a ; mov rax, [rbx + rs1] ; and rax, [rbx + rs2] ; mov [rbx + rd], rax),
            Sll => dynasm!(a ; mov rax, [rbx + rs1] ; mov rcx, [rbx + rs2] ; shl rax, cl ; mov [rbx + rd], rax),
            Srl => dynasm!(a ; mov rax, [rbx + rs1] ; mov rcx, [rbx + rs2] ; shr rax, cl ; mov [rbx + rd], rax),
            Sra => dynasm!(a ; mov rax, [rbx + rs1] ; mov rcx, [rbx + rs2] ; sar rax, cl ; mov [rbx + rd], rax),
            Slt => dynasm!(a
                ; xor ecx, ecx ; mov rax, [rbx + rs1] ; cmp rax, [rbx + rs2] ; setl cl ; mov [rbx + rd], rcx
            ),
            Sltu => dynasm!(a
                ; xor ecx, ecx ; mov rax, [rbx + rs1] ; cmp rax, [rbx + rs2] ; setb cl ; mov [rbx + rd], rcx
            ),
            Addiw => dynasm!(a ; mov eax, [rbx + rs1] ; add eax, imm ; movsxd rax, eax ; mov [rbx + rd], rax),
            Slliw => {
                dynasm!(a ; mov eax, [rbx + rs1] ; shl eax, (imm & 31) as i8 ; movsxd rax, eax ; mov [rbx + rd], rax)
            }
            Srliw => {
                dynasm!(a ; mov eax, [rbx + rs1] ; shr eax, (imm & 31) as i8 ; movsxd rax, eax ; mov [rbx + rd], rax)
            }
            Sraiw => {
                dynasm!(a ; mov eax, [rbx + rs1] ; sar eax, (imm & 31) as i8 ; movsxd rax, eax ; mov [rbx + rd], rax)
            }
            Addw => dynasm!(a ; mov eax, [rbx + rs1] ; add eax, [rbx + rs2] ; movsxd rax, eax ; mov [rbx + rd], rax),
            Subw => dynasm!(a ; mov eax, [rbx + rs1] ; sub eax, [rbx + rs2] ; movsxd rax, eax ; mov [rbx + rd], rax),
            Sllw => dynasm!(a
                ; mov eax, [rbx + rs1] ; mov ecx, [rbx + rs2] ; shl eax, cl ; movsxd rax, eax ; mov [rbx + rd], rax
            ),
            Srlw => dynasm!(a
                ; mov eax, [rbx + rs1] ; mov ecx, [rbx + rs2] ; shr eax, cl ; movsxd rax, eax ; mov [rbx + rd], rax
            ),
            Sraw => dynasm!(a
                ; mov eax, [rbx + rs1] ; mov ecx, [rbx + rs2] ; sar eax, cl ; movsxd rax, eax ; mov [rbx + rd], rax
            ),
            Mul => dynasm!(a ; mov rax, [rbx + rs1] ; imul rax, [rbx + rs2] ; mov [rbx + rd], rax),
            Mulw => dynasm!(a ; mov eax, [rbx + rs1] ; imul eax, [rbx + rs2] ; movsxd rax, eax ; mov [rbx + rd], rax),
            Mulhu => dynasm!(a ; mov rax, [rbx + rs1] ; mul QWORD [rbx + rs2] ; mov [rbx + rd], rdx),
            Mulh => dynasm!(a ; mov rax, [rbx + rs1] ; imul QWORD [rbx + rs2] ; mov [rbx + rd], rdx),
            // Signed times unsigned: the unsigned high half, less rs2 when
            // rs1 is negative.
            Mulhsu => dynasm!(a
                ; mov rax, [rbx + rs1] ; mul QWORD [rbx + rs2]
                ; mov rcx, [rbx + rs1] ; sar rcx, 63 ; and rcx, [rbx + rs2] ; sub rdx, rcx
                ; mov [rbx + rd], rdx
            ),
            Div | Divu | Rem | Remu | Divw | Divuw | Remw | Remuw => divide(&mut a, op.kind, rd, rs1, rs2),
            // Double precision in host code when the rounding is to nearest
            // even (static, or dynamic with `frm` = RNE, checked here);
            // other modes, FP off and the rest go to the interpreter.
            FaddD | FsubD | FmulD | FdivD | FeqD | FltD | FleD | FsgnjD | FsgnjnD | FsgnjxD | FmvXD | FmvDX
                if !uses_rm(op.kind) || op.rm == 0 || op.rm == 7 =>
            {
                let (at, back) = (a.new_dynamic_label(), a.new_dynamic_label());
                double(&mut a, op, at);
                dynasm!(a ; =>back);
                slow.push(Slow { at, back, op: i });
            }
            Csrrw | Csrrs | Csrrc | Csrrwi | Csrrsi | Csrrci if op.imm as u16 == CSR_FFLAGS => {
                let (at, back) = (a.new_dynamic_label(), a.new_dynamic_label());
                fflags_op(&mut a, op, at);
                dynasm!(a ; =>back);
                slow.push(Slow { at, back, op: i });
            }
            _ => {
                // Everything else runs in the interpreter; ops that end a
                // block (system, CSR writes that matter, traps) exit there.
                fallbacks += 1;
                call_fallback(&mut a, ops, i, fallback, epi);
            }
        }
    }
    // Fell off the end: the next pc follows the last op.
    let last = ops[ops.len() - 1];
    dynasm!(a
        ; lea rax, [r14 + last.off as i32 + last.len as i32]
        ; mov edx, count
        ; jmp QWORD [r12 + F_CHAIN]
        ; =>epi
    );
    epilogue(&mut a);
    for s in slow {
        dynasm!(a ; =>s.at);
        call_fallback(&mut a, ops, s.op, fallback, epi);
        dynasm!(a ; jmp =>s.back);
    }
    (a.finalize().expect("every label of a translation is defined"), fallbacks)
}

/// The chain every translation's exits jump to (through `Frame::chain`),
/// with the next pc in `rax` and the ops retired in this pass in `rdx`:
/// retire, and go straight into the next block's translation if the jump
/// cache has it for this pc and context and the budget holds all of it;
/// otherwise back to the dispatcher. One copy for all translations rather
/// than one each: it runs at the end of every block, and guest code that
/// runs wide (a kernel's network path) is bound by how many host cache
/// lines its translations touch.
pub(super) fn chain() -> Vec<u8> {
    let mut a = Asm::new(0);
    let (back, way1, found) = (a.new_dynamic_label(), a.new_dynamic_label(), a.new_dynamic_label());
    dynasm!(a
        ; .arch x64
        ; mov [rbx + PC], rax
        ; add [rbx + POS], rdx
        ; sub rbp, rdx
        ; jz =>back
        ; mov rcx, rax
        ; shr rcx, 1
        ; mov rdx, rax
        ; shr rdx, 13
        ; xor rcx, rdx
        ; and ecx, (JUMP_SETS - 1) as i32
        ; imul rcx, rcx, JE_BYTES * JUMP_WAYS as i32
        ; add rcx, [r12 + F_JUMP]
        ; mov rdx, [r12 + F_KEY]
        ; cmp rax, [rcx + JE_PC]
        ; jne =>way1
        ; cmp edx, [rcx + JE_KEY]
        ; je =>found
        ; =>way1
        ; add rcx, JE_BYTES
        ; cmp rax, [rcx + JE_PC]
        ; jne =>back
        ; cmp edx, [rcx + JE_KEY]
        ; jne =>back
        ; =>found
        ; mov edx, [rcx + JE_COUNT]
        ; cmp rbp, rdx
        ; jb =>back
        ; mov edx, [rcx + JE_BLOCK]
        ; cmp rdx, [r12 + F_CODE_LEN]
        ; jae =>back
        ; mov rcx, [r12 + F_CODE]
        ; mov edx, [rcx + rdx * 4]
        ; test edx, edx
        ; jz =>back
        ; add rdx, [r12 + F_BODY]
        ; mov r14, rax
        ; jmp rdx
        ; =>back
        ; mov eax, EXIT_CONTINUE as i32
    );
    epilogue(&mut a);
    a.finalize().expect("every label of the chain is defined")
}

/// Restore what the prologue saved and return `eax`'s exit code.
fn epilogue(a: &mut Asm) {
    dynasm!(a
        ; .arch x64
        ; add rsp, 8
        ; pop r15
        ; pop r14
        ; pop r13
        ; pop r12
        ; pop rbp
        ; pop rbx
        ; ret
    );
}

/// Save the callee-saved registers and load the fixed ones (see the
/// module documentation) from the arguments: frame, RAM, budget.
fn prologue(a: &mut Asm) {
    dynasm!(a
        ; .arch x64
        ; push rbx
        ; push rbp
        ; push r12
        ; push r13
        ; push r14
        ; push r15
        ; sub rsp, 8
        ; mov r12, rdi
        ; mov rbx, [rdi + FRAME_CORE]
        ; mov r13, rsi
        ; mov rbp, rdx
        ; mov r14, [rbx + PC]
    );
    load_tlb_set(a);
}

/// The prologue's length: a chain enters the next translation this far in.
pub(super) fn prologue_len() -> usize {
    let mut a = Asm::new(0);
    prologue(&mut a);
    a.offset().0
}

/// `r15` = the data TLB set of `Core::data_ctx`.
fn load_tlb_set(a: &mut Asm) {
    dynasm!(a
        ; .arch x64
        ; mov rax, [rbx + DATA_CTX]
        ; imul rax, rax, SET_BYTES
        ; mov r15, [rbx + SETS]
        ; add r15, rax
    );
}

/// Compute the address `x[rs1] + imm` into `rax` and look it up in the TLB
/// array at `array` of the set in `r15` for an access of `n` bytes; jump to
/// `miss` unless it hits (the tag compare also rejects misalignment, as in
/// `load_hit`). On a hit, `rcx` is the RAM offset.
fn tlb_hit(a: &mut Asm, rs1: i32, imm: i32, n: i32, array: i32, miss: DynamicLabel) {
    let mask = !0xfff | (n - 1);
    dynasm!(a
        ; .arch x64
        ; mov rax, [rbx + rs1]
        ; add rax, imm
        ; mov rcx, rax
        ; and rcx, mask
        ; mov rdx, rax
        ; shr rdx, 8
        ; and edx, 0xff0
        ; cmp rcx, [r15 + rdx + array + TAG]
        ; jne =>miss
        ; mov rcx, [r15 + rdx + array + RAM_OFF]
        ; and eax, 0xfff
        ; or rcx, rax
    );
}

/// A division or remainder (M extension, 64- or 32-bit) into `rd`. x86's
/// `div`/`idiv` fault where RISC-V defines a result (M chapter: a zero
/// divisor gives all ones as the quotient and the dividend as the
/// remainder; the signed overflow MIN / -1 gives MIN and 0), so those
/// cases are taken first. A divisor of -1 is taken for every dividend
/// (quotient: the dividend negated, which wraps MIN to MIN; remainder 0).
fn divide(a: &mut Asm, kind: Kind, rd: i32, rs1: i32, rs2: i32) {
    use Kind::*;
    let signed = matches!(kind, Div | Rem | Divw | Remw);
    let rem = matches!(kind, Rem | Remu | Remw | Remuw);
    let wide = matches!(kind, Div | Divu | Rem | Remu);
    let (zero, minus1, store) = (a.new_dynamic_label(), a.new_dynamic_label(), a.new_dynamic_label());
    // rax = dividend, rcx = divisor (the 32-bit forms use the low halves).
    if wide {
        dynasm!(a ; .arch x64 ; mov rax, [rbx + rs1] ; mov rcx, [rbx + rs2] ; test rcx, rcx ; jz =>zero);
    } else {
        dynasm!(a ; .arch x64 ; mov eax, [rbx + rs1] ; mov ecx, [rbx + rs2] ; test ecx, ecx ; jz =>zero);
    }
    match (signed, wide) {
        (true, true) => dynasm!(a ; .arch x64 ; cmp rcx, -1 ; je =>minus1 ; cqo ; idiv rcx),
        (true, false) => dynasm!(a ; .arch x64 ; cmp ecx, -1 ; je =>minus1 ; cdq ; idiv ecx),
        (false, true) => dynasm!(a ; .arch x64 ; xor edx, edx ; div rcx),
        (false, false) => dynasm!(a ; .arch x64 ; xor edx, edx ; div ecx),
    }
    if rem {
        dynasm!(a ; .arch x64 ; mov rax, rdx);
    }
    dynasm!(a ; .arch x64 ; jmp =>store ; =>zero);
    // A zero divisor: the remainder is the dividend, already in rax.
    if !rem {
        dynasm!(a ; .arch x64 ; mov rax, -1);
    }
    dynasm!(a ; .arch x64 ; jmp =>store ; =>minus1);
    match (rem, wide) {
        (true, _) => dynasm!(a ; .arch x64 ; xor eax, eax),
        (false, true) => dynasm!(a ; .arch x64 ; neg rax),
        (false, false) => dynasm!(a ; .arch x64 ; neg eax),
    }
    dynasm!(a ; .arch x64 ; =>store);
    if !wide {
        // The 32-bit forms sign-extend their 32-bit result.
        dynasm!(a ; .arch x64 ; movsxd rax, eax);
    }
    dynasm!(a ; .arch x64 ; mov [rbx + rd], rax);
}

/// Whether an F/D op rounds (its `rm` field is a rounding mode).
fn uses_rm(kind: Kind) -> bool {
    matches!(kind, Kind::FaddD | Kind::FsubD | Kind::FmulD | Kind::FdivD)
}

/// A Zicsr op on `fflags` in host code, as `csr_op` does it (a user CSR:
/// only FP being off, checked here, sends it to the interpreter, which
/// traps). Code that checks a conversion's exactness reads and clears the
/// flags around it (redis's Lua does, per number it converts).
fn fflags_op(a: &mut Asm, op: &Op, slow: DynamicLabel) {
    use Kind::*;
    dynasm!(a
        ; .arch x64
        ; test DWORD [rbx + MSTATUS], MSTATUS_FS as i32
        ; jz =>slow
        ; movzx eax, BYTE [rbx + FFLAGS]
    );
    if op.csr_writes() {
        match op.kind {
            Csrrw | Csrrs | Csrrc => dynasm!(a ; .arch x64 ; mov rcx, [rbx + xo(op.rs1)]),
            _ => dynasm!(a ; .arch x64 ; mov ecx, op.rs1 as i32),
        }
        match op.kind {
            Csrrw | Csrrwi => dynasm!(a ; .arch x64 ; mov edx, ecx),
            Csrrs | Csrrsi => dynasm!(a ; .arch x64 ; mov edx, eax ; or edx, ecx),
            _ => dynasm!(a ; .arch x64 ; mov edx, ecx ; not edx ; and edx, eax),
        }
        dynasm!(a
            ; .arch x64
            ; and edx, 0x1f
            ; mov [rbx + FFLAGS], dl
            ; or DWORD [rbx + MSTATUS], MSTATUS_FS_DIRTY as i32
        );
    }
    if op.csr_reads() {
        dynasm!(a ; .arch x64 ; mov [rbx + xo(op.rd)], rax);
    }
}

/// A double-precision op in host code, exactly as `exec_fp` does it, or a
/// jump to `slow` (the interpreter) when FP is off or the dynamic rounding
/// mode is not RNE. Arithmetic and compares run on SSE as the interpreter's
/// `fp` does (the same instructions under the same MXCSR, so the same
/// results and flags); a NaN result becomes the canonical NaN; the flags
/// are read from MXCSR and mapped to `fflags`.
fn double(a: &mut Asm, op: &Op, slow: DynamicLabel) {
    use Kind::*;
    let (rd_x, rs1_x) = (xo(op.rd), xo(op.rs1));
    let (rd, rs1, rs2) = (fo(op.rd), fo(op.rs1), fo(op.rs2));
    dynasm!(a ; .arch x64 ; test DWORD [rbx + MSTATUS], MSTATUS_FS as i32 ; jz =>slow);
    if uses_rm(op.kind) && op.rm == 7 {
        dynasm!(a ; .arch x64 ; cmp BYTE [rbx + FRM], 0 ; jne =>slow);
    }
    let dirty = |a: &mut Asm| dynasm!(a ; .arch x64 ; or DWORD [rbx + MSTATUS], MSTATUS_FS_DIRTY as i32);
    match op.kind {
        FaddD | FsubD | FmulD | FdivD => {
            dynasm!(a ; .arch x64 ; ldmxcsr [r12 + F_MXCSR_LOAD] ; movq xmm0, QWORD [rbx + rs1]);
            match op.kind {
                FaddD => dynasm!(a ; .arch x64 ; addsd xmm0, QWORD [rbx + rs2]),
                FsubD => dynasm!(a ; .arch x64 ; subsd xmm0, QWORD [rbx + rs2]),
                FmulD => dynasm!(a ; .arch x64 ; mulsd xmm0, QWORD [rbx + rs2]),
                _ => dynasm!(a ; .arch x64 ; divsd xmm0, QWORD [rbx + rs2]),
            }
            let number = a.new_dynamic_label();
            dynasm!(a
                ; .arch x64
                ; stmxcsr [r12 + F_MXCSR_SEEN]
                ; ucomisd xmm0, xmm0
                ; jnp =>number
                ; mov rax, QWORD CANON_NAN_D as i64
                ; movq xmm0, rax
                ; =>number
                ; movq QWORD [rbx + rd], xmm0
            );
            dirty(a);
            // FS is Dirty already: the flags just join `fflags`.
            op_flags(a);
            dynasm!(a ; .arch x64 ; or [rbx + FFLAGS], al);
        }
        FeqD | FltD | FleD => {
            // feq signals only on a signaling NaN (ucomisd), flt and fle on
            // any NaN (comisd); unordered gives 0 (ZF = PF = CF = 1).
            dynasm!(a ; .arch x64 ; ldmxcsr [r12 + F_MXCSR_LOAD] ; xor edx, edx);
            match op.kind {
                FeqD => dynasm!(a
                    ; .arch x64
                    ; movq xmm0, QWORD [rbx + rs1]
                    ; ucomisd xmm0, QWORD [rbx + rs2]
                    ; setnp dl
                    ; sete al
                    ; and dl, al
                ),
                // a < b as b > a, a <= b as b >= a.
                FltD => {
                    dynasm!(a ; .arch x64 ; movq xmm0, QWORD [rbx + rs2] ; comisd xmm0, QWORD [rbx + rs1] ; seta dl)
                }
                _ => dynasm!(a ; .arch x64 ; movq xmm0, QWORD [rbx + rs2] ; comisd xmm0, QWORD [rbx + rs1] ; setae dl),
            }
            let none = a.new_dynamic_label();
            dynasm!(a ; .arch x64 ; stmxcsr [r12 + F_MXCSR_SEEN] ; mov [rbx + rd_x], rdx);
            op_flags(a);
            dynasm!(a ; .arch x64 ; test al, al ; jz =>none ; or [rbx + FFLAGS], al);
            // Raised flags make FS Dirty (`raise`); a quiet compare does not.
            dirty(a);
            dynasm!(a ; .arch x64 ; =>none);
        }
        FsgnjD | FsgnjnD | FsgnjxD => {
            dynasm!(a
                ; .arch x64
                ; mov rax, QWORD [rbx + rs1]
                ; mov rcx, QWORD [rbx + rs2]
                ; mov rdx, QWORD i64::MIN
            );
            match op.kind {
                FsgnjD => dynasm!(a ; .arch x64 ; and rcx, rdx ; btr rax, 63 ; or rax, rcx),
                FsgnjnD => dynasm!(a ; .arch x64 ; not rcx ; and rcx, rdx ; btr rax, 63 ; or rax, rcx),
                _ => dynasm!(a ; .arch x64 ; and rcx, rdx ; xor rax, rcx),
            }
            dynasm!(a ; .arch x64 ; mov [rbx + rd], rax);
            dirty(a);
        }
        FmvXD => dynasm!(a ; .arch x64 ; mov rax, QWORD [rbx + rs1] ; mov [rbx + rd_x], rax),
        _ => {
            // FmvDX
            dynasm!(a ; .arch x64 ; mov rax, QWORD [rbx + rs1_x] ; mov [rbx + rd], rax);
            dirty(a);
        }
    }
}

/// `al` = the flags of the FP op whose MXCSR was just stored (at
/// `F_MXCSR_SEEN`), as `fflags`. Clobbers `rcx`.
fn op_flags(a: &mut Asm) {
    dynasm!(a
        ; .arch x64
        ; mov eax, [r12 + F_MXCSR_SEEN]
        ; and eax, 0x3f
        ; mov rcx, QWORD MXCSR_FFLAGS.as_ptr() as i64
        ; mov al, [rcx + rax]
    );
}

/// Call `fallback(frame, &ops[i], base, position + i)` for an op the
/// interpreter does; on an exit jump to the epilogue with its code in
/// `eax`, else reload the TLB set (the op may have changed `data_ctx`) and
/// fall through.
fn call_fallback(a: &mut Asm, ops: &[Op], i: usize, fallback: usize, epi: DynamicLabel) {
    let op_addr = &ops[i] as *const Op as i64;
    dynasm!(a
        ; .arch x64
        ; mov rdi, r12
        ; mov rsi, QWORD op_addr
        ; mov rdx, r14
        ; mov rcx, [rbx + POS]
        ; add rcx, i as i32
        ; mov rax, QWORD fallback as i64
        ; call rax
        ; test rax, rax
        ; jnz =>epi
    );
    load_tlb_set(a);
}
