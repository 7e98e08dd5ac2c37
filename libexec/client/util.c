/* Small helpers: growing buffers, the one-line error format of cbatch/core/errors.py, time. */
#include "cbc.h"
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

void buf_add(struct buf *b, const void *data, size_t n)
{
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            /* under a tiny RLIMIT_DATA: say so on one line, never crash */
            static const char msg[] = "cbatch: client: out of memory: buffer (RLIMIT_DATA too small?)\n";
            (void)!write(2, msg, sizeof msg - 1);
            _exit(EXIT_CBATCH);
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, data, n);
    b->n += n;
    b->p[b->n] = 0;
}

void buf_adds(struct buf *b, const char *s) { buf_add(b, s, strlen(s)); }
void buf_addc(struct buf *b, char c) { buf_add(b, &c, 1); }
void buf_free(struct buf *b) { free(b->p); b->p = NULL; b->n = b->cap = 0; }
const char *buf_str(struct buf *b) { if (!b->p) buf_add(b, "", 0); return b->p; }

int write_all(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n) {
        ssize_t w = write(fd, c, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        c += w;
        n -= (size_t)w;
    }
    return 0;
}

void say(const char *fmt, ...)
{
    char line[2048];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof line - 2)
        n = sizeof line - 2;
    line[n++] = '\n';
    (void)write_all(2, line, (size_t)n);
}

/* A hostile value must not forge further lines: escape controls, cap the length (as errors._clean). */
void clean_add(struct buf *out, const char *s, size_t n)
{
    size_t start = out->n;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[8];
        if (c == '\n') buf_adds(out, "\\n");
        else if (c == '\r') buf_adds(out, "\\r");
        else if (c == '\t') buf_adds(out, "\\t");
        else if (c < 0x20 || c == 0x7f) { snprintf(esc, sizeof esc, "\\x%02x", c); buf_adds(out, esc); }
        else buf_addc(out, (char)c);
        if (out->n - start > 400) {
            out->n = start + 397;
            buf_adds(out, "...");
            return;
        }
    }
}

void err_line(struct buf *out, const char *subject, const char *problem, const char *value, const char *hint)
{
    buf_adds(out, "cbatch: ");
    clean_add(out, subject, strlen(subject));
    buf_adds(out, ": ");
    clean_add(out, problem, strlen(problem));
    if (value) {
        buf_adds(out, ": ");
        clean_add(out, value, strlen(value));
    }
    if (hint && *hint) {
        buf_adds(out, " (");
        clean_add(out, hint, strlen(hint));
        buf_adds(out, ")");
    }
}

void fail(int status, const char *subject, const char *problem, const char *value, const char *hint)
{
    struct buf b = {0};
    err_line(&b, subject, problem, value, hint);
    buf_addc(&b, '\n');
    (void)write_all(2, b.p, b.n);
    _exit(status);
}

/* poll's timeout for a deadline: never negative (that would wait forever) */
int ms_until(double deadline)
{
    double left = deadline - mono();
    return left <= 0 ? 0 : (int)(left * 1000) + 1;
}

static struct sigaction pipe_action;

void pipe_ignore(void)
{
    struct sigaction sa = {.sa_handler = SIG_IGN};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGPIPE, &sa, &pipe_action);
}

void pipe_restore(void) { sigaction(SIGPIPE, &pipe_action, NULL); }

double mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void sleep_s(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}
