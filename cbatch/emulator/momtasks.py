"""The pbs_mom emulator's interactive jobs (``qsub -I``) and TM tasks (``pbsdsh``), as TORQUE 6.1 starts them.

From src/resmom/start_exec.c (TORQUE 6.1):

- Interactive (TMomFinalizeChild -> setup_interactive_job): the child pbs_mom forked is the session leader
  (handle_reservation: setsid). It opens the pty slave (its controlling terminal), ignores SIGINT and
  SIGTERM, runs the prologue, then forks the *shell child*, which gets the slave as fds 0, 1, 2, SIGINT back,
  ``PBS_ENVIRONMENT=PBS_INTERACTIVE`` (no ``ENVIRONMENT=BATCH``) and execs ``[starter, shell]``
  (mom_jobstarter_execute_job; ``[starter, shell, -c, cmd]`` with ``qsub -I -x cmd``). The leader stays as
  the "reader" (copies qsub's socket to the pty master), reaps the shell child and exits 0. So the job
  starter is in the registered session but is not its leader, and its parent is the leader.
- TM task (mom_comm.c:tm_spawn_request -> start_process): a fresh child of pbs_mom itself; environment from
  InitUserEnv plus the task's env, ``PBS_ENVIRONMENT=PBS_BATCH``, ``ENVIRONMENT=BATCH``,
  ``PBS_TASKNUM=<task>``; stdin /dev/null (or TM_STDIN_PORT), stdout/stderr the job's spool files (single
  node) or TM sockets; then setsid() (its own session), limits, the user's ids, cwd PBS_O_INITDIR or $HOME,
  and execvp ``[starter, argv...]`` (become_the_jobs_subprocess). No prologue, no stdin line.

The emulator's pty master plays qsub's terminal: the test reads and writes it directly (the reader/writer
socket relay to qsub is left out). Stdlib only.
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import signal
import subprocess
import sys
import termios
from typing import List, Optional, Sequence


def interactive(plan: dict, pts: int, status_fd: int, report) -> None:
    """The session leader's part of an interactive job, after the prologue passed: fork the shell child,
    reap it, record its status for the test, exit 0 (the reader's exit)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pid = os.fork()
    if pid == 0:
        try:
            _become_shell_child(plan, pts)
        except OSError as exc:
            report(exec_error=f"{type(exc).__name__}: {exc}")
        os._exit(254)
    os.close(status_fd)        # the shell child's copy (close-on-exec) tells the mom when the exec happened
    os.close(pts)
    while True:
        try:
            _pid, wstatus = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(wstatus)
    status = 256 - code if code < 0 else code          # TORQUE's form: 256+N for a signal
    with open(plan["plan_file"] + ".shell", "w") as fh:
        fh.write(str(status))
    os._exit(0)


def _become_shell_child(plan: dict, pts: int) -> None:
    for fd in (0, 1, 2):
        os.dup2(pts, fd)
    if pts > 2:
        os.close(pts)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _limits_and_ids(plan)
    os.chdir(plan["cwd"])
    argv = [plan["starter"], plan["shell"]] + (["-c", plan["interactive_cmd"]] if plan.get("interactive_cmd")
                                               else [])
    os.execve(plan["starter"], argv, plan["env"])


def _limits_and_ids(plan: dict) -> None:
    if plan["mem"]:
        for lim in (resource.RLIMIT_DATA, resource.RLIMIT_RSS):
            resource.setrlimit(lim, (plan["mem"], plan["mem"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.initgroups(plan["user"], plan["gid"])
    os.setresgid(plan["gid"], plan["gid"], plan["gid"])
    os.setresuid(plan["uid"], plan["uid"], plan["uid"])
    os.umask(0o077)


def controlling_tty(fd: int) -> None:
    """Make the pty slave ``fd`` the controlling terminal of this (new) session, as open_pty() does."""
    fcntl.ioctl(fd, termios.TIOCSCTTY, 0)


# ---- TM tasks -------------------------------------------------------------------------------------
def spawn_task(python: str, plan: dict, argv: Sequence[str], task_number: int,
               stdout: Optional[int] = None, stderr: Optional[int] = None) -> subprocess.Popen:
    """Start a TM task of the job described by ``plan`` the way pbs_mom's start_process does (see module doc).

    The caller (the mom) is the task's parent, as pbs_mom is. ``stdout``/``stderr`` default to the job's
    spool files; pass fds to play pbsdsh's TM_STDOUT_PORT sockets.
    """
    env = dict(plan["env"])
    env.update({"PBS_ENVIRONMENT": "PBS_BATCH", "ENVIRONMENT": "BATCH", "PBS_TASKNUM": str(task_number)})
    task = {"argv": list(argv), "env": env, "stdout": stdout, "stderr": stderr}
    passed = tuple(fd for fd in (stdout, stderr) if fd is not None)
    return subprocess.Popen([python, "-I", "-c", "from cbatch.emulator import momtasks; momtasks.task_child()",
                             plan["plan_file"], json.dumps(task)],
                            stdin=subprocess.DEVNULL, pass_fds=passed, close_fds=True)


def task_child() -> None:
    """Main of a TM task child (argv: plan file, task JSON): become ``[starter, argv...]`` as the user."""
    with open(sys.argv[1]) as fh:
        plan = json.load(fh)
    task = json.loads(sys.argv[2])
    out = task["stdout"] if task["stdout"] is not None else os.open(plan["stdout"], os.O_WRONLY | os.O_APPEND)
    err = task["stderr"] if task["stderr"] is not None else os.open(plan["stderr"], os.O_WRONLY | os.O_APPEND)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    for fd in {null, out, err} - {0, 1, 2}:
        os.close(fd)
    for tasks in plan["tasks"]:            # TORQUE cgroups: the task joins the job's cgroups
        with open(tasks, "w") as fh:
            fh.write(str(os.getpid()))
    os.setsid()
    _limits_and_ids(plan)
    env = task["env"]
    try:
        os.chdir(env.get("PBS_O_INITDIR") or env["HOME"])
    except OSError as exc:
        os.write(2, f"PBS: chdir to {env.get('PBS_O_INITDIR') or env['HOME']} failed: {exc.strerror}\n".encode())
        os._exit(254)
    try:
        os.execve(plan["starter"], [plan["starter"], *task["argv"]], env)
    except OSError as exc:
        os.write(2, f"PBS: {plan['starter']}: {exc.strerror}\n".encode())
        os._exit(254)
