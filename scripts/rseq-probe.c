/*
 * rseq-probe.c -- checks, in the running kernel and glibc, the facts the
 * crate's rseq tier relies on, and prints each one as "probe: ok ..." or
 * "probe: FAIL ..." (with errno spelled out).  Exit status 0 only when every
 * check passed.  Built dynamically against glibc (a static binary cannot see
 * glibc's rseq registration); scripts/arm64-vm.sh --probe cross-builds it
 * for aarch64 and runs it in the guest, and it builds natively too:
 *
 *     cc -O2 -Wall -Wextra -pthread -o /tmp/rseq-probe scripts/rseq-probe.c
 *
 * Usage: rseq-probe [--cpus N] [--expect-unregistered]
 *   --cpus N               also require exactly N CPUs online and usable
 *   --expect-unregistered  require that glibc did NOT register rseq
 *                          (run with GLIBC_TUNABLES=glibc.pthread.rseq=0:
 *                          shows that __rseq_size == 0 is how a program
 *                          detects the fallback)
 *
 * Checks (normal mode):
 *   - glibc exports __rseq_size >= 20 and __rseq_offset (glibc >= 2.35);
 *   - the kernel holds that registration with glibc's RSEQ_SIG: calling
 *     rseq() again with the same area gives EBUSY, a different signature
 *     gives EPERM (kernel/rseq.c checks the area, then the signature);
 *   - cpu_id at thread pointer + __rseq_offset (TPIDR_EL0 on aarch64, the
 *     fs base on x86_64) equals sched_getcpu(), on the main thread and on
 *     a new thread (whose area is a different address);
 *   - sched_setaffinity moves a thread onto each CPU in turn, and after each
 *     move sched_getcpu(), cpu_id and cpu_id_start all name that CPU;
 *   - membarrier QUERY lists PRIVATE_EXPEDITED_RSEQ and its REGISTER
 *     command; issuing it before registering is refused with EPERM;
 *     REGISTER succeeds; then PRIVATE_EXPEDITED_RSEQ succeeds, both for all
 *     CPUs and targeted at one CPU (MEMBARRIER_CMD_FLAG_CPU).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <gnu/libc-version.h>
#include <linux/membarrier.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/rseq.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

static int failures;

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        int ok_ = (cond);                                                                          \
        printf("probe: %s ", ok_ ? "ok  " : "FAIL");                                               \
        printf(__VA_ARGS__);                                                                       \
        printf("\n");                                                                              \
        fflush(stdout);                                                                            \
        if (!ok_)                                                                                  \
            failures++;                                                                            \
    } while (0)

#define INFO(...)                                                                                  \
    do {                                                                                           \
        printf("probe: info ");                                                                    \
        printf(__VA_ARGS__);                                                                       \
        printf("\n");                                                                              \
        fflush(stdout);                                                                            \
    } while (0)

/* "0" on success, else "-1 ENAME (message)". */
static const char *outcome(long rc, int err, char *buf, size_t len)
{
    if (rc >= 0)
        snprintf(buf, len, "%ld", rc);
    else
        snprintf(buf, len, "-1 %s (%s)", strerrorname_np(err) ? strerrorname_np(err) : "?",
                 strerror(err));
    return buf;
}

static volatile struct rseq *rseq_area(void)
{
    return (volatile struct rseq *)((char *)__builtin_thread_pointer() + __rseq_offset);
}

/* cpu_id read so that no migration fell between it and sched_getcpu(). */
static int stable_cpu_pair(uint32_t *rseq_cpu, int *getcpu)
{
    for (int i = 0; i < 100; i++) {
        uint32_t a = rseq_area()->cpu_id;
        int g = sched_getcpu();
        uint32_t b = rseq_area()->cpu_id;
        if (a == b) {
            *rseq_cpu = a;
            *getcpu = g;
            return 1;
        }
    }
    return 0;
}

static long sys_rseq(volatile struct rseq *area, uint32_t len, int flags, uint32_t sig)
{
    return syscall(SYS_rseq, area, len, flags, sig);
}

static long sys_membarrier(int cmd, unsigned flags, int cpu)
{
    return syscall(SYS_membarrier, cmd, flags, cpu);
}

static int ncpus_allowed;
static int allowed[1024];

struct thread_result {
    int checked;
    int mismatches;
    char detail[256];
    uintptr_t area;
};

/* Pins the calling thread to each allowed CPU in turn, twice round. */
static void *migrate(void *arg)
{
    struct thread_result *r = arg;
    r->area = (uintptr_t)rseq_area();
    for (int round = 0; round < 2; round++) {
        for (int i = 0; i < ncpus_allowed; i++) {
            int cpu = allowed[i];
            cpu_set_t set;
            CPU_ZERO(&set);
            CPU_SET(cpu, &set);
            if (sched_setaffinity(0, sizeof set, &set) != 0) {
                r->mismatches++;
                snprintf(r->detail, sizeof r->detail, "sched_setaffinity(cpu %d): -1 %s", cpu,
                         strerrorname_np(errno));
                continue;
            }
            /* The kernel moves the thread before sched_setaffinity returns. */
            int g = sched_getcpu();
            uint32_t id = rseq_area()->cpu_id;
            uint32_t start = rseq_area()->cpu_id_start;
            r->checked++;
            if (g != cpu || id != (uint32_t)cpu || start != (uint32_t)cpu) {
                r->mismatches++;
                snprintf(r->detail, sizeof r->detail,
                         "pinned to %d: sched_getcpu %d, cpu_id %u, cpu_id_start %u", cpu, g, id,
                         start);
            }
        }
    }
    return NULL;
}

int main(int argc, char **argv)
{
    int want_cpus = -1, expect_unregistered = 0;
    char b1[96], b2[96];
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--cpus") && i + 1 < argc)
            want_cpus = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--expect-unregistered"))
            expect_unregistered = 1;
        else {
            fprintf(stderr, "usage: %s [--cpus N] [--expect-unregistered]\n", argv[0]);
            return 2;
        }
    }

    struct utsname u;
    uname(&u);
    INFO("kernel %s %s, machine %s, glibc %s", u.sysname, u.release, u.machine,
         gnu_get_libc_version());
#ifdef __aarch64__
    {
        unsigned long hw = getauxval(AT_HWCAP);
        /* HWCAP_ATOMICS (bit 8): LSE, so a fetch_add is one ldadd, not an LL/SC loop. */
        INFO("AT_HWCAP 0x%lx: LSE atomics %s", hw, (hw & (1UL << 8)) ? "yes" : "no");
    }
#endif
    INFO("__rseq_size %u, __rseq_offset %td, __rseq_flags %u, RSEQ_SIG 0x%08x", __rseq_size,
         __rseq_offset, __rseq_flags, (unsigned)RSEQ_SIG);

    if (expect_unregistered) {
        CHECK(__rseq_size == 0, "glibc did not register rseq: __rseq_size == 0 (is %u)",
              __rseq_size);
        long rc = sys_rseq(rseq_area(), sizeof(struct rseq), 0, RSEQ_SIG);
        int err = errno;
        /* Nothing registered: the kernel takes a fresh registration (0). */
        CHECK(rc == 0, "the thread had no rseq area: registering one now returns 0 (got %s)",
              outcome(rc, err, b1, sizeof b1));
        printf("probe: %d check(s) failed\n", failures);
        return failures ? 1 : 0;
    }

    /* 1. glibc registered rseq. */
    CHECK(__rseq_size >= 20,
          "glibc registered rseq: __rseq_size %u >= 20 (cpu_id_start, cpu_id, rseq_cs, flags)",
          __rseq_size);
    if (__rseq_size < 20) {
        printf("probe: %d check(s) failed (no rseq: the rest is meaningless)\n", failures);
        return 1;
    }
    {
        long busy = sys_rseq(rseq_area(), sizeof(struct rseq), 0, RSEQ_SIG);
        int e1 = errno;
        long perm = sys_rseq(rseq_area(), sizeof(struct rseq), 0, RSEQ_SIG ^ 1u);
        int e2 = errno;
        CHECK(busy == -1 && e1 == EBUSY,
              "the kernel holds glibc's registration: rseq(same area, len %zu, RSEQ_SIG) -> %s",
              sizeof(struct rseq), outcome(busy, e1, b1, sizeof b1));
        CHECK(perm == -1 && e2 == EPERM,
              "registered signature is RSEQ_SIG 0x%08x: rseq(same area, other sig) -> %s",
              (unsigned)RSEQ_SIG, outcome(perm, e2, b2, sizeof b2));
#ifdef __aarch64__
        CHECK(RSEQ_SIG == 0xd428bc00u, "aarch64 RSEQ_SIG is 0xd428bc00 (brk #0x45e0)");
#endif
    }

    /* 2. cpu_id at thread pointer + __rseq_offset. */
    {
        uint32_t id = UINT32_MAX;
        int g = -1;
        int stable = stable_cpu_pair(&id, &g);
        CHECK(stable && id == (uint32_t)g,
              "main thread: cpu_id at thread pointer %+td = %u, sched_getcpu() = %d",
              __rseq_offset, id, g);
    }

    /* 3. CPUs online and usable. */
    {
        cpu_set_t set;
        CPU_ZERO(&set);
        if (sched_getaffinity(0, sizeof set, &set) == 0) {
            for (int c = 0; c < CPU_SETSIZE && ncpus_allowed < 1024; c++)
                if (CPU_ISSET(c, &set))
                    allowed[ncpus_allowed++] = c;
        }
        long online = sysconf(_SC_NPROCESSORS_ONLN);
        if (want_cpus > 0)
            CHECK(online == want_cpus && ncpus_allowed == want_cpus,
                  "%d CPUs: %ld online, %d in the affinity mask", want_cpus, online,
                  ncpus_allowed);
        else
            INFO("%ld CPUs online, %d in the affinity mask", online, ncpus_allowed);
    }

    /* 4. Migration by sched_setaffinity, seen by sched_getcpu and rseq. */
    {
        struct thread_result r = { 0 };
        pthread_t t;
        int rc = pthread_create(&t, NULL, migrate, &r);
        if (rc == 0)
            pthread_join(t, NULL);
        CHECK(rc == 0 && r.checked == 2 * ncpus_allowed && r.mismatches == 0,
              "a new thread (area %s the main thread's) pinned to each of %d CPUs twice: "
              "%d moves, sched_getcpu/cpu_id/cpu_id_start agreed %d times%s%s",
              r.area != (uintptr_t)rseq_area() ? "distinct from" : "SAME AS", ncpus_allowed,
              r.checked, r.checked - r.mismatches, r.mismatches ? "; last mismatch: " : "",
              r.detail);
    }

    /* 5. membarrier(PRIVATE_EXPEDITED_RSEQ). */
    {
        long q = sys_membarrier(MEMBARRIER_CMD_QUERY, 0, 0);
        int eq = errno;
        int want = MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ |
                   MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ;
        CHECK(q >= 0 && (q & want) == want,
              "membarrier QUERY = %s lists PRIVATE_EXPEDITED_RSEQ (0x%x) and its REGISTER (0x%x)",
              q >= 0 ? (snprintf(b1, sizeof b1, "0x%lx", q), b1) : outcome(q, eq, b1, sizeof b1),
              MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ,
              MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ);
        long early = sys_membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ, 0, 0);
        int ee = errno;
        CHECK(early == -1 && ee == EPERM, "PRIVATE_EXPEDITED_RSEQ before REGISTER -> %s",
              outcome(early, ee, b1, sizeof b1));
        long reg = sys_membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ, 0, 0);
        int er = errno;
        CHECK(reg == 0, "REGISTER_PRIVATE_EXPEDITED_RSEQ -> %s", outcome(reg, er, b1, sizeof b1));
        long all = sys_membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ, 0, 0);
        int ea = errno;
        CHECK(all == 0, "PRIVATE_EXPEDITED_RSEQ (all CPUs) -> %s", outcome(all, ea, b1, sizeof b1));
        int target = ncpus_allowed > 1 ? allowed[ncpus_allowed - 1] : 0;
        long one = sys_membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ, MEMBARRIER_CMD_FLAG_CPU,
                                  target);
        int eo = errno;
        CHECK(one == 0, "PRIVATE_EXPEDITED_RSEQ with MEMBARRIER_CMD_FLAG_CPU, cpu %d -> %s", target,
              outcome(one, eo, b1, sizeof b1));
    }

    printf("probe: %d check(s) failed\n", failures);
    return failures ? 1 : 0;
}
