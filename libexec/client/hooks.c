/* The root prologue and epilogue (cbatch/clients/hooks.py): register / unregister the job with cbatchd.
 * They always exit 0: for pbs_mom, prologue 1 aborts the job without output and anything else requeues it
 * in a loop. Problems go to syslog and to stderr (the job's .e); the starter reports them to the user. */
#include "cbc.h"
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#define REGISTER_TIMEOUT 30.0
#define UNREGISTER_RETRY 20.0
#define UNREGISTER_EVERY 1.0
#define CGROUP_ROOT "/sys/fs/cgroup"

static void hook_log(const char *prefix, const char *ident, const char *job, const char *what, const char *detail)
{
    struct buf line = {0};
    buf_adds(&line, prefix);
    buf_adds(&line, ": ");
    struct buf body = {0};
    if (job) {
        buf_adds(&body, "job ");
        buf_adds(&body, job);
    }
    buf_adds(&body, what);
    buf_adds(&body, detail);
    clean_add(&line, body.p, body.n);
    openlog(ident, LOG_PID, LOG_DAEMON);
    syslog(LOG_ERR, "%s", buf_str(&line));
    closelog();
    buf_addc(&line, '\n');
    (void)write_all(2, line.p, line.n);
    buf_free(&line);
    buf_free(&body);
}

static void field(struct buf *b, const char *key, const char *value)
{
    jw_key(b, key);
    jw_cstr(b, value);
}

int prologue_main(const char *socket, int argc, char **argv)
{
    char **a = argv + 1;
    int n = argc - 1;
    if (n == 9) { a++; n--; }
    char job[81];
    struct buf clean = {0};
    clean_add(&clean, n > 0 ? a[0] : "(no job id)", n > 0 ? strlen(a[0]) : 11);
    snprintf(job, sizeof job, "%s", buf_str(&clean));
    if (n != 8) {
        char v[160];
        snprintf(v, sizeof v, "cbatch: prologue: expected 8 arguments from pbs_mom: %d "
                 "(jobid user group name resources queue account script)", n);
        hook_log("cbatch prologue", "cbatch-prologue", job, " not registered: ", v);
        return 0;
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    char at[64];
    snprintf(at, sizeof at, "%lld.%06ld", (long long)ts.tv_sec, ts.tv_nsec / 1000);
    struct buf req = {0}, reply = {0}, err = {0};
    jw_request(&req, "register");
    buf_adds(&req, ",\"registration\":{");
    static const char *keys[] = {"job_id", "user", "group", "name", "resource_list", "queue", "account",
                                 "script_path"};
    for (int i = 0; i < 8; i++)
        field(&req, keys[i], a[i]);
    jw_key(&req, "session_id");
    jw_int(&req, getppid());      /* pbs_mom forks the job's session leader and runs us from it */
    field(&req, "batch", "torque");
    jw_key(&req, "registered_at");
    buf_adds(&req, at);
    jw_key(&req, "uid");
    buf_adds(&req, "null}}");
    if (call(socket, &req, REGISTER_TIMEOUT, &reply, &err, NULL) < 0)
        hook_log("cbatch prologue", "cbatch-prologue", job, " not registered: ", buf_str(&err));
    return 0;
}

/* --- cgroup tidy: rmdir the empty directories Docker left under /torque/<jobid>, deepest first ------ */

static int torque_controller(const char *name)
{
    static const char *c[] = {"cpuacct", "cpuset", "memory", "devices", "cpu,cpuacct", "cpuacct,cpu"};
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++)
        if (strcmp(name, c[i]) == 0)
            return 1;
    return 0;
}

/* Remove dir's subdirectories bottom-up (never following symlinks), then dir unless keep. Returns how
 * many directories are left (busy). depth bounds the recursion. */
static int rm_tree(const char *dir, int keep, int depth)
{
    int left = 0;
    DIR *d = depth < 32 ? opendir(dir) : NULL;
    if (d) {
        struct dirent *e;
        while ((e = readdir(d))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
                continue;
            char sub[4096];
            struct stat st;
            if (snprintf(sub, sizeof sub, "%s/%s", dir, e->d_name) >= (int)sizeof sub)
                continue;
            if (lstat(sub, &st) == 0 && S_ISDIR(st.st_mode))
                left += rm_tree(sub, 0, depth + 1);
        }
        closedir(d);
    }
    if (!keep && rmdir(dir) < 0 && errno != ENOENT)
        left++;
    return left;
}

static void tidy(const char *job)
{
    if (!job[0] || strchr(job, '/') || !strcmp(job, ".") || !strcmp(job, ".."))
        return;
    char top[4096];
    struct stat st;
    if (snprintf(top, sizeof top, "%s/cgroup.controllers", CGROUP_ROOT) < (int)sizeof top && stat(top, &st) == 0) {
        snprintf(top, sizeof top, "%s/torque/%s", CGROUP_ROOT, job);     /* pure v2: one hierarchy */
        if (lstat(top, &st) == 0 && S_ISDIR(st.st_mode))
            rm_tree(top, 0, 0);
        return;
    }
    DIR *d = opendir(CGROUP_ROOT);
    if (!d)
        return;
    int left = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        char hier[4096], probe[4200];
        if (e->d_name[0] == '.')
            continue;
        snprintf(hier, sizeof hier, "%s/%s", CGROUP_ROOT, e->d_name);
        snprintf(probe, sizeof probe, "%s/cgroup.procs", hier);
        if (lstat(hier, &st) < 0 || !S_ISDIR(st.st_mode) || stat(probe, &st) < 0)
            continue;
        if (snprintf(top, sizeof top, "%s/torque/%s", hier, job) >= (int)sizeof top)
            continue;
        if (lstat(top, &st) == 0 && S_ISDIR(st.st_mode))
            left += rm_tree(top, torque_controller(e->d_name), 0);
    }
    closedir(d);
    if (left) {
        char v[64];
        snprintf(v, sizeof v, "%d cgroup directories still busy", left);
        hook_log("cbatch epilogue", "cbatch-epilogue", job, ": ", v);
    }
}

int epilogue_main(const char *socket, int argc, char **argv)
{
    char **a = argv + 1;
    int n = argc - 1;
    if (n == 12) { a++; n--; }
    const char *job = n > 0 ? a[0] : "";
    if (n != 11 || !job[0]) {
        struct buf v = {0}, all = {0};
        char head[64];
        snprintf(head, sizeof head, "expected 11 arguments from pbs_mom, got %d: ", n);
        buf_adds(&v, head);
        for (int i = 0; i < n; i++) {
            if (i) buf_addc(&all, ' ');
            buf_adds(&all, a[i]);
        }
        buf_add(&v, all.p ? all.p : "", all.n > 200 ? 200 : all.n);
        hook_log("cbatch epilogue", "cbatch-epilogue", NULL, "", buf_str(&v));
        return 0;
    }
    struct buf req = {0}, reply = {0}, err = {0}, prob = {0};
    jw_request(&req, "unregister");
    field(&req, "job_id", job);
    buf_addc(&req, '}');
    double deadline = mono() + UNREGISTER_RETRY;
    int rc;
    /* a daemon that is restarting is waited for; one that answers with an error is not retried */
    while ((rc = call(socket, &req, REGISTER_TIMEOUT, &reply, &err, &prob)) < 0
           && (!strcmp(buf_str(&prob), "not reachable") || !strcmp(prob.p, "closed the connection without a reply"))
           && mono() < deadline)
        sleep_s(UNREGISTER_EVERY);
    if (rc < 0) {
        struct buf d = {0};
        buf_adds(&d, buf_str(&err));
        buf_adds(&d, "; left for cbatchd's start-up sweep: the job's registration and any container labelled "
                     "cbatch.job=");
        buf_adds(&d, job);
        hook_log("cbatch epilogue", "cbatch-epilogue", job, " not unregistered: ", buf_str(&d));
    } else {
        struct jval l = jr_get(jr_root(reply.p, reply.n), "leftovers");
        if (l.t == J_ARR && l.n > 2) {
            struct buf d = {0};
            buf_add(&d, l.p, l.n);
            hook_log("cbatch epilogue", "cbatch-epilogue", job, ": containers left after removal: ", buf_str(&d));
        }
    }
    tidy(job);
    return 0;
}
