/* Shared scaffolding for lockstep's bare-metal M-mode test programs.
 *
 * gp holds the current test number. A failure writes (n << 1) | 1 to tohost,
 * so `lockstep run --elf` prints "FAIL: test n" and exits 1; passing writes 1.
 *
 * The handlers clobber only s8..s11.
 *
 * Built with -DQEMU, the programs also run on `qemu-system-riscv64 -M spike`
 * (a cross-check of the tests themselves); the few checks of behaviour the
 * spec leaves to the implementation, where lockstep and QEMU differ, are
 * left out there.
 *
 * Trap expectations: a test puts a recovery address in s8 (EXPECT_TRAP);
 * the M-mode handler stores mcause/mtval/mepc in s9/s10/s11, clears s8 and
 * continues at the recovery address, in M-mode with interrupts off. An unexpected trap (s8 == 0)
 * fails the current test. The S-mode handler does the same with the S CSRs
 * and continues in S-mode.
 */
#define TEST(n) li gp, n
#define CHECK(reg, val) li t6, val; bne reg, t6, fail
#define CHECK_REG(a, b) bne a, b, fail
#define EXPECT_TRAP(recover) lla s8, recover
#define CHECK_TRAP(cause) CHECK(s9, cause)

#define MSTATUS_MPP 0x1800
#define MSTATUS_SPP 0x100
#define MSTATUS_FS 0x6000

#define CLINT_MSIP 0x2000000
#define CLINT_MTIMECMP 0x2004000
#define CLINT_MTIME 0x200bff8

/* Enter mode `mpp` (0 = U, 1 = S) at `target`. */
#define ENTER_MODE(mpp, target)  \
    li t0, MSTATUS_MPP;          \
    csrc mstatus, t0;            \
    li t0, (mpp) << 11;          \
    csrs mstatus, t0;            \
    lla t0, target;               \
    csrw mepc, t0;               \
    mret

    .section .text.init
    .globl _start
_start:
    /* PMP: let S and U reach everything (QEMU enforces PMP; lockstep does not). */
    li t0, -1
    csrw pmpaddr0, t0
    li t0, 0x1f
    csrw pmpcfg0, t0
    lla t0, trap_m
    csrw mtvec, t0
    li s8, 0
    j main

    .balign 4
trap_m:
    csrr s9, mcause
    csrr s10, mtval
    csrr s11, mepc
    beqz s8, fail
    csrw mepc, s8
    li s8, MSTATUS_MPP
    csrs mstatus, s8 /* return to M-mode */
    li s8, 0x80
    csrc mstatus, s8 /* with interrupts off (MPIE = 0) */
    li s8, 0
    mret

    .balign 4
trap_s:
    csrr s9, scause
    csrr s10, stval
    csrr s11, sepc
    beqz s8, fail_s
    csrw sepc, s8
    li s8, MSTATUS_SPP
    csrs sstatus, s8 /* return to S-mode */
    li s8, 0x20
    csrc sstatus, s8 /* with interrupts off (SPIE = 0) */
    li s8, 0
    sret
fail_s:
    ecall /* to M-mode, where s8 == 0 fails the test */

fail:
    slli gp, gp, 1
    ori gp, gp, 1
    lla t6, tohost
    sd gp, 0(t6)
1:  j 1b

pass:
    li t6, 1
    lla t5, tohost
    sd t6, 0(t5)
1:  j 1b

    .section .tohost, "aw"
    .balign 8
    .globl tohost
    .type tohost, @object
    .size tohost, 8
tohost: .quad 0
    .globl fromhost
    .type fromhost, @object
    .size fromhost, 8
fromhost: .quad 0

    .text
