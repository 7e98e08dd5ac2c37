"""``cbatch install-hooks``: write the tiny shims pbs_mom runs, with the modes pbs_mom demands.

pbs_mom runs ``mom_priv/prologue`` and ``mom_priv/epilogue`` as root with ``PATH=/bin:/usr/bin`` and a
minimal environment, and refuses (requeues the job, forever) any hook that is not a root-owned regular file,
u+rx, not group- or world-writable. The ``$job_starter`` runs as the job user. So every shim names the venv's
interpreter by absolute path (``sys.executable``: never whatever ``python3`` the PATH finds), runs it with
``-I`` (no PYTHONPATH, no user site: a user's environment must not inject code into a root hook), and bakes
the daemon's socket path in, because the hooks get no config file or option from pbs_mom.

The functions here are reused by :mod:`cbatch.emulator.local` to install the same shims into its own mom_priv.
Stdlib only.
"""

from __future__ import annotations

import os
import stat
import sys
from typing import Dict, List, Optional

from cbatch.clients import cclient, client
from cbatch.core.errors import CbatchError, ConfigError

DEFAULT_CONFIG = "/etc/cbatch/cbatch.yaml"
HOOK_MODE = 0o500          # root-owned, u+rx only: what pbs_mom accepts, nothing anyone else can change
STARTER_MODE = 0o755       # the starter runs as the job user: everyone must be able to exec it
MARKER = "# written by cbatch install-hooks"

# What each shim runs: (module, call, exit status if cbatch cannot even be imported). The socket path is
# substituted with repr() so that no path can break out of the string literal. A broken install must not
# turn into prologue exit 1 (job aborted, no output) or a traceback: hooks exit 0, the starter 125.
_CALLS = {
    "prologue": ("hooks", "hooks.prologue_main(sys.argv[1:], socket_path={sock})", 0),
    "epilogue": ("hooks", "hooks.epilogue_main(sys.argv[1:], socket_path={sock})", 0),
    "job_starter": ("starter", "starter.main(socket_path={sock})", 125),
}
_TEMPLATE = """import sys
try:
    from cbatch.clients import {module}
except BaseException as exc:
    sys.stderr.write("cbatch: {kind}: cannot load cbatch: %s (cbatch check --node)\\n" % exc)
    sys.exit({status})
sys.exit({call})
"""


def interpreter() -> str:
    """The absolute interpreter path for the shebang: this venv's python, unresolved (a resolved symlink
    would lose the venv and with it the cbatch package)."""
    exe = sys.executable
    if not exe or not os.path.isabs(exe):
        raise CbatchError("install-hooks", "cannot tell which python runs cbatch", exe or None,
                          "run install-hooks with the venv's python or its cbatch script")
    return exe


def c_shim_text(kind: str, socket_path: str, client_path: str) -> str:
    """A shim run by the static C client: ``#!<client> shim`` and its ``role`` and ``socket`` lines."""
    if not os.path.isabs(client_path) or any(c.isspace() for c in client_path):
        raise CbatchError("install-hooks", "the C client is not an absolute path without blanks", client_path,
                          "--client /usr/libexec/cbatch/cbatch-client")
    if "\n" in socket_path or "\0" in socket_path or len(socket_path.encode()) > 1000:
        raise CbatchError("install-hooks", "socket path unusable in a shim", socket_path)
    return (f"#!{client_path} shim\n{MARKER} ({kind}); do not edit, re-run it instead.\n"
            f"role {kind}\nsocket {socket_path}\n")


def shim_text(kind: str, socket_path: str, python: Optional[str] = None, client_path: Optional[str] = None) -> str:
    """The shim's full text for ``kind`` in prologue | epilogue | job_starter: run by the C client at
    ``client_path`` when given, else by the Python reference client."""
    if client_path:
        return c_shim_text(kind, socket_path, client_path)
    python = python or interpreter()
    if any(c.isspace() for c in python):
        # The kernel splits the shebang at the first blank: such an interpreter path cannot work.
        raise CbatchError("install-hooks", "interpreter path contains whitespace", python)
    module, call, status = _CALLS[kind]
    return (f"#!{python} -I\n{MARKER} ({kind}); do not edit, re-run it instead.\n"
            + _TEMPLATE.format(module=module, kind=kind, status=status, call=call.format(sock=repr(socket_path))))


def write_file(path: str, text: str, mode: int, uid: int = 0, gid: int = 0) -> None:
    """Write ``path`` atomically (temp file + rename) with owner and mode set before it appears."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.cbatch-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            os.fchown(fh.fileno(), uid, gid)
            os.fchmod(fh.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def install(mom_priv: str, libexec: str, socket_path: str, python: Optional[str] = None,
            client_path: Optional[str] = None) -> Dict[str, str]:
    """Write prologue and epilogue into ``mom_priv`` and job_starter into ``libexec``; return their paths.
    With ``client_path`` the shims run the static C client, else the Python one."""
    paths = {"prologue": os.path.join(mom_priv, "prologue"), "epilogue": os.path.join(mom_priv, "epilogue"),
             "job_starter": os.path.join(libexec, "job_starter")}
    os.makedirs(libexec, mode=0o755, exist_ok=True)
    for kind, path in paths.items():
        _refuse_foreign(path)
    for kind, path in paths.items():
        mode = STARTER_MODE if kind == "job_starter" else HOOK_MODE
        write_file(path, shim_text(kind, socket_path, python, client_path), mode)
    return paths


def install_starter(libexec: str, socket_path: str, python: Optional[str] = None) -> str:
    """Write only ``libexec/job_starter`` (PBS: the hooks replace prologue and epilogue); its path."""
    path = os.path.join(libexec, "job_starter")
    os.makedirs(libexec, mode=0o755, exist_ok=True)
    _refuse_foreign(path)
    write_file(path, shim_text("job_starter", socket_path, python), STARTER_MODE)
    return path


def _refuse_foreign(path: str) -> None:
    """Never overwrite a hook the site wrote itself (a prologue may do site work we cannot redo)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CbatchError("install-hooks", "cannot read the existing hook", path, exc.strerror) from exc
    if MARKER.encode() not in head:
        raise CbatchError("install-hooks", "refusing to replace a hook cbatch did not write", path,
                          "move it aside (e.g. to prologue.site), install, then call it from a wrapper")


def config_lines(libexec: str) -> List[str]:
    """The lines mom_priv/config needs (install-hooks writes them: :func:`write_mom_config`)."""
    return [f"$job_starter {os.path.join(libexec, 'job_starter')}"]


# pbs_mom reads mom_priv/config only when it starts: `momctl -r` needs a file argument and is not a restart.
RESTART_HINT = "momctl -s; then start pbs_mom again (e.g. systemctl restart pbs_mom, or run pbs_mom)"


def write_mom_config(path: str, libexec: str) -> bool:
    """Make ``path`` (mom_priv/config) hold exactly one ``$job_starter`` line, ours; return True if changed.

    Idempotent: running it twice leaves one line. An existing ``$job_starter`` line naming another program
    is replaced (pbs_mom uses only one), every other line is kept byte for byte. Written atomically with
    the file's owner and mode (root, 0644 when the file is new)."""
    wanted = config_lines(libexec)
    try:
        st = os.stat(path)
        with open(path, "rb") as fh:
            old = fh.read(1 << 20).decode("utf-8", "surrogateescape")
        uid, gid, mode = st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)
    except FileNotFoundError:
        old, uid, gid, mode = "", 0, 0, 0o644
    except OSError as exc:
        raise CbatchError("install-hooks", "cannot read the mom config", path, exc.strerror) from exc
    kept, placed = [], False
    for line in old.splitlines():
        if line.split(None, 1)[:1] == ["$job_starter"]:
            if not placed:
                kept.extend(wanted)
                placed = True
            continue
        kept.append(line)
    if not placed:
        kept.extend(wanted)
    text = "\n".join(kept) + "\n"
    if text == old:
        return False
    write_file(path, text, mode, uid, gid)
    return True


def hook_problems(path: str, kind: str, python: Optional[str] = None) -> List[str]:
    """Why pbs_mom (or cbatch) would refuse the shim at ``path``; empty when it is fine.

    Used by ``cbatch check --node``. Mirrors pbs_mom's rule (root-owned regular file, u+rx, not g/o
    writable) and checks that the shebang names an interpreter that exists.
    """
    try:
        st = os.lstat(path)
    except OSError as exc:
        return [f"missing ({exc.strerror})"]
    problems = []
    if not stat.S_ISREG(st.st_mode):
        problems.append("not a regular file")
    if st.st_uid != 0:
        problems.append(f"owned by uid {st.st_uid}, not root")
    if st.st_mode & 0o500 != 0o500:
        problems.append(f"mode {stat.S_IMODE(st.st_mode):04o} lacks u+rx")
    if st.st_mode & 0o022:
        problems.append(f"mode {stat.S_IMODE(st.st_mode):04o} is group- or world-writable")
    if kind == "job_starter" and st.st_mode & 0o005 != 0o005:
        problems.append(f"mode {stat.S_IMODE(st.st_mode):04o}: job users cannot execute it")
    try:
        with open(path, "rb") as fh:
            first = fh.readline(4096).decode("utf-8", "replace").strip()
    except OSError as exc:
        return problems + [f"unreadable ({exc.strerror})"]
    if not first.startswith("#!"):
        problems.append("no #! line")
    else:
        exe = first[2:].split()[0] if first[2:].split() else ""
        if not os.path.isabs(exe) or not os.access(exe, os.X_OK):
            problems.append(f"interpreter {exe!r} is not an absolute executable path")
        elif first.endswith(" shim") and os.path.basename(exe) == cclient.CLIENT_NAME:
            problem = cclient.unsafe(exe)     # the C client's shim: the client runs as root for the hooks
            if problem:
                problems.append(f"C client {exe}: {problem}")
        elif python and exe != python:
            problems.append(f"interpreter {exe} is not this cbatch's {python}")
    return problems


def _socket_from_config() -> str:
    """The daemon socket from the site config, or the default when the config cannot be read."""
    try:
        from cbatch.core import config as config_mod
        cfg = config_mod.load(DEFAULT_CONFIG)
        return cfg.daemon.socket
    except (ImportError, AttributeError, OSError, CbatchError):
        return client.DEFAULT_SOCKET


def command(args) -> int:
    """Entry point of ``cbatch install-hooks``."""
    if os.geteuid() != 0:
        raise CbatchError("install-hooks", "must run as root", os.geteuid(),
                          "pbs_mom only accepts root-owned hooks")
    socket_path = getattr(args, "socket", None) or _socket_from_config()
    if getattr(args, "pbs", False):
        from cbatch.admin import pbshooks      # OpenPBS / PBS Pro: qmgr-imported hooks, no mom_priv files
        python = interpreter()
        return pbshooks.command(args, socket_path, python,
                                lambda: install_starter(args.libexec, socket_path, python),
                                getattr(args, "config", None) or DEFAULT_CONFIG)
    if not args.mom_priv:
        home = os.environ.get("PBS_HOME") or os.environ.get("TORQUE_HOME") or "/var/spool/torque"
        args.mom_priv = os.path.join(home, "mom_priv")
    if not os.path.isdir(args.mom_priv):
        raise ConfigError(args.mom_priv, "", "mom_priv directory not found", None,
                          "pass --mom-priv /var/spool/torque/mom_priv (or your TORQUE_HOME/mom_priv)")
    client_path = cclient.choose(getattr(args, "hooks", None), getattr(args, "client", None), args.libexec)
    if client_path == "":
        raise CbatchError("install-hooks", "no C client found", os.path.join(args.libexec, cclient.CLIENT_NAME),
                          "make -C libexec install, pass --client PATH, or --hooks python")
    problem = cclient.unsafe(client_path) if client_path else None
    if problem:
        raise CbatchError("install-hooks", "the C client is unsafe for root hooks", f"{client_path}: {problem}",
                          "install it root-owned, mode 0755 (make -C libexec install)")
    paths = install(args.mom_priv, args.libexec, socket_path, client_path=client_path)
    for kind, path in paths.items():
        print(f"installed {kind}: {path} ({client_path or 'python'})", file=sys.stderr)
    mom_config = getattr(args, "mom_config", None) or os.path.join(args.mom_priv, "config")
    if getattr(args, "no_mom_config", False):
        print("# add to mom_priv/config, then restart pbs_mom:", RESTART_HINT)
        for line in config_lines(args.libexec):
            print(line)
        return 0
    changed = write_mom_config(mom_config, args.libexec)
    state = "written" if changed else "already there"
    print(f"{mom_config}: {config_lines(args.libexec)[0]} ({state})", file=sys.stderr)
    if changed:
        print(f"restart pbs_mom to use it: {RESTART_HINT}", file=sys.stderr)
    return 0
