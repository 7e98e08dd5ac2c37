"""libexec/cbatch-exec, the static in-container helper, run directly on the host (and its Makefile).

Its work inside containers is covered by test_engine.py; here we pin the contract byte by byte: argv is
exec'd verbatim (no shell), output files are appended to and never created, the stdin line arrives then
EOF, no descriptor leaks, and the exit statuses/messages when the command cannot run.
"""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.root]

ROOT = Path(__file__).resolve().parents[2]


def run(helper, *args, stdin=subprocess.DEVNULL, **kw):
    return subprocess.run([helper, *args], stdin=stdin, capture_output=True, close_fds=True, timeout=30, **kw)


def test_static_binary(helper):
    # An ELF with no PT_INTERP program header needs no dynamic loader: it runs in any image.
    data = Path(helper).read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2            # 64-bit
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    assert 3 not in types                                       # PT_INTERP


def test_make_install(tmp_path):
    dest = tmp_path / "libexec"
    subprocess.run(["make", "-s", "-C", str(ROOT / "libexec"), "install", f"DESTDIR={dest}"], check=True)
    st = os.stat(dest / "cbatch-exec")
    assert stat.S_IMODE(st.st_mode) == 0o755 and stat.S_ISREG(st.st_mode)


def test_argv_verbatim_no_shell(helper):
    args = ["a b", "", "$(id)", "'q'", "x\ny", "*", ";", "--", "--stdout"]
    p = run(helper, "--", "/bin/sh", "-c", 'for a; do printf "[%s]" "$a"; done', "sh", *args)
    assert p.returncode == 0
    assert p.stdout.decode() == "".join(f"[{a}]" for a in args)


def test_exit_status_passes_through(helper):
    assert run(helper, "--", "/bin/sh", "-c", "exit 42").returncode == 42


def test_path_lookup(helper):
    p = run(helper, "--", "echo", "hi", env={"PATH": "/usr/bin:/bin"})
    assert (p.returncode, p.stdout) == (0, b"hi\n")


def test_not_found(helper):
    p = run(helper, "--", "/no/such/shell", "-x")
    assert p.returncode == 127
    assert p.stderr == b"cbatch: command: not found in the image: /no/such/shell\n"


def test_not_found_name_is_escaped(helper):
    p = run(helper, "--", "bad\nname\x1b")
    assert p.returncode == 127
    assert p.stderr == b"cbatch: command: not found in the image: bad\\x0aname\\x1b\n"


def test_cannot_execute(helper, tmp_path):
    script = tmp_path / "noexec.sh"
    script.write_text("echo hi\n")
    script.chmod(0o644)
    for target in (str(script), str(tmp_path)):
        p = run(helper, "--", target)
        assert p.returncode == 126
        assert p.stderr == f"cbatch: command: cannot execute: {target}: Permission denied\n".encode()


def test_usage_errors(helper):
    for args in ([], ["--"], ["--stdout"], ["--bogus", "x", "--", "true"], ["true"]):
        p = run(helper, *args)
        assert p.returncode == 125, args
        assert p.stderr.startswith(b"cbatch: helper: usage: cbatch-exec "), args


def test_output_files_appended(helper, tmp_path):
    out, err = tmp_path / "job.OU", tmp_path / "job.ER"
    out.write_bytes(b"before-out\n")
    err.write_bytes(b"before-err\n")
    p = run(helper, "--stdout", str(out), "--stderr", str(err), "--",
            "/bin/sh", "-c", "echo out; echo err >&2; /no/such 2>/dev/null; exit 3")
    assert p.returncode == 3
    assert (p.stdout, p.stderr) == (b"", b"")
    assert out.read_bytes() == b"before-out\nout\n"
    assert err.read_bytes() == b"before-err\nerr\n"


def test_exec_failure_message_goes_to_stderr_file(helper, tmp_path):
    err = tmp_path / "job.ER"
    err.write_bytes(b"")
    p = run(helper, "--stderr", str(err), "--", "/bin/bash-missing")
    assert p.returncode == 127 and p.stderr == b""
    assert err.read_bytes() == b"cbatch: command: not found in the image: /bin/bash-missing\n"


def test_output_file_never_created(helper, tmp_path):
    missing = tmp_path / "missing.OU"
    p = run(helper, "--stdout", str(missing), "--", "true")
    assert p.returncode == 125
    assert p.stderr == f"cbatch: helper: cannot open output file: {missing}: No such file or directory\n".encode()
    assert not missing.exists()


def test_stdin_line_then_eof(helper):
    p = run(helper, "--stdin-line", "echo first; read -r x || echo eof\n", "--", "/bin/sh")
    assert (p.returncode, p.stdout) == (0, b"first\neof\n")


def test_stdin_line_byte_exact(helper):
    line = "x" * 1000 + " \t'\"$HOME\\ é\n"
    p = run(helper, "--stdin-line", line, "--", "cat")
    assert p.stdout == line.encode()


def test_stdin_inherited_without_line(helper):
    p = run(helper, "--", "cat", stdin=None, input=b"from parent\n")
    assert p.stdout == b"from parent\n"


def test_stdin_line_limit(helper):
    assert run(helper, "--stdin-line", "x" * (60 * 1024), "--", "wc", "-c").stdout.strip() == b"61440"
    p = run(helper, "--stdin-line", "x" * (60 * 1024 + 1), "--", "wc", "-c")
    assert p.returncode == 125
    assert p.stderr == b"cbatch: helper: stdin line too long: over 60 KiB\n"
    assert p.stdout == b""


def test_no_descriptor_leaks(helper, tmp_path):
    out, err = tmp_path / "o", tmp_path / "e"
    out.write_bytes(b"")
    err.write_bytes(b"")
    probe = "import os; print(sorted(int(f) for f in os.listdir('/proc/self/fd')))"
    p = run(helper, "--stdout", str(out), "--stderr", str(err), "--stdin-line", "x\n", "--",
            sys.executable, "-c", probe)
    assert p.returncode == 0, err.read_bytes()
    assert out.read_bytes() == b"[0, 1, 2, 3]\n"          # 3 is listdir's own directory fd


@pytest.mark.parametrize("mask", ["0077", "0022", "0"])
def test_umask_applied(helper, mask):
    # Docker has no umask option: the helper applies the caller's, so job files get pbs_mom's modes.
    p = run(helper, "--umask", mask, "--", "/bin/sh", "-c", "umask")
    assert (p.returncode, p.stdout.decode().strip()) == (0, "%04o" % int(mask, 8))


@pytest.mark.parametrize("bad", ["", "9", "01000", "0x7", "-1"])
def test_umask_malformed_is_usage_error(helper, bad):
    p = run(helper, "--umask", bad, "--", "/bin/true")
    assert p.returncode == 125 and p.stderr.startswith(b"cbatch: helper: usage:")
