"""One sealed in-memory copy of runc for every runc the direct engine starts.

A container must never be able to rewrite the host's runc through ``/proc/<pid>/exe`` (CVE-2019-5736), so
runc 1.1's ``runc init`` makes sure it runs from a copy first: at every container start (and every ``runc
exec``) it bind-mounts its own binary read-only in the host's mount namespace, unmounts it again and
re-executes itself from it - two mount events that every mount namespace sharing the host's mounts and
systemd (which rereads mountinfo at each) see, and one more exec, per start. runc skips all of that when it
already runs from a fully sealed memfd (``is_self_cloned`` in runc's nsenter/cloned_binary.c: seals
SEAL | SHRINK | GROW | WRITE, which nobody can ever lift or write past). This module keeps one such copy per
daemon and hands it out as a path under ``/proc/<pid>/fd`` (execve opens the file before it closes close-on-exec
descriptors; the shim gets it as its fd 5): the new runc's ``/proc/self/exe`` is the sealed copy.

The copy follows the file: each use compares the file's identity (device, inode, size, mtime, ctime) with
the copy's and makes a new copy when the package was upgraded. A replaced copy is closed only when the last
use of it ends (its descriptor number must not name another file while a start is about to exec it).
Where no copy can be made (no memfd, no seals), runc's own path is used and runc copies itself as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from typing import Iterator, Optional, Tuple

log = logging.getLogger("cbatchd")

SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE   # runc's RUNC_MEMFD_SEALS


def _identity(st: os.stat_result) -> Tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def sealed_copy(path: str) -> Tuple[int, Tuple[int, ...]]:
    """A close-on-exec memfd holding the file at ``path``, sealed as runc expects, and the identity of the
    file it copied (read through one descriptor, so the two agree). Raises OSError."""
    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(src)
        fd = os.memfd_create("runc", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            left = st.st_size
            while left > 0:
                sent = os.sendfile(fd, src, None, left)
                if sent == 0:
                    raise OSError(f"{path}: shorter than its size while copied")
                left -= sent
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        except BaseException:
            os.close(fd)
            raise
        return fd, _identity(st)
    finally:
        os.close(src)


class _Copy:
    def __init__(self, fd: int, ident: Tuple[int, ...]) -> None:
        self.fd, self.ident, self.users, self.retired = fd, ident, 0, False


class SealedRunc:
    """The sealed copy of the runc at ``path`` (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._copy: Optional[_Copy] = None
        self._failed: Optional[str] = None      # the last reason no copy could be made (logged once)

    def _current(self) -> Optional[_Copy]:
        """The copy matching the file now (made or replaced here); None when none can be made. Locked."""
        try:
            ident = _identity(os.stat(self.path))
        except OSError:
            ident = None
        if self._copy is not None and self._copy.ident == ident:
            return self._copy
        try:
            fd, made = sealed_copy(self.path)
        except OSError as exc:
            if self._failed != str(exc):
                log.warning("runc: no sealed copy of %s (%s): runc copies itself at every start", self.path, exc)
                self._failed = str(exc)
            return None
        self._failed = None
        old, self._copy = self._copy, _Copy(fd, made)
        if old is not None:
            log.info("runc: %s changed: a new sealed copy (fd %d) for the starts from now on", self.path, fd)
            self._retire(old)
        return self._copy

    def _retire(self, copy: _Copy) -> None:
        copy.retired = True
        if copy.users == 0:
            os.close(copy.fd)

    @contextlib.contextmanager
    def use(self) -> Iterator[Optional[int]]:
        """The sealed copy's descriptor (None: use :attr:`path`) for one exec; it stays open until the block
        ends, so exec inside it (``/proc/self/fd/N``, or a descriptor handed to a child)."""
        with self._lock:
            copy = self._current()
            if copy is not None:
                copy.users += 1
        try:
            yield None if copy is None else copy.fd
        finally:
            if copy is not None:
                with self._lock:
                    copy.users -= 1
                    if copy.retired and copy.users == 0:
                        os.close(copy.fd)

    @contextlib.contextmanager
    def executable(self) -> Iterator[str]:
        """The path a child of this process execs runc by within the block: the sealed copy as
        ``/proc/<our pid>/fd/N`` (a child that closes its inherited descriptors before exec, as subprocess does,
        still finds it in ours, held open for the block), else the file."""
        with self.use() as fd:
            yield self.path if fd is None else f"/proc/{os.getpid()}/fd/{fd}"

    def close(self) -> None:
        """Let go of the current copy (closed once no start uses it). Idempotent."""
        with self._lock:
            old, self._copy = self._copy, None
            if old is not None:
                self._retire(old)
