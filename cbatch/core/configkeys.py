"""Typed converters for the site config's keys: ``(ctx, dotted key, YAML value) -> Python value``.

Each converter either returns the validated value or raises the one ConfigError an admin needs: file,
dotted key path (``queues.batch.images[2]``), the value, and what is allowed. :mod:`cbatch.core.config` holds
the dataclasses and the merging; this module only knows what one key may contain.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from cbatch.core.directives import NATIVE, parse_mount, valid_reference
from cbatch.core.errors import ConfigError
from cbatch.core.resources import SIZE_HINT, parse_size
from cbatch.core.spec import RESERVED_TARGETS, Mount, is_reserved_target

URL_SCHEMES = ("unix", "tcp", "http", "https", "ssh")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
ENV_PATTERN = re.compile(r"^[A-Za-z0-9_*?%\[\]]+\Z")
GLOB = re.compile(r"[*?\[]")



# --- converters: (path, key, value) -> python value, ConfigError on anything unexpected -----------------

class Ctx:
    """Where errors point: the config file's path."""
    def __init__(self, path: str) -> None:
        self.path = path

    def err(self, key: str, problem: str, value: object, hint: Optional[str] = None) -> ConfigError:
        return ConfigError(self.path, key, problem, show(value), hint)


def show(value: object) -> object:
    """A value as an error message shows it (YAML null as ``null``)."""
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return repr(value)
    return value


def string(c: Ctx, key: str, v: Any, hint: str = "a string") -> str:
    """A non-empty string."""
    if not isinstance(v, str) or not v:
        raise c.err(key, "expected a non-empty string", v, hint)
    return v


def abspath(c: Ctx, key: str, v: Any) -> str:
    """An absolute path, normalised."""
    v = string(c, key, v, "an absolute path")
    if not v.startswith("/") or "\0" in v:
        raise c.err(key, "not an absolute path", v, "an absolute path")
    return os.path.normpath(v)


def boolean(c: Ctx, key: str, v: Any) -> bool:
    """true or false (YAML booleans only)."""
    if not isinstance(v, bool):
        raise c.err(key, "expected true or false", v, "true | false")
    return v


def integer(c: Ctx, key: str, v: Any, minimum: int = 0, nullable: bool = False) -> Optional[int]:
    """An integer >= ``minimum`` (booleans are not integers); None allowed when ``nullable``."""
    if v is None and nullable:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise c.err(key, "expected an integer", v, f"an integer >= {minimum}" + (" or null" if nullable else ""))
    return v


def number(c: Ctx, key: str, v: Any, positive: bool = False) -> float:
    """A non-negative (or positive) int or float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (positive and v == 0):
        raise c.err(key, "expected a number", v, "a number > 0" if positive else "a number >= 0")
    return float(v)


def list_of(c: Ctx, key: str, v: Any, item: Callable[[Ctx, str, Any], Any]) -> tuple:
    """A YAML list, each item converted by ``item`` with its ``[index]`` in the key path."""
    if not isinstance(v, list):
        raise c.err(key, "expected a list", v, "a YAML list, e.g. [a, b]")
    return tuple(item(c, f"{key}[{i}]", x) for i, x in enumerate(v))


def mapping(c: Ctx, key: str, v: Any) -> Mapping:
    """A YAML mapping (null reads as empty)."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise c.err(key, "expected a mapping", v, "a YAML mapping of key: value")
    return v


def unknown(c: Ctx, prefix: str, data: Mapping, known) -> None:
    """Refuse keys not in ``known`` (typos must not be silently ignored)."""
    for k in data:
        if k not in known:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise c.err(where, "unknown key", k, "known keys: " + ", ".join(known))


def image(c: Ctx, key: str, v: Any) -> str:
    """An image reference, or ``native``."""
    v = string(c, key, v, "an image reference or native")
    if v != NATIVE and not valid_reference(v):
        raise c.err(key, "not a valid image reference", v, "[registry[:port]/]name[:tag][@sha256:<64 hex>] or native")
    return v


def ref(c: Ctx, key: str, v: Any) -> str:
    """An exact image reference."""
    v = string(c, key, v, "an image reference")
    if not valid_reference(v):
        raise c.err(key, "not a valid image reference", v, "[registry[:port]/]name[:tag][@sha256:<64 hex>]")
    return v


def image_pattern(c: Ctx, key: str, v: Any) -> str:
    """An exact image reference or an fnmatch glob."""
    v = string(c, key, v, "an image reference or fnmatch glob")
    # A glob cannot be checked against the grammar; an exact reference can and a typo would lock jobs out.
    if not GLOB.search(v) and not valid_reference(v):
        raise c.err(key, "not a valid image reference", v, "an exact reference or a glob like debian:*")
    return v


def network(c: Ctx, key: str, v: Any) -> str:
    """A Docker network name."""
    v = string(c, key, v, "a Docker network name")
    if not NAME.match(v):
        raise c.err(key, "not a valid network name", v, "letters, digits, _ . -")
    return v


def env(c: Ctx, key: str, v: Any) -> Dict[str, str]:
    """A mapping of variable names to string values (numbers are accepted and stringified)."""
    out = {}
    for k, val in mapping(c, key, v).items():
        if not isinstance(k, str) or not ENV_KEY.match(k):
            raise c.err(f"{key}.{k}", "not a valid variable name", k, "letters, digits and _")
        if isinstance(val, bool) or not isinstance(val, (str, int, float)) or "\0" in str(val):
            raise c.err(f"{key}.{k}", "expected a string", val, "quote the value")
        out[k] = str(val)
    return out


def env_pattern(c: Ctx, key: str, v: Any) -> str:
    """A variable name or glob (``BASH_FUNC_*``)."""
    v = string(c, key, v, "a variable name or glob")
    if not ENV_PATTERN.match(v):
        raise c.err(key, "not a variable name or glob", v, "e.g. LD_PRELOAD or BASH_FUNC_*")
    return v


def site_mount(c: Ctx, key: str, v: Any) -> Mount:
    """A site mount ``SRC[:DST][:ro|rw]``, read-only unless ``:rw``; never onto a reserved path."""
    v = string(c, key, v, "SRC[:DST][:ro|rw]")
    try:
        src, dst, ro = parse_mount(v)
    except ValueError as exc:
        raise c.err(key, "malformed mount", v, "SRC[:DST][:ro|rw] with absolute paths") from exc
    dst = os.path.normpath(dst)
    if is_reserved_target(dst):
        raise c.err(key, "mount onto a reserved path", v, "not /, " + ", ".join(RESERVED_TARGETS))
    # Site mounts default to read-only: an admin must opt in to jobs writing into a shared host path.
    return Mount(source=os.path.normpath(src), target=dst, read_only=True if ro is None else ro)


def user_mounts(c: Ctx, key: str, v: Any) -> Dict[str, Any]:
    """The partial ``user_mounts`` map: ``allowed`` and ``prefixes`` (absolute paths or ``~``)."""
    data = mapping(c, key, v)
    unknown(c, key, data, ("allowed", "prefixes"))
    out: Dict[str, Any] = {}
    if "allowed" in data:
        out["allowed"] = boolean(c, f"{key}.allowed", data["allowed"])
    if "prefixes" in data:
        def prefix(c2: Ctx, k: str, x: Any) -> str:
            return "~" if x == "~" else abspath(c2, k, x)
        out["prefixes"] = list_of(c, f"{key}.prefixes", data["prefixes"], prefix)
    return out


def hardening(c: Ctx, key: str, v: Any) -> Dict[str, Any]:
    """The partial ``hardening`` map."""
    data = mapping(c, key, v)
    unknown(c, key, data, ("pids_limit", "read_only_rootfs", "no_new_privileges", "init", "cap_drop_all",
                           "layer_size"))
    out: Dict[str, Any] = {}
    for k, x in data.items():
        if k == "layer_size":
            out[k] = size(c, f"{key}.{k}", x)
            if out[k] is not None and out[k] < 1024 ** 2:
                raise c.err(f"{key}.{k}", "too small", x, "at least 1mb, or null for no bound")
            continue
        out[k] = integer(c, f"{key}.{k}", x, 1, nullable=True) if k == "pids_limit" else boolean(c, f"{key}.{k}", x)
    return out


def pull(c: Ctx, key: str, v: Any) -> str:
    """``never`` or ``missing``."""
    if v not in ("never", "missing"):
        raise c.err(key, "not a pull mode", v, "never | missing")
    return v


def size(c: Ctx, key: str, v: Any) -> Optional[int]:
    """A Torque size (``64mb``) or a byte count; null allowed."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise c.err(key, "not a size", v, SIZE_HINT)
    try:
        return parse_size(str(v))
    except ValueError as exc:
        raise c.err(key, "not a size", v, SIZE_HINT) from exc


QUEUE_KEYS: Dict[str, Callable[[Ctx, str, Any], Any]] = {
    "image": image,
    "images": lambda c, k, v: list_of(c, k, v, image_pattern),
    "native": boolean,
    "env": env,
    "env_drop": lambda c, k, v: list_of(c, k, v, env_pattern),
    "mounts": lambda c, k, v: list_of(c, k, v, site_mount),
    "user_mounts": user_mounts,
    "network": network,
    "networks": lambda c, k, v: list_of(c, k, v, network),
    "allow_root": boolean,
    "hardening": hardening,
    "pull": pull,
    "prepull": lambda c, k, v: list_of(c, k, v, ref),
    "shm_size": size,
    "tm": boolean,
    "engine": lambda c, k, v: engine_choice(c, k, v),
}
MERGED_MAPS = ("env", "user_mounts", "hardening")


ENGINE_CHOICES = ("auto", "direct", "docker")


def engine_choice(c: Ctx, key: str, v: Any) -> str:
    """Which engine runs a queue's containers: ``direct`` (runc on Docker's layers), ``docker``, or ``auto``
    (direct where the storage driver and the network allow it, else docker with a logged reason)."""
    if v not in ENGINE_CHOICES:
        raise c.err(key, "not an engine", v, "one of " + ", ".join(ENGINE_CHOICES))
    return v


def url(c: Ctx, key: str, v: Any) -> str:
    """A Docker engine URL (unix://, tcp://, http(s)://, ssh://)."""
    url = string(c, key, v, "e.g. unix:///var/run/docker.sock")
    if "://" not in url or url.split("://", 1)[0] not in URL_SCHEMES:
        raise c.err(key, "not an engine URL", url, "scheme one of " + ", ".join(URL_SCHEMES))
    return url


def positive(c: Ctx, key: str, v: Any) -> float:
    """A number > 0."""
    return number(c, key, v, positive=True)


def instance(c: Ctx, key: str, v: Any) -> str:
    """A daemon instance name (it becomes a container label value)."""
    v = string(c, key, v, "letters, digits, _ . -")
    if not NAME.match(v):
        raise c.err(key, "not a valid instance name", v, "letters, digits, _ . -")
    return v


def section(c: Ctx, name: str, data: Mapping, default: Any, keys: Dict[str, Callable[[Ctx, str, Any], Any]]):
    """A flat top-level section: each given key converted, the rest from ``default`` (a frozen dataclass)."""
    raw = mapping(c, name, data.get(name))
    unknown(c, name, raw, tuple(keys))
    return replace(default, **{k: keys[k](c, f"{name}.{k}", v) for k, v in raw.items()})
