"""install-hooks writes shims pbs_mom accepts; ``cbatch check --node`` sees a good and a broken node."""

from __future__ import annotations

import argparse
import io
import os
import stat
import subprocess
import sys

from cbatch.admin import install
from cbatch.admin import nodecheck


# These check the Python shims (their interpreter line); the C shims have tests/unit/test_install_shims.py.
def _install(tmp_path, socket_path):
    mom_priv = tmp_path / "mom_priv"
    libexec = tmp_path / "libexec"
    mom_priv.mkdir(mode=0o751)
    out = io.StringIO()
    old, sys.stdout = sys.stdout, out
    try:
        rc = install.command(argparse.Namespace(mom_priv=str(mom_priv), libexec=str(libexec), socket=socket_path,
                                                hooks="python"))
    finally:
        sys.stdout = old
    return rc, mom_priv, libexec, out.getvalue()


def _install_again(mom_priv, libexec, socket_path):
    rc = install.command(argparse.Namespace(mom_priv=str(mom_priv), libexec=str(libexec), socket=socket_path,
                                            hooks="python"))
    return rc, mom_priv, libexec, ""


def test_install_hooks_modes_and_interpreter(tmp_path, daemon):
    rc, mom_priv, libexec, printed = _install(tmp_path, daemon.socket)
    assert rc == 0
    # install-hooks writes the $job_starter line into mom_priv/config itself, once (README's admin steps).
    assert (mom_priv / "config").read_text().splitlines() == [f"$job_starter {libexec}/job_starter"]
    rc2, _, _, _ = _install_again(mom_priv, libexec, daemon.socket)
    assert rc2 == 0 and (mom_priv / "config").read_text().splitlines() == [f"$job_starter {libexec}/job_starter"]
    for path, mode in ((mom_priv / "prologue", 0o500), (mom_priv / "epilogue", 0o500),
                       (libexec / "job_starter", 0o755)):
        st = os.lstat(path)
        assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == mode
        first = path.read_text().splitlines()[0]
        assert first == f"#!{sys.executable} -I"
        assert repr(daemon.socket) in path.read_text()
        assert install.hook_problems(str(path), path.name, sys.executable) == []


def test_prologue_shim_registers_with_minimal_env(tmp_path, daemon, mom, alice):
    """The shim itself, run like pbs_mom runs it (PATH=/bin:/usr/bin, no PYTHONPATH), reaches the daemon."""
    from cbatch.clients import client
    job_id = f"{os.getpid()}999.vm"
    p = subprocess.run([mom.prologue, job_id, alice.name, alice.group, "n", "nodes=1", "batch", "",
                        f"{mom.jobs_dir}/{job_id}.SC"], env={"PATH": "/bin:/usr/bin", "PYTHONPATH": "/nonexistent"},
                       capture_output=True, cwd=mom.mom_priv, stdin=subprocess.DEVNULL, timeout=60)
    assert p.returncode == 0 and p.stderr == b"", p.stderr
    jobs = {j["job_id"]: j for j in client.call(daemon.socket, "status")["jobs"]}
    assert jobs[job_id]["user"] == alice.name and jobs[job_id]["session_id"] == os.getpid()
    p = subprocess.run([mom.epilogue_path, job_id, alice.name, alice.group, "n", "1", "nodes=1", "cput=0", "batch",
                        "", "0", f"{mom.jobs_dir}/{job_id}.SC"], env={"PATH": "/bin:/usr/bin"},
                       capture_output=True, cwd=mom.mom_priv, timeout=60)
    assert p.returncode == 0 and p.stderr == b"", p.stderr
    assert job_id not in {j["job_id"] for j in client.call(daemon.socket, "status")["jobs"]}


def test_node_check_good_and_broken(tmp_path, daemon):
    rc, mom_priv, libexec, _ = _install(tmp_path, daemon.socket)
    (mom_priv / "config").write_text(f"$pbsserver vm\n$job_starter {libexec}/job_starter\n")
    no_pbs = str(tmp_path / "no-pbs.conf")       # this host's own PBS (if any) is not under test here
    out = io.StringIO()
    failed = nodecheck.run_checks(str(daemon.config_path), str(mom_priv), out=out, pbs_conf=no_pbs)
    lines = out.getvalue().splitlines()
    assert failed == 0, lines
    queues = list(daemon.config["queues"])
    assert [l.split()[1].rstrip(":") for l in lines] == ["config", "daemon", "engine"] + ["queue"] * len(queues) + \
        ["prologue", "epilogue", "mom", "job_starter", "helper", "cgroup", "accounting"]
    assert all(l.startswith("OK") for l in lines)
    # The real router's answer for each queue (the test daemon's queues ask for this run's engine).
    engine = daemon.engine_name
    for name in queues:
        assert any(l.startswith(f"OK   queue {name}: {engine} (engine: {engine}") for l in lines), (name, lines)

    os.chmod(mom_priv / "prologue", 0o777)
    (mom_priv / "config").write_text("$pbsserver vm\n")
    out = io.StringIO()
    failed = nodecheck.run_checks(str(daemon.config_path), str(mom_priv), out=out, pbs_conf=no_pbs)
    bad = [l for l in out.getvalue().splitlines() if l.startswith("FAIL")]
    assert failed == 3 and len(bad) == 3, out.getvalue()
    assert "prologue" in bad[0] and "world-writable" in bad[0]
    assert bad[1].startswith("FAIL mom config")
    assert bad[2].startswith("FAIL job_starter") and "missing" in bad[2]    # falls back to the default path


def test_node_check_cli_exit_status(tmp_path):
    p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "cbatch"), "check", "--node", "--config",
                        str(tmp_path / "missing.yaml"), "--mom-priv", str(tmp_path)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1
    lines = p.stdout.splitlines()
    assert lines[0].startswith("FAIL config") and all(l[:4] in ("OK  ", "FAIL") for l in lines)


def test_install_refuses_to_replace_a_site_prologue(tmp_path, daemon):
    import pytest
    from cbatch.core.errors import CbatchError
    mom_priv = tmp_path / "mom_priv"
    mom_priv.mkdir()
    (mom_priv / "prologue").write_text("#!/bin/sh\n/site/thing\n")
    with pytest.raises(CbatchError, match="refusing to replace"):
        install.install(str(mom_priv), str(tmp_path / "libexec"), daemon.socket)
    assert (mom_priv / "prologue").read_text() == "#!/bin/sh\n/site/thing\n"
    assert not (mom_priv / "epilogue").exists()


def test_shims_survive_a_broken_install(tmp_path, alice):
    """An interpreter that cannot import cbatch: hooks exit 0 and the starter 125, one line each."""
    python = "/usr/bin/python3"          # the system python: cbatch lives only in the venv
    for kind, status in (("prologue", 0), ("epilogue", 0), ("job_starter", 125)):
        path = tmp_path / kind
        install.write_file(str(path), install.shim_text(kind, "/nonexistent.sock", python), 0o755)
        p = subprocess.run([str(path), "1.vm"], env={"PATH": "/bin:/usr/bin"}, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=60)
        assert p.returncode == status, (kind, p.stderr)
        assert p.stderr.startswith(f"cbatch: {kind}: cannot load cbatch") and len(p.stderr.splitlines()) == 1
