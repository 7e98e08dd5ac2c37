"""Integration fixtures: real users, a real cbatchd on its own socket, and the pbs_mom emulator wired to it.

- ``users``: session; creates ``cbt-alice``/``cbt-bob`` (tests/integration/users.py), returns {name: TestUser}.
- ``images``: session; builds the test images (``scripts/build-test-images``), returns {short: tag}.
- ``daemon_factory``: session; ``start(name="main", **overrides)`` runs ``cbatchd --foreground --config``
  as root with its own socket, state dir and a unique ``daemon.instance``; overrides are merged into the
  YAML (``engine={"url": ...}``, ``queues={...}``); ``nofile=(soft, hard)`` starts it under that
  descriptor limit. Every daemon is stopped at the end and the containers
  of its instance removed.
- ``daemon``: session; the default daemon. ``mom``: session; a :class:`cbatch.emulator.local.Mom` whose hooks and
  starter talk to ``daemon``.
- ``workdir``: a fresh directory under /var/tmp owned by cbt-alice (0755): pytest's tmp_path is 0700 root
  and job users cannot enter it.

Everything lives under /run/cbatch-test/<pid>-<n> (config, socket, state: root-owned parents, so the daemon
trusts the config) and /var/spool/cbatch-test/<pid> (the mom's TORQUE home). Job ids embed the pid.
"""

from __future__ import annotations

import copy
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import pytest
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

from torque_helpers import instance_containers, remove_instance_containers  # noqa: E402,F401
from userfixtures import alice, bob, carol, users  # noqa: E402,F401 - fixtures

VENV_BIN = Path(sys.executable).parent
CBATCHD = str(VENV_BIN / "cbatchd")
ENGINE_URL = os.environ.get("CBATCH_ENGINE_URL", "unix:///var/run/docker.sock")
RUN_BASE = Path("/run/cbatch-test")
MOM_BASE = Path("/var/spool/cbatch-test")
TEST_IMAGES = ["cbatch-test/*"]
_counter = itertools.count(1)


def pytest_collection_modifyitems(config, items):
    """Every test in this directory needs root and the engine. A module with ``ENGINES_ONLY`` or a test marked
    ``engines_only(...)`` (the engines it is about) is not collected for the others: deselected, not skipped."""
    keep, drop = [], []
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.root)
            item.add_marker(pytest.mark.docker)
        marked = item.get_closest_marker("engines_only")
        only = marked.args if marked else getattr(getattr(item, "module", None), "ENGINES_ONLY", None)
        params = getattr(getattr(item, "callspec", None), "params", {})
        (drop if only and params.get("engine_name", only[0]) not in only else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def base_config(run_dir: Path, instance: str, helper: str) -> dict:
    """The test site config: native by default, the test images allowed, one queue per use."""
    return {
        "engine": {"url": ENGINE_URL, "timeout": 60},
        "daemon": {"socket": str(run_dir / "cbatchd.sock"), "state_dir": str(run_dir / "state"),
                   "instance": instance, "stop_grace": 1.0, "helper": helper},
        "defaults": {"image": "native", "images": list(TEST_IMAGES), "native": True,
                     "hardening": {"pids_limit": 256}},
        "queues": {
            "batch": {},                                            # native unless #CBATCH --image
            "native": {"image": "native"},
            "debian": {"image": "cbatch-test/debian:12"},           # container by default
            "strict": {"image": "cbatch-test/debian:12", "native": False},
        },
    }


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class Daemon:
    """One cbatchd run as root in the foreground, with its own config, socket, state and instance."""

    def __init__(self, name: str, config: dict, run_dir: Path, nofile: Optional[tuple] = None):
        self.name, self.config, self.run_dir = name, config, run_dir
        self.nofile = nofile          # (soft, hard) RLIMIT_NOFILE to start it under (systemd's is 1024:524288)
        self.socket = config["daemon"]["socket"]
        self.instance = config["daemon"]["instance"]
        self.config_path = run_dir / "cbatch.yaml"
        self.log_path = run_dir / "cbatchd.log"
        self.proc: Optional[subprocess.Popen] = None
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        os.chmod(self.config_path, 0o644)

    def start(self, wait: bool = True) -> "Daemon":
        log = open(self.log_path, "ab")
        argv = [CBATCHD, "--foreground", "--config", str(self.config_path)]
        if self.nofile:
            argv = ["prlimit", "--nofile=%d:%d" % self.nofile, "--"] + argv      # execs cbatchd: same pid
        self.proc = subprocess.Popen(argv,
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the daemon answers ping (fails the test with its log if it dies or never answers)."""
        from cbatch.clients import client
        from cbatch.core.errors import CbatchError
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"cbatchd {self.name} exited {self.proc.returncode}:\n{self.log()}")
            try:
                client.call(self.socket, "ping", _timeout=5)
                return
            except CbatchError as exc:
                last = exc
            time.sleep(0.1)
        pytest.fail(f"cbatchd {self.name} not answering after {timeout}s ({last}):\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> Optional[int]:
        """Stop the daemon (SIGTERM, then SIGKILL); return its exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def restart(self) -> "Daemon":
        self.stop()
        return self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def containers(self) -> List[str]:
        return instance_containers(self.instance)


@pytest.fixture(scope="session")
def images(test_images):
    return test_images


ENGINES = tuple(e for e in os.environ.get("CBATCH_TEST_ENGINES", "direct docker").split() if e)


@pytest.fixture(scope="session", params=ENGINES)
def engine_name(request) -> str:
    """Every test that starts a daemon runs once per engine (``CBATCH_TEST_ENGINES`` narrows the list):
    the daemon's queues default to ``engine: <name>``."""
    return request.param


@pytest.fixture(scope="session")
def daemon_factory(users, images, helper, engine_name):
    started: List[Daemon] = []
    RUN_BASE.mkdir(mode=0o755, exist_ok=True)
    os.chmod(RUN_BASE, 0o755)

    def start(name: str = "main", wait: bool = True, nofile: Optional[tuple] = None, **overrides) -> Daemon:
        n = next(_counter)
        run_dir = RUN_BASE / f"{os.getpid()}-{n}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(mode=0o755)
        instance = f"cbt-{os.getpid()}-{n}-{name}"
        config = base_config(run_dir, instance, helper)
        config["defaults"]["engine"] = engine_name
        d = Daemon(name, _merge(config, overrides), run_dir, nofile)
        d.engine_name = engine_name
        started.append(d)
        return d.start(wait=wait)

    yield start
    for d in started:
        d.stop()
        remove_instance_containers(d.instance)
        shutil.rmtree(d.run_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon(daemon_factory) -> Daemon:
    return daemon_factory("main")


@pytest.fixture(scope="session")
def mom_factory(users):
    """``make(daemon_or_socket, **kw)``: a Mom (its own TORQUE home) wired to a daemon's socket."""
    from cbatch.emulator.local import Mom
    base = MOM_BASE / str(os.getpid())
    made = []

    def make(target, **kw) -> Mom:
        socket_path = target.socket if isinstance(target, Daemon) else target
        root = base / f"mom{len(made) + 1}"
        MOM_BASE.mkdir(mode=0o755, exist_ok=True)
        base.mkdir(mode=0o755, exist_ok=True)
        mom = Mom(str(root), socket_path, **kw)
        made.append(mom)
        return mom

    yield make
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def mom(mom_factory, daemon):
    return mom_factory(daemon)


@pytest.fixture
def workdir(users, request):
    """A fresh working directory under /var/tmp owned by cbt-alice, mode 0755."""
    alice = users["cbt-alice"]
    path = Path(f"/var/tmp/cbt-{os.getpid()}-{next(_counter)}")
    path.mkdir(mode=0o755)
    os.chown(path, alice.uid, alice.gid)
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def workdir_for(users):
    """``make(user)``: a fresh directory under /var/tmp owned by that user, mode 0755."""
    made = []

    def make(user) -> Path:
        path = Path(f"/var/tmp/cbt-{os.getpid()}-{next(_counter)}")
        path.mkdir(mode=0o755)
        os.chown(path, user.uid, user.gid)
        os.chmod(path, 0o755)
        made.append(path)
        return path

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)
