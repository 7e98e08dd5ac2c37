/* cbatch-client: `#!<libexec>/cbatch-client shim` files (role + socket lines) for pbs_mom's prologue,
 * epilogue and $job_starter, and `cbatch-client run [options] [--] CMD...` for `cbatch run`. */
#include "cbc.h"
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SHIM_MAX 4096

/* A broken shim must not abort (1) or requeue (other) the job: hooks exit 0, everything else 125. */
static int broken_status(const char *path)
{
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    return !strcmp(base, "prologue") || !strcmp(base, "epilogue") ? 0 : EXIT_CBATCH;
}

static void shim_fail(const char *path, const char *problem, const char *value)
{
    struct buf b = {0};
    err_line(&b, "shim", problem, value, "re-run cbatch install-hooks; cbatch check --node");
    buf_addc(&b, '\n');
    (void)write_all(2, b.p, b.n);
    _exit(broken_status(path));
}

/* Lines after the #! line: `role <prologue|epilogue|job_starter>` and `socket <path>`; # comments. */
static void read_shim(const char *path, char *role, size_t rn, char *sock, size_t sn)
{
    char text[SHIM_MAX + 1];
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0)
        shim_fail(path, "cannot read", strerror(errno));
    ssize_t n = read(fd, text, SHIM_MAX);
    close(fd);
    if (n < 0)
        shim_fail(path, "cannot read", strerror(errno));
    text[n] = 0;
    role[0] = sock[0] = 0;
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (line[0] == '#' || !line[0])
            continue;
        char *sp = strchr(line, ' ');
        if (!sp)
            shim_fail(path, "bad line", line);
        *sp = 0;
        char *dst = !strcmp(line, "role") ? role : !strcmp(line, "socket") ? sock : NULL;
        size_t cap = dst == role ? rn : sn;
        if (!dst)
            shim_fail(path, "unknown key", line);
        if (strlen(sp + 1) >= cap)
            shim_fail(path, "value too long", line);
        strcpy(dst, sp + 1);
    }
    if (!role[0])
        shim_fail(path, "no role line", path);
    if (!sock[0])
        strcpy(sock, DEFAULT_SOCKET);
}

/* --- `cbatch run` (cbatch/clients/runcmd.py): options go back as --opt=value words, the daemon parses */

static void run_native(void *ctx, const int *pending, int n)
{
    char **cmd = ctx;
    for (int i = 0; i < n; i++)
        if (pending[i] == SIGTERM || pending[i] == SIGINT || pending[i] == SIGHUP) {
            signal(pending[i], SIG_DFL);
            kill(getpid(), pending[i]);
        }
    pipe_restore();
    execvp(cmd[0], cmd);
    int e = errno;
    char v[1200];
    snprintf(v, sizeof v, "%.1000s: %s", cmd[0], strerror(e));
    fail(e == ENOENT ? EXIT_NOT_FOUND : EXIT_CANNOT_INVOKE, "cbatch run", "cannot run the command", v, NULL);
}

static void opt_word(struct buf *req, const char *prefix, const char *val)
{
    struct buf w = {0};
    buf_adds(&w, prefix);
    buf_adds(&w, val);
    if (req->p[req->n - 1] != '[')
        buf_addc(req, ',');
    jw_str(req, w.p, w.n);
    buf_free(&w);
}

int run_main(const char *sock, int argc, char **argv, char **envp)
{
    static const char *valued[] = {"image", "mount", "env", "workdir", "network", "socket"};
    const char *single[6] = {0};
    const char **many[3] = {NULL, calloc((size_t)argc, sizeof(char *)), calloc((size_t)argc, sizeof(char *))};
    int nmany[3] = {0, 0, 0};
    int readonly = 0, entrypoint = 0, i = 1;
    if (!many[1] || !many[2])
        fail(EXIT_CBATCH, "cbatch run", "out of memory", NULL, NULL);
    for (; i < argc && argv[i][0] == '-'; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--")) { i++; break; }
        if (!strcmp(a, "--readonly")) { readonly = 1; continue; }
        if (!strcmp(a, "--entrypoint")) { entrypoint = 1; continue; }
        int k = -1;
        const char *val = NULL;
        for (int j = 0; j < 6 && k < 0; j++) {
            size_t l = strlen(valued[j]);
            if (strncmp(a, "--", 2) || strncmp(a + 2, valued[j], l))
                continue;
            if (a[2 + l] == '=') { k = j; val = a + 3 + l; }
            else if (!a[2 + l]) { k = j; val = i + 1 < argc ? argv[++i] : NULL; }
        }
        if (k < 0 || !val)
            fail(2, "cbatch run", k < 0 ? "unknown option" : "option needs a value", a,
                 "usage: cbatch run [--image IMG] [options] [--] CMD [ARGS...]");
        if (k == 1 || k == 2)
            many[k][nmany[k]++] = val;
        else
            single[k] = val;
    }
    if (i >= argc)
        fail(EXIT_CBATCH, "cbatch run", "no command given", NULL,
             "usage: cbatch run [--image IMG] [options] [--] CMD [ARGS...]");
    if (single[5])
        sock = single[5];
    struct buf req = {0};
    jw_request(&req, "run");
    jw_key(&req, "argv");
    jw_strv(&req, argv + i, argc - i);
    jw_key(&req, "options");
    buf_addc(&req, '[');
    /* the order of runcmd.options_of */
    if (single[0]) opt_word(&req, "--image=", single[0]);
    for (int j = 0; j < nmany[1]; j++) opt_word(&req, "--mount=", many[1][j]);
    for (int j = 0; j < nmany[2]; j++) opt_word(&req, "--env=", many[2][j]);
    if (single[3]) opt_word(&req, "--workdir=", single[3]);
    if (single[4]) opt_word(&req, "--network=", single[4]);
    if (readonly) opt_word(&req, "--readonly", "");
    if (entrypoint) opt_word(&req, "--entrypoint", "");
    buf_addc(&req, ']');
    char cwd[4096];
    const char *c = getcwd(cwd, sizeof cwd);
    if (!c)
        c = getenv("PWD") ? getenv("PWD") : "/";
    jw_key(&req, "cwd");
    jw_cstr(&req, c);
    jw_key(&req, "env");
    jw_env(&req, envp);
    buf_addc(&req, '}');
    struct session_opts o = {.socket = sock, .request = &req, .on_native = run_native, .ctx = argv + i};
    for (int fd = 0; fd < 3; fd++)       /* SCM_RIGHTS cannot carry a hole: a closed fd becomes /dev/null */
        o.fds[fd] = fcntl(fd, F_GETFD) < 0 ? open("/dev/null", O_RDWR | O_CLOEXEC) : fd;
    return run_session(&o);
}

int main(int argc, char **argv)
{
    /* SIGPIPE from a vanished daemon is a lost connection, handled where it is seen */
    pipe_ignore();
    if (argc >= 2 && !strcmp(argv[1], "--version")) {
        printf("cbatch-client protocol %d\n", PROTO_VERSION);
        return 0;
    }
    if (argc >= 3 && !strcmp(argv[1], "shim")) {
        char role[32], sock[1024];
        read_shim(argv[2], role, sizeof role, sock, sizeof sock);
        int n = argc - 2;
        char **a = argv + 2;             /* a[0] = the shim path, as a script's argv[0] */
        if (!strcmp(role, "job_starter"))
            return starter_main(sock, n, a, environ);
        if (!strcmp(role, "prologue"))
            return prologue_main(sock, n, a);
        if (!strcmp(role, "epilogue"))
            return epilogue_main(sock, n, a);
        shim_fail(argv[2], "unknown role", role);
    }
    if (argc >= 2 && !strcmp(argv[1], "run")) {
        const char *sock = getenv("CBATCH_SOCKET");
        return run_main(sock && *sock ? sock : DEFAULT_SOCKET, argc - 1, argv + 1, environ);
    }
    fail(EXIT_CBATCH, "client", "usage", argc > 1 ? argv[1] : "(none)",
         "cbatch-client shim FILE ARGS... | cbatch-client run [options] [--] CMD [ARGS...]");
}
