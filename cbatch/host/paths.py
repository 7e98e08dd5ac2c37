"""Host paths *as a given user would see them*: the policy's resolver, and the opener mount pinning uses.

A root daemon must not resolve a user's mount source with its own rights: ``realpath`` as root follows
symlinks into directories the user cannot enter and would "prove" paths the user cannot access. So when
running as root we fork, drop to the user's groups/gid/uid in the child, do the work there, and send the
answer (and any fds, as SCM_RIGHTS) back over a socketpair. When not root, only our own uid can be served,
in-process. :func:`resolve_as_user` returns a canonical path; :func:`open_all_as_user` walks canonical paths
again, one component at a time without following symlinks, and returns an ``O_PATH`` fd pinning the object
(see :mod:`cbatch.daemon.pinning`).

Stdlib only.
"""

from __future__ import annotations

import array
import errno
import os
import signal
import socket
import stat
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from cbatch.core.errors import PolicyError
from cbatch.host import forkserver, waitfd

TIMEOUT = 10.0      # a hung NFS mount must not hang the daemon's start request forever
MAX_FDS = 200       # fds per SCM_RIGHTS message (the kernel's SCM_MAX_FD is 253)
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class _Changed(OSError):
    """A component of a checked canonical path is a symlink now (it was swapped after the check)."""


def _resolve_here(path: str) -> str:
    """realpath with our current rights; OSError if missing or inaccessible."""
    real = os.path.realpath(path, strict=True)
    st = os.stat(real)
    want = os.R_OK | (os.X_OK if stat.S_ISDIR(st.st_mode) else 0)
    # access() checks the real uid, which after setuid() in the child (or in-process non-root) is the user.
    if not os.access(real, want):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), real)
    return real


def _open_here(path: str) -> int:
    """An O_PATH fd for canonical ``path``, walked from ``/`` without following any symlink.

    Each ``openat`` is a lookup with our current rights, so search permission on every directory on the
    way is checked as the user; a component that is a symlink now raises :class:`_Changed`.
    """
    fd = os.open("/", _PATH_FLAGS | os.O_DIRECTORY)
    try:
        for name in [p for p in path.split("/") if p]:
            if name in (".", ".."):
                raise OSError(errno.EINVAL, "not a canonical path", path)
            nxt = os.open(name, _PATH_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise _Changed(errno.ELOOP, "a symlink appeared", path)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _error(path: str, exc_errno: int) -> PolicyError:
    if exc_errno == errno.ENOENT:
        return PolicyError("path", "no such file or directory", path, "check the path exists on this node")
    if exc_errno in (errno.EACCES, errno.EPERM):
        return PolicyError("path", "permission denied", path, "the job's user cannot access it")
    if exc_errno == errno.ETIMEDOUT:
        return PolicyError("path", "timed out resolving", path, "a hung filesystem?")
    return PolicyError("path", f"cannot resolve ({os.strerror(exc_errno)})", path)


def _changed(path: str) -> PolicyError:
    return PolicyError("mount", "changed while being checked", path, "a symlink appeared; refusing")


# A unit of work run as the user: returns (payload, fds to hand back). A failure is an OSError whose
# ``filename`` names the path at fault (``_Changed`` for a swapped symlink).
Work = Callable[[], Tuple[bytes, List[int]]]


def _work(kind: bytes, paths: Sequence[str], pin: bool) -> Work:
    """The unit of work a request names, run as the user (in a child, or in-process when not root):
    ``resolve`` one path (its canonical form), ``many`` paths (each answer ``+``/``-`` and the canonical
    form, ``""`` for one that failed; with ``pin`` an O_PATH fd per new canonical path, ``+`` marking whose),
    or ``open`` canonical paths (an O_PATH fd each, no symlink followed). Anything else raises ValueError."""
    if kind == b"resolve" and len(paths) == 1:
        def resolve() -> Tuple[bytes, List[int]]:
            try:
                return os.fsencode(_resolve_here(paths[0])), []
            except OSError as exc:
                exc.filename = paths[0]     # report the path as the user wrote it
                raise
        return resolve
    if kind == b"many":
        def many() -> Tuple[bytes, List[int]]:
            out, fds, seen = [], [], set()
            for path in paths:
                try:
                    real = _resolve_here(path)
                except OSError:
                    out.append(b"")         # a canonical path is never empty: "" means "ask again, alone"
                    continue
                flag = b"-"
                if pin and real not in seen:
                    try:
                        fds.append(_open_here(real))
                        flag = b"+"         # this answer's fd is the next one sent
                        seen.add(real)
                    except OSError:
                        pass
                out.append(flag + os.fsencode(real))
            return b"\0".join(out), fds
        return many
    if kind == b"open":
        def open_all() -> Tuple[bytes, List[int]]:
            fds: List[int] = []
            path = ""
            try:
                for path in paths:
                    fds.append(_open_here(path))
            except OSError as exc:
                _close_all(fds)
                exc.filename = path
                raise
            return b"", fds
        return open_all
    raise ValueError(f"unknown work {kind!r}")


def _report(exc: OSError) -> bytes:
    kind = b"L" if isinstance(exc, _Changed) else b"E"
    return kind + str(exc.errno or errno.EIO).encode() + b"\0" + os.fsencode(str(exc.filename or ""))


def _child(sock: socket.socket, identity, work: Work) -> None:
    """Runs in the forked child; never returns."""
    code = 0
    try:
        os.setgroups(list(identity.groups))
        os.setgid(identity.gid)
        os.setuid(identity.uid)
        payload, fds = work()
        for i in range(0, len(fds), MAX_FDS):
            socket.send_fds(sock, [b"F"], fds[i:i + MAX_FDS])
        result = b"\0" + payload
    except OSError as exc:
        result = _report(exc)
    except BaseException:  # noqa: BLE001 - the child must never run on into the parent's code
        result = b"E" + str(errno.EIO).encode() + b"\0"
        code = 1
    try:
        sock.send(result)
    finally:
        os._exit(code)


def _as_user(identity, kind: bytes, paths: Sequence[str], pin: bool, what: str) -> Tuple[bytes, List[int]]:
    """Run the work ``kind`` names (:func:`_work`) with ``identity``'s rights; its payload and fds, or the
    PolicyError it ended in.

    Root has a child drop privileges and do it: one of the fork server's (:mod:`cbatch.host.forkserver`,
    cheap) when cbatchd runs one, else a fork of this process. Anyone else may only act as themselves,
    in-process. ``what`` names the request in errors that have no path of their own.
    """
    work = _work(kind, paths, pin)
    if os.geteuid() != 0:
        if identity.uid != os.geteuid():
            raise PolicyError("path", "cannot resolve paths as another user without root", identity.user)
        try:
            return work()
        except _Changed as exc:
            raise _changed(exc.filename or what) from exc
        except OSError as exc:
            raise _error(exc.filename or what, exc.errno or errno.EIO) from exc
    fields = [kind, b"1" if pin else b"0", str(identity.uid).encode(), str(identity.gid).encode(),
              b",".join(str(g).encode() for g in identity.groups)] + [os.fsencode(p) for p in paths]
    served = forkserver.spawn(fields)
    if served is not None:
        return _collect(served, 0, what)
    # SEQPACKET keeps each message (and the fds riding on it) whole.
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        parent.close()
        _child(child, identity, work)
    child.close()
    return _collect(parent, pid, what)


def _collect(parent: socket.socket, pid: int, what: str) -> Tuple[bytes, List[int]]:
    """The answer of the child at the other end of ``parent``: our own child ``pid``, or (``pid`` 0) one of the
    fork server's, whose first message is its pidfd. Killed at :data:`TIMEOUT`; closes ``parent``."""
    fds: List[int] = []
    pidfd = -1
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                if pid:
                    os.kill(pid, signal.SIGKILL)
                elif pidfd >= 0:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                raise _error(what, errno.ETIMEDOUT)
            if not waitfd.readable(parent, left):
                continue
            data, got = _recv(parent)
            if not pid and pidfd < 0 and data == b"P" and len(got) == 1:
                pidfd = got[0]
                continue
            fds += got
            if data != b"F":
                break
    except BaseException:
        _close_all(fds)
        raise
    finally:
        parent.close()
        if pid:
            os.waitpid(pid, 0)
        if pidfd >= 0:
            os.close(pidfd)
    if data[:1] == b"\0":
        return data[1:], fds
    _close_all(fds)
    head, _, name = data[1:].partition(b"\0")
    path = os.fsdecode(name) or what
    if data[:1] == b"L":
        raise _changed(path)
    try:
        code = int(head.decode() or errno.EIO)
    except ValueError:
        code = errno.EIO
    raise _error(path, code)


class _Who:
    """The identity a fork server's child acts as (what :func:`_child` needs of a core.job.Identity)."""

    def __init__(self, uid: int, gid: int, groups: Sequence[int]) -> None:
        self.uid, self.gid, self.groups = uid, gid, tuple(groups)


def serve(fields: List[bytes], sock: socket.socket) -> None:
    """The fork server's child (:func:`cbatch.host.forkserver.start` is given this): the request
    :func:`_as_user` sent, served exactly as its own forked child would. Never returns."""
    try:
        kind, pin, uid, gid, groups = fields[:5]
        who = _Who(int(uid), int(gid), [int(g) for g in groups.split(b",") if g])
        work = _work(kind, [os.fsdecode(p) for p in fields[5:]], pin == b"1")
    except (ValueError, TypeError):
        os._exit(1)             # not a request _as_user makes: the daemon sees EOF, an error
    _child(sock, who, work)


def start_forkserver() -> int:
    """Start cbatchd's fork server for the children that act as a user (this module run by the daemon's own
    interpreter, isolated); its pid."""
    return forkserver.start([sys.executable, "-I", "-m", "cbatch.host.paths"])


def _recv(sock: socket.socket) -> Tuple[bytes, List[int]]:
    """One message and its fds, close-on-exec from the start (socket.recv_fds drops the flag before 3.12)."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * fds.itemsize),
                                                socket.MSG_CMSG_CLOEXEC)
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
    return data, list(fds)


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _checked(path: str) -> None:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise PolicyError("path", "not an absolute path", path)


def resolve_as_user(path: str, identity) -> str:
    """Return the canonical form of ``path`` (symlinks and ``..`` resolved) as ``identity`` sees it.

    The path must exist and be readable (directories: searchable) by that user. Raises PolicyError
    otherwise, or when not root and asked to resolve for another uid.
    """
    _checked(path)
    return os.fsdecode(_as_user(identity, b"resolve", [path], False, path)[0])


BATCH_BYTES = 60000     # one answer of a batched resolve must fit one SEQPACKET message (65536)


def resolve_many_as_user(paths: Sequence[str], identity) -> Dict[str, str]:
    """Canonical forms of those of ``paths`` that ``identity`` can resolve, all in ONE child (a fork of the
    daemon costs milliseconds; a job start resolves five paths). A path missing from the answer failed:
    :func:`resolve_as_user` on it gives its exact error. Same rights and checks as :func:`resolve_as_user`."""
    return _resolve_many(paths, identity, False)[0]


def _resolve_many(paths: Sequence[str], identity, pin: bool) -> Tuple[Dict[str, str], Dict[str, int]]:
    """:func:`resolve_many_as_user`; with ``pin`` also an O_PATH fd per canonical path, opened in the same
    child right after its resolve as :func:`open_all_as_user` would (``{canonical: fd}``; a path whose walk
    failed has none: opened alone later, it gives its exact error)."""
    paths = [p for p in dict.fromkeys(paths) if isinstance(p, str) and p.startswith("/") and "\0" not in p]
    if not paths or sum(len(os.fsencode(p)) + 2 for p in paths) * 2 > BATCH_BYTES:
        return {}, {}

    try:
        payload, fds = _as_user(identity, b"many", paths, pin, ", ".join(paths)[:200])
    except PolicyError:
        return {}, {}
    answers = payload.split(b"\0")
    if len(answers) != len(paths) or sum(a[:1] == b"+" for a in answers) != len(fds):
        _close_all(fds)
        return {}, {}
    known, opened, left = {}, {}, list(fds)
    for path, answer in zip(paths, answers):
        if answer:
            known[path] = os.fsdecode(answer[1:])
            if answer[:1] == b"+":
                opened[known[path]] = left.pop(0)
    return known, opened


class BatchResolver:
    """A resolver for the policy (same contract as :func:`resolve_as_user`) that resolved ``paths`` as
    ``identity`` up front in one child; any other path or identity, or one that failed, is resolved alone.

    The child runs at the first call (a decision that resolves nothing, a native job, forks nothing).
    ``opened``: with ``pin``, an O_PATH fd per canonical path from that child, for
    :func:`cbatch.daemon.pinning.pin` (one fork per start, not two). The caller closes them (:meth:`close`;
    also when garbage-collected)."""

    def __init__(self, paths: Sequence[str], identity, pin: bool = False) -> None:
        self.identity = identity
        self.known: Dict[str, str] = {}
        self.opened: Dict[str, int] = {}
        self._todo: Optional[Tuple[List[str], bool]] = ([p for p in paths if p], pin)

    def __call__(self, path: str, who) -> str:
        if self._todo is not None:
            todo, self._todo = self._todo, None
            self.known, self.opened = _resolve_many(todo[0], self.identity, todo[1])
        if who is self.identity and path in self.known:
            return self.known[path]
        return resolve_as_user(path, who)

    def close(self) -> None:
        """Close the fds in :attr:`opened` (idempotent)."""
        self._todo = None
        opened, self.opened = self.opened, {}
        _close_all(list(opened.values()))

    def __del__(self) -> None:
        self.close()


def batch_resolver(paths: Sequence[str], identity, pin: bool = False) -> BatchResolver:
    """A :class:`BatchResolver` for ``paths`` as ``identity`` (with ``pin``, holding their O_PATH fds)."""
    return BatchResolver(paths, identity, pin)


def open_all_as_user(paths: Sequence[str], identity) -> List[int]:
    """O_PATH fds (close-on-exec, the caller closes them) for canonical ``paths``, opened as ``identity``.

    One child for all paths. Every component is looked up without following symlinks, with the user's
    search permissions: a path whose component became a symlink after it was resolved is refused with
    ``cbatch: mount: changed while being checked: <path> (a symlink appeared; refusing)``; a path the user
    cannot reach with ``permission denied``.
    """
    for path in paths:
        _checked(path)

    fds = _as_user(identity, b"open", paths, False, ", ".join(paths)[:200])[1]
    if len(fds) != len(paths):
        _close_all(fds)
        raise PolicyError("mount", "could not pin all sources", f"{len(fds)} of {len(paths)}")
    return fds


if __name__ == "__main__":     # the fork server (start_forkserver): argv[1] is its control socket
    forkserver.serve_forever(int(sys.argv[1]), serve)
