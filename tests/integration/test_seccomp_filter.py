"""The direct engine's seccomp filter, compiled once by cbatchd and loaded by ``cbatch-filter``
(cbatch/engines/seccompbpf.py, libexec/cbatch-filter.c) instead of being compiled by runc at every start.

- Same filter: runc, given the same OCI section, installs exactly this program after its 13-instruction
  -ENOSYS stub (dumped from a running runc container with PTRACE_SECCOMP_GET_FILTER), and both programs
  decide every system call alike (evaluated by tests/integration/bpf_eval.py over all numbers, both x86 ABIs,
  the x32 bit and the argument-conditioned rules).
- The loader's window: a process of the job's uid cannot reach into the loader before its filter is in (it is
  non-dumpable from its exec on, because the installed binary is mode 0711); a readable copy would be open.
- The loader fails closed, in one line and before anything runs: a filter file the user owns, a FIFO in its
  place (refused without blocking), a program the kernel refuses.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import bpf_eval
import image_builder
from cbatch.engines import seccomp, seccompbpf

pytestmark = [pytest.mark.root]
RUNC = shutil.which("runc") or "/usr/sbin/runc"
PTRACE_ATTACH, PTRACE_DETACH, PTRACE_SECCOMP_GET_FILTER = 16, 17, 0x420C


def _dump_filter(pid: int) -> bytes:
    """The first seccomp program of ``pid`` as the kernel holds it (root, CONFIG_CHECKPOINT_RESTORE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    libc.ptrace.restype = ctypes.c_long
    assert libc.ptrace(PTRACE_ATTACH, pid, None, None) == 0, os.strerror(ctypes.get_errno())
    try:
        os.waitpid(pid, 0)      # __WALL is not needed: the container's init is not our child's thread
        n = libc.ptrace(PTRACE_SECCOMP_GET_FILTER, pid, ctypes.c_void_p(0), None)
        assert n > 0, os.strerror(ctypes.get_errno())
        buf = ctypes.create_string_buffer(n * 8)
        assert libc.ptrace(PTRACE_SECCOMP_GET_FILTER, pid, ctypes.c_void_p(0), buf) == n
        return buf.raw
    finally:
        libc.ptrace(PTRACE_DETACH, pid, None, None)


@pytest.fixture(scope="module")
def section():
    if not seccomp.available():
        pytest.fail(f"no {seccomp.PROFILE}: install golang-github-containers-common (scripts/setup does)")
    return seccomp.oci_profile()


@pytest.fixture(scope="module")
def runc_program(section, tmp_path_factory):
    """The program runc itself installs for ``section`` (a busybox container running sleep)."""
    bundle = tmp_path_factory.mktemp("runc-seccomp")
    image_builder.busybox_rootfs(bundle / "rootfs")
    subprocess.run([RUNC, "spec", "--bundle", str(bundle)], check=True)
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["process"].update(terminal=False, args=["/bin/sleep", "300"], noNewPrivileges=True)
    cfg["linux"]["seccomp"] = section
    (bundle / "config.json").write_text(json.dumps(cfg))
    cid = f"cbatch-test-seccomp-{os.getpid()}"
    root = str(bundle / "state")
    with open(bundle / "runc.err", "w+b") as err:    # not a pipe: the container keeps its stdio open
        run = subprocess.run([RUNC, "--root", root, "run", "--detach", "--bundle", str(bundle), cid],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        err.seek(0)
        assert run.returncode == 0, err.read()
    try:
        state = json.loads(subprocess.run([RUNC, "--root", root, "state", cid], check=True,
                                          capture_output=True).stdout)
        return _dump_filter(state["pid"])
    finally:
        subprocess.run([RUNC, "--root", root, "delete", "--force", cid], capture_output=True)


def _inputs():
    """System calls to decide: every number of both ABIs (and beyond the tables), the x32 bit, and the
    argument-conditioned rules with values on both sides of their conditions."""
    clone_flags = [0, 0x01200011, 0x10000000, 0x20000000, 0x40000000, 0x7E020000, 0x00020000]
    personality = [0, 8, 0x20000, 0x20008, 0xFFFFFFFF, 0x400000]
    sockets = [1, 2, 10, 16, 40]
    for arch in (bpf_eval.AUDIT_ARCH_X86_64, bpf_eval.AUDIT_ARCH_I386):
        for nr in list(range(0, 600)) + [1000, 4095, 0xFFFF, 0x7FFFFFFF]:
            yield arch, nr, ()
            for v in clone_flags + personality + sockets:
                if nr in (56, 120, 135, 136, 41, 102, 359):       # clone, personality, socket(-call)
                    yield arch, nr, (v,)
        for nr in (0, 39, 56, 101, 322, 512, 547):
            yield arch, nr | bpf_eval.X32_BIT, ()
    yield 0x12345678, 0, ()                                       # an architecture in neither list


def test_runc_installs_this_program_after_its_enosys_stub(section, runc_program):
    ours = seccompbpf.compile_profile(section)
    assert runc_program.endswith(ours), "runc's filter is not ours after a prefix"
    stub = bpf_eval.parse(runc_program[:len(runc_program) - len(ours)])
    assert 0 < len(stub) <= 32
    assert {k for code, _jt, _jf, k in stub if code == 0x06} == {bpf_eval.RET_ENOSYS}   # it only says ENOSYS
    theirs_i, ours_i = bpf_eval.parse(runc_program), bpf_eval.parse(ours)
    decided = 0
    for arch, nr, args in _inputs():
        blob = bpf_eval.data(arch, nr, args)
        assert bpf_eval.run(theirs_i, blob) == bpf_eval.run(ours_i, blob), (hex(arch), nr, args)
        decided += 1
    assert decided > 1400           # every number of both ABIs, and the conditioned calls
    # The program is the profile: allow read, refuse namespaced clone with the profile's errno, kill x32.
    x86_64 = bpf_eval.AUDIT_ARCH_X86_64
    assert bpf_eval.run(ours_i, bpf_eval.data(x86_64, 0)) == 0x7FFF0000
    assert bpf_eval.run(ours_i, bpf_eval.data(x86_64, 56, (0x10000000,))) == bpf_eval.RET_ENOSYS
    assert bpf_eval.run(ours_i, bpf_eval.data(x86_64, 56, (0x01200011,))) == 0x7FFF0000


def test_compiled_once_per_daemon(section):
    assert seccompbpf.program(section) is seccompbpf.program(json.loads(json.dumps(section)))
    # What a direct start uses (its availability check and its bundle): the same program, remembered.
    assert seccompbpf.default_program() is seccompbpf.default_program() is seccompbpf.program(section)
    assert seccompbpf.default_program() == seccompbpf.compile_profile(section)


@pytest.fixture
def loader(helper):
    path = os.path.join(os.path.dirname(helper), seccompbpf.LOADER)
    assert seccompbpf.loader_problem(path) is None, seccompbpf.loader_problem(path)
    return path


@pytest.fixture
def shared_dir():
    """A root-owned directory every test user may enter (the loader runs as them)."""
    d = tempfile.mkdtemp(prefix="cbatch-seccomp-")
    os.chmod(d, 0o755)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def _as(user, argv, **kw):
    return subprocess.run(argv, user=user.uid, group=user.gid, extra_groups=[], capture_output=True,
                          timeout=60, **kw)


def test_loader_installs_the_filter_then_runs_the_command(loader, section, shared_dir, alice):
    prog = Path(seccompbpf.write_program(str(shared_dir), section))
    r = _as(alice, [loader, str(prog), "--", "/bin/grep", "-E", "^(Seccomp|Seccomp_filters|NoNewPrivs):",
                    "/proc/self/status"])
    assert r.returncode == 0, r.stderr
    lines = [" ".join(l.split()) for l in r.stdout.decode().splitlines()]
    assert lines == ["NoNewPrivs: 1", "Seccomp: 2", "Seccomp_filters: 1"], lines


@pytest.mark.parametrize("attack", ["user_owned", "fifo", "garbage", "empty", "symlink"])
def test_loader_fails_closed(loader, section, shared_dir, alice, attack):
    prog = shared_dir / "prog"
    marker = shared_dir / "ran"
    if attack == "user_owned":
        prog.write_bytes(seccompbpf.program(section))
        os.chown(prog, alice.uid, alice.gid)
    elif attack == "fifo":
        os.mkfifo(prog, 0o644)          # nobody writes it: a blocking open would hang the job here
    elif attack == "garbage":
        prog.write_bytes(b"\xff\xff\x00\x00\x00\x00\x00\x00" * 4)
    elif attack == "empty":
        prog.write_bytes(b"")
    else:
        (shared_dir / "real").write_bytes(seccompbpf.program(section))
        prog.symlink_to(shared_dir / "real")
    r = _as(alice, [loader, str(prog), "--", "/usr/bin/touch", str(marker)])
    err = r.stderr.decode()
    assert r.returncode == 125 and err.startswith("cbatch: seccomp filter: ") and err.count("\n") == 1, err
    assert not marker.exists()


READABLE_TRACE = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
uid, gid, loader, prog = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
pid = os.fork()
if pid == 0:
    libc.ptrace(0, 0, None, None)               # PTRACE_TRACEME: stop at the exec, before its first instruction
    os.setgroups([]); os.setgid(gid); os.setuid(uid)
    os.execv(loader, [loader, prog, "--", "/bin/true"])
_pid, status = os.waitpid(pid, 0)
print(pid, os.WIFSTOPPED(status), flush=True)
sys.stdin.readline()                             # the test probes the stopped loader now
os.kill(pid, 9)
os.waitpid(pid, 0)
"""


@pytest.mark.parametrize("mode", [0o711, 0o755])
def test_no_process_of_the_job_user_can_reach_into_the_loader_before_its_filter(loader, section, shared_dir,
                                                                                  alice, mode):
    copy = shared_dir / "cbatch-filter"
    shutil.copy(loader, copy)
    os.chmod(copy, mode)
    prog = seccompbpf.write_program(str(shared_dir), section)
    holder = subprocess.Popen([sys.executable, "-c", READABLE_TRACE, str(alice.uid), str(alice.gid), str(copy),
                               prog], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pid, stopped = holder.stdout.readline().split()
        assert stopped == "True"      # the moment: the loader is exec'd and has not run one instruction
        with open(f"/proc/{pid}/status") as fh:
            assert f"Uid:\t{alice.uid}" in fh.read()
        probe = _as(alice, [sys.executable, "-c", f"open('/proc/{pid}/mem', 'rb')"])
        if mode == 0o711:
            assert probe.returncode != 0 and b"PermissionError" in probe.stderr, probe.stderr
        else:   # the same attack on a readable copy gets in: what the 0711 mode (and loader_problem) is for
            assert probe.returncode == 0, probe.stderr
    finally:
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(30)
    assert seccompbpf.loader_problem(str(copy)) == (None if mode == 0o711 else
                                                    f"{copy} is readable by users (install it mode 0711)")
