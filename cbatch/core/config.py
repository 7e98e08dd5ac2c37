"""The site config (``/etc/cbatch/cbatch.yaml``) as frozen dataclasses, validated strictly at load.

Every mistake is a :class:`ConfigError` naming the file, the dotted key path (``queues.batch.images[2]``),
the value and what is allowed, because an admin reads it once in a journal and must be able to fix it from
that line alone. ``config/cbatch.yaml`` documents every key.

Queues start from ``defaults`` and override it key by key; the maps ``env``, ``user_mounts`` and
``hardening`` merge key by key too, lists replace. Merging happens once, at load.
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import yaml

from cbatch.core.configkeys import (GLOB, MERGED_MAPS, NAME, QUEUE_KEYS, Ctx, abspath, instance, integer, mapping,
                                   number, positive, section, unknown, url)
from cbatch.core.directives import NATIVE
from cbatch.core.errors import ConfigError
from cbatch.core.spec import Mount

__all__ = ["DEFAULT_PATH", "DEFAULT_ENV_DROP", "EngineConfig", "DaemonConfig", "UserMounts",
           "Hardening", "QueuePolicy", "RegistryConfig", "ImagesConfig", "TorqueConfig", "SiteConfig", "ConfigError",
           "normalize_reference", "image_allowed", "parse", "check_trusted", "load"]

DEFAULT_PATH = "/etc/cbatch/cbatch.yaml"
DEFAULT_ENV_DROP = ("PATH", "LD_LIBRARY_PATH", "LD_PRELOAD", "LD_AUDIT", "HOSTNAME", "PWD", "OLDPWD", "SHLVL",
                    "_", "MANPATH", "MODULEPATH", "LOADEDMODULES", "_LMFILES_", "BASH_FUNC_*")


@dataclass(frozen=True)
class EngineConfig:
    """How cbatchd reaches the Docker engine."""

    url: str = "unix:///var/run/docker.sock"
    timeout: float = 60.0


@dataclass(frozen=True)
class DaemonConfig:
    """cbatchd's own settings. ``hostname``, ``cpus`` and ``memory`` are not keys: they describe this host
    and are filled in at load (the policy clamps a job's limits to them)."""

    socket: str = "/run/cbatch/cbatchd.sock"
    state_dir: str = "/var/lib/cbatch"
    instance: str = ""
    stop_grace: float = 1.0
    helper: str = "/usr/libexec/cbatch/cbatch-exec"
    hostname: str = ""
    mount_dir: str = "/run/cbatch/mounts"  # root-only staging points of pinned bind mounts (cbatch.daemon.pinning)
    cpus: int = 0           # this node's CPUs and memory (bytes), measured by load(); 0 = unknown (no clamp)
    memory: int = 0
    # Bounds one client or job cannot exceed (issue #9; documented in config/cbatch.yaml).
    max_connections: int = 1024            # connections of users without a registered job, all together
    max_connections_per_user: int = 64     # open connections of one non-root uid
    max_pending_per_user: int = 8          # start/run requests of one uid not yet running their container
    max_run_containers: int = 0            # concurrent `cbatch run` containers per job; 0: max(1, the job's cpus)
    idle_timeout: float = 10.0             # seconds a new connection may take to send its request
    syslog: str = "/dev/log"               # where the audit lines (and the log, unless under systemd) go; "" none


@dataclass(frozen=True)
class UserMounts:
    """Whether jobs may ask for bind mounts, and under which host directories (``~`` = the user's home)."""

    allowed: bool = False
    prefixes: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Hardening:
    """Container hardening applied to every job of a queue."""

    pids_limit: Optional[int] = 4096
    read_only_rootfs: bool = False
    no_new_privileges: bool = True
    init: bool = True
    cap_drop_all: bool = True
    layer_size: Optional[int] = 1024 ** 3    # writable layer bound (bytes); None: unbounded


@dataclass(frozen=True)
class QueuePolicy:
    """The merged policy of one queue (``defaults`` overridden by ``queues.<name>``)."""

    name: str = ""
    image: str = NATIVE
    images: Tuple[str, ...] = ()
    native: bool = True
    env: Tuple[Tuple[str, str], ...] = ()
    env_drop: Tuple[str, ...] = DEFAULT_ENV_DROP
    mounts: Tuple[Mount, ...] = ()
    user_mounts: UserMounts = UserMounts()
    network: str = "none"
    networks: Tuple[str, ...] = ("none",)
    allow_root: bool = False
    hardening: Hardening = Hardening()
    pull: str = "never"
    prepull: Tuple[str, ...] = ()
    shm_size: Optional[int] = None
    tm: bool = True                     # a container job's own TM (pbsdsh) reaches pbs_mom (cbatch.daemon.tmrelay)
    engine: str = "auto"        # direct | docker | auto (cbatch.engines.router)


@dataclass(frozen=True)
class RegistryConfig:
    """Registry credentials: an admin-only docker-style auth file (``{"auths": {...}}``)."""

    auth_file: Optional[str] = None


@dataclass(frozen=True)
class ImagesConfig:
    """Image housekeeping: ``cbatch images prune`` removes unused images older than this many days."""

    prune_max_age_days: Optional[int] = None


@dataclass(frozen=True)
class TorqueConfig:
    """Facts about the TORQUE server cbatch cannot see from a node. ``default_queue`` is the server's
    ``default_queue`` (``qmgr -c 'p s'``): the queue ``cbatch check`` assumes for a script without ``-q``
    (None: the ``defaults`` policy, shown as ``(none)``). Jobs themselves always carry their real queue."""

    default_queue: Optional[str] = None
    # TM for container jobs (cbatch.daemon.tmclient, tmrelay): "auto" mounts the running pbs_mom's PREFIX/bin
    # and PREFIX/lib read-only (only when root-owned) into jobs of queues with ``tm: true``; "off" never.
    client: str = "auto"
    tm_max_connections: int = 32         # open TM connections of one container job at once (the relay's bound)


@dataclass(frozen=True)
class SiteConfig:
    """The whole site config. Use :meth:`queue` to get a queue's merged policy."""

    path: str = DEFAULT_PATH
    engine: EngineConfig = EngineConfig()
    daemon: DaemonConfig = DaemonConfig()
    defaults: QueuePolicy = QueuePolicy()
    queues: Tuple[Tuple[str, QueuePolicy], ...] = ()
    registry: RegistryConfig = RegistryConfig()
    images: ImagesConfig = ImagesConfig()
    torque: TorqueConfig = TorqueConfig()

    def queue(self, name: Optional[str]) -> QueuePolicy:
        """The merged policy of queue ``name``; an unknown queue (or None) gets the defaults."""
        for qname, policy in self.queues:
            if qname == name:
                return policy
        return self.defaults

    def all_prepull(self) -> Tuple[str, ...]:
        """Every image any queue (or the defaults) asks to pre-pull, once each, in config order."""
        seen: list = []
        for policy in (self.defaults, *(p for _, p in self.queues)):
            seen.extend(ref for ref in policy.prepull if ref not in seen)
        return tuple(seen)


def _queue_partial(c: Ctx, prefix: str, data: Any) -> Dict[str, Any]:
    data = mapping(c, prefix, data)
    unknown(c, prefix, data, tuple(QUEUE_KEYS))
    return {k: QUEUE_KEYS[k](c, f"{prefix}.{k}", v) for k, v in data.items()}


def _builtin() -> Dict[str, Any]:
    q = QueuePolicy()
    return {"image": q.image, "images": q.images, "native": q.native, "env": {}, "env_drop": q.env_drop,
            "mounts": q.mounts, "user_mounts": {"allowed": False, "prefixes": ()},
            "network": q.network, "networks": q.networks, "allow_root": q.allow_root,
            "hardening": dict(Hardening().__dict__), "pull": q.pull, "prepull": q.prepull,
            "shm_size": q.shm_size, "tm": q.tm, "engine": q.engine}


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = {**base[k], **v} if k in MERGED_MAPS else v
    return out


def _build_queue(c: Ctx, name: str, merged: Dict[str, Any], own: Dict[str, Any], prefix: str) -> QueuePolicy:
    def where(k: str) -> str:
        return f"{prefix}.{k}" if k in own else f"defaults.{k}"

    image = merged["image"]
    if image == NATIVE and not merged["native"]:
        raise c.err(where("image"), "default image is native but native is false", image,
                    "set an allowed image, or native: true")
    if image != NATIVE and not image_allowed(image, merged["images"]):
        raise c.err(where("image"), "default image is not in images", image,
                    "allowed: " + (", ".join(merged["images"]) or "none"))
    if merged["network"] not in merged["networks"]:
        raise c.err(where("network"), "default network is not in networks", merged["network"],
                    "allowed: " + ", ".join(merged["networks"]))
    return QueuePolicy(name=name, image=image, images=merged["images"], native=merged["native"],
                       env=tuple(merged["env"].items()), env_drop=merged["env_drop"], mounts=merged["mounts"],
                       user_mounts=UserMounts(**merged["user_mounts"]), network=merged["network"],
                       networks=merged["networks"], allow_root=merged["allow_root"],
                       hardening=Hardening(**merged["hardening"]), pull=merged["pull"],
                       prepull=merged["prepull"], shm_size=merged["shm_size"], tm=merged["tm"],
                       engine=merged["engine"])


def normalize_reference(ref: str) -> str:
    """Docker's familiar-name expansion: ``debian`` -> ``docker.io/library/debian:latest``."""
    name, at, digest = ref.partition("@")
    first, slash, rest = name.partition("/")
    if not slash or ("." not in first and ":" not in first and first != "localhost"):
        name = "docker.io/" + name
    if name.startswith("docker.io/") and name.count("/") == 1:
        name = "docker.io/library/" + name[len("docker.io/"):]
    if not at and ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name + at + digest


def image_allowed(ref: str, patterns: Tuple[str, ...]) -> bool:
    """True if ``ref`` matches an allowed pattern: an exact reference (compared after Docker's
    familiar-name expansion, so ``debian:12`` allows ``docker.io/library/debian:12``) or an fnmatch glob."""
    from fnmatch import fnmatchcase

    norm = normalize_reference(ref)
    for pat in patterns:
        if GLOB.search(pat):
            if fnmatchcase(ref, pat) or fnmatchcase(norm, pat):
                return True
        elif ref == pat or norm == normalize_reference(pat):
            return True
    return False


def _at_least(minimum: int):
    return lambda c, key, v: integer(c, key, v, minimum)


def _tm_bound(c: Ctx, key: str, v: Any) -> int:
    n = integer(c, key, v, 1)
    if n > 1024:
        raise c.err(key, "too large", v, "at most 1024 (each connection holds two descriptors in cbatchd)")
    return n


def _syslog(c: Ctx, key: str, v: Any) -> str:
    return "" if v == "" else abspath(c, key, v)


def parse(text: str, path: str = DEFAULT_PATH, hostname: Optional[str] = None,
          node: Tuple[int, int] = (0, 0)) -> SiteConfig:
    """Validate YAML text into a SiteConfig (no file access). ``hostname`` defaults to this host's name;
    ``node`` is (cpus, memory bytes) of this host, 0 for unknown (see :func:`node_size`)."""
    c = Ctx(path)
    try:
        # libyaml's safe loader when present: same semantics, ~10x faster (the submit filter runs per qsub).
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(path, where, "not valid YAML", getattr(exc, "problem", None) or str(exc).split("\n")[0],
                          "check indentation and quoting") from exc
    data = mapping(c, "", data) if data is not None else {}
    unknown(c, "", data, ("engine", "daemon", "defaults", "queues", "registry", "images", "torque"))

    host = hostname if hostname is not None else socket.gethostname()
    engine = section(c, "engine", data, EngineConfig(), {"url": url, "timeout": positive})
    daemon = section(c, "daemon", data, DaemonConfig(instance=host, hostname=host, cpus=node[0], memory=node[1]),
                     {"socket": abspath, "state_dir": abspath, "instance": instance, "stop_grace": number,
                      "helper": abspath, "mount_dir": abspath, "max_connections": _at_least(1),
                      "max_connections_per_user": _at_least(1), "max_pending_per_user": _at_least(1),
                      "max_run_containers": _at_least(0), "idle_timeout": positive, "syslog": _syslog})
    own_defaults = _queue_partial(c, "defaults", data.get("defaults"))
    base = _merge(_builtin(), own_defaults)
    defaults = _build_queue(c, "", base, own_defaults, "defaults")
    queues = []
    for qname, qdata in mapping(c, "queues", data.get("queues")).items():
        if not isinstance(qname, str) or not NAME.match(qname):
            raise c.err(f"queues.{qname}", "not a valid queue name", qname, "letters, digits, _ . -")
        own = _queue_partial(c, f"queues.{qname}", qdata)
        queues.append((qname, _build_queue(c, qname, _merge(base, own), own, f"queues.{qname}")))

    registry = section(c, "registry", data, RegistryConfig(),
                       {"auth_file": lambda c_, k, v: None if v is None else abspath(c_, k, v)})
    images = section(c, "images", data, ImagesConfig(),
                     {"prune_max_age_days": lambda c_, k, v: integer(c_, k, v, 1, nullable=True)})
    def queue_name(c_: Ctx, k: str, v: Any) -> Optional[str]:
        if v is None:
            return None
        if not isinstance(v, str) or not NAME.match(v):
            raise c_.err(k, "not a valid queue name", v, "letters, digits, _ . - (or null)")
        return v
    def client(c_: Ctx, k: str, v: Any) -> str:
        if v not in ("auto", "off"):
            raise c_.err(k, "not a TORQUE client mode", v, "auto | off")
        return v
    torque = section(c, "torque", data, TorqueConfig(), {"default_queue": queue_name, "client": client,
                                                          "tm_max_connections": _tm_bound})
    return SiteConfig(path=path, engine=engine, daemon=daemon, defaults=defaults, queues=tuple(queues),
                      registry=registry, images=images, torque=torque)


def check_trusted(path: str, real: str, st: os.stat_result) -> None:
    """Refuse a config a root daemon must not trust: the file (``st``, from the open fd) or any parent
    directory of its real path is not owned by root, or is writable by group or others."""
    def unsafe(st_: os.stat_result) -> Optional[str]:
        if st_.st_uid != 0:
            return f"owned by uid {st_.st_uid}, not root"
        if st_.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return "writable by group or others (mode %04o)" % stat.S_IMODE(st_.st_mode)
        return None

    problem = unsafe(st)
    if problem:
        raise ConfigError(path, "", f"unsafe config file: {problem}", real,
                          "chown root and chmod go-w the file: a root daemon will not trust it")
    parent = os.path.dirname(real)
    while True:
        problem = unsafe(os.stat(parent))
        if problem:
            raise ConfigError(path, "", f"unsafe config directory: {problem}", parent,
                              "chown root and chmod go-w every parent directory of the config")
        if parent == "/":
            return
        parent = os.path.dirname(parent)


def node_size() -> Tuple[int, int]:
    """(CPUs this process may use, physical memory in bytes) of this host; 0 where it cannot tell."""
    try:
        cpus = min(os.cpu_count() or 0, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 0
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = 0
    return cpus, max(memory, 0)


def load(path: str = DEFAULT_PATH, trusted: bool = False, hostname: Optional[str] = None) -> SiteConfig:
    """Read and validate the site config. With ``trusted=True`` (the root daemon) also refuse a file that
    is not root-owned or is group/world-writable, or lives under a directory someone else can write."""
    real = os.path.realpath(path)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ConfigError(path, "", "cannot read", exc.strerror, "create it, or pass --config FILE") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(path, "", "not a regular file", real)
        if trusted:
            check_trusted(path, real, st)
        if st.st_size > 1 << 20:
            raise ConfigError(path, "", "config file too large", st.st_size, "at most 1 MiB")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            raw = fh.read(1 << 20)
    finally:
        os.close(fd)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "", "not valid UTF-8", f"byte {exc.start}", "save the file as UTF-8") from exc
    return parse(text, path=path, hostname=hostname, node=node_size())
