"""``cbatch check``: validate the site config, or show exactly what a job script would run (or why not).

``cbatch check [--config FILE]`` prints a summary of the validated config. ``cbatch check [--queue Q]
[--user U] SCRIPT`` builds the job as if the script were submitted now (cwd = here, a Torque-like
environment, the script's ``#PBS`` options as :mod:`cbatch.core.qsubopts` reads them) and prints the decision
the daemon would make, or the one-line refusal with a non-zero exit. ``--node`` belongs to
``cbatch.admin.nodecheck``.
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import List, Optional, TextIO

from cbatch.core import config as configmod
from cbatch.core import policy
from cbatch.core import qsubopts
from cbatch.core.directives import MAX_SCAN_BYTES, parse_script
from cbatch.core.errors import ConfigError, JobError, PolicyError
from cbatch.core.job import Identity, JobContext, Registration
from cbatch.host.paths import resolve_as_user
from cbatch.core.spec import ContainerSpec, Native

CHECK_JOB_ID = "0.check"


def command(args) -> int:
    """Entry point for ``cbatch check`` (argparse namespace from cli.py); returns the exit status."""
    if getattr(args, "node", False):
        from cbatch.admin import nodecheck  # written separately; imported only for --node

        return nodecheck.command(args)
    path = args.config or configmod.DEFAULT_PATH
    cfg = configmod.load(path)
    try:
        if not getattr(args, "script", None):
            print_config(cfg, sys.stdout)
            return 0
        return check_script(cfg, args.script, queue=args.queue, user=args.user, out=sys.stdout)
    except BrokenPipeError:
        # `cbatch check ... | head`: the reader has what it wanted; no traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _fmt_size(n: Optional[int]) -> str:
    if n is None:
        return "none"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def _policy_lines(p: configmod.QueuePolicy) -> List[str]:
    h = p.hardening
    um = p.user_mounts
    return [
        f"image: {p.image}",
        f"images: {', '.join(p.images) or '(none)'}",
        f"native allowed: {'yes' if p.native else 'no'}",
        f"network: {p.network} (choices: {', '.join(p.networks)})",
        "user mounts: " + (f"allowed under {', '.join(um.prefixes) or '(nothing)'}" if um.allowed else "no"),
        "site mounts: " + (", ".join(f"{m.source}:{m.target}:{'ro' if m.read_only else 'rw'}"
                                      for m in p.mounts) or "(none)"),
        "env: " + (", ".join(f"{k}={v}" for k, v in p.env) or "(none)"),
        f"env_drop: {', '.join(p.env_drop) or '(none)'}",
        f"allow_root: {'yes' if p.allow_root else 'no'}",
        f"hardening: pids_limit={h.pids_limit} read_only_rootfs={h.read_only_rootfs} "
        f"no_new_privileges={h.no_new_privileges} init={h.init} cap_drop_all={h.cap_drop_all}",
        f"shm_size: {_fmt_size(p.shm_size)}",
        f"pull: {p.pull}; prepull: {', '.join(p.prepull) or '(none)'}",
    ]


def print_config(cfg: configmod.SiteConfig, out: TextIO) -> None:
    """Print a human summary of a validated config."""
    out.write(f"config {cfg.path}: OK\n")
    if os.geteuid() == 0:
        # The daemon loads with trusted=True; say now if it would refuse this file.
        try:
            configmod.load(cfg.path, trusted=True)
        except ConfigError as exc:
            out.write(f"warning: cbatchd would refuse it: {exc.message}\n")
    out.write(f"engine: {cfg.engine.url} (timeout {cfg.engine.timeout:g}s)\n")
    d = cfg.daemon
    out.write(f"daemon: socket {d.socket}, state {d.state_dir}, instance {d.instance}, "
              f"stop_grace {d.stop_grace:g}s, helper {d.helper}\n")
    out.write(f"registry auth_file: {cfg.registry.auth_file or '(none)'}; "
              f"images prune_max_age_days: {cfg.images.prune_max_age_days or '(never)'}\n")
    out.write("defaults:\n")
    for line in _policy_lines(cfg.defaults):
        out.write(f"  {line}\n")
    out.write(f"queues: {', '.join(name for name, _ in cfg.queues) or '(none; every queue uses the defaults)'}\n")
    for name, p in cfg.queues:
        out.write(f"queue {name}:\n")
        for line in _policy_lines(p):
            out.write(f"  {line}\n")


def build_job(script: str, identity: Identity, queue: Optional[str], data: bytes,
              environ: Optional[dict] = None) -> JobContext:
    """A JobContext as if ``script`` were submitted now by ``identity`` and started in the current dir."""
    environ = os.environ if environ is None else environ
    # ``--queue`` plays qsub's -q: it overrides the script's #PBS -q, as on the qsub command line.
    request = qsubopts.read(data, ["-q", queue] if queue is not None else [], environ)
    queue = request.queue or ""
    name = request.name or os.path.basename(script)
    cwd = os.getcwd()
    # pbs_mom starts the job starter with the -S shell if given, else the user's login shell.
    shell = request.shell or identity.shell
    reg = Registration(job_id=CHECK_JOB_ID, user=identity.user, group=str(identity.gid), name=name,
                       resource_list=request.resource_list, queue=queue, account="", script_path=script,
                       session_id=os.getpid(), batch="local")
    env = [("ENVIRONMENT", "BATCH"), ("HOME", identity.home), ("LANG", environ.get("LANG", "C.UTF-8")),
           ("LOGNAME", identity.user), ("PATH", "/bin:/usr/bin"), ("PBS_ENVIRONMENT", "PBS_BATCH"),
           ("PBS_JOBID", CHECK_JOB_ID), ("PBS_JOBNAME", name), ("PBS_O_HOME", identity.home),
           ("PBS_O_WORKDIR", cwd), ("PBS_QUEUE", queue), ("PWD", cwd), ("SHELL", identity.shell),
           ("USER", identity.user)]
    # The script's -v/-V variables first: like pbs_mom, the batch system's own variables win over them.
    fixed = {key for key, _ in env}
    env[:0] = [(k, v) for k, v in request.variables.items() if k not in fixed and k != policy.IMAGE_ENV]
    image = environ.get(policy.IMAGE_ENV) or request.variables.get(policy.IMAGE_ENV)
    if image:
        env.append((policy.IMAGE_ENV, image))   # the caller's CBATCH_IMAGE acts as qsub -v CBATCH_IMAGE=...
    return JobContext.for_start(reg, identity, shell, script + "\n", cwd, env)


def _describe(out: TextIO, cfg: configmod.SiteConfig, job: JobContext, directives, result) -> None:
    ident = job.identity
    out.write(f"script: {job.script_path}\n")
    out.write(f"queue: {job.queue or '(default)'}\n")
    out.write(f"user: {ident.user} (uid {ident.uid}, gid {ident.gid}, groups "
              f"{','.join(map(str, ident.groups))})\n")
    if isinstance(result, Native):
        out.write(f"runs natively: {result.shell} reads {job.stdin_line!r} ({result.reason})\n")
        return
    assert isinstance(result, ContainerSpec)
    qp = cfg.queue(job.queue)
    _, source = policy.choose_image(qp, job, directives)
    out.write(f"image: {result.image} (from {source})\n")
    out.write(f"container: {result.name}\n")
    out.write(f"argv: {' '.join(shlex.quote(a) for a in result.argv)}"
              + (f" with stdin {result.stdin_line!r}" if result.stdin_line is not None else "") + "\n")
    out.write(f"entrypoint: {'the image entrypoint' if result.use_entrypoint else 'not used'}\n")
    out.write(f"workdir: {result.workdir}\n")
    out.write("mounts:\n")
    for m in result.mounts:
        out.write(f"  {m.source} -> {m.target} ({'ro' if m.read_only else 'rw'})\n")
    if result.cgroup_parent:
        out.write(f"limits: from the batch system's cgroup {result.cgroup_parent}\n")
    else:
        cpus = f"{result.cpus:g}" if result.cpus else "unlimited"
        out.write(f"limits: cpus {cpus}, memory {_fmt_size(result.memory_bytes)}, "
                  f"shm {_fmt_size(result.shm_bytes)}\n")
    out.write(f"network: {result.network}\n")
    out.write(f"hardening: cap_drop_all={result.cap_drop_all} no_new_privileges={result.no_new_privileges} "
              f"init={result.init} pids_limit={result.pids_limit} read_only_rootfs={result.read_only_rootfs}\n")
    out.write("environment (layer: site < job < --env < cbatch; the image's ENV fills unset keys):\n")
    for key, value, layer in policy.environment(qp, job, directives, result.image):
        out.write(f"  {key}={value}  [{layer}]\n")


def check_script(cfg: configmod.SiteConfig, script: str, queue: Optional[str] = None, user: Optional[str] = None,
                 out: TextIO = sys.stdout, resolve=resolve_as_user) -> int:
    """Print what ``script`` would run under ``cfg``; raises the one-line CbatchError when it would not."""
    if user is not None:
        identity = Identity.lookup(user)
        if os.geteuid() != 0 and identity.uid != os.geteuid():
            raise PolicyError("--user", "checking as another user needs root", user)
    else:
        identity = Identity.lookup_uid(os.geteuid())
    path = os.path.abspath(script)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_SCAN_BYTES + 1)
    except OSError as exc:
        raise JobError("script", f"cannot read ({exc.strerror})", script) from exc
    directives = parse_script(data)
    job = build_job(path, identity, queue, data)
    result = policy.decide(cfg, job, directives, resolve)
    _describe(out, cfg, job, directives, result)
    return 0
