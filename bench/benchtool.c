/*
 * benchtool: the benchmarks' static probe, present at the same path on the host and in the bench image
 * (cbatch-bench/busybox:1), so a job script runs the very same binary natively and in a container.
 *
 *   benchtool stamp              print "stamp <CLOCK_REALTIME seconds>.<nanoseconds>" on stdout
 *   benchtool spin N             CPU-bound kernel: N million rounds of an integer hash; prints
 *                                "spin <wall seconds> <cpu seconds> <result>" on stdout
 *   benchtool write PATH MIB     write MIB MiB of 1 MiB blocks to PATH (created/truncated), fdatasync, unlink;
 *                                prints "write <seconds>" on stdout
 *   benchtool out MIB            write MIB MiB of 1 MiB blocks to fd 1 (the job's stdout); prints
 *                                "out <seconds>" on stderr
 *
 * As an interpreter (a job starter file whose first line is "#!<benchtool> MODE"), the kernel calls
 * benchtool MODE <starter file> <starter args...>; MODE is
 *   exec            exec the first starter argument (the shell) with the rest: pbs_mom without a $job_starter
 *   exec:PATH       exec PATH with the starter arguments (PATH replaces the starter file)
 * and "stamp+" in front of either prints the stamp line on stdout (the job's .OU) right before the exec, so
 * the stamp marks the moment the job starter was exec'd.
 *
 * Static, no allocation on the stamp path: its own cost is a few microseconds.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024 * 1024)

static void die(const char *what)
{
    fprintf(stderr, "benchtool: %s: %s\n", what, strerror(errno));
    exit(125);
}

static double now(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void stamp(void)
{
    struct timespec ts;
    char buf[64];
    clock_gettime(CLOCK_REALTIME, &ts);
    int n = snprintf(buf, sizeof buf, "stamp %lld.%09ld\n", (long long)ts.tv_sec, ts.tv_nsec);
    if (write(1, buf, (size_t)n) != n)
        die("write stamp");
}

static int spin(long millions)
{
    double w0 = now(CLOCK_MONOTONIC), c0 = now(CLOCK_PROCESS_CPUTIME_ID);
    uint64_t x = 0x9e3779b97f4a7c15ULL;
    for (long i = 0; i < millions * 1000000L; i++) { /* xorshift-multiply: no memory, no syscalls */
        x ^= x >> 33;
        x *= 0xff51afd7ed558ccdULL;
        x ^= (uint64_t)i;
    }
    printf("spin %.6f %.6f %llu\n", now(CLOCK_MONOTONIC) - w0, now(CLOCK_PROCESS_CPUTIME_ID) - c0,
           (unsigned long long)x);
    return 0;
}

static void write_all(int fd, const char *buf, long mib)
{
    for (long i = 0; i < mib; i++) {
        size_t done = 0;
        while (done < MIB) {
            ssize_t n = write(fd, buf + done, MIB - done);
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0)
                die("write");
            done += (size_t)n;
        }
    }
}

static char *block(void)
{
    char *buf = malloc(MIB);
    if (!buf)
        die("malloc");
    memset(buf, 'x', MIB);
    return buf;
}

static int write_file(const char *path, long mib)
{
    char *buf = block();
    double t0 = now(CLOCK_MONOTONIC);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        die(path);
    write_all(fd, buf, mib);
    if (fdatasync(fd) < 0)
        die("fdatasync");
    close(fd);
    double t = now(CLOCK_MONOTONIC) - t0;
    unlink(path);
    printf("write %.6f\n", t);
    return 0;
}

static int write_out(long mib)
{
    char *buf = block();
    double t0 = now(CLOCK_MONOTONIC);
    write_all(1, buf, mib);
    fprintf(stderr, "out %.6f\n", now(CLOCK_MONOTONIC) - t0);
    return 0;
}

static int interpreter(int argc, char **argv)
{
    const char *mode = argv[1];
    if (strncmp(mode, "stamp+", 6) == 0) {
        stamp();
        mode += 6;
    }
    if (strcmp(mode, "exec") == 0) {
        if (argc < 4) {
            fputs("benchtool: exec: no command\n", stderr);
            return 125;
        }
        execv(argv[3], argv + 3);
        die(argv[3]);
    }
    if (strncmp(mode, "exec:", 5) == 0) {
        argv[2] = (char *)mode + 5;     /* the real starter takes the starter file's place */
        execv(argv[2], argv + 2);
        die(argv[2]);
    }
    fprintf(stderr, "benchtool: unknown mode %s\n", mode);
    return 125;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "stamp") == 0)
        return stamp(), 0;
    if (argc == 3 && strcmp(argv[1], "spin") == 0)
        return spin(atol(argv[2]));
    if (argc == 4 && strcmp(argv[1], "write") == 0)
        return write_file(argv[2], atol(argv[3]));
    if (argc == 3 && strcmp(argv[1], "out") == 0)
        return write_out(atol(argv[2]));
    if (argc >= 3 && (strncmp(argv[1], "exec", 4) == 0 || strncmp(argv[1], "stamp+", 6) == 0))
        return interpreter(argc, argv);
    fputs("usage: benchtool stamp | spin N | write PATH MIB | out MIB | (as #! interpreter) [stamp+]exec[:PATH]\n",
          stderr);
    return 125;
}
