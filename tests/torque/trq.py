"""Helpers for the real-batch-system tests (TORQUE here, OpenPBS in tests/openpbs/opbs.py): the session's
cbatchd on the default socket (:func:`start_cbatchd`), and :class:`BatchSystem`, what both batch systems'
helpers share (a job user's workdir, qdel, the session id, the delivered .o/.e files). TORQUE's own: submit
with the real qsub as a real user, read ``qstat -f -x``, wait for completion."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

from torque_helpers import direct_containers

VARIANTS = {"plain": ("/opt/torque", "/var/spool/torque"), "cg": ("/opt/torque-cg", "/var/spool/torque-cg")}
_count = itertools.count(1)
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"


def instance_containers(instance: str, job_id: Optional[str] = None):
    """Container ids (running or not) of this cbatchd instance (and job), both engines."""
    labels = {"cbatch.instance": instance, **({"cbatch.job": job_id} if job_id else {})}
    argv = ["docker", "ps", "-a", "-q", "--no-trunc"] + [a for k, v in labels.items() for a in ("--filter", f"label={k}={v}")]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.split() + direct_containers(labels)


def cpu_spin(seconds: int) -> str:
    """A bash loop that runs until the shell itself has used ``seconds`` of CPU (utime + stime from
    /proc/$$/stat, read without a fork). A wall-clock spin gets a share of the CPU that depends on the machine's
    load (1 s of 6 at load 19), so a test of cput must not spin by the clock."""
    return ("hz=$(getconf CLK_TCK); while read -r -a st < /proc/$$/stat; "
            f"[ $(( (${{st[13]}} + ${{st[14]}}) / hz )) -lt {int(seconds)} ]; do :; done")


def wait_until(predicate, timeout: float, interval: float = 0.2):
    """Poll ``predicate`` until it returns something true; return that, or None on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


class Daemon:
    """The session's cbatchd (default socket)."""

    def __init__(self, proc, socket_path, instance, config_path, log_path):
        self.proc, self.socket, self.instance = proc, socket_path, instance
        self.config_path, self.log_path = config_path, log_path

    def wait_ready(self, timeout: float = 30.0) -> None:
        import pytest
        from cbatch.clients import client
        from cbatch.core.errors import CbatchError
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"cbatchd exited {self.proc.returncode}:\n{self.log()}")
            try:
                client.call(self.socket, "ping", _timeout=5)
                return
            except CbatchError:
                time.sleep(0.1)
        pytest.fail(f"cbatchd not answering after {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        """SIGTERM cbatchd (it leaves containers running) and start it again on the same config."""
        self.stop()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([self.proc.args[0], "--foreground", "--config", str(self.config_path)],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        self.wait_ready()

    def log_since(self, offset: int) -> str:
        """The log written after byte ``offset`` (a :meth:`log_size` taken before)."""
        return Path(self.log_path).read_bytes()[offset:].decode(errors="replace")

    def log_size(self) -> int:
        return Path(self.log_path).stat().st_size

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-6000:]
        except OSError:
            return ""


def start_cbatchd(run: Path, config: dict, instance: str, socket_path: str) -> Daemon:
    """A real cbatchd (this venv's) on ``socket_path`` with ``config`` written to ``run``/cbatch.yaml; fails the
    session when another daemon already serves that socket."""
    import socket
    import sys
    import pytest
    import yaml
    run.mkdir(mode=0o755, exist_ok=True)
    os.chmod(run, 0o755)
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(socket_path)
        pytest.fail(f"a cbatchd already serves {socket_path}: stop it (scripts/cbatchd-down) first")
    except OSError:
        pass
    finally:
        probe.close()
    cfg = run / "cbatch.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    os.chmod(cfg, 0o644)
    log = open(run / "cbatchd.log", "ab")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "cbatchd"), "--foreground", "--config", str(cfg)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    d = Daemon(proc, socket_path, instance, cfg, run / "cbatchd.log")
    d.wait_ready()
    return d


class BatchSystem:
    """What the TORQUE and the OpenPBS helpers share; a subclass sets ``prefix`` and ``workdir_tag``."""

    prefix = ""
    workdir_tag = "batch"

    def bin(self, name: str) -> str:
        for sub in ("bin", "sbin"):
            path = os.path.join(self.prefix, sub, name)
            if os.path.exists(path):
                return path
        raise FileNotFoundError(name)

    def env_for(self, user) -> Dict[str, str]:
        """A login-like environment for the batch system's clients as ``user`` (its bin first: another
        batch system's commands may share the names)."""
        return {"PATH": f"{self.prefix}/bin:/usr/bin:/bin", "HOME": user.home, "USER": user.name,
                "LOGNAME": user.name, "LANG": "C.UTF-8", "SHELL": user.shell}

    def workdir(self, user) -> Path:
        """A fresh directory under /var/tmp owned by ``user`` (0755), removed by :meth:`cleanup`."""
        path = Path(f"/var/tmp/cbt-{self.workdir_tag}-{os.getpid()}-{next(_count)}")
        path.mkdir(mode=0o755)
        os.chown(path, user.uid, user.gid)
        os.chmod(path, 0o755)
        return path

    def qstat(self, job_id: str) -> Dict:
        raise NotImplementedError

    def wait_state(self, job_id: str, states: str, timeout: float = 120) -> Dict:
        attrs = wait_until(lambda: (lambda a: a if a.get("job_state", "") in states else None)(self.qstat(job_id)),
                           timeout)
        assert attrs, f"{job_id} not in {states} after {timeout}s: {self.qstat(job_id)}"
        return attrs

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


@dataclass
class Done:
    """A completed job: its qstat attributes and delivered output."""

    job_id: str
    attrs: Dict[str, str]
    stdout: bytes
    stderr: bytes

    @property
    def exit_status(self) -> int:
        return int(self.attrs["exit_status"])


class Torque(BatchSystem):
    """One TORQUE install (prefix, PBS_HOME) that is up."""

    workdir_tag = "trq"

    def __init__(self, variant: str, prefix: str, home: str, libexec: str):
        self.variant, self.prefix, self.home, self.libexec = variant, prefix, home, libexec
        self.host = Path(home, "server_name").read_text().strip()

    @classmethod
    def for_variant(cls, variant: str, libexec: str) -> "Torque":
        prefix, home = VARIANTS[variant]
        return cls(variant, prefix, home, libexec)

    def install_submit_filter(self, run_dir: Path, config_path, venv_bin: Path) -> str:
        """Write the filter wrapper (cbatch's own installer) and name it in PBS_HOME/torque.cfg."""
        path = str(run_dir / "submit-filter")
        subprocess.run([str(venv_bin / "python"), "-I", "-m", "cbatch.admin.submitfilter", "--install", path,
                        "--config", str(config_path), "--default-queue", "batch"], check=True)
        cfg = Path(self.home, "torque.cfg")
        cfg.write_text(f"SUBMITFILTER {path}\n")
        os.chmod(cfg, 0o644)
        return path

    def write_script(self, user, workdir: Path, body, name: str = "job.sh") -> Path:
        data = body.encode() if isinstance(body, str) else body
        path = workdir / name
        path.write_bytes(data)
        os.chown(path, user.uid, user.gid)
        os.chmod(path, 0o644)
        return path

    def qsub_raw(self, user, body, args: Sequence[str] = (), workdir: Optional[Path] = None,
                 name: str = "job.sh", timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the real qsub as ``user`` in ``workdir`` (made when None) on a script with ``body``."""
        workdir = workdir or self.workdir(user)
        path = self.write_script(user, workdir, body, name)
        return subprocess.run([RUNUSER, "-u", user.name, "--", self.bin("qsub"), *args, str(path)],
                              cwd=str(workdir), env=self.env_for(user), capture_output=True, timeout=timeout)

    def qsub(self, user, body, args: Sequence[str] = (), workdir: Optional[Path] = None, name: str = "job.sh") -> str:
        """Submit; return the job id (asserts qsub succeeded)."""
        r = self.qsub_raw(user, body, args, workdir, name)
        assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
        return r.stdout.decode().strip()

    def qstat(self, job_id: str) -> Dict[str, str]:
        """``qstat -f -x JOBID`` flattened: ``{"job_state": "C", "resources_used.cput": ..., ...}``."""
        r = subprocess.run([self.bin("qstat"), "-f", "-x", job_id], capture_output=True, timeout=30)
        if r.returncode != 0:
            return {}
        out: Dict[str, str] = {}
        root = ET.fromstring(r.stdout)
        for job in root.iter("Job"):
            for child in job:
                if len(child):
                    for sub in child:
                        out[f"{child.tag}.{sub.tag}"] = sub.text or ""
                else:
                    out[child.tag] = child.text or ""
        return out

    def state(self, job_id: str) -> str:
        return self.qstat(job_id).get("job_state", "")

    def wait(self, job_id: str, timeout: float = 180) -> Done:
        """Until the job is C; then read the delivered .o/.e (Output_Path/Error_Path)."""
        attrs = self.wait_state(job_id, "C", timeout)
        out = self._delivered(attrs.get("Output_Path", ""))
        err = self._delivered(attrs.get("Error_Path", ""))
        return Done(job_id, attrs, out, err)


def qsub_interactive(torque: Torque, user, args: Sequence[str], send: bytes, workdir: Path,
                     timeout: float = 90) -> tuple:
    """``qsub -I`` as ``user`` on a pty (Python's pty): wait for TORQUE's "ready" line, type ``send``, read
    until qsub exits. Returns (everything qsub's terminal showed, qsub's exit status, the job id or "")."""
    import pty
    import re
    import select
    pid, fd = pty.fork()
    if pid == 0:
        try:
            os.chdir(str(workdir))
            os.execve(RUNUSER, [RUNUSER, "-u", user.name, "--", torque.bin("qsub"), "-I", *args],
                      torque.env_for(user))
        finally:
            os._exit(127)
    out, sent = b"", False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
            if not sent and b" ready" in out:
                time.sleep(1.0)          # let the job's shell reach its prompt
                os.write(fd, send)
                sent = True
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    m = re.search(rb"qsub: waiting for job (\S+) to start", out)
    return out, os.waitstatus_to_exitcode(status), (m.group(1).decode() if m else "")
