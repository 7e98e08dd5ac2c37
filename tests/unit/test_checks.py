"""`cbatch check`: config summary, every example script, and one-line refusals."""

import sys
import types
from pathlib import Path

import pytest

from cbatch import cli

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.sh"))

TEST_CONFIG = """
daemon: {instance: unit-test}
defaults:
  image: native
  images: ["cbatch-test/*"]
  allow_root: true               # the unit tests may run as root
  user_mounts: {allowed: true, prefixes: ["~", /tmp]}
queues:
  closed: {image: cbatch-test/busybox:1, native: false, user_mounts: {allowed: false}}
"""


@pytest.fixture
def config(tmp_path, monkeypatch):
    p = tmp_path / "cbatch.yaml"
    p.write_text(TEST_CONFIG)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CBATCH_IMAGE", raising=False)
    return str(p)


def run(argv, capsys):
    status = cli.main(["check"] + argv)
    out, err = capsys.readouterr()
    return status, out, err


def test_examples_exist():
    assert len(EXAMPLES) >= 3
    names = " ".join(p.read_text() for p in EXAMPLES)
    assert "cbatch-test/busybox:1" in names and "cbatch-test/debian:12" in names and "--image=native" in names
    assert "--mount" in names and "--env" in names


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_every_example_checks_ok(script, config, capsys):
    status, out, err = run(["--config", config, str(script)], capsys)
    assert status == 0, err
    assert err == ""
    assert f"script: {script}" in out
    if "--image=native" in script.read_text():
        assert "runs natively:" in out
    else:
        for heading in ("image: cbatch-test/", "argv: ", "mounts:", "limits: ", "network: none", "hardening: ",
                        "environment (layer:", "CBATCH_IMAGE=cbatch-test/", "user: "):
            assert heading in out, heading
        assert f"  {script} -> {script} (ro)" in out


def test_mounts_example_shows_user_mount_and_env_layers(config, capsys):
    status, out, _ = run(["--config", config, str(REPO / "examples" / "mounts-env.sh")], capsys)
    assert status == 0
    assert "  /tmp -> /scratch (rw)" in out and "workdir: /scratch" in out
    assert "GREETING=hello world  [--env]" in out and "limits: cpus 1, memory 128 MiB" in out


def test_cbatch_image_from_environment(config, capsys, monkeypatch):
    monkeypatch.setenv("CBATCH_IMAGE", "cbatch-test/debian:12")
    status, out, _ = run(["--config", config, str(REPO / "examples" / "hello-busybox.sh")], capsys)
    assert status == 0 and "image: cbatch-test/debian:12 (from CBATCH_IMAGE)" in out


def test_bad_script_one_line_nonzero(config, capsys, tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/sh\n#CBATCH --image=ubuntu:22.04\necho\n")
    status, out, err = run(["--config", config, str(bad)], capsys)
    assert status != 0 and out == ""
    assert err == "cbatch: image: not allowed in queue (none): ubuntu:22.04 (allowed: cbatch-test/*, native)\n"


def test_queue_option_and_pbs_queue(config, capsys, tmp_path):
    s = tmp_path / "m.sh"
    s.write_text("#!/bin/sh\n#CBATCH --image=cbatch-test/busybox:1 --mount /tmp:/t\necho\n")
    status, _, err = run(["--config", config, "--queue", "closed", str(s)], capsys)
    assert status != 0
    assert err == ("cbatch: directive line 2: user mounts are not allowed in queue closed: /tmp:/t "
                   "(ask your admin, or copy the data into your home)\n")
    s.write_text("#!/bin/sh\n#PBS -q closed\n#CBATCH --image=native\necho\n")
    status, _, err = run(["--config", config, str(s)], capsys)
    assert status != 0 and err.startswith("cbatch: image: native (no container) is not allowed in queue closed")


def test_directive_error_one_line(config, capsys, tmp_path):
    s = tmp_path / "d.sh"
    s.write_bytes(b"#!/bin/sh\n#CBATCH --imgae=x\n")
    status, _, err = run(["--config", config, str(s)], capsys)
    assert status == 125 and err.count("\n") == 1 and err.startswith("cbatch: directive line 2: unknown option: --imgae")


def test_missing_script(config, capsys):
    status, _, err = run(["--config", config, "/nonexistent/job.sh"], capsys)
    assert status != 0 and err == "cbatch: script: cannot read (No such file or directory): /nonexistent/job.sh\n"


def test_unknown_user(config, capsys):
    status, _, err = run(["--config", config, "--user", "no-such-user-cbatch", str(EXAMPLES[0])], capsys)
    assert status != 0 and err.startswith("cbatch: user: unknown user on this host: no-such-user-cbatch")


def test_config_summary(config, capsys):
    status, out, err = run(["--config", config], capsys)
    assert status == 0
    assert out.startswith(f"config {config}: OK\n")
    assert "daemon: socket /run/cbatch/cbatchd.sock" in out and "instance unit-test" in out
    assert "defaults:\n  image: native\n  images: cbatch-test/*\n" in out
    assert "queues: closed\n" in out and "queue closed:\n  image: cbatch-test/busybox:1" in out


def test_shipped_example_config_checks(capsys):
    status, out, _ = run(["--config", str(REPO / "config" / "cbatch.yaml")], capsys)
    assert status == 0 and "queues: (none; every queue uses the defaults)" in out and "image: native" in out
    status, out, _ = run(["--config", str(REPO / "config" / "examples" / "queues.yaml")], capsys)
    assert status == 0 and "queue batch:" in out and "queue gpu:" in out


def test_bad_config_one_line(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("defaults: {pull: always}\n")
    status, out, err = run(["--config", str(p)], capsys)
    assert status != 0 and out == ""
    assert err == f"cbatch: {p}: defaults.pull: not a pull mode: always (never | missing)\n"


def test_node_is_delegated(monkeypatch, capsys):
    seen = []
    fake = types.ModuleType("cbatch.admin.nodecheck")
    fake.command = lambda args: seen.append(args.node) or 3
    monkeypatch.setitem(sys.modules, "cbatch.admin.nodecheck", fake)
    import cbatch.admin
    monkeypatch.setattr(cbatch.admin, "nodecheck", fake, raising=False)
    assert cli.main(["check", "--node"]) == 3 and seen == [True]


def test_pbs_shell_option_is_the_container_command(config, capsys):
    # busybox has no bash: the example asks for /bin/sh with #PBS -S, as pbs_mom would honour it.
    script = REPO / "examples" / "hello-busybox.sh"
    status, out, _ = run(["--config", config, str(script)], capsys)
    assert status == 0 and f"argv: /bin/sh with stdin '{script}\\n'" in out
    assert "limits: cpus 1, memory 64 MiB" in out


def test_pbs_variables_and_command_line_queue(config, capsys, tmp_path):
    # The script is read by cbatch.core.qsubopts (tested there); here: check uses what it reads.
    s = tmp_path / "v.sh"
    s.write_text("#!/bin/sh\n#PBS -q closed\n#PBS -v CBATCH_IMAGE=cbatch-test/debian:12,MSG=hi\necho\n")
    status, out, _ = run(["--config", config, "--queue", "other", str(s)], capsys)
    assert status == 0 and "queue: other\n" in out
    assert "image: cbatch-test/debian:12 (from CBATCH_IMAGE)" in out and "  MSG=hi  [job]" in out
