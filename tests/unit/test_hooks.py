"""cbatch.clients.hooks never fails the job: every problem is a logged line and exit 0 (no daemon needed)."""

from __future__ import annotations

import pytest

from cbatch.clients import hooks

NOWHERE = "/nonexistent/cbatch-test.sock"


@pytest.mark.parametrize("argv", [[], ["1.vm"], ["1.vm", "u", "g", "n", "r", "q", "a", "relative"], ["x"] * 30,
                                  ["1\n.vm", "u", "g", "n", "r", "q", "a", "/s.SC"]])
def test_prologue_junk_exits_0_with_one_line(argv, capsys):
    assert hooks.prologue_main(argv, socket_path=NOWHERE) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("cbatch prologue: job ")


def test_prologue_daemon_down(capsys):
    argv = ["1.vm", "cbt-alice", "cbt-alice", "n", "nodes=1", "batch", "", "/var/spool/torque/mom_priv/jobs/1.vm.SC"]
    assert hooks.prologue_main(argv, socket_path=NOWHERE) == 0
    err = capsys.readouterr().err
    assert "1.vm not registered" in err and "not reachable" in err


@pytest.mark.parametrize("argv", [[], ["1.vm"] * 3, ["1.vm"] * 13])
def test_epilogue_bad_argv_exits_0(argv, capsys):
    assert hooks.epilogue_main(argv, socket_path=NOWHERE) == 0
    assert capsys.readouterr().err.startswith("cbatch epilogue: expected 11 arguments")


def test_epilogue_daemon_down_exits_0(capsys, monkeypatch):
    monkeypatch.setattr(hooks, "UNREGISTER_RETRY", 0.5)
    monkeypatch.setattr(hooks, "UNREGISTER_EVERY", 0.1)
    argv = ["1.vm", "u", "g", "n", "123", "nodes=1", "cput=0", "batch", "", "0", "/s.SC"]
    assert hooks.epilogue_main(argv, socket_path=NOWHERE) == 0
    err = capsys.readouterr().err
    assert "1.vm not unregistered" in err
    assert "left for cbatchd's start-up sweep: the job's registration and any container labelled " \
           "cbatch.job=1.vm" in err


def test_epilogue_waits_for_a_restarting_daemon(tmp_path, capsys, monkeypatch):
    """The daemon is down when the epilogue starts and back a moment later: the job is unregistered."""
    import os
    import socket
    import threading
    import time
    from cbatch import protocol
    monkeypatch.setattr(hooks, "UNREGISTER_EVERY", 0.1)
    path = str(tmp_path / "d.sock")
    got = []

    def daemon_comes_back():
        time.sleep(1.0)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(1)
        conn, _ = srv.accept()
        msg, fds = protocol.recv(conn, timeout=5)
        for fd in fds:
            os.close(fd)
        got.append(msg)
        protocol.send(conn, {"ok": True, "job_id": msg["job_id"], "leftovers": []})
        conn.close()
        srv.close()
    t = threading.Thread(target=daemon_comes_back, daemon=True)
    t.start()
    argv = ["2.vm", "u", "g", "n", "123", "nodes=1", "cput=0", "batch", "", "0", "/s.SC"]
    assert hooks.epilogue_main(argv, socket_path=path) == 0
    t.join(5)
    assert [m["op"] for m in got] == ["unregister"] and got[0]["job_id"] == "2.vm"
    assert "not unregistered" not in capsys.readouterr().err


def test_newline_in_job_id_cannot_forge_a_log_line(capsys):
    hooks.prologue_main(["1.vm\ncbatch prologue: forged", "u"], socket_path=NOWHERE)
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_slurm_route():
    """``--slurm`` routes to slurm.py in the dispatcher; hooks.py does not import slurm.py (no circle)."""
    from cbatch import cli
    parser = cli._parser()
    for name in ("prologue", "epilogue"):
        assert parser.parse_args([name, "--slurm"]).route == f"cbatch.clients.slurm:{name}"
        assert parser.parse_args([name, "1.vm"]).route == f"cbatch.clients.hooks:{name}_command"
    import ast, inspect
    tree = ast.parse(inspect.getsource(hooks))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "slurm" not in imported and "cbatch.clients.slurm" not in imported
