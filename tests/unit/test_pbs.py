"""cbatch's OpenPBS / PBS Pro layer without PBS: Registration.from_pbs, the hook bodies run against a fake
``pbs`` module (what the launch hook rewrites, what it registers, that a failure after the rewrite still
leaves the starter in place), and the queuejob check."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import yaml

from cbatch.admin import pbshooks
from cbatch.clients import pbs as pbsclient
from cbatch.core.errors import JobError
from cbatch.core.job import Registration

STARTER = "/usr/libexec/cbatch/job_starter"
DATA = {"job_id": "12.vm", "euser": "alice", "egroup": "alice", "name": "a", "queue": "workq",
        "resource_list": "ncpus=1,place=free,walltime=00:05:00", "account": "",
        "script": "/var/spool/pbs/mom_priv/jobs/12.vm.SC", "session_id": 4242}


def test_registration_from_pbs():
    reg = Registration.from_pbs(DATA, now=5.0)
    assert (reg.job_id, reg.user, reg.queue, reg.session_id, reg.batch, reg.script_path) == (
        "12.vm", "alice", "workq", 4242, "pbs", "/var/spool/pbs/mom_priv/jobs/12.vm.SC")
    assert Registration.from_dict(reg.to_dict()) == reg


@pytest.mark.parametrize("change", [{"session_id": None}, {"session_id": 1}, {"session_id": True},
                                    {"euser": ""}, {"script": "relative.SC"}, {"job_id": "a\nb"},
                                    {"queue": 3}])
def test_registration_from_pbs_refuses(change):
    with pytest.raises(JobError):
        Registration.from_pbs(dict(DATA, **change))


class _Env(dict):
    def keys(self):
        return list(super().keys())


def _run_hook(kind, event_type, progname="/bin/sh", argv=(), env=None, fail=None, job_extra=None, reply=(0, b"")):
    """Execute the hook text against a fake ``pbs`` module; return (event, subprocess calls)."""
    calls = []

    def fake_run(argv_, input=None, **kw):
        calls.append((argv_, json.loads(input)))
        if fail:
            raise fail
        return subprocess.CompletedProcess(argv_, reply[0], reply[1], b"")

    job = types.SimpleNamespace(id="12.vm", euser="alice", egroup="alice", Job_Name="a", queue="workq",
                                Resource_List="ncpus=1", Account_Name=None, session_id=4242)
    for k, v in (job_extra or {}).items():
        setattr(job, k, v)
    event = types.SimpleNamespace(type=event_type, job=job, progname=progname, argv=list(argv),
                                  env=_Env(env or {}), accepted=False, rejected=None)
    event.accept = lambda: setattr(event, "accepted", True)
    event.reject = lambda msg: setattr(event, "rejected", msg)
    logged = []
    fake = types.SimpleNamespace(event=lambda: event, EXECJOB_LAUNCH="launch", EXECJOB_END="end",
                                 LOG_ERROR=1, LOG_DEBUG=2, logmsg=lambda lvl, msg: logged.append(msg),
                                 pbs_conf={"PBS_HOME": "/var/spool/pbs"},
                                 server=lambda: types.SimpleNamespace(default_queue="workq"))
    text = pbshooks.hook_text(kind, "/venv/bin/python", "/run/cbatch/cbatchd.sock", STARTER, "/etc/cbatch/cbatch.yaml")
    old = sys.modules.get("pbs")
    sys.modules["pbs"] = fake
    real_run = subprocess.run
    subprocess.run = fake_run
    try:
        exec(compile(text, "hook.py", "exec"), {"__name__": "__main__"})
    finally:
        subprocess.run = real_run
        if old is None:
            sys.modules.pop("pbs", None)
        else:
            sys.modules["pbs"] = old
    event.logged = logged
    return event, calls


def test_launch_job_shell_becomes_the_starter_and_registers():
    event, calls = _run_hook("exec", "launch", "/bin/sh", [], {"PBS_TASKNUM": "1"})
    assert (event.progname, event.argv, event.accepted) == (STARTER, [STARTER, "/bin/sh"], True)
    (argv, data), = calls
    assert argv == ["/venv/bin/python", "-I", "-m", "cbatch.clients.pbs", "launch", "/run/cbatch/cbatchd.sock"]
    assert Registration.from_pbs(data).session_id == 4242
    assert data["script"] == "/var/spool/pbs/mom_priv/jobs/12.vm.SC"


def test_launch_qsub_exec_program():
    event, calls = _run_hook("exec", "launch", "/bin/sh", ["/bin/sh", "-c", "exit 9", "zero"], {"PBS_TASKNUM": "1"})
    assert event.argv == [STARTER, "--pbs-exec", "/bin/sh", "-c", "exit 9", "zero"]
    assert len(calls) == 1


def test_launch_tm_task_is_rewritten_without_registering():
    event, calls = _run_hook("exec", "launch", "/bin/echo", ["/bin/echo", "x y"], {"PBS_TASKNUM": "00000002"})
    assert (event.progname, event.argv, calls) == (STARTER, [STARTER, "/bin/echo", "x y"], [])


def test_launch_failure_after_rewrite_keeps_the_starter():
    # A daemon client that cannot even run must not leave the job's own shell in place (an escape from
    # the queue's container): the starter stays and refuses the unregistered job itself.
    event, calls = _run_hook("exec", "launch", "/bin/sh", [], {}, fail=OSError("no python"))
    assert (event.progname, event.argv, event.accepted) == (STARTER, [STARTER, "/bin/sh"], True)
    assert any("no python" in m for m in event.logged)


def test_end_unregisters():
    event, calls = _run_hook("exec", "end")
    assert calls[0][0][4:] == ["end", "/run/cbatch/cbatchd.sock"] and calls[0][1] == {"job_id": "12.vm"}


def test_queuejob_hook_rejects_with_the_one_line():
    extra = {"Variable_List": _Env({"CBATCH_IMAGE": "x"}), "Resource_List": {}}
    event, calls = _run_hook("queuejob", "queuejob", job_extra=extra, reply=(1, b"cbatch: image: not allowed: x\n"))
    assert event.rejected == "cbatch: image: not allowed: x"
    (argv, data), = calls
    assert argv[4:] == ["queuejob", "/etc/cbatch/cbatch.yaml"]
    assert (data["queue"], data["default_queue"], data["variables"]) == ("workq", "workq", {"CBATCH_IMAGE": "x"})
    event, _ = _run_hook("queuejob", "queuejob", job_extra=extra)
    assert event.accepted and event.rejected is None


@pytest.fixture
def site(tmp_path):
    cfg = {"defaults": {"image": "native", "images": ["cbatch-test/*"], "native": True},
           "queues": {"workq": {}, "short": {"image": "cbatch-test/debian:12"}}}
    path = tmp_path / "cbatch.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("data,refused", [
    ({"queue": "short"}, False),
    ({"queue": "short", "variables": {"CBATCH_IMAGE": "evil/x:1"}}, True),
    ({"queue": "short", "variables": {"CONTAINER_IMAGE": "evil/x:1"}}, True),
    ({"queue": "short", "container_image": "evil/x:1"}, True),
    ({"queue": "", "default_queue": "workq", "variables": {"CONTAINER_IMAGE": "cbatch-test/busybox:1"}}, False),
    ({"queue": "short", "script": "#!/bin/sh\n#CBATCH --image=evil/x:1\n"}, True),
    ({"queue": "short", "script": "#!/bin/sh\n#CBATCH --bogus\n"}, True),
])
def test_queuejob_checks(site, data, refused):
    reason = pbsclient.queuejob(data, site)
    assert (reason is not None) == refused, reason
    if refused:
        assert reason.startswith("cbatch: ") and "\n" not in reason


def test_queuejob_without_config_lets_the_job_through(tmp_path):
    assert pbsclient.queuejob({"queue": "short", "variables": {"CBATCH_IMAGE": "evil/x:1"}},
                              str(tmp_path / "missing.yaml")) is None


def test_container_image_is_the_pbs_request_only():
    from cbatch.core import policy
    from cbatch.core.directives import parse_script

    class Job:
        def __init__(self, batch):
            self.batch = batch

        def env_dict(self):
            return {"CONTAINER_IMAGE": "cbatch-test/busybox:1"}

    pol = types.SimpleNamespace(image="native", name="q")
    assert policy.choose_image(pol, Job("pbs"), parse_script(b""))[0] == "cbatch-test/busybox:1"
    assert policy.choose_image(pol, Job("torque"), parse_script(b""))[0] == "native"


def test_container_image_resource_for_pbs_jobs():
    from cbatch.core import policy
    from cbatch.core.directives import parse_script
    from cbatch.core.resources import parse_resource_list

    class Job:
        batch = "pbs"
        resources = parse_resource_list("ncpus=1,container_image=cbatch-test/busybox:1,place=free")

        def env_dict(self):
            return {}

    pol = types.SimpleNamespace(image="native", name="q")
    assert policy.choose_image(pol, Job(), parse_script(b"")) == ("cbatch-test/busybox:1", "CBATCH_IMAGE")
    Job.batch = "torque"
    assert policy.choose_image(pol, Job(), parse_script(b""))[0] == "native"
