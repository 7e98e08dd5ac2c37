"""The ``slurm`` fixture: the real single-node Slurm cluster (scripts/slurm-up) wired to a test cbatchd.

Imported by the Slurm test modules (``from conftest_slurm import slurm``): a session fixture that

1. starts a dedicated cbatchd (``daemon_factory("slurm")``: its own socket, state and instance label), and
2. runs ``scripts/slurm-up --socket <that socket>`` once, so slurmd's Prolog/Epilog shims register and
   unregister jobs with exactly this daemon. Users exist before (the ``users`` fixture runs first), because
   slurmctld caches each user's groups.

The shims are global to the node, so two test sessions using Slurm at the same time would race for them;
everything else (job ids, container labels) is unique per session.

Job scripts get ``CBATCH_SOCKET`` exported so ``cbatch run`` inside them reaches the same daemon (a client
may choose its socket freely: every decision is the daemon's).
"""

from __future__ import annotations

import os
import pwd
import shlex
import socket as _socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from torque_helpers import container_pid, direct_containers

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CBATCH = "/opt/cbatch/venv/bin/cbatch"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


def job_fields(job_id: str) -> Dict[str, str]:
    """``scontrol show job -o <id>`` as a dict ({} once slurmctld forgot the job)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True)
    if out.returncode != 0:
        return {}
    fields = {}
    for word in out.stdout.split():
        key, sep, value = word.partition("=")
        if sep:
            fields.setdefault(key, value)
    return fields


@dataclass
class SlurmJob:
    cluster: "Slurm"
    job_id: str
    user: str
    out: Path
    err: Path

    def state(self) -> str:
        return job_fields(self.job_id).get("JobState", "")

    def wait_state(self, states, timeout: float = 60.0) -> str:
        """Wait until the job is in one of ``states``; the state reached (fails on timeout)."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.state()
            if state in states:
                return state
            time.sleep(0.2)
        pytest.fail(f"job {self.job_id}: still {state!r} after {timeout}s, wanted {states}\n{self.dump()}")

    def wait(self, timeout: float = 90.0) -> Dict[str, str]:
        """Wait for the job to end AND its Epilog to finish (no COMPLETING flag); its scontrol fields."""
        deadline = time.monotonic() + timeout
        fields: Dict[str, str] = {}
        while time.monotonic() < deadline:
            fields = job_fields(self.job_id)
            if fields.get("JobState") in TERMINAL and "COMPLETING" not in fields.get("JobState", "") \
                    and not self._completing():
                return fields
            time.sleep(0.2)
        pytest.fail(f"job {self.job_id} not finished after {timeout}s: {fields.get('JobState')}\n{self.dump()}")

    def _completing(self) -> bool:
        # The Epilog runs while squeue shows the job as CG (completing); scontrol's JobState is already final.
        out = subprocess.run(["squeue", "-h", "-j", self.job_id, "-o", "%t"], capture_output=True, text=True)
        return out.stdout.strip() == "CG"

    def wait_output(self, needle: str, timeout: float = 60.0) -> str:
        """Wait until the job's stdout contains ``needle``; return the stdout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.stdout()
            if needle in text:
                return text
            if self.state() in TERMINAL:
                break
            time.sleep(0.1)
        text = self.stdout()
        if needle not in text:
            pytest.fail(f"job {self.job_id}: {needle!r} never appeared\n{self.dump()}")
        return text

    def stdout(self) -> str:
        try:
            return self.out.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr(self) -> str:
        try:
            return self.err.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def containers(self, all_states: bool = True) -> List[str]:
        """Ids of this job's containers started by the test daemon (both engines; ``all_states=False``: only
        those running, for the direct engine those whose init has a pid)."""
        labels = {"cbatch.instance": self.cluster.instance, "cbatch.job": self.job_id}
        argv = ["docker", "ps", "-q", "--no-trunc"] + [a for k, v in labels.items() for a in ("--filter", f"label={k}={v}")]
        if all_states:
            argv.insert(2, "-a")
        ids = subprocess.run(argv, check=True, capture_output=True, text=True).stdout.split()
        return ids + [c for c in direct_containers(labels) if all_states or container_pid(c)]

    def cgroup_dirs(self) -> List[str]:
        """Every ``job_<id>`` directory of this job left in any cgroup hierarchy."""
        uid = pwd.getpwnam(self.user).pw_uid
        rel = f"slurm_{self.cluster.node}/uid_{uid}/job_{self.job_id}"
        base = Path("/sys/fs/cgroup")
        return sorted(str(h / rel) for h in base.iterdir() if not h.is_symlink() and (h / rel).is_dir())

    def dump(self) -> str:
        return (f"--- stdout\n{self.stdout()}\n--- stderr\n{self.stderr()}\n--- scontrol\n"
                f"{job_fields(self.job_id)}\n--- cbatchd log (tail)\n{self.cluster.daemon.log()[-3000:]}")


class Slurm:
    """The cluster as the tests use it."""

    def __init__(self, daemon, node: str, workdir: Path):
        self.daemon, self.node, self.workdir = daemon, node, workdir
        self.socket = daemon.socket
        self.instance = daemon.instance
        self._n = 0
        self.submitted: List[str] = []

    def submit(self, user: str, body: str, *sbatch_args: str, env: Optional[Dict[str, str]] = None) -> SlurmJob:
        """``sbatch`` a bash script as ``user`` (non-root, via runuser); output files in the shared workdir."""
        self._n += 1
        pw = pwd.getpwnam(user)
        d = self.workdir / f"{user}-{self._n}"
        d.mkdir(mode=0o755)
        os.chown(d, pw.pw_uid, pw.pw_gid)
        script = d / "job.sh"
        lines = ["#!/bin/bash", f"export CBATCH_SOCKET={shlex.quote(self.socket)}",
                 f"export PATH={os.path.dirname(CBATCH)}:/usr/bin:/bin"]
        for key, value in (env or {}).items():
            lines.append(f"export {key}={shlex.quote(value)}")
        script.write_text("\n".join(lines) + "\n" + body.strip("\n") + "\n")
        os.chown(script, pw.pw_uid, pw.pw_gid)
        os.chmod(script, 0o755)
        out, err = d / "out", d / "err"
        argv = ["runuser", "-u", user, "--", "sbatch", "--parsable", f"--chdir={d}", f"--output={out}",
                f"--error={err}", "--job-name=cbt", *sbatch_args, str(script)]
        res = subprocess.run(argv, capture_output=True, text=True, cwd=str(d), timeout=30)
        assert res.returncode == 0, f"sbatch failed: {res.stderr}"
        job_id = res.stdout.strip().split(";")[0]
        self.submitted.append(job_id)
        return SlurmJob(self, job_id, user, out, err)

    def cancel_leftovers(self) -> None:
        """scancel every job a test submitted (a failed test must not hold the node for the next ones)."""
        jobs, self.submitted = self.submitted, []
        if jobs:
            subprocess.run(["scancel", *jobs], capture_output=True, timeout=30)


@pytest.fixture(scope="session")
def slurm(users, daemon_factory, tmp_path_factory):
    """The running Slurm cluster, its Prolog/Epilog wired to a dedicated test cbatchd."""
    # Partition `debug` runs every `cbatch run` in busybox (no --image needed, native refused); `batch` is
    # the test default: native unless --image.
    daemon = daemon_factory("slurm", queues={"debug": {"image": "cbatch-test/busybox:1", "native": False}})
    t0 = time.monotonic()
    res = subprocess.run([str(ROOT / "scripts" / "slurm-up"), "--socket", daemon.socket],
                         capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        pytest.fail(f"scripts/slurm-up failed ({res.returncode}):\n{res.stderr}")
    print(f"slurm-up: {time.monotonic() - t0:.1f}s")
    workdir = Path(f"/var/tmp/cbt-slurm-{os.getpid()}")
    workdir.mkdir(mode=0o755, exist_ok=True)
    os.chmod(workdir, 0o755)
    yield Slurm(daemon, _socket.gethostname().split(".")[0], workdir)
    subprocess.run(["rm", "-rf", "--one-file-system", str(workdir)], check=False)
