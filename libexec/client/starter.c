/* The TORQUE $job_starter (cbatch/clients/starter.py): pbs_mom runs `<starter> <shell>` with the job's
 * one stdin line; interactive jobs and TM tasks come through here too. We send what we saw to cbatchd and
 * either exec the job natively (the daemon said "native") or wait for its container's exit status. */
#include "cbc.h"
#include <errno.h>
#include <grp.h>
#include <limits.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_LINE (60 * 1024)   /* the native path writes the line into a pipe before exec: it must fit */

static const char *S = "job starter";

struct native { char **argv; const char *line; size_t line_n; int login; };

static void die_like_term(const int *pending, int n)
{
    for (int i = 0; i < n; i++)
        if (pending[i] == SIGTERM) {     /* qdel arrived while we were asking the daemon */
            signal(SIGTERM, SIG_DFL);
            kill(getpid(), SIGTERM);
        }
}

static void exec_failed(const char *what, const char *prog)
{
    int e = errno;
    char v[PATH_MAX + 128];
    snprintf(v, sizeof v, "%s: %s", prog, strerror(e));
    fail(e == ENOENT ? EXIT_NOT_FOUND : EXIT_CANNOT_INVOKE, S, what, v, NULL);
}

static void exec_native(void *ctx, const int *pending, int n)
{
    struct native *nt = ctx;
    int p[2];
    if (pipe(p) < 0 || write_all(p[1], nt->line, nt->line_n) < 0)
        fail(EXIT_CBATCH, S, "cannot pass the line to the shell", strerror(errno), NULL);
    close(p[1]);
    dup2(p[0], 0);
    close(p[0]);
    die_like_term(pending, n);
    char *args[] = {nt->argv[1], NULL};
    pipe_restore();
    execv(nt->argv[1], args);
    exec_failed("cannot run the shell", nt->argv[1]);
}

static void exec_argv(void *ctx, const int *pending, int n)
{
    struct native *nt = ctx;
    die_like_term(pending, n);
    char **argv = nt->argv + 1;
    const char *prog = argv[0];
    char arg0[PATH_MAX + 2];
    if (nt->login) {   /* pbs_mom runs an interactive shell as a login shell ("-bash") */
        const char *base = strrchr(prog, '/');
        snprintf(arg0, sizeof arg0, "-%s", base ? base + 1 : prog);
        argv[0] = arg0;
    }
    pipe_restore();
    if (strchr(prog, '/'))
        execv(prog, argv);
    else
        execvp(prog, argv);          /* pbs_mom's TM spawn uses execvp */
    exec_failed("cannot run", prog);
}

static char *read_line(size_t *len)
{
    struct buf b = {0};
    char chunk[4096];
    for (;;) {
        if (b.n && memchr(b.p, '\n', b.n))
            break;
        ssize_t r = read(0, chunk, sizeof chunk);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        buf_add(&b, chunk, (size_t)r);
        if (b.n > MAX_LINE) {
            char v[32];
            snprintf(v, sizeof v, "%zu bytes", b.n);
            fail(EXIT_CBATCH, S, "stdin line too long", v, "at most 61440");
        }
    }
    char *nl = b.n ? memchr(b.p, '\n', b.n) : NULL;
    *len = nl ? (size_t)(nl - b.p) + 1 : b.n;
    buf_str(&b);
    return b.p;
}

/* $job_starter_run_privileged: become the owner of the job script (never root). */
static void drop_privileges(const char *line, size_t n)
{
    char script[PATH_MAX];
    size_t i = 0, j = 0;
    while (i < n && (line[i] == ' ' || line[i] == '\t' || line[i] == '\n')) i++;
    while (i < n && j + 1 < sizeof script && line[i] && line[i] != ' ' && line[i] != '\t' && line[i] != '\n')
        script[j++] = line[i++];
    script[j] = 0;
    struct stat st;
    if (stat(script, &st) < 0)
        fail(EXIT_CBATCH, S, "cannot find the job script", j ? script : "(empty)", NULL);
    if (st.st_uid == 0)
        fail(EXIT_CBATCH, S, "refusing to run a job as root", script, "the job script is owned by root");
    struct passwd *pw = getpwuid(st.st_uid);
    char v[32];
    snprintf(v, sizeof v, "%u", (unsigned)st.st_uid);
    if (!pw)
        fail(EXIT_CBATCH, S, "unknown owner of the job script", v, NULL);
    gid_t groups[256];
    int ng = 256;
    if (getgrouplist(pw->pw_name, pw->pw_gid, groups, &ng) < 0)
        ng = 256 < ng ? 256 : ng;
    uid_t r, e, s;
    gid_t gr, ge, gs;
    if (setgroups((size_t)ng, groups) < 0 || setgid(pw->pw_gid) < 0 || setuid(pw->pw_uid) < 0
        || getresuid(&r, &e, &s) < 0 || getresgid(&gr, &ge, &gs) < 0
        || r != pw->pw_uid || e != pw->pw_uid || s != pw->pw_uid
        || gr != pw->pw_gid || ge != pw->pw_gid || gs != pw->pw_gid)
        fail(EXIT_CBATCH, S, "could not drop privileges", pw->pw_name, NULL);
}

static const char *kind_of(int argc, char **argv)
{
    struct stat st;
    int ok = fstat(0, &st) == 0;
    const char *env = getenv("PBS_ENVIRONMENT");
    if (ok && isatty(0) && env && strcmp(env, "PBS_INTERACTIVE") == 0)
        return "interactive";
    if (argc == 2 && argv[1][0] == '/' && ok && S_ISFIFO(st.st_mode))
        return "batch";
    return "task";
}

static void add_cwd_env(struct buf *b, char **envp)
{
    char cwd[PATH_MAX];
    const char *c = getcwd(cwd, sizeof cwd);
    if (!c)
        c = getenv("PWD") ? getenv("PWD") : "/";
    jw_key(b, "cwd");
    jw_cstr(b, c);
    jw_key(b, "env");
    jw_env(b, envp);
    buf_addc(b, '}');
}

int starter_main(const char *socket, int argc, char **argv, char **envp)
{
    if (argc < 2)
        fail(EXIT_CBATCH, S, "expected the shell or the command to start", "(none)",
             "configure it as $job_starter in mom_priv/config");
    const char *kind = kind_of(argc, argv);
    struct native nt = {argv, "", 0, 0};
    struct buf req = {0};
    struct session_opts o = {.socket = socket, .request = &req, .fds = {0, 1, 2}, .reraise_term = 1, .ctx = &nt};
    jw_request(&req, "start");
    if (strcmp(kind, "batch") == 0) {
        nt.line = read_line(&nt.line_n);
        if (geteuid() == 0)
            drop_privileges(nt.line, nt.line_n);
        jw_key(&req, "argv");
        jw_strv(&req, argv, argc);
        jw_key(&req, "line");
        jw_str(&req, nt.line, nt.line_n);
        o.on_native = exec_native;
    } else {
        if (!argv[1][0])
            fail(EXIT_CBATCH, S, "empty command", "(empty)", NULL);
        if (strcmp(kind, "interactive") == 0 && argv[1][0] != '/')
            fail(EXIT_CBATCH, S, "the shell is not an absolute path", argv[1], NULL);
        if (geteuid() == 0)
            fail(EXIT_CBATCH, S, "refusing to start an interactive job or TM task as root", argv[1],
                 "$job_starter_run_privileged is not supported for them");
        jw_key(&req, "kind");
        jw_cstr(&req, kind);
        jw_key(&req, "argv");
        jw_strv(&req, argv, argc);
        jw_key(&req, "line");
        jw_cstr(&req, "");
        nt.login = strcmp(kind, "interactive") == 0 && argc == 2;
        o.on_native = exec_argv;
    }
    add_cwd_env(&req, envp);
    return run_session(&o);
}
