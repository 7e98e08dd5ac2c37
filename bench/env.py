"""The benchmark environment: the probe, the bench user and image, a private cbatchd, and the moms.

Everything is created idempotently and owned by this run: the daemon has its own config, socket, state
directory and ``daemon.instance`` (``cbatch-bench-<pid>``), the moms have their own TORQUE homes, and only
containers of that instance (or with the ``cbatch-bench=1`` label of the docker-run baseline) are ever
removed. The daemon config is the test suite's shape: native by default, the bench and test images allowed,
``pids_limit: 256``.

Modes (how a job is started once the mom has run the prologue):

- ``cbatch_<engine>_<client>`` (:mod:`bench.modes`): the real cbatch shims (prologue, ``$job_starter``,
  epilogue; Python or the C client) talking to our cbatchd, jobs in the queue ``bench_<engine>``.
- ``native``: no cbatch at all: the starter execs the shell, which reads the stdin line (pbs_mom without a
  ``$job_starter``); no prologue or epilogue.
- ``docker_run``: no cbatch: the starter is ``bench/starters/docker-run`` (the docker CLI with cbatch's
  flags), for a job user in the docker group.

A *stamped* mom runs the same starter behind ``#!benchtool stamp+exec...``, which writes one
``stamp <time>`` line into the job's stdout right before exec'ing it: the start of the latency interval.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

from bench import IMAGE, TOOL, USER

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
VENV_BIN = Path(sys.executable).parent
HELPER = os.environ.get("CBATCH_HELPER", "/usr/libexec/cbatch/cbatch-exec")
ENGINE_URL = os.environ.get("CBATCH_ENGINE_URL", "unix:///var/run/docker.sock")
RUN_BASE = Path("/run/cbatch-bench")
MOM_BASE = Path("/var/spool/cbatch-bench")
DOCKER_STARTER = BENCH / "starters" / "docker-run"
C_CLIENT = os.path.join(os.path.dirname(HELPER), "cbatch-client")


def run(argv, **kw) -> subprocess.CompletedProcess:
    """subprocess.run with check=True and captured text output (argv lists only)."""
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)


def build_tool() -> str:
    """Build and install the static probe (``make -C bench install``); return its path."""
    run(["make", "-s", "-C", str(BENCH), "install", f"DESTDIR={os.path.dirname(TOOL)}"])
    return TOOL


def ensure_user() -> pwd.struct_passwd:
    """The bench job user (``/bin/sh``, in the docker group for the docker-run baseline), made with the
    integration suite's own user helper."""
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    import users  # noqa: E402 - tests/integration/users.py
    users._ensure_user(USER, ("docker",), "/bin/sh")
    return pwd.getpwnam(USER)


def ensure_image() -> str:
    """Build ``cbatch-bench/busybox:1`` (``bench/Dockerfile``: the test busybox image plus the probe) unless
    the tag already carries this probe (label = its sha256)."""
    run([str(ROOT / "scripts" / "build-test-images")])
    digest = hashlib.sha256(Path(TOOL).read_bytes()).hexdigest()[:16] + ":" + TOOL
    got = subprocess.run(["docker", "image", "inspect", "--format",
                          '{{index .Config.Labels "cbatch.bench.tool"}}', IMAGE],
                         capture_output=True, text=True)
    if got.returncode == 0 and got.stdout.strip() == digest:
        return IMAGE
    context = BENCH / "out"
    shutil.copy2(TOOL, context / "benchtool")
    run(["docker", "build", "-q", "--label", f"cbatch.bench.tool={digest}", "--build-arg", f"TOOL={TOOL}",
         "-t", IMAGE,
         "-f", str(BENCH / "Dockerfile"), str(context)])
    return IMAGE


def daemon_config(run_dir: Path, instance: str, engines=("docker",), engine_key: bool = False) -> dict:
    """The bench site config (the integration suite's shape), a queue ``bench_<engine>`` per engine (with
    the per-queue ``engine`` key when this branch has it, else the one engine there is)."""
    queues = {"batch": {}}
    queues.update({f"bench_{e}": ({"engine": e} if engine_key else {}) for e in engines})
    return {
        "engine": {"url": ENGINE_URL, "timeout": 60},
        "daemon": {"socket": str(run_dir / "cbatchd.sock"), "state_dir": str(run_dir / "state"),
                   "instance": instance, "stop_grace": 1.0, "helper": HELPER},
        "defaults": {"image": "native", "images": ["cbatch-bench/*", "cbatch-test/*"], "native": True,
                     "hardening": {"pids_limit": 256}},
        "queues": queues,
    }


class Daemon:
    """A private cbatchd in the foreground (root), with its own config, socket, state and instance, run
    with the timing probes of :mod:`bench.tracedaemon` (:meth:`trace` collects them)."""

    def __init__(self, run_dir: Path, engines=("docker",), engine_key: bool = False):
        import yaml
        self.run_dir = run_dir
        self.instance = f"cbatch-bench-{os.getpid()}"
        self.config = daemon_config(run_dir, self.instance, engines, engine_key)
        self.socket = self.config["daemon"]["socket"]
        self.config_path = run_dir / "cbatch.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        os.chmod(self.config_path, 0o644)
        self.log_path = run_dir / "cbatchd.log"
        self.trace_path = run_dir / "trace.json"
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 30.0) -> "Daemon":
        from cbatch.clients import client
        from cbatch.core.errors import CbatchError
        # CBATCH_TIMING=1: the direct engine logs "timing <step> <ms>" per start step (bench.timing parses it).
        env = dict(os.environ, CBATCH_TIMING="1")
        with open(self.log_path, "ab") as log:
            # -I: the script's directory (bench/) stays off sys.path; cbatch comes from the venv as for cbatchd.
            self.proc = subprocess.Popen([str(VENV_BIN / "python"), "-I", str(BENCH / "tracedaemon.py"),
                                          str(self.config_path), str(self.trace_path)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cbatchd exited {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                client.call(self.socket, "ping", _timeout=5)
                return self
            except CbatchError:
                time.sleep(0.1)
        raise RuntimeError(f"cbatchd not answering after {timeout}s: {self.log()[-2000:]}")

    def trace(self, timeout: float = 10.0) -> Dict[str, list]:
        """The probes' durations (ms) since the last call, and clear them."""
        try:
            self.trace_path.unlink()
        except FileNotFoundError:
            pass
        self.proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.trace_path.exists():
                return json.loads(self.trace_path.read_text())
            time.sleep(0.05)
        raise RuntimeError("cbatchd did not write its trace")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_size(self) -> int:
        """The log's size now: :meth:`log` from this offset is what the daemon logged since."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log(self, offset: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Bench:
    """One benchmark run's environment: ``mom(mode, stamped)`` gives the mom for a mode name (made on first
    use). ``modes`` are the :class:`bench.modes.Mode` this run measures (baselines first), ``missing`` the
    wanted ones that are not available, with the reason; ``cbatch`` is the cbatch mode the single-mode
    benchmarks (output, overhead) use: the direct engine with the C client when there, else the first."""

    def __init__(self, engines=("docker",), clients=("python",), c_client: str = C_CLIENT) -> None:
        from bench import modes as modesmod
        self.modes, self.missing = modesmod.plan(engines, clients, c_client, HELPER)
        self.c_client = c_client
        cbatch = [m for m in self.modes if m.kind == "cbatch"]
        if not cbatch:
            raise RuntimeError(f"bench: no cbatch mode is available: {self.missing}")
        self.cbatch = next((m.name for m in cbatch if (m.engine, m.client) == ("direct", "c")), cbatch[0].name)
        self.by_name = {m.name: m for m in self.modes}
        self.tool = build_tool()
        self.user = ensure_user()
        self.image = ensure_image()
        self.run_dir = RUN_BASE / str(os.getpid())
        self.mom_dir = MOM_BASE / str(os.getpid())
        for base in (RUN_BASE, MOM_BASE):
            base.mkdir(mode=0o755, exist_ok=True)
            os.chmod(base, 0o755)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(mode=0o755)
        self.mom_dir.mkdir(mode=0o755, exist_ok=True)
        engine_key = modesmod.engine_key_supported() is None
        self.daemon = Daemon(self.run_dir, modesmod.engines_in(self.modes), engine_key).start()
        self.host = socket.gethostname().split(".")[0]
        self._moms: Dict[Tuple[str, bool], object] = {}

    @property
    def mode_names(self) -> Tuple[str, ...]:
        """The mom-driven modes, in the order benchmarks run them."""
        return tuple(m.name for m in self.modes)

    def cbatch_names(self) -> Tuple[str, ...]:
        """The cbatch modes of this run."""
        return tuple(m.name for m in self.modes if m.kind == "cbatch")

    def queue(self, mode: str) -> str:
        """The queue a job of ``mode`` is submitted to."""
        return self.by_name[mode].queue

    def mom(self, mode: str, stamped: bool = False):
        """The :class:`cbatch.emulator.local.Mom` running jobs in ``mode`` (see the module docstring)."""
        from cbatch.emulator.local import Mom
        if mode == "cbatch":
            mode = self.cbatch
        key = (mode, stamped)
        if key in self._moms:
            return self._moms[key]
        index = len(self._moms) + 1
        root = str(self.mom_dir / f"{mode}{'-stamped' if stamped else ''}")
        # Job ids 9PPPPKK...: distinct per mom and from the test suite's (pid * 1000 + clock) ids.
        first = 900_000_000 + (os.getpid() % 1000) * 100_000 + index * 5_000
        kind = self.by_name[mode].kind
        if stamped:
            inner = self.mom(mode, False).starter
            kw = {"starter": f"#!{self.tool} stamp+exec:{inner}\n" if kind != "native"
                  else f"#!{self.tool} stamp+exec\n"}
        elif kind == "native":
            kw = {"starter": f"#!{self.tool} exec\n"}
        elif kind == "docker_run":
            kw = {"starter": DOCKER_STARTER.read_text()}
        else:
            kw = {}
        socket_path = self.daemon.socket if kind == "cbatch" else None
        mom = Mom(root, socket_path, first_id=first, **kw)
        mom.bench_queue = self.by_name[mode].queue      # bench.jobs.submit submits there
        if kind == "cbatch" and not stamped:
            self._install_client(mom, self.by_name[mode].client)
        self._moms[key] = mom
        return mom

    def _install_client(self, mom, client: str) -> None:
        """Make the mom's prologue, epilogue and starter the shims of ``client`` (python | c), whatever the
        emulator's default is (the C ones once built, on branches that have them)."""
        from bench.modes import install_style
        from cbatch.admin import install
        style = install_style()
        if style is None:
            return                  # only Python shims exist on this branch: Mom installed those
        c = self.c_client if client == "c" else None
        kw = {"client_path": c} if style == "client_path" else {"hooks": client, "client": c}
        install.install(mom.mom_priv, mom.libexec, self.daemon.socket, mom.python, **kw)

    def cbatch_containers(self) -> list:
        """Ids of the containers our daemon owns right now."""
        from cbatch.engines.docker import Engine
        from cbatch.core.spec import LABEL_INSTANCE
        return Engine(ENGINE_URL).list_ids({LABEL_INSTANCE: self.daemon.instance})

    def close(self) -> None:
        """Stop the daemon and remove what this run created (its containers, moms, run directory)."""
        from cbatch.engines.docker import Engine
        from cbatch.core.spec import LABEL_INSTANCE
        self.daemon.stop()
        try:
            Engine(ENGINE_URL).cleanup({LABEL_INSTANCE: self.daemon.instance})
        except Exception as exc:  # noqa: BLE001 - report, keep tidying
            print(f"bench: cleanup of {self.daemon.instance}: {exc}", file=sys.stderr)
        # docker-run baseline containers (--rm, so only ones whose CLI was killed are left), and the direct
        # engine's image holders of this run's instance (they outlive their last job until prune asks)
        left = subprocess.run(["docker", "ps", "-aq", "--filter", "label=cbatch-bench=1"],
                              capture_output=True, text=True).stdout.split()
        left += subprocess.run(["docker", "ps", "-aq", "--filter", f"label=cbatch.hold={self.daemon.instance}"],
                               capture_output=True, text=True).stdout.split()
        if left:
            subprocess.run(["docker", "rm", "-f", *left], capture_output=True)
        shutil.rmtree(self.mom_dir, ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)
