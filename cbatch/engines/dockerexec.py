"""docker exec into a running container: TM tasks joining their job's container (mixed into
:class:`cbatch.engines.docker.Engine`, which provides ``api`` and ``_call``)."""

from __future__ import annotations

import socket
from typing import Dict, List, Optional, Sequence, Tuple

from cbatch.core.spec import HELPER_PATH
from cbatch.engines.dockerimages import _gone
from cbatch.engines.identity import helper_argv, helper_ids_args


class ExecOps:
    """Exec operations of the engine."""

    def exec_start(self, cid: str, argv: List[str], env: Dict[str, str], workdir: str, uid: int, gid: int,
                   groups: Sequence[int], umask: Optional[int] = None) -> Tuple[str, socket.socket]:
        """Start ``argv`` in the running container ``cid`` as exactly ``uid:gid`` + ``groups`` with exactly
        ``env`` and ``workdir`` (docker exec, no tty). Returns ``(exec id, attach socket)``: the socket carries
        the multiplexed stdin/stdout/stderr for :func:`cbatch.daemon.streams.pump`. The command goes through
        the helper like the container's own command (the same :func:`helper_argv`); as for the container, the
        exec starts as ``0:0`` and the helper drops to the numeric ids (the engine would resolve a user's
        supplementary groups from the image's own /etc/group)."""
        opts = ["--umask", "%04o" % umask] if umask is not None else []
        cmd = helper_argv(opts, argv, cid[:12])
        user = f"{uid}:{gid}"
        if uid != 0:
            cmd = [HELPER_PATH] + helper_ids_args(uid, gid, groups) + ["--"] + cmd
            user = "0:0"
        envl = [f"{k}={v}" for k, v in env.items()]
        res = self._call("exec create", cid, self.api.exec_create, cid, cmd, stdout=True, stderr=True,
                         stdin=True, tty=False, environment=envl, workdir=workdir or None, user=user)
        eid = res["Id"]
        sio = self._call("exec start", cid, self.api.exec_start, eid, socket=True)
        sock = getattr(sio, "_sock", sio)
        sock.settimeout(None)
        return eid, sock

    def exec_state(self, eid: str) -> Tuple[bool, Optional[int], int]:
        """``(running, exit code or None, host pid)`` of an exec started by :meth:`exec_start`."""
        res = self._call("exec inspect", eid, self.api.exec_inspect, eid)
        code = res.get("ExitCode")
        return bool(res.get("Running")), (int(code) if code is not None else None), int(res.get("Pid") or 0)

    def resize(self, cid: str, rows: int, cols: int) -> None:
        """Set the terminal size of a container started with ``Stdio(tty=True)``; a stopped one is fine."""
        self._call("resize", cid, self.api.resize, cid, height=int(rows), width=int(cols),
                   ok=lambda exc: _gone(exc) or getattr(exc, "status_code", None) == 409)

    def status(self, cid: str) -> str:
        """The container's state (``created``, ``running``, ``exited``, ...), or ``gone``."""
        attrs = self._call("inspect", cid, self.api.inspect_container, cid, ok=_gone)
        return str(((attrs or {}).get("State") or {}).get("Status") or "gone")

    def container_pid(self, cid: str) -> int:
        """The host pid of the container's init (0 when not running)."""
        return int(self._call("inspect", cid, self.api.inspect_container, cid)["State"]["Pid"])

    def cgroup_name(self, cid: str) -> str:
        """What the container's own cgroup path names it by (Docker: its full id)."""
        return cid

