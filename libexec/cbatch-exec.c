/*
 * cbatch-exec: the in-container helper, bind-mounted read-only at /.cbatch/exec.
 *
 *   cbatch-exec [--ids UID:GID:G1,G2,...] [--umask OCTAL] [--stdout PATH] [--stderr PATH]
 *               [--stdin-line LINE] -- CMD [ARGS...]
 *
 * Identity (--ids). The container starts as 0:0 with only CAP_SETUID/SETGID/SETPCAP/KILL, so that Docker
 * never resolves a user or group in the image's /etc/passwd or /etc/group (runc reads group_add entries
 * as NAMES first: an image group named "1003" with gid 0 would be the job's). Before anything else this
 * helper sets exactly the host's numbers: setgroups, setresgid, setresuid; empties the capability
 * bounding set first (a setuid binary could not bring the caps back even without no_new_privileges);
 * then checks with getres[ug]id/getgroups/capget that all of it took effect, and exits 125 otherwise.
 *
 * Shell fallback. With --stdin-line the command is the user's login shell reading `<script> [args]`
 * (pbs_mom's way). When that shell is not in the image (busybox, alpine, distroless lack /bin/bash), the
 * same argv runs with the image's /bin/sh; when there is no /bin/sh either, the line's words are exec'd
 * directly (the script's #! picks its interpreter). Only when that fails too is it 127.
 *
 * It points fds 1 and 2 at the job's own spool files (bind-mounted by cbatchd, opened O_APPEND and never
 * created here), feeds the job shell its one stdin line through a pipe (as pbs_mom does), then execs CMD.
 * Nothing is proxied: after the exec this program is gone and the job writes straight into its files.
 * Static (the image may have no libc at all), no shell, no string building: argv goes to execvp as given.
 *
 * Exit statuses when CMD never ran (see cbatch/errors.py): 125 helper failure, 126 cannot execute,
 * 127 not found in the image.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <grp.h>
#include <linux/capability.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_STDIN_LINE (60 * 1024) /* must fit the pipe buffer: we write it all before exec, nobody reads yet */
#define MAX_GROUPS 65536           /* NGROUPS_MAX on Linux */
#define MAX_WORDS 4096             /* words of the stdin line when it is exec'd without a shell */

/* Print one value, escaping anything unprintable so a hostile name cannot forge extra lines. */
static void put_clean(const char *s)
{
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c < 0x20 || c == 0x7f)
            fprintf(stderr, "\\x%02x", c);
        else
            fputc(c, stderr);
    }
}

static void fail(int status, const char *problem, const char *value, const char *detail)
{
    fputs("cbatch: ", stderr);
    fputs(problem, stderr);
    if (value) {
        fputs(": ", stderr);
        put_clean(value);
    }
    if (detail) {
        fputs(": ", stderr);
        fputs(detail, stderr);
    }
    fputc('\n', stderr);
    exit(status);
}

/* Make `fd` become `target` without O_CLOEXEC, closing the original. */
static void move_fd(int fd, int target, const char *what)
{
    if (fd == target) {
        /* open() handed us the target number itself (it was closed): just drop the close-on-exec flag */
        if (fcntl(fd, F_SETFD, 0) < 0)
            fail(125, "helper: cannot set up", what, strerror(errno));
        return;
    }
    if (dup2(fd, target) < 0)
        fail(125, "helper: cannot set up", what, strerror(errno));
    close(fd);
}

static int open_output(const char *path)
{
    /* No O_CREAT: the file must be the spool file cbatchd bind-mounted, never something new in the image. */
    int fd = open(path, O_WRONLY | O_APPEND | O_NOCTTY | O_CLOEXEC);
    if (fd < 0)
        fail(125, "helper: cannot open output file", path, strerror(errno));
    return fd;
}

/* One decimal id, 0..2^32-2 (-1 is "unchanged" to set*id and never a real id). */
static int parse_id(const char *s, const char *end, unsigned int *out)
{
    unsigned long long v = 0;
    if (s == end)
        return -1;
    for (; s < end; s++) {
        if (*s < '0' || *s > '9')
            return -1;
        v = v * 10 + (unsigned long long)(*s - '0');
        if (v >= 0xffffffffULL)
            return -1;
    }
    *out = (unsigned int)v;
    return 0;
}

/* "UID:GID:G1,G2,..." (the group list may be empty). Numbers only: nothing is looked up anywhere. */
static int parse_ids(const char *s, uid_t *uid, gid_t *gid, gid_t *groups, size_t *ngroups)
{
    const char *c1 = strchr(s, ':'), *c2, *p;
    unsigned int v;
    if (!c1 || !(c2 = strchr(c1 + 1, ':')))
        return -1;
    if (parse_id(s, c1, &v) < 0)
        return -1;
    *uid = (uid_t)v;
    if (parse_id(c1 + 1, c2, &v) < 0)
        return -1;
    *gid = (gid_t)v;
    *ngroups = 0;
    for (p = c2 + 1; *p;) {
        const char *e = strchr(p, ',');
        if (!e)
            e = p + strlen(p);
        if (*ngroups >= MAX_GROUPS || parse_id(p, e, &v) < 0)
            return -1;
        groups[(*ngroups)++] = (gid_t)v;
        p = *e ? e + 1 : e;
        if (*e && !*p)
            return -1; /* trailing comma */
    }
    return 0;
}

static int gid_in(gid_t g, const gid_t *list, size_t n)
{
    size_t k;
    for (k = 0; k < n; k++)
        if (list[k] == g)
            return 1;
    return 0;
}

/* Become exactly uid/gid/groups, or exit 125. Runs before any file is opened. */
static void become(uid_t uid, gid_t gid, const gid_t *groups, size_t ngroups)
{
    static gid_t got[MAX_GROUPS];
    uid_t ru, eu, su;
    gid_t rg, eg, sg;
    int n, cap;
    size_t k;
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];

    if (uid != 0) {
        /* Empty the bounding set while we still hold CAP_SETPCAP: no exec can ever regain a capability. */
        for (cap = 0; cap <= 63; cap++)
            if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL)
                fail(125, "helper: cannot drop capability bounding set", NULL, strerror(errno));
        if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
            fail(125, "helper: cannot clear ambient capabilities", NULL, strerror(errno));
    }
    if (setgroups(ngroups, groups) < 0)
        fail(125, "helper: setgroups failed", NULL, strerror(errno));
    if (setresgid(gid, gid, gid) < 0)
        fail(125, "helper: setresgid failed", NULL, strerror(errno));
    if (setresuid(uid, uid, uid) < 0)
        fail(125, "helper: setresuid failed", NULL, strerror(errno));

    /* Check every effect: a silently ignored call must never leave the job with the image's ids. */
    if (getresuid(&ru, &eu, &su) < 0 || ru != uid || eu != uid || su != uid)
        fail(125, "helper: identity not applied", "uid", NULL);
    if (getresgid(&rg, &eg, &sg) < 0 || rg != gid || eg != gid || sg != gid)
        fail(125, "helper: identity not applied", "gid", NULL);
    n = getgroups(MAX_GROUPS, got);
    if (n < 0 || (size_t)n != ngroups)
        fail(125, "helper: identity not applied", "groups", NULL);
    for (k = 0; k < (size_t)n; k++)
        if (!gid_in(got[k], groups, ngroups))
            fail(125, "helper: identity not applied", "groups", NULL);
    if (uid != 0) {
        if (syscall(SYS_capget, &hdr, data) < 0)
            fail(125, "helper: capget failed", NULL, strerror(errno));
        if (data[0].permitted || data[1].permitted || data[0].effective || data[1].effective ||
            data[0].inheritable || data[1].inheritable)
            fail(125, "helper: capabilities remain after the identity change", NULL, NULL);
        for (cap = 0; cap <= 63; cap++)
            if (prctl(PR_CAPBSET_READ, cap, 0, 0, 0) == 1)
                fail(125, "helper: capability bounding set not empty", NULL, NULL);
    }
}

/* Split the job line into words at blanks (pbs_mom writes "<script> [args]\n"); NULL-terminated. */
static char **line_words(const char *line)
{
    static char buf[MAX_STDIN_LINE + 1];
    static char *words[MAX_WORDS + 1];
    size_t n = 0;
    char *p;
    if (strlen(line) > MAX_STDIN_LINE)
        return NULL;
    strcpy(buf, line);
    for (p = strtok(buf, " \t\n"); p && n < MAX_WORDS; p = strtok(NULL, " \t\n"))
        words[n++] = p;
    words[n] = NULL;
    return n ? words : NULL;
}

static void usage(void)
{
    fputs("cbatch: helper: usage: cbatch-exec [--ids UID:GID:G1,...] [--umask OCTAL] [--stdout PATH] [--stderr PATH] [--stdin-line LINE] -- CMD [ARGS...]\n", stderr);
    exit(125);
}

int main(int argc, char **argv)
{
    const char *out = NULL, *err = NULL, *line = NULL, *ids = NULL;
    static gid_t groups[MAX_GROUPS];
    int i;

    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0) {
            i++;
            break;
        }
        if (i + 1 >= argc)
            usage();
        if (strcmp(argv[i], "--stdout") == 0)
            out = argv[++i];
        else if (strcmp(argv[i], "--stderr") == 0)
            err = argv[++i];
        else if (strcmp(argv[i], "--stdin-line") == 0)
            line = argv[++i];
        else if (strcmp(argv[i], "--ids") == 0)
            ids = argv[++i];
        else if (strcmp(argv[i], "--umask") == 0) {
            /* Docker has no umask option; the job must create files with the caller's modes (pbs_mom: 0077). */
            char *end;
            unsigned long mask = strtoul(argv[++i], &end, 8);
            if (*argv[i] == '\0' || *end != '\0' || mask > 0777)
                usage();
            umask((mode_t)mask);
        }
        else
            usage();
    }
    if (i >= argc)
        usage();

    /* Identity first, before any file is opened: the spool files are opened as the job's user. */
    if (ids) {
        uid_t uid;
        gid_t gid;
        size_t ngroups;
        if (parse_ids(ids, &uid, &gid, groups, &ngroups) < 0)
            fail(125, "helper: bad --ids", ids, "UID:GID:G1,G2,... in decimal");
        become(uid, gid, groups, ngroups);
    }

    /* stderr first, so that every later complaint lands in the job's .e file. */
    if (err)
        move_fd(open_output(err), STDERR_FILENO, "stderr");
    if (out)
        move_fd(open_output(out), STDOUT_FILENO, "stdout");

    if (line) {
        size_t len = strlen(line), done = 0;
        int p[2];
        if (len > MAX_STDIN_LINE)
            fail(125, "helper: stdin line too long", NULL, "over 60 KiB");
        if (pipe2(p, O_CLOEXEC) < 0)
            fail(125, "helper: cannot set up", "stdin", strerror(errno));
        while (done < len) {
            ssize_t n = write(p[1], line + done, len - done);
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0)
                fail(125, "helper: cannot set up", "stdin", strerror(errno));
            done += (size_t)n;
        }
        close(p[1]); /* the shell sees EOF after the line, exactly like pbs_mom's pipe */
        move_fd(p[0], STDIN_FILENO, "stdin");
    }

    fflush(stderr);
    execvp(argv[i], &argv[i]);
    if (errno == ENOENT && line && argv[i][0] == '/') {
        /* The login shell is not in the image: the same argv with the image's /bin/sh reads the same line. */
        int saved = errno;
        char **words, *shell = argv[i];
        /* argv[0] must be "/bin/sh": a multi-call busybox picks its applet from argv[0]'s name. */
        argv[i] = "/bin/sh";
        execv("/bin/sh", &argv[i]);
        argv[i] = shell; /* the login shell's name for the messages below */
        if (errno == ENOENT && (words = line_words(line)) != NULL) {
            /* No shell at all: run the line's words directly (the script's #! picks its interpreter),
             * with stdin at EOF as the shell would leave it after reading its one line. */
            int p[2];
            if (pipe2(p, O_CLOEXEC) == 0) {
                close(p[1]);
                move_fd(p[0], STDIN_FILENO, "stdin");
            }
            execv(words[0], words);
            if (errno == ENOENT)
                fail(127, "command: no shell in the image and the script's interpreter is missing",
                     argv[i], "the image has neither the login shell, /bin/sh, nor the #! interpreter");
            fail(126, "command: cannot execute", words[0], strerror(errno));
        }
        errno = saved;
    }
    if (errno == ENOENT)
        fail(127, "command: not found in the image", argv[i], NULL);
    fail(126, "command: cannot execute", argv[i], strerror(errno));
    return 126;
}
