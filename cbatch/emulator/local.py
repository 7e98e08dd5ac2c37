"""A pbs_mom emulator: run a job script the way TORQUE 6.1's pbs_mom does, prologue to epilogue.

TORQUE cannot be installed on the development machines, so this module reproduces what a real pbs_mom was
observed doing (``torque-mom.md``): argv, uids, environment, stdin line, session, signals, cgroups - and
nothing kinder. It is the ONE harness: ``cbatch local`` (:mod:`cbatch.emulator.localcmd`) uses it to run a
script through the real hooks and daemon, and the integration tests use it to drive every end-to-end case.

Shape: :class:`Mom` owns a TORQUE-like tree (``mom_priv`` 0751 with the hooks, ``mom_priv/jobs``, ``spool``,
``aux``). :meth:`Mom.submit` writes the script and spool files, then spawns the job child - a fresh
interpreter running :func:`cbatch.emulator.momproc.child` in a new session (pid = pgid = sid) that runs the prologue as root and
execs the job starter as the user. A monitor thread per :class:`Job` plays the mom: qdel, kill_delay,
walltime polls, SIGKILL of the session's leftovers, epilogue, clean-up. The child is a separate interpreter
(not ``os.fork``) because the mom is threaded (pytest, monitor threads) and forking a threaded Python is
unsafe.
"""

from __future__ import annotations

import json
import os
import grp
import pwd
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from cbatch.admin import install
from cbatch.clients import cclient
from cbatch.emulator import momproc
from cbatch.host import waitfd
from cbatch.core.errors import CbatchError, JobError

REQUEUED = None           # Result.exit_status of a job the prologue kept requeueing


@dataclass
class Result:
    """What the mom recorded for a finished job. ``stdout``/``stderr`` are the spool files' bytes (empty
    when the job was aborted by the prologue: then no .o/.e reaches the user, as with TORQUE)."""

    job_id: str
    exit_status: Optional[int]
    stdout: bytes
    stderr: bytes
    epilogue_ran: bool
    prologue_status: Optional[int] = None
    epilogue_status: Optional[int] = None
    requeues: int = 0
    aborted: bool = False
    walltime_killed: bool = False
    session_id: Optional[int] = None
    ended_at: Optional[float] = None      # time.monotonic() when the mom reaped the starter
    kill_delay_killed: bool = False       # the starter outlived qdel's kill_delay: the mom SIGKILLed the session
    cgroup_leftovers: List[str] = field(default_factory=list)
    spool_stdout: bytes = b""
    spool_stderr: bytes = b""
    shell_status: Optional[int] = None    # interactive: the starter's own status (the job's is the reader's 0)


class Job:
    """A submitted job; the monitor thread is the mom's side of it."""

    def __init__(self, mom: "Mom", job_id: str, plan: dict, kill_delay: float, walltime_poll: Optional[float],
                 cgroup_dirs: List[str]):
        self.mom, self.job_id, self.plan = mom, job_id, plan
        self.kill_delay, self.walltime_poll, self.cgroup_dirs = kill_delay, walltime_poll, cgroup_dirs
        self.script_path = plan["script"]
        self.stdout_path, self.stderr_path = plan["stdout"], plan["stderr"]
        self.tmpdir = plan["tmpdir"]        # only the one the mom made: never a path the job named (-v TMPDIR)
        self.session_id: Optional[int] = None
        self.started = threading.Event()      # set once the prologue passed and the starter was exec'ed
        self._spawned = threading.Event()     # the job child exists: session_id is known, qdel can act
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._proc: Optional[subprocess.Popen] = None
        self._kill_at: Optional[float] = None
        self._result: Optional[Result] = None
        self.pty_master: Optional[int] = None     # interactive: the terminal side (qsub's) of the job's pty
        self._pty_slave: Optional[int] = None
        if plan.get("interactive"):
            self.pty_master, self._pty_slave = os.openpty()
        self._tasks: List[subprocess.Popen] = []
        self._thread = threading.Thread(target=self._run, name=f"mom-{job_id}", daemon=True)
        self._thread.start()
        self._spawned.wait(30)

    # ---- the user's (and test's) side -------------------------------------------------------------
    def qdel(self) -> None:
        """qdel: SIGTERM every process of the job's session, each by pid; SIGKILL after kill_delay."""
        with self._lock:
            if self.session_id is None or self._done.is_set():
                return
            momproc.signal_session(self.session_id, signal.SIGTERM)
            if self._kill_at is None:
                self._kill_at = time.monotonic() + self.kill_delay

    def kill_starter(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the starter alone (as a crash or an admin's kill would)."""
        if self.session_id is not None:
            try:
                os.kill(self.session_id, sig)
            except ProcessLookupError:
                pass

    def peek(self) -> tuple:
        """The spool files' current bytes (stdout, stderr), while the job runs."""
        return momproc.read(self.stdout_path), momproc.read(self.stderr_path)

    def wait_output(self, needle: bytes, stream: str = "stdout", timeout: float = 30.0) -> bool:
        """Wait until ``needle`` appears in the live spool file (or the job's final output); False on timeout."""
        path = self.stdout_path if stream == "stdout" else self.stderr_path
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in momproc.read(path):
                return True
            if self._done.is_set():
                return needle in (self._result.spool_stdout if stream == "stdout" else self._result.spool_stderr)
            time.sleep(0.05)
        return False

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float = 120.0) -> Result:
        """The job's Result. On timeout the job is killed (qdel, then SIGKILL) and TimeoutError raised."""
        if not self._done.wait(timeout):
            self.qdel()
            if self.session_id is not None:
                momproc.signal_session(self.session_id, signal.SIGKILL)
            self._done.wait(30)
            raise TimeoutError(f"job {self.job_id} still running after {timeout}s")
        return self._result

    # ---- the mom's side ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._result = self._lifecycle()
        except BaseException as exc:  # a harness bug must not hang the caller in wait()
            self._result = Result(self.job_id, None, b"", f"mom emulator failed: {exc!r}\n".encode(), False)
            raise
        finally:
            self._spawned.set()
            self._done.set()

    def _lifecycle(self) -> Result:
        plan, requeues = self.plan, 0
        while True:
            status, prologue = self._start_child()
            if prologue in (0, None) or prologue == 1 or requeues >= self.mom.max_requeues:
                break
            requeues += 1       # TORQUE reruns at once, forever; we stop after max_requeues
        if prologue not in (0, 1, None):
            self._cleanup(None)
            return Result(self.job_id, REQUEUED, b"", b"", False, prologue_status=prologue, requeues=requeues,
                          session_id=self.session_id)
        aborted = prologue == 1
        walltime_killed = delay_killed = False
        if aborted:
            exit_status = -2
        else:
            exit_status, walltime_killed, delay_killed = self._supervise()
        ended_at = time.monotonic()
        ep_status = None
        if self.mom.epilogue:
            used = momproc.resources_used(time.monotonic() - self._t0)
            args = [self.job_id, plan["user"], plan["group"], plan["name"], str(self.session_id),
                    plan["resource_list"], used, plan["queue"], plan["account"], str(exit_status), plan["script"]]
            ep_status = momproc.run_hook(self.mom.epilogue, args, plan, umask=0o022)
        out, err = momproc.read(self.stdout_path), momproc.read(self.stderr_path)
        shell = momproc.read(plan["plan_file"] + ".shell").decode() or None
        leftovers = self._cleanup(exit_status)
        return Result(self.job_id, exit_status, b"" if aborted else out, b"" if aborted else err,
                      self.mom.epilogue is not None, prologue_status=prologue, epilogue_status=ep_status,
                      requeues=requeues, aborted=aborted, walltime_killed=walltime_killed,
                      session_id=self.session_id, ended_at=ended_at, kill_delay_killed=delay_killed,
                      cgroup_leftovers=leftovers,
                      spool_stdout=out, spool_stderr=err, shell_status=None if shell is None else int(shell))

    def spawn_task(self, argv: Sequence[str], stdout: Optional[int] = None,
                   stderr: Optional[int] = None) -> subprocess.Popen:
        """A TM task of this running job, started as pbs_mom's start_process does (``pbsdsh -u argv``):
        see :func:`cbatch.emulator.momtasks.spawn_task`. Killed with the job's end like pbs_mom's tasks."""
        from cbatch.emulator import momtasks
        if not self.started.is_set() or self._done.is_set():
            raise CbatchError("mom", "job is not running", self.job_id)
        with self._lock:
            proc = momtasks.spawn_task(self.mom.python, self.plan, argv, len(self._tasks) + 2, stdout, stderr)
            self._tasks.append(proc)
        return proc

    def _start_child(self):
        """Spawn the job child; return (Popen, prologue status or None when there is no prologue)."""
        status_r, status_w = os.pipe()
        self._t0 = time.monotonic()
        pty = () if self._pty_slave is None else (self._pty_slave,)
        proc = subprocess.Popen([self.mom.python, "-I", "-c", "from cbatch.emulator import momproc; momproc.child()",
                                 self.plan["plan_file"], str(status_w), *map(str, pty)],
                                stdin=subprocess.DEVNULL, pass_fds=(status_w, *pty), start_new_session=True,
                                close_fds=True)
        os.close(status_w)
        with self._lock:
            self._proc, self.session_id = proc, proc.pid
        self._spawned.set()
        with os.fdopen(status_r, "rb") as fh:
            lines = [json.loads(x) for x in fh.read().splitlines() if x.strip()]
        report = {k: v for item in lines for k, v in item.items()}
        if "prologue" in report and report["prologue"] != 0:
            proc.wait()
            momproc.kill_session(proc.pid)
            return proc, report["prologue"]
        if "exec_error" in report:
            # pbs_mom would log it and record a failed start; we surface it as the job's status.
            print(f"mom: starter exec failed: {report['exec_error']}", file=sys.stderr)
        self.started.set()
        return proc, report.get("prologue")

    def _supervise(self):
        """Wait for the starter; apply qdel's kill_delay and walltime polls; return (status, walltime_killed,
        kill_delay_killed)."""
        proc, walltime = self._proc, self.plan["walltime"]
        next_poll = time.monotonic() + self.walltime_poll if self.walltime_poll else None
        over = killed = delay_killed = False
        # Woken by the starter's exit itself, as pbs_mom is by SIGCHLD (Popen.wait(timeout) polls, sleeping up
        # to 50 ms: ~7 ms late per job on average, in every mode). Not reaped yet, so the pid is still ours.
        pidfd = os.pidfd_open(proc.pid)
        try:
            while not waitfd.readable(pidfd, 0.05):
                now = time.monotonic()
                with self._lock:
                    if self._kill_at is not None and now >= self._kill_at:
                        momproc.signal_session(proc.pid, signal.SIGKILL)
                        self._kill_at = float("inf")
                        delay_killed = True
                if next_poll is not None and walltime is not None and now >= next_poll:
                    next_poll = now + self.walltime_poll
                    used = int(now - self._t0)
                    if over:
                        momproc.signal_session(proc.pid, signal.SIGKILL)
                    elif used > walltime:
                        over = killed = True
                        momproc.append(self.stderr_path,
                                       f"=>> PBS: job killed: walltime {used} exceeded limit {walltime}\n".encode())
                        momproc.signal_session(proc.pid, signal.SIGTERM)
        finally:
            os.close(pidfd)
        code = proc.wait()
        # The starter is gone: everything left in its session gets SIGKILL, with no grace; so do the tasks.
        momproc.kill_session(proc.pid)
        from cbatch.emulator import momtasks
        with self._lock:
            tasks = list(self._tasks)
        momproc.kill_tasks(tasks)
        return (256 - code if code < 0 else code), killed, delay_killed

    def _cleanup(self, exit_status) -> List[str]:
        leftovers = []
        for path in self.cgroup_dirs:
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                leftovers.append(f"{path}: {exc.strerror}")
        if self._pty_slave is not None:
            os.close(self._pty_slave)
            self._pty_slave = None
        for path in (self.stdout_path, self.stderr_path, self.script_path, self.plan["nodefile"],
                     self.plan["plan_file"], self.plan["plan_file"] + ".shell"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if self.tmpdir and self.mom.keep_files is False:
            momproc.remove_as_user(self.tmpdir, self.plan["uid"], self.plan["gid"], self.mom.python)
        return leftovers


class Mom:
    """A pbs_mom with its own TORQUE home under ``root``.

    ``socket_path`` installs cbatch's real shims (prologue, epilogue, job_starter) via :mod:`cbatch.admin.install`;
    ``prologue``/``epilogue``/``starter`` given as text replace them (unit tests of the emulator itself).
    ``run_epilogue=False`` installs but never runs the epilogue (``epilogue_path`` still names it).
    ``run_privileged=True`` is ``$job_starter_run_privileged true``: the starter starts as root (uid, gid and
    groups 0) with the user's environment, cwd and umask, and must drop privileges itself.
    ``hooks`` (``c`` | ``python``, default ``$CBATCH_TEST_HOOKS``, else C when built) picks the client.
    """

    def __init__(self, root: str, socket_path: Optional[str] = None, *, prologue: Optional[str] = None,
                 epilogue: Optional[str] = None, starter: Optional[str] = None, host: Optional[str] = None,
                 first_id: Optional[int] = None, tmpdir_base: str = "/tmp", cgroup_root: str = "/sys/fs/cgroup",
                 max_requeues: int = 3, prologalarm: float = 300.0, python: Optional[str] = None,
                 run_epilogue: bool = True, run_privileged: bool = False, hooks: Optional[str] = None):
        self.root = os.path.abspath(root)
        self.host = host or socket.gethostname().split(".")[0]
        self.mom_priv = os.path.join(self.root, "mom_priv")
        self.jobs_dir = os.path.join(self.mom_priv, "jobs")
        self.spool = os.path.join(self.root, "spool")
        self.aux = os.path.join(self.root, "aux")
        self.libexec = os.path.join(self.root, "libexec")
        for path, mode in ((self.root, 0o755), (self.mom_priv, 0o751), (self.jobs_dir, 0o751),
                           (self.spool, 0o1777), (self.aux, 0o755), (self.libexec, 0o755)):
            os.makedirs(path, exist_ok=True)
            os.chmod(path, mode)
        self.python = python or install.interpreter()
        self.tmpdir_base, self.cgroup_root = tmpdir_base, cgroup_root
        self.max_requeues, self.prologalarm, self.keep_files = max_requeues, prologalarm, False
        self.socket_path = socket_path
        # The shims run the C client when one is built (CBATCH_TEST_HOOKS=python: the Python reference).
        self.client = cclient.choose(hooks, None, None, tests=True) or None
        paths = install.install(self.mom_priv, self.libexec, socket_path, self.python, self.client) \
            if socket_path else {}
        for kind, text, where, mode in (("prologue", prologue, self.mom_priv, 0o500),
                                         ("epilogue", epilogue, self.mom_priv, 0o500),
                                         ("job_starter", starter, self.libexec, 0o755)):
            if text is not None:
                paths[kind] = os.path.join(where, kind)
                install.write_file(paths[kind], text, mode)
        self.prologue, self.epilogue = paths.get("prologue"), paths.get("epilogue")
        self.epilogue_path = self.epilogue
        self.run_privileged = run_privileged    # mom_priv/config: $job_starter_run_privileged true
        if not run_epilogue:
            self.epilogue = None    # tests that must see what is left when the starter exits
        self.starter = paths.get("job_starter")
        self._first_id = first_id

    def submit(self, script: bytes, user: str, queue: str = "batch",
               resources: str = "nodes=1:ppn=1,walltime=00:10:00", variables: Optional[Dict[str, str]] = None,
               name: Optional[str] = None, args: Sequence[str] = (), cgroups=False, kill_delay: float = 2.0,
               tmpdir: bool = False, workdir: Optional[str] = None, initdir: Optional[str] = None,
               walltime_poll: Optional[float] = None, account: str = "", shell: Optional[str] = None,
               array_index: Optional[int] = None, interactive: bool = False,
               interactive_cmd: Optional[str] = None) -> Job:
        """Queue and immediately start a job (the scheduler is instant). See the module docstring.

        ``workdir`` is PBS_O_WORKDIR (default: the user's home), ``initdir`` is ``qsub -d``, ``array_index``
        makes it sub-job ``i`` of an array (``qsub -t``). ``interactive`` is ``qsub -I`` (``-x`` is
        ``interactive_cmd``): the job gets a pty whose master is :attr:`Job.pty_master`. ``cgroups`` True
        (or a dict with ``cpus``/``mems``/``mem``) emulates TORQUE built with --enable-cgroups.
        """
        if self.starter is None:
            raise CbatchError("mom", "no job starter installed", self.root)
        pw = pwd.getpwnam(user)
        group = grp.getgrgid(pw.pw_gid).gr_name
        number = momproc.next_job_number(self._first_id)
        name = name or "STDIN"
        job_id = f"{number}.{self.host}"
        if array_index is not None:      # qsub -t: sub-job "N[i].host", named "<name>-<i>", PBS_ARRAYID=i
            job_id, name = f"{number}[{array_index}].{self.host}", f"{name}-{array_index}"
            variables = {**(variables or {}), "PBS_ARRAYID": str(array_index)}
        res = momproc.resources(resources)
        resource_list = resources + (f",neednodes={res['nodes_value']}" if "nodes=" in resources else "")
        script_path = os.path.join(self.jobs_dir, job_id + ".SC")
        momproc.write_owned(script_path, script, pw.pw_uid, pw.pw_gid, 0o700)
        stdout, stderr = (os.path.join(self.spool, job_id + ext) for ext in (".OU", ".ER"))
        for path in (stdout, stderr):
            momproc.write_owned(path, b"", pw.pw_uid, pw.pw_gid, 0o600)
        aux = self.aux + "//" + job_id        # sic: TORQUE's PBS_NODEFILE has the double slash
        momproc.write_owned(aux, (self.host + "\n").encode() * res["np"], 0, 0, 0o644)
        workdir = workdir or pw.pw_dir
        cwd = initdir or pw.pw_dir
        env = momproc.job_env(pw, job_id=job_id, name=name, queue=queue, host=self.host, aux=self.aux,
                              res=res, workdir=workdir, variables=variables or {}, initdir=initdir, cwd=cwd)
        if interactive:
            env["PBS_ENVIRONMENT"] = "PBS_INTERACTIVE"      # setup_batch_job alone adds ENVIRONMENT=BATCH
            env.pop("ENVIRONMENT", None)
        own_tmpdir = None
        if tmpdir:      # like pbs_mom's $tmpdir: the mom's own directory replaces any -v TMPDIR
            try:
                own_tmpdir = env["TMPDIR"] = momproc.make_tmpdir(self.tmpdir_base, job_id, pw.pw_uid, pw.pw_gid)
            except FileExistsError as exc:
                raise JobError("TMPDIR", "already exists; the mom makes a fresh one per job",
                               os.path.join(self.tmpdir_base, job_id), "remove the leftover") from exc
        cgroup_dirs = momproc.make_cgroups(self.cgroup_root, job_id, res, cgroups) if cgroups else []
        hook_env = momproc.hook_env(env, self.host, res)
        plan = {"job_id": job_id, "user": user, "uid": pw.pw_uid, "gid": pw.pw_gid, "group": group, "name": name,
                "queue": queue, "account": account, "resource_list": resource_list, "script": script_path,
                "stdout": stdout, "stderr": stderr, "nodefile": aux, "mom_priv": self.mom_priv,
                "prologue": self.prologue, "prologalarm": self.prologalarm, "starter": self.starter,
                "shell": shell or pw.pw_shell or "/bin/sh", "cwd": cwd, "env": env, "hook_env": hook_env,
                "stdin_line": " ".join([script_path, *args]) + "\n", "mem": res["mem"],
                "walltime": res["walltime"], "privileged": self.run_privileged, "tasks": [os.path.join(d, "tasks") for d in cgroup_dirs],
                "plan_file": os.path.join(self.jobs_dir, job_id + ".plan"), "tmpdir": own_tmpdir,
                "interactive": interactive, "interactive_cmd": interactive_cmd}
        momproc.write_owned(plan["plan_file"], json.dumps(plan).encode(), 0, 0, 0o600)
        return Job(self, job_id, plan, kill_delay, walltime_poll, cgroup_dirs)
