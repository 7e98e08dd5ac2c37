"""Pure helpers for image references and engine data, shared by :mod:`cbatch.daemon.imagesync` and its tests."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional, Tuple

# Engine progress statuses worth a line in a job's .e file; "Downloading"/"Extracting" tick many times a
# second with a progress bar and would flood it.
_PROGRESS_KEEP = ("Pulling from", "Pulling fs layer", "Already exists", "Download complete", "Pull complete",
                  "Digest:", "Status:", "Verifying Checksum")


def mb(size: int) -> str:
    """Bytes as "12.3 MB" for log lines and tables."""
    return "%.1f MB" % (size / 1e6)


def repo_of(ref: str) -> str:
    """``127.0.0.1:5001/cbt/busybox:1@sha256:..`` -> ``127.0.0.1:5001/cbt/busybox`` (tag and digest off)."""
    name = ref.split("@", 1)[0]
    head, slash, last = name.rpartition("/")
    return (head + slash + last.split(":", 1)[0]) if slash else last.split(":", 1)[0]


def pick_digest(digests: Tuple[str, ...], ref: str) -> Optional[str]:
    """The repo digest (``name@sha256:..``) of ``ref``'s own repository among an image's RepoDigests."""
    want = repo_of(ref)
    for d in digests:
        if repo_of(d) == want:
            return d
    return digests[0] if digests else None


def created_epoch(created: str) -> Optional[float]:
    """Docker's RFC 3339 ``Created`` (nanoseconds, ``Z``) as epoch seconds; None when unparseable."""
    if not created:
        return None
    text = created.strip().replace("Z", "+00:00")
    if "." in text:                    # fromisoformat takes at most 6 fractional digits
        head, _, rest = text.partition(".")
        digits = "".join(ch for ch in rest if ch.isdigit())
        text = head + "." + digits[:6].ljust(6, "0") + rest[len(digits):]
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def progress_line(ref: str, event: dict) -> Optional[str]:
    """One readable line for an engine pull event, or None for the noisy ones."""
    status = str(event.get("status") or "")
    if not status or not any(status.startswith(k) for k in _PROGRESS_KEEP):
        return None
    ident = event.get("id")
    text = f"{ident}: {status}" if ident and not status.startswith("Pulling from") else status
    return f"cbatch: image: {ref}: {text}"
