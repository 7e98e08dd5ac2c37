"""The engine's answers to "which image does this reference name?", kept only while nothing can have changed.

A job start asks the engine for the image its reference names (``image_info``: a Docker ``inspect_image``,
3 ms and a share of cbatchd's CPU per start). The answer changes only when an image event happens (pull,
tag, untag, delete, import, load, ...), and Docker reports every such event on its ``/events`` stream
(:mod:`cbatch.engines.imagewatch` reads it). So an answer is kept here, keyed by the reference exactly as
given, and served from memory, under three rules:

- **Armed only while the stream is up.** Nothing is cached before the stream is established or after it
  ended or failed (:meth:`InfoCache.arm`, :meth:`InfoCache.disarm`); then every lookup asks the engine.
- **Any event clears everything** (:meth:`InfoCache.invalidate`): no attempt to work out which reference an
  event touched (a tag moves another name, a delete removes several).
- **An answer is stored only if nothing happened while it was taken.** The generation counter, bumped by
  every event, arm and disarm, is read *before* the engine is asked and compared when the answer is stored:
  an answer fetched, then an event, then the store is dropped, not stored (the race a plain "clear on
  event" loses). Negative answers (no such image) are never stored: a pull must be seen at once.

Pure: no I/O, no engine; the unit tests drive it with a fake fetch.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, Optional, TypeVar

T = TypeVar("T")
MAX_ENTRIES = 256      # references a node's queues use are few; the cache stays bounded whatever users ask


class InfoCache:
    """Engine answers by reference, valid while armed and until the next event."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._lock = threading.Lock()      # never held across a fetch
        self._entries: Dict[str, object] = {}
        self._generation = 0
        self._armed = False
        self.hits = 0                      # answered from memory
        self.fetches = 0                   # asked the engine (status and the tests read both)

    def lookup(self, ref: str, fetch: Callable[[str], Optional[T]]) -> Optional[T]:
        """The answer for ``ref``: from memory when armed and stored since the last event, else
        ``fetch(ref)`` (stored when not None and nothing happened meanwhile). ``fetch``'s errors propagate."""
        with self._lock:
            if self._armed:
                hit = self._entries.get(ref)
                if hit is not None:
                    self.hits += 1
                    return hit              # type: ignore[return-value]
                token: Optional[int] = self._generation
            else:
                token = None
            self.fetches += 1
        answer = fetch(ref)
        if answer is not None and token is not None:
            self.store(ref, answer, token)
        return answer

    def generation(self) -> Optional[int]:
        """The token to pass to :meth:`store` for an answer about to be fetched; None when not armed."""
        with self._lock:
            return self._generation if self._armed else None

    def store(self, ref: str, answer: object, token: Optional[int]) -> bool:
        """Keep ``answer`` for ``ref`` if still armed and no event, arm or disarm happened since ``token``
        was read. True if kept."""
        if answer is None or token is None:
            return False
        with self._lock:
            if not self._armed or self._generation != token:
                return False
            if ref not in self._entries and len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))      # the oldest
            self._entries[ref] = answer
            return True

    def invalidate(self) -> None:
        """An image event (or a change cbatch made itself): forget every answer."""
        with self._lock:
            self._generation += 1
            self._entries.clear()

    def arm(self) -> None:
        """The event stream is established: answers taken from now on may be kept."""
        with self._lock:
            self._generation += 1
            self._entries.clear()
            self._armed = True

    def disarm(self) -> None:
        """The event stream ended, failed or is not connected yet: forget everything, keep nothing."""
        with self._lock:
            self._generation += 1
            self._entries.clear()
            self._armed = False

    def state(self) -> dict:
        """For ``status``: armed, entries, hits, fetches, generation."""
        with self._lock:
            return {"armed": self._armed, "entries": len(self._entries), "hits": self.hits,
                    "fetches": self.fetches, "generation": self._generation}
