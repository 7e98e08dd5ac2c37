"""The sealed copy of runc (cbatch.engines.runcbinary): sealed the way runc's own check wants it, executable
by its /proc/self/fd path, following the file on disk, and never closed while a start still uses it."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import subprocess

import pytest

from cbatch.engines import runcbinary
from cbatch.engines.runcbinary import SEALS, SealedRunc, sealed_copy

READLINK = shutil.which("readlink") or "/usr/bin/readlink"


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False


def _content(fd: int) -> bytes:
    return os.pread(fd, 1 << 20, 0)


def test_runcs_own_seal_check_accepts_the_copy_and_nothing_can_write_it(tmp_path):
    src = tmp_path / "runc"
    src.write_bytes(b"\x7fELF" + os.urandom(100_000))
    fd, ident = sealed_copy(str(src))
    try:
        # runc's is_self_cloned: F_GET_SEALS must be exactly SEAL | SHRINK | GROW | WRITE.
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == SEALS == 0x000F
        assert _content(fd) == src.read_bytes()
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert ident[1] == os.stat(src).st_ino
        for attempt in (lambda: os.pwrite(fd, b"x", 0), lambda: os.ftruncate(fd, 1),
                        lambda: os.ftruncate(fd, 1 << 24), lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0)):
            with pytest.raises(PermissionError):
                attempt()
        # Nor through a new writable descriptor of it: the seals hold for every opener.
        w = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY)
        try:
            with pytest.raises(PermissionError):
                os.write(w, b"x")
        finally:
            os.close(w)
        assert _content(fd) == src.read_bytes()
    finally:
        os.close(fd)


def test_the_copy_runs_by_its_proc_path_and_is_its_own_exe(tmp_path):
    """What runc sees: its /proc/self/exe is the sealed memfd, though the descriptor is close-on-exec and
    subprocess closes every inherited descriptor before the exec."""
    sealed = SealedRunc(READLINK)
    try:
        with sealed.executable() as path:
            assert path.startswith(f"/proc/{os.getpid()}/fd/")
            out = subprocess.run(["readlink", "/proc/self/exe"], executable=path, capture_output=True,
                                 check=True).stdout.decode().strip()
        assert out == "/memfd:runc (deleted)"
    finally:
        sealed.close()


def test_a_changed_file_gets_a_new_copy_and_the_old_one_lives_until_its_last_use_ends(tmp_path):
    src = tmp_path / "runc"
    src.write_bytes(b"v1" * 1000)
    sealed = SealedRunc(str(src))
    with sealed.use() as first:
        with sealed.use() as again:
            assert again == first                       # unchanged: the same copy
        os.utime(src, ns=(1, 1))                        # an upgrade: another mtime (and ctime)
        src.write_bytes(b"v2" * 1000)
        with sealed.use() as second:
            assert second != first
            assert _content(second) == b"v2" * 1000
            # The start that holds the first copy can still exec it: same number, same file.
            assert _open(first) and _content(first) == b"v1" * 1000
    assert not _open(first)                             # its last use ended: closed now
    assert _open(second)                                # the current copy stays
    sealed.close()
    assert not _open(second)
    sealed.close()                                      # idempotent


def test_close_while_in_use_waits_for_the_use(tmp_path):
    src = tmp_path / "runc"
    src.write_bytes(b"x" * 10)
    sealed = SealedRunc(str(src))
    with sealed.use() as fd:
        sealed.close()
        assert _open(fd)
    assert not _open(fd)


def test_without_a_copy_the_file_itself_is_used_and_said_once(tmp_path, caplog):
    missing = str(tmp_path / "no-runc")
    sealed = SealedRunc(missing)
    with caplog.at_level(logging.WARNING, logger="cbatchd"):
        for _ in range(3):
            with sealed.executable() as path:
                assert path == missing
            with sealed.use() as fd:
                assert fd is None
    warned = [r.getMessage() for r in caplog.records if "no sealed copy" in r.getMessage()]
    assert len(warned) == 1, warned
    assert missing in warned[0] and "runc copies itself at every start" in warned[0]


def test_the_seals_are_runcs():
    """RUNC_MEMFD_SEALS in runc 1.1's nsenter/cloned_binary.c."""
    assert runcbinary.SEALS == fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
