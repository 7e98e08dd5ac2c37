/*
 * cbatch-filter: the direct engine's seccomp loader, bind-mounted read-only at /.cbatch/filter.
 *
 *   cbatch-filter FILTER -- CMD [ARGS...]
 *
 * The first program of every direct container process (the container's init and every TM task `runc exec`
 * starts). It installs the classic-BPF program in FILTER (cbatchd compiled it once from the seccomp
 * profile with the libseccomp runc links: cbatch/engines/seccompbpf.py) with prctl(PR_SET_SECCOMP), as
 * runc would, and then execs CMD: everything the job ever runs, the init included, is under the filter.
 * runc would compile the same profile again at every start (~15-40 ms of CPU here); this reads 6 KB.
 *
 * Nothing user-controlled runs before the filter is in place: the process is made non-dumpable first
 * (and the host copy is mode 0711, so the exec itself already made it so: another process of the job's uid
 * cannot ptrace it or write its memory in the window before the filter), no_new_privs is set (runc has
 * set it already), and any failure exits 125 with one line on stderr, before CMD could run unfiltered.
 * The exec of CMD makes the process dumpable again, as a job's processes are under runc.
 * Static, no libc beyond the static one, no string building.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_INSNS BPF_MAXINSNS /* the kernel's own limit for one program */

static int fail(const char *problem, const char *value, int err)
{
	fprintf(stderr, "cbatch: seccomp filter: %s: %s%s%s\n", problem, value, err ? ": " : "",
		err ? strerror(err) : "");
	return 125;
}

int main(int argc, char **argv)
{
	static struct sock_filter insns[MAX_INSNS];
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0)
		return fail("cannot make the loader non-dumpable", "prctl", errno);
	if (argc < 4 || strcmp(argv[2], "--") != 0)
		return fail("usage", "cbatch-filter FILTER -- CMD [ARGS...]", 0);
	/* O_NONBLOCK: a FIFO put in the filter's place must not hold the loader; it is refused below. */
	int fd = open(argv[1], O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
	if (fd < 0)
		return fail("cannot open", argv[1], errno);
	struct stat st;
	if (fstat(fd, &st) != 0)
		return fail("cannot stat", argv[1], errno);
	if (!S_ISREG(st.st_mode) || st.st_uid != 0 || (st.st_mode & 022))
		return fail("not a regular file written by root only", argv[1], 0);
	if (st.st_size <= 0 || st.st_size % sizeof(struct sock_filter) != 0 ||
	    st.st_size > (off_t)sizeof insns)
		return fail("not a BPF program (size)", argv[1], 0);
	size_t want = (size_t)st.st_size, got = 0;
	while (got < want) {
		ssize_t n = read(fd, (char *)insns + got, want - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return fail("short read", argv[1], n < 0 ? errno : 0);
		got += (size_t)n;
	}
	close(fd);
	struct sock_fprog prog = {.len = (unsigned short)(want / sizeof(struct sock_filter)), .filter = insns};
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
		return fail("cannot set no_new_privs", "prctl", errno);
	/* As runc loads it (flags 0): the kernel verifies the program and refuses a malformed one. */
	if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0) != 0)
		return fail("the kernel refused the filter", argv[1], errno);
	execv(argv[3], argv + 3);
	int err = errno;
	fprintf(stderr, "cbatch: seccomp filter: cannot execute: %s: %s\n", argv[3], strerror(err));
	return err == ENOENT ? 127 : 126;
}
