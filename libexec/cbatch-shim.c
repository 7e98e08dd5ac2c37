/* cbatch-shim: the direct engine's per-container subreaper (see cbatch/engines/direct.py).
 *
 *   cbatch-shim BUNDLE RUNC RUNC_ROOT ID CGROUP_PATH
 *
 * RUNC is the runc to run: /proc/self/fd/5 when cbatchd passes its sealed in-memory copy of runc as fd 5
 * (cbatch/engines/runcbinary.py: runc then skips copying itself at every start), else a path.
 * stdin/stdout/stderr are the job's own descriptors; fd 3 is the daemon's ready pipe, fd 4 its go pipe: the
 * shim creates nothing before the daemon, having recorded the shim's pid in BUNDLE/meta.json, writes "g"
 * there. The record, not the byte, is what counts: a daemon that dies before "g" leaves the go pipe at EOF,
 * and the shim then reads the record itself. Recorded (the daemon died between the two), it starts the
 * container as if told to: a restarted daemon finds the shim from the record and the job's client takes
 * the container back. Not recorded, it creates nothing (a restarted daemon sees a container that never
 * started, removes it and lets the client start again) and leaves a status saying so. The record and the
 * status go through the bundle directory's descriptor, opened first: never a path. The shim becomes a
 * child subreaper, runs `runc run --detach` (one runc process; the container's init is then reparented to
 * the shim), writes one byte to fd 3, then waits for the container's init. When it exits the shim reads
 * the OOM-kill counter, CPU time and peak memory of the container's cgroup (before `runc delete` removes
 * it), deletes the container and writes BUNDLE/status ("status N oom K cpu_us C peak_bytes P deleted D\n", -1 where
 * the cgroup does not report one; written to a temporary file and renamed). The delete of the stopped
 * container is the shim's own where it can be (quick_delete: runc's destroy without a Go program), else
 * `runc delete --force`; the status says which ("deleted shim|runc"). It runs in its
 * own session and ignores the terminal/termination signals, so it outlives a cbatchd restart: a new daemon
 * waits on it by pidfd and reads the same status file. Nothing in it decides anything.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <dirent.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

static char *bundle;
/* The bundle directory as opened at the start: the status and the record are read and written through it,
 * never by path, so a shim that outlives its bundle (removed by a restarted daemon, then made again under
 * the same name for the job's next start) cannot touch the new one. */
static int bundle_fd = -1;

/* What the container's cgroup used, read before `runc delete` removes it (-1: not reported). */
static long long cpu_us = -1, peak_bytes = -1;

/* How the stopped container was deleted: "shim" (quick_delete) or "runc" (runc delete --force). */
static const char *deleted = "runc";

static void write_status(int status, long oom, const char *why)
{
	int fd = openat(bundle_fd, "status.tmp", O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd < 0)
		return;
	FILE *f = fdopen(fd, "w");
	if (!f) {
		close(fd);
		return;
	}
	fprintf(f, "status %d oom %ld cpu_us %lld peak_bytes %lld deleted %s\n", status, oom, cpu_us, peak_bytes,
		deleted);
	if (why)
		fprintf(f, "error %s\n", why);
	/* No fsync: the status is for a daemon of this same boot (a crash takes the container, its client and
	 * the bundle's tmpfs with it); the rename alone makes it whole or absent for every reader. */
	fclose(f);
	renameat(bundle_fd, "status.tmp", bundle_fd, "status");
}

/* Run the program at path with argv to completion; its stdio is ours unless quiet (then /dev/null). Returns
 * the wait status. */
static int run(const char *path, char *const argv[], int quiet)
{
	pid_t pid = fork();
	if (pid < 0)
		return -1;
	if (pid == 0) {
		close(3);
		close(4);
		if (quiet) {
			int fd = open("/dev/null", O_RDWR);
			if (fd >= 0) {
				dup2(fd, 0);
				dup2(fd, 1);
				dup2(fd, 2);
			}
		}
		signal(SIGTERM, SIG_DFL);
		signal(SIGINT, SIG_DFL);
		signal(SIGHUP, SIG_DFL);
		execv(path, argv);
		_exit(127);
	}
	int st;
	while (waitpid(pid, &st, 0) < 0)
		if (errno != EINTR)
			return -1;
	return st;
}

static long counter(const char *path, const char *key)
{
	char line[256];
	long value = -1;
	size_t n = strlen(key);
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	while (fgets(line, sizeof line, f))
		if (!strncmp(line, key, n) && line[n] == ' ')
			value = atol(line + n + 1);
	fclose(f);
	return value;
}

static long oom_kills(const char *cgroup)
{
	char path[4096];
	long v;
	snprintf(path, sizeof path, "/sys/fs/cgroup/memory%s/memory.oom_control", cgroup);
	if ((v = counter(path, "oom_kill")) >= 0)
		return v;
	snprintf(path, sizeof path, "/sys/fs/cgroup%s/memory.events", cgroup);
	if ((v = counter(path, "oom_kill")) >= 0)
		return v;
	return 0;
}

static long long number(const char *path)
{
	long long v = -1;
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	if (fscanf(f, "%lld", &v) != 1)
		v = -1;
	fclose(f);
	return v;
}

/* CPU time and peak memory of the container's own cgroup (v1: cpuacct, memory; v2: cpu.stat, memory.peak). */
static void usage(const char *cgroup)
{
	char path[4096];
	long long v;
	snprintf(path, sizeof path, "/sys/fs/cgroup/cpuacct%s/cpuacct.usage", cgroup);
	if ((v = number(path)) >= 0)
		cpu_us = v / 1000;
	else {
		snprintf(path, sizeof path, "/sys/fs/cgroup%s/cpu.stat", cgroup);
		if ((v = counter(path, "usage_usec")) >= 0)
			cpu_us = v;
	}
	snprintf(path, sizeof path, "/sys/fs/cgroup/memory%s/memory.max_usage_in_bytes", cgroup);
	if ((v = number(path)) >= 0)
		peak_bytes = v;
	else {
		snprintf(path, sizeof path, "/sys/fs/cgroup%s/memory.peak", cgroup);
		peak_bytes = number(path);
	}
}

/* rmdir a container cgroup runc made, retrying while the kernel still tears its last task down (as runc does). */
static int remove_cgroup(const char *path)
{
	for (int i = 0; i < 10; i++) {
		if (rmdir(path) == 0 || errno == ENOENT)
			return 0;
		if (errno != EBUSY)
			return -1;
		struct timespec ts = {0, 10 * 1000 * 1000};
		nanosleep(&ts, NULL);
	}
	return -1;
}

/* What `runc delete` does for a stopped container with a pid namespace, cgroupfs and no hooks (libcontainer's
 * destroy: the cgroup directories recorded in its state.json, then its state directory), without starting a
 * Go program at every job's end (~8 ms of CPU and ~15 ms before the status). Anything unexpected - a state
 * file it cannot read, a path outside /sys/fs/cgroup, an escaped character, another file in the state
 * directory - returns -1 before touching anything more, and the caller runs `runc delete --force`. */
static int quick_delete(const char *root, const char *id)
{
	static char buf[1 << 20];
	char dir[2048], path[4096];
	if (snprintf(dir, sizeof dir, "%s/%s", root, id) >= (int)sizeof dir)
		return -1;
	snprintf(path, sizeof path, "%s/state.json", dir);
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0)
		return -1;
	size_t len = 0;
	ssize_t n;
	while (len < sizeof buf - 1 && (n = read(fd, buf + len, sizeof buf - 1 - len)) > 0)
		len += (size_t)n;
	close(fd);
	if (len == 0 || len >= sizeof buf - 1)
		return -1;
	buf[len] = 0;
	DIR *d = opendir(dir);
	if (!d)
		return -1;
	struct dirent *e;
	int others = 0;
	while ((e = readdir(d)))
		if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..") && strcmp(e->d_name, "state.json"))
			others = 1;
	closedir(d);
	char *p = strstr(buf, "\"cgroup_paths\":{");
	if (others || !p)
		return -1;
	p += strlen("\"cgroup_paths\":{");
	char *end = strchr(p, '}');
	if (!end)
		return -1;
	*end = 0;
	/* "key":"value" pairs; the values are absolute paths under /sys/fs/cgroup/ with no escape and no "..". */
	char *paths[64];
	int count = 0;
	while (*p) {
		char *q[4];
		for (int i = 0; i < 4; i++) {
			q[i] = strchr(i ? q[i - 1] + 1 : p, '"');
			if (!q[i])
				return -1;
		}
		*q[3] = 0;
		char *value = q[2] + 1;
		if (count == 64 || strncmp(value, "/sys/fs/cgroup/", 15) || strchr(value, '\\') || strstr(value, ".."))
			return -1;
		paths[count++] = value;
		p = q[3] + 1;
		if (*p == ',')
			p++;
		else if (*p)
			return -1;
	}
	for (int i = 0; i < count; i++)
		if (remove_cgroup(paths[i]) != 0)
			return -1;
	if (unlink(path) != 0 || rmdir(dir) != 0)
		return -1;
	deleted = "shim";
	return 0;
}

/* Whether BUNDLE/meta.json records this process as the container's shim ("shim": PID, a top-level key of
 * the JSON cbatchd writes atomically; every string in it is JSON-escaped, so the text cannot occur inside a
 * value). Anything unreadable or too long counts as not recorded: the shim then creates nothing. */
static int recorded(void)
{
	char want[64], buf[65536];
	int n = snprintf(want, sizeof want, "\"shim\": %ld", (long)getpid());
	int fd = openat(bundle_fd, "meta.json", O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return 0;
	size_t len = 0;
	ssize_t got;
	while (len < sizeof buf - 1 && ((got = read(fd, buf + len, sizeof buf - 1 - len)) > 0 || (got < 0 && errno == EINTR)))
		if (got > 0)
			len += got;
	close(fd);
	if (len == sizeof buf - 1)
		return 0;
	buf[len] = 0;
	for (char *p = strstr(buf, want); p; p = strstr(p + 1, want))
		if (p[n] == ',' || p[n] == '}')
			return 1;
	return 0;
}

int main(int argc, char **argv)
{
	if (argc != 6) {
		fprintf(stderr, "cbatch: shim: usage: cbatch-shim BUNDLE RUNC RUNC_ROOT ID CGROUP_PATH\n");
		return 125;
	}
	bundle = argv[1];
	bundle_fd = open(bundle, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (bundle_fd < 0) {
		fprintf(stderr, "cbatch: shim: bundle: cannot open: %s\n", bundle);
		return 125;
	}
	char *runc = argv[2], *root = argv[3], *id = argv[4], *cgroup = argv[5];
	/* Nothing past the go pipe reaches runc: the sealed runc cbatchd may pass as fd 5 (RUNC is then
	 * /proc/self/fd/5, which execve opens before it closes close-on-exec descriptors) is runc's own
	 * /proc/self/exe, never an open descriptor of runc's or of the container's. */
	if (syscall(SYS_close_range, 5, ~0U, CLOSE_RANGE_CLOEXEC) != 0)
		for (int fd = 5; fd < 1024; fd++)
			fcntl(fd, F_SETFD, FD_CLOEXEC);
	char pidfile[4096];
	snprintf(pidfile, sizeof pidfile, "%s/pid", bundle);

	signal(SIGTERM, SIG_IGN);
	signal(SIGINT, SIG_IGN);
	signal(SIGHUP, SIG_IGN);
	signal(SIGPIPE, SIG_IGN);
	if (getsid(0) != getpid())
		setsid();
	if (prctl(PR_SET_CHILD_SUBREAPER, 1) != 0) {
		write_status(125, 0, "prctl PR_SET_CHILD_SUBREAPER failed");
		return 125;
	}

	char go = 0;
	ssize_t got;
	while ((got = read(4, &go, 1)) < 0 && errno == EINTR)
		;
	close(4);
	if ((got != 1 || go != 'g') && !(got == 0 && recorded())) {
		write_status(125, 0, "cbatchd went away before the start");
		return 0;
	}

	/* One runc process: `run --detach` creates and starts (runc itself brings the new netns's lo up); its
	 * init is reparented to us, the subreaper, when runc exits. */
	char *runit[] = {"runc", "--root", root, "run", "--detach", "--bundle", bundle, "--pid-file", pidfile, id, NULL};
	int st = run(runc, runit, 0);
	int started = st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0;
	long cpid = 0;
	if (started) {
		int pfd = openat(bundle_fd, "pid", O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
		FILE *pf = pfd >= 0 ? fdopen(pfd, "r") : NULL;
		if (pfd >= 0 && !pf)
			close(pfd);
		started = pf && fscanf(pf, "%ld", &cpid) == 1 && cpid > 1;
		if (pf)
			fclose(pf);
	}
	/* The job's descriptors belong to the container now: a reader of a pipe sees EOF when the job ends. */
	int null = open("/dev/null", O_RDWR);
	if (null >= 0) {
		dup2(null, 0);
		dup2(null, 1);
		dup2(null, 2);
		if (null > 3)
			close(null);
	}
	if (write(3, started ? "s" : "f", 1) < 0) {
		/* the daemon went away mid-start: the container is still the job's; carry on */
	}
	close(3);
	if (!started) {
		char *del[] = {"runc", "--root", root, "delete", "--force", id, NULL};
		run(runc, del, 1);
		write_status(125, 0, "runc run failed");
		return 0;
	}

	int status = 125;
	for (;;) {
		pid_t p = waitpid(-1, &st, 0);
		if (p < 0) {
			if (errno == EINTR)
				continue;
			break; /* ECHILD: no child left */
		}
		if (p == (pid_t)cpid) {
			if (WIFEXITED(st))
				status = WEXITSTATUS(st);
			else if (WIFSIGNALED(st))
				status = 128 + WTERMSIG(st);
			break;
		}
	}
	long oom = oom_kills(cgroup);
	usage(cgroup);
	if (quick_delete(root, id) != 0) {
		char *del[] = {"runc", "--root", root, "delete", "--force", id, NULL};
		run(runc, del, 1);
	}
	write_status(status, oom, NULL);
	return 0;
}
