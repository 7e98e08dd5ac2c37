"""The one place that decides what a job runs: ``(SiteConfig, JobContext, Directives) -> ContainerSpec | Native``.

Pure: no file, process or network access here (a unit test checks the source). Host lookups that a decision
needs - canonicalising a mount source as the job's user would see it - go through the injected
``resolve(path, identity) -> canonical path`` (``cbatch.host.paths.resolve_as_user`` in the daemon and
``cbatch check``), which raises a CbatchError when the path is missing or inaccessible.

Every refusal is raised here, as a one-line PolicyError (or DirectiveError) a user can act on.

Environment precedence, lowest first: the queue's ``env`` < the job's environment minus ``env_drop`` <
``--env`` < ``CBATCH_IMAGE`` (always the image that runs). The image's own ``ENV`` applies only to keys
cbatch does not set at all - which is why ``PATH`` is in the default ``env_drop``.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from fnmatch import fnmatchcase
from typing import Callable, List, Optional, Sequence, Tuple

from cbatch.core.config import RESERVED_TARGETS, QueuePolicy, SiteConfig, image_allowed, is_reserved_target
from cbatch.core.directives import NATIVE, Directives, valid_reference
from cbatch.core.errors import DirectiveError, PolicyError
from cbatch.core.job import Identity, JobContext
from cbatch.core.spec import LABEL_JOB, LABEL_KIND, LABEL_UID, ContainerSpec, Mount, Native

Resolver = Callable[[str, Identity], str]
IMAGE_ENV = "CBATCH_IMAGE"
_NAME_BAD = re.compile(r"[^a-zA-Z0-9_.-]")
KERNEL_SOURCES = ("/proc", "/sys", "/dev")
RESERVED_HINT = "not /, " + ", ".join(RESERVED_TARGETS) + ", the job script, or anything under them"


def container_name(job_id: str, suffix: str = "") -> str:
    """``cbatch-<job id in Docker's name charset>-<8 hex of sha256(job id)>[suffix]``.

    Sanitising alone would map ``1.a/b`` and ``1.a_b`` to one name; the hash of the raw id keeps names
    unique per job id while the readable part helps admins find the container.
    """
    readable = _NAME_BAD.sub("_", job_id)[:64]
    digest = hashlib.sha256(job_id.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"cbatch-{readable}-{digest}{suffix}"


def _subject(line: int, fallback: str) -> str:
    return f"directive line {line}" if line else fallback


def choose_image(policy: QueuePolicy, job: JobContext, directives: Directives,
                 run: bool = False) -> Tuple[str, str]:
    """The image to use and where it came from (``qsub -v CBATCH_IMAGE``, ``--image``, the queue default).

    For a job, ``CBATCH_IMAGE`` in the job environment wins over ``#CBATCH --image`` (so a user can change
    the image at qsub time without editing the script). For ``cbatch run`` the explicit ``--image`` wins,
    because inside a container job ``CBATCH_IMAGE`` is always set to the job's own image.
    """
    env_image = job.env_dict().get(IMAGE_ENV) or None
    order = [(directives.image, "--image"), (env_image, "CBATCH_IMAGE")]
    if not run:
        order.reverse()
    for image, source in order:
        if image:
            return image, source
    return policy.image, f"queue {policy.name or 'defaults'} default"


def check_image(policy: QueuePolicy, queue: str, image: str, source: str) -> None:
    """Refuse an image the queue does not allow (or native where it is not allowed), or a bad reference."""
    if image == NATIVE:
        if not policy.native:
            raise PolicyError("image", f"native (no container) is not allowed in queue {queue}", source,
                              "allowed images: " + (", ".join(policy.images) or "none"))
        return
    if not valid_reference(image):
        raise PolicyError("image", f"not a valid image reference (from {source})", image,
                          "[registry[:port]/]name[:tag][@sha256:<64 hex>], lowercase name")
    if not image_allowed(image, policy.images):
        allowed = ", ".join(policy.images) or "none"
        if policy.native:
            allowed += ", native"
        raise PolicyError("image", f"not allowed in queue {queue}", image, "allowed: " + allowed)


_check_image = check_image     # the submit filter's earlier name


def check_request(policy: QueuePolicy, queue: str, directives: Directives, image: str,
                  fallback: str = "directive") -> None:
    """Refuse what the queue does not allow apart from the image: the network, and user mounts at all.

    Needs no host access, so the submit filter runs it at qsub time as well as :func:`decide` at job start;
    where the mounts may point is checked only at start (that needs the job's identity on the host).
    ``fallback`` names the source of a mount without a line number (``cbatch run`` options).
    """
    if image == NATIVE:
        return                  # no container: no network or mounts to refuse
    network = directives.network or policy.network
    if network not in policy.networks:
        raise PolicyError("network", f"not allowed in queue {queue}", network,
                          "allowed: " + ", ".join(policy.networks))
    if directives.mounts and not policy.user_mounts.allowed:
        m = directives.mounts[0]
        raise PolicyError(_subject(m.line, fallback), f"user mounts are not allowed in queue {queue}",
                          f"{m.source}:{m.target}", "ask your admin, or copy the data into your home")


def environment(policy: QueuePolicy, job: JobContext, directives: Directives,
                image: str) -> List[Tuple[str, str, str]]:
    """The container environment as ``(key, value, layer)`` in order, later layers overriding earlier."""
    layers: dict = {}
    for k, v in policy.env:
        layers[k] = (v, "site")
    for k, v in job.env:
        if not any(fnmatchcase(k, pat) for pat in policy.env_drop):
            layers[k] = (v, "job")
    for k, v in directives.env:
        layers[k] = (v, "--env")
    layers[IMAGE_ENV] = (image, "cbatch")
    return [(k, v, src) for k, (v, src) in layers.items()]


def _container_path(path: str) -> str:
    """normpath, plus what Docker does to a mount target: POSIX keeps a leading ``//`` but Docker cleans it
    to ``/``, so ``//etc/shadow`` must be checked (and used) as ``/etc/shadow``."""
    return "/" + posixpath.normpath(path).lstrip("/")


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


class _Mounts:
    """Collects mounts in order, refusing two different sources on one target."""

    def __init__(self) -> None:
        self.items: List[Mount] = []

    def add(self, mount: Mount, subject: str) -> None:
        for m in self.items:
            if m.target == mount.target:
                if m.source == mount.source:
                    return          # e.g. cwd == home: one mount, the earlier (cbatch's) mode wins
                raise PolicyError(subject, "mount target already used", mount.target,
                                  f"cbatch already mounts {m.source} there")
        self.items.append(mount)


def _job_path(job: JobContext, resolve: Resolver, path: str, what: str, read_only: bool,
              script: str) -> Mount:
    """A host path the job refers to (cwd, home, TMPDIR, node file), mounted at the same path."""
    if not path.startswith("/"):
        raise PolicyError(what, "not an absolute path", path, "cbatch mounts it at the same path")
    target = _container_path(path)
    if is_reserved_target(target, (script,)):
        raise PolicyError(what, "cannot be mounted into the container", path, RESERVED_HINT)
    return Mount(source=resolve(path, job.identity), target=target, read_only=read_only)


def _user_mounts(policy: QueuePolicy, job: JobContext, directives: Directives, resolve: Resolver,
                 fallback: str, mounts: _Mounts) -> None:
    prefixes = tuple(job.identity.home if p == "~" else p for p in policy.user_mounts.prefixes)
    for m in directives.mounts:
        subject = _subject(m.line, fallback)
        if not m.source.startswith("/") or not m.target.startswith("/"):
            raise DirectiveError(subject, "mount paths must be absolute", f"{m.source}:{m.target}",
                                 "SRC:DST[:ro|rw] with absolute paths")
        target = _container_path(m.target)
        if is_reserved_target(target, (job.script_path,)):
            raise PolicyError(subject, "mount onto a reserved path", m.target, RESERVED_HINT)
        source = resolve(m.source, job.identity)
        if any(_under(source, k) for k in KERNEL_SOURCES):
            # Even under a generous prefix ("/"), host kernel interfaces are not data.
            raise PolicyError(subject, "mount source is a kernel filesystem", source,
                              "not " + ", ".join(KERNEL_SOURCES) + " or anything under them")
        if not any(_under(source, p) for p in prefixes):
            shown = source if source == m.source else f"{source} (resolved from {m.source})"
            raise PolicyError(subject, "mount source outside the allowed directories", shown,
                              "allowed: " + (", ".join(prefixes) or "none"))
        mounts.add(Mount(source=source, target=target, read_only=m.read_only), subject)


def _common(config: SiteConfig, job: JobContext, directives: Directives, resolve: Resolver, *, run: bool,
            argv: Tuple[str, ...], stdin_line: Optional[str], name: str, kind: str) -> ContainerSpec | Native:
    policy = config.queue(job.queue)
    queue = job.queue or "(none)"
    fallback = "cbatch run" if run else "directive"
    image, source = choose_image(policy, job, directives, run=run)
    check_image(policy, queue, image, source)
    if image == NATIVE:
        return Native(shell=job.shell, reason=f"image native (from {source})")
    if job.identity.uid == 0 and not policy.allow_root:
        raise PolicyError("user", f"jobs of uid 0 may not run in a container in queue {queue}",
                          job.identity.user, "run as a normal user, or set allow_root for this queue")
    check_request(policy, queue, directives, image, fallback)

    mounts = _Mounts()
    if not run:
        mounts.add(_job_path(job, resolve, job.script_path, "job script", True, ""), "job script")
    mounts.add(Mount("/etc/passwd", "/etc/passwd", True), "passwd")
    mounts.add(Mount("/etc/group", "/etc/group", True), "group")
    script = job.script_path
    if job.node_file:
        mounts.add(_job_path(job, resolve, job.node_file, "PBS_NODEFILE", True, script), "PBS_NODEFILE")
    if job.tmpdir:
        mounts.add(_job_path(job, resolve, job.tmpdir, "TMPDIR", False, script), "TMPDIR")
    mounts.add(_job_path(job, resolve, job.cwd, "working directory", False, script), "working directory")
    mounts.add(_job_path(job, resolve, job.identity.home, "home directory", False, script), "home directory")
    for m in policy.mounts:
        mounts.add(m, "site mount")
    _user_mounts(policy, job, directives, resolve, fallback, mounts)

    limited = job.cgroup_parent is None
    cpus = job.resources.cpus_on(config.daemon.hostname) if limited else None
    memory = job.resources.memory_on(config.daemon.hostname) if limited else None
    hard = policy.hardening
    env = tuple((k, v) for k, v, _ in environment(policy, job, directives, image))
    return ContainerSpec(
        name=name, image=image, argv=argv, uid=job.identity.uid, gid=job.identity.gid,
        groups=job.identity.groups, workdir=posixpath.normpath(directives.workdir or job.cwd), env=env,
        mounts=tuple(mounts.items),
        labels=((LABEL_JOB, job.job_id), (LABEL_UID, str(job.identity.uid)), (LABEL_KIND, kind)),
        stdin_line=stdin_line, use_entrypoint=directives.entrypoint,
        network=directives.network or policy.network,
        read_only_rootfs=directives.readonly or hard.read_only_rootfs,
        cpus=float(cpus) if cpus else None, memory_bytes=memory or None, cgroup_parent=job.cgroup_parent,
        pids_limit=hard.pids_limit, cap_drop_all=hard.cap_drop_all, no_new_privileges=hard.no_new_privileges,
        init=hard.init, shm_bytes=policy.shm_size, umask=job.umask, layer_bytes=hard.layer_size)


def decide(config: SiteConfig, job: JobContext, directives: Directives, resolve: Resolver) -> ContainerSpec | Native:
    """Decide how a transparent batch job runs: the container spec, or Native when it runs without one.

    The container runs ``job.shell`` fed ``job.stdin_line`` (as pbs_mom feeds the shell), as the job's
    host identity, in ``job.cwd`` (or ``--workdir``). Raises PolicyError/DirectiveError for a refusal.
    """
    return _common(config, job, directives, resolve, run=False, argv=(job.shell,), stdin_line=job.stdin_line,
                   name=container_name(job.job_id), kind="job")


def decide_run(config: SiteConfig, job: JobContext, directives: Directives, argv: Sequence[str],
               resolve: Resolver, index: int = 0) -> ContainerSpec | Native:
    """Decide a ``cbatch run`` inside job ``job``: ``argv`` is the user's command, ``index`` numbers the
    job's runs (container ``cbatch-<job>-<hash>-run-<index>``). Native means: exec ``argv`` directly."""
    if not argv:
        raise DirectiveError("cbatch run", "no command given", None, "cbatch run [OPTIONS] CMD [ARGS...]")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise DirectiveError("cbatch run", "invalid run index", index)
    return _common(config, job, directives, resolve, run=True, argv=tuple(argv), stdin_line=None,
                   name=container_name(job.job_id, f"-run-{index}"), kind="run")
