"""policy.decide / decide_run: the spec it builds and every refusal, with a fake resolver (no I/O)."""

import posixpath
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cbatch.core import policy
from cbatch.core.config import parse
from cbatch.core.directives import Directives, UserMount, parse_script
from cbatch.core.errors import DirectiveError, PolicyError
from cbatch.core.job import Identity, JobContext, Registration
from cbatch.core.spec import ContainerSpec, Mount, Native

SCRIPT = "/var/spool/torque/mom_priv/jobs/1.vm.SC"
ALICE = Identity(user="alice", uid=1000, gid=1000, groups=(1000, 27), home="/home/alice", shell="/bin/bash")
ROOT = Identity(user="root", uid=0, gid=0, groups=(0,), home="/root", shell="/bin/bash")

CONFIG = """
daemon: {instance: test}
defaults:
  image: native
  images: ["cbatch-test/*", "debian:12"]
  env: {SITE: s, SHARED: site}
  mounts: ["/opt/apps"]
  user_mounts: {allowed: true, prefixes: ["~", /scratch]}
  networks: [none, bridge]
queues:
  closed:
    image: cbatch-test/busybox:1
    native: false
    user_mounts: {allowed: false}
  ro:
    hardening: {read_only_rootfs: true, pids_limit: 64}
    shm_size: 128mb
  rootok:
    allow_root: true
"""

# The fake host, as alice sees it: canonical paths, symlinks, and things that do not exist.
LINKS = {"/scratch/alice/shadow": "/etc/shadow", "/scratch/alice/up": "/scratch", "/home/alice/lnk": "/etc",
         "/scratch/alice/data-link": "/scratch/alice/data"}
EXISTS = {"/", "/etc", "/etc/shadow", "/scratch", "/scratch/alice", "/scratch/alice/data", "/home/alice",
          "/home/alice/sub", SCRIPT, "/var/spool/torque/aux/1.vm", "/tmp/1.vm", "/scratchy", "/work", "/root"}


def fake_resolve(path: str, identity: Identity) -> str:
    assert identity == ALICE or identity == ROOT
    out = "/"
    for part in path.split("/"):
        if part in ("", "."):
            continue
        out = posixpath.dirname(out) if part == ".." else posixpath.join(out, part)
        seen = 0
        while out in LINKS:
            out = LINKS[out]
            seen += 1
            assert seen < 10
    if out not in EXISTS:
        raise PolicyError("path", "no such file or directory", path)
    return out


def cfg(hostname="vm"):
    return parse(CONFIG, path="site.yaml", hostname=hostname)


def job(queue="batch", env=None, ident=ALICE, cgroup=None, resources="nodes=1:ppn=2,mem=100mb,walltime=60",
        cwd="/home/alice", script_args=""):
    reg = Registration(job_id="1.vm", user=ident.user, group="g", name="n", resource_list=resources, queue=queue,
                       account="", script_path=SCRIPT, session_id=7, batch="torque", registered_at=1.0)
    base = [("HOME", ident.home), ("PATH", "/bin:/usr/bin"), ("PBS_NODEFILE", "/var/spool/torque/aux/1.vm"),
            ("TMPDIR", "/tmp/1.vm"), ("LD_PRELOAD", "/host/lib.so"), ("BASH_FUNC_module%%", "() { :; }"),
            ("SHARED", "job"), ("USER", ident.user)]
    return JobContext.for_start(reg, ident, "/bin/bash", SCRIPT + script_args + "\n", cwd, base + list(env or ()),
                                cgroup_parent=cgroup)


def decide(directives=Directives(), **kw):
    queue = kw.pop("queue", "batch")
    return policy.decide(cfg(), job(queue=queue, **kw), directives, fake_resolve)


def refuse(directives=Directives(), exc=PolicyError, **kw) -> str:
    with pytest.raises(exc) as info:
        decide(directives, **kw)
    return info.value.message


def d(text: str) -> Directives:
    return parse_script(("#!/bin/bash\n" + text + "\necho\n").encode())


# --- the spec ------------------------------------------------------------------------------------------

def test_full_spec_for_a_transparent_job():
    spec = decide(d("#CBATCH --image=cbatch-test/busybox:1 --env USER=override --env NEW=1"), script_args=" a b")
    assert isinstance(spec, ContainerSpec)
    assert spec.name == policy.container_name("1.vm") and spec.name.startswith("cbatch-1.vm-")
    assert spec.image == "cbatch-test/busybox:1"
    assert spec.argv == ("/bin/bash",) and spec.stdin_line == SCRIPT + " a b\n"
    assert (spec.uid, spec.gid, spec.groups) == (1000, 1000, (1000, 27))
    assert spec.workdir == "/home/alice"
    assert spec.mounts == (
        Mount(SCRIPT, SCRIPT, True), Mount("/etc/passwd", "/etc/passwd", True), Mount("/etc/group", "/etc/group", True),
        Mount("/var/spool/torque/aux/1.vm", "/var/spool/torque/aux/1.vm", True), Mount("/tmp/1.vm", "/tmp/1.vm", False),
        Mount("/home/alice", "/home/alice", False), Mount("/opt/apps", "/opt/apps", True))
    assert spec.env == (("SITE", "s"), ("SHARED", "job"), ("HOME", "/home/alice"),
                        ("PBS_NODEFILE", "/var/spool/torque/aux/1.vm"), ("TMPDIR", "/tmp/1.vm"), ("USER", "override"),
                        ("NEW", "1"), ("CBATCH_IMAGE", "cbatch-test/busybox:1"))
    assert spec.labels == (("cbatch.job", "1.vm"), ("cbatch.uid", "1000"), ("cbatch.kind", "job"))
    assert spec.network == "none" and spec.use_entrypoint is False and spec.read_only_rootfs is False
    assert spec.cpus == 2.0 and spec.memory_bytes == 100 << 20 and spec.cgroup_parent is None
    assert spec.pids_limit == 4096 and spec.cap_drop_all and spec.no_new_privileges and spec.init
    assert spec.shm_bytes is None


def test_host_env_is_dropped_so_the_image_env_applies():
    env = decide(d("#CBATCH --image=debian:12")).env_dict()
    for key in ("PATH", "LD_PRELOAD", "BASH_FUNC_module%%"):
        assert key not in env


def test_environment_layers_for_check():
    q = cfg().queue("batch")
    layers = policy.environment(q, job(), d("#CBATCH --env SHARED=mine"), "img:1")
    assert ("SITE", "s", "site") in layers and ("SHARED", "mine", "--env") in layers
    assert ("HOME", "/home/alice", "job") in layers and layers[-1] == ("CBATCH_IMAGE", "img:1", "cbatch")


def test_cgroup_leaves_limits_to_the_batch_system():
    spec = decide(d("#CBATCH --image=debian:12"), cgroup="/torque/1.vm")
    assert spec.cgroup_parent == "/torque/1.vm" and spec.cpus is None and spec.memory_bytes is None


@pytest.mark.parametrize("resources,cpus,memory", [
    ("nodes=1:ppn=4,pmem=100mb", 4.0, 400 << 20),
    ("ncpus=3,mem=1gb", 3.0, 1 << 30),
    ("nodes=vm+other:ppn=8", 1.0, None),        # this node (vm) is named once, with ppn 1
    ("nodes=other+vm:ppn=8", 8.0, None),
    ("walltime=60", None, None),
])
def test_cpus_and_memory_from_request(resources, cpus, memory):
    spec = decide(d("#CBATCH --image=debian:12"), resources=resources)
    assert spec.cpus == cpus and spec.memory_bytes == memory


def test_directive_options_reach_the_spec():
    spec = decide(d("#CBATCH --image=debian:12 --workdir /scratch/alice/../alice/data --network bridge\n"
                    "#CBATCH --readonly --entrypoint --mount /scratch/alice/data:/data:ro"))
    assert spec.workdir == "/scratch/alice/data" and spec.network == "bridge"
    assert spec.read_only_rootfs and spec.use_entrypoint
    assert spec.mounts[-1] == Mount("/scratch/alice/data", "/data", True)


def test_queue_hardening_and_shm():
    spec = decide(d("#CBATCH --image=debian:12"), queue="ro")
    assert spec.read_only_rootfs and spec.pids_limit == 64 and spec.shm_bytes == 128 << 20


def test_cwd_outside_home_is_mounted_and_used():
    spec = decide(d("#CBATCH --image=debian:12"), cwd="/work")
    assert Mount("/work", "/work", False) in spec.mounts and spec.workdir == "/work"
    assert sum(m.target == "/home/alice" for m in spec.mounts) == 1


def test_cwd_equal_home_is_one_mount():
    spec = decide(d("#CBATCH --image=debian:12"))
    assert [m.target for m in spec.mounts].count("/home/alice") == 1


def test_symlinked_user_mount_inside_prefix_is_canonicalised():
    spec = decide(d("#CBATCH --image=debian:12 --mount /scratch/alice/data-link:/d"))
    assert spec.mounts[-1] == Mount("/scratch/alice/data", "/d", False)


def test_tilde_prefix_means_home():
    spec = decide(d("#CBATCH --image=debian:12 --mount /home/alice/sub:/sub"))
    assert spec.mounts[-1] == Mount("/home/alice/sub", "/sub", False)


# --- image choice --------------------------------------------------------------------------------------

def test_cbatch_image_env_overrides_directive():
    spec = decide(d("#CBATCH --image=debian:12"), env=[("CBATCH_IMAGE", "cbatch-test/debian:12")])
    assert spec.image == "cbatch-test/debian:12" and spec.env_dict()["CBATCH_IMAGE"] == "cbatch-test/debian:12"


def test_queue_default_image():
    spec = decide(queue="closed")
    assert spec.image == "cbatch-test/busybox:1"


def test_native_default_and_explicit():
    assert decide() == Native(shell="/bin/bash", reason="image native (from queue defaults default)")
    assert decide(d("#CBATCH --image=native")) == Native(shell="/bin/bash", reason="image native (from --image)")
    assert isinstance(decide(d("#CBATCH --image=debian:12"), env=[("CBATCH_IMAGE", "native")]), Native)


def test_native_refused():
    assert refuse(d("#CBATCH --image=native"), queue="closed") == (
        "cbatch: image: native (no container) is not allowed in queue closed: --image "
        "(allowed images: cbatch-test/*, debian:12)")


def test_image_not_allowed_lists_what_is():
    assert refuse(d("#CBATCH --image=ubuntu:22.04")) == (
        "cbatch: image: not allowed in queue batch: ubuntu:22.04 (allowed: cbatch-test/*, debian:12, native)")
    assert refuse(d("#CBATCH --image=ubuntu:22.04"), queue="closed") == (
        "cbatch: image: not allowed in queue closed: ubuntu:22.04 (allowed: cbatch-test/*, debian:12)")


def test_invalid_reference_from_environment():
    assert refuse(env=[("CBATCH_IMAGE", "Evil Image;rm")]) == (
        "cbatch: image: not a valid image reference (from CBATCH_IMAGE): Evil Image;rm "
        "([registry[:port]/]name[:tag][@sha256:<64 hex>], lowercase name)")


def test_digest_reference_allowed_by_glob():
    ref = "cbatch-test/busybox:1@sha256:" + "ab" * 32
    assert decide(Directives(image=ref)).image == ref


# --- refusals: mounts ----------------------------------------------------------------------------------

def test_user_mounts_not_allowed():
    assert refuse(d("#CBATCH --image=cbatch-test/busybox:1\n#CBATCH --mount /scratch/alice:/s"), queue="closed") == (
        "cbatch: directive line 3: user mounts are not allowed in queue closed: /scratch/alice:/s "
        "(ask your admin, or copy the data into your home)")


def test_mount_outside_prefixes():
    assert refuse(d("#CBATCH --image=debian:12 --mount /etc:/e")) == (
        "cbatch: directive line 2: mount source outside the allowed directories: /etc (allowed: /home/alice, /scratch)")


def test_prefix_is_a_path_component_not_a_string_prefix():
    assert refuse(d("#CBATCH --image=debian:12 --mount /scratchy:/x")).startswith(
        "cbatch: directive line 2: mount source outside the allowed directories: /scratchy")


def test_dotdot_escape_refused():
    assert refuse(d("#CBATCH --image=debian:12 --mount /scratch/../etc:/e")) == (
        "cbatch: directive line 2: mount source outside the allowed directories: /etc (resolved from "
        "/scratch/../etc) (allowed: /home/alice, /scratch)")


def test_symlink_escape_to_shadow_refused():
    assert refuse(d("#CBATCH --image=debian:12 --mount /scratch/alice/shadow:/s:ro")) == (
        "cbatch: directive line 2: mount source outside the allowed directories: /etc/shadow (resolved from "
        "/scratch/alice/shadow) (allowed: /home/alice, /scratch)")
    assert refuse(d("#CBATCH --image=debian:12 --mount /home/alice/lnk/shadow:/s")).startswith(
        "cbatch: directive line 2: mount source outside the allowed directories: /etc/shadow (resolved from")


def test_whole_host_mount_refused():
    assert refuse(d("#CBATCH --image=debian:12 --mount /:/host")) == (
        "cbatch: directive line 2: mount source outside the allowed directories: / (allowed: /home/alice, /scratch)")


def test_missing_source_is_the_resolvers_error():
    assert refuse(d("#CBATCH --image=debian:12 --mount /scratch/nope:/n")) == (
        "cbatch: path: no such file or directory: /scratch/nope")


RESERVED = ["/etc/passwd", "/etc/group", "/etc/shadow", SCRIPT, "/proc", "/proc/1", "/sys", "/sys/fs/cgroup",
            "/dev", "/dev/shm", "/.cbatch", "/.cbatch/exec", "/", "/proc/../dev", "/tmp/../etc/shadow"]


@pytest.mark.parametrize("target", RESERVED)
def test_reserved_targets_refused(target):
    msg = refuse(Directives(image="debian:12", mounts=(UserMount("/scratch/alice", target, False, 5),)))
    assert msg == (f"cbatch: directive line 5: mount onto a reserved path: {target} (not /, /etc/passwd, /etc/group, "
                   "/etc/shadow, /proc, /sys, /dev, /.cbatch, the job script, or anything under them)")


def test_reserved_target_refused_before_resolving_source():
    # Even a nonexistent source: the target alone is enough to refuse, and says so.
    assert "mount onto a reserved path: /etc/passwd" in refuse(d("#CBATCH --image=debian:12 --mount /nope:/etc/passwd"))


def test_relative_mount_path_refused():
    for m in (UserMount("scratch", "/s", False, 3), UserMount("/scratch", "s", False, 3)):
        msg = refuse(Directives(image="debian:12", mounts=(m,)), exc=DirectiveError)
        assert msg == (f"cbatch: directive line 3: mount paths must be absolute: {m.source}:{m.target} "
                       "(SRC:DST[:ro|rw] with absolute paths)")


def test_mount_target_collision():
    assert refuse(d("#CBATCH --image=debian:12 --mount /scratch/alice:/home/alice")) == (
        "cbatch: directive line 2: mount target already used: /home/alice (cbatch already mounts /home/alice there)")
    assert refuse(d("#CBATCH --image=debian:12 --mount /scratch/alice:/opt/apps")).startswith(
        "cbatch: directive line 2: mount target already used: /opt/apps")


def test_same_mount_as_cbatch_is_merged():
    spec = decide(d("#CBATCH --image=debian:12 --mount /home/alice:/home/alice:ro"))
    assert [m for m in spec.mounts if m.target == "/home/alice"] == [Mount("/home/alice", "/home/alice", False)]


def test_reserved_working_directory_refused():
    assert refuse(d("#CBATCH --image=debian:12"), cwd="/") == (
        "cbatch: working directory: cannot be mounted into the container: / (not /, /etc/passwd, /etc/group, "
        "/etc/shadow, /proc, /sys, /dev, /.cbatch, the job script, or anything under them)")


def test_tmpdir_onto_reserved_refused():
    assert refuse(d("#CBATCH --image=debian:12"), env=[("TMPDIR", "/dev/shm")]).startswith(
        "cbatch: TMPDIR: cannot be mounted into the container: /dev/shm")


# --- refusals: network, root ----------------------------------------------------------------------------

def test_network_not_allowed():
    assert refuse(d("#CBATCH --image=debian:12 --network host")) == (
        "cbatch: network: not allowed in queue batch: host (allowed: none, bridge)")


def test_check_request_is_decides_own_check_without_host_access():
    # The submit filter calls it at qsub time: same messages as decide, and nothing resolved on the host.
    closed = cfg().queue("closed")
    mounts = d("#CBATCH --image=cbatch-test/busybox:1\n#CBATCH --mount /nowhere:/s")
    with pytest.raises(PolicyError) as info:
        policy.check_request(closed, "closed", mounts, "cbatch-test/busybox:1")
    assert info.value.message == refuse(mounts, queue="closed", cwd="/does/not/exist") == (
        "cbatch: directive line 3: user mounts are not allowed in queue closed: /nowhere:/s "
        "(ask your admin, or copy the data into your home)")
    with pytest.raises(PolicyError) as info:
        policy.check_request(cfg().queue("batch"), "batch", Directives(network="host"), "debian:12")
    assert info.value.message == refuse(Directives(image="debian:12", network="host"))
    policy.check_request(closed, "closed", Directives(network="host"), policy.NATIVE)   # no container: fine


def test_root_refused_unless_allowed():
    assert refuse(d("#CBATCH --image=debian:12"), ident=ROOT, cwd="/root") == (
        "cbatch: user: jobs of uid 0 may not run in a container in queue batch: root "
        "(run as a normal user, or set allow_root for this queue)")
    spec = decide(d("#CBATCH --image=debian:12"), ident=ROOT, cwd="/root", queue="rootok")
    assert spec.uid == 0
    assert isinstance(decide(d("#CBATCH --image=native"), ident=ROOT, cwd="/root"), Native)


# --- cbatch run ------------------------------------------------------------------------------------------

def test_decide_run():
    spec = policy.decide_run(cfg(), job(env=[("CBATCH_IMAGE", "cbatch-test/busybox:1")]),
                             Directives(image="debian:12"), ["python3", "-c", "print(1)"], fake_resolve, 3)
    assert spec.argv == ("python3", "-c", "print(1)") and spec.stdin_line is None
    assert spec.image == "debian:12"                       # --image wins over CBATCH_IMAGE for run
    assert spec.name == policy.container_name("1.vm", "-run-3") and spec.name.endswith("-run-3")
    assert dict(spec.labels)["cbatch.kind"] == "run"
    assert all(m.target != SCRIPT for m in spec.mounts)


def test_decide_run_inherits_job_image_and_refuses():
    spec = policy.decide_run(cfg(), job(env=[("CBATCH_IMAGE", "cbatch-test/busybox:1")]), Directives(), ["id"],
                             fake_resolve, 0)
    assert spec.image == "cbatch-test/busybox:1"
    with pytest.raises(DirectiveError) as exc:
        policy.decide_run(cfg(), job(), Directives(), [], fake_resolve, 0)
    assert exc.value.message == "cbatch: cbatch run: no command given (cbatch run [OPTIONS] CMD [ARGS...])"
    with pytest.raises(PolicyError) as exc:
        policy.decide_run(cfg(), job(), Directives(image="debian:12", mounts=(UserMount("/etc", "/e", True, 0),)),
                          ["id"], fake_resolve, 0)
    assert exc.value.message.startswith("cbatch: cbatch run: mount source outside the allowed directories: /etc")


# --- names -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("job_id", ["1.vm", "12[3].server.example", "a/b", "a_b", "..", "-x", "x" * 300, "é"])
def test_container_names_are_docker_safe_and_unique(job_id):
    name = policy.container_name(job_id)
    assert re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", name) and len(name) < 128


def test_container_names_distinguish_ids_that_sanitise_alike():
    assert policy.container_name("1.a/b") != policy.container_name("1.a_b")
    assert policy.container_name("1[2]") != policy.container_name("1_2_")


# --- purity ----------------------------------------------------------------------------------------------

def test_policy_imports_without_docker():
    code = ("import sys; sys.modules['docker'] = None; import cbatch.core.policy; "
            "assert 'docker' not in [m for m in sys.modules if sys.modules[m] is not None]")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_policy_source_does_no_io():
    source = (Path(policy.__file__)).read_text()
    for needle in ("open(", "os.stat", "os.lstat", "os.path.", "os.environ", "os.getcwd", "pwd.", "grp.",
                   "subprocess", "socket", "import docker", "realpath", "os.listdir", "Path(", "getgrouplist"):
        assert needle not in source, needle


def test_kernel_filesystems_refused_even_under_a_root_prefix():
    wide = parse(CONFIG.replace('prefixes: ["~", /scratch]', "prefixes: [/]"), path="site.yaml", hostname="vm")
    EXISTS_ADD = {"/proc", "/proc/1", "/sys", "/dev"}
    def resolve(path, ident):
        return path if path in EXISTS_ADD else fake_resolve(path, ident)
    for src in ("/proc/1", "/sys", "/dev"):
        with pytest.raises(PolicyError) as exc:
            policy.decide(wide, job(), Directives(image="debian:12", mounts=(UserMount(src, "/x", True, 2),)), resolve)
        assert exc.value.message == (f"cbatch: directive line 2: mount source is a kernel filesystem: {src} "
                                     "(not /proc, /sys, /dev or anything under them)")
    spec = policy.decide(wide, job(), Directives(image="debian:12", mounts=(UserMount("/etc", "/hostetc", True, 2),)),
                         resolve)
    assert spec.mounts[-1] == Mount("/etc", "/hostetc", True)      # the admin allowed "/": their call
