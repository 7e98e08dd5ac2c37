"""``cbatch check --node``: is this node ready to run cbatch jobs? One line per check, OK or FAIL.

Checks, in the order a broken node would fail a job: the site config loads (as the daemon would load it),
cbatchd answers on its socket, the engine answers (as seen by the daemon, or directly when the daemon is
down and we are root), the pbs_mom hooks and the job starter are installed with the modes pbs_mom demands
and name an interpreter that exists, mom_priv/config points ``$job_starter`` at our starter, and the
in-container helper is present, root-owned and statically linked (it runs inside arbitrary images, which
may have no libc at all). Exit status 1 if anything FAILed. One more line says what TORQUE's accounting
covers on this node (with or without its cgroup build); that line is information, never a FAIL.

Also one line per queue with the engine its jobs get here and why (:mod:`cbatch.admin.queueengines`), and
on a PBS node (``/etc/pbs.conf``) whether cbatch's PBS hooks are present, enabled and current
(:mod:`cbatch.admin.pbscheck`); a PBS node without TORQUE's mom_priv skips the TORQUE hook lines.
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
import sys
from typing import Callable, Optional, Tuple

from cbatch.admin import install, pbscheck, queueengines
from cbatch.core.errors import CbatchError
from cbatch.host import cgroups

DEFAULT_MOM_PRIV = "/var/spool/torque/mom_priv"
DEFAULT_STARTER = "/usr/libexec/cbatch/job_starter"
PT_INTERP = 3
# Only TORQUE's --enable-cgroups build has code reading PBS_HOME/trq-cgroup-paths: its name in the binary
# tells the two builds apart (checked on both builds of this project's kit).
CGROUP_BUILD_MARKER = b"trq-cgroup-paths"
MAX_BINARY = 64 << 20


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


def run_checks(config_path: str, mom_priv: str, out=sys.stdout, pbs_conf: str = pbscheck.PBS_CONF) -> int:
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

    if cfg is not None:
        _queue_engines(rep, cfg)
    pbs_node = pbscheck.read_conf(pbs_conf) is not None
    for ok, what, detail in pbscheck.lines(socket_path, pbs_conf):
        rep.line(ok, what, detail)
    torque = os.path.isdir(mom_priv) or not pbs_node
    if torque:
        _torque_hooks(rep, mom_priv, socket_path)

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
    rep.run("cgroup attach", cgroup_attach)
    if torque:
        rep.run("accounting", lambda: torque_accounting(mom_priv))
    return rep.failed


def cgroup_attach(mounts: str = "/proc/mounts") -> Tuple[bool, str]:
    """Information, never a FAIL: whether joining a cgroup waits for an RCU grace period on this node
    (:func:`cbatch.host.cgroups.favor_dynmods`), and the one command that stops it."""
    favored, target = cgroups.favor_dynmods(mounts)
    if favored:
        return True, f"favordynmods on {favored}: a container (or job) joins its cgroup without waiting"
    if target is None:
        return True, "no cgroup hierarchy mounted"
    return True, (f"every container start waits ~5-15 ms for an RCU grace period when runc joins its cgroup; "
                  f"`mount -o remount,favordynmods {target}` (Linux 6.0+; scripts/setup does it) removes the "
                  "wait at a small cost to every fork and exit (docs/cbatchd.md, Node tuning)")


def _queue_engines(rep: "_Report", cfg) -> None:
    """One line per queue: the engine the daemon's router gives its jobs here, and why."""
    try:
        router = queueengines.router_for(cfg)
        for ok, what, detail in queueengines.lines(cfg, router):
            rep.line(ok, what, detail)
    except CbatchError as exc:
        rep.line(False, "queue engines", exc.message)


def _torque_hooks(rep: "_Report", mom_priv: str, socket_path: str) -> None:
    """TORQUE's prologue, epilogue, ``$job_starter`` line and the starter it names."""
    python = install.interpreter()
    for kind in ("prologue", "epilogue"):
        path = os.path.join(mom_priv, kind)
        rep.run(kind, lambda path=path, kind=kind: _hook(path, kind, python, socket_path))
    starter, where = _starter_from_mom_config(mom_priv)
    rep.line(starter is not None, "mom config", f"$job_starter {starter}" if starter else where)
    starter = starter or DEFAULT_STARTER
    rep.run("job_starter", lambda: _hook(starter, "job_starter", python, socket_path))


def _running_mom(mom_priv: str, proc: str = "/proc") -> Optional[str]:
    """The path of the pbs_mom binary running for ``mom_priv`` (its mom.lock pid), or None."""
    try:
        with open(os.path.join(mom_priv, "mom.lock"), "rb") as fh:
            pid = int(fh.read(64).split(b"\0")[0].strip())
        with open(os.path.join(proc, str(pid), "comm")) as fh:
            if fh.read(64).strip() != "pbs_mom":
                return None                 # a stale lock whose pid now belongs to something else
        return os.readlink(os.path.join(proc, str(pid), "exe"))
    except (OSError, ValueError):
        return None


def _has_marker(path: str) -> Optional[bool]:
    """Whether the binary ``path`` contains :data:`CGROUP_BUILD_MARKER` (None if unreadable)."""
    tail, seen = b"", 0
    try:
        with open(path, "rb") as fh:
            while seen < MAX_BINARY:
                chunk = fh.read(1 << 20)
                if not chunk:
                    return False
                if CGROUP_BUILD_MARKER in tail + chunk:
                    return True
                tail, seen = chunk[-len(CGROUP_BUILD_MARKER):], seen + len(chunk)
    except OSError:
        return None
    return False


def torque_accounting(mom_priv: str, root: str = cgroups.CGROUP_ROOT, proc: str = "/proc") -> Tuple[bool, str]:
    """Which TORQUE this node runs, and so what ``resources_used`` and ``cput=`` cover for container jobs.

    The running pbs_mom's binary decides (only the cgroup build reads trq-cgroup-paths), else the pbs_mom on
    PATH. With neither, what a cgroup build leaves is a guess: PBS_HOME/trq-cgroup-paths, or a /torque cgroup
    in memory or cpuset (where cbatchd looks for a job's cgroup to nest its container in).
    """
    exe, state = _running_mom(mom_priv, proc), "running"
    if exe is None:
        # pbs_mom is down: the pbs_mom on PATH is the one an init script would start.
        exe, state = shutil.which("pbs_mom"), "pbs_mom not running; installed"
    built = _has_marker(exe) if exe else None
    if built is not None:
        how = f"{state} {exe} built with{'' if built else 'out'} --enable-cgroups"
    else:
        pbs_home = os.path.dirname(os.path.normpath(mom_priv))
        seen = [p for p in (os.path.join(pbs_home, "trq-cgroup-paths"), os.path.join(root, "memory", "torque"),
                            os.path.join(root, "cpuset", "torque"), os.path.join(root, "torque")) if os.path.exists(p)]
        built = bool(seen)
        how = ("pbs_mom not running nor on PATH, so guessed from " + (", ".join(seen) if seen else
               "no trq-cgroup-paths, no /torque cgroup") + "; start it for a definite answer")
    if built:
        return True, (f"TORQUE cgroups: containers nest under /torque/<jobid>, so resources_used.cput/mem "
                      f"include them and pbs_mom enforces cput= ({how})")
    return True, (f"no TORQUE cgroups: resources_used.cput/mem do not include containers; cbatchd enforces "
                  f"cput= on each container itself ({how}; TORQUE's --enable-cgroups build accounts them)")


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
        elif repr(socket_path) not in text and f"\nsocket {socket_path}\n" not in text:    # python | C shim
            problems.append(f"talks to another socket than {socket_path} (re-run cbatch install-hooks)")
    return (not problems), path + ("" if not problems else ": " + "; ".join(problems))


def command(args) -> int:
    """``cbatch check --node [--config FILE] [--mom-priv DIR]``."""
    from cbatch.core import config as configmod
    config_path = getattr(args, "config", None) or configmod.DEFAULT_PATH
    mom_priv = getattr(args, "mom_priv", None) or DEFAULT_MOM_PRIV
    failed = run_checks(config_path, mom_priv)
    return 1 if failed else 0
