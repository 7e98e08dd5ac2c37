"""The Torque SUBMITFILTER: byte-identical pass-through, one clear line per refusal, qsub's queue rules."""

from __future__ import annotations

import io
import os
import subprocess

import pytest

from cbatch.admin import submitfilter as sf

CONFIG = """
defaults:
  images: ["cbatch-test/*"]
  image: native
queues:
  batch: {}
  gpu:
    images: ["cbatch-test/debian:12"]
    image: cbatch-test/debian:12
    native: false
    networks: [none, bridge]
"""

OK = (b"#!/bin/bash\n#PBS -l nodes=1\n#CBATCH --image=cbatch-test/busybox:1\n"
      b"# caf\xe9 \xff\xfe latin-1 comment\necho \xff\x00\xc3(\n")


@pytest.fixture
def config(tmp_path):
    p = tmp_path / "cbatch.yaml"
    p.write_text(CONFIG)
    return str(p)


def run(config, script: bytes, *qsub_args, env=None):
    out, err = io.BytesIO(), io.BytesIO()
    old = dict(os.environ)
    try:
        if env is not None:
            os.environ.update(env)
        rc = sf.run(["--config", config, "--"] + list(qsub_args), io.BytesIO(script), out, err)
    finally:
        os.environ.clear()
        os.environ.update(old)
    return rc, out.getvalue(), err.getvalue().decode()


def test_allowed_passes_byte_identical(config):
    rc, out, err = run(config, OK, "-q", "batch", "job.sh")
    assert (rc, out, err) == (0, OK, "")


def test_script_without_directives_passes(config):
    script = b"\xff\xfe\x00binary-ish but no directives\n"
    assert run(config, script, "job.sh") == (0, script, "")


def test_malformed_directive(config):
    script = b"#!/bin/sh\n#CBATCH --image\necho hi\n"
    rc, out, err = run(config, script, "job.sh")
    assert rc == 1 and out == b""
    assert err.startswith("cbatch: directive line 2: --image needs a value") and err.count("\n") == 1


def test_unknown_directive(config):
    rc, out, err = run(config, b"#CBATCH --bogus=1\n", "job.sh")
    assert rc == 1 and out == b"" and err.startswith("cbatch: directive line 1:") and "bogus" in err


def test_image_not_allowed_in_queue_from_cmdline(config):
    rc, out, err = run(config, OK, "-q", "gpu", "job.sh")
    assert rc == 1 and out == b""
    assert err == ("cbatch: image: not allowed in queue gpu: cbatch-test/busybox:1 "
                   "(allowed: cbatch-test/debian:12)\n")


def test_queue_from_script_and_cmdline_override(config):
    script = b"#!/bin/sh\n#PBS -q gpu\n#CBATCH --image=cbatch-test/busybox:1\ntrue\n"
    assert run(config, script, "job.sh")[0] == 1
    assert run(config, script, "-q", "batch", "job.sh")[0] == 0
    assert run(config, script, "-qbatch", "job.sh")[0] == 0              # getopt: attached value
    assert run(config, script, "-Vq", "batch@server", "job.sh")[0] == 0  # cluster, queue@server
    assert run(config, script, "job.sh", "-q", "batch")[0] == 0          # glibc getopt permutes


def test_pbs_after_first_command_is_ignored(config):
    script = b"#!/bin/sh\necho start\n#PBS -q gpu\n"
    assert run(config, OK.replace(b"#PBS -l nodes=1\n", b"") + script)[0] == 0


def test_pbs_prefix_option(config):
    script = b"#!/bin/sh\n#XYZ -q gpu\n#CBATCH --image=cbatch-test/busybox:1\ntrue\n"
    assert run(config, script, "job.sh")[0] == 0
    assert run(config, script, "-C", "#XYZ", "job.sh")[0] == 1


def test_default_queue(config):
    script = b"#CBATCH --image=cbatch-test/busybox:1\n"
    assert run(config, script, "job.sh")[0] == 0                        # batch
    out, err = io.BytesIO(), io.BytesIO()
    rc = sf.run(["--config", config, "--default-queue", "gpu", "--", "job.sh"], io.BytesIO(script), out, err)
    assert rc == 1 and "queue gpu" in err.getvalue().decode()


def test_native_refused_where_not_allowed(config):
    rc, _, err = run(config, b"#!/bin/sh\ntrue\n", "-q", "gpu", "x")    # default image: fine
    assert rc == 0
    rc, _, err = run(config, b"#CBATCH --image=native\n", "-q", "gpu", "x")
    assert rc == 1 and err.startswith("cbatch: image: native (no container) is not allowed in queue gpu")


def test_cbatch_image_variable_wins(config):
    script = b"#CBATCH --image=cbatch-test/debian:12\n"
    assert run(config, script, "-q", "gpu", "x")[0] == 0
    rc, _, err = run(config, script, "-q", "gpu", "-v", "FOO=1,CBATCH_IMAGE=cbatch-test/busybox:1", "x")
    assert rc == 1 and "(from CBATCH_IMAGE)" not in err and "cbatch-test/busybox:1" in err
    rc, _, err = run(config, script, "-V", "-q", "gpu", "x", env={"CBATCH_IMAGE": "cbatch-test/busybox:1"})
    assert rc == 1
    rc, _, _ = run(config, script, "-q", "gpu", "x", env={"CBATCH_IMAGE": "cbatch-test/busybox:1"})
    assert rc == 0                                                      # not exported without -V/-v
    rc, _, _ = run(config, b"#PBS -v CBATCH_IMAGE=evil/x:1\n" + script, "-q", "gpu", "x")
    assert rc == 1


def test_network_and_user_mounts(config):
    rc, _, err = run(config, b"#CBATCH --image=cbatch-test/debian:12 --network=host\n", "-q", "gpu", "x")
    assert rc == 1 and err == "cbatch: network: not allowed in queue gpu: host (allowed: none, bridge)\n"
    assert run(config, b"#CBATCH --image=cbatch-test/debian:12 --network=bridge\n", "-q", "gpu", "x")[0] == 0
    rc, _, err = run(config, b"#!/bin/sh\n#CBATCH --image=cbatch-test/debian:12\n#CBATCH --mount=/data:/data\n",
                     "-q", "gpu", "x")
    assert rc == 1 and err.startswith("cbatch: directive line 3: user mounts are not allowed in queue gpu")


def test_unreadable_config_lets_job_through(tmp_path):
    rc, out, err = run(str(tmp_path / "missing.yaml"), OK, "x")
    assert rc == 0 and out == OK and "job not checked" in err


def test_wrapper_subprocess(tmp_path, config):
    """The installed wrapper, as qsub runs it: a real process, bytes in = bytes out. (Its speed is a
    benchmark: bench/, not an assertion here.)"""
    wrapper = tmp_path / "cbatch-submit-filter"
    sf.install(str(wrapper), config_path=config)
    env = {"PATH": "/usr/bin:/bin"}
    p = subprocess.run([str(wrapper), "-q", "batch", "job.sh"], input=OK, capture_output=True, env=env)
    assert (p.returncode, p.stdout, p.stderr) == (0, OK, b"")
    p = subprocess.run([str(wrapper), "-q", "gpu", "job.sh"], input=OK, capture_output=True, env=env)
    assert p.returncode == 1 and p.stdout == b"" and p.stderr.startswith(b"cbatch: image: not allowed")


def test_digest_references_are_left_to_the_node(config):
    """qsub time has no engine: a digest of the allowed repository passes (the node checks it is an allowed
    tag's image); a digest of another repository is refused at once."""
    digest = "sha256:" + "4" * 64
    ok = f"#CBATCH --image=cbatch-test/debian@{digest}\n".encode()
    assert run(config, ok, "-q", "gpu", "x")[0] == 0
    rc, _, err = run(config, f"#CBATCH --image=cbatch-test/busybox@{digest}\n".encode(), "-q", "gpu", "x")
    assert rc == 1 and err.startswith(f"cbatch: image: not allowed in queue gpu: cbatch-test/busybox@{digest}")
