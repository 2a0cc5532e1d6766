/* Sv39/Sv48 translation: permissions, A/D updates, SUM/MXR, superpages,
 * misaligned superpages, MPRV, satp WARL, sfence.vma (Privileged ISA 4.3-4.5).
 *
 * Physical layout: page tables at 0x8030_0000, test pages at 0x8040_0000.
 * Virtual layout under Sv39:
 *   0x8000_0000 1 GiB  identity gigapage, RWX, not U (the code, in S-mode)
 *   0x4000_0000 1 GiB  alias of the same, RWX + U  (the code, in U-mode)
 *   0x0000_1000 4 KiB  test page (its PTE is rewritten by each test)
 *   0x0020_0000 2 MiB  megapage -> 0x8060_0000
 *   0x0040_0000 2 MiB  misaligned megapage (ppn[0] != 0)
 */
#include "macros.h"

#define ROOT 0x80300000
#define L1 0x80301000
#define L0 0x80302000
#define ROOT48 0x80303000
#define PAGE_A 0x80400000
#define PAGE_B 0x80401000
#define MEGA 0x80600000
#define PTE(pa, flags) ((((pa) >> 12) << 10) | (flags))
#define V 1
#define R 2
#define W 4
#define X 8
#define U 16
#define A 64
#define D 128
#define TEST_PTE (L0 + 8)
#define SATP39 ((8 << 60) | (ROOT >> 12))
#define SATP48 ((9 << 60) | (ROOT48 >> 12))

#define STORE64(addr, val) li t0, addr; li t1, val; sd t1, 0(t0)
#define SET_TEST_PTE(val) STORE64(TEST_PTE, val); sfence.vma
/* Enter U-mode at the U alias of `target`. */
#define ENTER_U_ALIAS(target)     \
    li t0, MSTATUS_MPP;           \
    csrc mstatus, t0;             \
    lla t0, target;                \
    li t1, 0x40000000;            \
    sub t0, t0, t1;               \
    csrw mepc, t0;                \
    mret

/* In U-mode code, labels are alias addresses: recovery runs in M-mode at
 * the physical address. */
#define EXPECT_TRAP_U(recover) lla s8, recover; li t6, 0x40000000; add s8, s8, t6

main:
    STORE64(ROOT + 8 * 2, PTE(0x80000000, V | R | W | X | A | D))
    STORE64(ROOT + 8 * 1, PTE(0x80000000, V | R | W | X | U | A | D))
    STORE64(ROOT + 8 * 0, PTE(L1, V))
    STORE64(L1 + 8 * 0, PTE(L0, V))
    STORE64(L1 + 8 * 1, PTE(MEGA, V | R | W | A | D))
    STORE64(L1 + 8 * 2, PTE(MEGA + 0x1000, V | R | W | A | D))
    STORE64(ROOT48, PTE(ROOT, V))
    STORE64(PAGE_A, 0xaaaa)
    STORE64(PAGE_B, 0xbbbb)
    STORE64(MEGA + 0x1234, 0x1234abcd)
    li t0, SATP39
    csrw satp, t0
    csrr t1, satp
    CHECK_REG(t0, t1)

    TEST(1) /* S-mode load and store through a 4 KiB page */
    SET_TEST_PTE(PTE(PAGE_A, V | R | W | A | D))
    ENTER_MODE(1, s1)
s1: li t0, 0x1000
    ld a0, 0(t0)
    li a1, 0x5555
    sd a1, 8(t0)
    EXPECT_TRAP(1f)
    ecall
1:  CHECK(a0, 0xaaaa)
    li t0, PAGE_A
    ld t1, 8(t0)
    CHECK(t1, 0x5555)

    TEST(2) /* A is set by a load, D by a store */
    SET_TEST_PTE(PTE(PAGE_A, V | R | W))
    ENTER_MODE(1, s2)
s2: li t0, 0x1000
    ld a0, 0(t0)
    EXPECT_TRAP(1f)
    ecall
1:  li t0, TEST_PTE
    ld t1, 0(t0)
    CHECK(t1, PTE(PAGE_A, V | R | W | A))
    ENTER_MODE(1, s2b)
s2b: li t0, 0x1000
    sd zero, 16(t0)
    EXPECT_TRAP(1f)
    ecall
1:  li t0, TEST_PTE
    ld t1, 0(t0)
    CHECK(t1, PTE(PAGE_A, V | R | W | A | D))

    TEST(3) /* store to a read-only page: store page fault, mtval = address */
    SET_TEST_PTE(PTE(PAGE_A, V | R | A))
    ENTER_MODE(1, s3)
s3: EXPECT_TRAP(1f)
    li t0, 0x1008
    sd zero, 0(t0)
1:  CHECK_TRAP(15)
    CHECK(s10, 0x1008)

    TEST(4) /* invalid PTE: load page fault */
    SET_TEST_PTE(0)
    ENTER_MODE(1, s4)
s4: EXPECT_TRAP(1f)
    li t0, 0x1010
    lw a0, 0(t0)
1:  CHECK_TRAP(13)
    CHECK(s10, 0x1010)

    TEST(5) /* fetch from a page without X: instruction page fault */
    SET_TEST_PTE(PTE(PAGE_A, V | R | W | A | D))
    ENTER_MODE(1, s5)
s5: EXPECT_TRAP(1f)
    li t0, 0x1000
    jr t0
1:  CHECK_TRAP(12)
    CHECK(s10, 0x1000)
    CHECK(s11, 0x1000)

    TEST(6) /* SUM: S-mode reaches U pages only with SUM, and never executes them */
    SET_TEST_PTE(PTE(PAGE_A, V | R | W | X | U | A | D))
    ENTER_MODE(1, s6)
s6: EXPECT_TRAP(1f)
    li t0, 0x1000
    ld a0, 0(t0)
1:  CHECK_TRAP(13)
    li t0, 1 << 18
    csrs mstatus, t0
    ENTER_MODE(1, s6b)
s6b: li t0, 0x1000
    ld a0, 0(t0)
    EXPECT_TRAP(1f)
    ecall
1:  CHECK_TRAP(9)
    CHECK(a0, 0xaaaa)
    ENTER_MODE(1, s6c)
s6c: EXPECT_TRAP(1f)
    li t0, 0x1000
    jr t0
1:  CHECK_TRAP(12)
    li t0, 1 << 18
    csrc mstatus, t0

    TEST(7) /* MXR: execute-only pages become readable */
    SET_TEST_PTE(PTE(PAGE_A, V | X | A))
    ENTER_MODE(1, s7)
s7: EXPECT_TRAP(1f)
    li t0, 0x1000
    ld a0, 0(t0)
1:  CHECK_TRAP(13)
    li t0, 1 << 19
    csrs mstatus, t0
    ENTER_MODE(1, s7b)
s7b: li t0, 0x1000
    ld a0, 0(t0)
    EXPECT_TRAP(1f)
    ecall
1:  CHECK_TRAP(9)
    CHECK(a0, 0xaaaa)
    li t0, 1 << 19
    csrc mstatus, t0

    TEST(8) /* U-mode: runs from U pages, faults on a non-U page */
    SET_TEST_PTE(PTE(PAGE_A, V | R | W | A | D))
    ENTER_U_ALIAS(u8)
u8: EXPECT_TRAP_U(1f)
    li t0, 0x1000
    ld a0, 0(t0)
1:  CHECK_TRAP(13)
    CHECK(s10, 0x1000)
    SET_TEST_PTE(PTE(PAGE_A, V | R | W | U | A | D))
    ENTER_U_ALIAS(u8b)
u8b: li t0, 0x1000
    ld a0, 0(t0)
    EXPECT_TRAP_U(1f)
    ecall
1:  CHECK_TRAP(8)
    CHECK(a0, 0xaaaa)

    TEST(9) /* a 2 MiB megapage */
    ENTER_MODE(1, s9)
s9: li t0, 0x201234
    ld a0, 0(t0)
    EXPECT_TRAP(1f)
    ecall
1:  CHECK(a0, 0x1234abcd)

    TEST(10) /* a misaligned megapage is a page fault */
    ENTER_MODE(1, s10l)
s10l: EXPECT_TRAP(1f)
    li t0, 0x400000
    ld a0, 0(t0)
1:  CHECK_TRAP(13)

    TEST(11) /* non-canonical address under Sv39 */
    ENTER_MODE(1, s11l)
s11l: EXPECT_TRAP(1f)
    li t0, 0x0000008000000000
    ld a0, 0(t0)
1:  CHECK_TRAP(13)
    CHECK(s10, 0x0000008000000000)

    TEST(12) /* writing a reserved mode leaves satp unchanged */
    li t0, (13 << 60) | 0x1234
    csrw satp, t0
    csrr t1, satp
    CHECK(t1, SATP39)

    TEST(13) /* sfence.vma makes a changed PTE visible */
    SET_TEST_PTE(PTE(PAGE_A, V | R | A))
    ENTER_MODE(1, s13)
s13: li t0, 0x1000
    ld a0, 0(t0)
    EXPECT_TRAP(1f)
    ecall
1:  SET_TEST_PTE(PTE(PAGE_B, V | R | A))
    ENTER_MODE(1, s13b)
s13b: li t0, 0x1000
    ld a1, 0(t0)
    EXPECT_TRAP(1f)
    ecall
1:  CHECK(a0, 0xaaaa)
    CHECK(a1, 0xbbbb)

    TEST(14) /* MPRV: M-mode loads translated as MPP = S */
    li t0, MSTATUS_MPP
    csrc mstatus, t0
    li t0, (1 << 11) | (1 << 17)
    csrs mstatus, t0
    li t0, 0x1000
    ld a0, 0(t0)
    li t0, 1 << 17
    csrc mstatus, t0
    CHECK(a0, 0xbbbb)

    TEST(15) /* Sv48: four levels; the Sv39 root serves as a level-2 table */
    li t0, SATP48
    csrw satp, t0
    csrr t1, satp
    CHECK_REG(t0, t1)
    ENTER_MODE(1, s15)
s15: li t0, 0x1000
    ld a0, 0(t0)
    li t0, 0x201234
    ld a1, 0(t0)
    EXPECT_TRAP(1f)
    ecall
1:  CHECK(a0, 0xbbbb)
    CHECK(a1, 0x1234abcd)
    j pass
