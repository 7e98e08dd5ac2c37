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


@pytest.mark.parametrize("module", ["policy", "mountset", "imagerefs", "spec"])
def test_policy_source_does_no_io(module):
    source = (Path(policy.__file__).parent / f"{module}.py").read_text()
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


# --- no mount inside another (runc CVE-2024-45310: targets created through user-writable paths) ---------

NEST_CONFIG = CONFIG + """
  scratchrw:
    mounts: ["/scratch:rw"]
  scratchro:
    mounts: ["/scratch"]
  moved:
    mounts: ["/opt/apps:/home/alice/apps"]
  inhome:
    mounts: ["/home/alice/sub"]
"""


def nest(directives=Directives(), queue="batch", cwd="/home/alice", env=None, run=False):
    config = parse(NEST_CONFIG, path="site.yaml", hostname="vm")
    j = job(queue=queue, cwd=cwd, env=env)
    if run:
        return policy.decide_run(config, j, directives, ["true"], fake_resolve)
    return policy.decide(config, j, directives, fake_resolve)


def nest_refuse(*args, **kw) -> str:
    with pytest.raises(PolicyError) as info:
        nest(*args, **kw)
    return info.value.message


def targets(spec):
    return [m.target for m in spec.mounts]


def assert_flat(spec):
    """No target strictly inside another: nothing for the engine to create through another mount."""
    ts = targets(spec)
    for a in ts:
        for b in ts:
            assert not a.startswith(b.rstrip("/") + "/"), (a, b)


def test_user_mount_target_inside_home_is_refused():
    msg = nest_refuse(d("#CBATCH --image=debian:12 --mount /scratch/alice/data:/home/alice/data"))
    assert msg == ("cbatch: directive line 2: mount target inside another mount: /home/alice/data inside "
                   "/home/alice (home directory) (cbatch never mounts one path inside another: the engine would "
                   "create it through directories the user can change; choose a target outside /home/alice)")


@pytest.mark.parametrize("target", ["/tmp/1.vm/x", "/work/deep/er", "/home/alice/sub/x", "/d/inner"])
def test_user_mount_inside_any_job_or_user_mount_is_refused(target):
    text = "#CBATCH --image=debian:12 --mount /scratch/alice:/d --mount /scratch/alice/data:" + target
    msg = nest_refuse(d(text), cwd="/work" if target.startswith("/work") else "/home/alice")
    assert "mount target inside another mount" in msg and msg.startswith("cbatch: directive line 2: ")


def test_user_mount_containing_a_job_mount_is_refused_naming_the_directive():
    # The user's mount at /home covers the home mount's target: the home would be created inside it.
    msg = nest_refuse(d("#CBATCH --image=debian:12 --mount /scratch/alice:/home"))
    assert msg.startswith("cbatch: directive line 2: mount target inside another mount: /home/alice inside /home")


def test_user_mount_onto_etc_would_hold_passwd_and_is_refused():
    msg = nest_refuse(d("#CBATCH --image=debian:12 --mount /scratch/alice:/etc"))
    assert msg.startswith("cbatch: directive line 2: mount target inside another mount: /etc/passwd inside /etc")


def test_identity_user_mount_inside_rw_home_is_dropped_as_redundant():
    spec = nest(d("#CBATCH --image=debian:12 --mount /home/alice/sub:/home/alice/sub:rw"))
    assert "/home/alice/sub" not in targets(spec) and Mount("/home/alice", "/home/alice", False) in spec.mounts
    assert_flat(spec)


def test_identity_user_mount_ro_inside_rw_home_is_refused_not_widened():
    msg = nest_refuse(d("#CBATCH --image=debian:12 --mount /home/alice/sub:/home/alice/sub:ro"))
    assert "mount target inside another mount: /home/alice/sub inside /home/alice" in msg


def test_symlinked_identity_looking_user_mount_is_not_redundant():
    # /home/alice/lnk -> /etc: source /etc, target /home/alice/lnk: not the same object, refused.
    msg = nest_refuse(d("#CBATCH --image=debian:12 --mount /scratch/alice/data-link:/home/alice/x"))
    assert "/home/alice/x inside /home/alice" in msg


@pytest.mark.parametrize("cwd", ["/home/alice/sub", "/home/alice"])
def test_cwd_and_tmpdir_inside_home_are_one_mount(cwd):
    spec = nest(d("#CBATCH --image=debian:12"), cwd=cwd, env=[("TMPDIR", "/home/alice/sub")])
    assert targets(spec).count("/home/alice") == 1 and "/home/alice/sub" not in targets(spec)
    assert spec.workdir == cwd
    assert_flat(spec)


def test_home_inside_cwd_is_dropped():
    spec = nest(d("#CBATCH --image=debian:12"), cwd="/scratch", env=[("TMPDIR", "/scratch/alice")])
    assert Mount("/scratch", "/scratch", False) in spec.mounts and "/scratch/alice" not in targets(spec)
    assert_flat(spec)


def test_job_mounts_inside_rw_identity_site_mount_are_dropped():
    spec = nest(d("#CBATCH --image=debian:12"), queue="scratchrw", cwd="/scratch/alice/data",
                env=[("TMPDIR", "/scratch/alice")])
    assert Mount("/scratch", "/scratch", False) in spec.mounts
    assert not [t for t in targets(spec) if t.startswith("/scratch/")]
    assert spec.workdir == "/scratch/alice/data"
    assert_flat(spec)


def test_rw_job_mount_inside_ro_site_mount_is_refused():
    msg = nest_refuse(d("#CBATCH --image=debian:12"), queue="scratchro", cwd="/scratch/alice/data")
    assert msg.startswith("cbatch: working directory: mount target inside another mount: /scratch/alice/data "
                          "inside /scratch (site mount /scratch)")


def test_site_mount_inside_home_is_refused_and_moved_site_mount_too():
    assert "mount target inside another mount: /home/alice/apps inside /home/alice" in nest_refuse(
        d("#CBATCH --image=debian:12"), queue="moved")
    # Identity ro site mount inside the rw home: the admin asked for read-only, so it is not dropped.
    msg = nest_refuse(d("#CBATCH --image=debian:12"), queue="inhome")
    assert msg.startswith("cbatch: site mount /home/alice/sub: mount target inside another mount")


def test_nodefile_and_script_inside_rw_cwd_are_dropped():
    # ro job files inside a rw identity view of the same directory: same files, host permissions decide.
    from cbatch.core.mountset import MountSet
    ms = MountSet()
    ms.add(Mount("/spool", "/spool", False), "job", "working directory")
    ms.add(Mount("/spool/1.SC", "/spool/1.SC", True), "job", "job script")
    ms.add(Mount("/etc", "/etc", False), "job", "home directory")
    ms.add(Mount("/etc/passwd", "/etc/passwd", True), "cbatch", "passwd")
    assert ms.mounts() == (Mount("/spool", "/spool", False), Mount("/etc", "/etc", False))


def test_nesting_order_and_deepest_parent():
    from cbatch.core.mountset import MountSet
    ms = MountSet()
    # Added deepest first: the rule still compares each with its deepest kept ancestor.
    ms.add(Mount("/a/b/c", "/a/b/c", False), "user", "directive line 4")
    ms.add(Mount("/x", "/a/b", False), "user", "directive line 3")
    ms.add(Mount("/a", "/a", False), "job", "home directory")
    with pytest.raises(PolicyError) as info:
        ms.mounts()
    # /a/b inside /a (not identity): refused before /a/b/c is even considered.
    assert info.value.message.startswith("cbatch: directive line 3: mount target inside another mount: /a/b inside /a")
    ms = MountSet()
    ms.add(Mount("/a", "/a", False), "job", "home directory")
    ms.add(Mount("/a/b", "/a/b", False), "job", "working directory")      # dropped
    ms.add(Mount("/a/b/c", "/a/b/c", True), "user", "directive line 3")   # vs /a (kept), ro in rw: refused
    with pytest.raises(PolicyError) as info:
        ms.mounts()
    assert "/a/b/c inside /a (home directory)" in info.value.message
    ms = MountSet()
    ms.add(Mount("/a", "/a", True), "site", "site mount /a")
    ms.add(Mount("/a/b", "/a/b", True), "user", "directive line 3")       # same mode, identity: dropped
    ms.add(Mount("/ab", "/ab", False), "user", "directive line 4")        # a sibling, not inside /a
    assert ms.mounts() == (Mount("/a", "/a", True), Mount("/ab", "/ab", False))


def test_cbatch_run_applies_the_same_rule():
    msg = nest_refuse(d("#CBATCH --image=debian:12 --mount /scratch/alice/data:/home/alice/data"), run=True)
    assert "mount target inside another mount" in msg


def test_every_spec_is_flat():
    for cwd in ("/home/alice", "/home/alice/sub", "/work", "/scratch", "/scratch/alice"):
        for queue in ("batch", "scratchrw"):
            assert_flat(nest(d("#CBATCH --image=debian:12 --mount /scratch/alice/data:/data"), queue=queue, cwd=cwd))


# --- working directory and limits: one line instead of the engine's text ---------------------------------

@pytest.mark.parametrize("workdir", ["/proc/self/fd/3", "/proc", "/sys/fs", "/dev", "/dev/shm", "//proc/1/cwd",
                                     "/tmp/../proc/self/cwd", "/.cbatch", "/.cbatch/x"])
def test_workdir_in_kernel_interfaces_is_refused(workdir):
    msg = refuse(d(f"#CBATCH --image=debian:12 --workdir {workdir}"))
    assert msg.startswith("cbatch: --workdir: not allowed as working directory: /")
    assert msg.endswith("(not /proc, /sys, /dev, /.cbatch or anything under them)")


def test_workdir_elsewhere_is_normalised():
    assert decide(d("#CBATCH --image=debian:12 --workdir //opt/./x/")).workdir == "/opt/x"
    assert decide(d("#CBATCH --image=debian:12 --workdir /procx")).workdir == "/procx"


def node_cfg(cpus, memory):
    return parse(CONFIG, path="site.yaml", hostname="vm", node=(cpus, memory))


def limits_of(resources, cpus=4, memory=8 << 30):
    return policy.limits(node_cfg(cpus, memory), job(resources=resources))


@pytest.mark.parametrize("resources,expected", [
    ("ncpus=2,mem=1gb", (2, 1 << 30)),
    ("ncpus=100,mem=100gb", (4, 8 << 30)),               # clamped to the node
    ("nodes=1:ppn=8,pmem=2gb", (4, 8 << 30)),            # pmem * 8 = 16gb, clamped
    ("ncpus=65536", (4, None)),
    ("walltime=100:00:00", (None, None)),
    ("mem=6mb", (None, 6 << 20)),
])
def test_limits_clamped_to_the_node(resources, expected):
    assert limits_of(resources) == expected


def test_unknown_node_size_does_not_clamp():
    assert limits_of("ncpus=100,mem=100gb", 0, 0) == (100, 100 << 30)


@pytest.mark.parametrize("resources,message", [
    ("ncpus=100000", "cbatch: resource list: more CPUs than any node has: 100000 cpus (at most 4 on this node)"),
    ("nodes=1:ppn=70000", "cbatch: resource list: more CPUs than any node has: 70000 cpus (at most 4 on this node)"),
    ("mem=2000pb", f"cbatch: resource list: more memory than any node has: {2000 << 50} bytes "
                   "(at most 1024pb (mem, or pmem times cpus))"),
    ("nodes=1:ppn=4,pmem=300pb", f"cbatch: resource list: more memory than any node has: {1200 << 50} bytes "
                                 "(at most 1024pb (mem, or pmem times cpus))"),
    ("mem=1kb", "cbatch: resource list: memory limit too small to start a container: 1024 bytes "
                "(mem or pmem times cpus at least 6mb)"),
    ("walltime=99999999999", "cbatch: resource list: walltime out of range: walltime=99999999999 "
                             "(at most 2147483647 seconds)"),
])
def test_absurd_resources_are_refused_in_one_line(resources, message):
    with pytest.raises(PolicyError) as info:
        policy.decide(node_cfg(4, 8 << 30), job(resources=resources), d("#CBATCH --image=debian:12"), fake_resolve)
    assert info.value.message == message


def test_limits_not_applied_under_a_batch_cgroup():
    spec = policy.decide(node_cfg(4, 8 << 30), job(resources="ncpus=100000", cgroup="/torque/1.vm"),
                         d("#CBATCH --image=debian:12"), fake_resolve)
    assert spec.cpus is None and spec.memory_bytes is None


# --- digest pinning: name@sha256 of an allowed tag (issue 10.15) ------------------------------------------

D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
PIN_CONFIG = """
daemon: {instance: test}
queues:
  exact: {images: ["reg.example:5000/hpc/tool:1"], image: native}
  glob: {images: ["reg.example:5000/hpc/tool:*"], image: native}
  hub: {images: ["busybox:1.36"], image: native}
"""
LOCAL = {  # what the engine knows: digest reference -> that image's tags
    f"reg.example:5000/hpc/tool@{D1}": ("reg.example:5000/hpc/tool:1", "reg.example:5000/other:1"),
    f"reg.example:5000/hpc/tool@{D2}": ("reg.example:5000/hpc/tool:2",),
    f"reg.example:5000/evil@{D1}": ("reg.example:5000/hpc/tool:1",),
    f"busybox@{D1}": ("busybox:1.36",),
    f"docker.io/library/busybox@{D1}": ("busybox:1.36",),     # the engine answers either spelling
}


def pin(queue, image, tags_of=lambda ref: LOCAL.get(ref, ())):
    config = parse(PIN_CONFIG, path="site.yaml", hostname="vm")
    return policy.decide(config, job(queue=queue), d(f"#CBATCH --image={image}"), fake_resolve, tags_of)


@pytest.mark.parametrize("queue,image", [
    ("exact", f"reg.example:5000/hpc/tool@{D1}"),
    ("glob", f"reg.example:5000/hpc/tool@{D1}"),
    ("glob", f"reg.example:5000/hpc/tool@{D2}"),
    ("glob", f"reg.example:5000/hpc/tool:2@{D2}"),          # the glob matches the reference itself
    ("hub", f"busybox@{D1}"),
    ("hub", f"docker.io/library/busybox@{D1}"),
])
def test_digest_of_an_allowed_tag_is_allowed(queue, image):
    spec = pin(queue, image)
    assert spec.image == image


@pytest.mark.parametrize("queue,image", [
    ("exact", f"reg.example:5000/hpc/tool@{D2}"),           # that digest is tag 2's, and only 1 is allowed
    ("exact", f"reg.example:5000/evil@{D1}"),               # an allowed tag's image, but another repository
    ("exact", f"reg.example:5000/hpc/tool@{'sha256:' + '3' * 64}"),   # unknown here
    ("hub", f"busybox@{D2}"),
])
def test_digest_not_of_an_allowed_tag_is_refused(queue, image):
    with pytest.raises(PolicyError) as info:
        pin(queue, image)
    assert info.value.message.startswith(f"cbatch: image: not allowed in queue {queue}: {image} (allowed: ")
    assert info.value.message.endswith("; a digest only as the image of an allowed tag on this node)")


def test_digest_without_a_lookup_is_refused_and_tags_are_not_looked_up():
    with pytest.raises(PolicyError):
        pin("exact", f"reg.example:5000/hpc/tool@{D1}", tags_of=None)
    seen = []
    assert pin("exact", "reg.example:5000/hpc/tool:1", tags_of=lambda ref: seen.append(ref) or ()).image
    assert seen == []                                       # only digest references consult the engine


def test_decide_run_takes_tags_of_too():
    config = parse(PIN_CONFIG, path="site.yaml", hostname="vm")
    spec = policy.decide_run(config, job(queue="exact"), d(f"#CBATCH --image=reg.example:5000/hpc/tool@{D1}"),
                             ["true"], fake_resolve, 0, lambda ref: LOCAL.get(ref, ()))
    assert spec.image == f"reg.example:5000/hpc/tool@{D1}"


@pytest.mark.parametrize("image,patterns,expected", [
    (f"reg.example:5000/hpc/tool@{D1}", ("reg.example:5000/hpc/tool:1",), True),
    (f"reg.example:5000/hpc/tool@{D1}", ("reg.example:5000/hpc/tool:*",), True),
    (f"reg.example:5000/hpc/tool@{D1}", ("reg.example:5000/hpc/*",), True),
    (f"busybox@{D1}", ("docker.io/library/busybox:1.36",), True),
    (f"reg.example:5000/evil@{D1}", ("reg.example:5000/hpc/tool:1",), False),
    (f"reg.example:5000/hpc/toolx@{D1}", ("reg.example:5000/hpc/tool:*",), False),
])
def test_repo_allowed_for_the_submit_filter(image, patterns, expected):
    assert policy.repo_allowed(image, patterns) is expected



def test_interactive_job_without_a_script_mounts_none():
    """``qsub -I``: pbs_mom names a .SC file the interactive job does not have; the daemon passes an empty
    script path and the policy then mounts no job script (a missing source would refuse the whole job)."""
    import dataclasses
    interactive = dataclasses.replace(job(), script_path="")
    spec = policy.decide(cfg(), interactive, d("#CBATCH --image=cbatch-test/busybox:1"), fake_resolve)
    assert isinstance(spec, ContainerSpec)
    assert SCRIPT not in {m.target for m in spec.mounts}
    assert Mount("/home/alice", "/home/alice", False) in spec.mounts


def test_env_drop_matcher_is_fnmatchcase():
    # policy._matcher compiles a queue's env_drop once; it must drop exactly what fnmatchcase would.
    from fnmatch import fnmatchcase
    pats = ("PATH", "LD_*", "BASH_FUNC_*", "X?Y", "[AB]Z", "_", "A.B", "SHLVL")
    names = ["PATH", "PATHX", "XPATH", "LD_PRELOAD", "LD_", "LD", "BASH_FUNC_f%%", "XaY", "XY", "AZ", "BZ", "CZ",
             "_", "__", "A.B", "AxB", "path", "SHLVL\n", "LD_\nX"]
    m = policy._matcher(pats)
    assert [n for n in names if m(n)] == [n for n in names if any(fnmatchcase(n, p) for p in pats)]
    assert not policy._matcher(())("PATH")
