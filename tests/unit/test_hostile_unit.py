"""Issue 6, hostile inputs, the pure half: directive, policy and protocol cases that need no daemon.

The fake host (resolver, config, job builder) is test_policy.py's; the table is docs/hostile-inputs.md.
"""

import json
import random

import pytest

from cbatch import protocol
from cbatch.core import directives
from cbatch.core.directives import Directives, UserMount, parse_options, parse_script
from cbatch.core.errors import DaemonError, DirectiveError, PolicyError
from cbatch.core.spec import Native

from test_policy import ALICE, ROOT, SCRIPT, d, decide, refuse

DOCKER_RUN_OPTIONS = ["--privileged", "--cap-add=SYS_ADMIN", "--device=/dev/sda", "--user=0", "--user 0:0",
                      "--security-opt=apparmor=unconfined", "--volume=/:/host", "-v /:/host", "--pid=host",
                      "--ipc=host", "--uts=host", "--userns=host", "--runtime=runc", "--group-add=0",
                      "--cgroup-parent=/", "--gpus=all", "--add-host=x:1.2.3.4", "--sysctl=kernel.x=1"]


@pytest.mark.parametrize("opt", DOCKER_RUN_OPTIONS)
def test_docker_run_options_are_not_directives(opt):
    with pytest.raises(DirectiveError) as info:
        d(f"#CBATCH --image=cbatch-test/debian:12 {opt}")
    assert info.value.message.startswith("cbatch: directive line 2: ")
    assert "unknown option" in info.value.message or "unexpected argument" in info.value.message
    with pytest.raises(DirectiveError) as info:
        parse_options(opt.split())
    assert info.value.message.startswith("cbatch: cbatch run: ")


def test_thousands_of_directives_stop_at_the_limit():
    with pytest.raises(DirectiveError) as info:
        d("\n".join(["#CBATCH --env=K=V"] * 10000))
    msg = info.value.message
    assert "too many directives" in msg and f"directive line {directives.MAX_DIRECTIVES + 2}" in msg


def test_50mb_script_only_first_mib_counts():
    """A 50 MB comment block with a directive past the first MiB: that directive is never read."""
    body = b"#!/bin/bash\n" + b"# pad\n" * (50 * (1 << 20) // 6) + b"#CBATCH --privileged\necho\n"
    assert parse_script(body) == Directives()


@pytest.mark.parametrize("seed", range(8))
def test_random_binary_scripts_give_directives_or_one_directive_error(seed):
    rnd = random.Random(seed)
    data = bytes(rnd.getrandbits(8) for _ in range(1 << 16))
    for body in (data, b"#!/bin/bash\n#" + data, b"#CBATCH " + data):
        try:
            parse_script(body)
        except DirectiveError as exc:
            assert "\n" not in exc.message


@pytest.mark.parametrize("ref", ["cbatch-test/debian:12;id", "cbatch-test/debian:$(id)", "cbatch-test/debian:12 x",
                                 "../../etc/passwd", "/etc/passwd", "cbatch-test/debian@sha256:abc",
                                 "cbatch-test/debian@md5:" + "0" * 32, "a" * 300, "-privileged", "Debian:12"])
def test_hostile_image_references_are_invalid(ref):
    assert not directives.valid_reference(ref)
    # qsub -v CBATCH_IMAGE=<ref>: the image from the environment gets the same check
    assert "not a valid image reference" in refuse(env=[("CBATCH_IMAGE", ref)])


def test_identity_and_job_come_from_the_registration_not_the_environment():
    spoof = [("USER", "root"), ("LOGNAME", "root"), ("HOME", "/root"), ("PBS_O_LOGNAME", "bob"),
             ("PBS_JOBID", "2.vm"), ("CBATCH_CONFIG", "/tmp/evil.yaml"), ("SUDO_UID", "0")]
    spec = decide(d("#CBATCH --image=cbatch-test/debian:12"), env=spoof)
    assert (spec.uid, spec.gid) == (ALICE.uid, ALICE.gid)
    assert dict(spec.labels)["cbatch.job"] == "1.vm" and spec.name.startswith("cbatch-1.vm-")
    sources = {m.source for m in spec.mounts}
    assert "/home/alice" in sources and "/root" not in sources
    # The spoofed values are only environment variables inside the container, with no power.
    assert dict(spec.env)["USER"] == "root"


def test_loader_variables_never_reach_the_container():
    spec = decide(d("#CBATCH --image=cbatch-test/debian:12"),
                  env=[("LD_PRELOAD", "/x.so"), ("LD_AUDIT", "/x.so"), ("LD_LIBRARY_PATH", "/x"),
                       ("BASH_FUNC_id%%", "() { echo 0; }"), ("PATH", "/evil")])
    env = dict(spec.env)
    assert not {"LD_PRELOAD", "LD_AUDIT", "LD_LIBRARY_PATH", "BASH_FUNC_id%%", "PATH"} & set(env)


@pytest.mark.parametrize("source", ["/var/run/docker.sock", "/run/docker.sock"])
def test_engine_socket_mount_refused(source, monkeypatch):
    import test_policy
    monkeypatch.setattr(test_policy, "EXISTS", test_policy.EXISTS | {"/run/docker.sock"})
    monkeypatch.setattr(test_policy, "LINKS", {**test_policy.LINKS, "/var/run": "/run"})
    msg = refuse(Directives(image="cbatch-test/debian:12", mounts=(UserMount(source, "/var/run/docker.sock",
                                                                             False, 3),)))
    assert msg.startswith("cbatch: directive line 3: mount source outside the allowed directories: "
                          "/run/docker.sock"), msg


@pytest.mark.parametrize("source", ["/proc/1/root", "/proc/self/root/etc", "/sys/fs/cgroup", "/dev/sda"])
def test_kernel_paths_never_mountable(source):
    refuse(Directives(image="cbatch-test/debian:12", mounts=(UserMount(source, "/data", False, 3),)))


@pytest.mark.parametrize("target", ["/etc/shadow", "/etc/passwd", "/.cbatch", "/.cbatch/exec", "/proc/sys",
                                    "/dev/shm", "/", "//", "//etc/shadow", "///.cbatch/exec", "/tmp/../etc/passwd", SCRIPT])
def test_reserved_targets_after_normalisation(target):
    msg = refuse(Directives(image="cbatch-test/debian:12",
                            mounts=(UserMount("/scratch/alice/data", target, False, 3),)))
    assert "reserved path" in msg


def test_network_host_and_container_refused():
    assert "not allowed" in refuse(d("#CBATCH --image=cbatch-test/debian:12 --network=host"))
    with pytest.raises(DirectiveError):
        d("#CBATCH --network=container:abc")


def test_native_through_the_environment_in_a_container_only_queue():
    msg = refuse(env=[("CBATCH_IMAGE", "native")], queue="closed")
    assert "native" in msg


def test_uid_0_needs_allow_root():
    assert "uid 0" in refuse(d("#CBATCH --image=cbatch-test/debian:12"), ident=ROOT, cwd="/root")
    assert isinstance(decide(ident=ROOT, cwd="/root"), Native)      # native root jobs are plain Torque


REG = {"job_id": "1.vm", "user": "alice", "group": "g", "name": "n", "resource_list": "", "queue": "batch",
       "account": "", "script_path": SCRIPT, "session_id": 7, "batch": "torque", "registered_at": 1.0}


def test_job_context_for_anothers_registration_is_refused():
    """PBS_JOBID of bob's job in alice's environment cannot matter; the daemon's own check, that a start's
    identity is the registration's user, is enforced by the builder too."""
    from cbatch.core.errors import JobError
    from cbatch.core.job import JobContext, Registration
    reg = Registration.from_dict({**REG, "user": "bob"})
    with pytest.raises(JobError):
        JobContext.for_start(reg, ALICE, "/bin/bash", SCRIPT + "\n", "/home/alice", [])


@pytest.mark.parametrize("body", [b"[" * 100000 + b"]" * 100000, b'{"a":' * 50000 + b"1" + b"}" * 50000])
def test_deeply_nested_json_is_a_malformed_message(body):
    """json raises RecursionError (not ValueError) on deep nesting: it must still be a clean refusal."""
    with pytest.raises(DaemonError) as info:
        protocol.decode(body)
    assert "malformed message" in info.value.message


@pytest.mark.parametrize("value", [None, 1, 1.5, True, [], {}, "x" * 10])
def test_registration_fields_of_the_wrong_type(value):
    from cbatch.core.errors import CbatchError
    from cbatch.core.job import Registration
    for key in ("job_id", "user", "script_path", "session_id", "batch"):
        bad = {**REG, key: value}
        try:
            Registration.from_dict(json.loads(json.dumps(bad)))
        except CbatchError:
            continue
        # accepted only when the value is of the right type and sane for that field
        assert (key == "session_id" and (value is None or type(value) is int)) or \
            (key != "session_id" and isinstance(value, str) and value), (key, value)
