"""Docker's image events keep :class:`cbatch.engines.imagecache.InfoCache` exact: one daemon thread.

The thread holds one ``GET /events?filters={"type":["image"]}`` stream open on the engine's connection pool
(:mod:`cbatch.engines.dockerapi`). Every event on it clears the cache; the stream ending, failing or not
being connected disarms it (every lookup then asks Docker), and a reconnect arms it again once the new
stream is established. Reconnects back off from :data:`MIN_DELAY` doubling to :data:`MAX_DELAY`. Nothing a
job start does waits for this thread.

**No gap at a (re)connect.** dockerd sends the response headers *before* it subscribes the request to its
event feed (moby ``api/server/router/system/system_routes.go``: ``output.Flush()`` then
``SubscribeToEvents``), so "headers received" does not prove the subscription. The request therefore asks
for the events since :data:`SINCE_MARGIN` seconds before it was sent: dockerd hands over, atomically with
the subscription, every buffered event from then on, so an event between our headers and dockerd's
subscription still arrives (as a replay). Replayed older events only clear the cache once more.

**A name change without an event.** dockerd 20.10 to 23's BuildKit exporter names the image it built through
the reference store directly, with no ``tag`` event (the legacy builder, tag, pull, load, import, rmi and
prune all log theirs). Every change of that store rewrites one file, ``<DockerRootDir>/image/<driver>/
repositories.json``, by a rename (a new inode): for a local engine whose file exists when the stream is
established, its (inode, mtime, ctime, size) is the cache's witness (:func:`reference_store_witness`). An
engine without that file (containerd's image store) is watched by its events alone.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Optional

from cbatch.engines.imagecache import InfoCache

MIN_DELAY = 0.1        # seconds before the first reconnect
MAX_DELAY = 5.0        # the backoff's bound: a restarted dockerd is watched again within this
STEADY = 1.0           # a stream that stayed up this long resets the backoff
SINCE_MARGIN = 60      # seconds of dockerd's event buffer replayed at each connect (see the module doc)
FILTERS = {"type": ["image"]}


def reference_store_witness(docker) -> Optional[Callable[[], object]]:
    """A stamp of dockerd's reference store (see the module doc), or None when the engine is not local or
    has no such file. Asks the engine for its data root and storage driver."""
    if not str(getattr(docker, "url", "")).startswith("unix://"):
        return None
    info = docker.api.info()
    root, driver = info.get("DockerRootDir"), info.get("Driver")
    if not root or not driver:
        return None
    path = os.path.join(root, "image", driver, "repositories.json")

    def stamp():
        try:
            st = os.stat(path)
        except OSError:
            return None                         # gone: nothing is served from memory until it is back
        return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
    return stamp if stamp() is not None else None


class ImageWatch:
    """The watcher thread for one Docker engine (``docker``: :class:`cbatch.engines.docker.Engine`, its
    ``api``). ``log``: a logging.Logger or None."""

    def __init__(self, docker, cache: InfoCache, log=None, *, min_delay: float = MIN_DELAY,
                 max_delay: float = MAX_DELAY) -> None:
        self.docker = docker
        self.cache = cache
        self._log = log
        self.min_delay, self.max_delay = min_delay, max_delay
        self._stop = threading.Event()
        self._lock = threading.Lock()          # guards _stream (stop() closes it from another thread)
        self._stream = None
        self._thread: Optional[threading.Thread] = None
        self.connects = 0                      # streams established
        self.events = 0                        # events received

    def start(self) -> None:
        """Start the thread (idempotent). The cache stays disarmed until the first stream is up."""
        if self._thread and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cbatch-imageevents", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching: close the stream, disarm the cache, join the thread."""
        self._stop.set()
        self._close()
        if self._thread:
            self._thread.join(timeout)
        self.cache.disarm()

    def _say(self, line: str, error: bool = False) -> None:
        if self._log is not None:
            (self._log.warning if error else self._log.info)(line)

    def _close(self) -> None:
        with self._lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            # Shut the socket down (the reading thread sees the end), then let the response go.
            for close in (stream.close, getattr(getattr(stream, "_response", None), "close", None)):
                try:
                    if close is not None:
                        close()
                except Exception:  # noqa: BLE001 - already closed or broken: either way it is done
                    pass

    def _subscribe(self):
        """The image event stream, once dockerd answered 200 (raises otherwise)."""
        since = int(time.time()) - SINCE_MARGIN
        stream = self.docker.api.events(since=since, filters=FILTERS, decode=True)
        response = getattr(stream, "_response", None)
        status = getattr(response, "status_code", 200)
        if status != 200:
            stream.close()
            raise RuntimeError(f"events: HTTP {status}")
        return stream

    def _run(self) -> None:
        delay, down_said = self.min_delay, False
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                witness = reference_store_witness(self.docker)
                stream = self._subscribe()
                with self._lock:
                    self._stream = stream
                if self._stop.is_set():
                    break
                self.cache.arm(witness)
                self.connects += 1
                self._say("image events: watching the engine's image events (image checks answered from "
                          "memory until one arrives)")
                down_said = False
                for _event in stream:
                    self.cache.invalidate()    # any image event: everything may have moved
                    self.events += 1
                reason = "the stream ended"
            except Exception as exc:  # noqa: BLE001 - the thread must survive anything and retry
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                self.cache.disarm()
                self._close()
            if self._stop.is_set():
                break
            if not down_said:
                self._say(f"image events: not watching ({reason[:200]}): every image check asks the engine "
                          "until reconnected", error=True)
                down_said = True
            delay = self.min_delay if time.monotonic() - began >= STEADY else min(delay * 2, self.max_delay)
            self._stop.wait(delay)
        self.cache.disarm()
