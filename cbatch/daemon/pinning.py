"""Mount pinning: Docker bind-mounts the exact objects the policy approved, not whatever a path names later.

The policy resolves a user-controlled mount source as the user and checks the canonical path. Docker, as
root, would resolve that path again when it mounts it, so a user who swaps a directory for a symlink in
between (``renameat2(RENAME_EXCHANGE)`` in a loop) could have Docker mount anything root can reach. So just
before the container starts, :func:`pin` opens every user-controlled source again *as the user*
(:func:`cbatch.host.paths.open_all_as_user`: component by component, no symlink followed, the user's search
permissions), checks the fd still names the approved path, and bind-mounts the fd itself
(``/proc/self/fd/N``, a magic link to the exact object) onto a root-owned staging point
``<staging root>/<container name>/<index>``. The spec handed to Docker names the staging points, which
nobody but root can change. Once the container has started its own mount namespace holds the mounts, and
:func:`unpin` removes the staging points (also at the container's end, at unregister and at daemon start-up,
all idempotent). The daemon's start has the job's own paths opened that way already, in the child that
resolved them for the policy (one child per start, not two): :func:`pin` stages such an fd when it still
has its path and opens anything else as above.

Not pinned: ``/etc/passwd`` and ``/etc/group`` (root's read-only system files) and the caller's ``trusted``
mounts (the site mounts of the root-owned config, resolved by Docker as before).

Stdlib + ctypes (mount(2), umount2(2)).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import re
import stat
from dataclasses import dataclass
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple

from cbatch.core.errors import DaemonError, PolicyError
from cbatch.host.paths import open_all_as_user

MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
SYSTEM_FILES = ("/etc/passwd", "/etc/group")
_MANGLE = re.compile(rb"[ \t\n\\]")     # what mountinfo octal-escapes in a mount point
log = logging.getLogger("cbatchd")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


@dataclass(frozen=True)
class PinnedMounts:
    """The staging points :func:`pin` made for one container (``name``) under ``root``."""

    name: str
    root: str
    points: Tuple[str, ...] = ()      # in the order of the pinned spec.mounts
    held: Tuple[str, ...] = ()        # one per ``held`` fd


def _mount(source: Optional[str], target: str, flags: int) -> None:
    src = None if source is None else os.fsencode(source)
    if _libc.mount(src, os.fsencode(target), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _component(name: str) -> str:
    """A container name as one path component (it comes from policy.container_name; refuse anything else)."""
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise DaemonError("mount", "bad staging name", name)
    return name


def _mangled(path: str) -> bytes:
    """``path`` as /proc/self/mountinfo writes it: space, tab, newline and backslash octal-escaped."""
    return _MANGLE.sub(lambda m: b"\\%03o" % m.group()[0], os.fsencode(path))


def _mount_points(under: str) -> List[str]:
    """Mount points at or below ``under`` in our namespace, deepest first."""
    want = _mangled(under)
    prefix = _mangled(under.rstrip("/") + "/")
    found = []
    with open("/proc/self/mountinfo", "rb") as fh:
        data = fh.read()
    for line in data.split(b"\n"):
        fields = line.split(b" ", 5)
        if len(fields) < 5:
            continue
        # Field 5 is the mount point, escaped as _mangled does: compared escaped, only a match is decoded
        # (decoding every line of a busy node's mountinfo was most of a job's unpin time).
        if fields[4] == want or fields[4].startswith(prefix):
            found.append(fields[4].decode("unicode_escape").encode("latin-1").decode("utf-8", "surrogateescape"))
    return sorted(found, key=len, reverse=True)


def prepare(staging_root: str) -> None:
    """Create ``staging_root`` (parents 0700 root) and refuse one that is not a root-only directory."""
    os.makedirs(staging_root, mode=0o700, exist_ok=True)
    path = "/"
    for part in [p for p in staging_root.split("/") if p]:
        path = os.path.join(path, part)
        st = os.lstat(path)
        # A directory others can write on the way would let them swap the staging points themselves.
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or (st.st_mode & 0o022 and not st.st_mode & 0o1000):
            raise DaemonError("mount", "staging directory is not root-only", path,
                              "daemon.mount_dir and its parents must be root-owned, not group/world-writable")
    os.chmod(staging_root, 0o700)


def isolate(mount_dir: str) -> None:
    """Make ``mount_dir`` a private mount of its own (a bind onto itself), created root-only if missing.

    Mounts made below a private mount propagate nowhere from the moment they exist: on a host whose ``/``
    is shared (systemd), copies would otherwise appear in every peer and slave namespace, and outlive our
    unmount there once the staging point is private. dockerd must share cbatchd's mount namespace.
    """
    prepare(mount_dir)
    if mount_dir not in _mount_points(mount_dir):
        _mount(mount_dir, mount_dir, MS_BIND)
    _mount(None, mount_dir, MS_PRIVATE)


def _stage(fd: int, point: str) -> None:
    """Bind-mount the object open as ``fd`` onto a new staging point ``point`` (a directory or empty file)."""
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.mkdir(point, 0o700)
    else:
        os.close(os.open(point, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    # The magic link names the exact object, whatever its path names by now. MS_REC as Docker's own bind
    # would (submounts come along); private: nothing propagates out.
    _mount(f"/proc/self/fd/{fd}", point, MS_BIND | MS_REC)
    _mount(None, point, MS_PRIVATE | MS_REC)


def _still_there(fd: int, path: str) -> bool:
    """Does the object open as ``fd`` still have the canonical path ``path`` (not renamed, not moved)?"""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == path
    except OSError:
        return False


def pin(spec, identity, staging_root: str, trusted: Iterable = (),
        held: Sequence[int] = (), opened: Optional[Mapping[str, int]] = None) -> Tuple[object, PinnedMounts]:
    """Pin ``spec``'s user-controlled mount sources; return ``(spec naming the staging points, PinnedMounts)``.

    ``trusted`` are mounts (``spec.Mount``) not to pin, matched on source and target: the site mounts.
    ``held`` are fds the caller already holds (the client's stdout/stderr files): each is staged as it is,
    at ``PinnedMounts.held[i]``. ``opened``: O_PATH fds of canonical paths the caller already opened as the
    user the same way (:class:`cbatch.host.paths.BatchResolver` with ``pin``, in the child that resolved them;
    the caller keeps and closes them): a source whose fd still has its path is staged from it without another
    child; any other source is opened as the user here. Raises PolicyError (the path changed, or the user
    cannot reach it) or DaemonError (staging failed); on any failure nothing is left mounted.
    """
    skip = {(m.source, m.target) for m in trusted}
    todo = [i for i, m in enumerate(spec.mounts) if m.source not in SYSTEM_FILES and (m.source, m.target) not in skip]
    name = _component(spec.name)
    if not todo and not held:
        return spec, PinnedMounts(name, staging_root)
    prepare(staging_root)
    unpin(name, staging_root)          # a stale set for this name (a crash before the last unpin)
    ready = {}
    for i in todo:
        fd = (opened or {}).get(spec.mounts[i].source)
        if fd is not None and _still_there(fd, spec.mounts[i].source):
            ready[i] = fd           # the object the user reached at this path when it was resolved
    need = [i for i in todo if i not in ready]
    fds = open_all_as_user([spec.mounts[i].source for i in need], identity) if need else []
    ready.update(zip(need, fds))
    mounts = list(spec.mounts)
    base = os.path.join(staging_root, name)
    try:
        os.mkdir(base, 0o700)
        for i in todo:
            fd = ready[i]
            m = spec.mounts[i]
            if os.readlink(f"/proc/self/fd/{fd}") != m.source:
                # Renamed or moved under a bind mount since the check: not what the policy approved.
                raise PolicyError("mount", "changed while being checked", m.source, "it moved; refusing")
            _stage(fd, os.path.join(base, str(i)))
            mounts[i] = dataclasses.replace(m, source=os.path.join(base, str(i)))
        for k, fd in enumerate(held):
            _stage(fd, os.path.join(base, f"held-{k}"))
    except BaseException as exc:
        left = unpin(name, staging_root)
        if isinstance(exc, OSError):
            raise DaemonError("mount", f"cannot stage a bind mount ({exc.strerror})", exc.filename,
                              "left behind: " + ", ".join(left) if left else None) from exc
        raise
    finally:
        for fd in fds:
            os.close(fd)
    return dataclasses.replace(spec, mounts=tuple(mounts)), PinnedMounts(
        name, staging_root, tuple(mounts[i].source for i in todo),
        tuple(os.path.join(base, f"held-{k}") for k in range(len(held))))


def unpin(name: str, staging_root: str) -> List[str]:
    """Unmount and remove every staging point of container ``name``; return what is left (empty = clean).

    Idempotent. Never deletes recursively: only empty staging directories and the empty files made for
    file mounts are removed, so a mount that would not come off never exposes the user's files to deletion.
    """
    base = os.path.join(staging_root, _component(name))
    if not os.path.lexists(base):
        # Nothing can be mounted at or below a path that does not exist (a mount point cannot be removed
        # while mounted): the usual case for the stale-set check before pin and for a second release.
        return []
    points = _mount_points(base)
    for _ in range(3):                  # stacked mounts come off one layer per pass
        if not points:
            break
        for point in points:
            _libc.umount2(os.fsencode(point), MNT_DETACH)    # failures show as leftovers below
        points = _mount_points(base)
    mounted = set(points)
    try:
        entries = os.listdir(base)
    except FileNotFoundError:
        entries = []
    for entry in entries:
        point = os.path.join(base, entry)
        if point in mounted:
            continue
        try:
            if stat.S_ISDIR(os.lstat(point).st_mode):
                os.rmdir(point)
            else:
                os.unlink(point)
        except OSError:
            pass
    try:
        os.rmdir(base)
    except OSError:
        pass
    left = sorted(mounted)
    if os.path.lexists(base):
        left += [os.path.join(base, e) for e in sorted(os.listdir(base)) if os.path.join(base, e) not in mounted]
        left = left or [base]
    return left


def staged(staging_root: str) -> List[str]:
    """The container names that have a staging directory under ``staging_root``."""
    try:
        return sorted(e for e in os.listdir(staging_root) if os.path.isdir(os.path.join(staging_root, e)))
    except FileNotFoundError:
        return []


def release(staging_root: str, name: str) -> List[str]:
    """:func:`unpin`, logging one error line for anything left behind (daemon paths never fail on it)."""
    try:
        left = unpin(name, staging_root)
    except (OSError, DaemonError) as exc:
        left = [f"{os.path.join(staging_root, name)} ({exc})"]
    if left:
        log.error("%s", DaemonError(f"container {name}", "staging mounts left behind", ", ".join(left),
                                    "umount -l them, then remove the directories").message)
    return left


def _of_job(name: str, job_name: Optional[str]) -> bool:
    """Is ``name`` the container ``job_name`` or one of its ``cbatch run`` containers (``-run-<n>``)?"""
    if job_name is None:
        return True
    rest = name[len(job_name):] if name.startswith(job_name) else None
    return rest == "" or (rest is not None and rest.startswith("-run-") and rest[5:].isdigit())


def unpin_all(staging_root: str, job_name: Optional[str] = None) -> List[str]:
    """:func:`release` every staged name (or only container ``job_name`` and its ``-run-<n>`` containers)."""
    left: List[str] = []
    for name in staged(staging_root):
        if _of_job(name, job_name):
            left += release(staging_root, name)
    return left
