"""``cbatch install-hooks --pbs``: cbatch's OpenPBS / PBS Pro hooks, imported with ``qmgr``.

Two site hooks (PBS runs them as root; the mom gets them from the server):

- ``cbatch_exec`` (events ``execjob_launch,execjob_end``, on every mom). At launch it FIRST rewrites the
  program to cbatch's job starter - the job shell (``argv == []``: batch and ``qsub -I``) to
  ``[starter, shell]`` (the starter then reads the script line from stdin as under TORQUE), the job's own
  ``qsub -- prog`` (``PBS_TASKNUM`` 1) to ``[starter, --pbs-exec, prog, args...]``, a TM task (pbsdsh,
  pbs_tmrsh) to ``[starter, cmd, args...]`` - and only then registers the job (job shell and ``qsub --``)
  through :mod:`cbatch.clients.pbs`. A hook that fails after the rewrite leaves a job the starter refuses
  with one line in its .e file, never a job that runs outside its queue's container. At the end it
  unregisters the job.
- ``cbatch_queuejob`` (event ``queuejob``, on the server): ``#CBATCH`` and image checks at ``qsub`` time.

The hook bodies run in PBS's embedded interpreter; they call cbatch's own interpreter by absolute path
with ``-I`` and a fixed environment (``PATH`` only), the daemon socket and the starter baked in, like the
TORQUE shims. Installing is idempotent: ``create hook`` only when ``list hook`` does not know it, then
``import`` and ``set`` every time (the same text twice changes nothing). Stdlib only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Callable, List, Sequence

from cbatch.core.errors import CbatchError

EXEC_HOOK = "cbatch_exec"
QUEUE_HOOK = "cbatch_queuejob"
HOOK_ALARM = 60          # seconds; registration waits at most REGISTER_TIMEOUT (30 s) for the daemon
HOOK_ORDER = 200         # after pbs_cgroups (100): the launched program is in the job's cgroup already
QMGR_TIMEOUT = 60.0

_HEAD = '''# written by cbatch install-hooks (PBS {kind} hook, `cbatch install-hooks --pbs`); do not edit, re-run it.
import json
import subprocess
import pbs

PYTHON = {python!r}
SOCKET = {socket!r}
STARTER = {starter!r}
CONFIG = {config!r}
_ENV = {{"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}}


def _cbatch(action, arg, data, timeout):
    """Run cbatch.clients.pbs ACTION with DATA as JSON; (exit status, stdout, stderr)."""
    p = subprocess.run([PYTHON, "-I", "-m", "cbatch.clients.pbs", action, arg],
                       input=json.dumps(data).encode(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=timeout, env=_ENV, cwd="/")
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def _log(text):
    for line in text.splitlines():
        if line.strip():
            pbs.logmsg(pbs.LOG_ERROR, "cbatch: " + line[:500])


def _str(value):
    return "" if value is None else str(value)
'''

_EXEC = '''

def _job_data(e, j):
    home = pbs.pbs_conf.get("PBS_HOME", "/var/spool/pbs")
    return {"job_id": _str(j.id), "euser": _str(j.euser), "egroup": _str(j.egroup), "name": _str(j.Job_Name),
            "queue": _str(j.queue), "resource_list": _str(j.Resource_List), "account": _str(j.Account_Name),
            "script": home + "/mom_priv/jobs/" + _str(j.id) + ".SC", "session_id": j.session_id}


e = pbs.event()
j = e.job
try:
    if e.type == pbs.EXECJOB_LAUNCH:
        prog = _str(e.progname)
        argv = [_str(a) for a in (e.argv or [])]
        task = _str(e.env["PBS_TASKNUM"]) if "PBS_TASKNUM" in e.env.keys() else "1"
        if not argv:
            own, new = True, [STARTER, prog]                     # the job shell: batch or qsub -I
        elif task.lstrip("0") == "1":
            own, new = True, [STARTER, "--pbs-exec", prog] + argv[1:]   # qsub -- prog args
        else:
            own, new = False, [STARTER] + argv                   # a TM task (pbsdsh, pbs_tmrsh)
        # Rewrite first: whatever fails below, the program is the starter, which refuses unregistered jobs.
        e.progname = STARTER
        e.argv = new
        pbs.logmsg(pbs.LOG_DEBUG, "cbatch: launch %s %r -> %r" % (prog, argv, new))
        if own:
            rc, out, err = _cbatch("launch", SOCKET, _job_data(e, j), 50)
            _log(err)
    elif e.type == pbs.EXECJOB_END:
        rc, out, err = _cbatch("end", SOCKET, {"job_id": _str(j.id)}, 50)
        _log(err)
except SystemExit:
    raise
except BaseException as exc:    # noqa - never fail the hook: fail_action would offline the node
    pbs.logmsg(pbs.LOG_ERROR, "cbatch: %s hook: %s: %s" % (e.type, type(exc).__name__, exc))
e.accept()
'''

_QUEUE = '''

e = pbs.event()
j = e.job
try:
    variables = {}
    vl = j.Variable_List
    if vl is not None:
        for k in vl.keys():
            variables[_str(k)] = _str(vl[k])
    res = j.Resource_List
    try:
        cimage = _str(res["container_image"]) if res is not None else ""
    except Exception:    # noqa - the site has not defined the resource
        cimage = ""
    script = ""
    try:
        script = _str(e.job.script) if hasattr(e.job, "script") else ""
    except Exception:    # noqa
        script = ""
    queue = _str(j.queue) if j.queue is not None else ""
    try:
        default = _str(pbs.server().default_queue)
    except Exception:    # noqa
        default = ""
    data = {"queue": queue, "default_queue": default, "variables": variables, "script": script,
            "container_image": cimage}
    rc, out, err = _cbatch("queuejob", CONFIG, data, 30)
    _log(err)
    if rc == 1 and out.strip():
        e.reject(out.strip().splitlines()[0])
except SystemExit:
    raise
except BaseException as exc:    # noqa - a broken check must not stop every submission: cbatchd checks again
    pbs.logmsg(pbs.LOG_ERROR, "cbatch: queuejob hook: %s: %s" % (type(exc).__name__, exc))
e.accept()
'''


def hook_text(kind: str, python: str, socket_path: str, starter: str, config: str) -> str:
    """The full text of hook ``kind`` (``exec`` | ``queuejob``)."""
    head = _HEAD.format(kind=kind, python=python, socket=socket_path, starter=starter, config=config)
    return head + (_EXEC if kind == "exec" else _QUEUE)


def qmgr(pbs_exec: str, command: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``qmgr -c COMMAND`` (argv, no shell); CbatchError when it fails and ``check``."""
    exe = os.path.join(pbs_exec, "bin", "qmgr")
    try:
        done = subprocess.run([exe, "-c", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=QMGR_TIMEOUT, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CbatchError("install-hooks", "cannot run qmgr", exe, str(exc)) from exc
    if check and done.returncode != 0:
        raise CbatchError("install-hooks", f"qmgr failed: {command}",
                          (done.stderr or done.stdout).decode("utf-8", "replace").strip()[:300],
                          "is pbs_server running on this host, and are you root?")
    return done


MARKER = "# written by cbatch install-hooks"
LEGACY_HOOKS = ("cbatch", "cbatch_submit")    # names an earlier cbatch used: two launch hooks would stack


def _ours(pbs_exec: str, name: str) -> bool:
    """True if hook ``name`` exists and its body carries cbatch's marker (never delete a site's hook)."""
    done = qmgr(pbs_exec, f"export hook {name} application/x-python default", check=False)
    return done.returncode == 0 and MARKER.encode() in done.stdout[:4096]


def _exists(pbs_exec: str, name: str) -> bool:
    return qmgr(pbs_exec, f"list hook {name}", check=False).returncode == 0


def install(pbs_exec: str, python: str, socket_path: str, starter: str, config: str,
            queuejob: bool = True) -> List[str]:
    """Create/import/enable cbatch's hooks through qmgr (idempotent); the hook names installed."""
    hooks = [(EXEC_HOOK, "exec", "execjob_launch,execjob_end")]
    if queuejob:
        hooks.append((QUEUE_HOOK, "queuejob", "queuejob"))
    done = []
    for name in LEGACY_HOOKS:
        if _ours(pbs_exec, name):
            qmgr(pbs_exec, f"delete hook {name}")
    for name, kind, events in hooks:
        text = hook_text(kind, python, socket_path, starter, config)
        with tempfile.NamedTemporaryFile("w", suffix=".py", prefix="cbatch-hook-", delete=False) as fh:
            fh.write(text)
            path = fh.name
        try:
            if not _exists(pbs_exec, name):
                qmgr(pbs_exec, f"create hook {name}")
            qmgr(pbs_exec, f"set hook {name} event = \"{events}\"")
            qmgr(pbs_exec, f"import hook {name} application/x-python default {path}")
            qmgr(pbs_exec, f"set hook {name} alarm = {HOOK_ALARM}")
            qmgr(pbs_exec, f"set hook {name} order = {HOOK_ORDER}")
            qmgr(pbs_exec, f"set hook {name} fail_action = none")
            qmgr(pbs_exec, f"set hook {name} enabled = true")
        finally:
            os.unlink(path)
        done.append(name)
    return done


def remove(pbs_exec: str) -> List[str]:
    """Delete cbatch's hooks (those that exist); the names deleted."""
    gone = []
    for name in (EXEC_HOOK, QUEUE_HOOK) + LEGACY_HOOKS:
        if _ours(pbs_exec, name):
            qmgr(pbs_exec, f"delete hook {name}")
            gone.append(name)
    return gone


def command(args, socket_path: str, python: str, write_starter: Callable[[], str], config: str) -> int:
    """``cbatch install-hooks --pbs``: ``write_starter()`` puts the job starter shim into ``--libexec`` (it
    returns its path), then the hooks go into PBS through qmgr; ``--remove`` deletes the hooks."""
    pbs_exec = args.pbs_exec
    if not os.path.isfile(os.path.join(pbs_exec, "bin", "qmgr")):
        raise CbatchError("install-hooks", "no qmgr in PBS_EXEC", pbs_exec,
                          "pass --pbs-exec (the PBS_EXEC of /etc/pbs.conf, e.g. /opt/pbs)")
    if getattr(args, "remove", False):
        for name in remove(pbs_exec):
            print(f"deleted PBS hook {name}", file=sys.stderr)
        return 0
    starter = write_starter()
    print(f"installed job_starter: {starter}", file=sys.stderr)
    for name in install(pbs_exec, python, socket_path, starter, config):
        print(f"installed PBS hook {name} (qmgr import; the server sends it to the moms)", file=sys.stderr)
    return 0


def listed(pbs_exec: str) -> Sequence[str]:
    """The cbatch hooks PBS knows (for ``cbatch check --node``)."""
    return [name for name in (EXEC_HOOK, QUEUE_HOOK) if _exists(pbs_exec, name)]
