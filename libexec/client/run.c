/* One request/one reply (call) and the long start/run conversation (run_session), as
 * cbatch/clients/client.py: send the request with our fds, forward signals to the container once it has
 * started, reattach after a daemon restart, exit with the status the daemon reports. */
#include "cbc.h"
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define CONNECT_TIMEOUT 10.0
#define REPLY_TIMEOUT 120.0
#define START_ATTEMPTS 3
#define REATTACH_EVERY 0.5
/* A start waits this long for a cbatchd that is not listening (a restart after the prologue's register),
 * as client.START_UNREACHABLE_FOR. */
#define START_UNREACHABLE_FOR 20.0
#define REATTACH_FOR 900.0
#define MAX_PENDING 256

static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2, SIGCONT, SIGWINCH};
#define NFWD ((int)(sizeof forwarded / sizeof forwarded[0]))
static int sig_w = -1, sig_r = -1;
static struct sigaction old_action[NFWD];
static volatile sig_atomic_t got_term;

static void on_signal(int sig)
{
    int e = errno;
    unsigned char c = (unsigned char)sig;
    if (sig == SIGTERM)
        got_term = 1;
    (void)!write(sig_w, &c, 1);          /* full pipe: the signal is lost, as with Python's wakeup fd */
    errno = e;
}

static void signals_on(void)
{
    int p[2];
    if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0)
        fail(EXIT_CBATCH, "client", "cannot make a pipe", strerror(errno), NULL);
    sig_r = p[0];
    sig_w = p[1];
    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    for (int i = 0; i < NFWD; i++)
        sigaction(forwarded[i], &sa, &old_action[i]);
}

/* The dispositions we found (an ignored SIGHUP stays ignored for a job we exec), as client.py does. */
static void signals_off(void)
{
    for (int i = 0; i < NFWD; i++)
        sigaction(forwarded[i], &old_action[i], NULL);
    close(sig_r);
    close(sig_w);
}

struct sess {
    struct session_opts *o;
    int sock, started;
    struct buf id, job_id;          /* JSON values (text) of the started container, for attach */
    int pending[MAX_PENDING], npending;
};

static void drain(struct sess *s)
{
    unsigned char c[64];
    ssize_t n;
    while ((n = read(sig_r, c, sizeof c)) > 0)
        for (ssize_t i = 0; i < n; i++)
            if (s->npending < MAX_PENDING)
                s->pending[s->npending++] = c[i];
}

/* Send queued signals once there is a container. -1: the daemon is gone. */
static int forward(struct sess *s)
{
    drain(s);
    if (!s->started || s->sock < 0)
        return 0;
    while (s->npending) {
        struct buf b = {0};
        jw_request(&b, "signal");
        jw_key(&b, "signum");
        jw_int(&b, s->pending[0]);
        buf_addc(&b, '}');
        int r = frame_send(s->sock, &b, NULL, 0);
        buf_free(&b);
        if (r < 0)
            return -1;
        memmove(s->pending, s->pending + 1, (size_t)--s->npending * sizeof(int));
    }
    return 0;
}

/* The next frame: 1 frame in out, 0 closed/lost (daemon gone), -1 protocol error (line in err). */
static int next_message(struct sess *s, struct buf *out, struct buf *err)
{
    for (;;) {
        if (forward(s) < 0)
            return 0;
        struct pollfd p[2] = {{s->sock, POLLIN, 0}, {sig_r, POLLIN, 0}};
        int r = poll(p, 2, -1);
        if (r < 0 && errno != EINTR)
            return 0;
        if (r > 0 && p[0].revents) {
            int k = frame_recv(s->sock, out, err);
            return k;
        }
    }
}

static int reply_ok(struct jval m) { return jr_get(m, "ok").t != J_FALSE; }

int call(const char *socket, struct buf *request, double timeout, struct buf *reply, struct buf *err,
         struct buf *problem)
{
    int sock = cb_connect(socket, CONNECT_TIMEOUT);
    err->n = 0;
    if (problem) problem->n = 0;
    if (sock < 0) {
        err_line(err, "daemon", "not reachable", socket, "is cbatchd running? cbatch check --node");
        if (problem) buf_adds(problem, "not reachable");
        return -1;
    }
    int rc = -1;
    if (frame_send(sock, request, NULL, 0) < 0) {
        err_line(err, "daemon", "connection lost while sending", strerror(errno), NULL);
    } else {
        struct pollfd p = {sock, POLLIN, 0};
        double deadline = mono() + timeout;
        int r = 0;
        while ((r = poll(&p, 1, ms_until(deadline))) <= 0 && mono() < deadline)
            ;
        if (r <= 0) {
            err_line(err, "protocol", "timed out", "partial or missing message",
                     "a frame must arrive within its time limit");
        } else {
            int k = frame_recv(sock, reply, err);
            if (k == 0) {
                err_line(err, "daemon", "closed the connection without a reply", NULL, NULL);
                if (problem) buf_adds(problem, "closed the connection without a reply");
            } else if (k == 1) {
                struct jval m = jr_root(reply->p, reply->n);
                if (reply_ok(m))
                    rc = 0;
                else
                    reply_error(m, err, problem);
            }
        }
    }
    close(sock);
    return rc;
}

static void remember(struct sess *s, struct jval m)
{
    struct jval v = jr_get(m, "id");
    if (v.t != J_NONE) { s->id.n = 0; buf_add(&s->id, v.p, v.n); }
    v = jr_get(m, "job_id");
    if (v.t != J_NONE) { s->job_id.n = 0; buf_add(&s->job_id, v.p, v.n); }
}

enum { ATTACHED, REFUSED, UNREACHABLE };

/* After losing the daemon: reconnect and ask for our container (by id once started, else as ourselves). */
static int reattach(struct sess *s)
{
    if (s->sock >= 0)
        close(s->sock);
    s->sock = -1;
    double until = mono() + REATTACH_FOR;
    struct buf req = {0}, reply = {0}, err = {0}, prob = {0};
    jw_request(&req, "attach");
    if (s->started) {
        jw_key(&req, "job_id");
        if (s->job_id.n) buf_add(&req, s->job_id.p, s->job_id.n); else buf_adds(&req, "null");
        jw_key(&req, "id");
        if (s->id.n) buf_add(&req, s->id.p, s->id.n); else buf_adds(&req, "null");
    }
    buf_addc(&req, '}');
    int outcome = UNREACHABLE;
    while (mono() < until) {
        drain(s);
        int sock = cb_connect(s->o->socket, REATTACH_EVERY);
        if (sock < 0) { sleep_s(REATTACH_EVERY); continue; }
        struct pollfd p = {sock, POLLIN, 0};
        if (frame_send(sock, &req, s->o->fds, 3) < 0 || poll(&p, 1, (int)(REPLY_TIMEOUT * 1000)) <= 0
            || frame_recv(sock, &reply, &err) != 1) {
            close(sock);
            sleep_s(REATTACH_EVERY);
            continue;
        }
        struct jval m = jr_root(reply.p, reply.n);
        if (!reply_ok(m)) {
            close(sock);
            reply_error(m, &err, &prob);
            if (strcmp(buf_str(&prob), "not ready") == 0) { sleep_s(REATTACH_EVERY); continue; }
            outcome = REFUSED;
            break;
        }
        s->sock = sock;
        remember(s, m);
        outcome = ATTACHED;
        break;
    }
    buf_free(&req); buf_free(&reply); buf_free(&err); buf_free(&prob);
    return outcome;
}

static int wait_for_daemon(const char *socket, double seconds)
{
    double until = mono() + seconds;
    struct buf req = {0}, reply = {0}, err = {0};
    jw_request(&req, "ping");
    buf_addc(&req, '}');
    int ok = 0;
    while (mono() < until && !ok) {
        ok = call(socket, &req, REATTACH_EVERY * 4, &reply, &err, NULL) == 0;
        if (!ok) sleep_s(REATTACH_EVERY);
    }
    buf_free(&req); buf_free(&reply); buf_free(&err);
    return ok;
}

static int die_line(struct buf *line, int status)
{
    buf_addc(line, '\n');
    (void)write_all(2, line->p, line->n);
    return status;
}

int run_session(struct session_opts *o)
{
    struct sess s = {.o = o, .sock = -1};
    struct buf msg = {0}, err = {0};
    const char *op = "start";
    struct jval opv = jr_get(jr_root(o->request->p, o->request->n), "op");
    struct buf opname = {0};
    if (jr_str(opv, &opname)) op = buf_str(&opname);
    if (o->request->n > MAX_MESSAGE) {          /* e.g. a huge environment: say so, as protocol.encode */
        char v[64], h[64];
        snprintf(v, sizeof v, "%zu bytes", o->request->n);
        snprintf(h, sizeof h, "at most %u bytes", MAX_MESSAGE);
        err_line(&err, "protocol", "message too large", v, h);
        return die_line(&err, EXIT_CBATCH);
    }
    signals_on();
    int have_first = 0;
    for (int attempt = 0; attempt < START_ATTEMPTS && !have_first; attempt++) {
        s.sock = cb_connect(o->socket, CONNECT_TIMEOUT);
        if (s.sock < 0 && wait_for_daemon(o->socket, START_UNREACHABLE_FOR))
            s.sock = cb_connect(o->socket, CONNECT_TIMEOUT);
        if (s.sock < 0) {
            err_line(&err, "daemon", "not reachable", o->socket, "is cbatchd running? cbatch check --node");
            return die_line(&err, EXIT_CBATCH);
        }
        if (frame_send(s.sock, o->request, o->fds, 3) < 0) {
            err_line(&err, "daemon", "connection lost while sending", strerror(errno), NULL);
            return die_line(&err, EXIT_CBATCH);
        }
        int k = next_message(&s, &msg, &err);
        if (k < 0)
            return die_line(&err, EXIT_CBATCH);
        if (k == 1) { have_first = 1; break; }
        /* the daemon went away mid-start: its successor adopted any container that ran for us */
        int outcome = wait_for_daemon(o->socket, REATTACH_FOR) ? reattach(&s) : UNREACHABLE;
        if (outcome == ATTACHED) {
            s.started = 1;
            have_first = 2;
            break;
        }
        if (outcome == UNREACHABLE || attempt + 1 == START_ATTEMPTS) {
            err_line(&err, "daemon", "closed the connection without a reply", op,
                     outcome == REFUSED ? NULL : "cbatchd did not come back within 900 s");
            return die_line(&err, EXIT_CBATCH);
        }
    }
    if (have_first == 1) {
        struct jval m = jr_root(msg.p, msg.n);
        struct buf t = {0};
        if (!reply_ok(m))
            return die_line(&err, reply_error(m, &err, NULL));
        if (jr_str(jr_get(m, "mode"), &t) && strcmp(buf_str(&t), "native") == 0) {
            drain(&s);
            signals_off();
            close(s.sock);
            if (!o->on_native) {
                err_line(&err, "daemon", "unexpected reply", "native", "this command needs a container");
                return die_line(&err, EXIT_CBATCH);
            }
            o->on_native(o->ctx, s.pending, s.npending);
            err_line(&err, "daemon", "native start returned", op, NULL);
            return die_line(&err, EXIT_CBATCH);
        }
        t.n = 0;
        if (!jr_str(jr_get(m, "event"), &t) || strcmp(buf_str(&t), "started") != 0) {
            struct buf v = {0};
            buf_add(&v, msg.p, msg.n > 200 ? 200 : msg.n);
            err_line(&err, "daemon", "unexpected reply", buf_str(&v), NULL);
            return die_line(&err, EXIT_CBATCH);
        }
        remember(&s, m);
        s.started = 1;
    }
    struct jval m;
    for (;;) {
        int k = next_message(&s, &msg, &err);
        if (k != 1) {
            int outcome = reattach(&s);
            if (outcome == REFUSED) {
                struct buf id = {0};
                if (!jr_str((struct jval){J_STR, s.id.p, s.id.n}, &id) || id.n > 12)
                    id.n = id.n > 12 ? 12 : 0;
                err.n = 0;
                err_line(&err, "daemon", "lost the job's container", buf_str(&id),
                         "cbatchd came back and cannot give it back; it removes such containers");
                return die_line(&err, EXIT_CBATCH);
            }
            if (outcome == UNREACHABLE) {
                err.n = 0;
                err_line(&err, "daemon", "not reachable", o->socket,
                         "cbatchd did not come back within 900 s; the job's container may still run until "
                         "cbatchd returns and removes it");
                return die_line(&err, EXIT_CBATCH);
            }
            continue;
        }
        m = jr_root(msg.p, msg.n);
        if (!reply_ok(m)) {
            /* an error reply on the open session is the daemon's last word (e.g. attach refused) */
            return die_line(&err, reply_error(m, &err, NULL));
        }
        struct buf t = {0};
        int is_exit = jr_str(jr_get(m, "event"), &t) && strcmp(buf_str(&t), "exit") == 0;
        buf_free(&t);
        if (is_exit)
            break;
    }
    long long status;
    if (!jr_int(jr_get(m, "status"), &status) || status < 0 || status > 255)
        status = EXIT_CBATCH;
    struct buf text = {0};
    if (jr_str(jr_get(m, "message"), &text) && text.n) {
        while (text.n && text.p[text.n - 1] == '\n')
            text.n--;
        buf_addc(&text, '\n');
        (void)write_all(2, text.p, text.n);
    }
    /* the daemon closes after removing the container: a short wait keeps "gone" true when we exit */
    struct pollfd p = {s.sock, POLLIN, 0};
    double until = mono() + 1.0;
    char junk[4096];
    while (mono() < until && poll(&p, 1, ms_until(until)) > 0)
        if (recv(s.sock, junk, sizeof junk, 0) <= 0)
            break;
    close(s.sock);
    int term = got_term;
    signals_off();
    if (term && o->reraise_term) {
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGTERM);
        sigprocmask(SIG_UNBLOCK, &set, NULL);
        kill(getpid(), SIGTERM);
        sleep_s(1);
        return 128 + SIGTERM;
    }
    return (int)status;
}
