"""The direct engine's pure parts: the queue key, the OCI config made from a ContainerSpec, the seccomp
profile's conditions, the router's choice."""

from __future__ import annotations

import json
import os

import pytest

from cbatch.core.config import ConfigError, parse
from cbatch.core.errors import EngineError
from cbatch.core.spec import FILTER_PATH, HELPER_PATH, INIT_PATH, SECCOMP_PATH, ContainerSpec, Mount
from cbatch.engines import ocispec, seccomp
from cbatch.engines.base import Stdio
from cbatch.engines.router import Router


def spec(**kw) -> ContainerSpec:
    base = dict(name="cbatch-1.vm-abc", image="img", argv=("/bin/bash",), uid=1001, gid=1003,
                groups=(1003, 1001, 1002), workdir="/home/a", env=(("HOME", "/home/a"), ("PATH", "/x")),
                mounts=(Mount("/stage/0", "/home/a", False), Mount("/stage/1", "/etc/passwd", True)),
                stdin_line="/s.SC\n", pids_limit=256, memory_bytes=1 << 30, cpus=2.0, cpuset="0-1",
                umask=0o077, hostname="node1", cgroup_parent="/torque/1.vm")
    base.update(kw)
    return ContainerSpec(**base)


def config(s: ContainerSpec, image_config=None) -> dict:
    return ocispec.config(s, image_config or {"Env": ["PATH=/usr/bin", "LANG=C"]}, init="/usr/bin/tini", helper="/h/cbatch-exec",
                          etc_dir="/b/etc", cgroups_path="/torque/1.vm/" + s.name,
                          seccomp=("/h/cbatch-filter", "/b/seccomp.bpf"),
                          rlimits=[("RLIMIT_NOFILE", 1024, 4096)], port_start=1024)


def test_queue_engine_key_defaults_to_auto_and_is_validated():
    cfg = parse("queues: {q: {engine: docker}}", path="site.yaml", hostname="n")
    assert cfg.defaults.engine == "auto" and cfg.queue("q").engine == "docker"
    with pytest.raises(ConfigError) as exc:
        parse("defaults: {engine: runc}", path="site.yaml", hostname="n")
    assert exc.value.message.startswith("cbatch: site.yaml: defaults.engine: not an engine: runc")


def test_identity_is_numeric_with_no_capability_and_no_new_privileges():
    c = config(spec())
    user = c["process"]["user"]
    assert user == {"uid": 1001, "gid": 1003, "additionalGids": [1003, 1001, 1002], "umask": 0o077}
    assert all(v == [] for v in c["process"]["capabilities"].values())
    assert c["process"]["noNewPrivileges"] is True
    # The filter is loaded by the container's first program, not compiled by runc at every start.
    assert "seccomp" not in c["linux"] and c["process"]["args"][:3] == [FILTER_PATH, SECCOMP_PATH, "--"]


def test_command_env_and_init():
    c = config(spec())
    loader = [FILTER_PATH, SECCOMP_PATH, "--"]
    assert c["process"]["args"] == loader + [INIT_PATH, "--", HELPER_PATH, "--stdin-line", "/s.SC\n", "--",
                                             "/bin/bash"]
    env = dict(e.split("=", 1) for e in c["process"]["env"])
    assert env["PATH"] == "/x" and env["LANG"] == "C" and env["TINI_KILL_PROCESS_GROUP"] == "1"
    assert env["HOSTNAME"] == "node1"
    assert config(spec(init=False, stdin_line=None))["process"]["args"] == loader + [HELPER_PATH, "--", "/bin/bash"]
    ep = config(spec(argv=(), use_entrypoint=True, stdin_line=None), {"Entrypoint": ["/ep"], "Cmd": ["a"]})
    assert ep["process"]["args"] == loader + [INIT_PATH, "--", HELPER_PATH, "--", "/ep", "a"]
    with pytest.raises(EngineError):
        config(spec(argv=(), use_entrypoint=True), {})


def test_mounts_paths_limits_and_network_none():
    c = config(spec(), {"Volumes": {"/data": {}}})
    dest = {m["destination"]: m for m in c["mounts"]}
    assert dest["/home/a"]["source"] == "/stage/0" and "ro" not in dest["/home/a"]["options"]
    assert "ro" in dest["/etc/passwd"]["options"] and dest["/etc/hosts"]["source"] == "/b/etc/hosts"
    assert dest[INIT_PATH]["source"] == "/usr/bin/tini" and "ro" in dest[INIT_PATH]["options"]
    assert dest[HELPER_PATH]["source"] == "/h/cbatch-exec" and "ro" in dest[HELPER_PATH]["options"]
    assert dest[FILTER_PATH]["source"] == "/h/cbatch-filter" and "ro" in dest[FILTER_PATH]["options"]
    assert dest[SECCOMP_PATH]["source"] == "/b/seccomp.bpf" and "ro" in dest[SECCOMP_PATH]["options"]
    assert dest["/data"]["type"] == "tmpfs" and "size=%d" % ocispec.VOLUME_TMPFS_BYTES in dest["/data"]["options"]
    assert "/proc/kcore" in c["linux"]["maskedPaths"] and "/proc/sys" in c["linux"]["readonlyPaths"]
    res = c["linux"]["resources"]
    assert res["memory"] == {"limit": 1 << 30, "swap": 1 << 30} and res["pids"] == {"limit": 256}
    assert res["cpu"] == {"quota": 200000, "period": 100000, "cpus": "0-1"}
    assert {"type": "network"} in c["linux"]["namespaces"] and c["linux"]["cgroupsPath"].startswith("/torque/1.vm/")
    assert c["process"]["rlimits"] == [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096}]
    assert c["hostname"] == "node1" and c["root"] == {"path": "rootfs", "readonly": False}
    json.dumps(c)


def test_volume_inside_a_host_mount_is_refused():
    with pytest.raises(EngineError) as exc:
        config(spec(), {"Volumes": {"/home/a/v": {}}})
    assert "VOLUME inside a mounted host directory" in exc.value.message


@pytest.mark.parametrize("kw", [{"network": "bridge"}, {"devices": ("/dev/fuse",)}])
def test_what_direct_cannot_do_is_refused(kw):
    with pytest.raises(EngineError):
        config(spec(**kw))


PROFILE = {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
           "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86"]}],
           "syscalls": [
               {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
               {"names": ["mount"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
               {"names": ["clone"], "action": "SCMP_ACT_ALLOW", "excludes": {"caps": ["CAP_SYS_ADMIN"]},
                "args": [{"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
               {"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["amd64"]}},
               {"names": ["sync_file_range2"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["ppc64le"]}},
               {"names": ["new"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "9.9"}},
           ]}


def test_seccomp_conditions_for_a_job_without_capabilities():
    out = seccomp.convert(PROFILE, arch="amd64", kernel=(6, 1))
    names = [n for r in out["syscalls"] for n in r["names"]]
    assert names == ["read", "arch_prctl", "clone", "clone3"]
    assert out["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"] and out["defaultErrnoRet"] == 1
    assert out["syscalls"][2]["args"][0] == {"index": 0, "value": 0x7E020000, "valueTwo": 0,
                                             "op": "SCMP_CMP_MASKED_EQ"}
    assert out["syscalls"][3] == {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}


def test_x32_is_filtered_unless_the_kernel_says_it_has_no_x32_abi(tmp_path):
    profile = dict(PROFILE, archMap=[{"architecture": "SCMP_ARCH_X86_64",
                                      "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]}])
    assert seccomp.convert(profile, arch="amd64")["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86",
                                                                      "SCMP_ARCH_X32"]
    # 32-bit (ia32) calls stay filtered, never dropped: only the ABI the kernel cannot run goes.
    assert seccomp.convert(profile, arch="amd64", x32=False)["architectures"] == ["SCMP_ARCH_X86_64",
                                                                                 "SCMP_ARCH_X86"]
    without, with_, other = tmp_path / "no", tmp_path / "yes", tmp_path / "other"
    without.write_text("CONFIG_COMPAT=y\n# CONFIG_X86_X32_ABI is not set\n")
    with_.write_text("CONFIG_X86_X32_ABI=y\n")
    assert seccomp.x32_abi([str(without)]) is False and seccomp.x32_abi([str(with_)]) is True
    # No readable kernel config: unknown, so x32 stays in the filter.
    assert seccomp.x32_abi([str(other)]) is True


def test_shipped_profile_converts_without_privileged_calls():
    if not seccomp.available():
        pytest.skip("no /usr/share/containers/seccomp.json")
    out = seccomp.oci_profile()
    allowed = {n for r in out["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" and not r.get("args")
               for n in r["names"]}
    for call in ("mount", "umount2", "pivot_root", "unshare", "setns", "clone", "clone3", "init_module",
                 "kexec_load", "settimeofday", "bpf"):
        assert call not in allowed, call
    assert "read" in allowed and "execve" in allowed


class _Docker:
    url = "unix:///x"

    def __init__(self, driver="overlay2"):
        self.api = type("A", (), {"info": lambda _s: {"Driver": driver}})()

    def _call(self, _what, _value, fn, *a, **k):
        return fn(*a, **k)


class _Direct:
    def unavailable(self, helper):
        return None


@pytest.mark.parametrize("kw,stdio,driver,want", [
    ({}, Stdio(), "overlay2", "direct"),
    ({"engine": "docker"}, Stdio(), "overlay2", "docker"),
    ({"network": "bridge"}, Stdio(), "overlay2", "docker"),
    ({}, Stdio(attach=True, tty=True), "overlay2", "docker"),
    ({}, Stdio(), "btrfs", "docker"),
    ({"engine": "direct"}, Stdio(), "vfs", "docker"),
    ({"no_new_privileges": False}, Stdio(), "overlay2", "docker"),
])
def test_router_choice_and_logged_fallback(kw, stdio, driver, want, caplog):
    caplog.set_level("INFO", logger="cbatchd")
    r = Router(_Docker(driver), _Direct())
    _engine, name = r.choose(spec(**kw), stdio, "/h/cbatch-exec")
    assert name == want
    if want == "docker" and kw.get("engine") != "docker":
        assert "engine docker instead of direct" in caplog.text


def test_mount_target_through_an_image_symlink_is_refused(tmp_path):
    from cbatch.engines import rootfs
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "x").symlink_to("y")
    (root / "y").symlink_to("/etc")
    (root / "home").mkdir()
    rootfs.check_targets(str(root), ["/home/a", "/home/a/x/passwd", "/nothing/here"])   # under a target: host
    with pytest.raises(EngineError) as exc:
        rootfs.check_targets(str(root), ["/x/passwd"])
    assert exc.value.message.startswith("cbatch: mount: target passes through a symlink in the image: "
                                        "/x/passwd (/x -> /etc)")


def test_bundle_status_and_scan(tmp_path):
    from cbatch.engines import bundles
    b = tmp_path / "inst" / "c1"
    b.mkdir(parents=True)
    assert bundles.read_status(str(b)) is None
    (b / "status").write_text("status 137 oom 1\nerror boom\n")
    assert bundles.read_status(str(b)) == {"status": 137, "oom": 1, "error": "boom"}
    (b / "status").write_text("status 0 oom 0 cpu_us 5 peak_bytes -1 deleted shim\n")
    assert bundles.read_status(str(b)) == {"status": 0, "oom": 0, "cpu_us": 5, "deleted": "shim"}
    bundles.write_json(str(b / "meta.json"), {"labels": {"cbatch.instance": "inst", "cbatch.job": "1.vm"}})
    (tmp_path / "runc").mkdir()
    assert bundles.scan(str(tmp_path), {"cbatch.job": "1.vm"}, bundles.read_json) == ["c1"]
    assert bundles.scan(str(tmp_path), {"cbatch.instance": "other"}, bundles.read_json) == []
    assert bundles.instance_of(str(tmp_path), "c1") == "inst"
    assert bundles.start_time(os.getpid()) is not None
