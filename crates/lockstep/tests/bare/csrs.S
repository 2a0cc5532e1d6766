/* CSRs: identity, counters and their gating, FS tracking, fcsr fields,
 * existence and read-only checks (Privileged ISA 2.1, 3.1, 3.3.1; Zicntr). */
#include "macros.h"
main:
    TEST(1) /* misa: RV64 IMAFDC + S + U; mhartid 0 */
    csrr t0, misa
    li t1, (2 << 62) | (1 << 0) | (1 << 2) | (1 << 3) | (1 << 5) | (1 << 8) | (1 << 12) | (1 << 18) | (1 << 20)
#ifdef QEMU /* QEMU has more extensions */
    and t0, t0, t1
#endif
    CHECK_REG(t0, t1)
    csrr t0, mhartid
    CHECK(t0, 0)

#ifndef QEMU /* QEMU counts exactly only with -icount */
    TEST(2) /* minstret counts exactly: 5 instructions between two reads */
    csrr t0, minstret
    nop
    nop
    nop
    nop
    csrr t1, minstret
    sub t1, t1, t0
    CHECK(t1, 5)
    /* an exception does not retire the faulting instruction */
    csrr t0, minstret
    EXPECT_TRAP(1f)
    ecall
1:  csrr t1, minstret
    sub t1, t1, t0
    /* csrr + ecall(not retired) + trap_m's 11 instructions incl. mret + la(2) */
    li t2, 16
    bgeu t1, t2, fail

    TEST(3) /* minstret is writable from M-mode; mcountinhibit freezes it */
    li t0, 1000
    csrw minstret, t0
    csrr t1, minstret
    CHECK(t1, 1000) /* the write takes effect after the csrw completes */
    csrwi mcountinhibit, 4
    csrr t0, minstret
    nop
    nop
    csrr t1, minstret
    CHECK_REG(t0, t1)
    csrwi mcountinhibit, 0
#endif

#ifdef QEMU /* no rdtime on QEMU's spike board */
#define rdtime rdcycle
#endif
    TEST(4) /* mcounteren gates U/S access to cycle, time and instret */
    csrw mcounteren, x0
    csrw scounteren, x0
    ENTER_MODE(0, u4)
u4: EXPECT_TRAP(1f)
    rdcycle t0
1:  CHECK_TRAP(2)
    li t0, 7
    csrw mcounteren, t0
    csrw scounteren, t0
    ENTER_MODE(0, u4b)
u4b: rdcycle t0
    rdtime t1
    rdinstret t2
    EXPECT_TRAP(1f)
    ecall
1:  CHECK_TRAP(8)

#ifndef QEMU
    TEST(5) /* time follows mtime */
    li t0, CLINT_MTIME
    ld t1, 0(t0)
    rdtime t2
    bltu t2, t1, fail
#endif

    TEST(6) /* FS = Off makes FP instructions and fcsr illegal, with mtval = bits */
    li t0, MSTATUS_FS
    csrc mstatus, t0
    EXPECT_TRAP(1f)
fp_off:
    fadd.d f1, f2, f3
1:  CHECK_TRAP(2)
    lw t0, fp_off
    CHECK_REG(s10, t0)
    EXPECT_TRAP(1f)
    csrr t0, fcsr
1:  CHECK_TRAP(2)

    TEST(7) /* FS tracking: Initial stays until an FP write makes it Dirty; SD follows */
    li t0, 1 << 13 /* Initial */
    csrs mstatus, t0
    csrr t0, mstatus
    bltz t0, fail /* SD clear */
    fmv.d.x f1, zero
    csrr t0, mstatus
    li t1, MSTATUS_FS
    and t2, t0, t1
    CHECK_REG(t2, t1)
    bgez t0, fail /* SD set */

    TEST(8) /* fcsr = frm << 5 | fflags */
    li t0, 0xff
    csrw fcsr, t0
    csrr t1, frm
    CHECK(t1, 7)
    csrr t1, fflags
    CHECK(t1, 0x1f)
    csrwi frm, 1
    csrr t1, fcsr
    CHECK(t1, 0x3f)
    /* a reserved dynamic rounding mode makes dynamic FP ops illegal */
    csrwi frm, 5
    EXPECT_TRAP(1f)
    fadd.d f1, f2, f3, dyn
1:  CHECK_TRAP(2)
    csrwi frm, 0

    TEST(9) /* a CSR that does not exist, and a write to a read-only CSR, are illegal */
    EXPECT_TRAP(1f)
    csrr t0, 0x7c0
1:  CHECK_TRAP(2)
    EXPECT_TRAP(1f)
    csrw mhartid, t0
1:  CHECK_TRAP(2)
    /* reading a read-only CSR with csrrs x0 is fine */
    csrrs t0, mvendorid, x0

    TEST(10) /* WARL fields: mtvec mode 2 reads back legal; mepc bit 0 clear */
    li t0, 0x80000102
    csrw mtvec, t0
    csrr t1, mtvec
    andi t1, t1, 3
    li t2, 2
    beq t1, t2, fail
    lla t0, trap_m
    csrw mtvec, t0
#ifndef QEMU /* QEMU 7.2 stores mepc bit 0 as written */
    li t0, 0x80000003
    csrw mepc, t0
    csrr t1, mepc
    CHECK(t1, 0x80000002)
#endif
#ifndef QEMU /* QEMU keeps the reserved MPP value */
    /* MPP = 2 (reserved) is not kept */
    li t0, MSTATUS_MPP
    csrc mstatus, t0
    li t0, 0x1000
    csrs mstatus, t0
    csrr t1, mstatus
    li t2, MSTATUS_MPP
    and t1, t1, t2
    li t2, 0x1000
    beq t1, t2, fail
#endif

    TEST(11) /* PMP CSRs are accepted */
    li t0, 0x1f
    csrw pmpcfg0, t0
    csrr t1, pmpcfg0
    CHECK(t1, 0x1f)
#ifndef QEMU /* QEMU's pmpaddr keeps other bits */
    li t0, -1
    csrw pmpaddr0, t0
    csrr t1, pmpaddr0
    CHECK(t1, 0x3fffffffffffff)
#endif

#ifdef QEMU /* QEMU 7.2 has the H extension: other delegable bits */
    j pass
#endif
    TEST(12) /* medeleg cannot delegate ecall from M; mideleg holds only S bits */
    li t0, -1
    csrw medeleg, t0
    csrr t1, medeleg
    CHECK(t1, 0xb3ff)
    csrw mideleg, t0
    csrr t1, mideleg
    CHECK(t1, 0x222)
    csrw medeleg, x0
    csrw mideleg, x0
    j pass
