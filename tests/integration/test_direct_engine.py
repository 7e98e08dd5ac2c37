"""The direct engine's own properties (the shared behaviour runs against both engines everywhere else):
what a job inside it can and cannot do, the image hold, the shim's lifetime, the fallback to Docker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

import image_builder
from cbatch.engines.runcbinary import SEALS
from torque_helpers import (DIRECT_BUNDLES, RUNC_ROOT, cbatch_lines, direct_bundle_file, direct_json, job_containers,
                            script, wait_until)


ENGINES_ONLY = ("direct",)     # conftest deselects these tests for the other engines


@pytest.fixture
def direct_daemon(daemon_factory, engine_name):
    assert engine_name == "direct"
    return daemon_factory("direct")


@pytest.fixture
def direct_mom(mom_factory, direct_daemon):
    return mom_factory(direct_daemon)


def test_job_runs_direct_without_capabilities_namespaces_or_privileged_calls(direct_mom, direct_daemon, alice):
    r = direct_mom.submit(script("""
grep -E '^(Uid|Gid|CapEff|CapBnd|NoNewPrivs|Seccomp|Seccomp_filters):' /proc/1/status | tr -s '\\t ' ' '
grep -E '^Seccomp_filters:' /proc/self/status | tr -s '\\t ' ' ' | sed 's/^/self /'
cat /sys/class/net/lo/operstate
ls /sys/class/net
unshare -U true 2>/dev/null && echo unshare-allowed || echo unshare-refused
mount -t tmpfs none /tmp 2>/dev/null && echo mount-allowed || echo mount-refused
cat /proc/kcore >/dev/null 2>&1 && echo kcore-readable || echo kcore-masked
umask
"""), alice.name).wait(120)
    assert r.exit_status == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert f"Uid: {alice.uid} {alice.uid} {alice.uid} {alice.uid}" in lines        # PID 1 (tini) too
    assert f"Gid: {alice.gid} {alice.gid} {alice.gid} {alice.gid}" in lines
    assert "CapEff: 0000000000000000" in lines and "CapBnd: 0000000000000000" in lines
    assert "NoNewPrivs: 1" in lines and "Seccomp: 2" in lines
    # Exactly one filter, on PID 1 (tini) as on the job: cbatch-filter loaded it before tini ran (a process of
    # the job could otherwise ptrace an unfiltered init), and runc no longer installs one of its own.
    assert "Seccomp_filters: 1" in lines and "self Seccomp_filters: 1" in lines
    assert "unknown" in lines and "lo" in lines and len([x for x in lines if x == "lo" or x.startswith("eth")]) == 1
    assert "unshare-refused" in lines and "mount-refused" in lines and "kcore-masked" in lines
    assert lines[-1] == "0077"
    assert "engine docker instead of direct" not in direct_daemon.log()


def test_an_x32_system_call_never_runs(direct_mom, alice):
    # On a kernel without the x32 ABI the filter leaves SCMP_ARCH_X32 out (one libseccomp pass less per start):
    # an x32 call (getpid | 0x40000000) must then be killed by the filter as a foreign architecture.
    r = direct_mom.submit(script("""
perl -e 'my $r = syscall(0x40000027); print "returned $r\\n"'
echo "perl $?"
""", image="cbatch-test/debian:12"), alice.name).wait(120)
    lines = r.stdout.decode().splitlines()
    from cbatch.engines import seccomp
    if seccomp.x32_abi():
        pytest.skip("this kernel has the x32 ABI: the filter keeps x32 and allows getpid there")
    assert lines == [f"perl {128 + signal.SIGSYS}"], (lines, r.stderr)        # killed by the filter


def test_image_is_held_while_a_direct_job_uses_it(direct_mom, direct_daemon, alice, workdir):
    tag = f"direct-hold-{uuid.uuid4().hex[:8]}:1"
    ref = image_builder.hostile_image(tag, files={"/etc/marker": "held\n"})
    image_id = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", ref], check=True,
                              capture_output=True, text=True).stdout.strip()
    try:
        job = direct_mom.submit(script("cat /etc/marker; while [ ! -e go ]; do sleep 0.1; done",
                                       image=ref, shebang="#!/bin/sh"),
                                alice.name, initdir=str(workdir), shell="/bin/sh")
        assert job.wait_output(b"held\n", timeout=60), job.peek()
        (cid,) = job_containers(direct_daemon.instance, job.job_id)
        assert cid.startswith("direct-")
        rm = subprocess.run(["docker", "rmi", "--no-prune", image_id], capture_output=True, text=True)
        assert rm.returncode != 0 and "container" in rm.stderr, rm.stderr     # Docker refuses: it is held
        (workdir / "go").touch()
        assert job.wait(60).exit_status == 0
        # Once prune asks what is in use (a dry run: nothing else is touched), the idle holder goes.
        from cbatch.clients import client
        client.call(direct_daemon.socket, "images", action="prune", dry_run=True)
        assert wait_until(lambda: subprocess.run(["docker", "rmi", image_id], capture_output=True).returncode == 0,
                          timeout=10) is not None
    finally:
        image_builder.remove(ref)


def test_image_in_use_is_kept_by_prune_and_held_across_a_daemon_restart(direct_mom, direct_daemon, alice, workdir):
    tag = f"direct-keep-{uuid.uuid4().hex[:8]}:1"
    ref = image_builder.hostile_image(tag, files={"/etc/marker": "kept\n"})
    image_id = _image_id(ref)
    from cbatch.clients import client
    try:
        job = direct_mom.submit(script("cat /etc/marker; while [ ! -e go ]; do sleep 0.1; done; cat /etc/marker",
                                       image=ref, shebang="#!/bin/sh"),
                                alice.name, initdir=str(workdir), shell="/bin/sh")
        assert job.wait_output(b"kept\n", timeout=60), job.peek()
        direct_daemon.restart()
        # The restarted daemon rebuilt the hold from the running container: prune (which drops idle holders
        # first; a dry run, so no other image on this shared machine is touched) keeps it, and Docker still
        # refuses to remove the image.
        reply = client.call(direct_daemon.socket, "images", action="prune", dry_run=True)
        assert ref not in reply["removed"] and _image_id(ref) == image_id
        rm = subprocess.run(["docker", "rmi", "--no-prune", image_id], capture_output=True, text=True)
        assert rm.returncode != 0 and "container" in rm.stderr, rm.stderr
        (workdir / "go").touch()
        r = job.wait(60)
        assert r.exit_status == 0 and r.stdout == b"kept\nkept\n", (r.stdout, r.stderr)
    finally:
        image_builder.remove(ref)


def _image_id(ref: str) -> str:
    return subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", ref], check=True,
                          capture_output=True, text=True).stdout.strip()


def test_a_retagged_name_runs_the_image_it_names_now(direct_mom, alice):
    # The engine caches image facts by id: moving a tag to another image must start that other image.
    name = f"cbatch-test/direct-retag-{uuid.uuid4().hex[:8]}:1"
    first = image_builder.hostile_image(f"direct-retag-a-{uuid.uuid4().hex[:8]}:1", files={"/etc/marker": "A\n"})
    second = image_builder.hostile_image(f"direct-retag-b-{uuid.uuid4().hex[:8]}:1", files={"/etc/marker": "B\n"})
    try:
        body = 'cat /etc/marker; echo "$CBATCH_IMAGE_ID"'
        for ref, marker in ((first, b"A"), (second, b"B"), (first, b"A")):
            subprocess.run(["docker", "tag", ref, name], check=True)
            r = direct_mom.submit(script(body, image=name, shebang="#!/bin/sh"), alice.name, shell="/bin/sh").wait(120)
            assert r.exit_status == 0, r.stderr
            assert r.stdout.decode().splitlines() == [marker.decode(), _image_id(ref)]
    finally:
        for ref in (name, first, second):
            image_builder.remove(ref)


def test_a_removed_container_leaves_no_directory_behind(direct_mom, direct_daemon, alice):
    r = direct_mom.submit(script("echo hi"), alice.name).wait(120)
    assert r.exit_status == 0 and r.stdout == b"hi\n", r.stderr
    instance_dir = os.path.join(DIRECT_BUNDLES, direct_daemon.instance)
    # The epilogue removed the container; with it went its bundle and the (now empty) instance directory.
    assert wait_until(lambda: not os.path.exists(instance_dir), timeout=30) is not None, os.listdir(instance_dir)
    assert "destroy" in open(os.path.join(DIRECT_BUNDLES, "events", direct_daemon.instance + ".jsonl")).read()
    # A second job of the same instance makes it again.
    r = direct_mom.submit(script("echo again"), alice.name).wait(120)
    assert r.exit_status == 0 and r.stdout == b"again\n", r.stderr


def test_audit_line_has_the_containers_cpu_time_and_peak_memory(direct_mom, direct_daemon, alice):
    import re
    # ~40 MB held by the shell and some CPU burnt: the container's cgroup must report both before it goes.
    r = direct_mom.submit(script("""
x=$(head -c 40000000 /dev/zero | tr '\\0' a)
i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done
echo ${#x}
"""), alice.name).wait(120)
    assert r.exit_status == 0 and r.stdout == b"40000000\n", (r.stdout, r.stderr)
    def end_lines():
        return [ln for ln in direct_daemon.log().splitlines()
                if "audit: " in ln and f"job={r.job_id} " in ln and "event=end " in ln]
    # The line follows the container's removal, which may come after the client has its exit status.
    assert wait_until(end_lines, timeout=30) is not None, direct_daemon.log()[-2000:]
    end = end_lines()
    assert len(end) == 1, end
    fields = dict(re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", end[0].split("audit: ", 1)[1]))
    assert float(fields["cpu_s"]) > 0.05, fields
    assert int(fields["peak_bytes"]) >= 40_000_000, fields


def test_killed_shim_never_leaves_the_container_running(direct_mom, direct_daemon, alice):
    job = direct_mom.submit(script("echo ready; sleep 300"), alice.name)
    assert job.wait_output(b"ready\n", timeout=60), job.peek()
    (cid,) = job_containers(direct_daemon.instance, job.job_id)
    meta = direct_json(cid, "meta.json")
    init_pid = int(open(os.path.join(DIRECT_BUNDLES, direct_daemon.instance, meta["name"], "pid")).read())
    os.kill(int(meta["shim"]), signal.SIGKILL)
    r = job.wait(60)
    assert r.exit_status != 0
    assert wait_until(lambda: not os.path.exists(f"/proc/{init_pid}"), timeout=30) is not None
    assert wait_until(lambda: not job_containers(direct_daemon.instance, job.job_id), timeout=30) is not None


def test_running_direct_job_survives_a_daemon_restart(direct_mom, direct_daemon, alice, workdir):
    job = direct_mom.submit(script("echo ready; while [ ! -e go ]; do sleep 0.1; done; echo done; exit 7"),
                            alice.name, initdir=str(workdir))
    assert job.wait_output(b"ready\n", timeout=60), job.peek()
    (cid,) = job_containers(direct_daemon.instance, job.job_id)
    shim = int(direct_json(cid, "meta.json")["shim"])
    direct_daemon.restart()
    assert os.path.exists(f"/proc/{shim}")          # the shim outlived the daemon
    (workdir / "go").touch()
    r = job.wait(120)
    assert r.exit_status == 7, r.stderr
    assert r.stdout == b"ready\ndone\n"
    assert wait_until(lambda: not job_containers(direct_daemon.instance, job.job_id), timeout=30) is not None


def test_queue_that_needs_docker_falls_back_with_a_logged_reason(daemon_factory, mom_factory, engine_name, alice):
    assert engine_name == "direct"
    d = daemon_factory("fallback", queues={"bridged": {"image": "cbatch-test/debian:12", "network": "bridge",
                                                        "networks": ["bridge"], "engine": "direct"}})
    r = mom_factory(d).submit(script("echo hi"), alice.name, queue="bridged").wait(120)
    assert r.exit_status == 0, r.stderr
    assert "engine docker instead of direct: network bridge" in d.log()


def _die_event(instance: str, cid: str) -> dict:
    path = os.path.join(DIRECT_BUNDLES, "events", instance + ".jsonl")
    with open(path) as fh:
        events = [json.loads(line) for line in fh]
    (die,) = [e for e in events if e["id"] == cid and e["action"] == "die"]
    return die


def _container_cgroups(lines) -> list:
    """The container's cgroup directories on this host, from its /proc/self/cgroup lines (v1 and v2)."""
    out = []
    for line in lines:
        _n, ctrls, path = line.split(":", 2)
        name = ctrls.replace("name=", "") if ctrls else "unified"
        for base in (f"/sys/fs/cgroup/{name}", f"/sys/fs/cgroup/{ctrls.split(',')[0]}") if ctrls else (
                "/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
            if os.path.isdir(base):
                out.append(base + path)
                break
    return out


@pytest.mark.parametrize("how", ["shim", "runc"])
def test_the_ended_container_leaves_no_cgroup_and_no_runc_state(direct_mom, direct_daemon, alice, workdir, how):
    # The shim deletes the stopped container itself (runc's destroy without a Go program at every job's end);
    # anything unexpected in runc's state directory - here a file the test puts there - makes it leave the
    # delete to `runc delete --force`. Either way nothing of the container is left.
    job = direct_mom.submit(script("cat /proc/self/cgroup; while [ ! -e go ]; do sleep 0.1; done",
                                   shebang="#!/bin/sh"), alice.name, initdir=str(workdir), shell="/bin/sh")
    assert job.wait_output(b"\n", timeout=60), job.peek()
    (cid,) = job_containers(direct_daemon.instance, job.job_id)
    name = direct_json(cid, "meta.json")["name"]
    state = os.path.join(RUNC_ROOT, name)
    assert os.path.isfile(os.path.join(state, "state.json"))
    if how == "runc":
        with open(os.path.join(state, "unexpected"), "w") as fh:
            fh.write("x")
    (workdir / "go").touch()
    r = job.wait(60)
    assert r.exit_status == 0, r.stderr
    cgroups = _container_cgroups(r.stdout.decode().splitlines())
    assert cgroups and all(name in c for c in cgroups), cgroups
    assert [c for c in cgroups if os.path.exists(c)] == []
    assert not os.path.lexists(state)
    assert _die_event(direct_daemon.instance, cid)["deleted"] == how


# A stand-in for cbatch-shim that kills cbatchd at the shim's start and hands the real shim a go pipe at EOF:
# what the shim sees when the daemon dies between recording it in meta.json and writing "g". "unrecorded"
# also puts meta.json back as it was before the record (a daemon that died before writing it); "stalled" is
# unrecorded with the EOF held back (by a child holding the pipe's write end) until the test makes RELEASE:
# a shim descheduled past the restarted daemon's removal of its bundle and the job's next start.
_SHIM_WRAPPER = """#!/usr/bin/python3 -I
import json, os, signal, sys, time
marker, real, release, mode = {marker!r}, {real!r}, {release!r}, {mode!r}
if os.path.exists(marker):
    os.execv(real, [real] + sys.argv[1:])
meta_path = os.path.join(sys.argv[1], "meta.json")
while True:
    try:
        with open(meta_path) as fh:
            meta = json.load(fh)
        if meta.get("shim") == os.getpid():
            break
    except (OSError, ValueError):
        pass
    time.sleep(0.001)
os.kill(os.getppid(), signal.SIGKILL)
if mode != "recorded":
    del meta["shim"], meta["shim_start"]
    with open(meta_path + ".tmp", "w") as fh:
        json.dump(meta, fh)
    os.rename(meta_path + ".tmp", meta_path)
got = os.read(4, 1)
r, w = os.pipe()
if mode == "stalled" and os.fork() == 0:
    os.closerange(0, w)
    while not os.path.exists(release):
        time.sleep(0.01)
    os._exit(0)
os.close(w)
os.dup2(r, 4)
with open(marker, "w") as fh:
    fh.write((got.decode() or "eof") + " " + str(os.getpid()))
os.execv(real, [real] + sys.argv[1:])
"""


def _libexec_copy(helper: str) -> Path:
    """A copy of the built helpers in a fresh directory, the shim as ``cbatch-shim.real``: the test writes its
    own ``cbatch-shim`` (a stand-in that execs the real one) and points a daemon's ``helper`` there."""
    libexec = Path(f"/run/cbatch-test/shimwrap-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    libexec.mkdir(mode=0o755, parents=True)
    src = Path(helper).parent
    for name, copy, mode in (("cbatch-exec", "cbatch-exec", 0o755), ("cbatch-filter", "cbatch-filter", 0o711),
                             ("cbatch-shim", "cbatch-shim.real", 0o755)):
        shutil.copy(src / name, libexec / copy)
        os.chmod(libexec / copy, mode)
    (libexec / "cbatch-shim").touch(mode=0o755)
    return libexec


_SHIM_RUNC_PROBE = """#!/usr/bin/python3 -I
import fcntl, json, os, sys
try:
    seen = {{"runc": sys.argv[2], "fd5": os.readlink("/proc/self/fd/5"), "seals": fcntl.fcntl(5, fcntl.F_GET_SEALS)}}
except OSError as exc:
    seen = {{"runc": sys.argv[2], "error": str(exc)}}
with open({marker!r}, "w") as fh:
    json.dump(seen, fh)
os.execv({real!r}, [{real!r}] + sys.argv[1:])
"""


def test_the_shim_runs_runc_from_the_daemons_sealed_copy(daemon_factory, mom_factory, engine_name, alice, helper):
    """cbatchd hands each shim its one sealed copy of runc (fd 5, named runc, sealed as runc's own check wants:
    test_runc_sealed.py shows the real runc then runs its init from it instead of a copy made per start), and
    the shim runs runc by it: the job runs. Before: the shim got /usr/sbin/runc and runc bind-mounted itself
    on the host and re-executed at every start."""
    assert engine_name == "direct"
    libexec = _libexec_copy(helper)
    marker = libexec / "seen"
    try:
        (libexec / "cbatch-shim").write_text(_SHIM_RUNC_PROBE.format(marker=str(marker),
                                                                     real=str(libexec / "cbatch-shim.real")))
        d = daemon_factory("sealedrunc", daemon={"helper": str(libexec / "cbatch-exec")})
        r = mom_factory(d).submit(script("echo in-container; exit 3"), alice.name).wait(120)
        assert (r.exit_status, r.stdout, cbatch_lines(r.stderr)) == (3, b"in-container\n", []), (r, d.log()[-2000:])
        assert json.loads(marker.read_text()) == {"runc": "/proc/self/fd/5", "fd5": "/memfd:runc (deleted)",
                                                  "seals": SEALS}
    finally:
        shutil.rmtree(libexec, ignore_errors=True)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("record", ["recorded", "unrecorded", "stalled"])
def test_a_daemon_dying_between_the_record_and_go_loses_no_job(daemon_factory, mom_factory, engine_name, alice,
                                                               helper, workdir, record):
    """Before: the shim of a recorded start, finding the go pipe at EOF, wrote 125 "cbatchd went away before
    the start" and the restarted daemon reported it (CI: test_daemon_restart_faults[direct-stop-container]).
    Now a recorded shim starts the job, which its client takes back (status 5, every line once); an unrecorded
    one creates nothing (its bundle is removed and the client starts again: a container started there too
    would print every line twice, into the same spool files). Stalled: the unrecorded shim sees its EOF only
    once the job's next start runs in a new bundle of the same name; it must leave that one alone (before: it
    wrote its 125 status there by path, so the running container's bundle said it had ended)."""
    assert engine_name == "direct"
    libexec = _libexec_copy(helper)
    marker, release = libexec / "withheld", libexec / "release"
    try:
        (libexec / "cbatch-shim").write_text(_SHIM_WRAPPER.format(
            marker=str(marker), real=str(libexec / "cbatch-shim.real"), release=str(release), mode=record))
        d = daemon_factory("shimwrap", daemon={"helper": str(libexec / "cbatch-exec")})
        job = mom_factory(d).submit(script("echo ready; while [ ! -e go ]; do sleep 0.1; done; echo bye; exit 5"),
                                    alice.name, initdir=str(workdir))
        assert wait_until(marker.exists, timeout=60) is not None, (job.peek(), d.log()[-2000:])
        assert d.proc.wait(30) == -signal.SIGKILL                 # the moment: the daemon died mid-start
        old_shim = int(marker.read_text().split()[1])
        meta = direct_json(job_containers(d.instance, job.job_id)[0], "meta.json")
        assert ("shim" in meta) == (record == "recorded"), meta
        d.start()
        assert job.wait_output(b"ready\n", timeout=60), (job.peek(), d.log()[-3000:])
        if record == "stalled":
            assert not _gone(old_shim)                            # still waiting for its go
            (cid,) = job_containers(d.instance, job.job_id)
            assert direct_json(cid, "meta.json")["shim"] != old_shim      # the job's next start, same name
            release.touch()
            assert wait_until(lambda: _gone(old_shim), timeout=30) is not None
            assert direct_bundle_file(cid, "status") is None, direct_bundle_file(cid, "status")
        (workdir / "go").touch()
        r = job.wait(120)
        assert (r.exit_status, r.stdout, cbatch_lines(r.stderr)) == (5, b"ready\nbye\n", []), \
            (r.exit_status, r.stdout, r.stderr, d.log()[-3000:])
        assert wait_until(lambda: not job_containers(d.instance, job.job_id), timeout=30) is not None
    finally:
        release.touch()         # a stalled shim still waiting ends (the test failed before it was released)
        shutil.rmtree(libexec, ignore_errors=True)
