"""Mount pinning (cbatch.daemon.pinning): Docker mounts the exact objects checked as the user, from root-only staging
points that are gone once the container has started and never outlive it.

The swap race itself, end to end, is tests/integration/test_hostile.py::
test_symlink_swapped_after_check_never_exposes_target; here the pieces, deterministically.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import threading
from pathlib import Path

import pytest

from cbatch.clients import client
from cbatch.daemon import pinning
from cbatch.core.errors import PolicyError
from cbatch.core.job import Identity
from cbatch.host.paths import batch_resolver, resolve_as_user
from cbatch.core.policy import container_name
from cbatch.core.spec import ContainerSpec, Mount
from torque_helpers import script, wait_until

DEBIAN = "cbatch-test/debian:12"
SECRET = b"cbt-pinning-secret-51c2"
MOUNT_DIR = f"/run/cbatch-test/mounts-{os.getpid()}"        # outside every run dir the fixtures rmtree
_libc = ctypes.CDLL(None, use_errno=True)


def _staged_mounts(under: str):
    """Mount points at or below ``under`` in our namespace (what must be empty after a container)."""
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4] == under or line.split()[4].startswith(under.rstrip("/") + "/")]


def _teardown(mount_dir: str) -> None:
    """Unpin what is left, detach the private area, remove only empty directories (never rmtree a mount)."""
    for inst in pinning.staged(mount_dir):
        pinning.unpin_all(os.path.join(mount_dir, inst))
        os.rmdir(os.path.join(mount_dir, inst))
    for _ in _staged_mounts(mount_dir):
        _libc.umount2(mount_dir.encode(), pinning.MNT_DETACH)
    os.rmdir(mount_dir)


@pytest.fixture(scope="module")
def pdaemon(daemon_factory, users):
    mounts = {"image": DEBIAN, "user_mounts": {"allowed": True, "prefixes": ["~", "/var/tmp"]}}
    d = daemon_factory("pinning", daemon={"mount_dir": MOUNT_DIR}, queues={"mounts": mounts})
    d.mount_root = os.path.join(MOUNT_DIR, d.instance)
    yield d
    d.stop()
    _teardown(MOUNT_DIR)


@pytest.fixture(scope="module")
def pmom(mom_factory, pdaemon):
    return mom_factory(pdaemon)


@pytest.fixture
def root(pdaemon):
    """A staging root of its own for the API-level tests (inside the daemon's private area)."""
    path = os.path.join(MOUNT_DIR, f"api-{os.getpid()}")
    yield path
    assert pinning.unpin_all(path) == []
    shutil.rmtree(path)       # safe: unpin_all left nothing mounted below it (asserted above)


@pytest.fixture
def bob_private(workdir_for, bob):
    """<bob's 0700 directory>/pub holding a secret: alice cannot reach it on the host."""
    priv = workdir_for(bob)
    os.chmod(priv, 0o700)
    (priv / "pub").mkdir()
    (priv / "pub" / "secret").write_bytes(SECRET)
    return priv / "pub"


def _spec(name: str, *sources: str) -> ContainerSpec:
    mounts = (Mount("/etc/passwd", "/etc/passwd"),) + tuple(Mount(s, f"/m{i}", False) for i, s in enumerate(sources))
    return ContainerSpec(name=name, image=DEBIAN, argv=("/bin/sh",), uid=1, gid=1, groups=(), workdir="/",
                         env=(), mounts=mounts)


def _exchange(a: Path, b: Path) -> None:
    """renameat2(RENAME_EXCHANGE): what a user's swapping loop does, once."""
    if _libc.syscall(316, -100, str(a).encode(), -100, str(b).encode(), 2) != 0:
        raise OSError(ctypes.get_errno(), "renameat2", str(a))


def _tree(workdir_for, alice) -> Path:
    d = workdir_for(alice)
    (d / "data").mkdir()
    (d / "data" / "mine").write_text("mine\n")
    return d


# ---- the container sees the pinned objects; the staging points are gone once it runs -------------------------
def test_pinned_mounts_show_the_right_content_and_leave_nothing(pmom, pdaemon, alice, workdir_for):
    d = _tree(workdir_for, alice)
    body = script("cat /data/mine; echo ready; while [ ! -e go ]; do sleep 0.1; done; cat /data/mine; "
                  "echo written > out; echo end")
    job = pmom.submit(body.replace(b"#PBS -N test\n", f"#CBATCH --mount={d}/data:/data:ro\n".encode()),
                      alice.name, queue="mounts", initdir=str(d))
    try:
        assert job.wait_output(b"ready\n", timeout=120), job.peek()
        # Running: the container's own namespace holds its mounts (they survive the unpin: see the output);
        # the staging points go as soon as the engine's start returns.
        # release() unmounts, then removes the staging directory: wait for the end of both.
        assert wait_until(lambda: not _staged_mounts(pdaemon.mount_root)
                          and pinning.staged(pdaemon.mount_root) == [], 10) is not None
    finally:
        (d / "go").touch()
    r = job.wait(120)
    assert (r.exit_status, r.stdout) == (0, b"mine\nready\nmine\nend\n"), r.stderr
    assert (d / "out").read_text() == "written\n"          # the pinned cwd is the real one, read-write
    assert _staged_mounts(MOUNT_DIR) == [MOUNT_DIR]          # only the private area itself
    assert pinning.staged(pdaemon.mount_root) == []


def _fork_server(daemon) -> int:
    """The pid of ``daemon``'s fork server (cbatch.host.forkserver), from its log line, checked in /proc."""
    pid = int(re.findall(r"fork server: pid (\d+)", daemon.log())[-1])

    def status() -> dict:
        return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    # The daemon logs the pid when it has spawned the server, which names itself only once its interpreter is
    # up (forkserver.serve_forever): a test right after a (re)start used to read "python3" here.
    assert wait_until(lambda: status()["Name"] == "cbatchd-fork", 10) is not None, status()
    assert int(status()["PPid"]) == daemon.proc.pid
    return pid


def _served(pid: int) -> int:
    # The server sleeps in recvmsg between requests: every request it takes is a voluntary switch.
    return int(Path(f"/proc/{pid}/status").read_text().split("voluntary_ctxt_switches:\t")[1].split()[0])


def test_the_users_paths_are_resolved_by_the_daemons_fork_server(pmom, pdaemon, alice, workdir_for):
    d = _tree(workdir_for, alice)
    server = _fork_server(pdaemon)
    before = _served(server)
    job = pmom.submit(script("cat /data/mine").replace(b"#PBS -N test\n",
                                                       f"#CBATCH --mount={d}/data:/data:ro\n".encode()),
                      alice.name, queue="mounts", initdir=str(d))
    r = job.wait(120)
    assert (r.exit_status, r.stdout) == (0, b"mine\n"), r.stderr
    assert _served(server) > before and _fork_server(pdaemon) == server


# ---- refusals, at the API (deterministic) ----------------------------------------------------------------------
@pytest.mark.parametrize("where", ["leaf", "parent"])
def test_symlink_swapped_in_after_resolve_is_refused(root, alice, workdir_for, bob_private, where):
    d = _tree(workdir_for, alice)
    identity = Identity.lookup(alice.name)
    checked = resolve_as_user(str(d / "data"), identity)
    if where == "leaf":
        swap, link = d / "data", d / "link"
        os.symlink(str(bob_private), link)
    else:         # a directory above the source: the walk refuses the component, not just the last one
        swap, link = d, d.parent / f"{d.name}-link"
        os.symlink(str(bob_private.parent), link)
    try:
        _exchange(swap, link)
        with pytest.raises(PolicyError) as exc:
            pinning.pin(_spec("cbatch-pin-swap", checked), identity, root)
        assert exc.value.message == (f"cbatch: mount: changed while being checked: {checked} "
                                     "(a symlink appeared; refusing)")
    finally:
        _exchange(swap, link)
        link.unlink()
    assert pinning.staged(root) == [] and _staged_mounts(root) == []


def test_path_the_user_cannot_traverse_is_refused(root, alice, bob_private):
    identity = Identity.lookup(alice.name)
    with pytest.raises(PolicyError) as exc:
        pinning.pin(_spec("cbatch-pin-denied", str(bob_private)), identity, root)
    assert exc.value.message == f"cbatch: path: permission denied: {bob_private} (the job's user cannot access it)"
    assert pinning.staged(root) == [] and _staged_mounts(root) == []


@pytest.mark.parametrize("how", ["alone", "batched"])
def test_swapping_loop_never_pins_the_target(root, alice, workdir_for, bob_private, how):
    """Many resolve+pin rounds against a tight exchange loop: every pin holds alice's directory or is refused.
    ``batched``: as the daemon's start does it, the source opened in the child that resolved it."""
    d = _tree(workdir_for, alice)
    link = d / "link"
    os.symlink(str(bob_private), link)
    identity = Identity.lookup(alice.name)
    stop = threading.Event()

    def swapper():
        while not stop.is_set():
            _libc.syscall(316, -100, str(d / "data").encode(), -100, str(link).encode(), 2)
    t = threading.Thread(target=swapper, daemon=True)
    t.start()
    outcomes = {"pinned": 0}
    try:
        for _ in range(200):
            resolve = batch_resolver([str(d / "data")], identity, pin=True) if how == "batched" else resolve_as_user
            try:
                new, pins = pinning.pin(_spec("cbatch-pin-race", resolve(str(d / "data"), identity)),
                                        identity, root, opened=getattr(resolve, "opened", None))
            except PolicyError as exc:
                outcomes[exc.problem] = outcomes.get(exc.problem, 0) + 1
                continue
            finally:
                if how == "batched":
                    resolve.close()
            try:
                assert os.listdir(pins.points[0]) == ["mine"], outcomes
                outcomes["pinned"] += 1
            finally:
                assert pinning.unpin("cbatch-pin-race", root) == []
    finally:
        stop.set()
        t.join()
    # realpath's readlink meeting a directory swapped back in gives EINVAL: a refusal too.
    assert set(outcomes) <= {"pinned", "permission denied", "changed while being checked",
                             "cannot resolve (Invalid argument)"}, outcomes


def test_sources_opened_when_resolved_are_pinned_without_another_child(root, alice, workdir_for, monkeypatch):
    d = _tree(workdir_for, alice)
    identity = Identity.lookup(alice.name)
    resolve = batch_resolver([str(d / "data")], identity, pin=True)
    checked = resolve(str(d / "data"), identity)
    assert list(resolve.opened) == [checked]
    calls, real = [], pinning.open_all_as_user
    monkeypatch.setattr(pinning, "open_all_as_user", lambda paths, who: calls.append(list(paths)) or real(paths, who))
    try:
        new, pins = pinning.pin(_spec("cbatch-pin-pre", checked), identity, root, opened=resolve.opened)
        assert calls == [] and os.listdir(pins.points[0]) == ["mine"]
        assert pinning.unpin("cbatch-pin-pre", root) == []
        # Moved away since it was resolved: its fd no longer has the path, so the path is opened alone (as
        # before this cut): whatever the user has there now, walked without following a symlink.
        os.rename(d / "data", d / "old")
        (d / "data").mkdir()
        (d / "data" / "new").write_text("new\n")
        os.chown(d / "data", alice.uid, alice.gid)
        new, pins = pinning.pin(_spec("cbatch-pin-pre", checked), identity, root, opened=resolve.opened)
        assert calls == [[checked]] and os.listdir(pins.points[0]) == ["new"]
        assert pinning.unpin("cbatch-pin-pre", root) == []
        # ... and a symlink there now is refused as ever.
        (d / "data" / "new").unlink()
        (d / "data").rmdir()
        os.symlink(str(d / "old"), d / "data")
        with pytest.raises(PolicyError) as exc:
            pinning.pin(_spec("cbatch-pin-pre", checked), identity, root, opened=resolve.opened)
        assert exc.value.message == f"cbatch: mount: changed while being checked: {checked} (a symlink appeared; refusing)"
    finally:
        resolve.close()
    assert pinning.staged(root) == [] and _staged_mounts(root) == []


def test_unpin_is_idempotent_and_complete(root, alice, workdir_for):
    d = _tree(workdir_for, alice)
    (d / "file").write_text("f\n")
    identity = Identity.lookup(alice.name)
    spool = os.open(d / "spool", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.rename(d / "spool", d / "spool-moved")             # a held fd is staged as it is, path or not
        new, pins = pinning.pin(_spec("cbatch-pin-idem", str(d / "data"), str(d / "file")), identity, root,
                                held=[spool])
    finally:
        os.close(spool)
    assert new.mounts[0] == Mount("/etc/passwd", "/etc/passwd")              # system files are not pinned
    assert [m.source for m in new.mounts[1:]] == list(pins.points)
    assert Path(pins.points[1]).read_text() == "f\n" and os.listdir(pins.points[0]) == ["mine"]
    Path(pins.held[0]).write_text("out\n")
    assert (d / "spool-moved").read_text() == "out\n"
    assert len(_staged_mounts(root)) == 3
    assert pinning.unpin("cbatch-pin-idem", root) == []
    assert pinning.unpin("cbatch-pin-idem", root) == []
    assert _staged_mounts(root) == [] and pinning.staged(root) == []
    assert (d / "data" / "mine").read_text() == "mine\n"                     # unpinning never deletes data


def test_unpin_under_a_staging_root_with_escaped_characters(pdaemon, alice, workdir_for):
    # mountinfo octal-escapes space, tab, newline and backslash; unpin compares in that form and must still
    # find (and remove) every staging mount under such a root, and nothing beside it.
    d = _tree(workdir_for, alice)
    root = os.path.join(MOUNT_DIR, f"esc {os.getpid()}\\x\ty")
    beside = os.path.join(MOUNT_DIR, f"esc {os.getpid()}\\x\tyz")
    raw = Path("/proc/self/mountinfo").read_bytes

    def under(r: str) -> int:
        return raw().count(pinning._mangled(r) + b"/")
    try:
        pinning.pin(_spec("cbatch-pin-esc", str(d / "data")), Identity.lookup(alice.name), root)
        pinning.pin(_spec("cbatch-pin-esc", str(d / "data")), Identity.lookup(alice.name), beside)
        assert b"\\040" in pinning._mangled(root) and under(root) == 1 and under(beside) == 1
        assert pinning._mount_points(os.path.join(root, "cbatch-pin-esc")) == [os.path.join(root, "cbatch-pin-esc", "1")]
        assert pinning.unpin("cbatch-pin-esc", root) == []
        assert under(root) == 0 and under(beside) == 1
    finally:
        for r in (root, beside):
            assert pinning.unpin_all(r) == []
            os.rmdir(r)
    assert (d / "data" / "mine").read_text() == "mine\n"


# ---- the daemon cleans up after crashes and at unregister ------------------------------------------------------
def _stale(pdaemon, name: str, source: str, alice) -> None:
    pinning.pin(_spec(name, source), Identity.lookup(alice.name), pdaemon.mount_root)
    assert _staged_mounts(os.path.join(pdaemon.mount_root, name))


def test_daemon_restart_removes_stale_staging(pdaemon, alice, workdir_for):
    d = _tree(workdir_for, alice)
    _stale(pdaemon, f"cbatch-stale-{os.getpid()}", str(d / "data"), alice)
    os.mkdir(os.path.join(pdaemon.mount_root, "cbatch-empty-stale"))
    old_server = _fork_server(pdaemon)
    pdaemon.restart()
    assert _staged_mounts(pdaemon.mount_root) == [] and pinning.staged(pdaemon.mount_root) == []
    # the old daemon's fork server ended with it (its end of the control socket closed); the new one has its own
    assert wait_until(lambda: not os.path.exists(f"/proc/{old_server}"), 10) is not None
    assert _fork_server(pdaemon) != old_server
    assert (d / "data" / "mine").read_text() == "mine\n"


def test_unregister_removes_the_jobs_staging_only(pdaemon, alice, workdir_for):
    d = _tree(workdir_for, alice)
    job_id = f"{os.getpid()}.pin-unreg"
    mine = [container_name(job_id), container_name(job_id, "-run-3")]
    other = container_name(job_id + "x")
    for name in mine + [other]:
        _stale(pdaemon, name, str(d / "data"), alice)
    reply = client.call(pdaemon.socket, "unregister", job_id=job_id, _timeout=30)
    assert reply["errors"] == []
    assert pinning.staged(pdaemon.mount_root) == [other]
    assert pinning.unpin(other, pdaemon.mount_root) == []
    assert wait_until(lambda: not _staged_mounts(pdaemon.mount_root), 5) is not None
