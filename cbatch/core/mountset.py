"""The set of bind mounts one container gets, and the rule that no mount target lies inside another.

Why no nesting: runc creates a missing mount target inside the container's rootfs *after* the mounts above
it are in place (Docker sorts mounts by target depth, parents first). When the parent is a bind mount of a
directory the job's user can write (the home, the working directory, TMPDIR, a user mount), the path runc
walks to create the child's target is the user's: with ``renameat2(RENAME_EXCHANGE)`` between a directory
and a symlink the user makes runc (1.1.5 and every version before 1.1.14, CVE-2024-45310) create
directories or empty files anywhere on the host, as root. Whatever runc is installed, cbatch therefore
never hands the engine one mount inside another:

(a) a mount that would only show again what its enclosing mount already shows - both identity mounts
    (source == target, so the inner host object is reached through the outer mount at the same path, and the
    inner source is canonical, so no symlink lies in between) with the same mode, or a read-only job/cbatch
    mount inside a read-write one (the job sees the same file; its host permissions still apply) - is
    dropped: nothing for runc to create;
(b) any other mount whose target lies strictly inside another mount's target is refused with one line.
    This includes job mounts (cwd, home, TMPDIR) inside a site mount that is not an identical read-write
    view of them: cbatch cannot know whether the user can write a directory between the site mount's target
    and the job's path (``/scratch/alice`` under a site mount of ``/scratch`` is exactly that case), so it
    does not guess. An identity read-write site mount (the common ``/scratch:rw``) contains them under (a).

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

from cbatch.core.errors import PolicyError
from cbatch.core.spec import Mount

KINDS = ("cbatch", "job", "site", "user")     # who asked: cbatch's own files, the job's paths, the admin, the user


@dataclass(frozen=True)
class Entry:
    """A mount with who asked for it (one of :data:`KINDS`) and how an error names it."""

    mount: Mount
    kind: str
    subject: str


def _inside(inner: str, outer: str) -> bool:
    """True if container path ``inner`` lies strictly inside ``outer`` (both normalised, absolute)."""
    return inner.startswith(outer.rstrip("/") + "/")


def _identity(m: Mount) -> bool:
    return m.source == m.target


def redundant(outer: Entry, inner: Entry) -> bool:
    """Rule (a): ``inner`` shows nothing ``outer`` does not already show at the same path, in a mode that
    does not grant the job more than it asked for."""
    o, i = outer.mount, inner.mount
    if not (_identity(o) and _identity(i)):
        return False
    if o.read_only == i.read_only:
        return True
    # A read-only file cbatch or the batch system provides (script, node file, passwd) inside a rw view of
    # the same host directory: the host's permissions still decide; a user's explicit :ro is honoured (b).
    return not o.read_only and inner.kind in ("cbatch", "job")


class MountSet:
    """Collects mounts in order (refusing two different sources on one target), then applies the nesting
    rule in :meth:`mounts`."""

    def __init__(self) -> None:
        self.entries: List[Entry] = []

    def add(self, mount: Mount, kind: str, subject: str) -> None:
        """Add a mount; the same source on the same target again is a no-op (the earlier mode wins)."""
        assert kind in KINDS
        for e in self.entries:
            if e.mount.target == mount.target:
                if e.mount.source == mount.source:
                    return          # e.g. cwd == home: one mount, the earlier (cbatch's) mode wins
                raise PolicyError(subject, "mount target already used", mount.target,
                                  f"cbatch already mounts {e.mount.source} there")
        self.entries.append(Entry(mount, kind, subject))

    def mounts(self) -> Tuple[Mount, ...]:
        """The mounts to hand the engine, in the order they were added, none inside another.

        Shallowest first (as Docker orders them), each mount is compared with the deepest mount kept so far
        that encloses it: kept if none does, dropped if redundant there, refused otherwise. A mount dropped
        as redundant is an identical view of its kept ancestor, so comparing deeper mounts with that ancestor
        is exact.
        """
        kept: List[Entry] = []
        for entry in sorted(self.entries, key=lambda e: e.mount.target.count("/")):
            outers = [k for k in kept if _inside(entry.mount.target, k.mount.target)]
            if not outers:
                kept.append(entry)
                continue
            outer = max(outers, key=lambda k: len(k.mount.target))
            if redundant(outer, entry):
                continue
            raise nested_error(outer, entry)
        return tuple(e.mount for e in self.entries if e in kept)


def nested_error(outer: Entry, inner: Entry) -> PolicyError:
    """The one line for rule (b), naming the user's directive when a user mount is involved."""
    subject = inner.subject if inner.kind == "user" or outer.kind != "user" else outer.subject
    return PolicyError(subject, "mount target inside another mount",
                       f"{inner.mount.target} inside {outer.mount.target} ({outer.subject})",
                       "cbatch never mounts one path inside another: the engine would create it through "
                       "directories the user can change; choose a target outside " + outer.mount.target)
