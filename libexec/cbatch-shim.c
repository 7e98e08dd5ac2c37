/* cbatch-shim: the direct engine's per-container subreaper (see cbatch/engines/direct.py).
 *
 *   cbatch-shim BUNDLE RUNC RUNC_ROOT ID CGROUP_PATH
 *
 * stdin/stdout/stderr are the job's own descriptors; fd 3 is the daemon's ready pipe, fd 4 its go pipe: the
 * shim creates nothing before the daemon, having recorded the shim's pid, writes "g" there (a daemon that
 * dies before that leaves no container behind, only a status saying so). The shim becomes a
 * child subreaper, runs `runc run --detach` (one runc process; the container's init is then reparented to
 * the shim), writes one byte to fd 3, then waits for the container's init. When it exits the shim reads
 * the OOM-kill counter, CPU time and peak memory of the container's cgroup (before `runc delete` removes
 * it), deletes the container and writes BUNDLE/status ("status N oom K cpu_us C peak_bytes P\n", -1 where
 * the cgroup does not report one; written to a temporary file and renamed). It runs in its
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
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static char *bundle;

/* What the container's cgroup used, read before `runc delete` removes it (-1: not reported). */
static long long cpu_us = -1, peak_bytes = -1;

static void write_status(int status, long oom, const char *why)
{
	char tmp[4096], path[4096];
	snprintf(tmp, sizeof tmp, "%s/status.tmp", bundle);
	snprintf(path, sizeof path, "%s/status", bundle);
	FILE *f = fopen(tmp, "w");
	if (!f)
		return;
	fprintf(f, "status %d oom %ld cpu_us %lld peak_bytes %lld\n", status, oom, cpu_us, peak_bytes);
	if (why)
		fprintf(f, "error %s\n", why);
	fflush(f);
	fsync(fileno(f));
	fclose(f);
	rename(tmp, path);
}

/* Run argv to completion; its stdio is ours unless quiet (then /dev/null). Returns the wait status. */
static int run(char *const argv[], int quiet)
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
		execv(argv[0], argv);
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

int main(int argc, char **argv)
{
	if (argc != 6) {
		fprintf(stderr, "cbatch: shim: usage: cbatch-shim BUNDLE RUNC RUNC_ROOT ID CGROUP_PATH\n");
		return 125;
	}
	bundle = argv[1];
	char *runc = argv[2], *root = argv[3], *id = argv[4], *cgroup = argv[5];
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
	if (got != 1 || go != 'g') {
		write_status(125, 0, "cbatchd went away before the start");
		return 0;
	}

	/* One runc process: `run --detach` creates and starts (runc itself brings the new netns's lo up); its
	 * init is reparented to us, the subreaper, when runc exits. */
	char *runit[] = {runc, "--root", root, "run", "--detach", "--bundle", bundle, "--pid-file", pidfile, id, NULL};
	int st = run(runit, 0);
	int started = st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0;
	long cpid = 0;
	if (started) {
		FILE *pf = fopen(pidfile, "r");
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
		char *del[] = {runc, "--root", root, "delete", "--force", id, NULL};
		run(del, 1);
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
	char *del[] = {runc, "--root", root, "delete", "--force", id, NULL};
	run(del, 1);
	write_status(status, oom, NULL);
	return 0;
}
