"""Interactive jobs (``qsub -I``) through the job starter, as TORQUE 6.1's pbs_mom starts them.

pbs_mom execs ``[starter, shell]`` in the job's session but not as its leader (the leader ran the prologue and
stays as qsub's reader), with the pty slave as stdin/stdout/stderr and PBS_ENVIRONMENT=PBS_INTERACTIVE. The
emulator's pty master plays qsub's terminal. Before the fix every such job failed at once with
``cbatch: start: no registered job has this session``.
"""

from __future__ import annotations

import os
import select
import time

import pytest

from cbatch.emulator import momproc
from torque_helpers import reattached, script, wait_until

pytestmark = [pytest.mark.root, pytest.mark.docker]


def _read_until(fd: int, needle: bytes, timeout: float = 60.0) -> bytes:
    """Terminal output up to and including ``needle`` (or everything seen when the pty closes)."""
    buf, deadline = b"", time.monotonic() + timeout
    while needle not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{needle!r} not seen on the terminal within {timeout}s: {buf!r}")
        if not select.select([fd], [], [], left)[0]:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:     # EIO: every slave descriptor is closed
            break
        if not chunk:
            break
        buf += chunk
    return buf


def _sleeping(sid: int) -> bool:
    """A ``sleep`` runs in the job's session (the moment ^C must hit)."""
    for pid in momproc.session_pids(sid):
        try:
            with open(f"/proc/{pid}/comm", "rb") as fh:
                if fh.read().strip() == b"sleep":
                    return True
        except OSError:
            pass
    return False


def _type(fd: int, text: bytes) -> None:
    os.write(fd, text)


def test_interactive_native_job_has_its_terminal(mom, daemon, alice):
    job = mom.submit(script("", image=None), alice.name, queue="native", interactive=True, shell="/bin/bash")
    tty = job.pty_master
    try:
        _type(tty, b"PS1='prompt> '; echo ready-$PBS_ENVIRONMENT\n")
        _read_until(tty, b"ready-PBS_INTERACTIVE")
        # Needles the shell computes, so the terminal's echo of what we typed never matches them.
        _type(tty, b"id -u; tty; echo ids-$((40+2))\n")
        out = _read_until(tty, b"ids-42")
        assert str(alice.uid).encode() in out, out
        assert b"/dev/pts/" in out, out            # stdin is the job's terminal, not a pipe
        # ^C reaches the foreground command through the terminal, and the shell survives it.
        _type(tty, b"sleep 100\n")
        assert wait_until(lambda: _sleeping(job.session_id), 30) is not None, "sleep never started"
        _type(tty, b"\x03")
        _type(tty, b"echo after-sleep-$?\n")
        _read_until(tty, b"after-sleep-130")
        assert not _sleeping(job.session_id)
        _type(tty, b"exit 7\n")
        r = job.wait(60)
    finally:
        os.close(tty)
    assert r.shell_status == 7, (r.shell_status, r.stderr)
    assert r.exit_status == 0          # pbs_mom's reader, the session leader, exits 0
    assert b"cbatch:" not in r.stderr


def test_interactive_command_x_runs_native(mom, daemon, alice):
    """``qsub -I -x cmd``: pbs_mom passes ``[starter, shell, -c, cmd]``."""
    job = mom.submit(script("", image=None), alice.name, queue="native", interactive=True, shell="/bin/bash",
                     interactive_cmd="echo via-x $PBS_ENVIRONMENT; exit 4")
    try:
        out = _read_until(job.pty_master, b"via-x PBS_INTERACTIVE")
        r = job.wait(60)
    finally:
        os.close(job.pty_master)
    assert r.shell_status == 4, (out, r.stderr)


def _sleep_100_as(uid: int) -> bool:
    """``sleep 100`` runs as ``uid`` somewhere on the host (the container's processes are host processes)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{pid}")
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read()
        except OSError:
            continue
        if st.st_uid == uid and cmd == b"sleep\x00100\x00":
            return True
    return False


def _set_size(fd: int, rows: int, cols: int) -> None:
    import fcntl
    import struct
    import termios
    # On the terminal side, as qsub does: the kernel sends SIGWINCH to the job's foreground process group.
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def test_interactive_job_in_the_queues_container(mom, daemon, alice):
    """A queue that runs only containers: the interactive shell runs in the queue's image, with the job's
    terminal: its own tty, ^C to the foreground command, resizing, the shell's exit status."""
    job = mom.submit(script("", image=None), alice.name, queue="strict", interactive=True, shell="/bin/bash")
    tty = job.pty_master
    try:
        _set_size(tty, 24, 80)
        _type(tty, b"echo ready-$PBS_ENVIRONMENT-$((6*7))\n")
        _read_until(tty, b"ready-PBS_INTERACTIVE-42")
        _type(tty, b"id -u; test -e /.cbatch/exec && echo inside-$((1+1)); tty; stty size\n")
        out = _read_until(tty, b"24 80")
        assert str(alice.uid).encode() in out and b"inside-2" in out and b"/dev/pts/" in out, out
        _set_size(tty, 33, 77)
        # The resize travels starter (SIGWINCH) -> daemon -> engine: ask until the container sees it.
        sizes = []
        for n in range(100):
            _type(tty, f"stty size; echo chk-$(({n}+1000))\n".encode())
            sizes.append(_read_until(tty, f"chk-{n + 1000}".encode()))
            if b"33 77" in sizes[-1]:
                break
        assert b"33 77" in sizes[-1], sizes[-3:]
        _type(tty, b"sleep 100\n")
        assert wait_until(lambda: _sleep_100_as(alice.uid), 30) is not None, "sleep never started"
        _type(tty, b"\x03")
        _type(tty, b"echo after-sleep-$?\n")
        _read_until(tty, b"after-sleep-130")
        assert not _sleep_100_as(alice.uid)
        _type(tty, b"exit 7\n")
        r = job.wait(60)
    finally:
        os.close(tty)
    assert r.shell_status == 7, (r.shell_status, r.stderr)
    assert b"cbatch:" not in r.stderr


def test_second_start_from_the_job_session_is_refused(mom, daemon, alice, tmp_path):
    """Another process of an interactive job's session cannot claim the start again."""
    job = mom.submit(script("", image=None), alice.name, queue="native", interactive=True, shell="/bin/bash")
    tty = job.pty_master
    try:
        _type(tty, b"echo started-$((40+2))\n")
        _read_until(tty, b"started-42")
        # The same starter, run again from inside the job's shell (its parent is the shell, not the leader).
        _type(tty, f"{mom.starter} /bin/bash; r=$?; echo \"second:\"$r\n".encode())
        out = _read_until(tty, b"second:125")
        _type(tty, b"exit 0\n")
        job.wait(60)
    finally:
        os.close(tty)
    assert b"cbatch: start:" in out, out


def test_an_interactive_container_job_keeps_its_terminal_across_a_daemon_restart(daemon_factory, mom_factory,
                                                                                  alice):
    """cbatchd restarted (an upgrade) under a user's `qsub -I` shell in a container: the starter reattaches and
    the new daemon proxies the terminal again, both ways (Docker keeps a terminal's stdin open when an
    attach ends). Before: the container was taken back without its terminal; what the user typed went
    nowhere and the shell printed nothing, until a qdel."""
    d = daemon_factory("ttyrestart")
    job = mom_factory(d).submit(script("", image=None), alice.name, queue="strict", interactive=True,
                                shell="/bin/bash")
    tty = job.pty_master
    try:
        _type(tty, b"echo before-$((20+1))\n")
        _read_until(tty, b"before-21")
        d.restart()
        assert wait_until(lambda: reattached(d, job.job_id), 60) is not None, d.log()[-3000:]
        _type(tty, b"echo after-$((40+2)); tty\n")
        out = _read_until(tty, b"/dev/pts/", 30)
        assert b"after-42" in out, out
        _type(tty, b"exit 7\n")
        r = job.wait(60)
    finally:
        os.close(tty)
    assert r.shell_status == 7, (r.shell_status, r.stderr)
    assert b"cbatch:" not in r.stderr, r.stderr
