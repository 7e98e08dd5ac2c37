"""The requests cbatchd answers with one reply: ``ping``, ``status``, ``images``, ``register``, ``unregister``.

Each handler is ``(daemon, conn, peer, msg, fds) -> dict`` (the reply's fields; :mod:`cbatch.daemon.server`
adds ``ok`` and sends it). Who may call which is the server's business (``status``, ``register`` and
``unregister`` are root's: :data:`cbatch.daemon.server.ROOT_OPS`); the requests that become a session
(``start``, ``run``, ``attach``) are :mod:`cbatch.daemon.launch`'s.
"""

from __future__ import annotations

import logging
import threading

from cbatch import __version__, protocol
from cbatch.core.errors import CbatchError
from cbatch.core.job import Registration
from cbatch.daemon import cleanup, peers
from cbatch.daemon.imagesync import handle_request

log = logging.getLogger("cbatchd")


def ping(daemon, conn, peer, msg, fds) -> dict:
    """Health: protocol and cbatch versions, instance, whether the engine answers, registered jobs."""
    try:
        engine = daemon.engine.ping()
    except CbatchError:
        engine = False
    return {"version": protocol.VERSION, "cbatch": __version__, "instance": daemon.instance,
            "engine": bool(engine), "jobs": len(daemon.registry)}


def status(daemon, conn, peer, msg, fds) -> dict:
    """Every registered job with its containers, the containers waiting for their client, and the image
    check cache's counters (armed, entries, hits, fetches, generation)."""
    jobs = []
    for rec in daemon.registry.all():
        jobs.append({**rec.registration.to_dict(), "started": rec.started, "containers": sorted(rec.containers)})
    return {"instance": daemon.instance, "jobs": jobs, "adopting": daemon.adoptions.cids(),
            "image_cache": daemon.image_cache.state()}


def images(daemon, conn, peer, msg, fds) -> dict:
    """``cbatch images`` list/sync/prune: :func:`cbatch.daemon.imagesync.handle_request`."""
    return handle_request(daemon.images, msg, peer.uid)


def register(daemon, conn, peer, msg, fds) -> dict:
    """The prologue's registration of a job (its owner must exist on this node)."""
    data = msg.get("registration")
    if not isinstance(data, dict):
        raise protocol.bad_field("registration", "an object")
    reg = Registration.from_dict(data)
    peers.owner_uid(reg)      # the owner must exist here (and match Slurm's uid): refuse now, logged
    replaced = daemon.registry.register(reg)
    # A job that ended while cbatchd was restarting left its registration (its epilogue found no daemon).
    threading.Thread(target=daemon.forget_ended_jobs, daemon=True).start()
    log.info("job %s: registered (user %s, queue %s, session %s, %s)%s", reg.job_id, reg.user, reg.queue,
             reg.session_id, reg.batch, " again" if replaced else "")
    return {"job_id": reg.job_id, "replaced": replaced}


def unregister(daemon, conn, peer, msg, fds) -> dict:
    """The epilogue's: forget the job and everything it left (:func:`cbatch.daemon.cleanup.forget_job`)."""
    job_id = protocol.get_str(msg, "job_id")
    reply = cleanup.forget_job(daemon, job_id)
    log.info("job %s: unregistered%s", job_id, "" if reply["known"] else " (was not registered)")
    return reply
