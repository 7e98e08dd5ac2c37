"""Helpers for the real-OpenPBS tests: submit with the real qsub as a real user, read ``qstat -xf -F json``,
wait for the job to finish (what TORQUE's helpers share with these: tests/torque/trq.py ``BatchSystem``)."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

from trq import RUNUSER, BatchSystem

PREFIX = "/opt/pbs"
PBS_HOME = "/var/spool/pbs"


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


class Pbs(BatchSystem):
    """The OpenPBS in PREFIX, up (scripts/openpbs-up)."""

    prefix = PREFIX
    workdir_tag = "pbs"

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

    def wait(self, job_id: str, timeout: float = 180) -> Done:
        """Until the job is F (finished, job history on); then read the delivered .o/.e."""
        attrs = self.wait_state(job_id, "F", timeout)
        return Done(job_id, attrs, self._delivered(attrs.get("Output_Path", "")),
                    self._delivered(attrs.get("Error_Path", "")))
