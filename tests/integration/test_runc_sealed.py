"""The real runc, run from cbatchd's sealed copy (cbatch.engines.runcbinary), accepts it as its own clone:
the container's ``runc init`` runs from that memfd, not from a bind mount of /usr/sbin/runc made on the
host for this one start (two host mount events and a re-exec per start, which runc then skips)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import uuid

import pytest

from cbatch.engines.direct import RUNC
from cbatch.engines.runcbinary import SEALS, SealedRunc

BUSYBOX = "/bin/busybox"


@pytest.fixture
def bundle(tmp_path):
    if not os.access(RUNC, os.X_OK) or not os.path.exists(BUSYBOX):
        pytest.fail(f"needs {RUNC} and busybox-static (scripts/setup installs both)")
    root = tmp_path / "bundle"
    (root / "rootfs" / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "rootfs" / "bin" / "busybox")
    os.symlink("busybox", root / "rootfs" / "bin" / "true")
    subprocess.run([RUNC, "spec", "--bundle", str(root)], check=True)
    config = json.loads((root / "config.json").read_text())
    config["process"].update(args=["/bin/true"], terminal=False)
    (root / "config.json").write_text(json.dumps(config))
    return root


def _created_init(runc_path: str, bundle, state) -> tuple:
    """``runc create`` (its init then waits for ``start``): the init's exe link and the seals of its file."""
    cid = f"cbt-sealed-{uuid.uuid4().hex[:8]}"
    try:
        # The created init holds its stdio until started: nothing here may wait for their EOF.
        subprocess.run(["runc", "--root", str(state), "create", "--bundle", str(bundle), cid], executable=runc_path,
                       check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=60)
        pid = json.loads(subprocess.run([RUNC, "--root", str(state), "state", cid], check=True,
                                        capture_output=True).stdout)["pid"]
        exe = os.readlink(f"/proc/{pid}/exe")
        fd = os.open(f"/proc/{pid}/exe", os.O_RDONLY | os.O_CLOEXEC)
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            seals = None                            # not a memfd
        finally:
            os.close(fd)
        return exe, seals
    finally:
        subprocess.run([RUNC, "--root", str(state), "delete", "--force", cid], capture_output=True, timeout=60)


def test_runc_from_the_sealed_copy_runs_its_init_from_it(bundle, tmp_path):
    sealed = SealedRunc(RUNC)
    try:
        with sealed.executable() as path:
            exe, seals = _created_init(path, bundle, tmp_path / "state")
    finally:
        sealed.close()
    assert (exe, seals) == ("/memfd:runc (deleted)", SEALS)


def test_runc_from_its_file_makes_its_own_copy_each_start(bundle, tmp_path):
    """The other side: started by its path, runc's init is not the sealed copy (runc made its own for the
    start, a read-only bind of the binary on this kernel) - what each direct start paid before."""
    exe, seals = _created_init(RUNC, bundle, tmp_path / "state")
    assert exe != "/memfd:runc (deleted)" and seals != SEALS, (exe, seals)
