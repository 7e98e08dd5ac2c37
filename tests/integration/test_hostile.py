"""Issue 6, hostile inputs: what a job user controls (script, directives, qsub -v environment, files in their
own directories, the daemon socket) must be refused with one clear line (exit 125, nothing started) or be
harmless, and the daemon must keep serving everyone else. Table: docs/hostile-inputs.md.

Cases already covered elsewhere are referenced from the table, not repeated here (test_daemon_auth.py for
most malformed socket traffic, test_torque_hardening.py for the setuid binary, test_torque_faults.py for an
image outside the allow-list).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from cbatch import protocol
from cbatch.clients import client
from cbatch.core.errors import from_wire
from torque_helpers import cbatch_lines, job_containers, script

DEBIAN = "cbatch-test/debian:12"
SECRET = b"cbt-hostile-secret-7f3a"
WRONG_DIGEST = "sha256:" + "0" * 64


@pytest.fixture(scope="module")
def hdaemon(daemon_factory, users):
    """A daemon with user-mount queues: ``mounts`` (prefixes ~ and /var/tmp), ``open`` (prefix /)."""
    auth = Path(f"/run/cbatch-test/auth-{os.getpid()}.json")
    auth.write_text(json.dumps({"auths": {"registry.example:5000": {"auth": SECRET.decode()}}}))
    os.chmod(auth, 0o600)
    mounts = {"image": DEBIAN, "user_mounts": {"allowed": True, "prefixes": ["~", "/var/tmp"]}}
    d = daemon_factory("hostile", registry={"auth_file": str(auth)},
                       queues={"mounts": mounts, "open": {**mounts, "user_mounts": {"allowed": True,
                                                                                    "prefixes": ["/"]}}})
    yield d
    auth.unlink()


@pytest.fixture(scope="module")
def hmom(mom_factory, hdaemon):
    return mom_factory(hdaemon)


def _run(hmom, body: bytes, user, **kw):
    job = hmom.submit(body, user.name, **kw)
    return job, job.wait(120)


def assert_refused(hdaemon, job, r, *words):
    """Refused before anything ran: 125, no output, exactly one ``cbatch:`` line naming ``words``, no container."""
    assert r.exit_status == 125, (r.exit_status, r.stdout, r.stderr)
    assert r.stdout == b""
    lines = r.stderr.decode(errors="replace").splitlines()
    assert len(lines) == 1 and lines[0].startswith("cbatch: "), lines
    assert all(w in lines[0] for w in words), (words, lines)
    assert not job_containers(hdaemon.instance, job.job_id)


def _head(*directives: str, image: str = DEBIAN) -> bytes:
    lines = ["#!/bin/bash", "#PBS -N hostile"]
    if image:
        lines.append(f"#CBATCH --image={image}")
    lines += [f"#CBATCH {d}" for d in directives]
    return ("\n".join(lines) + "\necho never\n").encode()


# ---- refused: (id, queue, script, qsub -v variables, words in the one line) ---------------------------------
REFUSED = [
    ("digest-mismatch-tagged", "batch", _head(image=f"{DEBIAN}@{WRONG_DIGEST}"), None, ["not on this node"]),
    ("digest-mismatch-untagged", "batch", _head(image=f"cbatch-test/debian@{WRONG_DIGEST}"), None,
     ["not on this node"]),
    ("digest-short", "batch", _head(image="cbatch-test/debian@sha256:abc"), None, ["not a valid image reference"]),
    ("image-uppercase", "batch", _head(image="Cbatch-Test/Debian:12"), None, ["not a valid image reference"]),
    ("image-shell-injection", "batch", _head(image="'cbatch-test/debian:12;id'"), None,
     ["not a valid image reference"]),
    ("image-path-traversal", "batch", _head(image="cbatch-test/../../etc/passwd"), None,
     ["not a valid image reference"]),
    ("image-other-registry", "batch", _head(image="evil.example:5000/cbatch-test/debian:12"), None,
     ["not allowed in queue batch"]),
    ("image-by-id", "batch", None, None, ["not allowed in queue batch"]),            # filled in below
    ("image-env-not-allowed", "batch", _head(image=None), {"CBATCH_IMAGE": "docker.io/library/alpine:3"},
     ["not allowed in queue batch", "alpine:3"]),
    ("image-env-native-strict", "strict", _head(image=None), {"CBATCH_IMAGE": "native"}, ["native"]),
    ("image-twice", "batch", _head(f"--image={DEBIAN}"), None, ["--image given twice"]),
    ("opt-privileged", "batch", _head("--privileged"), None, ["unknown option", "--privileged"]),
    ("opt-cap-add", "batch", _head("--cap-add=SYS_ADMIN"), None, ["unknown option", "--cap-add"]),
    ("opt-device", "batch", _head("--device=/dev/sda"), None, ["unknown option", "--device"]),
    ("opt-user-0", "batch", _head("--user 0"), None, ["unknown option", "--user"]),
    ("opt-security-opt", "batch", _head("--security-opt=seccomp=unconfined"), None, ["unknown option"]),
    ("opt-volume", "batch", _head("--volume=/:/host"), None, ["unknown option", "--volume"]),
    ("opt-pid-host", "batch", _head("--pid=host"), None, ["unknown option", "--pid"]),
    ("network-host", "batch", _head("--network=host"), None, ["network", "not allowed", "host"]),
    ("network-bridge", "batch", _head("--network bridge"), None, ["network", "not allowed", "bridge"]),
    ("network-container", "batch", _head("--network=container:abc"), None, ["malformed --network"]),
    ("mount-not-allowed-in-queue", "batch", _head("--mount=/var/tmp:/data"), None, ["user mounts are not allowed"]),
    ("mount-etc-shadow", "mounts", _head("--mount=/etc/shadow:/data"), None, ["/etc/shadow"]),
    ("mount-dotdot", "mounts", _head("--mount=/home/cbt-alice/../../etc:/data"), None,
     ["outside the allowed directories", "/etc"]),
    ("mount-docker-sock", "mounts", _head("--mount=/var/run/docker.sock:/var/run/docker.sock"), None,
     ["/var/run/docker.sock"]),
    ("mount-docker-sock-open-queue", "open", _head("--mount=/var/run/docker.sock:/var/run/docker.sock"), None,
     ["permission denied", "/var/run/docker.sock"]),
    ("mount-proc-1-root", "open", _head("--mount=/proc/1/root:/host"), None, ["/proc"]),
    ("mount-target-etc-passwd", "mounts", _head("--mount=/home/cbt-alice:/etc/passwd"), None,
     ["reserved path", "/etc/passwd"]),
    ("mount-target-cbatch", "mounts", _head("--mount=/home/cbt-alice:/.cbatch/exec"), None,
     ["reserved path", "/.cbatch/exec"]),
    ("mount-target-root", "mounts", _head("--mount=/home/cbt-alice:/"), None, ["reserved path"]),
    ("mount-target-dotdot-proc", "mounts", _head("--mount=/home/cbt-alice:/tmp/../proc/x"), None,
     ["reserved path"]),
    ("mount-target-double-slash", "mounts", _head("--mount=/home/cbt-alice://etc/shadow"), None,
     ["reserved path", "//etc/shadow"]),
    ("mount-relative", "mounts", _head("--mount=data:/data"), None, ["malformed --mount"]),
    ("mount-registry-auth", "open", None, None, ["permission denied"]),              # filled in below
    ("nul-in-comment-block", "batch", b"#!/bin/bash\n#\0\n#CBATCH --image=x\necho never\n", None, ["NUL byte"]),
    ("directive-not-utf8", "batch", b"#!/bin/bash\n#CBATCH --env=A=\xff\xfe\necho never\n", None, ["UTF-8"]),
    ("directive-line-too-long", "batch", _head("--env=A=" + "x" * 5000), None, ["directive line too long"]),
    ("thousands-of-directives", "batch", _head(*["--env=K=V"] * 5000), None, ["too many directives"]),
    ("unbalanced-quote", "batch", _head("--env='A=1"), None, ["malformed directive"]),
    ("config-env-is-ignored", "strict", _head(image="native"), {"CBATCH_CONFIG": "/var/tmp/evil.yaml",
                                                                 "CBATCH_SOCKET": "/var/tmp/evil.sock"}, ["native"]),
]


def _fill(case, hdaemon):
    name, queue, body, variables, words = case
    if name == "image-by-id":
        iid = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", DEBIAN], check=True,
                             capture_output=True, text=True).stdout.strip().split(":")[1]
        body = _head(image=iid)
    elif name == "mount-registry-auth":
        body = _head(f"--mount={hdaemon.config['registry']['auth_file']}:/data/auth")
    return queue, body, variables, words


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_with_one_line(hmom, hdaemon, alice, case):
    queue, body, variables, words = _fill(case, hdaemon)
    job, r = _run(hmom, body, alice, queue=queue, variables=variables)
    assert_refused(hdaemon, job, r, *words)


# ---- symlinks the user made in their own directories ----------------------------------------------------------
@pytest.fixture
def bob_private(bob):
    """/home/cbt-bob/priv (0700) holding pub/secret (0644): unreachable for alice on the host, readable once a
    bind mount skips the 0700 directory."""
    priv = Path(bob.home) / f"priv-{os.getpid()}"
    (priv / "pub").mkdir(parents=True)
    (priv / "pub" / "secret").write_bytes(SECRET)
    for p in (priv, priv / "pub", priv / "pub" / "secret"):
        os.chown(p, bob.uid, bob.gid)
    os.chmod(priv, 0o700)
    os.chmod(priv / "pub", 0o755)
    yield priv / "pub"
    shutil.rmtree(priv, ignore_errors=True)


def _alice_link(workdir_for, alice, target) -> Path:
    d = workdir_for(alice)
    link = d / "link"
    os.symlink(str(target), link)
    os.lchown(link, alice.uid, alice.gid)
    return link


@pytest.mark.parametrize("target,words", [("/etc/shadow", ["permission denied"]),
                                          ("/etc", ["outside the allowed directories", "resolved from"]),
                                          ("BOB", ["permission denied"])],
                         ids=["to-etc-shadow", "to-etc", "to-bob-private"])
def test_symlink_mount_escape_refused(hmom, hdaemon, alice, workdir_for, bob_private, target, words):
    link = _alice_link(workdir_for, alice, bob_private if target == "BOB" else target)
    job, r = _run(hmom, _head(f"--mount={link}:/data"), alice, queue="mounts")
    assert_refused(hdaemon, job, r, *words)


def _swapper(a: Path, b: Path, user) -> subprocess.Popen:
    """As ``user``: exchange ``a`` and ``b`` atomically (renameat2 RENAME_EXCHANGE) in a tight loop."""
    code = ("import ctypes,os,sys\nlibc=ctypes.CDLL(None,use_errno=True)\n"
            "a,b=sys.argv[1].encode(),sys.argv[2].encode()\n"
            "while True: libc.syscall(316,-100,a,-100,b,2)\n")
    return subprocess.Popen([sys.executable, "-I", "-c", code, str(a), str(b)], user=user.uid, group=user.gid,
                            extra_groups=[], start_new_session=True)


def test_symlink_swapped_after_check_never_exposes_target(hmom, hdaemon, alice, workdir_for, bob_private):
    assert ctypes.sizeof(ctypes.c_long) == 8     # renameat2 is syscall 316 on x86_64 only
    d = workdir_for(alice)
    real, link = d / "race", d / "other"
    real.mkdir()
    (real / "mine").write_text("mine\n")
    os.symlink(str(bob_private), link)
    for p in (real, real / "mine"):
        os.chown(p, alice.uid, alice.gid)
    os.lchown(link, alice.uid, alice.gid)
    proc = _swapper(real, link, alice)
    seen, outcomes = [], []
    try:
        for _ in range(60):
            job, r = _run(hmom, script("cat /data/secret 2>/dev/null; ls /data", image=None)
                          .replace(b"#PBS -N test\n", f"#CBATCH --mount={real}:/data:ro\n".encode()),
                          alice, queue="mounts")
            outcomes.append(r.exit_status)
            if SECRET in r.stdout:
                seen.append(job.job_id)
                break
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
    assert not seen, f"container saw bob's private file through a swapped symlink: {seen}, {outcomes}"


# ---- harmless: the job runs, as its owner, and cannot reach what it must not -------------------------------
def test_identity_spoofing_through_the_environment(hmom, hdaemon, alice, bob, workdir_for):
    """USER/LOGNAME/HOME/PBS_O_LOGNAME/PBS_JOBID of someone else: the daemon takes identity and job from
    SO_PEERCRED and the registration only; bob's running job is not touched."""
    bob_dir = workdir_for(bob)
    bob_job = hmom.submit(script("echo bob-ready; while [ ! -e go ]; do sleep 0.1; done; echo bob-done"),
                          bob.name, initdir=str(bob_dir))
    assert bob_job.wait_output(b"bob-ready\n", timeout=60), bob_job.peek()
    spoof = {"USER": "root", "LOGNAME": "root", "PBS_O_LOGNAME": bob.name, "HOME": "/root",
             "PBS_JOBID": bob_job.job_id, "PBS_O_HOME": bob.home, "CBATCH_DIR": "/", "SUDO_UID": "0"}
    body = script('id -u; id -g; grep -c " /root " /proc/self/mountinfo; '
                  f'grep -q " {alice.home} " /proc/self/mountinfo && echo home-mounted; touch {bob_dir}/x || true')
    job, r = _run(hmom, body, alice, variables=spoof)
    (bob_dir / "go").touch()
    rb = bob_job.wait(60)
    assert r.exit_status == 0, r.stderr
    assert r.stdout.decode().split() == [str(alice.uid), str(alice.gid), "0", "home-mounted"], r.stdout
    assert not (bob_dir / "x").exists()
    assert (rb.exit_status, rb.stdout) == (0, b"bob-ready\nbob-done\n"), rb.stderr


def test_env_injection_is_dropped(hmom, alice, workdir):
    bad = {"LD_PRELOAD": "/var/tmp/evil.so", "LD_LIBRARY_PATH": "/var/tmp", "PATH": "/var/tmp/evil",
           "BASH_FUNC_id%%": "() { echo 0; }"}
    r = hmom.submit(script('echo "${LD_PRELOAD-unset} ${LD_LIBRARY_PATH-unset}"; echo "$PATH"; id -u'),
                    alice.name, variables=bad, initdir=str(workdir)).wait(120)
    assert r.exit_status == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "unset unset" and "/var/tmp/evil" not in lines[1], lines
    assert lines[2] == str(alice.uid)


def test_no_engine_socket_auth_file_or_host_root_inside(hmom, hdaemon, alice):
    auth = hdaemon.config["registry"]["auth_file"]
    body = script(f"""
for p in /var/run/docker.sock /run/docker.sock {hdaemon.socket} {auth} /proc/1/root/var/lib/docker \
         /proc/1/root{hdaemon.run_dir} /root/.docker/config.json; do
    test -e "$p" && echo "present $p"
done
cat {auth} /proc/1/root{auth} 2>/dev/null
echo done
""")
    job, r = _run(hmom, body, alice)
    assert r.exit_status == 0, r.stderr
    assert r.stdout == b"done\n", r.stdout
    assert SECRET not in r.stdout + r.stderr


def test_huge_script_50mb(hmom, alice):
    """50 MB script: the daemon reads only its first MiB; the shell runs it (and stops at exit)."""
    body = script("echo start; exit 7").replace(b"#PBS -N test\n", b"#PBS -N test\n" + b"#" * 100 + b"\n")
    body += b"# padding\n" * (50 * (1 << 20) // 10)
    job, r = _run(hmom, body, alice)
    assert (r.exit_status, r.stdout) == (7, b"start\n"), r.stderr[-500:]


def test_binary_script(hmom, hdaemon, alice):
    """Random bytes with no shebang: no directives; bash in the container cannot run it (126), one line."""
    import random
    rnd = random.Random(6)
    body = b"\x7fELF\x02\x01\x01\0" + bytes(rnd.getrandbits(8) for _ in range(65536))
    job, r = _run(hmom, body, alice, queue="debian")
    assert r.exit_status == 126, (r.exit_status, r.stderr[-500:])
    assert r.stdout == b""
    assert b"cannot execute binary file" in r.stderr
    assert not job_containers(hdaemon.instance, job.job_id)


def test_binary_comments_before_directives_are_fine(hmom, alice):
    body = b"#!/bin/bash\n#\xff\xfe\x00binary\n".replace(b"\x00", b"") + f"#CBATCH --image={DEBIAN}\n".encode() \
        + b"test -e /.cbatch && echo contained\n"
    r = hmom.submit(body, alice.name).wait(120)
    assert (r.exit_status, r.stdout) == (0, b"contained\n"), r.stderr


def test_user_config_for_the_root_daemon_is_refused(alice, workdir):
    """``cbatchd --config`` with a file the user wrote: refused (not root-owned) before anything is bound."""
    cfg = workdir / "evil.yaml"
    cfg.write_text(f"daemon: {{socket: {workdir}/evil.sock, state_dir: {workdir}/state}}\n"
                   "defaults: {allow_root: true, images: ['*']}\n")
    os.chown(cfg, alice.uid, alice.gid)
    cbatchd = str(Path(sys.executable).parent / "cbatchd")
    for user in (alice.uid, None):      # as alice, and even as root
        p = subprocess.run([cbatchd, "--foreground", "--config", str(cfg)], user=user, capture_output=True,
                           timeout=30, stdin=subprocess.DEVNULL)
        assert p.returncode != 0
        lines = [l for l in p.stderr.decode().splitlines() if l.startswith("cbatch")]
        assert len(lines) == 1 and str(cfg) in lines[0], p.stderr
        assert not (workdir / "evil.sock").exists()


# ---- raw socket traffic not already in test_daemon_auth.py ---------------------------------------------------
def _raw_reply(hdaemon, data: bytes, close_write: bool = False):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(hdaemon.socket)
    try:
        s.sendall(data)
        if close_write:
            s.shutdown(socket.SHUT_WR)
        msg, _ = protocol.recv(s, timeout=15)
        return msg
    except protocol.Closed:
        return None
    finally:
        s.close()


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize("data,words", [
    (_frame(b"[1,2,3]"), "not a JSON object"),
    (_frame(b"[" * 100000 + b"]" * 100000), "malformed message"),
    (_frame(b"\xff\xfe\xfd\xfc"), "malformed message"),
    (struct.pack(">I", 100) + b'{"v": 1, "op": "ping"', None),
    (_frame(b'{"v": "1", "op": "ping"}'), "version"),
    (_frame(b'{"v": 1, "op": ["ping"]}'), "op"),
    (b"\x00\x00", None),
], ids=["json-array", "deeply-nested", "not-utf8", "truncated-then-eof", "version-string", "op-list",
        "half-header-eof"])
def test_malformed_frames(hdaemon, data, words):
    msg = _raw_reply(hdaemon, data, close_write=True)
    if words is None:       # cut off mid-frame: dropped without a reply
        assert msg is None or msg["ok"] is False, msg
    else:
        assert msg is not None and msg["ok"] is False, msg
        assert words in from_wire(msg["error"]).message, msg
    assert client.call(hdaemon.socket, "ping")["ok"] is True
    assert "internal error" not in hdaemon.log()[-4000:]


def test_oversized_fields_from_an_unregistered_client(hdaemon):
    """A near-1 MiB start request with 40 000 env pairs from nobody's job: one refusal, daemon fine."""
    env = [[f"K{i}", "v" * 8] for i in range(40000)]
    msg = _raw_reply(hdaemon, protocol.encode(protocol.request("start", argv=["a", "/bin/sh"], line="x\n",
                                                               cwd="/", env=env)))
    assert msg["ok"] is False and "no registered job" in from_wire(msg["error"]).message


def test_daemon_still_serves_after_the_hostile_batch(hmom, hdaemon, alice):
    """Runs last in this module: after everything above, a normal job still succeeds and nothing is left."""
    r = hmom.submit(script("echo ok; exit 3"), alice.name).wait(120)
    assert (r.exit_status, r.stdout, r.stderr) == (3, b"ok\n", b"")
    assert not hdaemon.containers()
    assert client.call(hdaemon.socket, "status")["jobs"] == []
