"""The Torque ``$job_starter``: pbs_mom runs ``<starter> <shell>`` with the job's one stdin line.

What it does, in order:

1. argv must be exactly ``[starter, shell]``; the stdin line (``<script> [args]\\n``) is read up to the
   first newline (pbs_mom writes nothing else on that pipe). pbs_mom also starts interactive jobs (stdin a
   terminal) and TM tasks (argv the task's command) through us: :func:`start_kind` tells them apart, the
   daemon authorises each from /proc (:mod:`cbatch.daemon.tasks`).
2. With ``$job_starter_run_privileged`` we start as root: drop to the owner of the script named in the line
   (never root) before anything else.
3. Send ``start`` to cbatchd with what we saw (argv, line, cwd, environment) and our fds 0, 1, 2. The daemon
   decides everything else from its own config and the registered job.
4. ``native``: rebuild stdin as a pipe holding exactly the line and exec the shell - the job then runs as if
   cbatch were not installed. Otherwise the daemon started a container: forward signals to it, print any
   message from the daemon on stderr (the job's .e file) and exit with the script's status.

qdel: pbs_mom sends SIGTERM to the starter (and everything in the session). We forward it; the daemon stops
the container (TERM, then KILL after ``daemon.stop_grace``), and once the container is gone we reset the
handler and re-raise SIGTERM on ourselves, so Torque records exit_status 271 exactly as for a job without
cbatch killed by qdel.

Stdlib only and small: this process lives for the whole of every job on the node. It imports only
cbatch.core.errors, cbatch.protocol and cbatch.clients.client.
"""

from __future__ import annotations

import os
import signal
import sys

from cbatch import protocol
from cbatch.clients import client
from cbatch.core.errors import EXIT_CANNOT_INVOKE, EXIT_CBATCH, EXIT_NOT_FOUND, CbatchError, JobError

MAX_LINE = 60 * 1024    # the native path writes the line into a pipe before exec: it must fit the buffer


def read_line(fd: int = 0) -> bytes:
    """Read pbs_mom's stdin line (up to and including the first newline, or EOF)."""
    buf = bytearray()
    while b"\n" not in buf:
        try:
            chunk = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_LINE:
            raise JobError("job starter", "stdin line too long", f"{len(buf)} bytes", f"at most {MAX_LINE}")
    end = buf.find(b"\n")
    return bytes(buf[:end + 1] if end >= 0 else buf)


def drop_privileges(line: str) -> None:
    """Running as root (``$job_starter_run_privileged``): become the owner of the job script."""
    import pwd

    script = line.split()[0] if line.split() else ""
    try:
        st = os.stat(script)
    except OSError as exc:
        raise JobError("job starter", "cannot find the job script", script or line.strip()) from exc
    if st.st_uid == 0:
        raise JobError("job starter", "refusing to run a job as root", script,
                       "the job script is owned by root")
    try:
        pw = pwd.getpwuid(st.st_uid)
    except KeyError as exc:
        raise JobError("job starter", "unknown owner of the job script", st.st_uid) from exc
    os.setgroups(os.getgrouplist(pw.pw_name, pw.pw_gid))
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    if os.getresuid() != (pw.pw_uid,) * 3 or os.getresgid() != (pw.pw_gid,) * 3:
        raise JobError("job starter", "could not drop privileges", pw.pw_name)


def exec_native(shell: str, line: bytes, pending) -> None:
    """Run the job as if there were no cbatch: the shell reads exactly the line from a fresh stdin pipe."""
    r, w = os.pipe()
    os.write(w, line)
    os.close(w)
    os.dup2(r, 0)
    os.close(r)
    if signal.SIGTERM in pending:
        # qdel arrived while we were asking the daemon: die as the job would have.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    client.exec_dispositions()
    try:
        os.execv(shell, [shell])
    except OSError as exc:
        code = EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_CANNOT_INVOKE
        err = JobError("job starter", "cannot run the shell", f"{shell}: {exc.strerror}")
        err.exit_code = code
        raise err from exc


def start_kind(argv, fd: int = 0) -> str:
    """What pbs_mom is starting through us, from what it handed us (the daemon checks it against /proc):

    - ``interactive`` (``qsub -I``): stdin is the job's terminal and PBS_ENVIRONMENT=PBS_INTERACTIVE;
      argv ``[starter, shell]`` or ``[starter, shell, -c, cmd]`` (``qsub -I -x``).
    - ``batch``: argv ``[starter, shell]`` and stdin the pipe carrying the script line.
    - ``task`` (TM spawn: pbsdsh, mpiexec): anything else - argv is the task's own command, stdin
      /dev/null or a TM socket.
    """
    import stat
    try:
        st = os.fstat(fd)
    except OSError:
        st = None
    if st is not None and os.isatty(fd) and os.environ.get("PBS_ENVIRONMENT") == "PBS_INTERACTIVE":
        return "interactive"
    if len(argv) == 2 and argv[1].startswith("/") and st is not None and stat.S_ISFIFO(st.st_mode):
        return "batch"
    return "task"


def exec_argv(argv, pending, login: bool) -> None:
    """Become ``argv`` (an interactive shell or a TM task) natively, as pbs_mom would have without us."""
    if signal.SIGTERM in pending:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    prog = argv[0]
    # pbs_mom runs an interactive shell as a login shell ("-bash") when it has no job starter.
    arg0 = "-" + os.path.basename(prog) if login else prog
    client.exec_dispositions()
    try:
        if "/" in prog:
            os.execv(prog, [arg0] + list(argv[1:]))
        os.execvp(prog, [arg0] + list(argv[1:]))      # pbs_mom's TM spawn uses execvp
    except OSError as exc:
        code = EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_CANNOT_INVOKE
        err = JobError("job starter", "cannot run", f"{prog}: {exc.strerror}")
        err.exit_code = code
        raise err from exc


def run(socket_path: str, argv) -> int:
    """The starter's work; returns the exit status (raises CbatchError)."""
    if len(argv) < 2:
        raise JobError("job starter", "expected the shell or the command to start", "(none)",
                       "configure it as $job_starter in mom_priv/config")
    if argv[1] == PBS_EXEC:
        return run_pbs_exec(socket_path, argv)
    kind = start_kind(argv)
    if kind != "batch":
        return run_other(socket_path, argv, kind)
    shell = argv[1]
    raw = read_line(0)
    line = raw.decode("utf-8", "surrogateescape")
    if os.geteuid() == 0:
        drop_privileges(line)
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = os.environ.get("PWD", "/")
    req = protocol.request("start", argv=list(argv), line=line, cwd=cwd,
                           env=protocol.env_pairs(os.environ.items()))
    return client.run_session(socket_path, req, (0, 1, 2),
                              on_native=lambda pending: exec_native(shell, raw, pending), reraise_term=True)


def run_other(socket_path: str, argv, kind: str) -> int:
    """An interactive job or a TM task: no stdin line; the daemon decides container or native."""
    if not argv[1]:
        raise JobError("job starter", "empty command", "(empty)")
    if kind == "interactive" and not argv[1].startswith("/"):
        raise JobError("job starter", "the shell is not an absolute path", argv[1])
    if os.geteuid() == 0:
        raise JobError("job starter", "refusing to start an interactive job or TM task as root", argv[1],
                       "$job_starter_run_privileged is not supported for them")
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = os.environ.get("PWD", "/")
    req = protocol.request("start", kind=kind, argv=list(argv), line="", cwd=cwd,
                           env=protocol.env_pairs(os.environ.items()))
    login = kind == "interactive" and len(argv) == 2
    return client.run_session(socket_path, req, (0, 1, 2),
                              on_native=lambda pending: exec_argv(argv[1:], pending, login),
                              reraise_term=True)


PBS_EXEC = "--pbs-exec"     # cbatch's PBS launch hook: [starter, --pbs-exec, prog, args...] for `qsub -- prog`


def run_pbs_exec(socket_path: str, argv) -> int:
    """PBS ``qsub -- prog args``: the job's own program, given as argv (no script, no stdin line). The
    starter is the job's session leader as for a batch job; the daemon decides container or native."""
    if len(argv) < 3 or not argv[2]:
        raise JobError("job starter", "--pbs-exec without a program", "(none)")
    if os.geteuid() == 0:
        raise JobError("job starter", "refusing to start a job as root", argv[2])
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = os.environ.get("PWD", "/")
    req = protocol.request("start", kind="exec", argv=list(argv), line="", cwd=cwd,
                           env=protocol.env_pairs(os.environ.items()))
    return client.run_session(socket_path, req, (0, 1, 2),
                              on_native=lambda pending: exec_argv(argv[2:], pending, False), reraise_term=True)


def main(socket_path: str = client.DEFAULT_SOCKET) -> None:
    """Entry point for the shim install-hooks writes; exits the process with the job's status."""
    try:
        status = run(socket_path, sys.argv)
    except CbatchError as exc:
        _say(exc.message)
        status = exc.exit_code
    except Exception as exc:    # never a traceback in a user's .e file without the one-line summary
        _say(f"cbatch: job starter: internal error: {type(exc).__name__}: {exc}")
        status = EXIT_CBATCH
    sys.exit(status)


def _say(text: str) -> None:
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except OSError:
        pass


if __name__ == "__main__":
    main(sys.argv.pop(1) if len(sys.argv) > 2 else client.DEFAULT_SOCKET)
