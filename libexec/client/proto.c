/* Frames on cbatchd's socket: 4-byte big-endian length + UTF-8 JSON object, descriptors as SCM_RIGHTS on
 * the first byte (cbatch/protocol.py). Same limits as the daemon: MAX_MESSAGE bytes, MAX_FDS fds, and a
 * begun frame must complete within FRAME_TIMEOUT seconds. */
#include "cbc.h"
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

/* Connect to the daemon; a full listen backlog (EAGAIN) is retried until timeout. -1 with errno. */
int cb_connect(const char *path, double timeout)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof sa.sun_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(sa.sun_path, path);
    double deadline = mono() + timeout, pause = 0.005;
    for (;;) {
        int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (s < 0)
            return -1;
        /* a full listen backlog: connect waits up to SO_SNDTIMEO, then EAGAIN (retried below) */
        double left = deadline - mono();
        if (left < 0.001)
            left = 0.001;               /* {0, 0} would mean: wait forever */
        struct timeval tv = {(time_t)left, (suseconds_t)((left - (double)(time_t)left) * 1e6)};
        setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        if (connect(s, (struct sockaddr *)&sa, sizeof sa) == 0) {
            struct timeval none = {0, 0};
            setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &none, sizeof none);
            return s;
        }
        int e = errno;
        close(s);
        if (e == EINTR)
            continue;
        if (e != EAGAIN || mono() + pause >= deadline) {
            errno = e;
            return -1;
        }
        sleep_s(pause);
        pause = pause * 2 > 0.1 ? 0.1 : pause * 2;
    }
}

int frame_send(int sock, const struct buf *body, const int *fds, int nfds)
{
    unsigned char hdr[4] = {(unsigned char)(body->n >> 24), (unsigned char)(body->n >> 16),
                            (unsigned char)(body->n >> 8), (unsigned char)body->n};
    if (body->n > MAX_MESSAGE || nfds > MAX_FDS) {
        errno = EMSGSIZE;
        return -1;
    }
    union { char b[CMSG_SPACE(MAX_FDS * sizeof(int))]; struct cmsghdr align; } cm;
    struct iovec iov[2] = {{hdr, 4}, {body->p, body->n}};
    struct msghdr mh = {.msg_iov = iov, .msg_iovlen = 2};
    if (nfds > 0) {
        memset(&cm, 0, sizeof cm);
        mh.msg_control = cm.b;
        mh.msg_controllen = CMSG_SPACE((size_t)nfds * sizeof(int));
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
        memcpy(CMSG_DATA(c), fds, (size_t)nfds * sizeof(int));
    }
    ssize_t w;
    do
        w = sendmsg(sock, &mh, MSG_NOSIGNAL);
    while (w < 0 && errno == EINTR);
    if (w < 0)
        return -1;
    size_t sent = (size_t)w, total = 4 + body->n;
    while (sent < total) {        /* the rest, without descriptors */
        const char *p = sent < 4 ? (const char *)hdr + sent : body->p + (sent - 4);
        size_t n = sent < 4 ? 4 - sent : total - sent;
        do
            w = send(sock, p, n, MSG_NOSIGNAL);
        while (w < 0 && errno == EINTR);
        if (w <= 0)
            return -1;
        sent += (size_t)w;
    }
    return 0;
}

static int wait_in(int sock, double deadline)
{
    for (;;) {
        double left = deadline - mono();
        if (left <= 0)
            return 0;
        struct pollfd p = {sock, POLLIN, 0};
        int r = poll(&p, 1, (int)(left * 1000) + 1);
        if (r > 0)
            return 1;
        if (r < 0 && errno != EINTR)
            return 0;
    }
}

static void close_fds(struct msghdr *mh)
{
    for (struct cmsghdr *c = CMSG_FIRSTHDR(mh); c; c = CMSG_NXTHDR(mh, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            int fds[MAX_FDS + 8];
            if (n > (int)(sizeof fds / sizeof fds[0]))
                n = (int)(sizeof fds / sizeof fds[0]);
            memcpy(fds, CMSG_DATA(c), (size_t)n * sizeof(int));
            for (int i = 0; i < n; i++)
                close(fds[i]);
        }
}

static int proto_err(struct buf *err, const char *problem, const char *value)
{
    err->n = 0;
    err_line(err, "protocol", problem, value, NULL);
    return -1;
}

/* One frame, the caller having seen the socket readable. 1: frame (body in out, validated JSON object);
 * 0: clean close before a frame; -1: error (one line in err). The daemon never sends descriptors: any
 * that arrive are closed at once. */
int frame_recv(int sock, struct buf *out, struct buf *err)
{
    unsigned char hdr[4];
    size_t got = 0;
    double deadline = 0;
    char val[64];
    out->n = 0;
    while (got < 4) {
        if (got && !wait_in(sock, deadline))
            return proto_err(err, "timed out", "partial or missing message");
        union { char b[CMSG_SPACE((MAX_FDS + 8) * sizeof(int))]; struct cmsghdr align; } cm;
        struct iovec iov = {hdr + got, 4 - got};
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.b, .msg_controllen = sizeof cm};
        ssize_t r = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno == ECONNRESET && !got)
            return 0;
        if (r < 0)
            return proto_err(err, "connection lost", strerror(errno));
        close_fds(&mh);
        if (r == 0) {
            if (!got)
                return 0;
            snprintf(val, sizeof val, "%zu header bytes", got);
            return proto_err(err, "truncated message", val);
        }
        if (!got)
            deadline = mono() + FRAME_TIMEOUT;
        got += (size_t)r;
    }
    size_t size = (size_t)hdr[0] << 24 | (size_t)hdr[1] << 16 | (size_t)hdr[2] << 8 | hdr[3];
    if (size > MAX_MESSAGE) {
        snprintf(val, sizeof val, "%zu bytes", size);
        return proto_err(err, "message too large", val);
    }
    char chunk[4096];
    while (out->n < size) {
        if (!wait_in(sock, deadline))
            return proto_err(err, "timed out", "partial or missing message");
        size_t want = size - out->n < sizeof chunk ? size - out->n : sizeof chunk;
        ssize_t r = recv(sock, chunk, want, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            snprintf(val, sizeof val, "%zu of %zu bytes", out->n, size);
            return proto_err(err, "truncated message", val);
        }
        buf_add(out, chunk, (size_t)r);
    }
    buf_str(out);
    if (!jr_valid(out->p, out->n))
        return proto_err(err, "malformed message", "not a UTF-8 JSON object");
    return 1;
}

/* {"ok": false, "error": {...}} as errors.from_wire + .message would print it. */
int reply_error(struct jval msg, struct buf *line, struct buf *problem)
{
    struct jval e = jr_get(msg, "error");
    struct buf subject = {0}, prob = {0}, value = {0}, hint = {0};
    long long code = EXIT_CBATCH, c;
    int has_value = 0;
    if (e.t == J_OBJ) {
        struct jval v = jr_get(e, "subject");
        if (v.t != J_NONE && !jr_str(v, &subject)) buf_adds(&subject, "?");
        v = jr_get(e, "problem");
        if (v.t != J_NONE && !jr_str(v, &prob)) buf_adds(&prob, "?");
        v = jr_get(e, "value");
        if (v.t == J_STR) has_value = jr_str(v, &value);
        else if (v.t != J_NONE && v.t != J_NULL) { buf_add(&value, v.p, v.n); has_value = 1; }
        v = jr_get(e, "hint");
        if (v.t == J_STR) jr_str(v, &hint);
        if (jr_int(jr_get(e, "exit_code"), &c) && c > 0 && c < 256) code = c;
    }
    if (!subject.n && (e.t != J_OBJ || jr_get(e, "subject").t == J_NONE)) buf_adds(&subject, "daemon");
    if (!prob.n && (e.t != J_OBJ || jr_get(e, "problem").t == J_NONE)) buf_adds(&prob, "failed");
    line->n = 0;
    err_line(line, buf_str(&subject), buf_str(&prob), has_value ? buf_str(&value) : NULL,
             hint.n ? buf_str(&hint) : NULL);
    if (problem) {
        problem->n = 0;
        buf_adds(problem, buf_str(&prob));
    }
    buf_free(&subject); buf_free(&prob); buf_free(&value); buf_free(&hint);
    return (int)code;
}
