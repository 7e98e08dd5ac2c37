"""Torque resource lists (``nodes=1:ppn=2,walltime=01:00:00,mem=100mb``) as numbers.

The resource list reaches cbatch through pbs_mom's argv to the prologue, after pbs_server accepted it, so
it is well-formed in practice; we still parse strictly because the numbers become container limits. Keys
cbatch has no use for (``neednodes``, ``vmem``, ``feature`` ...) are kept verbatim in ``extra``.

Stdlib only: the job starter imports this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Tuple

from cbatch.core.errors import JobError

# Torque sizes: an integer, then an optional k/m/g/t/p multiplier, then b(ytes) or w(ords). A bare number
# is bytes. Multipliers are powers of 1024 as in Torque; a word is 8 bytes (Torque's 64-bit word).
_SIZE = re.compile(r"^\s*([0-9]+)\s*([kmgtp]?)([bw]?)\s*\Z", re.IGNORECASE | re.ASCII)
_MULT = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
SIZE_HINT = "an integer with an optional unit b, kb, mb, gb, tb, w (8-byte words), kw, mw, gw; e.g. 100mb"
WALLTIME_HINT = "seconds, MM:SS, HH:MM:SS or DD:HH:MM:SS"
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")


def parse_size(text: str) -> int:
    """Parse a Torque size (``100mb``, ``2GB``, ``16w``, ``4096``) into bytes. Raises ValueError."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r}")
    number, mult, unit = m.groups()
    if mult and not unit:
        # "64m" is Docker's spelling, not Torque's; refuse rather than guess which one the user meant.
        raise ValueError(f"not a size: {text!r}")
    value = int(number) * _MULT[mult.lower()]
    return value * 8 if unit.lower() == "w" else value


def parse_walltime(text: str) -> int:
    """Parse a walltime (``3600``, ``30:00``, ``01:00:00``, ``1:00:00:00``) into seconds. Raises ValueError."""
    parts = str(text).strip().split(":")
    if not 1 <= len(parts) <= 4 or not all(p.isdigit() and p.isascii() for p in parts):
        raise ValueError(f"not a walltime: {text!r}")
    nums = [int(p) for p in parts]
    # Only the leading field may overflow (100:00:00 is a valid walltime); 1:75 is a typo.
    if any(n >= lim for n, lim in zip(reversed(nums[1:]), (60, 60, 24))):
        raise ValueError(f"not a walltime: {text!r}")
    weights = (1, 60, 3600, 86400)
    return sum(n * w for n, w in zip(reversed(nums), weights))


@dataclass(frozen=True)
class NodeSpec:
    """One ``+``-separated part of ``nodes=``: either a count (``2:ppn=4``) or a host (``node1:ppn=2``)."""

    count: int
    host: Optional[str]
    ppn: int
    gpus: int
    properties: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Resources:
    """A job's requested resources. Sizes in bytes, walltime in seconds; None when not requested."""

    nodes: Tuple[NodeSpec, ...] = ()
    ncpus: Optional[int] = None
    mem: Optional[int] = None
    pmem: Optional[int] = None
    walltime: Optional[int] = None
    cput: Optional[int] = None          # CPU time of the whole job, seconds (Torque ``cput=``)
    gpus: Optional[int] = None
    extra: Tuple[Tuple[str, str], ...] = ()
    raw: str = ""

    @property
    def node_count(self) -> int:
        """Total number of nodes requested (1 when ``nodes=`` was not given)."""
        return sum(n.count for n in self.nodes) if self.nodes else 1

    @property
    def ppn(self) -> Optional[int]:
        """Processors per node: the largest ``ppn`` of any node spec (None without ``nodes=``)."""
        return max(n.ppn for n in self.nodes) if self.nodes else None

    def cpus_on(self, host: Optional[str] = None) -> Optional[int]:
        """CPUs this job may use on ``host``: ``ncpus`` if given, else ``ppn`` times nodes-on-this-node.

        A host list naming ``host`` (short names compared) sums the ppn of every part naming it
        (``vm+vm:ppn=2`` gives 3). Otherwise each allocated node gets its spec's ppn; with mixed specs we
        take the largest, because under-allocating would slow a job down and over-allocating is what the
        batch system's own cgroup (when present) will correct.
        """
        if self.ncpus is not None:
            return self.ncpus
        if not self.nodes:
            return None
        if host:
            short = host.split(".")[0]
            named = [n for n in self.nodes if n.host and n.host.split(".")[0] == short]
            if named:
                return sum(n.ppn * n.count for n in named)
        return self.ppn

    def memory_on(self, host: Optional[str] = None) -> Optional[int]:
        """Memory limit in bytes: ``mem`` if given, else ``pmem`` times the CPUs on this node."""
        if self.mem is not None:
            return self.mem
        if self.pmem is not None:
            return self.pmem * (self.cpus_on(host) or 1)
        return None

    def to_dict(self) -> dict:
        """A JSON-safe summary (used by ``cbatch check`` and logs)."""
        return {"nodes": self.node_count, "ppn": self.ppn, "ncpus": self.ncpus, "mem": self.mem,
                "pmem": self.pmem, "walltime": self.walltime, "cput": self.cput, "gpus": self.gpus, "extra": dict(self.extra)}


def _error(item: str, problem: str, hint: str) -> JobError:
    return JobError("resource list", problem, item, hint)


def _parse_nodes(value: str, item: str) -> Tuple[NodeSpec, ...]:
    specs = []
    for part in value.split("+"):
        fields = part.split(":")
        head = fields[0].strip()
        if head.isdigit() and head.isascii():
            count, host = int(head), None
            if count < 1:
                raise _error(item, "node count must be at least 1", "nodes=N[:ppn=M] or host[:ppn=M]+host...")
        elif _HOST.match(head):
            count, host = 1, head
        else:
            raise _error(item, "malformed nodes", "nodes=N[:ppn=M] or host[:ppn=M]+host...")
        ppn, gpus, props = 1, 0, []
        for f in fields[1:]:
            key, eq, val = f.partition("=")
            key = key.strip().lower()
            if eq and key in ("ppn", "gpus"):
                if not (val.strip().isdigit() and val.strip().isascii()):
                    raise _error(item, f"malformed {key}", f"{key}=<positive integer>")
                n = int(val)
                if key == "ppn":
                    if n < 1:
                        raise _error(item, "ppn must be at least 1", "ppn=<positive integer>")
                    ppn = n
                else:
                    gpus = n
            else:
                # Node properties (":bigmem") and keys we do not model stay as properties.
                props.append(f.strip())
        specs.append(NodeSpec(count=count, host=host, ppn=ppn, gpus=gpus, properties=tuple(props)))
    return tuple(specs)


def parse_resource_list(text: str) -> Resources:
    """Parse Torque's comma-separated resource list (keys case-insensitive). Raises JobError.

    ``nodes`` may be ``2:ppn=4``, ``node1+node2:ppn=2`` or a mix; sizes use :func:`parse_size`, walltime
    :func:`parse_walltime`. Unknown keys are kept in ``extra``; an empty string gives empty Resources.
    """
    text = text or ""
    values: dict = {}
    extra = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        value = value.strip()
        if not eq or not key:
            raise _error(item, "malformed resource", "key=value[,key=value...]")
        if key in values:
            raise _error(item, "resource given twice", "give each resource once")
        try:
            if key == "nodes":
                values[key] = _parse_nodes(value, item)
            elif key in ("mem", "pmem"):
                values[key] = parse_size(value)
            elif key in ("walltime", "cput"):
                # Torque writes cput in walltime's format (HH:MM:SS, or plain seconds).
                values[key] = parse_walltime(value)
            elif key in ("ncpus", "gpus"):
                if not (value.isdigit() and value.isascii()):
                    raise ValueError(value)
                values[key] = int(value)
            else:
                extra.append((key, value))
        except ValueError as exc:
            hint = {"mem": SIZE_HINT, "pmem": SIZE_HINT, "walltime": WALLTIME_HINT,
                    "cput": WALLTIME_HINT}.get(key, "a non-negative integer")
            raise _error(item, f"malformed {key}", hint) from exc
    gpus = values.get("gpus")
    if gpus is None and "nodes" in values and any(n.gpus for n in values["nodes"]):
        gpus = max(n.gpus for n in values["nodes"])
    return Resources(nodes=values.get("nodes", ()), ncpus=values.get("ncpus"), mem=values.get("mem"),
                     pmem=values.get("pmem"), walltime=values.get("walltime"), cput=values.get("cput"), gpus=gpus,
                     extra=tuple(extra), raw=text)
