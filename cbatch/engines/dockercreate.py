"""Create a Docker container from a spec and check it before it starts (mixed into
:class:`cbatch.engines.docker.Engine`, which provides ``api``, ``_call``, ``_fail`` and ``_links``).

Stdio. The job's output is the hot path, so it never passes through Python when it can avoid it: a regular
stdout/stderr file is bind-mounted at ``/.cbatch/stdout``/``/.cbatch/stderr`` and the static helper
``cbatch-exec`` (bind-mounted read-only at ``/.cbatch/exec``) opens it O_APPEND and dup2s it onto fd 1/2
before it execs the command. Only when the caller asks for ``attach`` (a terminal, a pipe) do the bytes go
through the engine's attach socket, demultiplexed by :func:`cbatch.daemon.streams.pump`. Docker's own log is
switched off (``log_config: none``) so output is never stored twice.

Entrypoint. The helper is always the container's entrypoint, so the stdio plumbing is the same for every
job. With ``spec.use_entrypoint`` the image's own Entrypoint (and its Cmd when ``spec.argv`` is empty) is
read from the image and placed after the helper's ``--``: the image's entrypoint still runs, as the job's
process, with the job's stdio — exactly ``docker run IMAGE ARGV`` semantics, plus cbatch's plumbing.

Identity. Nothing in the image may resolve an id: Docker and runc read the image's /etc/passwd and
/etc/group for ``user`` and ``group_add`` (a group_add entry is matched as a NAME first, so an image group
named ``1003`` with gid 0 becomes the job's). A job of a non-root user therefore starts as numeric ``0:0``
with every capability dropped but SETUID/SETGID/SETPCAP, no group_add, and the helper, as PID 1, sets the
host's exact numbers itself (``--ids``, :func:`helper_ids_args`) before it opens anything. Only then does
it exec the init (the engine's tini, bind-mounted at /.cbatch/init instead of Docker's ``--init``, so that no
process in the container ever runs as root), which starts the helper again for the stdio plumbing:
``exec --ids U:G:GS -- init -- exec --stdout ... -- CMD``.

Image paths. Mount targets are checked in the created container, before it starts, through the engine's
archive stat: a target whose path passes through a symlink in the image is refused (results cached per
image id). The image's VOLUMEs are each covered with a bounded tmpfs so no anonymous volume is created.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import docker
import docker.errors

from cbatch.core.errors import EngineError
from cbatch.core.spec import HELPER_PATH, INIT_PATH, LABEL_INSTANCE, STDERR_PATH, STDOUT_PATH, ContainerSpec
from cbatch.engines import imagecheck, layer
from cbatch.engines.base import Stdio
from cbatch.engines.identity import (helper_argv, IDS_CAPS, UNPRIV_PORT_SYSCTL, helper_ids_args,
                                     host_unprivileged_port_start, init_binary)

STDIN_LINE_MAX = 60 * 1024  # cbatch-exec writes the line into a pipe before exec: it must fit the buffer
VOLUME_TMPFS_BYTES = 64 * 1024 * 1024   # each image VOLUME becomes a tmpfs of at most this


class CreateOps:
    """Container creation and its checks, for the engine's ``start``."""

    def _create(self, spec: ContainerSpec, stdio: Stdio, instance: str, helper: str) -> Tuple[str, dict]:
        """Create (not start) the container; return ``(id, host config)``. Nothing is left behind on failure."""
        for path in (stdio.stdout_path, stdio.stderr_path):
            # A bind of a missing source would make Docker create a directory there; refuse instead.
            if path and not os.path.isfile(path):
                raise EngineError("output", "not a regular file", path)
        if not os.path.isfile(helper):
            raise EngineError("helper", "not found", helper, "make -C libexec install")
        labels = spec.label_dict()
        labels[LABEL_INSTANCE] = instance
        env = [f"{k}={v}" for k, v in spec.env_dict().items()]
        # tini (/.cbatch/init) then signals the job's whole process group, as pbs_mom signals the session.
        env.append("TINI_KILL_PROCESS_GROUP=1")
        # The image the daemon checked, by id: a name moved since (a tag, a pull) must not start another image
        # than the job's CBATCH_IMAGE_ID and the audit say, nor one whose VOLUMEs the inspect here never saw.
        ref = spec.image_id or spec.image
        image = self._call("inspect image", spec.image, self.api.inspect_image, ref)
        conf = image.get("Config") or {}
        # Numeric 0:0 so the engine resolves no name; the helper becomes the job's ids (--ids).
        user = "0:0" if spec.uid != 0 else f"{spec.uid}:{spec.gid}"
        host_config = self._host_config(spec, stdio, helper, conf)
        config = dict(
            image=ref, name=spec.name, entrypoint=self._command(spec, stdio, conf), command=None,
            user=user, working_dir=spec.workdir, environment=env, labels=labels,
            hostname=spec.hostname, host_config=host_config,
            # stdin_open with detach=False also sets StdinOnce: our stdin EOF closes the container's stdin.
            stdin_open=stdio.attach, tty=stdio.attach and stdio.tty, detach=not stdio.attach,
            use_config_proxy=False,     # the job's environment is the spec's, not ~/.docker/config.json's
        )
        try:
            cid = self.api.create_container(**config)["Id"]
        except docker.errors.ImageNotFound as exc:
            raise self._fail(exc, "create container", spec.image) from exc
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, "create container", spec.name) from exc
        return cid, host_config

    def _check_created(self, cid: str, spec: ContainerSpec, host_config: dict) -> None:
        """Before the start: bound the writable layer, refuse mount targets through the image's symlinks."""
        attrs = self._call("inspect", cid, self.api.inspect_container, cid)
        if spec.layer_bytes:
            self._bound_layer(attrs, spec.layer_bytes)
        # The image the container really has (a tag may have moved since the inspect above).
        self.check_targets(cid, attrs["Image"], [m["Target"] for m in host_config.get("Mounts") or []])

    def _command(self, spec: ContainerSpec, stdio: Stdio, conf: dict) -> List[str]:
        """The container's full command: the helper, its options, ``--``, then what it execs (``conf``: the
        checked image's ``Config``, for its entrypoint and cmd)."""
        argv = list(spec.argv)
        if spec.use_entrypoint:
            argv = list(conf.get("Entrypoint") or []) + (argv or list(conf.get("Cmd") or []))
        if not argv:
            raise EngineError("container", "no command", spec.image,
                              "the spec has no argv and the image no entrypoint or cmd")
        opts: List[str] = []
        if stdio.stdout_path:
            opts += ["--stdout", STDOUT_PATH]
        if stdio.stderr_path:
            opts += ["--stderr", STDERR_PATH]
        if spec.umask is not None:
            opts += ["--umask", "%04o" % spec.umask]
        if spec.stdin_line is not None:
            if len(spec.stdin_line.encode()) > STDIN_LINE_MAX:   # the helper would refuse it in the .e file
                raise EngineError("stdin line", "too long", f"{len(spec.stdin_line.encode())} bytes",
                                  f"at most {STDIN_LINE_MAX}")
            opts += ["--stdin-line", spec.stdin_line]
        command = helper_argv(opts, argv, spec.name)
        if spec.init:
            # tini then signals the job's whole process group (TINI_KILL_PROCESS_GROUP), as pbs_mom does.
            command = [INIT_PATH, "--"] + command
        if spec.uid != 0:
            # PID 1 is the helper, as root: it becomes the job's ids, then execs the init (or the job).
            command = [HELPER_PATH] + helper_ids_args(spec.uid, spec.gid, spec.groups) + ["--"] + command
        return command

    @staticmethod
    def _mounts(spec: ContainerSpec, stdio: Stdio, helper: str, conf: Optional[dict] = None) -> list:
        """Every mount of the container: the spec's binds, cbatch's plumbing, a tmpfs per image VOLUME."""
        bind = docker.types.Mount
        mounts = [bind(m.target, m.source, type="bind", read_only=m.read_only, propagation="rprivate")
                  for m in spec.mounts]
        mounts.append(bind(HELPER_PATH, helper, type="bind", read_only=True, propagation="rprivate"))
        if spec.init:
            mounts.append(bind(INIT_PATH, init_binary(), type="bind", read_only=True, propagation="rprivate"))
        for path, target in ((stdio.stdout_path, STDOUT_PATH), (stdio.stderr_path, STDERR_PATH)):
            if path:
                mounts.append(bind(target, path, type="bind", read_only=False, propagation="rprivate"))
        # An image VOLUME would be an anonymous volume: unbounded disk, on a path nobody checked. A
        # bounded tmpfs at the same target takes its place (the engine skips a VOLUME already mounted).
        taken = {m["Target"] for m in mounts}
        for vol in sorted((conf or {}).get("Volumes") or {}):
            target = os.path.normpath("/" + str(vol).lstrip("/"))
            inside = [t for t in taken if target.startswith(t.rstrip("/") + "/")]
            if inside and target not in taken:
                # Its mount point would be created by the engine, as root, inside a host directory.
                raise EngineError("image", "VOLUME inside a mounted host directory", target,
                                  f"{sorted(inside)[-1]} is mounted from the host; use an image without it")
            if target not in taken:
                mounts.append(bind(target, None, type="tmpfs", tmpfs_size=VOLUME_TMPFS_BYTES,
                                   tmpfs_mode=0o1777))
                taken.add(target)
        return mounts

    def _host_config(self, spec: ContainerSpec, stdio: Stdio, helper: str, conf: Optional[dict] = None) -> dict:
        drop_ids = spec.uid != 0
        caps = None
        if spec.cap_drop_all and drop_ids:
            caps = IDS_CAPS
        kw = dict(
            mounts=self._mounts(spec, stdio, helper, conf),
            network_mode=spec.network,
            read_only=spec.read_only_rootfs,
            # Never for a non-root job: the engine would resolve each entry in the image's /etc/group.
            group_add=None if drop_ids else ([str(g) for g in spec.groups] or None),
            cgroup_parent=spec.cgroup_parent or None,
            pids_limit=spec.pids_limit,
            cap_drop=["ALL"] if spec.cap_drop_all else None,
            cap_add=caps,
            security_opt=["no-new-privileges"] if spec.no_new_privileges else None,
            init=False,       # cbatch's own /.cbatch/init, started after the drop (see the module doc)
            shm_size=spec.shm_bytes,
            devices=list(spec.devices) or None,
            # No Docker log: output goes to the job's files (or the attach socket), never stored twice.
            log_config=docker.types.LogConfig(type="none"),
        )
        if spec.network != "host":
            # Docker opens every port to everyone in the container's net namespace (start = 0); batch
            # daemons trust ports < 1024, so the job keeps the host's rule.
            kw["sysctls"] = {UNPRIV_PORT_SYSCTL: str(host_unprivileged_port_start())}
        if spec.cpus:
            kw["nano_cpus"] = int(spec.cpus * 1e9)
        if spec.cpuset:
            kw["cpuset_cpus"] = spec.cpuset
        if spec.memory_bytes:
            # memswap == memory: no swap, so a job over its limit is OOM-killed rather than swapping.
            kw["mem_limit"] = spec.memory_bytes
            kw["memswap_limit"] = spec.memory_bytes
        return self.api.create_host_config(**{k: v for k, v in kw.items() if v is not None})

    @staticmethod
    def _bound_layer(attrs: dict, size: int) -> None:
        """Put the container's writable layer on a tmpfs of ``size`` bytes (see :mod:`cbatch.engines.layer`)."""
        ldir = layer.layer_dir(attrs)
        if ldir is None or not os.path.isdir(ldir):
            # Fail closed: a queue that asked for a bound never runs unbounded.
            raise EngineError("hardening", "cannot bound the writable layer",
                              (attrs.get("GraphDriver") or {}).get("Name"),
                              "needs a local overlay2 engine; or set hardening.layer_size: null")
        layer.bound(ldir, size)

    def stat(self, cid: str, path: str) -> Optional[dict]:
        """The engine's stat of ``path`` in container ``cid`` (last component not followed), None if absent."""
        return imagecheck.stat(self, cid, path)

    def check_targets(self, cid: str, image_id: str, targets: Sequence[str]) -> None:
        """Refuse any mount target passing through a symlink in the image (:func:`imagecheck.check_targets`)."""
        imagecheck.check_targets(self, cid, image_id, targets, self._links)
