"""``cbatch local``: run a job script on this node the way pbs_mom would, through the real hooks and daemon.

It reads the script as ``qsub`` would (our ``-q/-l/-N/-v`` play qsub's command line), submits it to a
:class:`cbatch.emulator.local.Mom` in a fresh TORQUE-like tree, waits, copies the job's .o/.e bytes to our
stdout/stderr and exits with the job's status in the shell's convention. It runs as root (it plays pbs_mom);
a job of another user never receives root's environment (:func:`submit_environ`).
"""

from __future__ import annotations

import os
import pwd
import sys

from cbatch.admin import install
from cbatch.core import qsubopts
from cbatch.core.errors import CbatchError, JobError
from cbatch.emulator import momproc
from cbatch.emulator.local import Mom

DEFAULT_QUEUE = "batch"   # cbatch local's queue when neither -q nor the script's #PBS -q names one


def _socket_path(args) -> str:
    if getattr(args, "socket", None):
        return args.socket
    return install._socket_from_config()


def submit_environ(job_uid: int, environ=None) -> dict:
    """The environment ``-V`` and ``-v NAME`` (without a value) copy from, as qsub would from its caller's.

    ``cbatch local`` runs as root; a job for another user must never receive root's environment (sudo
    keeps tokens, cloud credentials, SSH agents): then these copy nothing and only ``-v NAME=value`` sets a
    variable. A job of root itself gets root's environment, as qsub run by root would give it.
    """
    environ = os.environ if environ is None else environ
    return dict(environ) if job_uid == os.geteuid() else {}


def _request(script: bytes, args, environ) -> qsubopts.QsubRequest:
    """Read the script as qsub would, our ``-q/-l/-N/-v`` playing qsub's command line (so they win)."""
    qsub_args = [] if args.queue is None else ["-q", args.queue]
    qsub_args += [w for value in args.resources for w in ("-l", value)]
    qsub_args += [w for value in args.variables for w in ("-v", value)]
    qsub_args += [] if args.name is None else ["-N", args.name]
    return qsubopts.read(script, qsub_args, environ, default_queue=DEFAULT_QUEUE)


def command(args) -> int:
    """``cbatch local``: run SCRIPT through this node's daemon as pbs_mom would; exit with its status.

    The job's stdout and stderr are copied to ours after it ends. The exit status follows the shell's
    convention: a job killed by signal N (TORQUE's 256+N) exits 128+N; a job the prologue aborted or kept
    requeueing exits 125 after one line on stderr.
    """
    if os.geteuid() != 0:
        raise CbatchError("cbatch local", "must run as root (it plays pbs_mom: runs the root prologue and "
                          "starts the job as its user)", os.geteuid(), "sudo cbatch local --user USER SCRIPT")
    user = args.user or os.environ.get("SUDO_USER")
    if not user:
        raise CbatchError("cbatch local", "no job user", None, "pass --user USER")
    try:
        with open(args.script, "rb") as fh:
            script = fh.read()
    except OSError as exc:
        raise JobError("job script", "cannot read", f"{args.script}: {exc.strerror}") from exc
    try:
        job_uid = pwd.getpwnam(user).pw_uid
    except KeyError as exc:
        raise CbatchError("cbatch local", "unknown user", user, "pass --user USER of this host") from exc
    request = _request(script, args, submit_environ(job_uid))
    import tempfile
    root = tempfile.mkdtemp(prefix="cbatch-local-", dir="/var/spool" if os.path.isdir("/var/spool") else None)
    try:
        mom = Mom(root, _socket_path(args))
        job = mom.submit(script, user, queue=request.queue, resources=request.resource_list or "nodes=1:ppn=1",
                         variables=request.variables, shell=request.shell, args=list(args.args),
                         name=request.name or os.path.basename(args.script)[:15], workdir=os.getcwd(),
                         tmpdir=True)
        result = job.wait(timeout=10 ** 9)
    finally:
        momproc.remove_tree(root)
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr)
    sys.stderr.flush()
    if result.exit_status is None or result.exit_status < 0:
        print(f"cbatch: local: job {result.job_id} did not run: prologue exited {result.prologue_status}",
              file=sys.stderr)
        return 125
    return 128 + (result.exit_status - 256) if result.exit_status > 256 else result.exit_status % 256
