"""``cbatch submit-filter``: a Torque SUBMITFILTER that checks ``#CBATCH`` directives at qsub time.

qsub (TORQUE 6.1, ``qsub_functions.c:get_script``) runs the filter named by ``SUBMITFILTER`` in torque.cfg
through ``popen()`` with qsub's own arguments appended (joined by spaces, so the shell splits them again),
writes the job script to the filter's stdin, and submits what the filter writes to stdout. A non-zero
exit status rejects the job; qsub then adds its own line ("submit filter returned an error code", or for
255 "administratively rejected"). The filter's stderr reaches the user's terminal.

This filter never changes the script: it reads it as bytes and writes the same bytes back (any encoding),
or - when a ``#CBATCH`` directive is malformed or the image (or network, or user mounts) is not allowed in
the job's queue - writes nothing, prints one ``cbatch: ...`` line on stderr and exits 1. The queue is qsub's
``-q`` (the last one), else ``#PBS -q`` in the script, else ``--default-queue`` (default ``batch``); a
``queue@server`` destination counts as its queue. The image follows the policy's precedence:
``CBATCH_IMAGE`` from ``-v``/``#PBS -v`` (or the environment with ``-V``) over ``#CBATCH --image`` over the
queue's default. The checks are the daemon's own (``directives``, ``config``, ``policy``): no Docker, no
daemon, so it runs on login nodes. It is a convenience, not a boundary: cbatchd checks again at job start.

If the site config cannot be read here, the job is let through with a warning (the daemon still checks):
a broken login-node config must not stop every submission.
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import List, Optional, Sequence, Tuple

# qsub's getopt string (TORQUE 6.1 qsub_functions.c GETOPT_ARGS): letters followed by ':' take a value.
QSUB_OPTSTRING = "a:A:b:c:C:d:D:e:EfF:hIj:J:k:l:m:M:nN:o:p:P:q:r:S:t:T:u:v:Vw:W:Xxz-:"
DEFAULT_CONFIG = "/etc/cbatch/cbatch.yaml"
DEFAULT_QUEUE = "batch"
EXIT_REJECT = 1


def _takes_value() -> set:
    return {c for i, c in enumerate(QSUB_OPTSTRING) if i + 1 < len(QSUB_OPTSTRING) and QSUB_OPTSTRING[i + 1] == ":"}


_VALUED = _takes_value()


def qsub_options(args: Sequence[str]) -> List[Tuple[str, str]]:
    """(letter, value) pairs in order, parsed like getopt (clusters ``-Vq batch``, ``-qbatch``, options after
    the script name because glibc getopt permutes); loose words (the script path) are skipped."""
    out: List[Tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            continue
        j = 1
        while j < len(arg):
            letter = arg[j]
            j += 1
            if letter in _VALUED:
                if j < len(arg):
                    value = arg[j:]
                elif i < len(args):
                    value = args[i]
                    i += 1
                else:
                    value = ""
                out.append((letter, value))
                break
            out.append((letter, ""))
    return out


def _split(text: str) -> List[str]:
    try:
        return shlex.split(text, comments=False)
    except ValueError:            # an unmatched quote: qsub would complain itself; take plain words
        return text.split()


def script_options(script: bytes, prefix: str) -> List[Tuple[str, str]]:
    """qsub's reading of ``#PBS`` lines (``get_script``): directives up to the first executable line (not
    blank, not a comment, not ``#!``, not starting with ``:``), leading blanks allowed, ``\\`` continues."""
    out: List[Tuple[str, str]] = []
    lines = script[:1 << 20].decode("latin-1").split("\n")
    n = 0
    while n < len(lines):
        line = lines[n].rstrip("\r")
        n += 1
        if line.startswith(":") or line.startswith("#!"):
            continue
        stripped = line.lstrip()
        if stripped.startswith(prefix):
            body = stripped[len(prefix):]
            while body.endswith("\\") and n < len(lines):
                body = body[:-1] + lines[n].rstrip("\r")
                n += 1
            out.extend(qsub_options(_split(body)))
            continue
        if stripped and not stripped.startswith("#"):
            break
    return out


def _queue_name(dest: str) -> Optional[str]:
    """``batch@server`` -> ``batch``; ``@server`` or empty -> None (the server's default queue)."""
    name = dest.split("@", 1)[0].strip()
    return name or None


def _variables(values: Sequence[str], export_all: bool) -> dict:
    """The job variables qsub would set from ``-v`` lists (``A=1,B``: B from the environment) and ``-V``."""
    env = dict(os.environ) if export_all else {}
    for value in values:
        for item in value.split(","):
            key, eq, val = item.partition("=")
            key = key.strip()
            if not key:
                continue
            if eq:
                env[key] = val.strip().strip('"').strip("'")
            elif key in os.environ:
                env[key] = os.environ[key]
    return env


class _JobView:
    """Just enough of a JobContext for :func:`cbatch.policy.choose_image` (it reads the job environment)."""

    def __init__(self, env: dict):
        self._env = env

    def env_dict(self) -> dict:
        return self._env


def check(script: bytes, qsub_args: Sequence[str], config, default_queue: str = DEFAULT_QUEUE) -> str:
    """Raise the DirectiveError/PolicyError the daemon would raise for this script in its queue; return
    the queue name checked. ``config`` is a loaded SiteConfig."""
    from cbatch import policy as pol
    from cbatch.directives import parse_script

    cmdline = qsub_options(qsub_args)
    prefix = os.environ.get("PBS_DPREFIX") or "#PBS"
    for letter, value in cmdline:
        if letter == "C":
            prefix = value
    in_script = script_options(script, prefix) if prefix else []
    queue = None
    for letter, value in in_script + cmdline:          # the command line overrides the script, last wins
        if letter == "q":
            queue = _queue_name(value)
    queue = queue or default_queue

    directives = parse_script(script)
    both = in_script + cmdline
    env = _variables([v for l, v in both if l == "v"], any(l == "V" for l, _ in both))
    policy = config.queue(queue)
    image, source = pol.choose_image(policy, _JobView(env), directives)
    pol.check_image(policy, queue, image, source)
    if image != "native":
        from cbatch.errors import PolicyError
        network = directives.network or policy.network
        if network not in policy.networks:
            raise PolicyError("network", f"not allowed in queue {queue}", network,
                              "allowed: " + ", ".join(policy.networks))
        if directives.mounts and not policy.user_mounts.allowed:
            m = directives.mounts[0]
            raise PolicyError(f"directive line {m.line}", f"user mounts are not allowed in queue {queue}",
                              f"{m.source}:{m.target}", "ask your admin, or copy the data into your home")
    return queue


def run(argv: Sequence[str], stdin, stdout, stderr) -> int:
    """The filter. ``argv``: ``[--config FILE] [--default-queue Q] [--] <qsub's arguments>``."""
    config_path, default_queue = DEFAULT_CONFIG, DEFAULT_QUEUE
    args = list(argv)
    while args and args[0] in ("--config", "--default-queue") and len(args) >= 2:
        if args[0] == "--config":
            config_path = args[1]
        else:
            default_queue = args[1]
        del args[:2]
    if args and args[0] == "--":
        del args[0]

    script = stdin.read()                  # all of it: what goes back must be byte-identical
    from cbatch.errors import CbatchError, ConfigError, DirectiveError, PolicyError

    try:
        from cbatch import config as cfg
        config = cfg.load(config_path)
    except ConfigError as exc:
        stderr.write(f"{exc.message} [cbatch submit-filter: job not checked]\n".encode("utf-8", "replace"))
        stdout.write(script)
        return 0
    try:
        check(script, args, config, default_queue)
    except (DirectiveError, PolicyError) as exc:
        stderr.write((exc.message + "\n").encode("utf-8", "replace"))
        return EXIT_REJECT
    except CbatchError as exc:              # anything else is cbatch's problem, not the user's
        stderr.write(f"{exc.message} [cbatch submit-filter: job not checked]\n".encode("utf-8", "replace"))
    stdout.write(script)
    return 0


WRAPPER = """#!{python} -IS
# cbatch SUBMITFILTER for torque.cfg ("SUBMITFILTER {path}"). Generated by
#   {python} -m cbatch.submitfilter --install {path}
# -I -S and a fixed sys.path: no site processing and nothing from the user's environment, so it starts
# fast (qsub runs it for every submission) and a user's PYTHONPATH cannot change what it imports.
import sys
sys.path[:0] = {paths!r}
from cbatch.submitfilter import main
sys.exit(main(["--config", {config!r}, "--default-queue", {queue!r}, "--"] + sys.argv[1:]))
"""


def install(path: str, config_path: str = DEFAULT_CONFIG, default_queue: str = DEFAULT_QUEUE) -> str:
    """Write the torque.cfg SUBMITFILTER wrapper at ``path`` (0755) for this interpreter; return its text."""
    import site
    import sysconfig

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [here]
    for p in [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]:
        if p not in paths and os.path.isdir(p):
            paths.append(p)
    text = WRAPPER.format(python=sys.executable, path=path, paths=paths, config=config_path, queue=default_queue)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m cbatch.submitfilter [--config F] [--default-queue Q] -- QSUB_ARGS...``, or
    ``python -m cbatch.submitfilter --install PATH [--config F] [--default-queue Q]`` to write the wrapper."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--install"] and len(argv) >= 2:
        opts = dict(zip(argv[2::2], argv[3::2]))
        install(argv[1], opts.get("--config", DEFAULT_CONFIG), opts.get("--default-queue", DEFAULT_QUEUE))
        print(f"cbatch: submit-filter: wrote {argv[1]}; add to torque.cfg: SUBMITFILTER {argv[1]}")
        return 0
    status = run(argv, sys.stdin.buffer, sys.stdout.buffer, sys.stderr.buffer)
    sys.stdout.buffer.flush()
    return status


def command(args) -> int:
    """The ``cbatch submit-filter`` route (cli.py): same as :func:`main`."""
    extra: List[str] = []
    if getattr(args, "config", None):
        extra += ["--config", args.config]
    qsub_args = list(getattr(args, "qsub_args", None) or [])
    return main(extra + ["--"] + (qsub_args[1:] if qsub_args[:1] == ["--"] else qsub_args))


if __name__ == "__main__":
    sys.exit(main())
