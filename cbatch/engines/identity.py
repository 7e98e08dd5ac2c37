"""What a container needs so that its ids come from the host only, and its ports keep the host's rule.

Docker and runc resolve ``user`` and ``group_add`` in the image's /etc/passwd and /etc/group (a group_add
entry is matched as a NAME first: an image group named ``1003`` with gid 0 becomes the job's). So a non-root
job's container starts as numeric ``0:0`` with only :data:`IDS_CAPS`, and the helper sets the host's exact
numbers itself (:func:`helper_ids_args`) before anything else runs. No I/O beyond reading two host files.
"""

from __future__ import annotations

import os
from typing import Iterable, List

from cbatch.core.errors import EngineError
from cbatch.core.spec import HELPER_PATH

# What the container's root keeps until the helper drops to the job's ids: set*id and emptying the
# bounding set. Nothing else; nothing of it survives the drop.
IDS_CAPS = ["SETUID", "SETGID", "SETPCAP"]
INIT_CANDIDATES = ("/usr/bin/docker-init", "/usr/libexec/docker/docker-init", "/usr/local/bin/docker-init",
                   "/usr/bin/tini-static")
UNPRIV_PORT_SYSCTL = "net.ipv4.ip_unprivileged_port_start"
PRIVILEGED_PORTS = 1024


def helper_ids_args(uid: int, gid: int, groups: Iterable[int]) -> List[str]:
    """The helper options that make a process started as 0:0 become exactly ``uid:gid`` with ``groups``.

    For the container's entrypoint and for ``docker exec`` alike (run the helper as user ``0:0``, then
    ``--ids ... -- CMD``). Numbers only: nothing is looked up, in the image or anywhere.
    """
    groups = tuple(groups)
    nums = [uid, gid, *groups]
    if any(isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < 2 ** 32 - 1 for n in nums):
        raise EngineError("identity", "not a numeric id", nums)
    return ["--ids", f"{int(uid)}:{int(gid)}:" + ",".join(str(int(g)) for g in groups)]


def init_binary() -> str:
    """The host path of the engine's static tini (what ``docker run --init`` would use)."""
    for path in INIT_CANDIDATES:
        if os.path.isfile(path):
            return os.path.realpath(path)
    raise EngineError("init", "not found", " ".join(INIT_CANDIDATES), "install tini (docker-init)")


def host_unprivileged_port_start() -> int:
    """The host's ``net.ipv4.ip_unprivileged_port_start``, never below 1024 (the job keeps the host's rule)."""
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as fh:
            return max(PRIVILEGED_PORTS, int(fh.read().strip()))
    except (OSError, ValueError):
        return PRIVILEGED_PORTS


def helper_argv(opts: List[str], argv: List[str], what: str) -> List[str]:
    """The helper's command line: ``/.cbatch/exec OPTS -- ARGV``. The one place both a container start and
    an exec into a running container (TM tasks) build it, so options every command needs go here once."""
    if any("\0" in a for a in list(argv) + list(opts)):
        raise EngineError("container", "NUL byte in the command", what)
    return [HELPER_PATH] + list(opts) + ["--"] + list(argv)
