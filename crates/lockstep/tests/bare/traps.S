/* Exceptions in M-mode: causes, mtval and mepc (Privileged ISA 3.1.14-16). */
#include "macros.h"
main:
    TEST(1) /* illegal 32-bit instruction: mtval = its bits */
    EXPECT_TRAP(1f)
bad32:
    .word 0xffffffff
1:  CHECK_TRAP(2)
    CHECK(s10, 0xffffffff)
    lla t0, bad32
    CHECK_REG(s11, t0)

    TEST(2) /* illegal compressed instruction: mtval = the 16 bits */
    EXPECT_TRAP(1f)
bad16:
    .half 0x0000
1:  CHECK_TRAP(2)
    CHECK(s10, 0)
    lla t0, bad16
    CHECK_REG(s11, t0)

    TEST(3) /* ebreak: cause 3, mtval = pc */
    EXPECT_TRAP(1f)
brk:
    ebreak
1:  CHECK_TRAP(3)
    lla t0, brk
    CHECK_REG(s11, t0)

    TEST(4) /* ecall from M: cause 11 */
    EXPECT_TRAP(1f)
    ecall
1:  CHECK_TRAP(11)

    TEST(5) /* load from a hole in the address space: access fault, mtval = address */
    EXPECT_TRAP(1f)
    li t1, 0x10000000
    ld t2, 8(t1)
1:  CHECK_TRAP(5)
    CHECK(s10, 0x10000008)

    TEST(6) /* store access fault */
    EXPECT_TRAP(1f)
    li t1, 0x40000000
    sw t2, 0(t1)
1:  CHECK_TRAP(7)
    CHECK(s10, 0x40000000)

    TEST(7) /* fetch access fault: mepc = mtval = the target */
    EXPECT_TRAP(1f)
    li t1, 0x30000000
    jr t1
1:  CHECK_TRAP(1)
    CHECK(s10, 0x30000000)
    CHECK(s11, 0x30000000)

#ifndef QEMU /* QEMU traps misaligned accesses; both are allowed */
    TEST(8) /* misaligned loads and stores are handled, not trapped */
    lla t1, buf
    li t2, 0x1122334455667788
    sd t2, 3(t1)
    ld t3, 3(t1)
    CHECK_REG(t2, t3)
    lw t3, 5(t1)
    CHECK(t3, 0x33445566)
    lhu t3, 1(t1)
    CHECK(t3, 0)
    lhu t3, 3(t1)
    CHECK(t3, 0x7788)
    /* across a page boundary */
    lla t1, buf + 4096 - 3
    sd t2, 0(t1)
    ld t3, 0(t1)
    CHECK_REG(t2, t3)
#endif

    TEST(9) /* misaligned AMO: store/AMO address misaligned, cause 6 */
    EXPECT_TRAP(1f)
    lla t1, buf + 4
    amoadd.d t2, t2, (t1)
1:
#ifdef QEMU /* QEMU 7.2 reports a misaligned AMO as a misaligned load */
    CHECK_TRAP(4)
#else
    CHECK_TRAP(6)
#endif
    lla t0, buf + 4
    CHECK_REG(s10, t0)

    TEST(10) /* misaligned LR: load address misaligned, cause 4 */
    EXPECT_TRAP(1f)
    lla t1, buf + 2
    lr.w t2, (t1)
1:  CHECK_TRAP(4)

    TEST(11) /* mret: MIE <- MPIE, MPIE <- 1, MPP <- U, pc <- mepc */
    li t0, 0x1888 /* MPP = M, MPIE, MIE */
    csrc mstatus, t0
    li t0, 0x1880 /* MPP = M, MPIE = 1, MIE = 0 */
    csrs mstatus, t0
    lla t0, 1f
    csrw mepc, t0
    mret
1:  csrr t0, mstatus
    li t1, 0x1888
    and t0, t0, t1
    CHECK(t0, 0x88)
    csrci mstatus, 8

    TEST(12) /* vectored mtvec: exceptions still go to the base */
    lla t0, trap_m
    ori t0, t0, 1
    csrw mtvec, t0
    EXPECT_TRAP(1f)
    ecall
1:  CHECK_TRAP(11)
    csrr t0, mtvec
    lla t1, trap_m
    ori t1, t1, 1
    CHECK_REG(t0, t1)
    lla t0, trap_m
    csrw mtvec, t0

    TEST(13) /* x0 stays zero whatever is written to it */
    li t0, 5
    add x0, t0, t0
    lui x0, 0x12345
    lla t1, buf
    ld x0, 0(t1)
    CHECK(x0, 0)

    TEST(14) /* division edge cases */
    li t0, -1
    li t1, 0
    div t2, t0, t1
    CHECK(t2, -1)
    rem t2, t0, t1
    CHECK(t2, -1)
    li t0, 0x8000000000000000
    li t1, -1
    div t2, t0, t1
    CHECK_REG(t2, t0)
    rem t2, t0, t1
    CHECK(t2, 0)
    li t0, 0x80000000
    divw t2, t0, t1
    CHECK(t2, 0xffffffff80000000)
    remuw t2, t0, x0
    CHECK(t2, 0xffffffff80000000)

    j pass

    .data
    .balign 4096
buf: .zero 8192
