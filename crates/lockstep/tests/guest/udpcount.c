/* A UDP request counter for the guest: each datagram to port 7777 is
 * answered with itself, a space, and how many datagrams have arrived so
 * far (the count is the guest's state that a lost reply would skip).
 * Freestanding (raw Linux syscalls, no libc): the test cross-compiles it
 * with the riscv64 compiler it already installs and types it into the
 * guest, so the guest image stays as it is. */

#define SYS_WRITE 64
#define SYS_EXIT 93
#define SYS_SOCKET 198
#define SYS_BIND 200
#define SYS_SENDTO 206
#define SYS_RECVFROM 207

static long sys6(long n, long a, long b, long c, long d, long e, long f) {
    register long a0 __asm__("a0") = a;
    register long a1 __asm__("a1") = b;
    register long a2 __asm__("a2") = c;
    register long a3 __asm__("a3") = d;
    register long a4 __asm__("a4") = e;
    register long a5 __asm__("a5") = f;
    register long a7 __asm__("a7") = n;
    __asm__ volatile("ecall" : "+r"(a0) : "r"(a1), "r"(a2), "r"(a3), "r"(a4), "r"(a5), "r"(a7) : "memory");
    return a0;
}

struct sockaddr_in {
    unsigned short family;
    unsigned short port; /* network order */
    unsigned int addr;
    unsigned char zero[8];
};

static const char ready[] = "udpcount: ready\n";

void _start(void) {
    long fd = sys6(SYS_SOCKET, 2 /* AF_INET */, 2 /* SOCK_DGRAM */, 0, 0, 0, 0);
    struct sockaddr_in me = {2, (unsigned short)((7777 >> 8) | ((7777 & 0xff) << 8)), 0, {0}};
    if (fd < 0 || sys6(SYS_BIND, fd, (long)&me, sizeof me, 0, 0, 0) < 0) {
        sys6(SYS_EXIT, 1, 0, 0, 0, 0, 0);
    }
    sys6(SYS_WRITE, 1, (long)ready, sizeof ready - 1, 0, 0, 0);
    unsigned long count = 0;
    char buf[512];
    for (;;) {
        struct sockaddr_in peer;
        unsigned int len = sizeof peer;
        long n = sys6(SYS_RECVFROM, fd, (long)buf, 256, 0, (long)&peer, (long)&len);
        if (n < 0) {
            continue;
        }
        count++;
        char digits[24];
        int d = 0;
        unsigned long c = count;
        do {
            digits[d++] = (char)('0' + c % 10);
            c /= 10;
        } while (c);
        buf[n++] = ' ';
        while (d) {
            buf[n++] = digits[--d];
        }
        sys6(SYS_SENDTO, fd, (long)buf, n, 0, (long)&peer, len);
    }
}
