"""The ``runc run`` baseline: the bench image's root filesystem run by runc directly, no engine.

The bundle is made once per run: ``docker export`` of the image into ``rootfs`` and ``runc spec``'s
default config adjusted to match cbatch's containers: the job user's uid, gid and groups, ``/bin/sh
SCRIPT``, the script, passwd and group mounted read-only and the home read-write, no capabilities,
no-new-privileges, a new (empty) network namespace (the spec's default: ``--network none``), pids limit 256,
one CPU of quota. Differences, stated in the results: no init process (Docker's ``--init`` runs tini) and a
read-only root filesystem (runc has no overlay; Docker's layer is writable).

Each :meth:`Bundle.run` is ``runc run`` with a fresh container id, started through the stamping
interpreter (``#!benchtool stamp+exec:/usr/sbin/runc``), so the interval measured is the same as for the
other modes: from the launcher's exec to the script's first instruction.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Tuple

from bench import IMAGE, TOOL
from bench.env import run
from bench.jobs import stamps

RUNC = shutil.which("runc") or "/usr/sbin/runc"


class Bundle:
    """A runc bundle for the bench image under ``workdir``, running jobs as ``user`` (a pwd entry)."""

    def __init__(self, workdir: Path, user, script: bytes):
        self.dir = workdir / "runc"
        self.ids = itertools.count(1)
        shutil.rmtree(self.dir, ignore_errors=True)
        rootfs = self.dir / "rootfs"
        rootfs.mkdir(parents=True)
        cid = run(["docker", "create", IMAGE, "/bin/true"]).stdout.strip()
        try:
            export = subprocess.Popen(["docker", "export", cid], stdout=subprocess.PIPE)
            subprocess.run(["tar", "-x", "-C", str(rootfs)], stdin=export.stdout, check=True)
            export.stdout.close()
            if export.wait() != 0:
                raise RuntimeError(f"docker export {cid} failed")
        finally:
            run(["docker", "rm", "-f", cid])
        self.script = self.dir / "job.sh"
        self.script.write_bytes(script)
        os.chown(self.script, user.pw_uid, user.pw_gid)
        os.chmod(self.script, 0o700)
        self.launcher = self.dir / "launch"
        self.launcher.write_text(f"#!{TOOL} stamp+exec:{RUNC}\n")
        os.chmod(self.launcher, 0o755)
        run([RUNC, "spec", "--bundle", str(self.dir)])
        cfg_path = self.dir / "config.json"
        cfg = json.loads(cfg_path.read_text())
        groups = sorted(set(os.getgrouplist(user.pw_name, user.pw_gid)) - {user.pw_gid})
        proc = cfg["process"]
        proc.update(terminal=False, args=["/bin/sh", str(self.script)], cwd=user.pw_dir,
                    user={"uid": user.pw_uid, "gid": user.pw_gid, "additionalGids": groups},
                    env=["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                         f"HOME={user.pw_dir}", f"USER={user.pw_name}"],
                    noNewPrivileges=True)
        proc["capabilities"] = {k: [] for k in ("bounding", "effective", "permitted", "ambient")}
        for src, ro in ((str(self.script), True), ("/etc/passwd", True), ("/etc/group", True),
                        (user.pw_dir, False)):
            cfg["mounts"].append({"destination": src, "type": "bind", "source": src,
                                  "options": ["rbind", "rprivate", "ro" if ro else "rw"]})
        cfg["linux"]["resources"]["pids"] = {"limit": 256}
        cfg["linux"]["resources"]["cpu"] = {"quota": 100000, "period": 100000}
        cfg_path.write_text(json.dumps(cfg, indent=1))

    def run(self) -> Tuple[float, bytes]:
        """One ``runc run`` of the script; returns (launcher exec -> first instruction in s, its stdout)."""
        cid = f"cbatch-bench-{os.getpid()}-{next(self.ids)}"
        proc = subprocess.run([str(self.launcher), "run", "--bundle", str(self.dir), cid],
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
        if proc.returncode != 0:
            subprocess.run([RUNC, "delete", "--force", cid], capture_output=True)
            raise RuntimeError(f"runc run exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
        t = stamps(proc.stdout)
        return t[1] - t[0], proc.stdout

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
