"""Canonicalise a host path *as a given user would see it* - the resolver the policy is given.

A root daemon must not resolve a user's mount source with its own rights: ``realpath`` as root follows
symlinks into directories the user cannot enter and would "prove" paths the user cannot access. So when
running as root we fork, drop to the user's groups/gid/uid in the child, resolve there, and send the answer
back through a pipe. When not root, only our own uid can be resolved, in-process.

Stdlib only.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import stat
import time

from cbatch.errors import PolicyError

TIMEOUT = 10.0      # a hung NFS mount must not hang the daemon's start request forever


def _resolve_here(path: str) -> str:
    """realpath with our current rights; OSError if missing or inaccessible."""
    real = os.path.realpath(path, strict=True)
    st = os.stat(real)
    want = os.R_OK | (os.X_OK if stat.S_ISDIR(st.st_mode) else 0)
    # access() checks the real uid, which after setuid() in the child (or in-process non-root) is the user.
    if not os.access(real, want):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), real)
    return real


def _error(path: str, exc_errno: int) -> PolicyError:
    if exc_errno == errno.ENOENT:
        return PolicyError("path", "no such file or directory", path, "check the path exists on this node")
    if exc_errno in (errno.EACCES, errno.EPERM):
        return PolicyError("path", "permission denied", path, "the job's user cannot access it")
    if exc_errno == errno.ETIMEDOUT:
        return PolicyError("path", "timed out resolving", path, "a hung filesystem?")
    return PolicyError("path", f"cannot resolve ({os.strerror(exc_errno)})", path)


def _child(r: int, w: int, path: str, identity) -> None:
    """Runs in the forked child; never returns."""
    code = 0
    try:
        os.close(r)
        os.setgroups(list(identity.groups))
        os.setgid(identity.gid)
        os.setuid(identity.uid)
        result = b"\0" + os.fsencode(_resolve_here(path))
    except OSError as exc:
        result = b"\1" + str(exc.errno or errno.EIO).encode()
    except BaseException:  # noqa: BLE001 - the child must never run on into the parent's code
        result = b"\1" + str(errno.EIO).encode()
        code = 1
    try:
        os.write(w, result)
    finally:
        os._exit(code)


def resolve_as_user(path: str, identity) -> str:
    """Return the canonical form of ``path`` (symlinks and ``..`` resolved) as ``identity`` sees it.

    The path must exist and be readable (directories: searchable) by that user. Raises PolicyError
    otherwise, or when not root and asked to resolve for another uid.
    """
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise PolicyError("path", "not an absolute path", path)
    if os.geteuid() != 0:
        if identity.uid != os.geteuid():
            raise PolicyError("path", "cannot resolve paths as another user without root", identity.user)
        try:
            return _resolve_here(path)
        except OSError as exc:
            raise _error(path, exc.errno or errno.EIO) from exc
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _child(r, w, path, identity)
    os.close(w)
    try:
        data = b""
        deadline = time.monotonic() + TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                raise _error(path, errno.ETIMEDOUT)
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    if data[:1] == b"\0":
        return os.fsdecode(data[1:])
    try:
        code = int(data[1:].decode() or errno.EIO)
    except ValueError:
        code = errno.EIO
    raise _error(path, code)
