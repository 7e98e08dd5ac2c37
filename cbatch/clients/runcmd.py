"""``cbatch run``: run one command in a container from inside a job, as if it ran directly.

The client side only: it sends what the caller asked for (the command, the ``cbatch run`` options as
written, cwd, environment) and its own stdin/stdout/stderr to cbatchd, then sits in the shared
:func:`cbatch.clients.client.run_session` loop until the container exits. Everything that matters is decided by the
daemon: which job the caller belongs to (its Torque session or its Slurm cgroup, read from /proc on the
server side), whether the image and options are allowed, the identity and the cgroup parent. That is why a
user-chosen ``--socket`` or ``CBATCH_SOCKET`` is harmless: a fake daemon could only lie to its own caller.

Behaviour the caller can rely on:
- stdin, stdout and stderr are the caller's own descriptors (pipes, files, terminals), passed to the daemon
  with SCM_RIGHTS, so bytes flow live and unmodified and interactive stdin works;
- the exit status is the command's (128+N when a signal killed it); a cbatch failure is one line on stderr
  and status 125/126/127;
- when the daemon answers "native" (a native queue and no ``--image``) the command is exec'ed directly;
- SIGINT, SIGTERM, SIGHUP (and USR1/USR2/CONT) are forwarded to the container; if ``cbatch run`` itself is
  SIGKILLed the daemon sees the connection close and removes the container.

Stdlib only (runs inside every job that uses it): imports cbatch.clients.client, cbatch.protocol, cbatch.core.errors.
"""

from __future__ import annotations

import os
import signal
from typing import List

from cbatch import protocol
from cbatch.clients import client
from cbatch.core.errors import EXIT_CANNOT_INVOKE, EXIT_NOT_FOUND, DirectiveError, JobError



def options_of(args) -> List[str]:
    """The ``cbatch run`` options back as ``--opt=value`` words.

    The daemon parses them itself (``directives.parse_options``) with the same rules as ``#CBATCH`` lines,
    so the client never interprets an option and cannot disagree with the server about what it means.
    """
    out: List[str] = []
    if args.image is not None:
        out.append(f"--image={args.image}")
    out.extend(f"--mount={m}" for m in args.mount)
    out.extend(f"--env={e}" for e in args.env)
    if args.workdir is not None:
        out.append(f"--workdir={args.workdir}")
    if args.network is not None:
        out.append(f"--network={args.network}")
    if args.readonly:
        out.append("--readonly")
    if args.entrypoint:
        out.append("--entrypoint")
    return out


def command_of(args) -> List[str]:
    """The user's command: everything after the options, without a leading ``--``."""
    cmd = list(args.cmd or [])
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise DirectiveError("cbatch run", "no command given", None,
                             "usage: cbatch run [--image IMG] [options] [--] CMD [ARGS...]")
    return cmd


def _std_fds() -> List[int]:
    """fds 0, 1, 2 to send; a closed one is replaced by /dev/null (SCM_RIGHTS cannot carry a hole)."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
    return fds


def exec_native(cmd: List[str], pending) -> None:
    """The daemon said "native" (the job's queue runs without containers and no --image was given): run the
    command directly, exactly as if ``cbatch run`` were not there - same process, fds, cwd, environment."""
    for sig in pending:
        if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            # A signal that arrived while we were asking the daemon ends us as it would have ended CMD.
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
    client.exec_dispositions()
    try:
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        err = JobError("cbatch run", "cannot run the command", f"{cmd[0]}: {exc.strerror}")
        err.exit_code = EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_CANNOT_INVOKE
        raise err from exc


def command(args) -> int:
    """Entry point of ``cbatch run`` (routed from cli.py); returns the command's exit status."""
    cmd = command_of(args)
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = os.environ.get("PWD", "/")
    req = protocol.request("run", argv=cmd, options=options_of(args), cwd=cwd,
                           env=protocol.env_pairs(os.environ.items()))
    return client.run_session(client.socket_path(args.socket), req, _std_fds(),
                              on_native=lambda pending: exec_native(cmd, pending))
