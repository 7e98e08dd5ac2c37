"""Pure parts of ``cbatch run`` (runcmd.py) and the Slurm hooks (slurm.py): no daemon, no root."""

from __future__ import annotations

import argparse

import pytest

from cbatch.clients import client
from cbatch.clients import runcmd
from cbatch.clients import slurm
from cbatch.cli import _parser
from cbatch.core.errors import DirectiveError


def _args(*argv):
    return _parser().parse_args(["run", *argv])


def test_options_are_sent_back_verbatim_for_the_daemon_to_parse():
    a = _args("--image", "busybox", "--mount", "/a:/b:ro", "--env", "X=1 2", "--env", "Y=",
              "--workdir", "/w", "--network", "none", "--readonly", "--entrypoint", "cmd", "arg")
    assert runcmd.options_of(a) == ["--image=busybox", "--mount=/a:/b:ro", "--env=X=1 2", "--env=Y=",
                                    "--workdir=/w", "--network=none", "--readonly", "--entrypoint"]
    assert runcmd.command_of(a) == ["cmd", "arg"]


def test_command_after_double_dash_and_options_after_the_command_belong_to_it():
    assert runcmd.command_of(_args("--image=x", "--", "--weird", "-n")) == ["--weird", "-n"]
    a = _args("echo", "--image", "y")
    assert runcmd.command_of(a) == ["echo", "--image", "y"] and a.image is None


def test_no_command_is_a_one_line_error():
    with pytest.raises(DirectiveError) as exc:
        runcmd.command_of(_args("--image=x"))
    assert exc.value.message.startswith("cbatch: cbatch run: no command given")
    assert "\n" not in exc.value.message


def test_socket_choice(monkeypatch):
    monkeypatch.delenv("CBATCH_SOCKET", raising=False)
    assert client.socket_path(None) == "/run/cbatch/cbatchd.sock"
    monkeypatch.setenv("CBATCH_SOCKET", "/tmp/s")
    assert client.socket_path(None) == "/tmp/s"
    assert client.socket_path("/x") == "/x"


def test_job_cgroup_from_slurm_env():
    env = {"SLURMD_NODENAME": "vm", "SLURM_JOB_UID": "1001", "SLURM_JOB_ID": "42"}
    assert slurm.job_cgroup(env) == "/slurm_vm/uid_1001/job_42"
    for bad in ({**env, "SLURM_JOB_ID": "4/2"}, {**env, "SLURMD_NODENAME": "../x"},
                {**env, "SLURM_JOB_UID": ""}, {}):
        assert slurm.job_cgroup(bad) is None


def test_hooks_never_fail_without_a_daemon(monkeypatch, tmp_path, capsys):
    for key in ("SLURM_JOB_ID", "SLURM_JOB_UID", "SLURMD_NODENAME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_JOB_USER", "nobody")
    args = argparse.Namespace(socket=str(tmp_path / "none.sock"), slurm=True, args=[])
    assert slurm.prologue(args) == 0
    assert slurm.epilogue(args) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("cbatch: slurm ") for line in err), err
    monkeypatch.setenv("SLURM_JOB_ID", "not-a-number")
    assert slurm.prologue(args) == 0
