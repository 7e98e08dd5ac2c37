"""The direct engine's seccomp filter: containers-common's profile (Docker's default, as Debian ships it in
``golang-github-containers-common``) turned into the OCI ``linux.seccomp`` section the way Docker applies it.

containers-common's copy allows some calls unconditionally that Docker's own profile gives only to holders of
a capability (``mount``, ``unshare``, ``setns``, namespace flags of ``clone``, ...): a job without
CAP_SYS_ADMIN could still create a user namespace and mount inside it. :data:`DOCKER_GATED` re-applies
Docker's conditions: those calls are dropped from the allow rules, ``clone`` is allowed without namespace
flags only and ``clone3`` answers ENOSYS (the C library then falls back to ``clone``), as in Docker.

Docker's profile format carries conditions OCI does not have: a rule may apply only with some capabilities
(``includes.caps``), only without them (``excludes.caps``), on some architectures or from a kernel version
on. Docker evaluates them at container creation; so does :func:`oci_profile`, for a job that has no
capability at all (the direct engine never grants one). Loaded once per daemon (cached).
"""

from __future__ import annotations

import functools
import json
import os
import platform
from typing import FrozenSet, Optional

from cbatch.core.errors import EngineError

PROFILE = "/usr/share/containers/seccomp.json"
# Docker's names for the machine's architecture, as the profile's "arches" conditions use them.
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64le", "s390x": "s390x", "armv7l": "arm"}
_NATIVE = {"amd64": "SCMP_ARCH_X86_64", "arm64": "SCMP_ARCH_AARCH64", "ppc64le": "SCMP_ARCH_PPC64LE",
           "s390x": "SCMP_ARCH_S390X", "arm": "SCMP_ARCH_ARM"}


# Calls Docker's default profile allows only with a capability (moby profiles/seccomp/default.json).
DOCKER_GATED = {
    "CAP_SYS_ADMIN": ("clone", "clone3", "fsconfig", "fsmount", "fsopen", "fspick", "mount", "mount_setattr",
                      "move_mount", "name_to_handle_at", "open_tree", "pivot_root", "setns", "umount", "umount2",
                      "unshare", "bpf", "fanotify_init", "lookup_dcookie", "perf_event_open", "quotactl",
                      "quotactl_fd", "setdomainname", "sethostname"),
    "CAP_SYSLOG": ("syslog",),
    "CAP_SYS_BOOT": ("reboot",),
    "CAP_SYS_NICE": ("get_mempolicy", "mbind", "set_mempolicy"),
    "CAP_SYS_PTRACE": ("pidfd_getfd", "kcmp", "process_madvise"),
}
_NS_FLAGS = 0x7E020000      # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET


def _docker_rules(arch: str) -> list:
    index = 1 if arch in ("s390", "s390x") else 0       # clone's flags argument (as Docker)
    return [{"names": ["clone"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": index, "value": _NS_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]


def _kernel() -> tuple:
    parts = []
    for p in platform.release().split("-")[0].split(".")[:2]:
        parts.append(int("".join(ch for ch in p if ch.isdigit()) or 0))
    return tuple(parts)


def _applies(rule: dict, caps: FrozenSet[str], arch: str, kernel: tuple) -> bool:
    inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
    if inc.get("caps") and not set(inc["caps"]) <= caps:
        return False
    if inc.get("arches") and arch not in inc["arches"]:
        return False
    if inc.get("minKernel"):
        want = tuple(int(x) for x in str(inc["minKernel"]).split(".")[:2])
        if kernel < want:
            return False
    if exc.get("caps") and set(exc["caps"]) & caps:
        return False
    if exc.get("arches") and arch in exc["arches"]:
        return False
    return True


def x32_abi(configs=None) -> bool:
    """Whether this kernel can run x32 binaries (CONFIG_X86_X32_ABI). True unless the kernel's own config
    (/proc/config.gz, /boot/config-<release>) says it is not set: when unknown, keep filtering x32."""
    import gzip
    release = platform.release()
    for path in configs or ("/proc/config.gz", f"/boot/config-{release}"):
        try:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt") as fh:
                text = fh.read()
        except (OSError, EOFError):
            continue
        return "CONFIG_X86_X32_ABI=y" in text
    return True


def convert(profile: dict, caps: FrozenSet[str] = frozenset(), arch: Optional[str] = None,
            kernel: Optional[tuple] = None, x32: bool = True) -> dict:
    """Docker-format ``profile`` -> OCI ``linux.seccomp`` for a process with ``caps`` on ``arch``.

    ``x32=False`` (a kernel without the x32 ABI) leaves SCMP_ARCH_X32 out: no x32 call can run there anyway
    (the kernel answers ENOSYS; the filter now kills the caller instead), and each architecture in the list
    costs runc a libseccomp pass at every start (~7 ms of ~60 here; measured in bench/results.md)."""
    arch = arch or _GOARCH.get(platform.machine(), platform.machine())
    kernel = kernel if kernel is not None else _kernel()
    native = _NATIVE.get(arch)
    arches = []
    for entry in profile.get("archMap") or []:
        if entry.get("architecture") == native:
            arches = [native] + [a for a in entry.get("subArchitectures") or [] if x32 or a != "SCMP_ARCH_X32"]
    out = {"defaultAction": profile["defaultAction"], "architectures": arches, "syscalls": []}
    if profile.get("defaultErrnoRet") is not None:
        out["defaultErrnoRet"] = int(profile["defaultErrnoRet"])
    gated = {n for cap, names in DOCKER_GATED.items() if cap not in caps for n in names}
    for rule in profile.get("syscalls") or []:
        if not _applies(rule, caps, arch, kernel):
            continue
        names = list(rule.get("names") or [rule.get("name")])
        if rule["action"] == "SCMP_ACT_ALLOW":
            names = [n for n in names if n not in gated]
            if not names:
                continue
        item = {"names": names, "action": rule["action"]}
        if rule.get("args"):
            item["args"] = [{k: a[k] for k in ("index", "value", "valueTwo", "op") if k in a}
                            for a in rule["args"]]
        if rule.get("errnoRet") is not None:
            item["errnoRet"] = int(rule["errnoRet"])
        out["syscalls"].append(item)
    if "CAP_SYS_ADMIN" not in caps:
        out["syscalls"] += _docker_rules(arch)
    return out


@functools.lru_cache(maxsize=4)
def oci_profile(path: str = PROFILE) -> dict:
    """The OCI seccomp section for a capability-less job (EngineError when the profile is missing)."""
    try:
        with open(path, "rb") as fh:
            profile = json.load(fh)
    except (OSError, ValueError) as exc:
        raise EngineError("seccomp", "profile not readable", path,
                          "install golang-github-containers-common (the direct engine's default profile)") from exc
    return convert(profile, x32=x32_abi())


def available(path: str = PROFILE) -> bool:
    """True when the profile file exists (the router falls back to Docker without it)."""
    return os.path.isfile(path)
