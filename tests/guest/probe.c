/*
 * cprd's Linux test-guest probe (runs as PID 1 in the test initramfs, under QEMU).
 *
 * Prints one line every PERIOD_MS (or argv[2] ms) on the serial console:
 *   PROBE boot=<boot id> seq=<n> up_ms=<uptime> gap_us=<last gap> maxgap_us=<longest gap> sum=<region checksum>
 *         loc=<local timer interrupts so far, all CPUs>
 * The boot id must stay the same across live upgrades (the guest never rebooted), seq must
 * count up by one line after line, and sum is recomputed over a RAM region filled once at
 * start (guest RAM survived unchanged). A child process echoes TCP on port 7 when the
 * network is up, for the connection-survives-upgrade test.
 */
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PERIOD_MS 20 /* default; the second argument overrides it */
#define SUM_EVERY 25

static uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static uint64_t checksum(const uint64_t *p, size_t words)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < words; i++)
        h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

/* Local timer interrupts taken so far, summed over the CPUs (the LOC line of /proc/interrupts). */
static unsigned long long timer_irqs(void)
{
    char line[4096];
    unsigned long long total = 0;
    FILE *f = fopen("/proc/interrupts", "r");
    if (!f)
        return 0;
    while (fgets(line, sizeof line, f)) {
        char *p = line;
        while (*p == ' ')
            p++;
        if (strncmp(p, "LOC:", 4) != 0)
            continue;
        p += 4;
        for (;;) {
            char *end;
            unsigned long long n = strtoull(p, &end, 10);
            if (end == p)
                break;
            total += n;
            p = end;
        }
        break;
    }
    fclose(f);
    return total;
}

/* Whether /proc/cpuinfo lists `flag` for the first CPU. */
static int cpu_flag(const char *flag)
{
    char line[8192];
    int found = 0;
    size_t n = strlen(flag);
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f)
        return 0;
    while (!found && fgets(line, sizeof line, f)) {
        if (strncmp(line, "flags", 5) != 0)
            continue;
        for (char *p = strstr(line, flag); p; p = strstr(p + 1, flag))
            if (p[-1] == ' ' && (p[n] == ' ' || p[n] == '\n'))
                found = 1;
        break;
    }
    fclose(f);
    return found;
}

/* The kernel's current clocksource. */
static const char *clocksource(void)
{
    static char name[64] = "unknown";
    FILE *f = fopen("/sys/devices/system/clocksource/clocksource0/current_clocksource", "r");
    if (f) {
        if (fgets(name, sizeof name, f))
            name[strcspn(name, "\n")] = 0;
        fclose(f);
    }
    return name;
}

static void echo_server(void)
{
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(7), .sin_addr.s_addr = htonl(INADDR_ANY) };
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof a) < 0 || listen(ls, 8) < 0) {
        printf("ECHO cannot listen\n");
        _exit(1);
    }
    printf("ECHO listening on 7\n");
    fflush(stdout);
    for (;;) {
        int c = accept(ls, NULL, NULL);
        if (c < 0)
            continue;
        if (fork() == 0) {
            char buf[4096];
            ssize_t n;
            while ((n = read(c, buf, sizeof buf)) > 0)
                if (write(c, buf, (size_t)n) != n)
                    break;
            _exit(0);
        }
        close(c);
    }
}

int main(int argc, char **argv)
{
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 8;
    long period_ms = argc > 2 ? strtol(argv[2], NULL, 10) : PERIOD_MS;
    if (mib == 0)
        mib = 8;
    if (period_ms <= 0)
        period_ms = PERIOD_MS;
    char boot[64] = "unknown";
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
    if (f) {
        if (!fgets(boot, sizeof boot, f))
            strcpy(boot, "unknown");
        boot[strcspn(boot, "\n")] = 0;
        fclose(f);
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGCHLD, SIG_IGN);
    if (access("/run/net-up", F_OK) == 0 && fork() == 0)
        echo_server();

    size_t words = mib * 1024 * 1024 / sizeof(uint64_t);
    uint64_t *region = malloc(words * sizeof(uint64_t));
    if (!region) {
        printf("PROBE cannot allocate %zu MiB\n", mib);
        return 1;
    }
    uint64_t x = now_us() | 1;
    for (size_t i = 0; i < words; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        region[i] = x;
    }
    uint64_t sum = checksum(region, words);
    printf("PROBE start boot=%s region_mib=%zu sum=%016llx cpus=%ld clocksource=%s tsc_deadline=%d\n", boot, mib,
           (unsigned long long)sum, sysconf(_SC_NPROCESSORS_ONLN), clocksource(), cpu_flag("tsc_deadline_timer"));

    uint64_t last = now_us(), maxgap = 0;
    for (uint64_t seq = 1;; seq++) {
        struct timespec d = { period_ms / 1000, (period_ms % 1000) * 1000000L };
        nanosleep(&d, NULL);
        uint64_t t = now_us(), gap = t - last;
        last = t;
        if (gap > maxgap)
            maxgap = gap;
        if (seq % SUM_EVERY == 0)
            sum = checksum(region, words);
        printf("PROBE boot=%s seq=%llu up_ms=%llu gap_us=%llu maxgap_us=%llu sum=%016llx loc=%llu\n", boot,
               (unsigned long long)seq, (unsigned long long)(t / 1000), (unsigned long long)gap,
               (unsigned long long)maxgap, (unsigned long long)sum, timer_irqs());
    }
}
