"""cbatch.engines.docker against the real Docker engine: exit statuses, stdio, identity, hardening, limits, cleanup.

Every container carries the test's unique ``cbatch.instance`` label and is removed by the test (the
``unique_instance`` fixture removes anything left over and fails the test if it cannot).
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
import uuid

import pytest

from cbatch.engines.docker import Engine, ExitInfo, ImageInfo, Stdio
from cbatch.daemon.streams import pump
from cbatch.core.errors import EngineError
from cbatch.core.spec import LABEL_INSTANCE, ContainerSpec
from torque_helpers import container_events

pytestmark = [pytest.mark.docker, pytest.mark.root]

UID, GID = 4242, 4343          # an identity that exists nowhere: the engine must not need a passwd entry


def make_spec(image, argv, **kw):
    kw.setdefault("uid", UID)
    kw.setdefault("gid", GID)
    kw.setdefault("groups", ())
    return ContainerSpec(name="cbt-engine-" + uuid.uuid4().hex[:12], image=image, argv=tuple(argv),
                         workdir=kw.pop("workdir", "/"), env=kw.pop("env", (("PATH", "/bin"),)), **kw)


@pytest.fixture
def outputs(tmp_path):
    """Two job-owned spool files (the uid inside the container must be able to append)."""
    paths = []
    for name in ("job.OU", "job.ER"):
        p = tmp_path / name
        p.write_bytes(b"")
        os.chown(p, UID, GID)
        os.chmod(p, 0o600)
        paths.append(str(p))
    return paths


@pytest.fixture
def run(engine, test_images, helper, unique_instance, outputs):
    """run(image_key, argv, **spec) -> (ExitInfo, stdout bytes, stderr bytes); the container is removed."""
    def _run(image, argv, stdio=None, **kw):
        spec = make_spec(test_images.get(image, image), argv, **kw)
        cid = engine.start(spec, stdio or Stdio(*outputs), unique_instance, helper)
        try:
            info = engine.wait(cid)
        finally:
            engine.remove(cid)
        with open(outputs[0], "rb") as o, open(outputs[1], "rb") as e:
            return info, o.read(), e.read()
    return _run


@pytest.mark.parametrize("code", [0, 1, 42, 255])
def test_exit_status(run, code):
    info, _, _ = run("busybox", ["sh", "-c", f"exit {code}"])
    assert info == ExitInfo(status=code, oom_killed=False, error=None)


def test_killed_by_signal_is_128_plus_n(run):
    info, _, _ = run("busybox", ["sh", "-c", "kill -USR1 $$"])
    assert info.status == 128 + signal.SIGUSR1


def test_stdout_stderr_separate_and_appended(run, outputs):
    with open(outputs[0], "wb") as f:
        f.write(b"prologue says hi\n")
    info, out, err = run("busybox", ["sh", "-c", "echo to-out; echo to-err >&2; echo more-out"])
    assert info.status == 0
    assert out == b"prologue says hi\nto-out\nmore-out\n"
    assert err == b"to-err\n"


def test_binary_output_byte_exact(run):
    # 5 MiB of random bytes; the container reports its own sha256 on stderr.
    info, out, err = run("busybox", ["sh", "-c",
                                     "head -c 5242880 /dev/urandom > /tmp/x && sha256sum /tmp/x >&2 && cat /tmp/x"])
    assert info.status == 0
    assert len(out) == 5242880
    assert err.split()[0].decode() == hashlib.sha256(out).hexdigest()


def test_output_is_live(engine, test_images, helper, unique_instance, outputs):
    spec = make_spec(test_images["busybox"], ["sh", "-c", "echo first line; sleep 60"])
    cid = engine.start(spec, Stdio(*outputs), unique_instance, helper)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and open(outputs[0], "rb").read() != b"first line\n":
            time.sleep(0.05)
        assert open(outputs[0], "rb").read() == b"first line\n"
        assert engine.running(cid)
        since = time.time() - 1
        engine.stop(cid, 30.0)      # the grace only bounds the wait: stop returns once the container ended
        # 143, not 137: the SIGTERM ended it (it reached sleep too: the process group); no SIGKILL was needed.
        assert engine.wait(cid).status == 128 + signal.SIGTERM
        kills = [e["signal"] for e in container_events(cid, since) if e["action"] == "kill"]
        assert kills == ["15"], kills
    finally:
        engine.remove(cid)


def test_stop_escalates_to_sigkill(engine, test_images, helper, unique_instance, outputs):
    spec = make_spec(test_images["busybox"],
                     ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.1; done"])
    cid = engine.start(spec, Stdio(*outputs), unique_instance, helper)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and b"ready" not in open(outputs[0], "rb").read():
            time.sleep(0.05)
        since = time.time() - 1
        engine.stop(cid, 0.5)
        info = engine.wait(cid)
        assert info.status == 128 + signal.SIGKILL and not info.oom_killed
        # The engine's record: SIGTERM first (ignored), then the SIGKILL after the grace.
        kills = [e["signal"] for e in container_events(cid, since) if e["action"] == "kill"]
        assert kills == ["15", "9"], kills
        engine.stop(cid, 0.1)        # stopping a stopped container is fine
    finally:
        engine.remove(cid)


def test_signal_reaches_process_group(engine, test_images, helper, unique_instance, outputs):
    # The shell traps USR1 and reports it; its child must see the signal too (TINI_KILL_PROCESS_GROUP).
    spec = make_spec(test_images["busybox"], ["sh", "-c",
                     "trap 'echo shell-got-usr1; exit 7' USR1; echo ready; sleep 60 & wait"])
    cid = engine.start(spec, Stdio(*outputs), unique_instance, helper)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and b"ready" not in open(outputs[0], "rb").read():
            time.sleep(0.05)
        engine.signal(cid, signal.SIGUSR1)
        assert engine.wait(cid).status == 7
        assert b"shell-got-usr1" in open(outputs[0], "rb").read()
        engine.signal(cid, signal.SIGUSR1)       # after the exit: not an error
    finally:
        engine.remove(cid)


def test_stdin_line_fed_to_shell(run):
    # Like pbs_mom: the shell reads one line from stdin and runs it; then stdin is at EOF.
    info, out, _ = run("debian", ["/bin/bash"],
                       stdin_line="echo \"shell=$0 args=$#\"; read -r x || echo stdin-eof; exit 3\n")
    assert info.status == 3
    assert out == b"shell=/bin/bash args=0\nstdin-eof\n"


def test_identity_inside(run):
    info, out, _ = run("busybox", ["sh", "-c", "id -u; id -g; id -G"], groups=(GID, 5000, 5001))
    assert info.status == 0
    uid, gid, groups = out.decode().splitlines()
    assert (int(uid), int(gid)) == (UID, GID)
    assert sorted(map(int, groups.split())) == [GID, 5000, 5001]


def test_workdir_env_hostname_labels(engine, run, test_images, helper, unique_instance, outputs):
    info, out, _ = run("busybox", ["sh", "-c", "pwd; echo $FOO; hostname; echo $TINI_KILL_PROCESS_GROUP"],
                       workdir="/tmp", env=(("PATH", "/bin"), ("FOO", "bar baz")), hostname="jobhost")
    assert out == b"/tmp\nbar baz\njobhost\n1\n"
    spec = make_spec(test_images["busybox"], ["true"], labels=(("cbatch.job", "7.vm"),))
    cid = engine.start(spec, Stdio(*outputs), unique_instance, helper)
    try:
        assert engine.list_ids({LABEL_INSTANCE: unique_instance, "cbatch.job": "7.vm"}) == [cid]
        engine.wait(cid)
    finally:
        engine.remove(cid)


def test_capabilities_dropped(run):
    info, out, _ = run("busybox", ["grep", "^Cap", "/proc/self/status"])
    caps = dict(line.split(":\t") for line in out.decode().splitlines())
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapBnd"] == "0000000000000000"


@pytest.mark.parametrize("nnp", [True, False])
def test_no_new_privileges(run, nnp):
    # /bin/suid-euid is a setuid-root probe printing "<uid> <euid>" (Debian's busybox would drop the
    # privilege itself for most applets, proving nothing).
    info, out, _ = run("setuid", ["/bin/suid-euid"], no_new_privileges=nnp)
    assert info.status == 0
    # With no-new-privileges the setuid bit is ignored; without it (control) the euid becomes 0.
    assert out.split() == [str(UID).encode(), str(UID if nnp else 0).encode()]


def test_pids_limit(run):
    info, out, err = run("busybox", ["sh", "-c",
                         "cat /sys/fs/cgroup/pids/pids.max; i=0; while [ $i -lt 40 ]; do sleep 3 & "
                         "i=$((i+1)); done; echo all-forked"], pids_limit=20)
    assert out.splitlines()[0] == b"20"
    assert b"all-forked" not in out
    assert b"fork" in err


def test_memory_limit_oom(run):
    info, _, _ = run("busybox", ["dd", "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"],
                     memory_bytes=32 * 1024 * 1024)
    assert info.status == 137
    assert info.oom_killed is True


def test_cgroup_parent(engine, test_images, helper, unique_instance, outputs):
    parent = "/cbatch-test-" + uuid.uuid4().hex[:8]
    spec = make_spec(test_images["busybox"], ["sleep", "30"], cgroup_parent=parent)
    cid = engine.start(spec, Stdio(*outputs), unique_instance, helper)
    try:
        pid = engine.container_pid(cid)
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
        memory = [ln for ln in lines if ln.split(":")[1] == "memory"][0]
        assert memory.split(":")[2] == f"{parent}/{cid}"
    finally:
        engine.remove(cid)
        # Docker leaves the parent directories behind in every controller: remove ours.
        for ctl in os.listdir("/sys/fs/cgroup"):
            path = f"/sys/fs/cgroup/{ctl}{parent}"
            if os.path.isdir(path) and not os.path.islink(f"/sys/fs/cgroup/{ctl}"):
                for _ in range(50):
                    try:
                        os.rmdir(path)
                        break
                    except OSError:
                        time.sleep(0.1)


def test_cleanup_by_label(engine, test_images, helper, unique_instance, outputs):
    ids = [engine.start(make_spec(test_images["busybox"], ["sleep", "60"]), Stdio(*outputs),
                        unique_instance, helper) for _ in range(3)]
    done = engine.start(make_spec(test_images["busybox"], ["true"]), Stdio(*outputs), unique_instance, helper)
    engine.wait(done)
    assert sorted(engine.list_ids({LABEL_INSTANCE: unique_instance})) == sorted(ids + [done])
    assert engine.cleanup({LABEL_INSTANCE: unique_instance}) == []
    assert engine.list_ids({LABEL_INSTANCE: unique_instance}) == []
    assert engine.cleanup({LABEL_INSTANCE: unique_instance}) == []     # idempotent
    engine.remove(ids[0])                                                # so is remove
    with pytest.raises(EngineError):
        engine.cleanup({})                                               # never "everything"


def test_attach_pump_byte_exact(engine, test_images, helper, unique_instance, tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)
    spec = make_spec(test_images["busybox"], ["sh", "-c", "cat; echo to-err >&2; head -c 100000 /dev/zero"])
    cid = engine.start(spec, Stdio(attach=True), unique_instance, helper)
    try:
        sock = engine.attach(cid)
        in_r, in_w = os.pipe()
        out_path, err_path = tmp_path / "out", tmp_path / "err"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            def feed():
                with os.fdopen(in_w, "wb") as w:
                    w.write(data)            # then EOF: cat must end, proving the container's stdin closed
            t = threading.Thread(target=feed)
            t.start()
            pump(sock, in_r, out.fileno(), err.fileno())
            t.join()
        os.close(in_r)
        assert engine.wait(cid).status == 0
        got = out_path.read_bytes()
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data + b"\0" * 100000).hexdigest()
        assert err_path.read_bytes() == b"to-err\n"
    finally:
        engine.remove(cid)


def test_attach_with_stdin_line_and_file_stderr(engine, test_images, helper, unique_instance, outputs):
    # stdout proxied through the socket, stderr straight to its file, stdin from the helper's line.
    spec = make_spec(test_images["busybox"], ["sh"], stdin_line="echo via-socket; echo via-file >&2\n")
    cid = engine.start(spec, Stdio(None, outputs[1], attach=True), unique_instance, helper)
    try:
        r, w = os.pipe()
        pump(engine.attach(cid), None, w, None)
        os.close(w)
        assert os.read(r, 1000) == b"via-socket\n"
        os.close(r)
        assert engine.wait(cid).status == 0
        assert open(outputs[1], "rb").read() == b"via-file\n"
    finally:
        engine.remove(cid)


def test_engine_down():
    url = "unix:///nonexistent/cbatch-test-docker.sock"
    eng = Engine(url, timeout=5)
    with pytest.raises(EngineError) as exc:
        eng.ping()
    assert exc.value.message == ("cbatch: engine: not reachable: " + url +
                                 " (is dockerd running? see cbatch check --node)")
    with pytest.raises(EngineError) as exc:
        eng.list_ids({LABEL_INSTANCE: "x"})
    assert "not reachable" in exc.value.message


def test_missing_image(engine, test_images, helper, unique_instance, outputs):
    spec = make_spec("cbatch-test/no-such-image:0", ["sh"])
    with pytest.raises(EngineError) as exc:
        engine.start(spec, Stdio(*outputs), unique_instance, helper)
    assert exc.value.message.startswith("cbatch: image: not on this node: cbatch-test/no-such-image:0")
    assert engine.list_ids({LABEL_INSTANCE: unique_instance}) == []
    assert engine.image_info("cbatch-test/no-such-image:0") is None


def test_missing_shell(run):
    info, out, err = run("noshell", ["/bin/bash"], stdin_line="/some/script\n")
    assert info.status == 127
    # No login shell, no /bin/sh, and /some/script is not there either: one line, 127 (issue #10).
    assert err.startswith(b"cbatch: command: no shell in the image and the script's interpreter is missing:"
                          b" /bin/bash") and err.count(b"\n") == 1, err
    assert out == b""


def test_missing_command_without_stdin_line_is_still_127(run):
    """The /bin/sh fallback is for the login shell reading its line only, never for a cbatch run command."""
    info, out, err = run("busybox", ["/no/such/cmd"])
    assert info.status == 127
    assert err == b"cbatch: command: not found in the image: /no/such/cmd\n"


def test_start_failure_leaves_nothing(engine, test_images, helper, unique_instance, outputs):
    # Created fine, fails at start (device gathered at start): the container must be removed again.
    spec = make_spec(test_images["busybox"], ["true"], devices=("/dev/cbatch-no-such-device:/dev/x:rwm",))
    with pytest.raises(EngineError) as exc:
        engine.start(spec, Stdio(*outputs), unique_instance, helper)
    assert exc.value.message.startswith("cbatch: engine: start container failed: " + spec.name)
    assert engine.list_ids({LABEL_INSTANCE: unique_instance}) == []


def test_name_conflict(engine, test_images, helper, unique_instance, outputs):
    spec = make_spec(test_images["busybox"], ["sleep", "30"])
    cid = engine.start(spec, Stdio(*outputs), unique_instance, helper)
    try:
        with pytest.raises(EngineError) as exc:
            engine.start(spec, Stdio(*outputs), unique_instance, helper)
        assert "create container failed" in exc.value.message
        assert engine.list_ids({LABEL_INSTANCE: unique_instance}) == [cid]
    finally:
        engine.remove(cid)


def test_output_must_be_a_regular_file(engine, test_images, helper, unique_instance, tmp_path):
    spec = make_spec(test_images["busybox"], ["true"])
    with pytest.raises(EngineError) as exc:
        engine.start(spec, Stdio(str(tmp_path / "missing"), None), unique_instance, helper)
    assert "not a regular file" in exc.value.message
    assert engine.list_ids({LABEL_INSTANCE: unique_instance}) == []


def test_read_only_rootfs_and_limits(run):
    info, out, err = run("busybox", ["sh", "-c", "touch /x 2>/dev/null && echo writable; "
                                     "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us; df -k /dev/shm | tail -1"],
                         read_only_rootfs=True, cpus=0.5, shm_bytes=8 * 1024 * 1024)
    assert info.status == 0, err
    lines = out.decode().splitlines()
    assert "writable" not in lines
    assert lines[0] == "50000"
    assert lines[1].split()[1] == "8192"


def test_use_entrypoint(run):
    # The helper stays the entrypoint; the image (none set here) contributes nothing, argv runs as is.
    info, out, _ = run("busybox", ["echo", "hello"], use_entrypoint=True)
    assert (info.status, out) == (0, b"hello\n")


@pytest.mark.parametrize("argv, expected", [([], b"ep: default-cmd\n"), (["a b", "c"], b"ep: a b c\n")])
def test_use_entrypoint_runs_the_images_entrypoint(run, argv, expected):
    # ENTRYPOINT ["/bin/echo", "ep:"] CMD ["default-cmd"]: docker run semantics, output still in our file.
    info, out, _ = run("entrypoint", argv, use_entrypoint=True)
    assert (info.status, out) == (0, expected)


def test_entrypoint_ignored_unless_asked(run):
    info, out, _ = run("entrypoint", ["echo", "plain"])
    assert (info.status, out) == (0, b"plain\n")


def test_use_entrypoint_without_any_command(engine, test_images, helper, unique_instance, outputs):
    spec = make_spec(test_images["busybox"], [], use_entrypoint=True)
    with pytest.raises(EngineError) as exc:
        engine.start(spec, Stdio(*outputs), unique_instance, helper)
    assert "no command" in exc.value.message


def test_image_info(engine, test_images):
    info = engine.image_info(test_images["busybox"])
    assert isinstance(info, ImageInfo) and info.id.startswith("sha256:") and info.size > 0
    assert test_images["busybox"] in info.tags
    assert engine.image_present(test_images["busybox"]) == info
    assert any(i.id == info.id for i in engine.list_images())


def test_attach_output_is_live_and_stdin_none_closes(engine, test_images, helper, unique_instance):
    # stdin_fd None: the container's stdin is closed at once (cat ends); output arrives while it runs.
    spec = make_spec(test_images["busybox"], ["sh", "-c", "cat; echo early; sleep 30"])
    cid = engine.start(spec, Stdio(attach=True), unique_instance, helper)
    r, w = os.pipe()
    t = threading.Thread(target=pump, args=(engine.attach(cid), None, w, None), daemon=True)
    t.start()
    try:
        with os.fdopen(r, "rb", buffering=0) as reader:
            assert reader.read(6) == b"early\n"
            assert engine.running(cid)
            engine.stop(cid, 1.0)
            t.join(10)
            assert not t.is_alive()
            os.close(w)
            assert reader.read() == b""
        assert engine.wait(cid).status == 128 + signal.SIGTERM
    finally:
        engine.remove(cid)


def test_wait_outlives_the_request_timeout(engine, test_images, helper, unique_instance, outputs):
    # Started with the usual request timeout (a start on a loaded node may take longer than 1 s); only the
    # wait goes through an engine whose requests time out after 1 s, shorter than the container's life.
    cid = engine.start(make_spec(test_images["busybox"], ["sleep", "2.5"]), Stdio(*outputs), unique_instance,
                       helper)
    try:
        assert Engine(timeout=1).wait(cid).status == 0
    finally:
        engine.remove(cid)


def test_attach_stdin_from_regular_file(engine, test_images, helper, unique_instance, tmp_path):
    src = tmp_path / "in"
    src.write_bytes(b"line one\n\0binary\xff\n")
    spec = make_spec(test_images["busybox"], ["sh", "-c", "cat; cat </dev/null"])
    cid = engine.start(spec, Stdio(attach=True), unique_instance, helper)
    try:
        r, w = os.pipe()
        with open(src, "rb") as fin:
            pump(engine.attach(cid), fin.fileno(), w, None)
        os.close(w)
        assert os.read(r, 1000) == src.read_bytes()
        os.close(r)
        assert engine.wait(cid).status == 0
    finally:
        engine.remove(cid)


def test_stdin_line_too_long_refused_early(engine, test_images, helper, unique_instance, outputs):
    spec = make_spec(test_images["busybox"], ["sh"], stdin_line="x" * (60 * 1024 + 1))
    with pytest.raises(EngineError) as exc:
        engine.start(spec, Stdio(*outputs), unique_instance, helper)
    assert exc.value.message == "cbatch: stdin line: too long: 61441 bytes (at most 61440)"
    assert engine.list_ids({LABEL_INSTANCE: unique_instance}) == []
