"""install-hooks writes the ``$job_starter`` line into mom_priv/config itself, idempotently (#10 item 8):
following the documented steps twice must leave exactly one line."""

from __future__ import annotations

import os

from cbatch.admin import install


def test_adds_the_line_once_and_keeps_everything_else(tmp_path):
    cfg = tmp_path / "config"
    cfg.write_text("$pbsserver vm\n$logevent 255\n$usecp *:/home /home\n")
    os.chmod(cfg, 0o640)
    assert install.write_mom_config(str(cfg), "/usr/libexec/cbatch") is True
    first = cfg.read_text()
    assert first == "$pbsserver vm\n$logevent 255\n$usecp *:/home /home\n$job_starter /usr/libexec/cbatch/job_starter\n"
    assert install.write_mom_config(str(cfg), "/usr/libexec/cbatch") is False
    assert cfg.read_text() == first
    assert oct(os.stat(cfg).st_mode & 0o777) == oct(0o640)


def test_replaces_other_and_duplicate_job_starter_lines(tmp_path):
    cfg = tmp_path / "config"
    cfg.write_text("$job_starter /old/starter\n$pbsserver vm\n$job_starter /usr/libexec/cbatch/job_starter\n")
    assert install.write_mom_config(str(cfg), "/usr/libexec/cbatch") is True
    assert cfg.read_text() == "$job_starter /usr/libexec/cbatch/job_starter\n$pbsserver vm\n"


def test_creates_a_missing_config(tmp_path):
    cfg = tmp_path / "config"
    assert install.write_mom_config(str(cfg), "/x") is True
    assert cfg.read_text() == "$job_starter /x/job_starter\n"
    assert oct(os.stat(cfg).st_mode & 0o777) == oct(0o644)


def test_a_job_starter_lookalike_is_not_touched(tmp_path):
    cfg = tmp_path / "config"
    cfg.write_text("$job_starter_run_privileged false\n")
    install.write_mom_config(str(cfg), "/x")
    assert cfg.read_text() == "$job_starter_run_privileged false\n$job_starter /x/job_starter\n"


def test_hooks_readme_shows_the_shim_install_hooks_writes():
    """hooks/README.md's example is byte for byte what install-hooks writes (for that interpreter)."""
    from pathlib import Path
    text = (Path(__file__).resolve().parents[2] / "hooks" / "README.md").read_text()
    start = text.index("#!/opt/cbatch/venv/bin/python -I\n")
    example = text[start:text.index("```", start)]
    assert example == install.shim_text("prologue", "/run/cbatch/cbatchd.sock", "/opt/cbatch/venv/bin/python")
