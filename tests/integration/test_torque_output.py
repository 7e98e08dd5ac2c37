"""End-to-end 3: output reaches the spool files, separately, live, byte-exact and complete."""

from __future__ import annotations

import os

from cbatch.admin import install
from torque_helpers import script


def test_stdout_and_stderr_are_separate(mom, alice):
    r = mom.submit(script("echo out1; echo err1 >&2; echo out2; echo err2 >&2"), alice.name).wait(120)
    assert r.exit_status == 0
    assert r.stdout == b"out1\nout2\n"
    assert r.stderr == b"err1\nerr2\n"


def test_output_is_live(mom, alice):
    job = mom.submit(script("echo before; echo before-err >&2; sleep 6; echo after"), alice.name)
    assert job.wait_output(b"before\n", timeout=60)
    assert job.wait_output(b"before-err\n", stream="stderr", timeout=5)
    assert not job.done, "the line must be in the spool file while the job still runs"
    r = job.wait(60)
    assert r.stdout == b"before\nafter\n"


def test_binary_output_is_byte_exact(mom, alice, workdir):
    payload = bytes(range(256)) * 2048 + os.urandom(300_000) + b"\r\n\x00tail-without-newline"
    (workdir / "payload").write_bytes(payload)
    os.chown(workdir / "payload", alice.uid, alice.gid)
    r = mom.submit(script("cat payload; cat payload >&2"), alice.name, initdir=str(workdir)).wait(120)
    assert r.exit_status == 0
    assert r.stdout == payload
    assert r.stderr == payload


def test_nothing_lost_at_the_end(mom, alice):
    r = mom.submit(script("seq 1 200000; seq 1 50000 >&2; exit 3"), alice.name).wait(120)
    assert r.exit_status == 3
    assert r.stdout == "".join(f"{i}\n" for i in range(1, 200001)).encode()
    assert r.stderr == "".join(f"{i}\n" for i in range(1, 50001)).encode()


def test_prologue_output_is_kept_before_job_output(mom_factory, daemon, alice):
    """A site prologue that prints and then runs cbatch's: its lines stay at the top of .o/.e."""
    root_mom = mom_factory(daemon)
    real = os.path.join(root_mom.mom_priv, "cbatch-prologue")
    install.write_file(real, install.shim_text("prologue", daemon.socket), 0o500)
    wrapper = f"#!/bin/sh\necho PROLOGUE-OUT\necho PROLOGUE-ERR >&2\nexec {real} \"$@\"\n"
    install.write_file(root_mom.prologue, wrapper, 0o500)
    r = root_mom.submit(script("echo job-out; echo job-err >&2"), alice.name).wait(120)
    assert r.exit_status == 0, r.stderr
    assert r.stdout == b"PROLOGUE-OUT\njob-out\n"
    assert r.stderr == b"PROLOGUE-ERR\njob-err\n"
