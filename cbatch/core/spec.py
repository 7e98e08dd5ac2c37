"""What the policy decides and the engine carries out: plain frozen data, no behaviour, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

# Where cbatch's own plumbing appears inside every container. Users may not mount onto it.
CBATCH_DIR = "/.cbatch"
HELPER_PATH = CBATCH_DIR + "/exec"          # the static cbatch-exec helper, bind-mounted read-only
STDOUT_PATH = CBATCH_DIR + "/stdout"        # the job's stdout spool file, when it is a regular file
STDERR_PATH = CBATCH_DIR + "/stderr"
INIT_PATH = CBATCH_DIR + "/init"            # the engine's tini (docker-init), bind-mounted read-only
FILTER_PATH = CBATCH_DIR + "/filter"        # direct engine: the seccomp loader, first program of every process
SECCOMP_PATH = CBATCH_DIR + "/seccomp.bpf"  # direct engine: the compiled filter it loads (read-only)

# Container paths cbatch itself provides, or that would hand the host's kernel interfaces to a job: nothing
# may be mounted onto them or under them (facts about the container layout, so they live here).
RESERVED_TARGETS = ("/etc/passwd", "/etc/group", "/etc/shadow", "/proc", "/sys", "/dev", CBATCH_DIR)


def is_reserved_target(target: str, extra: Tuple[str, ...] = ()) -> bool:
    """True if a container path is ``/``, or equal to or under a reserved path (or one of ``extra``)."""
    if target == "/":
        return True
    reserved = RESERVED_TARGETS + tuple(e for e in extra if e and e != "/")
    return any(target == r or target.startswith(r.rstrip("/") + "/") for r in reserved)


LABEL_JOB = "cbatch.job"
LABEL_UID = "cbatch.uid"
LABEL_INSTANCE = "cbatch.instance"          # which cbatchd owns the container (one per node, or per test)
LABEL_KIND = "cbatch.kind"                  # "job" (transparent) or "run" (cbatch run)


@dataclass(frozen=True)
class Mount:
    """A bind mount. ``source`` is a canonical host path (symlinks resolved), ``target`` absolute."""

    source: str
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class Native:
    """The policy's answer when the job runs without a container: the starter execs ``shell`` itself."""

    shell: str
    reason: str


@dataclass(frozen=True)
class ContainerSpec:
    """Everything the engine needs to create one container, and nothing it has to decide.

    ``argv`` is the command inside the container. For a transparent Torque job it is ``[shell]`` and
    ``stdin_line`` carries ``<script> [args]\\n`` exactly as pbs_mom feeds it, so the shell reads and runs it
    (the shebang applies, ``$0`` is the script path). For ``cbatch run`` it is the user's command and
    ``stdin_line`` is None.
    """

    name: str
    image: str
    argv: Tuple[str, ...]
    uid: int
    gid: int
    groups: Tuple[int, ...]
    workdir: str
    env: Tuple[Tuple[str, str], ...]
    mounts: Tuple[Mount, ...] = ()
    labels: Tuple[Tuple[str, str], ...] = ()
    stdin_line: Optional[str] = None
    use_entrypoint: bool = False
    hostname: Optional[str] = None
    network: str = "none"
    read_only_rootfs: bool = False
    cpus: Optional[float] = None            # --cpus, when no batch-system cgroup limits the job
    cpuset: Optional[str] = None
    memory_bytes: Optional[int] = None      # --memory (and --memory-swap equal to it)
    cgroup_parent: Optional[str] = None     # e.g. /torque/1.vm, /slurm_node/uid_1000/job_7
    pids_limit: Optional[int] = None
    cap_drop_all: bool = True
    no_new_privileges: bool = True
    init: bool = True
    shm_bytes: Optional[int] = None
    devices: Tuple[str, ...] = field(default=())
    umask: Optional[int] = None             # the caller's umask (pbs_mom gives jobs 0077), applied by the helper
    layer_bytes: Optional[int] = None       # bound on the writable layer (hardening.layer_size); None: unbounded
    engine: str = "auto"                    # the queue's engine choice (cbatch.engines.router decides "auto")
    image_id: Optional[str] = None          # the local image id the daemon checked (images.ensure): the direct
                                            # engine starts exactly it, whatever ``image`` names by then

    def env_dict(self) -> dict:
        """The environment as a dict (later pairs win, matching how the policy layered them)."""
        return dict(self.env)

    def label_dict(self) -> dict:
        """The labels as a dict."""
        return dict(self.labels)
