"""The direct engine's seccomp filter compiled once: the OCI ``linux.seccomp`` section -> a classic-BPF program.

runc compiles the profile with libseccomp at every container start (~15 ms of libseccomp plus runc's own
pass, 40 ms of one start on this machine). The program depends only on the profile, so cbatchd compiles it
once, with the same shared libseccomp runc links (``libseccomp.so.2``, through ctypes), the same calls in the
same order as runc 1.1's ``InitSeccomp`` (libcontainer/seccomp/seccomp_linux.go): ``seccomp_init(default)``,
``seccomp_arch_add`` for each architecture, then for each syscall name a rule (skipped when its action is the
default one or libseccomp does not know the name; conditions on the same argument become one rule each,
otherwise one rule with all of them), then ``seccomp_export_bpf``. The container's first program,
``cbatch-filter`` (libexec/cbatch-filter.c), loads it with ``prctl(PR_SET_SECCOMP)`` as runc does.

runc 1.1.5 also prepends a 13-instruction "-ENOSYS stub" (patchbpf) because it compares ``defaultErrnoRet``
with ``SCMP_ACT_ERRNO(ENOSYS)`` instead of ENOSYS; with the profile's ``defaultErrnoRet: 38`` the program
below already answers ENOSYS to every call the stub would. tests/integration/test_seccomp_filter.py dumps the
filter runc installs and checks that it is this program after the stub, and that both decide alike.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import stat
from typing import List, Optional

from cbatch.core.errors import EngineError
from cbatch.engines import seccomp

LIBRARY = "libseccomp.so.2"
INSN_BYTES = 8
MAX_INSNS = 4096            # BPF_MAXINSNS: the kernel refuses a longer program
_ERRNO_DEFAULT = 1          # EPERM: an OCI errno action without errnoRet (runc's default)
_OPS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4, "SCMP_CMP_GE": 5,
        "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}
_SCMP_ERROR = -1            # __NR_SCMP_ERROR: a name libseccomp does not know
_EEXIST = 17


class _Cmp(ctypes.Structure):
    """``struct scmp_arg_cmp``."""
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def action(name: str, errno_ret=None) -> int:
    """The libseccomp action value of an OCI action name (``SCMP_ACT_ERRNO`` with ``errno_ret``)."""
    if name == "SCMP_ACT_ALLOW":
        return 0x7FFF0000
    if name == "SCMP_ACT_ERRNO":
        return 0x00050000 | ((_ERRNO_DEFAULT if errno_ret is None else int(errno_ret)) & 0xFFFF)
    if name in ("SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD"):
        return 0x00000000
    if name == "SCMP_ACT_KILL_PROCESS":
        return 0x80000000
    if name == "SCMP_ACT_TRAP":
        return 0x00030000
    if name == "SCMP_ACT_LOG":
        return 0x7FFC0000
    raise EngineError("seccomp", "action not supported by the direct engine", name,
                      "allow, errno, kill, kill_process, trap or log")


def rule_conditions(args: List[dict]) -> List[List[tuple]]:
    """The rules one OCI syscall entry becomes, as runc adds them: ``[(index, op, value, valueTwo), ...]``
    per rule. Conditions on distinct arguments are one rule (AND); when two name the same argument, runc
    adds each condition as a rule of its own (OR)."""
    conds = [(int(a["index"]), _OPS[a["op"]], int(a.get("value", 0)), int(a.get("valueTwo", 0))) for a in args]
    if not conds:
        return [[]]
    indexes = [c[0] for c in conds]
    if len(set(indexes)) < len(indexes):
        return [[c] for c in conds]
    return [conds]


@functools.lru_cache(maxsize=1)
def _lib():
    try:
        lib = ctypes.CDLL(LIBRARY, use_errno=True)
    except OSError as exc:
        raise EngineError("seccomp", "library not loadable", LIBRARY, "install libseccomp2 (runc needs it too)") from exc
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.restype = None
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_Cmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def compile_profile(section: dict) -> bytes:
    """The BPF program (8-byte ``struct sock_filter`` items) runc would build from OCI ``section``."""
    lib = _lib()
    default = action(section["defaultAction"], section.get("defaultErrnoRet"))
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise EngineError("seccomp", "libseccomp refused the default action", section["defaultAction"])
    try:
        for arch in section.get("architectures") or []:
            token = lib.seccomp_arch_resolve_name(arch[len("SCMP_ARCH_"):].lower().encode())
            rc = lib.seccomp_arch_add(ctx, token) if token else -22
            if rc not in (0, -_EEXIST):
                raise EngineError("seccomp", "architecture not supported", arch, f"libseccomp returned {rc}")
        for entry in section.get("syscalls") or []:
            act = action(entry["action"], entry.get("errnoRet"))
            if act == default:
                continue                # redundant: runc skips it too (libseccomp would refuse it)
            for name in entry.get("names") or []:
                nr = lib.seccomp_syscall_resolve_name(name.encode())
                if nr == _SCMP_ERROR:
                    continue            # not a call of this libseccomp: runc ignores it the same way
                for conds in rule_conditions(entry.get("args") or []):
                    arr = (_Cmp * len(conds))(*[_Cmp(*c) for c in conds]) if conds else None
                    rc = lib.seccomp_rule_add_array(ctx, act, nr, len(conds), arr)
                    if rc != 0:
                        raise EngineError("seccomp", "rule refused by libseccomp", name, f"returned {rc}")
        return _export(lib, ctx)
    finally:
        lib.seccomp_release(ctx)


def _export(lib, ctx) -> bytes:
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        # The pipe must hold the whole program before anyone reads it: 4096 insns = 32 KiB < 64 KiB.
        rc = lib.seccomp_export_bpf(ctx, w)
        os.close(w)
        w = -1
        chunks = []
        while True:
            data = os.read(r, 65536)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    program = b"".join(chunks)
    if rc != 0 or not program or len(program) % INSN_BYTES or len(program) > MAX_INSNS * INSN_BYTES:
        raise EngineError("seccomp", "libseccomp export failed", f"rc {rc}, {len(program)} bytes")
    return program


@functools.lru_cache(maxsize=4)
def _cached(key: str) -> bytes:
    return compile_profile(json.loads(key))


def program(section: dict) -> bytes:
    """:func:`compile_profile`, once per distinct section per daemon."""
    return _cached(json.dumps(section, sort_keys=True))


@functools.lru_cache(maxsize=1)
def default_program() -> bytes:
    """:func:`program` of the default profile (:func:`cbatch.engines.seccomp.oci_profile`, itself loaded once
    per daemon), remembered: a direct start (its availability check, its bundle) serializes nothing for it."""
    return program(seccomp.oci_profile())


LOADER = "cbatch-filter"    # next to the helper (daemon.helper), installed 0711 root:root
PROGRAM_FILE = "seccomp.bpf"


def loader_problem(path: str) -> Optional[str]:
    """Why the loader at ``path`` must not be used (None when it may): it has to be a root-owned regular
    file that root alone may write and nobody else may read (executing an unreadable file makes the new
    process non-dumpable, so no other process of the job's uid can ptrace it before its filter is in)."""
    try:
        st = os.stat(path)
    except OSError:
        return f"no {path} (make -C libexec install)"
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022 or not st.st_mode & 0o001:
        return f"{path} is not a root-owned executable only root may write"
    if st.st_mode & 0o044:
        return f"{path} is readable by users (install it mode 0711)"
    return None


def write_program(bundle: str, section: Optional[dict] = None) -> str:
    """Write the compiled ``section`` (default: :func:`default_program`) into ``bundle`` (root-owned, 0644, a
    new file); its path."""
    data = default_program() if section is None else program(section)
    path = os.path.join(bundle, PROGRAM_FILE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    with open(fd, "wb") as fh:
        fh.write(data)
    return path
