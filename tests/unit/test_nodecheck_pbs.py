"""``cbatch check --node``: the engine each queue gets here (the router's answer), and cbatch's PBS hooks
(present, enabled, current) read from qmgr or from PBS_HOME's hook files. No PBS, no engine: a fake qmgr,
fake hook files, a fake router."""

from __future__ import annotations

import io
import os
import sys
import textwrap

import pytest

from cbatch.admin import nodecheck, pbscheck, pbshooks, queueengines
from cbatch.core.config import parse

SOCK = "/run/cbatch/cbatchd.sock"


@pytest.fixture
def pbs(tmp_path):
    """A PBS node's files: pbs.conf, PBS_EXEC (no qmgr yet), PBS_HOME with empty hook directories."""
    exe, home = tmp_path / "opt-pbs", tmp_path / "spool-pbs"
    (exe / "bin").mkdir(parents=True)
    (home / "mom_priv" / "hooks").mkdir(parents=True)
    conf = tmp_path / "pbs.conf"
    conf.write_text(f"PBS_SERVER=vm\nPBS_EXEC={exe}\nPBS_HOME={home}\n")
    starter = tmp_path / "job_starter"
    starter.write_text("#!/bin/sh\n")
    starter.chmod(0o755)
    return {"conf": str(conf), "exec": exe, "home": home, "starter": str(starter)}


def _body(kind, starter, socket_path=SOCK):
    return pbshooks.hook_text(kind, sys.executable, socket_path, starter, "/etc/cbatch/cbatch.yaml")


def _mom_hook(pbs, hk="hook_name=cbatch_exec\nevent=execjob_end,execjob_launch\norder=200\nalarm=60\n",
              body=None):
    base = pbs["home"] / "mom_priv" / "hooks" / pbshooks.EXEC_HOOK
    (base.parent / (base.name + ".HK")).write_text(hk)
    (base.parent / (base.name + ".PY")).write_text(_body("exec", pbs["starter"]) if body is None else body)


def _lines(pbs, socket_path=SOCK):
    return list(pbscheck.lines(socket_path, pbs["conf"]))


def test_no_pbs_conf_no_lines(tmp_path):
    assert list(pbscheck.lines(SOCK, str(tmp_path / "none.conf"))) == []


def test_execution_host_current_hook_from_mom_files(pbs):
    _mom_hook(pbs)
    (line,) = _lines(pbs)        # no server_priv: the queuejob hook lives on the server, not checked here
    assert line[0] is True, line
    assert line[2].startswith("cbatch_exec: enabled, events execjob_end,execjob_launch, current ["), line


@pytest.mark.parametrize("case,words", [
    ("disabled", "disabled (qmgr"),
    ("events", "events execjob_end, needs execjob_end,execjob_launch"),
    ("order", "order 1, install-hooks sets 200"),
    ("old-body", "written by another cbatch version"),
    ("foreign", "not written by cbatch install-hooks"),
    ("socket", "talks to /run/other.sock, the daemon listens on /run/cbatch/cbatchd.sock"),
    ("starter", "starter /nonexistent/job_starter is not executable on this node"),
])
def test_exec_hook_problems_are_one_fail_line(pbs, case, words):
    hk = "hook_name=cbatch_exec\nevent=execjob_end,execjob_launch\norder=200\nalarm=60\n"
    body = _body("exec", pbs["starter"])
    if case == "disabled":
        hk += "enabled=false\n"
    elif case == "events":
        hk = hk.replace("event=execjob_end,execjob_launch", "event=execjob_end")
    elif case == "order":
        hk = hk.replace("order=200\n", "")          # absent: PBS's default order 1
    elif case == "old-body":
        body = body.replace("e.accept()", "pbs.logmsg(pbs.LOG_DEBUG, 'old')\ne.accept()")
    elif case == "foreign":
        body = "import pbs\npbs.event().accept()\n"
    elif case == "socket":
        body = _body("exec", pbs["starter"], "/run/other.sock")
    elif case == "starter":
        body = _body("exec", "/nonexistent/job_starter")
    _mom_hook(pbs, hk, body)
    (line,) = _lines(pbs)
    assert line[0] is False and words in line[2], line


def test_missing_exec_hook_fails(pbs):
    (line,) = _lines(pbs)
    assert line == (False, "PBS hook", f"cbatch_exec: not installed (cbatch install-hooks --pbs --pbs-exec "
                                       f"{pbs['exec']})")


QMGR = textwrap.dedent("""\
    #!/bin/sh
    # a fake qmgr: answers from the files next to it
    d=$(dirname "$0")
    case "$2" in
      "list server") echo "Server vm"; exit 0 ;;
      "list hook "*) f="$d/list-${2#list hook }"; [ -f "$f" ] || exit 1; cat "$f" ;;
      "export hook "*) set -- $2; f="$d/body-$3"; [ -f "$f" ] || exit 1; cat "$f" ;;
      *) exit 2 ;;
    esac
""")


def test_server_host_asks_qmgr_for_both_hooks(pbs):
    bindir = pbs["exec"] / "bin"
    (bindir / "qmgr").write_text(QMGR)
    (bindir / "qmgr").chmod(0o755)
    (bindir / "list-cbatch_exec").write_text(
        "Hook cbatch_exec\n    type = site\n    enabled = true\n    event = execjob_launch,execjob_end\n"
        "    user = pbsadmin\n    alarm = 60\n    order = 200\n    debug = false\n    fail_action = none\n\n")
    (bindir / "body-cbatch_exec").write_text(_body("exec", pbs["starter"]))
    (bindir / "list-cbatch_queuejob").write_text(
        "Hook cbatch_queuejob\n    type = site\n    enabled = false\n    event = queuejob\n    order = 200\n")
    (bindir / "body-cbatch_queuejob").write_text(_body("queuejob", pbs["starter"]))
    _mom_hook(pbs, body="stale\n")       # the server's word wins over the mom's copy
    exec_line, queue_line = _lines(pbs)
    assert exec_line[0] is True and exec_line[2].endswith("current [qmgr]"), exec_line
    assert queue_line[0] is False and "cbatch_queuejob: disabled" in queue_line[2], queue_line
    os.unlink(bindir / "list-cbatch_queuejob")
    assert _lines(pbs)[1] == (False, "PBS hook", f"cbatch_queuejob: not installed (cbatch install-hooks --pbs "
                                                 f"--pbs-exec {pbs['exec']})")


CONFIG = """
daemon: {instance: unit-test}
defaults: {images: ["cbatch-test/*"]}
queues:
  fast: {image: cbatch-test/busybox:1, engine: direct}
  net: {image: cbatch-test/busybox:1, network: bridge, networks: [none, bridge]}
  dock: {image: cbatch-test/busybox:1, engine: docker}
  choice: {image: native, networks: [none, bridge]}
"""


class FakeRouter:
    """The router's question only: why not direct (here: a network, or no runc on the node)."""

    def __init__(self, runc: bool = True):
        self.runc, self.asked = runc, []

    def why_not_direct(self, spec, stdio, helper):
        self.asked.append((spec.network, stdio.tty, helper))
        if spec.network != "none":
            return f"network {spec.network} (direct runs network none only)"
        return None if self.runc else "no runc at /usr/sbin/runc"


def test_queue_engines_are_the_routers_answer():
    cfg = parse(CONFIG, "/etc/cbatch/cbatch.yaml")
    got = {what: (ok, detail) for ok, what, detail in queueengines.lines(cfg, FakeRouter())}
    assert got["queue fast"] == (True, "direct (engine: direct; qsub -I: docker)")
    assert got["queue net"] == (True, "docker instead of direct: network bridge (direct runs network none only) "
                                      "(engine: auto)")
    assert got["queue dock"] == (True, "docker (engine: docker)")
    assert got["queue choice"] == (True, "direct (engine: auto; native unless a job asks for an image; "
                                         "--network bridge: docker; qsub -I: docker)")


def test_a_queue_asking_for_direct_on_a_node_without_it_fails():
    cfg = parse(CONFIG, "/etc/cbatch/cbatch.yaml")
    router = FakeRouter(runc=False)
    got = {what: (ok, detail) for ok, what, detail in queueengines.lines(cfg, router)}
    assert got["queue fast"] == (False, "docker instead of direct: no runc at /usr/sbin/runc (engine: direct)")
    assert got["queue choice"][0] is True        # auto: falling back is information
    assert all(tty is False and helper == cfg.daemon.helper for _net, tty, helper in router.asked)


def test_node_check_prints_both(tmp_path, pbs, monkeypatch):
    cfg_path = tmp_path / "cbatch.yaml"
    cfg_path.write_text(CONFIG)
    _mom_hook(pbs)
    monkeypatch.setattr(queueengines, "router_for", lambda cfg: FakeRouter())
    from cbatch.core import config as configmod
    real_load = configmod.load      # a unit test's config lives under /tmp, which trusted loading refuses
    monkeypatch.setattr(configmod, "load", lambda path, trusted=False: real_load(path, trusted=False))
    out = io.StringIO()
    nodecheck.run_checks(str(cfg_path), str(tmp_path / "no-torque" / "mom_priv"), out, pbs_conf=pbs["conf"])
    text = out.getvalue()
    assert "OK   queue fast: direct (engine: direct; qsub -I: docker)\n" in text, text
    assert "OK   PBS hook: cbatch_exec: enabled" in text, text
    assert "prologue" not in text and "accounting" not in text      # a PBS node without TORQUE
