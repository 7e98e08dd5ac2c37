"""cbatch.host.cgroups on a fake /sys/fs/cgroup tree (plain directories: rmdir of an empty one works, a file
inside stands for a busy cgroup)."""

from __future__ import annotations

import os

import pytest

from cbatch.host import cgroups

V1 = ("blkio", "cpu", "cpuacct", "cpuset", "devices", "freezer", "memory", "pids", "systemd", "unified")


@pytest.fixture
def root(tmp_path):
    for ctl in V1:
        (tmp_path / ctl).mkdir()
        (tmp_path / ctl / "cgroup.procs").write_text("")
    return tmp_path


def mk(root, ctl, rel):
    path = root / ctl / rel.lstrip("/")
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_hierarchies_v1_and_v2(root, tmp_path_factory):
    assert [os.path.basename(h) for h in cgroups.hierarchies(str(root))] == sorted(V1)
    v2 = tmp_path_factory.mktemp("v2")
    (v2 / "cgroup.controllers").write_text("cpu memory")
    assert cgroups.hierarchies(str(v2)) == [str(v2)]


def test_torque_parent(root):
    assert cgroups.torque_parent("7.vm", root=str(root)) is None
    mk(root, "cpuset", "/torque/7.vm")
    assert cgroups.torque_parent("7.vm", root=str(root)) == "/torque/7.vm"
    mk(root, "memory", "/torque/8.vm")
    assert cgroups.torque_parent("8.vm", root=str(root)) == "/torque/8.vm"
    mk(root, "blkio", "/torque/9.vm")           # only Docker's leftovers: not a TORQUE job cgroup
    assert cgroups.torque_parent("9.vm", root=str(root)) is None
    for junk in ("", "../memory", "a/b", "x\n"):
        assert cgroups.torque_parent(junk, root=str(root)) is None


def test_torque_parent_v2(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("")
    (tmp_path / "torque" / "3.vm").mkdir(parents=True)
    assert cgroups.torque_parent("3.vm", root=str(tmp_path)) == "/torque/3.vm"


def test_slurm_parent_of_pid(tmp_path):
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_text(
        "9:name=systemd:/system.slice/slurmd.service\n"
        "8:pids:/slurm_vm/uid_1001/job_17/step_batch/task_0\n"
        "4:memory:/slurm_vm/uid_1001/job_17/step_batch/task_0\n0::/\n")
    assert cgroups.slurm_parent_of_pid(42, proc=str(tmp_path)) == "/slurm_vm/uid_1001/job_17"
    (tmp_path / "43").mkdir()
    (tmp_path / "43" / "cgroup").write_text("0::/slurm/uid_5/job_9/step_0\n")
    assert cgroups.slurm_parent_of_pid(43, proc=str(tmp_path)) == "/slurm/uid_5/job_9"
    (tmp_path / "44").mkdir()
    (tmp_path / "44" / "cgroup").write_text("4:memory:/user.slice\n")
    assert cgroups.slurm_parent_of_pid(44, proc=str(tmp_path)) is None
    assert cgroups.slurm_parent_of_pid(45, proc=str(tmp_path)) is None


def test_tidy_removes_empty_dirs_bottom_up_and_keeps_torque_own(root):
    for ctl in ("blkio", "freezer", "pids", "systemd", "unified", "cpu"):
        mk(root, ctl, "/torque/5.vm/abc123")
    for ctl in ("memory", "cpuset", "cpuacct", "devices"):
        mk(root, ctl, "/torque/5.vm/abc123")
    mk(root, "blkio", "/torque/6.vm")                      # another job: never touched
    left = cgroups.tidy("/torque/5.vm", root=str(root))
    assert left == []
    for ctl in ("blkio", "freezer", "pids", "systemd", "unified", "cpu"):
        assert not (root / ctl / "torque" / "5.vm").exists()
        assert (root / ctl / "torque").is_dir()            # the parent's parent is not ours
    for ctl in ("memory", "cpuset", "cpuacct", "devices"):
        assert (root / ctl / "torque" / "5.vm").is_dir()   # pbs_mom removes these itself
        assert not (root / ctl / "torque" / "5.vm" / "abc123").exists()
    assert (root / "blkio" / "torque" / "6.vm").is_dir()


def test_tidy_reports_busy_and_other_parents(root):
    busy = mk(root, "pids", "/slurm_vm/uid_1/job_2/cid")
    (busy / "tasks").write_text("123")                       # a live cgroup: rmdir fails
    mk(root, "freezer", "/slurm_vm/uid_1/job_2/cid")
    left = cgroups.tidy("/slurm_vm/uid_1/job_2", root=str(root))
    assert left == [str(root / "pids/slurm_vm/uid_1/job_2"), str(busy)]
    assert not (root / "freezer/slurm_vm/uid_1/job_2").exists()


def test_tidy_never_follows_symlinks_or_climbs(root, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (outside / "precious").mkdir()
    top = mk(root, "blkio", "/torque/5.vm")
    os.symlink(outside, top / "link")
    cgroups.tidy("/torque/5.vm", root=str(root))
    assert (outside / "precious").is_dir()
    for bad in ("torque/5.vm", "/torque/../memory", "/", "/torque/./x", ""):
        with pytest.raises(ValueError):
            cgroups.tidy(bad, root=str(root))


def test_tidy_missing_parent_is_empty(root):
    assert cgroups.tidy("/torque/none.vm", root=str(root)) == []
    assert cgroups.existing("/torque/none.vm", root=str(root)) == []


# ---- favordynmods: does joining a cgroup wait for an RCU grace period? --------------------------------------------
HYBRID = """tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime{extra} 0 0
"""


@pytest.mark.parametrize("text, want", [
    (HYBRID.format(extra=""), (None, "/sys/fs/cgroup/unified")),
    (HYBRID.format(extra=",favordynmods"), ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/unified")),
    ("cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\n", (None, "/sys/fs/cgroup")),
    ("cgroup /sys/fs/cgroup/cpuset cgroup rw,cpuset 0 0\ncgroup /sys/fs/cgroup/pids cgroup rw,favordynmods,pids 0 0\n",
     ("/sys/fs/cgroup/pids", "/sys/fs/cgroup/cpuset")),
    # an option that merely contains the word is not the option; other filesystems do not count
    ("cgroup /sys/fs/cgroup/x cgroup rw,nofavordynmods_x 0 0\ntmpfs /favordynmods tmpfs rw,favordynmods 0 0\n",
     (None, "/sys/fs/cgroup/x")),
    ("proc /proc proc rw 0 0\n", (None, None)),
])
def test_favor_dynmods_reads_the_cgroup_mounts(tmp_path, text, want):
    mounts = tmp_path / "mounts"
    mounts.write_text(text)
    assert cgroups.favor_dynmods(str(mounts)) == want


def test_node_check_says_how_to_stop_the_wait_and_never_fails(tmp_path):
    from cbatch.admin import nodecheck
    mounts = tmp_path / "mounts"
    mounts.write_text(HYBRID.format(extra=""))
    ok, detail = nodecheck.cgroup_attach(str(mounts))
    assert ok and "`mount -o remount,favordynmods /sys/fs/cgroup/unified`" in detail
    mounts.write_text(HYBRID.format(extra=",favordynmods"))
    assert nodecheck.cgroup_attach(str(mounts)) == (
        True, "favordynmods on /sys/fs/cgroup/unified: a container (or job) joins its cgroup without waiting")
    assert nodecheck.cgroup_attach(str(tmp_path / "none"))[0]
