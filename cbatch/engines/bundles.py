"""The direct engine's state on disk, which is all a restarted daemon needs: one root-only bundle directory
per container (``<bundles>/<instance>/<name>``: ``meta.json``, ``config.json``, ``etc/``, ``seccomp.bpf``,
``pid``, ``status``), an
event record per instance (``<bundles>/events/<instance>.jsonl``), and facts read from /proc.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import threading
import time
from typing import Callable, Dict, List, Optional

from cbatch.engines import ocispec, seccompbpf
from cbatch.engines.identity import host_unprivileged_port_start, init_binary

log = logging.getLogger("cbatchd")
NOT_INSTANCES = ("runc", "events")      # directories next to the instances' bundle directories
# The event record is bounded like Docker's own event buffer: past EVENTS_MAX bytes the file becomes
# ``<instance>.jsonl.1`` (the previous one goes), so an instance keeps at most twice that on disk.
EVENTS_MAX = 256 * 1024
# The record of an instance with no container left, not written for this long, goes at a daemon's start-up
# (every test and bench daemon is an instance of its own; their records must not pile up).
EVENTS_KEEP = 24 * 3600.0
_events_lock = threading.Lock()


def start_time(pid: int) -> Optional[str]:
    """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22): with the pid, an identity
    no recycled pid can take over."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def rlimits(peer: Optional[int]) -> list:
    """The client's own limits (the RLIMIT_* named in :data:`ocispec.RLIMITS`), as a native job has them."""
    out = []
    big = 2 ** 64 - 1
    for name in ocispec.RLIMITS:
        try:
            soft, hard = (resource.prlimit(peer, getattr(resource, name)) if peer
                          else resource.getrlimit(getattr(resource, name)))
        except (OSError, ValueError):
            continue
        out.append((name, big if soft == resource.RLIM_INFINITY else soft,
                    big if hard == resource.RLIM_INFINITY else hard))
    return out


def write_json(path: str, obj: dict) -> None:
    """Write ``obj`` to ``path`` atomically (a temporary file renamed over it), root-only."""
    tmp = path + ".tmp"
    # dumps, not dump: dump streams through the pure-Python encoder (config.json's seccomp profile made that
    # several ms of CPU per start); dumps is the C encoder, same bytes.
    data = json.dumps(obj)
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600), "w") as fh:
        fh.write(data)
    os.rename(tmp, path)


def read_json(path: str) -> Optional[dict]:
    """The JSON object at ``path``, or None when it is missing or unreadable."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def read_status(bundle: str) -> Optional[dict]:
    """What the shim recorded when the container ended (``status``, ``oom``, ``error``, ``cpu_us`` and
    ``peak_bytes`` where the container's cgroup reported them, ``deleted``: ``shim`` or ``runc``), or None yet."""
    try:
        with open(os.path.join(bundle, "status")) as fh:
            text = fh.read()
    except OSError:
        return None
    out: dict = {}
    for ln in text.splitlines():
        key, _sp, rest = ln.partition(" ")
        if key == "status":
            parts = rest.split()
            out["status"] = int(parts[0])
            pairs = dict(zip(parts[1::2], parts[2::2]))         # oom K cpu_us C peak_bytes P deleted D
            out["oom"] = int(pairs.get("oom", 0))
            if pairs.get("deleted"):
                out["deleted"] = pairs["deleted"]
            for name in ("cpu_us", "peak_bytes"):
                if int(pairs.get(name, -1)) >= 0:
                    out[name] = int(pairs[name])
        elif key == "error":
            out["error"] = rest
    return out


def event(bundles: str, instance: str, cid: str, action: str, **attrs) -> None:
    """Append what Docker's event stream would say (kill with its signal, die with its exit code, destroy)
    to the instance's event record: what tests and admins read after the fact."""
    try:
        os.makedirs(os.path.join(bundles, "events"), mode=0o700, exist_ok=True)
        line = json.dumps({"time": time.time(), "id": cid, "action": action, **attrs}) + "\n"
        path = os.path.join(bundles, "events", instance + ".jsonl")
        with _events_lock:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line.encode())
                full = os.fstat(fd).st_size >= EVENTS_MAX
            finally:
                os.close(fd)
            if full:
                os.replace(path, path + ".1")
    except OSError as exc:
        log.warning("direct engine: event %s %s not recorded: %s", action, cid, exc)


def instance_of(bundles: str, name: str) -> Optional[str]:
    """Which instance's directory holds the bundle ``name``."""
    try:
        for inst in os.listdir(bundles):
            if inst not in NOT_INSTANCES and os.path.isdir(os.path.join(bundles, inst, name)):
                return inst
    except FileNotFoundError:
        pass
    return None


def instance_metas(bundles: str, instance: str) -> Dict[str, dict]:
    """The bundles of ``instance`` and their ``meta.json`` records (name -> record), each read once: the
    records the scan itself read."""
    read: Dict[str, dict] = {}

    def meta_of(path: str) -> Optional[dict]:
        meta = read_json(path)
        if meta:
            read[os.path.basename(os.path.dirname(path))] = meta
        return meta
    return {name: read[name] for name in scan(bundles, {"cbatch.instance": instance}, meta_of)}


def scan(bundles: str, labels: Dict[str, str], meta_of: Callable[[str], Optional[dict]],
         unmatched: Optional[Dict[str, int]] = None) -> List[str]:
    """Names of the bundles whose ``meta.json`` labels include every one of ``labels``.

    ``unmatched`` (path -> directory inode), shared by the scans of one cleanup (list, remove, list again),
    records the bundles whose meta was read and did not match; a later scan skips those while their
    directory is the same one (a bundle's labels never change), so each bundle's meta.json is read once
    per cleanup, not once per listing. A bundle that matched, or had no readable meta, is read again."""
    out = []
    try:
        instances = [i for i in os.listdir(bundles) if i not in NOT_INSTANCES]
    except FileNotFoundError:
        return []
    for inst in instances:
        if labels.get("cbatch.instance") not in (None, inst):
            continue
        try:
            # scandir: each entry's inode comes with the listing (no stat per bundle).
            with os.scandir(os.path.join(bundles, inst)) as it:
                entries = [(e.name, e.path, e.inode()) for e in it]
        except OSError:
            continue
        for name, path, inode in entries:
            if unmatched is not None and unmatched.get(path) == inode:
                continue
            meta = meta_of(os.path.join(path, "meta.json"))
            if meta and all(meta.get("labels", {}).get(k) == v for k, v in labels.items()):
                out.append(name)
            elif meta and unmatched is not None:
                unmatched[path] = inode
    return out


def drop_instance_dir(bundles: str, instance: str) -> None:
    """Remove the instance's bundle directory once it holds no bundle (idempotent; a start that made it
    meanwhile keeps it: rmdir removes only an empty directory, and the start makes it again if it lost it)."""
    try:
        os.rmdir(os.path.join(bundles, instance))
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
            log.warning("direct engine: %s: %s", os.path.join(bundles, instance), exc)


def sweep(bundles: str, keep: str, now: Optional[float] = None) -> List[str]:
    """Start-up: remove empty instance directories and the event records of instances with no container
    left whose record was not written for :data:`EVENTS_KEEP` (never ``keep``, the daemon's own). Returns
    what it removed."""
    now = time.time() if now is None else now
    removed = []
    try:
        names = os.listdir(bundles)
    except FileNotFoundError:
        return removed
    for inst in names:
        path = os.path.join(bundles, inst)
        if inst not in NOT_INSTANCES and inst != keep and os.path.isdir(path) and not os.path.islink(path):
            try:
                os.rmdir(path)
                removed.append(path)
            except OSError:
                pass
    events = os.path.join(bundles, "events")
    try:
        records = os.listdir(events)
    except FileNotFoundError:
        return removed
    for name in records:
        inst = name.split(".jsonl", 1)[0]
        path = os.path.join(events, name)
        if not name.startswith(inst + ".jsonl") or inst == keep or os.path.isdir(os.path.join(bundles, inst)):
            continue
        try:
            if now - os.lstat(path).st_mtime >= EVENTS_KEEP:
                os.unlink(path)
                removed.append(path)
        except OSError:
            pass
    return removed


def write_config(bundle: str, spec, conf: dict, peer: str, cgroups_path: str, loader: str, helper: str) -> dict:
    """Write a new container's files into ``bundle``: its own /etc files, the compiled seccomp program and
    ``config.json`` (:func:`cbatch.engines.ocispec.config`); returns the config. ``peer``: the client's pid
    (its rlimits are the job's), ``loader``: the host path of ``cbatch-filter``."""
    etc = os.path.join(bundle, "etc")
    os.mkdir(etc, 0o755)
    try:
        with open("/etc/resolv.conf") as fh:
            resolv = fh.read()
    except OSError:
        resolv = ""
    for name, text in ocispec.etc_files(spec.hostname or "", resolv).items():
        with open(os.open(os.path.join(etc, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "w") as fh:
            fh.write(text)
    program = seccompbpf.write_program(bundle)        # the default profile, compiled once per daemon
    cfg = ocispec.config(spec, conf, init=init_binary(), helper=helper, etc_dir=etc, cgroups_path=cgroups_path,
                         seccomp=(loader, program), rlimits=rlimits(int(peer) if peer.isdigit() else None),
                         port_start=host_unprivileged_port_start())
    write_json(os.path.join(bundle, "config.json"), cfg)
    return cfg
