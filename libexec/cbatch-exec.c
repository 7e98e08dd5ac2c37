/*
 * cbatch-exec: the in-container helper, bind-mounted read-only at /.cbatch/exec.
 *
 *   cbatch-exec [--umask OCTAL] [--stdout PATH] [--stderr PATH] [--stdin-line LINE] -- CMD [ARGS...]
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
#include <sys/stat.h>
#include <unistd.h>

#define MAX_STDIN_LINE (60 * 1024) /* must fit the pipe buffer: we write it all before exec, nobody reads yet */

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

static void usage(void)
{
    fputs("cbatch: helper: usage: cbatch-exec [--umask OCTAL] [--stdout PATH] [--stderr PATH] [--stdin-line LINE] -- CMD [ARGS...]\n", stderr);
    exit(125);
}

int main(int argc, char **argv)
{
    const char *out = NULL, *err = NULL, *line = NULL;
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
    if (errno == ENOENT)
        fail(127, "command: not found in the image", argv[i], NULL);
    fail(126, "command: cannot execute", argv[i], strerror(errno));
    return 126;
}
