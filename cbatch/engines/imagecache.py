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
- **A witness, where the engine has one.** dockerd's BuildKit (20.10 to 23) names a built image without any
  event; the watcher then gives :meth:`InfoCache.arm` a stamp of dockerd's reference store (the file every
  name change rewrites): an answer is served only while the stamp reads as when it was taken.

Pure: no I/O, no engine; the unit tests drive it with a fake fetch.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, Optional, Tuple, TypeVar

T = TypeVar("T")
MAX_ENTRIES = 256      # references a node's queues use are few; the cache stays bounded whatever users ask


class InfoCache:
    """Engine answers by reference, valid while armed and until the next event."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._lock = threading.Lock()      # never held across a fetch
        self._entries: Dict[str, Tuple[object, object]] = {}    # ref -> (answer, witness stamp)
        self._generation = 0
        self._armed = False
        self._witness: Optional[Callable[[], object]] = None
        self.hits = 0                      # answered from memory
        self.fetches = 0                   # asked the engine (status and the tests read these)
        self.unannounced = 0               # hits refused because the witness moved with no event

    def lookup(self, ref: str, fetch: Callable[[str], Optional[T]]) -> Optional[T]:
        """The answer for ``ref``: from memory when armed, stored since the last event and the witness
        unchanged, else ``fetch(ref)`` (stored when not None and nothing happened meanwhile). ``fetch``'s
        errors propagate."""
        with self._lock:
            token = self._generation if self._armed else None
            witness = self._witness if self._armed else None
            hit = self._entries.get(ref) if self._armed else None
        stamp = witness() if witness is not None else None     # before the fetch, like the token
        if hit is not None:
            answer, kept = hit
            if witness is None or (stamp is not None and stamp == kept):
                with self._lock:
                    self.hits += 1
                return answer                  # type: ignore[return-value]
            self.invalidate()                  # the engine's names moved without an event: forget all
            with self._lock:
                self.unannounced += 1
            token = self.generation()
        with self._lock:
            self.fetches += 1
        answer = fetch(ref)
        if witness is None or stamp is not None:
            self.store(ref, answer, token, stamp)
        return answer

    def generation(self) -> Optional[int]:
        """The token to pass to :meth:`store` for an answer about to be fetched; None when not armed."""
        with self._lock:
            return self._generation if self._armed else None

    def store(self, ref: str, answer: object, token: Optional[int], stamp: object = None) -> bool:
        """Keep ``answer`` for ``ref`` if still armed and no event, arm or disarm happened since ``token``
        was read (``stamp``: the witness's value read with it). True if kept."""
        if answer is None or token is None:
            return False
        with self._lock:
            if not self._armed or self._generation != token:
                return False
            if ref not in self._entries and len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))      # the oldest
            self._entries[ref] = (answer, stamp)
            return True

    def _forget(self, **state) -> None:
        """Forget every answer (a fetch in flight then keeps nothing: the generation moved) and set ``state``."""
        with self._lock:
            self._generation += 1
            self._entries.clear()
            for key, value in state.items():
                setattr(self, key, value)

    def invalidate(self) -> None:
        """An image event (or a change cbatch made itself): forget every answer."""
        self._forget()

    def arm(self, witness: Optional[Callable[[], object]] = None) -> None:
        """The event stream is established: answers taken from now on may be kept. ``witness``: a cheap
        stamp of the engine's name store (None: none known), read before each fetch and at each hit; an
        answer is served only while it reads the same (a change the engine made without an event)."""
        self._forget(_witness=witness, _armed=True)

    def disarm(self) -> None:
        """The event stream ended, failed or is not connected yet: forget everything, keep nothing."""
        self._forget(_witness=None, _armed=False)

    def state(self) -> dict:
        """For ``status``: armed, witness (known or not), entries, hits, fetches, unannounced, generation."""
        with self._lock:
            return {"armed": self._armed, "witness": self._witness is not None, "entries": len(self._entries),
                    "hits": self.hits, "fetches": self.fetches, "unannounced": self.unannounced,
                    "generation": self._generation}
