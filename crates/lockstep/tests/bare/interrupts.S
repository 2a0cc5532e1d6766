/* Interrupts: CLINT timer and software interrupts, priorities, vectored
 * mtvec, wfi, delegation of supervisor interrupts, Sstc (3.1.9, 3.3.3). */
#include "macros.h"
main:
    TEST(1) /* timer interrupt through wfi; vectored mtvec sends it to base + 4*7 */
    lla t0, vec_table
    ori t0, t0, 1
    csrw mtvec, t0
    li t0, CLINT_MTIME
    ld t1, 0(t0)
    addi t1, t1, 50
    li t0, CLINT_MTIMECMP
    sd t1, 0(t0)
    li t0, 0x80 /* MTIE */
    csrw mie, t0
    li s8, 0
    /* Wait with MIE off and take the interrupt only between the csrsi and
     * the csrci: taken just before a wfi (the deadline can pass first on a
     * loaded host), its mret would return to the wfi with nothing left
     * pending, and wfi may then wait forever (QEMU does). */
1:  bnez s8, 2f /* s8 = cause, set by the vector entry */
    wfi /* wakes on MTIP pending in mie, whatever MIE */
    csrsi mstatus, 8
    csrci mstatus, 8
    j 1b
2:
    li t0, 0x8000000000000007
    CHECK_REG(s8, t0)
    /* time has reached mtimecmp */
    li t0, CLINT_MTIME
    ld t2, 0(t0)
    bltu t2, t1, fail

    TEST(2) /* software interrupt: msip */
    li s8, 0
    li t0, 0x8 /* MSIE */
    csrw mie, t0
    li t0, CLINT_MSIP
    li t1, 1
    sw t1, 0(t0)
    csrsi mstatus, 8
    nop
    csrci mstatus, 8
    li t0, 0x8000000000000003
    CHECK_REG(s8, t0)

    TEST(3) /* with MSIP and MTIP both pending, MSI (3) goes first */
    li t0, CLINT_MSIP
    li t1, 1
    sw t1, 0(t0)
    li t0, CLINT_MTIMECMP
    sd x0, 0(t0) /* timer pending now */
    li t0, 0x88
    csrw mie, t0
    csrr t1, mip
    andi t1, t1, 0x88
    CHECK(t1, 0x88)
    li s8, 0
    csrsi mstatus, 8
    nop
    csrci mstatus, 8
    li t0, 0x8000000000000003
    CHECK_REG(s8, t0)
    csrw mie, x0

    TEST(4) /* wfi with interrupts globally off still wakes, without a trap */
    li t0, 0x80
    csrw mie, t0
    li t0, CLINT_MTIME
    ld t1, 0(t0)
    addi t1, t1, 30
    li t0, CLINT_MTIMECMP
    sd t1, 0(t0)
    li s8, 0
    wfi
    CHECK(s8, 0)
    csrr t0, mip
    andi t0, t0, 0x80
    CHECK(t0, 0x80)
    csrw mie, x0
    li t0, CLINT_MTIMECMP
    li t1, -1
    sd t1, 0(t0)

    TEST(5) /* supervisor software interrupt delegated to S: taken in S-mode */
    lla t0, trap_m
    csrw mtvec, t0
    lla t0, trap_s
    csrw stvec, t0
    li t0, 0x2 /* SSI */
    csrw mideleg, t0
    csrw mie, t0
    ENTER_MODE(1, s_mode)
s_mode:
    EXPECT_TRAP(1f)
    csrsi sstatus, 2 /* SIE */
    csrsi sip, 2      /* raise SSIP from S-mode */
    nop
1:  li t0, 0x8000000000000001
    CHECK_REG(s9, t0)
    csrci sip, 2
    csrci sstatus, 2

#ifdef QEMU /* QEMU's spike board has neither rdtime nor Sstc */
    j pass
#endif
    TEST(6) /* Sstc: stimecmp raises STIP for S-mode */
    EXPECT_TRAP(2f)
    ecall /* back to M-mode to enable Sstc */
2:  li t0, 0x8000000000000000 /* menvcfg.STCE */
    csrs menvcfg, t0
    li t0, 2 /* mcounteren.TM */
    csrs mcounteren, t0
    li t0, 0x20 /* STI */
    csrw mideleg, t0
    csrw mie, t0
    ENTER_MODE(1, s_mode2)
s_mode2:
    rdtime t1
    addi t1, t1, 20
    csrw stimecmp, t1
    EXPECT_TRAP(1f)
    csrsi sstatus, 2
3:  j 3b
1:  li t0, 0x8000000000000005
    CHECK_REG(s9, t0)
    j pass

    .balign 256
vec_table:
    .rept 16
    j vec_any
    .endr
vec_any: /* record the first interrupt's cause in s8, then silence it */
    csrr t3, mcause
    bnez s8, 2f
    mv s8, t3
2:  li t0, 0x8000000000000007
    bne t3, t0, 1f
    li t0, CLINT_MTIMECMP /* silence the timer */
    li t2, -1
    sd t2, 0(t0)
    mret
1:  li t0, CLINT_MSIP
    sw x0, 0(t0)
    mret
