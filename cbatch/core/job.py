"""Who runs which job: :class:`Identity`, :class:`Registration` and :class:`JobContext`.

A job is known twice. The root prologue sees it first (pbs_mom's argv, or Slurm's Prolog environment) and
the daemon keeps that as a :class:`Registration` - the trusted facts: job id, owner, queue, script path.
When the job starter asks for the job to start, the daemon combines the registration with what the starter
saw (shell, stdin line, cwd, environment) into a :class:`JobContext`, the one input the policy reads.

Identities (uid, gid, groups) are always looked up on the host by user name, never taken from the job.

Stdlib only: the job starter imports this module (``pwd``/``grp`` are used only in :meth:`Identity.lookup`).
"""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Tuple

from cbatch.core.errors import JobError, PolicyError
from cbatch.core.resources import Resources, parse_resource_list

BATCH_SYSTEMS = ("torque", "slurm", "local", "pbs")
SLURM_SPOOL = "/var/spool/slurmd"


@dataclass(frozen=True)
class Identity:
    """A host user as the host's passwd/group databases describe it."""

    user: str
    uid: int
    gid: int
    groups: Tuple[int, ...]
    home: str
    shell: str

    @classmethod
    def _from_pw(cls, pw) -> "Identity":
        seen = []
        try:
            listed = os.getgrouplist(pw.pw_name, pw.pw_gid)
        except OSError:
            listed = [pw.pw_gid]
        for gid in [pw.pw_gid, *listed]:
            if gid not in seen:
                seen.append(gid)
        return cls(user=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid, groups=tuple(seen), home=pw.pw_dir,
                   shell=pw.pw_shell)

    @classmethod
    def lookup(cls, user: str) -> "Identity":
        """Look ``user`` up in the host's passwd and group databases. PolicyError if unknown."""
        import pwd

        try:
            return cls._from_pw(pwd.getpwnam(user))
        except (KeyError, TypeError, ValueError) as exc:
            raise PolicyError("user", "unknown user on this host", user,
                              "the job owner must exist in this node's passwd database") from exc

    @classmethod
    def lookup_uid(cls, uid: int) -> "Identity":
        """Look a uid up (e.g. from SO_PEERCRED). PolicyError if the uid has no passwd entry."""
        import pwd

        try:
            return cls._from_pw(pwd.getpwuid(uid))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise PolicyError("user", "unknown uid on this host", uid,
                              "the job owner must exist in this node's passwd database") from exc

    def to_dict(self) -> dict:
        """JSON-safe form."""
        return {"user": self.user, "uid": self.uid, "gid": self.gid, "groups": list(self.groups),
                "home": self.home, "shell": self.shell}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Identity":
        """Inverse of :meth:`to_dict`."""
        return cls(user=str(data["user"]), uid=int(data["uid"]), gid=int(data["gid"]),
                   groups=tuple(int(g) for g in data["groups"]), home=str(data["home"]),
                   shell=str(data["shell"]))


def _field(name: str, value: object, *, allow_empty: bool = False, absolute: bool = False) -> str:
    """A registration field: a string without NUL or newline (these end up in labels, logs and paths)."""
    if not isinstance(value, str):
        raise JobError("job registration", f"{name} is not a string", repr(value))
    if not value and not allow_empty:
        raise JobError("job registration", f"empty {name}")
    if "\0" in value or "\n" in value:
        raise JobError("job registration", f"invalid {name}", value, "without NUL or newline")
    if absolute and not value.startswith("/"):
        raise JobError("job registration", f"{name} is not an absolute path", value)
    return value


@dataclass(frozen=True)
class Registration:
    """What the root prologue learnt about a job; the daemon persists it as JSON (:meth:`to_dict`).

    ``group`` is the batch system's group name for the job (informational: the policy uses the host
    identity's gid). ``uid`` is only set when the batch system told us one (Slurm) so the daemon can
    cross-check it against the host lookup.
    """

    job_id: str
    user: str
    group: str
    name: str
    resource_list: str
    queue: str
    account: str
    script_path: str
    session_id: Optional[int] = None
    batch: str = "torque"
    registered_at: float = 0.0
    uid: Optional[int] = None

    def __post_init__(self) -> None:
        _field("job_id", self.job_id)
        _field("user", self.user)
        for name in ("group", "name", "resource_list", "queue", "account"):
            _field(name, getattr(self, name), allow_empty=True)
        _field("script_path", self.script_path, absolute=True)
        if self.batch not in BATCH_SYSTEMS:
            raise JobError("job registration", "unknown batch system", self.batch, " | ".join(BATCH_SYSTEMS))
        for name in ("session_id", "uid"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise JobError("job registration", f"invalid {name}", repr(v), "a non-negative integer")

    @classmethod
    def from_prologue_argv(cls, argv: Sequence[str], session_id: Optional[int] = None,
                           now: Optional[float] = None) -> "Registration":
        """Build from the Torque prologue's arguments.

        ``argv`` is the 8 arguments after argv[0] (jobid, user, group, job name, resource list, queue,
        account, script path); a full ``sys.argv`` of 9 is accepted too. ``session_id`` is the prologue's
        parent pid, which pbs_mom makes the job's session id.
        """
        args = list(argv)
        if len(args) == 9:
            args = args[1:]
        if len(args) != 8:
            raise JobError("prologue", "expected 8 arguments from pbs_mom", len(args),
                           "jobid user group name resources queue account script")
        job_id, user, group, name, resources, queue, account, script = args
        return cls(job_id=job_id, user=user, group=group, name=name, resource_list=resources, queue=queue,
                   account=account, script_path=script, session_id=session_id, batch="torque",
                   registered_at=time.time() if now is None else now)

    @classmethod
    def from_slurm_env(cls, env: Mapping[str, str], spool_dir: str = SLURM_SPOOL,
                       now: Optional[float] = None) -> "Registration":
        """Build from a Slurm Prolog's environment (``SLURM_JOB_ID``, ``SLURM_JOB_USER`` ...).

        The batch script is where slurmd stores it: ``<spool_dir>/job<id, 5 digits>/slurm_script``.
        CPUs and memory become a Torque-style resource list (``ncpus=N,mem=Mmb``) so the policy has one
        input format; under Slurm the job's cgroup enforces them anyway.
        """
        job_id = env.get("SLURM_JOB_ID", "")
        if not (job_id.isdigit() and job_id.isascii()):
            raise JobError("slurm prolog", "missing or invalid SLURM_JOB_ID", job_id or None)
        user = env.get("SLURM_JOB_USER", "")
        uid_text = env.get("SLURM_JOB_UID", "")
        uid = int(uid_text) if uid_text.isdigit() and uid_text.isascii() else None
        res = []
        cpus = env.get("SLURM_CPUS_ON_NODE") or env.get("SLURM_JOB_CPUS_PER_NODE", "").split("(")[0].split(",")[0]
        if cpus and cpus.isdigit():
            res.append(f"ncpus={int(cpus)}")
        mem = env.get("SLURM_MEM_PER_NODE", "")
        if mem.isdigit():
            res.append(f"mem={int(mem)}mb")
        script = env.get("SLURM_SCRIPT_PATH") or f"{spool_dir.rstrip('/')}/job{int(job_id):05d}/slurm_script"
        return cls(job_id=job_id, user=user, group=env.get("SLURM_JOB_GROUP", env.get("SLURM_JOB_GID", "")),
                   name=env.get("SLURM_JOB_NAME", ""), resource_list=",".join(res),
                   queue=env.get("SLURM_JOB_PARTITION", ""), account=env.get("SLURM_JOB_ACCOUNT", ""),
                   script_path=script, session_id=None, batch="slurm",
                   registered_at=time.time() if now is None else now, uid=uid)

    @classmethod
    def from_pbs(cls, data: Mapping, now: Optional[float] = None) -> "Registration":
        """Build from what cbatch's OpenPBS/PBS Pro ``execjob_launch`` hook read from PBS's own job object
        (root, on the mom): ``job_id``, ``euser``, ``egroup``, ``name``, ``queue``, ``resource_list``,
        ``account``, ``script`` (``PBS_HOME/mom_priv/jobs/<id>.SC``) and ``session_id`` (the job shell's
        session, already set when the launch hook runs). Never anything from the job's environment.
        """
        if not isinstance(data, Mapping):
            raise JobError("pbs hook", "job data is not an object", type(data).__name__)
        sid = data.get("session_id")
        if isinstance(sid, str) and sid.isdigit() and sid.isascii():
            sid = int(sid)
        if sid is None or isinstance(sid, bool) or not isinstance(sid, int) or sid <= 1:
            raise JobError("pbs hook", "no session id for the job", repr(sid),
                           "register from execjob_launch, where PBS has set the job's session")
        text = {k: data.get(k) if data.get(k) is not None else "" for k in
                ("job_id", "euser", "egroup", "name", "queue", "resource_list", "account", "script")}
        for k, v in text.items():
            if not isinstance(v, str):
                raise JobError("pbs hook", f"{k} is not a string", repr(v))
        return cls(job_id=text["job_id"], user=text["euser"], group=text["egroup"], name=text["name"],
                   resource_list=text["resource_list"], queue=text["queue"], account=text["account"],
                   script_path=text["script"], session_id=sid, batch="pbs",
                   registered_at=time.time() if now is None else now)

    def to_dict(self) -> dict:
        """JSON-safe form for the daemon's state directory."""
        return {"job_id": self.job_id, "user": self.user, "group": self.group, "name": self.name,
                "resource_list": self.resource_list, "queue": self.queue, "account": self.account,
                "script_path": self.script_path, "session_id": self.session_id, "batch": self.batch,
                "registered_at": self.registered_at, "uid": self.uid}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Registration":
        """Inverse of :meth:`to_dict`; validates like the constructor (JobError on a bad record)."""
        if not isinstance(data, Mapping):
            raise JobError("job registration", "not an object", type(data).__name__)
        try:
            at = data.get("registered_at", 0.0)
            if isinstance(at, bool) or not isinstance(at, (int, float)):
                raise JobError("job registration", "invalid registered_at", repr(at))
            return cls(job_id=data["job_id"], user=data["user"], group=data.get("group", ""),
                       name=data.get("name", ""), resource_list=data.get("resource_list", ""),
                       queue=data.get("queue", ""), account=data.get("account", ""),
                       script_path=data["script_path"], session_id=data.get("session_id"),
                       batch=data.get("batch", "torque"), registered_at=float(at), uid=data.get("uid"))
        except KeyError as exc:
            raise JobError("job registration", "missing field", exc.args[0]) from exc


def _script_args(stdin_line: str, script_path: str) -> Tuple[str, ...]:
    """The arguments after the script on pbs_mom's stdin line, for display and the spec only."""
    line = stdin_line.rstrip("\n")
    try:
        words = shlex.split(line)
    except ValueError:
        words = line.split()    # an unbalanced quote is the shell's business, not ours
    if words and words[0] == script_path:
        words = words[1:]
    elif words:
        words = words[1:]
    return tuple(words)


@dataclass(frozen=True)
class JobContext:
    """Everything the policy knows about one job start. See docs/architecture.md."""

    batch: str
    job_id: str
    identity: Identity
    queue: str
    job_name: str
    account: str
    script_path: str
    script_args: Tuple[str, ...]
    stdin_line: str
    shell: str
    cwd: str
    env: Tuple[Tuple[str, str], ...]
    resources: Resources = field(default_factory=Resources)
    node_file: Optional[str] = None
    tmpdir: Optional[str] = None
    cgroup_parent: Optional[str] = None
    session_id: Optional[int] = None
    umask: Optional[int] = None        # the starter's (or cbatch run caller's) umask, read from /proc by the daemon

    @classmethod
    def for_start(cls, registration: Registration, identity: Identity, shell: str, stdin_line: str,
                  cwd: str, env: Sequence[Tuple[str, str]] | Mapping[str, str],
                  cgroup_parent: Optional[str] = None, umask: Optional[int] = None) -> "JobContext":
        """Combine the daemon's registration with what the starter saw.

        ``identity`` must come from :meth:`Identity.lookup` of ``registration.user``. ``env`` is the
        starter's environment (pairs in order, or a mapping). Raises JobError for a resource list that does
        not parse, or a non-absolute shell/cwd.
        """
        if identity.user != registration.user:
            raise JobError("job", "identity does not match the registered owner", identity.user,
                           f"job {registration.job_id} belongs to {registration.user}")
        pairs = tuple((str(k), str(v)) for k, v in (env.items() if isinstance(env, Mapping) else env))
        env_map = dict(pairs)
        if not shell.startswith("/"):
            raise JobError("job", "shell is not an absolute path", shell)
        if not cwd.startswith("/"):
            raise JobError("job", "working directory is not an absolute path", cwd)
        return cls(batch=registration.batch, job_id=registration.job_id, identity=identity,
                   queue=registration.queue, job_name=registration.name, account=registration.account,
                   script_path=registration.script_path,
                   script_args=_script_args(stdin_line, registration.script_path), stdin_line=stdin_line,
                   shell=shell, cwd=cwd, env=pairs, resources=parse_resource_list(registration.resource_list),
                   node_file=env_map.get("PBS_NODEFILE") or None, tmpdir=env_map.get("TMPDIR") or None,
                   cgroup_parent=cgroup_parent, session_id=registration.session_id, umask=umask)

    def env_dict(self) -> dict:
        """The job environment as a dict (later duplicates win)."""
        return dict(self.env)
