"""The pbs_mom emulator's process-level parts (used by :mod:`cbatch.emulator.local`): the job child, environments,
sessions, hooks and TORQUE-style cgroups. Everything here reproduces observed TORQUE 6.1 behaviour
(``torque-mom.md``); when in doubt, it is as unkind as the real mom. Stdlib only.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import shutil
import stat
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

from cbatch.core.resources import parse_resource_list

TORQUE_CGROUPS = ("cpuacct", "cpuset", "memory", "devices")
# Hook results the real mom treats as "requeue": a hook it refuses to run, or one it had to kill.
HOOK_PERMISSION_ERROR = -1001
HOOK_TIMEOUT = -1002
LEAKED_FDS = (9, 14)     # real TORQUE 6.1 (tests/torque/test_mom_facts.py): fd 9 is the stdin pipe again, 14 a pipe


# ---- job numbers and resources ------------------------------------------------------------------------
_numbers = {"next": None}
_numbers_lock = threading.Lock()


def next_job_number(first: Optional[int] = None) -> int:
    """Job numbers unique across every Mom of this process (they may share one daemon) and across
    concurrent test runs sharing one engine (container names derive from job ids): pid-based ranges."""
    with _numbers_lock:
        if first is not None and (_numbers["next"] is None or first > _numbers["next"]):
            _numbers["next"] = first
        if _numbers["next"] is None:
            _numbers["next"] = (os.getpid() % 50000) * 1000 + int(time.time()) % 100
        number = _numbers["next"]
        _numbers["next"] += 1
        return number


def resources(text: str) -> dict:
    """The numbers the mom derives from the resource list (nodes, ppn, np, mem, walltime)."""
    res = parse_resource_list(text)
    ppn = res.ppn or 1
    nodes_value = dict(item.split("=", 1) for item in text.split(",") if "=" in item).get("nodes", "1")
    return {"nodes": res.node_count, "ppn": ppn, "np": res.node_count * ppn, "mem": res.mem,
            "walltime": res.walltime, "nodes_value": nodes_value}


# ---- files ------------------------------------------------------------------------------------------
def read(path: str) -> bytes:
    """A file's bytes, or b"" when it is gone."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return b""


def append(path: str, data: bytes) -> None:
    """Append like the mom does to a spool file (O_APPEND: never clobber what the job wrote)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def write_owned(path: str, data: bytes, uid: int, gid: int, mode: int) -> None:
    """Create ``path`` afresh with owner and mode set before any data.

    Whatever stood at the name (a user may plant a file, symlink or hard link in the world-writable spool)
    is unlinked first - unlink never follows - and the new file is created O_EXCL, so root never truncates,
    chowns or writes an object somebody else put there.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)


def remove_tree(path: str) -> None:
    """Remove a root-made directory (the emulator's root): rmtree's fd-based walk never follows symlinks."""
    assert shutil.rmtree.avoids_symlink_attacks
    shutil.rmtree(path, ignore_errors=True)


def make_tmpdir(base: str, name: str, uid: int, gid: int) -> str:
    """pbs_mom's ``$tmpdir``: create ``<base>/<name>`` (mode 0700, owned by the job user) and return it.

    Created by root with mkdirat in an opened ``base`` and chowned through a descriptor of the new directory
    opened without following links: a name a user planted beforehand (directory, symlink) makes mkdir fail
    and the job does not start, instead of root chowning whatever the name points to.
    """
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"bad TMPDIR name: {name!r}")
    dfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.mkdir(name, 0o700, dir_fd=dfd)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
    finally:
        os.close(dfd)
    return os.path.join(base, name)


def remove_as_user(path: str, uid: int, gid: int, python: str) -> None:
    """Remove a job's TMPDIR as its owner (the directory is theirs and so is all it holds): root never walks
    a tree the job could change under it. Idempotent; errors are the user's files' business."""
    code = "import shutil,sys; shutil.rmtree(sys.argv[1], ignore_errors=True)"
    subprocess.run([python, "-I", "-c", code, path], user=uid, group=gid, extra_groups=[], cwd="/",
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={},
                   check=False, timeout=600)


# ---- sessions ---------------------------------------------------------------------------------------
def session_pids(sid: int) -> List[int]:
    """Live (non-zombie) processes whose session id is ``sid`` (/proc/<pid>/stat field 6)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2:].split()
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] != b"Z":
            pids.append(int(name))
    return pids


def signal_session(sid: int, sig: int) -> List[int]:
    """Signal every process of the session, each by pid, as pbs_mom does; return the pids signalled."""
    pids = session_pids(sid)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    return pids


def kill_session(sid: int, patience: float = 3.0) -> None:
    """SIGKILL everything left in the session (what the mom does when the starter exits)."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline and signal_session(sid, 9):
        time.sleep(0.02)


def kill_tasks(procs) -> None:
    """When the job ends pbs_mom kills every task's session (kill_job over the job's tasks)."""
    for proc in procs:
        if proc.poll() is None:
            kill_session(proc.pid)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def resources_used(seconds: float) -> str:
    """The epilogue's resources_used argument (the emulator measures only walltime)."""
    s = int(seconds)
    return f"cput=00:00:00,vmem=0kb,walltime={s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d},mem=0kb,energy_used=0"


# ---- environments -----------------------------------------------------------------------------------
def job_env(pw, *, job_id: str, name: str, queue: str, host: str, aux: str, res: dict, workdir: str,
            variables: Dict[str, str], initdir: Optional[str], cwd: str) -> Dict[str, str]:
    """The job's environment exactly as TORQUE 6.1 builds it (see torque-mom.md), plus ``-v`` variables."""
    env = dict(variables)
    env.update({
        "ENVIRONMENT": "BATCH", "HOME": pw.pw_dir, "HOSTNAME": "", "LANG": "C.UTF-8", "LOGNAME": pw.pw_name,
        "PATH": variables.get("PATH", "/bin:/usr/bin"), "PBS_ENVIRONMENT": "PBS_BATCH",
        "PBS_GPUFILE": f"{aux}//{job_id}gpu", "PBS_JOBCOOKIE": secrets.token_hex(16).upper(),
        "PBS_JOBID": job_id, "PBS_JOBNAME": name, "PBS_MICFILE": f"{aux}//{job_id}mic", "PBS_MOMPORT": "15003",
        "PBS_NODEFILE": f"{aux}//{job_id}", "PBS_NODENUM": "0", "PBS_NP": str(res["np"]),
        "PBS_NUM_NODES": str(res["nodes"]), "PBS_NUM_PPN": str(res["ppn"]), "PBS_O_HOME": pw.pw_dir,
        "PBS_O_HOST": host, "PBS_O_LANG": "C.UTF-8", "PBS_O_LOGNAME": pw.pw_name,
        "PBS_O_MAIL": f"/var/mail/{pw.pw_name}", "PBS_O_PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PBS_O_QUEUE": queue, "PBS_O_SERVER": host, "PBS_O_SHELL": pw.pw_shell or "/bin/sh",
        "PBS_O_WORKDIR": workdir, "PBS_QUEUE": queue, "PBS_TASKNUM": "1", "PBS_VERSION": "TORQUE-6.1-dev",
        "PBS_VNODENUM": "0", "PWD": cwd, "SHELL": pw.pw_shell or "/bin/sh", "USER": pw.pw_name})
    if res.get("walltime") is not None:
        env["PBS_WALLTIME"] = str(res["walltime"])
    if initdir:
        env["PBS_O_INITDIR"] = initdir
    return env


def hook_env(env: Dict[str, str], host: str, res: dict) -> Dict[str, str]:
    """The prologue's and epilogue's whole environment: these ten variables (+ TMPDIR with $tmpdir) only."""
    return {"LANG": "C.UTF-8", "PATH": "/bin:/usr/bin", "PBS_MSHOST": host, "PBS_NODEFILE": env["PBS_NODEFILE"],
            "PBS_NODENUM": "0", "PBS_NP": env["PBS_NP"], "PBS_NUM_NODES": env["PBS_NUM_NODES"],
            "PBS_NUM_PPN": env["PBS_NUM_PPN"], "PBS_O_WORKDIR": env["PBS_O_WORKDIR"],
            "PBS_RESOURCE_NODES": res["nodes_value"], **({"TMPDIR": env["TMPDIR"]} if "TMPDIR" in env else {})}


# ---- hooks ------------------------------------------------------------------------------------------
def hook_acceptable(path: str) -> bool:
    """pbs_mom's rule: root-owned regular file, u+rx, not group- or world-writable."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (stat.S_ISREG(st.st_mode) and st.st_uid == 0 and st.st_mode & 0o500 == 0o500
            and not st.st_mode & 0o022)


def run_hook(path: str, args: List[str], plan: dict, umask: int, new_session: bool = True) -> int:
    """Run a root prologue/epilogue as pbs_mom does; return its exit status (or HOOK_* codes).

    uid/gid 0, supplementary groups the job owner's (all of them, not root's), its own session, cwd mom_priv, stdin /dev/null, stdout and
    stderr appended to the job's spool files, only the hook environment.
    """
    if not hook_acceptable(path):
        # pbs_mom logs "permission Error" in its own log, not in the job's files, and requeues the job.
        return HOOK_PERMISSION_ERROR
    out = os.open(plan["stdout"], os.O_WRONLY | os.O_APPEND)
    err = os.open(plan["stderr"], os.O_WRONLY | os.O_APPEND)
    try:
        proc = subprocess.Popen([path, *args], env=plan["hook_env"], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=err, cwd=plan["mom_priv"], umask=umask,
                                extra_groups=os.getgrouplist(plan["user"], plan["gid"]),
                                start_new_session=new_session, close_fds=True)
    finally:
        os.close(out)
        os.close(err)
    try:
        return proc.wait(timeout=plan["prologalarm"])
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return HOOK_TIMEOUT


# ---- cgroups (TORQUE --enable-cgroups) --------------------------------------------------------------
def _cpu_list(text: str) -> List[int]:
    cpus = []
    for part in text.strip().split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cpus.extend(range(int(lo), int(hi) + 1))
        elif part:
            cpus.append(int(part))
    return cpus


def _put(path: str, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def make_cgroups(root: str, job_id: str, res: dict, opt) -> List[str]:
    """Create ``<root>/{cpuacct,cpuset,memory,devices}/torque/<jobid>`` with the job's cpus and memory.

    ``opt`` may be a dict with ``cpus`` (cpuset list), ``mems`` and ``mem`` (bytes) overriding what the
    resource list gives. Returns the job directories (the starter is attached to each before exec).
    """
    opt = opt if isinstance(opt, dict) else {}
    dirs = []
    for ctl in TORQUE_CGROUPS:
        base = os.path.join(root, ctl)
        if not os.path.isdir(base):
            continue
        parent = os.path.join(base, "torque")
        os.makedirs(parent, exist_ok=True)
        if ctl == "cpuset":
            # A new v1 cpuset starts empty; a task cannot join it until cpus and mems are set.
            for name in ("cpuset.cpus", "cpuset.mems"):
                if not read(os.path.join(parent, name)).strip():
                    _put(os.path.join(parent, name), read(os.path.join(base, name)).decode().strip())
        job = os.path.join(parent, job_id)
        os.makedirs(job, exist_ok=True)
        if ctl == "cpuset":
            available = _cpu_list(read(os.path.join(parent, "cpuset.cpus")).decode())
            cpus = opt.get("cpus") or ",".join(str(c) for c in available[:max(1, res["ppn"])])
            _put(os.path.join(job, "cpuset.cpus"), str(cpus))
            _put(os.path.join(job, "cpuset.mems"),
                 str(opt.get("mems") or read(os.path.join(parent, "cpuset.mems")).decode().strip()))
        mem = opt.get("mem", res.get("mem"))
        if ctl == "memory" and mem:
            _put(os.path.join(job, "memory.limit_in_bytes"), str(int(mem)))
        dirs.append(job)
    return dirs


# ---- the job child ----------------------------------------------------------------------------------
def child() -> None:
    """Main of the job child (argv: plan file, status fd). A new session leader, still root.

    Runs the prologue; reports its status on the status pipe; then becomes the job starter as the user.
    The status pipe is close-on-exec, so EOF without an ``exec_error`` tells the mom the exec happened.
    """
    import fcntl
    plan_file, inherited = sys.argv[1], int(sys.argv[2])
    # Move the status pipe out of the way of the descriptors we leak on purpose (9..255), close-on-exec:
    # EOF on it tells the mom the starter was exec'ed.
    status_fd = fcntl.fcntl(inherited, fcntl.F_DUPFD_CLOEXEC, 256)
    os.close(inherited)
    with open(plan_file) as fh:
        plan = json.load(fh)

    def report(**item) -> None:
        os.write(status_fd, (json.dumps(item) + "\n").encode())

    pts = None
    if plan.get("interactive"):
        # qsub -I: the pty slave is this session leader's controlling terminal before the prologue runs.
        from cbatch.emulator import momtasks
        pts = fcntl.fcntl(int(sys.argv[3]), fcntl.F_DUPFD_CLOEXEC, 256)
        os.close(int(sys.argv[3]))
        momtasks.controlling_tty(pts)

    if plan["prologue"]:
        args = [plan["job_id"], plan["user"], plan["group"], plan["name"], plan["resource_list"], plan["queue"],
                plan["account"], plan["script"]]
        # The prologue's parent is this process, which is about to become the starter (the real prologue is
        # nevertheless a session leader of its own: pid = pgid = sid).
        status = run_hook(plan["prologue"], args, plan, umask=0o077)
        report(prologue=status)
        if status != 0:
            os._exit(0)
    if pts is not None:
        momtasks.interactive(plan, pts, status_fd, report)
    try:
        for tasks in plan["tasks"]:
            _put(tasks, str(os.getpid()))
        r, w = os.pipe()
        os.write(w, plan["stdin_line"].encode())
        os.close(w)
        out = os.open(plan["stdout"], os.O_WRONLY | os.O_APPEND)
        err = os.open(plan["stderr"], os.O_WRONLY | os.O_APPEND)
        os.dup2(r, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        for fd in (r, out, err):
            os.close(fd)
        # The real mom leaks descriptors 9 and 14 into the starter: leave some open here too,
        # so nothing in cbatch can assume a job starts with only 0, 1 and 2.
        null = os.open("/dev/null", os.O_RDONLY)
        for fd in LEAKED_FDS:
            if fd != null:
                os.dup2(null, fd, inheritable=True)
        if null not in LEAKED_FDS:
            os.close(null)
        if plan["mem"]:
            for lim in (resource.RLIMIT_DATA, resource.RLIMIT_RSS):
                resource.setrlimit(lim, (plan["mem"], plan["mem"]))
        resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        if plan.get("privileged"):
            os.setgroups([0])       # $job_starter_run_privileged: root, with the user's environment
        else:
            os.initgroups(plan["user"], plan["gid"])
            os.setresgid(plan["gid"], plan["gid"], plan["gid"])
            os.setresuid(plan["uid"], plan["uid"], plan["uid"])
        os.umask(0o077)
        os.chdir(plan["cwd"])
        os.execve(plan["starter"], [plan["starter"], plan["shell"]], plan["env"])
    except OSError as exc:
        report(exec_error=f"{type(exc).__name__}: {exc}")
        os._exit(254)
