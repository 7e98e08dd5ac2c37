"""``cbatch images [list|sync|prune]``: this node's images, per queue, as cbatchd sees them.

Only cbatchd talks to the engine, so this asks it (op ``images``). ``list`` is open to everyone: per queue the
allowed patterns, the default image, the pull mode, the pre-pull list with each image's sync state, and the
matching images present here (digest, size). ``sync`` (pull the pre-pull lists again now) and ``prune``
(untag images no queue allows or pre-pulls and no container uses) change the node: cbatchd only does them
for a root peer.

Stdlib + client only (no YAML unless ``--config`` names a config to take the socket path from).
"""

from __future__ import annotations

import sys
from typing import List

from cbatch.clients import client


def _size(n) -> str:
    n = float(n or 0)
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _short(digest) -> str:
    """``repo@sha256:0123456789abcdef...`` -> ``sha256:0123456789ab`` (the table is for eyes; -v is not)."""
    if not digest:
        return "-"
    d = str(digest).split("@", 1)[-1]
    return d[:19]


def _table(rows: List[List[str]], indent: str = "  ") -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def format_inventory(inv: dict) -> str:
    """The readable table ``cbatch images list`` prints."""
    out: List[str] = []
    sync = inv.get("sync") or {}
    for q in inv.get("queues") or []:
        out.append(f"queue {q['name']}: default {q['default']}, pull {q['pull']}"
                   + ("" if q.get("native", True) else ", native not allowed"))
        out.append("  allowed: " + (", ".join(q.get("allowed") or []) or "none"))
        if q.get("prepull"):
            parts = []
            for ref in q["prepull"]:
                st = sync.get(ref) or {}
                state = st.get("state", "-")
                if state == "failed":
                    state += f" x{st.get('attempts')}, retry in {st.get('retry_in')} s: {st.get('error')}"
                parts.append(f"{ref} [{state}]")
            out.append("  prepull: " + "; ".join(parts))
        present = q.get("present") or []
        if present:
            # DIGEST is the registry's repo digest (usable as --image=name@...; "-" for a locally built
            # image), ID the engine's local image id: two different things, never one column for both.
            rows = [["IMAGE", "DIGEST", "ID", "SIZE"]]
            rows += [[p["ref"], _short(p.get("digest")), _short(p.get("id")), _size(p.get("size"))] for p in present]
            out.extend(_table(rows))
        else:
            out.append("  (no allowed image is present on this node)")
        if q.get("missing"):
            out.append("  missing here: " + ", ".join(q["missing"]))
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def format_sync(status: dict) -> str:
    """One line per pre-pull image after ``cbatch images sync``."""
    if not status:
        return "no queue pre-pulls any image (set prepull: in the site config)\n"
    lines = []
    for ref, st in sorted(status.items()):
        if st.get("state") == "ok":
            lines.append(f"{ref}: ok {st.get('digest') or '-'} {_size(st.get('size'))} in {st.get('seconds')} s")
        elif st.get("state") == "failed":
            lines.append(f"{ref}: FAILED ({st.get('error')}); retry in {st.get('retry_in')} s")
        else:
            lines.append(f"{ref}: still pulling (see the cbatchd log)")
    return "\n".join(lines) + "\n"


def command(args) -> int:
    """Route of ``cbatch images``. Exit 0, or 1 when a sync left an image failed."""
    action = getattr(args, "action", None) or "list"
    path = client.socket_path(getattr(args, "socket", None), getattr(args, "config", None))
    if action == "list":
        reply = client.call(path, "images", action="list")
        sys.stdout.write(format_inventory(reply.get("inventory") or {}))
        return 0
    if action == "sync":
        reply = client.call(path, "images", action="sync")
        status = reply.get("sync") or {}
        sys.stdout.write(format_sync(status))
        return 1 if any(s.get("state") == "failed" for s in status.values()) else 0
    dry_run = bool(getattr(args, "dry_run", False))
    reply = client.call(path, "images", action="prune", dry_run=dry_run)
    removed = reply.get("removed") or []
    verb = "would remove" if dry_run else "removed"
    for ref in removed:
        sys.stdout.write(f"{verb} {ref}\n")
    sys.stdout.write(f"{len(removed)} image reference(s) {verb}\n")
    return 0
