"""cbatchd's image manager: pre-pull per queue, availability checks at job start, pinning, prune.

Pure-ish logic around the engine (anything with ``image_info``, ``pull``, ``list_images``,
``remove_image`` and ``image_ids_in_use``, see :class:`cbatch.engines.docker.Engine`), so that the unit tests drive
it with a fake engine and the integration tests with the real one against a loopback registry.

- :meth:`ImageManager.start` starts one background thread that pulls every queue's ``prepull`` images (at
  daemon start and on :meth:`sync`), logs one line per image (ref, digest, size, seconds) and retries a
  failed image with exponential backoff (``base_delay`` doubling up to ``max_delay``). It never holds a lock
  a job start needs: a job never waits for the sync thread.
- :meth:`ImageManager.ensure` is the job-start check: a present image is used at once; a missing one is
  pulled only in a queue with ``pull: missing`` (progress to the job's .e file), otherwise the job fails
  with ``cbatch: image: not on this node: <ref> (present here: a, b)``.
- :meth:`ImageManager.prune` untags images no queue allows, pre-pulls or defaults to and no container uses.
  It removes by *tag*, never forced, so an image that still has another tag, or that a container uses,
  keeps its data.

Registry credentials come from :mod:`cbatch.daemon.regauth` and go only to the engine's pull call.

"Which image does this reference name" goes through ``cache`` when given (:mod:`cbatch.engines.imagecache`,
kept exact by Docker's image events); cbatch's own pulls and prune removals clear it too.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Callable, Dict, List, Optional, Tuple

from cbatch.daemon import regauth
from cbatch.core.config import QueuePolicy, SiteConfig, image_allowed, normalize_reference
from cbatch.core.directives import NATIVE
from cbatch.core.errors import AccessDenied, CbatchError, EngineError, JobError
from cbatch.core.imagerefs import created_epoch, mb as _mb, pick_digest, progress_line, repo_of

Progress = Callable[[str], None]


@dataclass(frozen=True)
class PullState:
    """What the sync thread knows about one pre-pull image (``inventory()`` reports it)."""

    ref: str
    state: str = "pending"           # pending | ok | failed
    attempts: int = 0                # consecutive failures
    error: Optional[str] = None      # the last failure, one line
    digest: Optional[str] = None
    size: int = 0
    seconds: float = 0.0
    next_try: float = 0.0            # monotonic time of the next attempt (failed only)


def _reason(exc: CbatchError) -> str:
    """The useful part of an engine error for a log line or a job's .e file (one line, no subject)."""
    return exc.hint or exc.problem


def ref_key(ref: str) -> str:
    """One spelling per image reference, to compare config entries with the engine's tags and digests:
    Docker's familiar-name expansion, and ``name:tag@digest`` -> ``name@digest`` (the digest decides)."""
    norm = normalize_reference(ref)
    if "@" in norm:
        return repo_of(norm) + "@" + norm.split("@", 1)[1]
    return norm


def _wanted(ref: str, pol: QueuePolicy) -> bool:
    """Queue ``pol`` allows ``ref``, pre-pulls it or uses it as its default."""
    if image_allowed(ref, pol.images):
        return True
    key = ref_key(ref)
    return any(ref_key(r) == key for r in (*pol.prepull, pol.image) if r != NATIVE)


class ImageManager:
    """One per daemon. ``log`` is a logging.Logger or any callable taking one line."""

    def __init__(self, engine, config: SiteConfig, log, *, base_delay: float = 5.0, max_delay: float = 300.0,
                 clock: Callable[[], float] = time.monotonic, cache=None):
        self.engine = engine
        self.cache = cache                       # InfoCache or None (every check asks the engine)
        self.config = config
        self._log = log
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._clock = clock
        self._lock = threading.Lock()            # guards _states only; never held across engine calls
        self._states: Dict[str, PullState] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._rounds = 0                         # completed passes of the sync thread
        self._busy = False                       # a pass is under way
        self._round_done = threading.Condition()

    # -- logging ------------------------------------------------------------------------------------
    def log(self, line: str, error: bool = False) -> None:
        log = self._log
        if log is None:
            return
        if hasattr(log, "warning"):
            (log.warning if error else log.info)(line)
        else:
            log(line)

    # -- the engine's answers (cached) ---------------------------------------------------------------
    def _info(self, ref: str):
        """The engine's ImageInfo for ``ref`` (None: not here), from the cache when it may answer."""
        return self.engine.image_info(ref) if self.cache is None else self.cache.lookup(ref, self.engine.image_info)

    def _changing(self, call, *args):
        """``call(*args)`` (a pull or a removal), then no answer taken before is served, whatever it did
        (the engine's own event clears the cache too, a moment later)."""
        try:
            return call(*args)
        finally:
            if self.cache is not None:
                self.cache.invalidate()

    # -- background pre-pull ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the sync thread; it pulls every pre-pull image at once. Idempotent."""
        if self._thread and self._thread.is_alive():
            return
        self._stop.clear()
        self._schedule_all()
        self._thread = threading.Thread(target=self._run, name="cbatch-imagesync", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the sync thread (a pull in progress finishes first, up to ``timeout``)."""
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)

    def reconfigure(self, config: SiteConfig) -> None:
        """Use a reloaded site config, and sync its pre-pull list."""
        self.config = config
        self.sync()

    def sync(self, wait: float = 0.0) -> dict:
        """Pull every pre-pull image again now (failures restart their backoff). With ``wait`` > 0, wait up
        to that many seconds for the pass to finish. Returns :meth:`sync_status`."""
        with self._round_done:
            # A pass already under way may have started before this request: wait for the next one.
            target = self._rounds + (2 if self._busy else 1)
        self._schedule_all()
        self._wake.set()
        if wait > 0:
            deadline = self._clock() + wait
            with self._round_done:
                while self._rounds < target and not self._stop.is_set():
                    left = deadline - self._clock()
                    if left <= 0:
                        break
                    self._round_done.wait(min(left, 0.5))
        return self.sync_status()

    def _schedule_all(self) -> None:
        refs = self.config.all_prepull()
        with self._lock:
            self._states = {ref: PullState(ref=ref, digest=self._states[ref].digest if ref in self._states else None)
                            for ref in refs}

    def _due(self) -> Tuple[List[str], Optional[float]]:
        """Refs to pull now, and how long until the next failed one is due (None: nothing pending)."""
        now = self._clock()
        due, wait = [], None
        with self._lock:
            for ref, st in self._states.items():
                if st.state == "pending" or (st.state == "failed" and st.next_try <= now):
                    due.append(ref)
                elif st.state == "failed":
                    left = st.next_try - now
                    wait = left if wait is None else min(wait, left)
        return due, wait

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            with self._round_done:
                self._busy = True
            due, _ = self._due()
            for ref in due:
                if self._stop.is_set():
                    return
                self._pull_one(ref)
            with self._round_done:
                self._rounds += 1
                self._busy = False
                self._round_done.notify_all()
            due, wait = self._due()
            if due:
                continue
            self._wake.wait(wait)

    def _pull_one(self, ref: str) -> None:
        t0 = self._clock()
        try:
            info = self._changing(self.engine.pull, ref, regauth.auth_for(self.config.registry.auth_file, ref), None)
        except CbatchError as exc:
            self._failed(ref, exc.message if not isinstance(exc, EngineError) else _reason(exc))
            return
        except Exception as exc:  # noqa: BLE001 - the thread must survive anything and retry
            self._failed(ref, f"{type(exc).__name__}: {exc}")
            return
        seconds = self._clock() - t0
        digest = pick_digest(tuple(info.digests), ref) or info.id
        with self._lock:
            if ref in self._states:
                self._states[ref] = PullState(ref=ref, state="ok", digest=digest, size=info.size,
                                              seconds=round(seconds, 3))
        self.log(f"cbatch: images: pulled {ref} digest {digest} size {_mb(info.size)} in {seconds:.1f} s")

    def _failed(self, ref: str, reason: str) -> None:
        with self._lock:
            old = self._states.get(ref) or PullState(ref=ref)
            attempts = old.attempts + 1
            delay = min(self.base_delay * (2 ** (attempts - 1)), self.max_delay)
            self._states[ref] = PullState(ref=ref, state="failed", attempts=attempts, error=reason,
                                          digest=old.digest, next_try=self._clock() + delay)
        self.log(f"cbatch: images: pull failed: {ref}: {reason} (attempt {attempts}, retry in {delay:g} s)",
                 error=True)

    def sync_status(self) -> dict:
        """ref -> {state, attempts, error, digest, size, seconds, retry_in} for every pre-pull image."""
        now = self._clock()
        with self._lock:
            states = list(self._states.values())
        return {st.ref: {"state": st.state, "attempts": st.attempts, "error": st.error, "digest": st.digest,
                         "size": st.size, "seconds": st.seconds,
                         "retry_in": round(max(0.0, st.next_try - now), 1) if st.state == "failed" else None}
                for st in states}

    # -- inventory ----------------------------------------------------------------------------------
    def _queues(self) -> List[Tuple[str, QueuePolicy]]:
        queues = list(self.config.queues)
        return queues or [("(defaults)", self.config.defaults)]

    def inventory(self) -> dict:
        """For ``cbatch images``: per queue the allowed patterns, default image, pull mode, pre-pull list,
        and the matching images present on this node (tag, id, digest, size); plus the sync state."""
        images = self.engine.list_images()
        queues = []
        for name, pol in self._queues():
            present = []
            for img in images:
                for tag in img.tags:
                    if _wanted(tag, pol):
                        present.append({"ref": tag, "id": img.id, "digest": pick_digest(tuple(img.digests), tag),
                                        "size": img.size, "created": img.created})
            tags = {p["ref"] for p in present}
            queues.append({"name": name, "default": pol.image, "native": pol.native, "pull": pol.pull,
                           "allowed": list(pol.images), "prepull": list(pol.prepull),
                           "missing": [r for r in pol.prepull if r not in tags and not self._have(r)],
                           "present": sorted(present, key=lambda p: p["ref"])})
        return {"queues": queues, "sync": self.sync_status()}

    def _have(self, ref: str) -> bool:
        try:
            return self._info(ref) is not None
        except CbatchError:
            return False

    # -- job start ----------------------------------------------------------------------------------
    def present_for(self, pol: QueuePolicy) -> List[str]:
        """Tags on this node that queue ``pol`` allows (for the "present here" hint)."""
        tags = set()
        for img in self.engine.list_images():
            tags.update(t for t in img.tags if image_allowed(t, pol.images))
        return sorted(tags)

    def ensure(self, ref: str, pol: QueuePolicy, progress: Optional[Progress] = None):
        """The image ``ref`` for a job in queue ``pol`` (already allowed by the policy): present -> its
        ImageInfo at once; missing -> pulled when ``pol.pull == "missing"`` (progress lines to
        ``progress``), else JobError ``image: not on this node``. A failed pull is one EngineError line."""
        if ref == NATIVE:
            raise JobError("image", "native is not an image", ref)
        info = self._info(ref)
        if info is not None:
            return info
        if pol.pull != "missing":
            here = self.present_for(pol)
            raise JobError("image", "not on this node", ref,
                           "present here: " + (", ".join(here) if here else "none")
                           + "; ask the admin to pre-pull it")
        say = progress or (lambda line: None)
        say(f"cbatch: image: {ref}: not on this node, pulling (queue {pol.name or 'defaults'} has pull: missing)")
        t0 = self._clock()

        def on_event(event: dict) -> None:
            line = progress_line(ref, event)
            if line:
                say(line)

        try:
            info = self._changing(self.engine.pull, ref, regauth.auth_for(self.config.registry.auth_file, ref),
                                  on_event)
        except EngineError as exc:
            self.log(f"cbatch: images: job pull failed: {ref}: {_reason(exc)}", error=True)
            raise EngineError("image", "pull failed", ref, _reason(exc)) from exc
        seconds = self._clock() - t0
        digest = pick_digest(tuple(info.digests), ref) or info.id
        say(f"cbatch: image: {ref}: pulled {digest} ({_mb(info.size)}) in {seconds:.1f} s")
        self.log(f"cbatch: images: pulled {ref} digest {digest} size {_mb(info.size)} in {seconds:.1f} s (job)")
        return info

    def digest_of(self, ref: str, info=None) -> Optional[str]:
        """The repo digest pinning ``ref`` (``name@sha256:..``), or None for an image no registry knows
        (built or imported locally). ``info``: the ImageInfo :meth:`ensure` returned, to skip a lookup."""
        info = info if info is not None else self._info(ref)
        if info is None:
            return None
        if "@" in ref:                   # already pinned: name[:tag]@digest -> name@digest
            return repo_of(ref) + "@" + ref.split("@", 1)[1]
        return pick_digest(tuple(info.digests), ref)

    def tags_of(self, ref: str) -> Tuple[str, ...]:
        """The policy's ``tags_of``: the local tags of the image digest reference ``ref`` names (only when the
        engine lists that very repo digest for it), else ()."""
        if "@" not in ref:
            return ()
        info = self._info(ref)
        if info is None or repo_of(ref) + "@" + ref.split("@", 1)[1] not in {
                repo_of(d) + "@" + d.split("@", 1)[1] for d in info.digests}:
            return ()
        return tuple(info.tags)

    def job_env(self, ref: str, info) -> Tuple[Tuple[str, str], ...]:
        """Environment pairs the daemon appends to a container spec: ``CBATCH_IMAGE_DIGEST`` (the repo
        digest, usable as ``--image=``) and ``CBATCH_IMAGE_ID`` (the local image id)."""
        digest = self.digest_of(ref, info)
        pairs = [("CBATCH_IMAGE_ID", info.id)]
        if digest:
            pairs.insert(0, ("CBATCH_IMAGE_DIGEST", digest))
        return tuple(pairs)

    # -- prune --------------------------------------------------------------------------------------
    def _kept(self, ref: str) -> bool:
        return any(_wanted(ref, pol) for pol in (self.config.defaults, *(p for _, p in self.config.queues)))

    def prune(self, dry_run: bool = False, scope: Optional[str] = None, now: Optional[float] = None) -> List[str]:
        """Untag every local image reference that no queue allows, pre-pulls or defaults to, whose image no
        container uses, and (with ``images.prune_max_age_days``) that is older than that. ``scope``: an
        fnmatch glob limiting which references are considered at all. Returns the references removed (or,
        with ``dry_run``, that would be)."""
        in_use = self.engine.image_ids_in_use()
        max_days = self.config.images.prune_max_age_days
        now = time.time() if now is None else now
        removed: List[str] = []
        for img in self.engine.list_images():
            refs = list(img.tags) if img.tags else list(img.digests)   # a digest-only pull has no tag
            if img.id in in_use:
                continue
            if max_days is not None:
                born = created_epoch(img.created)
                if born is None or now - born < max_days * 86400:
                    continue
            for ref in refs:
                if ref in ("<none>:<none>", "<none>@<none>"):
                    continue
                if scope is not None and not fnmatchcase(ref, scope):
                    continue
                if self._kept(ref):
                    continue
                if not dry_run:
                    try:
                        if not self._changing(self.engine.remove_image, ref):
                            continue
                    except EngineError as exc:
                        self.log(f"cbatch: images: prune kept {ref}: {_reason(exc)}", error=True)
                        continue
                    self.log(f"cbatch: images: pruned {ref} ({img.id[:19]}, {_mb(img.size)})")
                removed.append(ref)
        return removed


# -- the daemon's "images" op -----------------------------------------------------------------------------
SYNC_WAIT = 60.0          # `cbatch images sync` waits this long for the pass, then reports what it has


def handle_request(manager: ImageManager, msg: dict, peer_uid: int) -> dict:
    """The whole ``images`` op for cbatchd: ``{"action": "list"|"sync"|"prune", "dry_run": bool}``.
    Anyone may list; sync and prune change the node and need a root peer (SO_PEERCRED uid 0)."""
    from cbatch import protocol

    action = protocol.get_str(msg, "action", "list")
    if action == "list":
        return {"inventory": manager.inventory()}
    if action not in ("sync", "prune"):
        raise protocol.bad_field("action", "list, sync or prune")
    if peer_uid != 0:
        raise AccessDenied("images", f"{action} needs root", f"uid {peer_uid}", "run it as root on the node")
    if action == "sync":
        return {"sync": manager.sync(wait=SYNC_WAIT)}
    dry_run = protocol.get_bool(msg, "dry_run", False)
    return {"removed": manager.prune(dry_run=dry_run), "dry_run": dry_run}
