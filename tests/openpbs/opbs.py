"""Helpers for the real-OpenPBS tests: submit with the real qsub as a real user, read ``qstat -xf -F json``,
wait for the job to finish and read the delivered .o/.e files."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

from trq import wait_until

PREFIX = "/opt/pbs"
PBS_HOME = "/var/spool/pbs"
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
_count = itertools.count(1)


@dataclass
class Done:
    """A finished job: its qstat attributes and delivered output."""

    job_id: str
    attrs: Dict
    stdout: bytes
    stderr: bytes

    @property
    def exit_status(self) -> int:
        return int(self.attrs["Exit_status"])


class Pbs:
    """The OpenPBS in PREFIX, up (scripts/openpbs-up)."""

    def bin(self, name: str) -> str:
        return os.path.join(PREFIX, "bin", name)

    def env_for(self, user) -> Dict[str, str]:
        """A login-like environment for PBS's clients as ``user`` (PBS's bin first: see the kit's PATH trap)."""
        return {"PATH": f"{PREFIX}/bin:/usr/bin:/bin", "HOME": user.home, "USER": user.name,
                "LOGNAME": user.name, "LANG": "C.UTF-8", "SHELL": user.shell}

    def workdir(self, user) -> Path:
        """A fresh directory under /var/tmp owned by ``user`` (removed by :meth:`cleanup`)."""
        path = Path(f"/var/tmp/cbt-pbs-{os.getpid()}-{next(_count)}")
        path.mkdir(mode=0o755)
        os.chown(path, user.uid, user.gid)
        return path

    def qsub_raw(self, user, body: Optional[str], args: Sequence[str], workdir: Path,
                 name: str = "job.sh", timeout: float = 60) -> subprocess.CompletedProcess:
        """The real qsub as ``user`` in ``workdir`` on a script with ``body`` (None: ``args`` say it all,
        e.g. ``-- /bin/prog``)."""
        argv = [RUNUSER, "-u", user.name, "--", self.bin("qsub"), *args]
        if body is not None:
            path = workdir / name
            path.write_bytes(body.encode())
            os.chown(path, user.uid, user.gid)
            argv.insert(argv.index(self.bin("qsub")) + 1 + len(args), str(path))
        return subprocess.run(argv, cwd=str(workdir), env=self.env_for(user), capture_output=True,
                              timeout=timeout)

    def qsub(self, user, body: Optional[str], args: Sequence[str], workdir: Path, name: str = "job.sh") -> str:
        """Submit; the job id (asserts qsub succeeded)."""
        r = self.qsub_raw(user, body, args, workdir, name)
        assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
        return r.stdout.decode().strip()

    def qstat(self, job_id: str) -> Dict:
        """``qstat -xf -F json JOBID``: the job's attributes (empty when unknown)."""
        r = subprocess.run([self.bin("qstat"), "-xf", "-F", "json", job_id], capture_output=True, timeout=30)
        if r.returncode != 0:
            return {}
        try:
            jobs = json.loads(r.stdout.decode("utf-8", "replace")).get("Jobs") or {}
        except ValueError:
            return {}
        return next(iter(jobs.values()), {})

    def wait_state(self, job_id: str, states: str, timeout: float = 120) -> Dict:
        attrs = wait_until(lambda: (lambda a: a if a.get("job_state", "") in states else None)(self.qstat(job_id)),
                           timeout)
        assert attrs, f"{job_id} not in {states} after {timeout}s: {self.qstat(job_id)}"
        return attrs

    def wait(self, job_id: str, timeout: float = 180) -> Done:
        """Until the job is F (finished, job history on); then read the delivered .o/.e."""
        attrs = self.wait_state(job_id, "F", timeout)
        return Done(job_id, attrs, self._delivered(attrs.get("Output_Path", "")),
                    self._delivered(attrs.get("Error_Path", "")))

    @staticmethod
    def _delivered(spec: str) -> bytes:
        path = spec.split(":", 1)[-1]
        if not path:
            return b""
        wait_until(lambda: os.path.exists(path), 20)
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            return b"<not delivered>"

    def qdel(self, user, job_id: str) -> None:
        subprocess.run([RUNUSER, "-u", user.name, "--", self.bin("qdel"), job_id], env=self.env_for(user),
                       check=True, capture_output=True, timeout=60)

    def session_of(self, job_id: str, timeout: float = 60) -> int:
        attrs = wait_until(lambda: (lambda a: a if a.get("session_id") else None)(self.qstat(job_id)), timeout)
        assert attrs, self.qstat(job_id)
        return int(attrs["session_id"])

    @staticmethod
    def cleanup(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)
