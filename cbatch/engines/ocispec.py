"""ContainerSpec -> OCI ``config.json`` for the direct engine (runc), equivalent to what Docker makes of it.

Identity is numeric only (uid, gid, additional gids: nothing is resolved against the image's files), no
capability at all, ``noNewPrivileges``, Docker's default seccomp profile (:mod:`cbatch.engines.seccomp`),
Docker's masked and read-only paths, the job's umask and the client's own rlimits, the pinned mounts,
hostname, ``/etc/hosts`` / ``/etc/resolv.conf`` / ``/etc/hostname`` files of the container's own, a bounded
tmpfs for each image VOLUME, the engine's tini as init (``TINI_KILL_PROCESS_GROUP``: qdel reaches the whole
process group), ``cgroupsPath`` under the job's cgroup, cpu/memory/pids limits, and network ``none`` (a new
network namespace; runc brings its ``lo`` up). Pure: the caller writes the files.
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

from cbatch.core.errors import EngineError
from cbatch.core.spec import FILTER_PATH, HELPER_PATH, INIT_PATH, SECCOMP_PATH, ContainerSpec
from cbatch.engines.identity import helper_argv

OCI_VERSION = "1.0.2"
VOLUME_TMPFS_BYTES = 64 * 1024 * 1024   # as the Docker engine: each image VOLUME is a tmpfs of at most this
SHM_BYTES = 64 * 1024 * 1024            # Docker's default /dev/shm
CPU_PERIOD = 100000
# Docker's defaults (moby oci/defaults.go).
MASKED_PATHS = ("/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
                "/sys/devices/virtual/powercap")
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
ETC_FILES = ("hosts", "resolv.conf", "hostname")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The client's own limits the container process keeps (pbs_mom's, as a native job would have them). Memory
# limits (RLIMIT_DATA/AS) are the cgroup's business, as with the Docker engine.
RLIMITS = ("RLIMIT_NOFILE", "RLIMIT_CORE", "RLIMIT_STACK", "RLIMIT_FSIZE", "RLIMIT_CPU", "RLIMIT_MEMLOCK")


def filtered(argv: List[str]) -> List[str]:
    """``argv`` started through the seccomp loader: the one place a direct container process (the job's
    init, a TM task) gets its filter, before anything of the job runs."""
    return [FILTER_PATH, SECCOMP_PATH, "--"] + list(argv)


def command(spec: ContainerSpec, image_config: dict) -> List[str]:
    """The container's process args: the seccomp loader, the init (when the spec asks), then the helper
    (``cbatch-exec``, as the job's user: no ``--ids``, runc set them; it feeds the stdin line and falls back
    to the image's /bin/sh when the login shell is missing, exactly as in the Docker engine), then the job's
    command."""
    argv = list(spec.argv)
    if spec.use_entrypoint:
        argv = list(image_config.get("Entrypoint") or []) + (argv or list(image_config.get("Cmd") or []))
    if not argv:
        raise EngineError("container", "no command", spec.image,
                          "the spec has no argv and the image no entrypoint or cmd")
    opts = ["--stdin-line", spec.stdin_line] if spec.stdin_line is not None else []
    argv = helper_argv(opts, argv, spec.name)
    return filtered([INIT_PATH, "--"] + argv if spec.init else argv)


def environment(spec: ContainerSpec, image_config: dict) -> List[str]:
    """The image's environment under the spec's (as the engine merges them), plus HOSTNAME and tini's
    process-group switch."""
    env: Dict[str, str] = {}
    for item in image_config.get("Env") or []:
        key, _eq, value = str(item).partition("=")
        env[key] = value
    env.setdefault("PATH", DEFAULT_PATH)
    env["HOSTNAME"] = spec.hostname or ""
    env.update(spec.env_dict())
    if spec.init:
        env["TINI_KILL_PROCESS_GROUP"] = "1"
    return [f"{k}={v}" for k, v in env.items()]


def etc_files(hostname: str, resolv_conf: str) -> Dict[str, str]:
    """Contents of the container's own /etc/hosts, /etc/resolv.conf and /etc/hostname (network none)."""
    hosts = ("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
             "fe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n")
    if hostname:
        hosts += f"127.0.1.1\t{hostname}\n"
    return {"hosts": hosts, "resolv.conf": resolv_conf, "hostname": (hostname or "localhost") + "\n"}


def _bind(source: str, target: str, read_only: bool) -> dict:
    return {"destination": target, "type": "bind", "source": source,
            "options": ["rbind", "rprivate", "nosuid"] + (["ro"] if read_only else [])}


def mounts(spec: ContainerSpec, image_config: dict, init: str, etc_dir: str, helper: str,
           seccomp: Tuple[str, str]) -> List[dict]:
    """Kernel filesystems as Docker mounts them, the spec's binds, the helper, the seccomp loader and its
    program (``seccomp``: their host paths), the init, /etc files, VOLUME tmpfs."""
    shm = spec.shm_bytes or SHM_BYTES
    out = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["ro", "nosuid", "noexec", "nodev"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", f"size={shm}"]},
    ]
    taken = {m["destination"] for m in out}
    for name in ETC_FILES:
        target = "/etc/" + name
        if not any(m.target == target for m in spec.mounts):
            out.append(_bind(os.path.join(etc_dir, name), target, True))
            taken.add(target)
    for m in spec.mounts:
        out.append(_bind(m.source, m.target, m.read_only))
        taken.add(m.target)
    out.append(_bind(helper, HELPER_PATH, True))
    out.append(_bind(seccomp[0], FILTER_PATH, True))
    out.append(_bind(seccomp[1], SECCOMP_PATH, True))
    taken.update((HELPER_PATH, FILTER_PATH, SECCOMP_PATH))
    if spec.init:
        out.append(_bind(init, INIT_PATH, True))
        taken.add(INIT_PATH)
    for vol in sorted(image_config.get("Volumes") or {}):
        target = os.path.normpath("/" + str(vol).lstrip("/"))
        inside = [t for t in taken if target.startswith(t.rstrip("/") + "/") and t != "/"]
        host_inside = [t for t in inside if any(m.target == t for m in spec.mounts)]
        if host_inside and target not in taken:
            raise EngineError("image", "VOLUME inside a mounted host directory", target,
                              f"{sorted(host_inside)[-1]} is mounted from the host; use an image without it")
        if target not in taken:
            out.append({"destination": target, "type": "tmpfs", "source": "tmpfs",
                        "options": ["nosuid", "nodev", "mode=1777", f"size={VOLUME_TMPFS_BYTES}"]})
            taken.add(target)
    return out


def resources(spec: ContainerSpec) -> dict:
    """cpu, memory (no swap beyond it) and pids limits, as the Docker engine sets them."""
    res: dict = {"devices": [{"allow": False, "access": "rwm"}]}
    if spec.memory_bytes:
        res["memory"] = {"limit": spec.memory_bytes, "swap": spec.memory_bytes}
    cpu: dict = {}
    if spec.cpus:
        cpu.update(quota=int(spec.cpus * CPU_PERIOD), period=CPU_PERIOD)
    if spec.cpuset:
        cpu["cpus"] = spec.cpuset
    if cpu:
        res["cpu"] = cpu
    if spec.pids_limit:
        res["pids"] = {"limit": spec.pids_limit}
    return res


def config(spec: ContainerSpec, image_config: dict, *, init: str, helper: str, etc_dir: str, cgroups_path: str,
           seccomp: Tuple[str, str], rlimits: Sequence[Tuple[str, int, int]] = (),
           port_start: int = 1024) -> dict:
    """The whole ``config.json`` (rootfs at ``rootfs`` next to it); ``seccomp`` is the host paths of the
    loader (``cbatch-filter``) and of the compiled program it loads."""
    if spec.network != "none":
        raise EngineError("direct engine", "network not supported", spec.network, "use engine: docker")
    if spec.devices:
        raise EngineError("direct engine", "devices not supported", ",".join(spec.devices), "use engine: docker")
    user: dict = {"uid": spec.uid, "gid": spec.gid, "additionalGids": list(spec.groups)}
    if spec.umask is not None:
        user["umask"] = spec.umask
    process = {
        "terminal": False, "user": user, "args": command(spec, image_config),
        "env": environment(spec, image_config), "cwd": spec.workdir or "/",
        "capabilities": {"bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": []},
        "rlimits": [{"type": t, "soft": soft, "hard": hard} for t, soft, hard in rlimits],
        "noNewPrivileges": bool(spec.no_new_privileges),
    }
    linux: dict = {
        "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
        "cgroupsPath": cgroups_path,
        "resources": resources(spec),
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
        "sysctl": {"net.ipv4.ip_unprivileged_port_start": str(port_start)},
        "rootfsPropagation": "private",
    }
    return {"ociVersion": OCI_VERSION, "process": process,
            "root": {"path": "rootfs", "readonly": bool(spec.read_only_rootfs)},
            "hostname": spec.hostname or "", "mounts": mounts(spec, image_config, init, etc_dir, helper, seccomp),
            "linux": linux}
