"""End-to-end 8: containers run without capabilities, setuid, network or a way to uid 0."""

from __future__ import annotations

from torque_helpers import cbatch_lines, direct_config, docker_inspect, job_containers, script


def test_no_capabilities_no_new_privs(mom, alice):
    r = mom.submit(script("grep -E '^(CapEff|CapPrm|NoNewPrivs)' /proc/self/status"), alice.name).wait(120)
    assert r.exit_status == 0, r.stderr
    status = dict(l.split(":\t") for l in r.stdout.decode().splitlines())
    assert int(status["CapEff"], 16) == 0
    assert int(status["CapPrm"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"


def test_setuid_does_not_give_root(mom, carol):
    r = mom.submit(script("/bin/suid-euid; /bin/suid-busybox id -u; echo rc=$?", image="cbatch-test/setuid:1",
                          shebang="#!/bin/sh"), carol.name).wait(120)
    assert r.exit_status == 0, r.stderr
    words = r.stdout.decode().split()
    assert words[:2] == [str(carol.uid), str(carol.uid)], r.stdout
    assert "0" not in words[:3]


def test_no_network_but_lo(mom, alice):
    r = mom.submit(script("tail -n +3 /proc/net/dev | cut -d: -f1"), alice.name).wait(120)
    assert r.exit_status == 0, r.stderr
    assert r.stdout.decode().split() == ["lo"]


def test_pids_limit(mom, daemon, alice, workdir):
    job = mom.submit(script("echo ready; while [ ! -e go ]; do sleep 0.1; done"), alice.name, initdir=str(workdir))
    try:
        assert job.wait_output(b"ready\n", timeout=60), job.peek()
        (cid,) = job_containers(daemon.instance, job.job_id)
        info = direct_config(cid) if cid.startswith("direct-") else docker_inspect(cid)
    finally:
        (workdir / "go").touch()
    assert job.wait(60).exit_status == 0
    if cid.startswith("direct-"):
        # runc gets numeric ids and nothing to resolve; no capability at all, not even for the drop.
        assert info["linux"]["resources"]["pids"] == {"limit": 256}
        assert {"type": "network"} in info["linux"]["namespaces"]
        assert info["process"]["user"]["uid"] == alice.uid and info["process"]["user"]["gid"] == alice.gid
        assert all(caps == [] for caps in info["process"]["capabilities"].values())
        assert info["process"]["noNewPrivileges"] is True
        # The filter is not runc's to compile: the container's first program loads the bundle's program.
        assert "seccomp" not in info["linux"] and info["process"]["args"][:3] == [
            "/.cbatch/filter", "/.cbatch/seccomp.bpf", "--"]
        return
    assert info["HostConfig"]["PidsLimit"] == 256
    assert info["HostConfig"]["NetworkMode"] == "none"
    assert info["HostConfig"]["Privileged"] is False
    # Numeric 0:0 so the engine resolves nothing in the image; the helper (PID 1) drops to the job's ids
    # before anything else runs (test_no_process_runs_as_root, test_image_identity.py).
    assert info["Config"]["User"] == "0:0"
    assert sorted(info["HostConfig"]["CapAdd"]) == ["CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID"] or \
        sorted(info["HostConfig"]["CapAdd"]) == ["SETGID", "SETPCAP", "SETUID"]
    assert not info["HostConfig"]["GroupAdd"]


def test_no_process_runs_as_root(mom, alice):
    r = mom.submit(script("""
for f in /proc/[0-9]*/status; do awk '/^(Uid|Gid):/ {print $2, $3, $4, $5}' "$f"; done | sort -u
"""), alice.name).wait(120)
    assert r.exit_status == 0, r.stderr
    ids = set(r.stdout.decode().split())
    assert ids and "0" not in ids, r.stdout


def test_root_job_is_refused(mom, daemon):
    job = mom.submit(script("id -u"), "root")
    r = job.wait(120)
    assert r.exit_status == 125, (r.stdout, r.stderr)
    assert r.stdout == b""
    assert len(cbatch_lines(r.stderr)) >= 1
    assert not job_containers(daemon.instance, job.job_id)
