"""The site config (``/etc/cbatch/cbatch.yaml``) as frozen dataclasses, validated strictly at load.

Every mistake is a :class:`ConfigError` naming the file, the dotted key path (``queues.batch.images[2]``),
the value and what is allowed, because an admin reads it once in a journal and must be able to fix it from
that line alone. ``config/cbatch.yaml`` documents every key.

Queues start from ``defaults`` and override it key by key; the maps ``env``, ``user_mounts`` and
``hardening`` merge key by key too, lists replace. Merging happens once, at load.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import yaml

from cbatch.directives import NATIVE, parse_mount, valid_reference
from cbatch.errors import ConfigError
from cbatch.resources import SIZE_HINT, parse_size
from cbatch.spec import Mount

DEFAULT_PATH = "/etc/cbatch/cbatch.yaml"
DEFAULT_ENV_DROP = ("PATH", "LD_LIBRARY_PATH", "LD_PRELOAD", "LD_AUDIT", "HOSTNAME", "PWD", "OLDPWD", "SHLVL",
                    "_", "MANPATH", "MODULEPATH", "LOADEDMODULES", "_LMFILES_", "BASH_FUNC_*")
# Container paths cbatch itself provides, or that would hand the host's kernel interfaces to a job.
RESERVED_TARGETS = ("/etc/passwd", "/etc/group", "/etc/shadow", "/proc", "/sys", "/dev", "/.cbatch")
URL_SCHEMES = ("unix", "tcp", "http", "https", "ssh")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_ENV_PATTERN = re.compile(r"^[A-Za-z0-9_*?%\[\]]+\Z")
_GLOB = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class EngineConfig:
    """How cbatchd reaches the Docker engine."""

    url: str = "unix:///var/run/docker.sock"
    timeout: float = 60.0


@dataclass(frozen=True)
class DaemonConfig:
    """cbatchd's own settings. ``hostname`` is not a key: it is this host's name, resolved at load."""

    socket: str = "/run/cbatch/cbatchd.sock"
    state_dir: str = "/var/lib/cbatch"
    instance: str = ""
    stop_grace: float = 1.0
    helper: str = "/usr/libexec/cbatch/cbatch-exec"
    hostname: str = ""


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


@dataclass(frozen=True)
class RegistryConfig:
    """Registry credentials: an admin-only docker-style auth file (``{"auths": {...}}``)."""

    auth_file: Optional[str] = None


@dataclass(frozen=True)
class ImagesConfig:
    """Image housekeeping: ``cbatch images prune`` removes unused images older than this many days."""

    prune_max_age_days: Optional[int] = None


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


def is_reserved_target(target: str, extra: Tuple[str, ...] = ()) -> bool:
    """True if a container path is ``/``, or equal to or under a reserved path (or one of ``extra``)."""
    if target == "/":
        return True
    reserved = RESERVED_TARGETS + tuple(e for e in extra if e and e != "/")
    return any(target == r or target.startswith(r.rstrip("/") + "/") for r in reserved)


# --- converters: (path, key, value) -> python value, ConfigError on anything unexpected -----------------

class _Ctx:
    def __init__(self, path: str) -> None:
        self.path = path

    def err(self, key: str, problem: str, value: object, hint: Optional[str] = None) -> ConfigError:
        return ConfigError(self.path, key, problem, _show(value), hint)


def _show(value: object) -> object:
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return repr(value)
    return value


def _str(c: _Ctx, key: str, v: Any, hint: str = "a string") -> str:
    if not isinstance(v, str) or not v:
        raise c.err(key, "expected a non-empty string", v, hint)
    return v


def _abspath(c: _Ctx, key: str, v: Any) -> str:
    v = _str(c, key, v, "an absolute path")
    if not v.startswith("/") or "\0" in v:
        raise c.err(key, "not an absolute path", v, "an absolute path")
    return os.path.normpath(v)


def _bool(c: _Ctx, key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise c.err(key, "expected true or false", v, "true | false")
    return v


def _int(c: _Ctx, key: str, v: Any, minimum: int = 0, nullable: bool = False) -> Optional[int]:
    if v is None and nullable:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise c.err(key, "expected an integer", v, f"an integer >= {minimum}" + (" or null" if nullable else ""))
    return v


def _number(c: _Ctx, key: str, v: Any, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (positive and v == 0):
        raise c.err(key, "expected a number", v, "a number > 0" if positive else "a number >= 0")
    return float(v)


def _list(c: _Ctx, key: str, v: Any, item: Callable[[_Ctx, str, Any], Any]) -> tuple:
    if not isinstance(v, list):
        raise c.err(key, "expected a list", v, "a YAML list, e.g. [a, b]")
    return tuple(item(c, f"{key}[{i}]", x) for i, x in enumerate(v))


def _map(c: _Ctx, key: str, v: Any) -> Mapping:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise c.err(key, "expected a mapping", v, "a YAML mapping of key: value")
    return v


def _unknown(c: _Ctx, prefix: str, data: Mapping, known) -> None:
    for k in data:
        if k not in known:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise c.err(where, "unknown key", k, "known keys: " + ", ".join(known))


def _image(c: _Ctx, key: str, v: Any) -> str:
    v = _str(c, key, v, "an image reference or native")
    if v != NATIVE and not valid_reference(v):
        raise c.err(key, "not a valid image reference", v, "[registry[:port]/]name[:tag][@sha256:<64 hex>] or native")
    return v


def _ref(c: _Ctx, key: str, v: Any) -> str:
    v = _str(c, key, v, "an image reference")
    if not valid_reference(v):
        raise c.err(key, "not a valid image reference", v, "[registry[:port]/]name[:tag][@sha256:<64 hex>]")
    return v


def _image_pattern(c: _Ctx, key: str, v: Any) -> str:
    v = _str(c, key, v, "an image reference or fnmatch glob")
    # A glob cannot be checked against the grammar; an exact reference can and a typo would lock jobs out.
    if not _GLOB.search(v) and not valid_reference(v):
        raise c.err(key, "not a valid image reference", v, "an exact reference or a glob like debian:*")
    return v


def _network(c: _Ctx, key: str, v: Any) -> str:
    v = _str(c, key, v, "a Docker network name")
    if not _NAME.match(v):
        raise c.err(key, "not a valid network name", v, "letters, digits, _ . -")
    return v


def _env(c: _Ctx, key: str, v: Any) -> Dict[str, str]:
    out = {}
    for k, val in _map(c, key, v).items():
        if not isinstance(k, str) or not _ENV_KEY.match(k):
            raise c.err(f"{key}.{k}", "not a valid variable name", k, "letters, digits and _")
        if isinstance(val, bool) or not isinstance(val, (str, int, float)) or "\0" in str(val):
            raise c.err(f"{key}.{k}", "expected a string", val, "quote the value")
        out[k] = str(val)
    return out


def _env_pattern(c: _Ctx, key: str, v: Any) -> str:
    v = _str(c, key, v, "a variable name or glob")
    if not _ENV_PATTERN.match(v):
        raise c.err(key, "not a variable name or glob", v, "e.g. LD_PRELOAD or BASH_FUNC_*")
    return v


def _site_mount(c: _Ctx, key: str, v: Any) -> Mount:
    v = _str(c, key, v, "SRC[:DST][:ro|rw]")
    try:
        src, dst, ro = parse_mount(v)
    except ValueError as exc:
        raise c.err(key, "malformed mount", v, "SRC[:DST][:ro|rw] with absolute paths") from exc
    dst = os.path.normpath(dst)
    if is_reserved_target(dst):
        raise c.err(key, "mount onto a reserved path", v, "not /, " + ", ".join(RESERVED_TARGETS))
    # Site mounts default to read-only: an admin must opt in to jobs writing into a shared host path.
    return Mount(source=os.path.normpath(src), target=dst, read_only=True if ro is None else ro)


def _user_mounts(c: _Ctx, key: str, v: Any) -> Dict[str, Any]:
    data = _map(c, key, v)
    _unknown(c, key, data, ("allowed", "prefixes"))
    out: Dict[str, Any] = {}
    if "allowed" in data:
        out["allowed"] = _bool(c, f"{key}.allowed", data["allowed"])
    if "prefixes" in data:
        def prefix(c2: _Ctx, k: str, x: Any) -> str:
            return "~" if x == "~" else _abspath(c2, k, x)
        out["prefixes"] = _list(c, f"{key}.prefixes", data["prefixes"], prefix)
    return out


def _hardening(c: _Ctx, key: str, v: Any) -> Dict[str, Any]:
    data = _map(c, key, v)
    _unknown(c, key, data, ("pids_limit", "read_only_rootfs", "no_new_privileges", "init", "cap_drop_all"))
    out: Dict[str, Any] = {}
    for k, x in data.items():
        out[k] = _int(c, f"{key}.{k}", x, 1, nullable=True) if k == "pids_limit" else _bool(c, f"{key}.{k}", x)
    return out


def _pull(c: _Ctx, key: str, v: Any) -> str:
    if v not in ("never", "missing"):
        raise c.err(key, "not a pull mode", v, "never | missing")
    return v


def _size(c: _Ctx, key: str, v: Any) -> Optional[int]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise c.err(key, "not a size", v, SIZE_HINT)
    try:
        return parse_size(str(v))
    except ValueError as exc:
        raise c.err(key, "not a size", v, SIZE_HINT) from exc


_QUEUE_KEYS: Dict[str, Callable[[_Ctx, str, Any], Any]] = {
    "image": _image,
    "images": lambda c, k, v: _list(c, k, v, _image_pattern),
    "native": _bool,
    "env": _env,
    "env_drop": lambda c, k, v: _list(c, k, v, _env_pattern),
    "mounts": lambda c, k, v: _list(c, k, v, _site_mount),
    "user_mounts": _user_mounts,
    "network": _network,
    "networks": lambda c, k, v: _list(c, k, v, _network),
    "allow_root": _bool,
    "hardening": _hardening,
    "pull": _pull,
    "prepull": lambda c, k, v: _list(c, k, v, _ref),
    "shm_size": _size,
}
_MERGED_MAPS = ("env", "user_mounts", "hardening")


def _url(c: _Ctx, key: str, v: Any) -> str:
    url = _str(c, key, v, "e.g. unix:///var/run/docker.sock")
    if "://" not in url or url.split("://", 1)[0] not in URL_SCHEMES:
        raise c.err(key, "not an engine URL", url, "scheme one of " + ", ".join(URL_SCHEMES))
    return url


def _positive(c: _Ctx, key: str, v: Any) -> float:
    return _number(c, key, v, positive=True)


def _instance(c: _Ctx, key: str, v: Any) -> str:
    v = _str(c, key, v, "letters, digits, _ . -")
    if not _NAME.match(v):
        raise c.err(key, "not a valid instance name", v, "letters, digits, _ . -")
    return v


def _section(c: _Ctx, name: str, data: Mapping, default: Any, keys: Dict[str, Callable[[_Ctx, str, Any], Any]]):
    """A flat top-level section: each given key converted, the rest from ``default`` (a frozen dataclass)."""
    raw = _map(c, name, data.get(name))
    _unknown(c, name, raw, tuple(keys))
    return replace(default, **{k: keys[k](c, f"{name}.{k}", v) for k, v in raw.items()})


def _queue_partial(c: _Ctx, prefix: str, data: Any) -> Dict[str, Any]:
    data = _map(c, prefix, data)
    _unknown(c, prefix, data, tuple(_QUEUE_KEYS))
    return {k: _QUEUE_KEYS[k](c, f"{prefix}.{k}", v) for k, v in data.items()}


def _builtin() -> Dict[str, Any]:
    q = QueuePolicy()
    return {"image": q.image, "images": q.images, "native": q.native, "env": {}, "env_drop": q.env_drop,
            "mounts": q.mounts, "user_mounts": {"allowed": False, "prefixes": ()},
            "network": q.network, "networks": q.networks, "allow_root": q.allow_root,
            "hardening": dict(Hardening().__dict__), "pull": q.pull, "prepull": q.prepull,
            "shm_size": q.shm_size}


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = {**base[k], **v} if k in _MERGED_MAPS else v
    return out


def _build_queue(c: _Ctx, name: str, merged: Dict[str, Any], own: Dict[str, Any], prefix: str) -> QueuePolicy:
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
                       prepull=merged["prepull"], shm_size=merged["shm_size"])


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
        if _GLOB.search(pat):
            if fnmatchcase(ref, pat) or fnmatchcase(norm, pat):
                return True
        elif ref == pat or norm == normalize_reference(pat):
            return True
    return False


def parse(text: str, path: str = DEFAULT_PATH, hostname: Optional[str] = None) -> SiteConfig:
    """Validate YAML text into a SiteConfig (no file access). ``hostname`` defaults to this host's name."""
    c = _Ctx(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(path, where, "not valid YAML", getattr(exc, "problem", None) or str(exc).split("\n")[0],
                          "check indentation and quoting") from exc
    data = _map(c, "", data) if data is not None else {}
    _unknown(c, "", data, ("engine", "daemon", "defaults", "queues", "registry", "images"))

    host = hostname if hostname is not None else socket.gethostname()
    engine = _section(c, "engine", data, EngineConfig(), {"url": _url, "timeout": _positive})
    daemon = _section(c, "daemon", data, DaemonConfig(instance=host, hostname=host),
                      {"socket": _abspath, "state_dir": _abspath, "instance": _instance, "stop_grace": _number,
                       "helper": _abspath})
    own_defaults = _queue_partial(c, "defaults", data.get("defaults"))
    base = _merge(_builtin(), own_defaults)
    defaults = _build_queue(c, "", base, own_defaults, "defaults")
    queues = []
    for qname, qdata in _map(c, "queues", data.get("queues")).items():
        if not isinstance(qname, str) or not _NAME.match(qname):
            raise c.err(f"queues.{qname}", "not a valid queue name", qname, "letters, digits, _ . -")
        own = _queue_partial(c, f"queues.{qname}", qdata)
        queues.append((qname, _build_queue(c, qname, _merge(base, own), own, f"queues.{qname}")))

    registry = _section(c, "registry", data, RegistryConfig(),
                        {"auth_file": lambda c_, k, v: None if v is None else _abspath(c_, k, v)})
    images = _section(c, "images", data, ImagesConfig(),
                      {"prune_max_age_days": lambda c_, k, v: _int(c_, k, v, 1, nullable=True)})
    return SiteConfig(path=path, engine=engine, daemon=daemon, defaults=defaults, queues=tuple(queues),
                      registry=registry, images=images)


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
    return parse(text, path=path, hostname=hostname)
