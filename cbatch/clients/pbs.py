"""What cbatch's OpenPBS / PBS Pro hooks run: register a job, unregister it, check a submission.

PBS has no ``$job_starter`` and no prologue arguments: its mom runs Python hooks as root instead
(:mod:`cbatch.admin.pbshooks` writes them). The hooks run inside PBS's own embedded interpreter, so they do
the least there - read PBS's trusted job object, rewrite the launched program to cbatch's job starter - and
hand the rest to this module in cbatch's own interpreter (``python -I -m cbatch.clients.pbs ACTION SOCKET``,
one JSON object on stdin):

- ``launch`` (execjob_launch, the job's own shell or ``qsub --`` program): register the job with cbatchd
  (:meth:`cbatch.core.job.Registration.from_pbs`, ``batch="pbs"``, the session PBS already set). Always
  exits 0: the rewritten program (the job starter) then reports any problem in the job's .e file, exactly
  as under TORQUE. The hook rewrites the program BEFORE it calls us, so nothing here can let a job run
  outside its queue's container.
- ``end`` (execjob_end): unregister (the daemon removes the job's containers) and remove the empty cgroup
  directories Docker made under pbs_cgroups' ``/pbs_jobs.service/jobid/<id>``. Always exits 0.
- ``queuejob`` (at ``qsub`` on the server): check ``#CBATCH`` directives and the image (``-v CBATCH_IMAGE``,
  PBS Pro's ``-v CONTAINER_IMAGE``, ``-l container_image``) against the queue's policy like the TORQUE
  submit filter. Exit 0 accepts; exit 1 with one ``cbatch: ...`` line on stdout rejects (the hook passes
  that line to ``e.reject``). A config that cannot be read here lets the job through (cbatchd checks again).

Stdlib + cbatch.clients only on the launch/end path (they run for every job).
"""

from __future__ import annotations

import json
import sys
from typing import Optional

from cbatch.clients import hooks
from cbatch.core import job
from cbatch.core.errors import CbatchError, _clean

MAX_INPUT = 1 << 20
LAUNCH = hooks.Who("cbatch pbs launch", "cbatch-pbs")
END = hooks.Who("cbatch pbs end", "cbatch-pbs")
CONTAINER_IMAGE = "CONTAINER_IMAGE"     # PBS Pro's container hook's variable (policy.PBS_PRO_IMAGE_ENV)
DEFAULT_CONFIG = "/etc/cbatch/cbatch.yaml"


def _read(stream) -> dict:
    data = stream.read(MAX_INPUT + 1)
    if len(data) > MAX_INPUT:
        raise CbatchError("pbs hook", "input too large", f"{len(data)} bytes")
    obj = json.loads(data or b"{}")
    if not isinstance(obj, dict):
        raise CbatchError("pbs hook", "input is not a JSON object", type(obj).__name__)
    return obj


def launch(data: dict, socket_path: Optional[str]) -> int:
    """Register the job PBS is launching (see module doc). Returns 0."""
    job_id = _clean(str(data.get("job_id", "")))[:80] or "(no job id)"
    return hooks.register_job(LAUNCH, job_id, socket_path, lambda: job.Registration.from_pbs(data))


def end(data: dict, socket_path: Optional[str]) -> int:
    """Unregister the job and tidy its pbs_cgroups directory. Returns 0."""
    job_id = str(data.get("job_id", ""))
    if not job_id or "\0" in job_id or "/" in job_id:
        hooks._log(END, f"no usable job id: {job_id[:80]!r}")
        return 0
    return hooks.unregister_job(END, job_id, socket_path, f"/pbs_jobs.service/jobid/{job_id}")


def queuejob(data: dict, config_path: str = DEFAULT_CONFIG) -> Optional[str]:
    """The one-line reason to reject this submission, or None to accept it.

    ``data``: ``queue`` (may be empty: the server's default), ``default_queue``, ``variables`` (the job's
    ``-v`` list as a dict), ``script`` (the job script's text, when PBS gives it), ``container_image``
    (``-l container_image``, a site-defined resource in PBS Pro's hook).
    """
    from cbatch.core import config as config_mod
    from cbatch.core import policy as pol
    from cbatch.core.directives import parse_script
    from cbatch.core.errors import PolicyError

    try:
        config = config_mod.load(config_path)
    except (OSError, CbatchError) as exc:
        sys.stderr.write(f"cbatch: queuejob: config not checked here ({exc}); cbatchd checks at start\n")
        return None
    variables = data.get("variables") or {}
    if not isinstance(variables, dict):
        variables = {}
    env = {str(k): str(v) for k, v in variables.items()}
    image_var = env.get(pol.IMAGE_ENV) or env.get(CONTAINER_IMAGE) or str(data.get("container_image") or "")
    if image_var:
        env[pol.IMAGE_ENV] = image_var
    queue = str(data.get("queue") or data.get("default_queue") or "")
    try:
        directives = parse_script(str(data.get("script") or "").encode("utf-8", "surrogateescape"))
        policy = config.queue(queue)
        image, source = pol.choose_image(policy, _View(env), directives)
        try:
            pol.check_image(policy, queue, image, source)
        except PolicyError:
            if "@" not in image or not pol.repo_allowed(image, policy.images):
                raise
        return None
    except CbatchError as exc:
        return exc.message


class _View:
    """Just enough of a JobContext for :func:`cbatch.core.policy.choose_image`."""

    def __init__(self, env: dict):
        self._env = env
        self.batch = "pbs"

    def env_dict(self) -> dict:
        return self._env


def main(argv=None) -> int:
    """``python -I -m cbatch.clients.pbs launch|end|queuejob [SOCKET|CONFIG]`` with JSON on stdin."""
    args = list(sys.argv[1:] if argv is None else argv)
    action = args[0] if args else ""
    extra = args[1] if len(args) > 1 else None
    try:
        data = _read(sys.stdin.buffer)
    except (ValueError, CbatchError) as exc:
        # launch/end never fail the job; queuejob lets it through (cbatchd checks again at start).
        sys.stderr.write(f"cbatch: pbs hook: unreadable input: {exc}\n")
        return 0
    if action == "launch":
        return launch(data, extra)
    if action == "end":
        return end(data, extra)
    if action == "queuejob":
        reason = queuejob(data, extra or DEFAULT_CONFIG)
        if reason:
            sys.stdout.write(_clean(reason)[:2000] + "\n")
            return 1
        return 0
    sys.stderr.write(f"cbatch: pbs hook: unknown action: {_clean(action)[:40]} (launch | end | queuejob)\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
