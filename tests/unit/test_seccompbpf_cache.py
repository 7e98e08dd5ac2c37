"""The direct engine's default seccomp program is remembered: after the first start, neither the
availability check nor the bundle write serializes (or compiles) the profile again; other sections still
go through :func:`seccompbpf.program`'s content-keyed cache."""

from __future__ import annotations

import json
import os
import stat
import types

import pytest

from cbatch.engines import seccomp, seccompbpf

SECTION = {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38, "architectures": ["SCMP_ARCH_X86_64"],
           "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}


@pytest.fixture
def counted(monkeypatch):
    """A fake compiler and a counting json in seccompbpf; the caches emptied before and after."""
    calls = {"compile": 0, "dumps": 0, "profile": 0}

    def compile_profile(section):
        calls["compile"] += 1
        return b"P" * seccompbpf.INSN_BYTES * len(section["syscalls"])

    def dumps(obj, **kw):
        calls["dumps"] += 1
        return json.dumps(obj, **kw)

    def oci_profile():
        calls["profile"] += 1
        return SECTION

    monkeypatch.setattr(seccompbpf, "compile_profile", compile_profile)
    monkeypatch.setattr(seccompbpf, "json", types.SimpleNamespace(dumps=dumps, loads=json.loads))
    monkeypatch.setattr(seccomp, "oci_profile", oci_profile)
    seccompbpf._cached.cache_clear()
    seccompbpf.default_program.cache_clear()
    yield calls
    seccompbpf._cached.cache_clear()
    seccompbpf.default_program.cache_clear()


def test_default_program_serializes_the_profile_once(counted):
    first = seccompbpf.default_program()
    assert first == b"P" * seccompbpf.INSN_BYTES
    assert counted == {"compile": 1, "dumps": 1, "profile": 1}
    for _ in range(5):                       # five more direct starts: check + bundle each
        assert seccompbpf.default_program() is first
    assert counted == {"compile": 1, "dumps": 1, "profile": 1}
    # The same bytes program() gives for that section (its content-keyed cache is still the one compile).
    assert seccompbpf.program(dict(SECTION)) is first and counted["compile"] == 1


def test_write_program_defaults_to_the_remembered_program(counted, tmp_path):
    one, two, three = (tmp_path / n for n in ("one", "two", "three"))
    for d in (one, two, three):
        d.mkdir()
    path, path2 = seccompbpf.write_program(str(one)), seccompbpf.write_program(str(two))
    assert open(path, "rb").read() == open(path2, "rb").read() == seccompbpf.default_program()
    assert counted["dumps"] == 1 and counted["compile"] == 1
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    # A section given explicitly is still compiled from that section.
    other = dict(SECTION, syscalls=SECTION["syscalls"] * 2)
    path3 = seccompbpf.write_program(str(three), other)
    assert open(path3, "rb").read() == b"P" * seccompbpf.INSN_BYTES * 2 and counted["compile"] == 2


def test_a_failed_default_is_not_remembered(counted, monkeypatch):
    """A node without the profile (oci_profile raises) must not keep that answer after it is installed."""
    from cbatch.core.errors import EngineError

    def missing():
        raise EngineError("seccomp", "profile not readable", seccomp.PROFILE)

    monkeypatch.setattr(seccomp, "oci_profile", missing)
    with pytest.raises(EngineError):
        seccompbpf.default_program()
    monkeypatch.setattr(seccomp, "oci_profile", lambda: SECTION)
    assert seccompbpf.default_program() == b"P" * seccompbpf.INSN_BYTES
