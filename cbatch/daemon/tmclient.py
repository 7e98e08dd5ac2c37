"""What a TORQUE or OpenPBS container job needs for its own TM tasks (``pbsdsh``, ``pbs_tmrsh``, an ``mpiexec``
using TM).

A job's TM client (libtorque's or OpenPBS libpbs's ``tm_init``) connects to ``localhost:$PBS_MOMPORT``, the
pbs_mom that runs the job. Inside a container with network ``none`` that address is the container's own
loopback, and the image has no PBS client. So for a TORQUE or PBS container job of a queue with ``tm: true``
(and ``torque.client: auto``; the section is TORQUE's by name, it serves both) cbatchd

- finds the job's pbs_mom from /proc: the nearest ancestor of the job starter whose executable is a root-owned
  ``pbs_mom`` (the starter's parent for batch jobs; the pty session leader, a pbs_mom fork, sits between for
  interactive jobs), and climbs to the daemon itself (the last ``pbs_mom`` in the chain);
- takes ``PREFIX`` from that executable (``PREFIX/sbin/pbs_mom``) and mounts ``PREFIX/bin`` and ``PREFIX/lib``
  read-only at the same paths, only when they and every parent directory are root-owned and not group- or
  world-writable (the job would run whatever is there). For OpenPBS ``PREFIX`` must also be ``PBS_EXEC`` of
  ``/etc/pbs.conf``, which must itself be a root-owned file nobody else can write; it is mounted read-only
  too (libpbs's other clients read it; ``pbsdsh`` and ``pbs_tmrsh`` need only ``PBS_MOMPORT``);
- relays the TM port (:mod:`cbatch.daemon.tmrelay`): the port is the job's ``PBS_MOMPORT`` only when the
  pbs_mom process itself listens on it (the environment is the user's: it may not pick another host port);
  for OpenPBS it must also be pbs.conf's ``PBS_MANAGER_SERVICE_PORT`` (default 15003, where PBS's mom
  serves TM: ``src/resmom/mom_main.c`` ``pbs_rm_port``), never the mom's batch port.

Nothing here trusts the job's environment for a path. Stdlib only; reads /proc and /etc/pbs.conf.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from typing import Optional, Tuple

from cbatch.core.spec import Mount

log = logging.getLogger("cbatchd")
MOM_NAME = "pbs_mom"
MAX_ANCESTORS = 4       # starter -> (pty session leader) -> pbs_mom fork(s) -> pbs_mom; bounded walk
PBS_CONF = "/etc/pbs.conf"
PBS_MANAGER_PORT = 15003    # OpenPBS include/pbs_internal.h PBS_MANAGER_SERVICE_PORT
MAX_CONF = 65536


@dataclass(frozen=True)
class Mom:
    """The pbs_mom daemon that runs a job: its pid and installation prefix."""

    pid: int
    prefix: str


@dataclass(frozen=True)
class TmPlan:
    """What a container job gets for TM: the client mounts and the port the relay serves (None: no relay)."""

    mounts: Tuple[Mount, ...]
    port: Optional[int]


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        data = fh.read()
    # The command name may hold spaces and parentheses: the fields follow the last ')'.
    return int(data[data.rindex(b")") + 2:].split()[1])


def _mom_exe(pid: int) -> Optional[str]:
    """The real path of ``pid``'s executable when it is a root-owned pbs_mom run by root, else None."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        if os.stat(f"/proc/{pid}").st_uid != 0 or os.path.basename(exe) != MOM_NAME:
            return None
        st = os.stat(exe)
    except OSError:
        return None
    if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return None
    return exe


def find_mom(pid: int) -> Optional[Mom]:
    """The pbs_mom daemon among the ancestors of ``pid`` (the job starter), or None (not under pbs_mom)."""
    found: Optional[Mom] = None
    try:
        cur = _ppid(pid)
        for _ in range(MAX_ANCESTORS):
            if cur <= 1:
                break
            exe = _mom_exe(cur)
            if exe is None:
                if found is not None:
                    break            # the chain of pbs_mom processes ended: the last one is the daemon
            else:
                found = Mom(cur, os.path.dirname(os.path.dirname(exe)))
            cur = _ppid(cur)
    except (OSError, ValueError, IndexError):
        return found
    return found


def _trusted_dir(path: str) -> bool:
    """True if ``path`` is a real directory and it and all its parents are root-owned, not g/o-writable."""
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            return False
        cur = path
        while True:
            st = os.lstat(cur)
            if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                return False
            if cur == "/":
                return True
            cur = os.path.dirname(cur)
    except OSError:
        return False


def client_mounts(prefix: str) -> Tuple[Mount, ...]:
    """Read-only mounts of ``prefix``/bin and ``prefix``/lib at the same paths; () when either is not a
    trusted directory (see the module docstring)."""
    if not prefix.startswith("/") or os.path.realpath(prefix) != prefix or prefix == "/":
        return ()
    dirs = [os.path.join(prefix, d) for d in ("bin", "lib")]
    if not all(_trusted_dir(d) for d in dirs):
        return ()
    return tuple(Mount(d, d, True) for d in dirs)


def listening_ports(pid: int) -> frozenset:
    """TCP ports ``pid`` listens on at 0.0.0.0 or 127.0.0.1 (from its fds and its /proc/net/tcp)."""
    inodes = set()
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        with open(f"/proc/{pid}/net/tcp") as fh:
            lines = fh.read().splitlines()[1:]
    except OSError:
        return frozenset()
    ports = set()
    for line in lines:
        f = line.split()
        if len(f) < 10 or f[3] != "0A" or f[9] not in inodes:      # 0A: TCP_LISTEN
            continue
        addr, _, port = f[1].partition(":")
        if addr in ("00000000", "0100007F"):                        # 0.0.0.0, 127.0.0.1 (little-endian hex)
            ports.add(int(port, 16))
    return frozenset(ports)


def tm_port(env: dict, mom: Mom) -> Optional[int]:
    """The job's ``PBS_MOMPORT`` when pbs_mom really listens on it, else None."""
    value = env.get("PBS_MOMPORT", "")
    if not value.isdigit() or not 0 < int(value) < 65536:
        return None
    port = int(value)
    return port if port in listening_ports(mom.pid) else None


def _trusted_file(path: str) -> bool:
    """True if ``path`` is a regular file owned by root, not g/o-writable, in a trusted directory."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISREG(st.st_mode) and st.st_uid == 0 and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            and _trusted_dir(os.path.dirname(path)))


def pbs_conf(path: str = PBS_CONF) -> Optional[dict]:
    """``KEY=VALUE`` lines of OpenPBS's pbs.conf when it is a trusted file (see :func:`_trusted_file`), else None."""
    if not _trusted_file(path):
        return None
    try:
        with open(path, "rb") as fh:
            text = fh.read(MAX_CONF).decode("utf-8", "replace")
    except OSError:
        return None
    conf = {}
    for line in text.splitlines():
        key, eq, value = line.strip().partition("=")
        if eq and not key.startswith("#"):
            conf[key.strip()] = value.strip()
    return conf


def _pbs_plan(mom: Mom, env: dict, conf_path: str = PBS_CONF) -> Optional[TmPlan]:
    """The OpenPBS side of :func:`plan` (see the module docstring)."""
    conf = pbs_conf(conf_path)
    if conf is None:
        log.warning("cbatch: PBS client: not mounted, no TM relay: %s is not a root-owned file only root can "
                    "write", conf_path)
        return None
    pbs_exec = os.path.realpath(conf.get("PBS_EXEC", "") or "/nonexistent")
    if pbs_exec != mom.prefix:
        log.warning("cbatch: PBS client: not mounted, no TM relay: pbs_mom (pid %d) runs from %s, %s names "
                    "PBS_EXEC=%s", mom.pid, mom.prefix, conf_path, conf.get("PBS_EXEC"))
        return None
    mounts = client_mounts(mom.prefix)
    if mounts:
        mounts += (Mount(conf_path, PBS_CONF, True),)
    else:
        log.warning("cbatch: PBS client: not mounted: %s/bin or %s/lib is not a root-owned directory "
                    "(torque.client: auto mounts only those)", mom.prefix, mom.prefix)
    value = conf.get("PBS_MANAGER_SERVICE_PORT", "")
    manager = int(value) if value.isdigit() and 0 < int(value) < 65536 else PBS_MANAGER_PORT
    port = tm_port(env, mom)
    if port != manager:
        log.warning("cbatch: TM relay: no relay: PBS_MOMPORT %r is not pbs.conf's manager port %d on which "
                    "pbs_mom (pid %d) listens", env.get("PBS_MOMPORT"), manager, mom.pid)
        port = None
    return TmPlan(mounts, port) if mounts or port else None


def plan(config, queue_policy, batch: str, peer_pid: int, env: dict) -> Optional[TmPlan]:
    """The TM plan of a container job started by ``peer_pid``, or None (not wanted, or not under a pbs_mom
    cbatch can trust). ``env`` is the job's environment as the starter reported it."""
    if batch not in ("torque", "pbs") or config.torque.client != "auto" or not queue_policy.tm:
        return None
    mom = find_mom(peer_pid)
    if mom is None:
        return None
    if batch == "pbs":
        return _pbs_plan(mom, env)
    mounts = client_mounts(mom.prefix)
    if not mounts:
        log.warning("cbatch: torque client: not mounted: %s/bin or %s/lib is not a root-owned directory "
                    "(torque.client: auto mounts only those)", mom.prefix, mom.prefix)
    port = tm_port(env, mom)
    if port is None:
        log.warning("cbatch: TM relay: no relay: PBS_MOMPORT %r is not a port pbs_mom (pid %d) listens on",
                    env.get("PBS_MOMPORT"), mom.pid)
    return TmPlan(mounts, port) if mounts or port else None
