"""``cbatch check --node``'s accounting line: which TORQUE build this node runs, from the running pbs_mom."""

from __future__ import annotations

import os

import pytest

from cbatch.admin import nodecheck


def _node(tmp_path, binary: bytes | None, comm="pbs_mom", trq_paths=False, torque_dirs=False):
    home = tmp_path / "spool"
    (home / "mom_priv").mkdir(parents=True)
    proc, root = tmp_path / "proc", tmp_path / "cg"
    root.mkdir()
    if binary is not None:
        exe = tmp_path / "sbin" / "pbs_mom"
        exe.parent.mkdir()
        # The marker straddles a 1 MiB read boundary when present: the scan must still find it.
        exe.write_bytes(b"\0" * ((1 << 20) - 5) + binary + b"\0" * 100)
        (proc / "321").mkdir(parents=True)
        (proc / "321" / "comm").write_text(comm + "\n")
        os.symlink(exe, proc / "321" / "exe")
        (home / "mom_priv" / "mom.lock").write_bytes(b"321\0")
    if trq_paths:
        (home / "trq-cgroup-paths").write_text("memory /sys/fs/cgroup/memory\n")
    if torque_dirs:
        (root / "memory" / "torque").mkdir(parents=True)
    return str(home / "mom_priv"), str(root), str(proc)


@pytest.fixture(autouse=True)
def no_pbs_mom_on_path(tmp_path, monkeypatch):
    (tmp_path / "emptybin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "emptybin"))


def test_cgroup_build_running(tmp_path):
    ok, line = nodecheck.torque_accounting(*_node(tmp_path, b"x/trq-cgroup-paths\0"))
    assert ok and line.startswith("TORQUE cgroups: containers nest under /torque/<jobid>")
    assert "built with --enable-cgroups" in line


def test_plain_build_running_despite_leftover_cgroup_dirs(tmp_path):
    # /torque directories outlive a cgroup pbs_mom; the running binary is what counts.
    ok, line = nodecheck.torque_accounting(*_node(tmp_path, b"no marker here", trq_paths=True, torque_dirs=True))
    assert ok and line.startswith("no TORQUE cgroups: resources_used.cput/mem do not include containers; "
                                  "cbatchd enforces cput= on each container itself")
    assert "built without --enable-cgroups" in line and "\n" not in line


def test_mom_down_guesses_from_what_a_cgroup_build_leaves(tmp_path):
    ok, line = nodecheck.torque_accounting(*_node(tmp_path / "a", None, trq_paths=True))
    assert ok and line.startswith("TORQUE cgroups") and "trq-cgroup-paths" in line and "not running" in line
    ok, line = nodecheck.torque_accounting(*_node(tmp_path / "b", None))
    assert ok and line.startswith("no TORQUE cgroups") and "not running" in line


def test_stale_lock_of_another_process_is_not_the_mom(tmp_path):
    ok, line = nodecheck.torque_accounting(*_node(tmp_path, b"trq-cgroup-paths", comm="bash"))
    assert line.startswith("no TORQUE cgroups") and "not running" in line


def test_mom_down_the_pbs_mom_on_path_decides(tmp_path, monkeypatch):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "pbs_mom").write_bytes(b"plain build")
    (bin_ / "pbs_mom").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_))
    ok, line = nodecheck.torque_accounting(*_node(tmp_path / "n", None, torque_dirs=True))
    assert line.startswith("no TORQUE cgroups") and f"installed {bin_}/pbs_mom built without" in line
