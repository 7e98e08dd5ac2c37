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

import functools
import hashlib
import posixpath
import re
from fnmatch import fnmatchcase, translate
from typing import Callable, List, Optional, Sequence, Tuple

from cbatch.core.config import QueuePolicy, SiteConfig, image_allowed, normalize_reference
from cbatch.core.configkeys import GLOB
from cbatch.core.directives import NATIVE, Directives, valid_reference
from cbatch.core.errors import DirectiveError, PolicyError
from cbatch.core.imagerefs import repo_of
from cbatch.core.job import Identity, JobContext
from cbatch.core.mountset import MountSet
from cbatch.core.spec import (LABEL_JOB, LABEL_KIND, LABEL_UID, RESERVED_TARGETS, ContainerSpec, Mount, Native,
                              is_reserved_target)

Resolver = Callable[[str, Identity], str]
# ``tags_of(ref)``: the tags (``name:tag``) this node's engine has for the image a digest reference names,
# () when it has none. The daemon passes the engine's lookup; None (submit filter, tests) = unknown.
TagsOf = Callable[[str], Sequence[str]]
IMAGE_ENV = "CBATCH_IMAGE"
PBS_PRO_IMAGE_ENV = "CONTAINER_IMAGE"     # PBS Pro container hook's name for the same request (batch "pbs" only)
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
    env = job.env_dict()
    env_image = env.get(IMAGE_ENV) or None
    if env_image is None and getattr(job, "batch", None) == "pbs":
        # PBS Pro's container hook takes -v CONTAINER_IMAGE=... (or a site's -l container_image=...): the
        # same request under cbatch's policy.
        extra = dict(getattr(getattr(job, "resources", None), "extra", ()) or ())
        env_image = env.get(PBS_PRO_IMAGE_ENV) or extra.get("container_image") or None
    order = [(directives.image, "--image"), (env_image, "CBATCH_IMAGE")]
    if not run:
        order.reverse()
    for image, source in order:
        if image:
            return image, source
    return policy.image, f"queue {policy.name or 'defaults'} default"


def _repo(ref: str) -> str:
    """The fully expanded repository of a reference (``busybox@sha256:..`` -> ``docker.io/library/busybox``)."""
    return normalize_reference(repo_of(ref) + ":x").rsplit(":", 1)[0]


def digest_allowed(image: str, patterns: Tuple[str, ...], tags_of: Optional[TagsOf]) -> bool:
    """True if ``image`` pins a digest (``name@sha256:..``) that is, on this node, the image of a tag of the
    same repository the queue allows (``name:tag`` exactly or by a glob such as ``name:*``)."""
    if tags_of is None or "@" not in image:
        return False
    want = _repo(image)
    return any(_repo(tag) == want and image_allowed(tag, patterns) for tag in tags_of(image) if "@" not in tag)


def repo_allowed(image: str, patterns: Tuple[str, ...]) -> bool:
    """True if some pattern allows some tag of ``image``'s repository (the submit filter, which has no
    engine, lets such a digest reference through: the node decides with :func:`digest_allowed`)."""
    want = _repo(image)
    for pat in patterns:
        if GLOB.search(pat):
            name = pat.rsplit(":", 1)[0] if ":" in pat.rsplit("/", 1)[-1] else pat
            if fnmatchcase(want, name) or fnmatchcase(repo_of(image), name):
                return True
        elif _repo(pat) == want:
            return True
    return False


def check_image(policy: QueuePolicy, queue: str, image: str, source: str,
                tags_of: Optional[TagsOf] = None) -> None:
    """Refuse an image the queue does not allow (or native where it is not allowed), or a bad reference.

    A digest reference is allowed when it matches a pattern itself, or when ``tags_of`` (the engine's
    knowledge, injected: no I/O here) shows it is the image of an allowed tag of its repository."""
    if image == NATIVE:
        if not policy.native:
            raise PolicyError("image", f"native (no container) is not allowed in queue {queue}", source,
                              "allowed images: " + (", ".join(policy.images) or "none"))
        return
    if not valid_reference(image):
        raise PolicyError("image", f"not a valid image reference (from {source})", image,
                          "[registry[:port]/]name[:tag][@sha256:<64 hex>], lowercase name")
    if not image_allowed(image, policy.images) and not digest_allowed(image, policy.images, tags_of):
        allowed = ", ".join(policy.images) or "none"
        if policy.native:
            allowed += ", native"
        if "@" in image:
            allowed += "; a digest only as the image of an allowed tag on this node"
        raise PolicyError("image", f"not allowed in queue {queue}", image, "allowed: " + allowed)



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
    dropped = _matcher(policy.env_drop)
    for k, v in job.env:
        if not dropped(k):
            layers[k] = (v, "job")
    for k, v in directives.env:
        layers[k] = (v, "--env")
    layers[IMAGE_ENV] = (image, "cbatch")
    return [(k, v, src) for k, (v, src) in layers.items()]


@functools.lru_cache(maxsize=64)
def _matcher(patterns: Tuple[str, ...]) -> Callable[[str], object]:
    """``any(fnmatchcase(name, p) for p in patterns)`` as one compiled regex (per config, not per variable
    and pattern at every start)."""
    if not patterns:
        return lambda name: False
    return re.compile("|".join(f"(?:{translate(p)})" for p in patterns)).match


def _container_path(path: str) -> str:
    """normpath, plus what Docker does to a mount target: POSIX keeps a leading ``//`` but Docker cleans it
    to ``/``, so ``//etc/shadow`` must be checked (and used) as ``/etc/shadow``."""
    return "/" + posixpath.normpath(path).lstrip("/")


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


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
                 fallback: str, mounts: MountSet) -> None:
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
        mounts.add(Mount(source=source, target=target, read_only=m.read_only), "user", subject)


# Bounds beyond which a request is nonsense on any node (the engine would answer with its own text); below
# them a request larger than this node is clamped to the node (TORQUE's np= may exceed the cores).
MAX_CPUS = 1 << 16
MAX_MEMORY = 1 << 60                 # 1 EiB; the engine takes an int64
MIN_MEMORY = 6 << 20                 # Docker's minimum memory limit (6 MiB)
MAX_WALLTIME = (1 << 31) - 1         # seconds (~68 years)
WORKDIR_FORBIDDEN = KERNEL_SOURCES + ("/.cbatch",)


def _workdir(asked: Optional[str], cwd: str) -> str:
    """The container's working directory; never a kernel interface or cbatch's plumbing (``/proc/self/fd/N``
    would hand the job a descriptor of the engine's, whatever the runc version)."""
    path = _container_path(asked or cwd)
    if any(_under(path, k) for k in WORKDIR_FORBIDDEN):
        raise PolicyError("--workdir" if asked else "working directory", "not allowed as working directory", path,
                          "not " + ", ".join(WORKDIR_FORBIDDEN) + " or anything under them")
    return path


def limits(config: SiteConfig, job: JobContext) -> Tuple[Optional[int], Optional[int]]:
    """(cpus, memory bytes) for the container when no batch-system cgroup limits the job.

    Refuses what no node could honour (one line naming the resource); clamps to this node's CPUs and
    memory (``config.daemon.cpus``/``memory``, measured when the config was loaded; 0 = unknown).
    """
    res, host, daemon = job.resources, config.daemon.hostname, config.daemon
    if res.walltime is not None and res.walltime > MAX_WALLTIME:
        raise PolicyError("resource list", "walltime out of range", f"walltime={res.walltime}",
                          f"at most {MAX_WALLTIME} seconds")
    cpus = res.cpus_on(host)
    if cpus is not None and cpus > MAX_CPUS:
        raise PolicyError("resource list", "more CPUs than any node has", f"{cpus} cpus",
                          f"at most {daemon.cpus or MAX_CPUS} on this node")
    if cpus and daemon.cpus and cpus > daemon.cpus:
        cpus = daemon.cpus
    memory = res.memory_on(host)
    if memory is not None and memory > MAX_MEMORY:
        raise PolicyError("resource list", "more memory than any node has", f"{memory} bytes",
                          "at most 1024pb (mem, or pmem times cpus)")
    if memory and memory < MIN_MEMORY:
        raise PolicyError("resource list", "memory limit too small to start a container", f"{memory} bytes",
                          "mem or pmem times cpus at least 6mb")
    if memory and daemon.memory and memory > daemon.memory:
        memory = daemon.memory
    return cpus, memory


def _common(config: SiteConfig, job: JobContext, directives: Directives, resolve: Resolver, *, run: bool,
            argv: Tuple[str, ...], stdin_line: Optional[str], name: str, kind: str,
            tags_of: Optional[TagsOf]) -> ContainerSpec | Native:
    policy = config.queue(job.queue)
    queue = job.queue or "(none)"
    fallback = "cbatch run" if run else "directive"
    image, source = choose_image(policy, job, directives, run=run)
    check_image(policy, queue, image, source, tags_of)
    if image == NATIVE:
        return Native(shell=job.shell, reason=f"image native (from {source})")
    if job.identity.uid == 0 and not policy.allow_root:
        raise PolicyError("user", f"jobs of uid 0 may not run in a container in queue {queue}",
                          job.identity.user, "run as a normal user, or set allow_root for this queue")
    check_request(policy, queue, directives, image, fallback)

    mounts = MountSet()
    if not run and job.script_path:     # an interactive job has no script (empty script_path)
        mounts.add(_job_path(job, resolve, job.script_path, "job script", True, ""), "job", "job script")
    mounts.add(Mount("/etc/passwd", "/etc/passwd", True), "cbatch", "passwd")
    mounts.add(Mount("/etc/group", "/etc/group", True), "cbatch", "group")
    script = job.script_path
    if job.node_file:
        mounts.add(_job_path(job, resolve, job.node_file, "PBS_NODEFILE", True, script), "job", "PBS_NODEFILE")
    if job.tmpdir:
        mounts.add(_job_path(job, resolve, job.tmpdir, "TMPDIR", False, script), "job", "TMPDIR")
    mounts.add(_job_path(job, resolve, job.identity.home, "home directory", False, script), "job",
               "home directory")
    mounts.add(_job_path(job, resolve, job.cwd, "working directory", False, script), "job", "working directory")
    for m in policy.mounts:
        mounts.add(m, "site", f"site mount {m.source}")
    _user_mounts(policy, job, directives, resolve, fallback, mounts)
    workdir = _workdir(directives.workdir, job.cwd)

    limited = job.cgroup_parent is None
    cpus, memory = limits(config, job) if limited else (None, None)
    hard = policy.hardening
    env = tuple((k, v) for k, v, _ in environment(policy, job, directives, image))
    return ContainerSpec(
        name=name, image=image, argv=argv, uid=job.identity.uid, gid=job.identity.gid,
        groups=job.identity.groups, workdir=workdir, env=env, mounts=mounts.mounts(),
        labels=((LABEL_JOB, job.job_id), (LABEL_UID, str(job.identity.uid)), (LABEL_KIND, kind)),
        stdin_line=stdin_line, use_entrypoint=directives.entrypoint,
        network=directives.network or policy.network,
        read_only_rootfs=directives.readonly or hard.read_only_rootfs,
        cpus=float(cpus) if cpus else None, memory_bytes=memory or None, cgroup_parent=job.cgroup_parent,
        pids_limit=hard.pids_limit, cap_drop_all=hard.cap_drop_all, no_new_privileges=hard.no_new_privileges,
        init=hard.init, shm_bytes=policy.shm_size, umask=job.umask, layer_bytes=hard.layer_size,
        engine=policy.engine)


def decide(config: SiteConfig, job: JobContext, directives: Directives, resolve: Resolver,
           tags_of: Optional[TagsOf] = None) -> ContainerSpec | Native:
    """Decide how a transparent batch job runs: the container spec, or Native when it runs without one.

    The container runs ``job.shell`` fed ``job.stdin_line`` (as pbs_mom feeds the shell), as the job's
    host identity, in ``job.cwd`` (or ``--workdir``). Raises PolicyError/DirectiveError for a refusal.
    ``tags_of``: see :func:`check_image` (digest references of allowed tags).
    """
    return _common(config, job, directives, resolve, run=False, argv=(job.shell,), stdin_line=job.stdin_line,
                   name=container_name(job.job_id), kind="job", tags_of=tags_of)


def decide_run(config: SiteConfig, job: JobContext, directives: Directives, argv: Sequence[str],
               resolve: Resolver, index: int = 0, tags_of: Optional[TagsOf] = None) -> ContainerSpec | Native:
    """Decide a ``cbatch run`` inside job ``job``: ``argv`` is the user's command, ``index`` numbers the
    job's runs (container ``cbatch-<job>-<hash>-run-<index>``). Native means: exec ``argv`` directly."""
    if not argv:
        raise DirectiveError("cbatch run", "no command given", None, "cbatch run [OPTIONS] CMD [ARGS...]")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise DirectiveError("cbatch run", "invalid run index", index)
    return _common(config, job, directives, resolve, run=True, argv=tuple(argv), stdin_line=None,
                   name=container_name(job.job_id, f"-run-{index}"), kind="run", tags_of=tags_of)
