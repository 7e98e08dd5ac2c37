"""``cbatch check --node``: is this node ready to run cbatch jobs? One line per check, OK or FAIL.

Checks, in the order a broken node would fail a job: the site config loads (as the daemon would load it),
cbatchd answers on its socket, the engine answers (as seen by the daemon, or directly when the daemon is
down and we are root), the pbs_mom hooks and the job starter are installed with the modes pbs_mom demands
and name an interpreter that exists, mom_priv/config points ``$job_starter`` at our starter, and the
in-container helper is present, root-owned and statically linked (it runs inside arbitrary images, which
may have no libc at all). Exit status 1 if anything FAILed.
"""

from __future__ import annotations

import os
import stat
import struct
import sys
from typing import Callable, Optional, Tuple

from cbatch.admin import install
from cbatch.core.errors import CbatchError

DEFAULT_MOM_PRIV = "/var/spool/torque/mom_priv"
DEFAULT_STARTER = "/usr/libexec/cbatch/job_starter"
PT_INTERP = 3


def elf_is_static(path: str) -> Tuple[bool, str]:
    """(True, "") for an ELF executable without a PT_INTERP program header, else (False, why)."""
    try:
        with open(path, "rb") as fh:
            ident = fh.read(64)
            if len(ident) < 64 or ident[:4] != b"\x7fELF":
                return False, "not an ELF file"
            is64, little = ident[4] == 2, ident[5] == 1
            end = "<" if little else ">"
            if is64:
                phoff, = struct.unpack(end + "Q", ident[32:40])
                phentsize, phnum = struct.unpack(end + "HH", ident[54:58])
            else:
                phoff, = struct.unpack(end + "I", ident[28:32])
                phentsize, phnum = struct.unpack(end + "HH", ident[42:46])
            for i in range(phnum):
                fh.seek(phoff + i * phentsize)
                p_type, = struct.unpack(end + "I", fh.read(4))
                if p_type == PT_INTERP:
                    return False, "dynamically linked (has an ELF interpreter)"
    except OSError as exc:
        return False, exc.strerror or str(exc)
    except struct.error:
        return False, "truncated ELF header"
    return True, ""


def _starter_from_mom_config(mom_priv: str) -> Tuple[Optional[str], str]:
    """The ``$job_starter`` path configured in mom_priv/config (None when absent)."""
    path = os.path.join(mom_priv, "config")
    try:
        with open(path) as fh:
            for line in fh:
                words = line.split()
                if len(words) >= 2 and words[0] == "$job_starter":
                    return words[1], path
    except OSError as exc:
        return None, f"{path}: {exc.strerror}"
    return None, f"{path}: no $job_starter line"


class _Report:
    def __init__(self, out) -> None:
        self.out, self.failed = out, 0

    def line(self, ok: bool, what: str, detail: str) -> bool:
        self.failed += 0 if ok else 1
        self.out.write(f"{'OK  ' if ok else 'FAIL'} {what}: {detail}\n")
        return ok

    def run(self, what: str, check: Callable[[], Tuple[bool, str]]) -> bool:
        try:
            ok, detail = check()
        except CbatchError as exc:
            ok, detail = False, exc.message
        except Exception as exc:  # noqa: BLE001 - a check that crashes is a FAIL line, not a traceback
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        return self.line(ok, what, detail)


def run_checks(config_path: str, mom_priv: str, out=sys.stdout) -> int:
    """All node checks; returns the number of FAILs."""
    from cbatch.clients import client
    from cbatch.core import config as configmod

    rep = _Report(out)
    holder = {}

    def check_config():
        holder["cfg"] = configmod.load(config_path, trusted=os.geteuid() == 0)
        return True, config_path

    rep.run("config", check_config)
    cfg = holder.get("cfg")
    socket_path = cfg.daemon.socket if cfg else client.DEFAULT_SOCKET

    def check_daemon():
        reply = client.call(socket_path, "ping", _timeout=10)
        holder["ping"] = reply
        return True, f"{socket_path} (instance {reply.get('instance')}, {reply.get('jobs')} jobs)"

    rep.run("daemon", check_daemon)

    def check_engine():
        ping = holder.get("ping")
        if ping is not None:
            return bool(ping.get("engine")), "reachable from cbatchd" if ping.get("engine") else \
                "cbatchd cannot reach the container engine"
        url = cfg.engine.url if cfg else configmod.EngineConfig().url
        from cbatch.engines.docker import Engine
        Engine(url, timeout=10).ping()
        return True, f"{url} (checked directly: cbatchd is down)"

    rep.run("engine", check_engine)

    python = install.interpreter()
    for kind in ("prologue", "epilogue"):
        path = os.path.join(mom_priv, kind)
        rep.run(kind, lambda path=path, kind=kind: _hook(path, kind, python, socket_path))
    starter, where = _starter_from_mom_config(mom_priv)
    rep.line(starter is not None, "mom config", f"$job_starter {starter}" if starter else where)
    starter = starter or DEFAULT_STARTER
    rep.run("job_starter", lambda: _hook(starter, "job_starter", python, socket_path))

    def check_helper():
        path = cfg.daemon.helper if cfg else "/usr/libexec/cbatch/cbatch-exec"
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
            return False, f"{path}: not an executable file"
        if st.st_uid != 0 or st.st_mode & 0o022:
            return False, f"{path}: must be root-owned and not group/world-writable"
        static, why = elf_is_static(path)
        return static, path if static else f"{path}: {why} (it must run in images without libc)"

    rep.run("helper", check_helper)
    return rep.failed


def _hook(path: str, kind: str, python: str, socket_path: str) -> Tuple[bool, str]:
    problems = install.hook_problems(path, kind, python)
    if not problems:
        try:
            with open(path) as fh:
                text = fh.read(8192)
        except OSError as exc:
            return False, f"{path}: {exc.strerror}"
        if install.MARKER not in text:
            problems.append("not written by cbatch install-hooks")
        elif repr(socket_path) not in text:
            problems.append(f"talks to another socket than {socket_path} (re-run cbatch install-hooks)")
    return (not problems), path + ("" if not problems else ": " + "; ".join(problems))


def command(args) -> int:
    """``cbatch check --node [--config FILE] [--mom-priv DIR]``."""
    from cbatch.core import config as configmod
    config_path = getattr(args, "config", None) or configmod.DEFAULT_PATH
    mom_priv = getattr(args, "mom_priv", None) or DEFAULT_MOM_PRIV
    failed = run_checks(config_path, mom_priv)
    return 1 if failed else 0
