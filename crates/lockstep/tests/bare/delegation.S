/* Trap delegation (medeleg/mideleg), xRET, and the TSR/TVM/TW traps
 * (Privileged ISA 3.1.6.5, 3.1.8, 4.1.1). */
#include "macros.h"
main:
    lla t0, trap_s
    csrw stvec, t0
    li t0, (1 << 8) | (1 << 2) /* delegate ecall-from-U and illegal instruction */
    csrw medeleg, t0

    TEST(1) /* ecall from U goes to S: scause 8, sepc, SPP = U */
    ENTER_MODE(0, u1)
u1: EXPECT_TRAP(1f)
ecall_u:
    ecall
1:  /* now in S-mode */
    CHECK_TRAP(8)
    lla t0, ecall_u
    CHECK_REG(s11, t0)

    TEST(2) /* ecall from S is not delegated: M-mode, cause 9, MPP = S */
    EXPECT_TRAP(1f)
    ecall
1:  CHECK_TRAP(9)

    TEST(3) /* illegal instruction in U: delegated, stval = bits */
    ENTER_MODE(0, u3)
u3: EXPECT_TRAP(1f)
    .word 0xffffffff
1:  CHECK_TRAP(2)
    CHECK(s10, 0xffffffff)
    EXPECT_TRAP(2f)
    ecall /* back to M-mode */
2:

    TEST(4) /* breakpoint from U is not delegated: M-mode */
    ENTER_MODE(0, u4)
u4: EXPECT_TRAP(1f)
    ebreak
1:  CHECK_TRAP(3)
    csrr t0, mcause
    CHECK(t0, 3)

    TEST(5) /* exceptions in M-mode are never delegated */
    EXPECT_TRAP(1f)
    .word 0xffffffff
1:  csrr t0, mcause
    CHECK(t0, 2)

    TEST(6) /* TSR: sret in S traps to M as illegal */
    li t0, 1 << 2 /* stop delegating illegal instructions */
    csrc medeleg, t0
    li t0, 1 << 22
    csrs mstatus, t0
    ENTER_MODE(1, s6)
s6: EXPECT_TRAP(1f)
    sret
1:  csrr t0, mcause
    CHECK(t0, 2)
    li t0, 1 << 22
    csrc mstatus, t0

    TEST(7) /* TVM: satp and sfence.vma in S trap as illegal */
    li t0, 1 << 20
    csrs mstatus, t0
    ENTER_MODE(1, s7)
s7: EXPECT_TRAP(1f)
    csrr t1, satp
1:  csrr t0, mcause
    CHECK(t0, 2)
    ENTER_MODE(1, s7b)
s7b: EXPECT_TRAP(1f)
    sfence.vma
1:  csrr t0, mcause
    CHECK(t0, 2)
    li t0, 1 << 20
    csrc mstatus, t0

    TEST(8) /* TW: wfi in S is illegal; wfi in U is always illegal */
    li t0, 1 << 21
    csrs mstatus, t0
    ENTER_MODE(1, s8m)
s8m: EXPECT_TRAP(1f)
    wfi
1:  csrr t0, mcause
    CHECK(t0, 2)
    li t0, 1 << 21
    csrc mstatus, t0
    ENTER_MODE(0, u8)
u8: EXPECT_TRAP(1f)
    wfi
1:  csrr t0, mcause
    CHECK(t0, 2)

    TEST(9) /* privilege of CSRs: U cannot read sstatus, S cannot read mstatus, S cannot mret */
    ENTER_MODE(0, u9)
u9: EXPECT_TRAP(1f)
    csrr t1, sstatus
1:  csrr t0, mcause
    CHECK(t0, 2)
    ENTER_MODE(1, s9)
s9: EXPECT_TRAP(1f)
    csrr t1, mstatus
1:  csrr t0, mcause
    CHECK(t0, 2)
    ENTER_MODE(1, s9b)
s9b: EXPECT_TRAP(1f)
    mret
1:  csrr t0, mcause
    CHECK(t0, 2)

    TEST(10) /* sstatus is a view of mstatus; sie is masked by mideleg */
    li t0, MSTATUS_MPP
    csrs mstatus, t0
    li t0, -1
    csrw sstatus, t0
    csrr t1, mstatus
    li t2, MSTATUS_MPP
    and t1, t1, t2
    CHECK(t1, MSTATUS_MPP) /* MPP untouched by the sstatus write */
    TEST(12)
    csrr t1, sstatus
    and t1, t1, t2
    CHECK(t1, 0) /* and invisible through it */
#ifndef QEMU /* QEMU 7.2 has the H extension: VS bits in mideleg/mie */
    TEST(13)
    li t0, 0x222
    csrw mideleg, t0
    li t0, -1
    csrw mie, x0
    csrw sie, t0
    csrr t1, mie
    andi t1, t1, 0x7ff /* QEMU may add LCOFI (bit 13) */
    CHECK(t1, 0x222)
    csrr t1, mideleg
    andi t1, t1, 0x7ff
    CHECK(t1, 0x222)
    li t0, 0x2
    csrw mideleg, t0
    csrr t1, sie
    CHECK(t1, 0x2)
#endif

    TEST(14) /* sret returns to SPP and restores SIE from SPIE */
    li t0, 0x122 /* SPP, SPIE, SIE */
    csrc mstatus, t0
    li t0, 0x120 /* SPP = S, SPIE = 1 */
    csrs mstatus, t0
    lla t0, 1f
    csrw sepc, t0
    sret
1:  csrr t0, sstatus /* now in S-mode */
    andi t0, t0, 0x122
    CHECK(t0, 0x22) /* SIE = 1, SPIE = 1, SPP = U */
    j pass
