"""TM tasks joining a direct container: ``runc exec`` of the task, with the Docker engine's exec interface
(mixed into :class:`cbatch.engines.direct.DirectEngine`).

:mod:`cbatch.daemon.tasks` proxies a task's stdio through a socket carrying Docker's multiplexed frames
(8-byte header: stream, 3 zero bytes, big-endian length). Here that socket is one end of a socketpair; two
threads frame the task's stdout/stderr pipes onto it and a third copies its stdin from it, so the daemon's
task code is the same for both engines. The task runs through the helper like the job (as the job's numeric
ids, no capability, ``noNewPrivileges``, the container's seccomp filter loaded by ``cbatch-filter`` first). TM tasks are not the hot path.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import uuid
from typing import Dict, List, Optional, Sequence, Tuple

from cbatch.core.errors import EngineError
from cbatch.engines import bundles, ocispec
from cbatch.engines.identity import helper_argv

_HEADER = struct.Struct(">BxxxL")
EXEC_PREFIX = "exec-"


class DirectExecOps:
    """``exec_start`` / ``exec_state`` for the direct engine (needs ``sealed_runc``, ``root``, ``_meta``, ``_dir``)."""

    def exec_start(self, cid: str, argv: List[str], env: Dict[str, str], workdir: str, uid: int, gid: int,
                   groups: Sequence[int], umask: Optional[int] = None) -> Tuple[str, socket.socket]:
        """Start ``argv`` in the running direct container ``cid``; ``(exec id, framed stdio socket)``."""
        meta = self._meta(cid)
        if meta is None or self.status(cid) != "running":
            raise EngineError("container", "not running", cid, "the job's container has ended")
        eid = cid + "/" + EXEC_PREFIX + uuid.uuid4().hex[:12]
        user: dict = {"uid": uid, "gid": gid, "additionalGids": list(groups)}
        if umask is not None:
            user["umask"] = umask
        args = helper_argv([], list(argv), cid[:24])
        if meta.get("seccomp") == "loader":     # else a container of an older cbatchd: runc applies its section
            args = ocispec.filtered(args)
        process = {"terminal": False, "user": user, "args": args,
                   "env": [f"{k}={v}" for k, v in env.items()], "cwd": workdir or "/",
                   "capabilities": {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")},
                   "noNewPrivileges": True}
        path = os.path.join(self._dir(cid), eid.rsplit("/", 1)[1] + ".json")
        bundles.write_json(path, process)
        try:
            with self.sealed_runc.executable() as runc:
                proc = subprocess.Popen(["runc", "--root", self.root, "exec", "--process", path, meta["name"]],
                                        executable=runc, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            os.unlink(path)
            raise EngineError("container", "exec failed", cid, str(exc)) from exc
        ours, theirs = socket.socketpair()
        state = {"proc": proc, "code": None}
        self._execs[eid] = state
        outs = [threading.Thread(target=_frame, args=(pipe, ours, n), daemon=True)
                for pipe, n in ((proc.stdout, 1), (proc.stderr, 2))]
        for t in outs:
            t.start()
        threading.Thread(target=_feed, args=(ours, proc.stdin), daemon=True).start()

        def reap() -> None:
            for t in outs:
                t.join()
            state["code"] = proc.wait()
            try:
                os.unlink(path)     # runc read it long ago; the bundle's removal would take it anyway
            except OSError:
                pass
            try:
                ours.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            ours.close()
        threading.Thread(target=reap, daemon=True).start()
        return eid, theirs

    def exec_state(self, eid: str) -> Tuple[bool, Optional[int], int]:
        """``(running, exit code or None, host pid)`` of a task started by :meth:`exec_start`."""
        state = self._execs.get(eid)
        if state is None:
            raise EngineError("exec", "not found", eid)
        proc = state["proc"]
        code = state["code"]
        if code is None:
            return True, None, proc.pid
        self._execs.pop(eid, None)
        return False, (128 - code if code < 0 else code), proc.pid


def _frame(pipe, sock: socket.socket, stream: int) -> None:
    """Copy ``pipe`` onto ``sock`` as Docker frames of ``stream``."""
    try:
        while True:
            data = os.read(pipe.fileno(), 65536)
            if not data:
                return
            sock.sendall(_HEADER.pack(stream, len(data)) + data)
    except OSError:
        return
    finally:
        pipe.close()


def _feed(sock: socket.socket, pipe) -> None:
    """Copy the task's stdin from ``sock`` into its pipe; EOF closes it."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return
            pipe.write(data)
            pipe.flush()
    except OSError:
        return
    finally:
        try:
            pipe.close()
        except OSError:
            pass
