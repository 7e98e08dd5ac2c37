"""Site config: every key, defaults, merging, and exact error messages."""

import os
import stat
from pathlib import Path

import pytest

from cbatch.core import config as C
from cbatch.core.config import (ConfigError, EngineConfig, DaemonConfig, Hardening, QueuePolicy, UserMounts,
                           image_allowed, load, normalize_reference, parse)
from cbatch.core.spec import Mount

REPO = Path(__file__).resolve().parents[2]


def bad(text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        parse(text, path="site.yaml", hostname="node1")
    return exc.value.message


def test_empty_config_gives_documented_defaults():
    cfg = parse("", path="site.yaml", hostname="node1")
    assert cfg.engine == EngineConfig(url="unix:///var/run/docker.sock", timeout=60.0)
    assert cfg.daemon == DaemonConfig(socket="/run/cbatch/cbatchd.sock", state_dir="/var/lib/cbatch",
                                      instance="node1", stop_grace=1.0, helper="/usr/libexec/cbatch/cbatch-exec",
                                      hostname="node1")
    d = cfg.defaults
    assert d.image == "native" and d.images == () and d.native is True and d.env == ()
    assert "PATH" in d.env_drop and "LD_PRELOAD" in d.env_drop and "BASH_FUNC_*" in d.env_drop
    assert d.mounts == () and d.user_mounts == UserMounts(False, ())
    assert d.network == "none" and d.networks == ("none",) and d.allow_root is False
    assert d.hardening == Hardening(pids_limit=4096, read_only_rootfs=False, no_new_privileges=True, init=True,
                                    cap_drop_all=True)
    assert d.pull == "never" and d.prepull == () and d.shm_size is None
    assert cfg.registry.auth_file is None and cfg.images.prune_max_age_days is None
    assert cfg.queue("batch") is cfg.defaults and cfg.queue(None) is cfg.defaults


def test_hostname_is_resolved_at_load_when_not_given():
    import socket
    cfg = parse("")
    assert cfg.daemon.instance == socket.gethostname() == cfg.daemon.hostname


FULL = """
engine: {url: "tcp://127.0.0.1:2375", timeout: 5}
daemon: {socket: /run/x.sock, state_dir: /var/lib/x/, instance: test-1, stop_grace: 0, helper: /opt/h}
defaults:
  image: cbatch-test/busybox:1
  images: ["cbatch-test/*", debian:12]
  native: false
  env: {OMP_PROC_BIND: "true", N: 4}
  env_drop: [PATH, "BASH_FUNC_*"]
  mounts: ["/opt/apps", "/scratch:/work:rw", "/data:/data:ro"]
  user_mounts: {allowed: true, prefixes: ["~", /scratch/]}
  network: none
  networks: [none, bridge]
  allow_root: true
  hardening: {pids_limit: null, read_only_rootfs: true, no_new_privileges: false, init: false, cap_drop_all: false}
  pull: missing
  prepull: [cbatch-test/busybox:1, "debian:12"]
  shm_size: 64mb
queues:
  gpu:
    image: native
    native: true
    env: {CUDA: "1"}
    hardening: {pids_limit: 10}
    user_mounts: {allowed: false}
    networks: [none]
    shm_size: 1gb
    prepull: [debian:12, cbatch-test/debian:12]
registry: {auth_file: /etc/cbatch/auth.json}
images: {prune_max_age_days: 30}
"""


def test_every_key_parsed():
    cfg = parse(FULL, path="site.yaml", hostname="node1")
    assert cfg.engine == EngineConfig("tcp://127.0.0.1:2375", 5.0)
    assert cfg.daemon == DaemonConfig("/run/x.sock", "/var/lib/x", "test-1", 0.0, "/opt/h", "node1")
    d = cfg.defaults
    assert d.image == "cbatch-test/busybox:1" and d.images == ("cbatch-test/*", "debian:12") and not d.native
    assert d.env == (("OMP_PROC_BIND", "true"), ("N", "4"))
    assert d.env_drop == ("PATH", "BASH_FUNC_*")
    assert d.mounts == (Mount("/opt/apps", "/opt/apps", True), Mount("/scratch", "/work", False),
                        Mount("/data", "/data", True))
    assert d.user_mounts == UserMounts(True, ("~", "/scratch"))
    assert d.networks == ("none", "bridge") and d.allow_root
    assert d.hardening == Hardening(None, True, False, False, False)
    assert d.pull == "missing" and d.prepull == ("cbatch-test/busybox:1", "debian:12") and d.shm_size == 64 << 20
    assert cfg.registry.auth_file == "/etc/cbatch/auth.json" and cfg.images.prune_max_age_days == 30

    gpu = cfg.queue("gpu")
    assert gpu.name == "gpu" and gpu.image == "native" and gpu.native
    assert gpu.images == d.images                                  # not given: from defaults
    assert gpu.env == (("OMP_PROC_BIND", "true"), ("N", "4"), ("CUDA", "1"))   # maps merge key by key
    assert gpu.hardening == Hardening(10, True, False, False, False)
    assert gpu.user_mounts == UserMounts(False, ("~", "/scratch"))
    assert gpu.networks == ("none",) and gpu.shm_size == 1 << 30
    assert cfg.queue("other") is cfg.defaults
    assert cfg.all_prepull() == ("cbatch-test/busybox:1", "debian:12", "cbatch-test/debian:12")


def test_example_site_config_is_valid_and_documents_every_key():
    text = (REPO / "config" / "cbatch.yaml").read_text()
    cfg = parse(text, path="cbatch.yaml", hostname="n")
    # Installed as is, it changes nothing: no queues, every job native (issue 10.6).
    assert cfg.queues == () and cfg.defaults.image == "native" and cfg.defaults.native
    assert cfg.defaults.images == () and cfg.torque.default_queue is None
    for key in ("url:", "timeout:", "socket:", "state_dir:", "instance:", "stop_grace:", "helper:", "image:",
                "images:", "native:", "env:", "env_drop:", "mounts:", "user_mounts:", "allowed:", "prefixes:",
                "network:", "networks:", "allow_root:", "pids_limit:", "read_only_rootfs:", "no_new_privileges:",
                "init:", "cap_drop_all:", "shm_size:", "engine:", "pull:", "prepull:", "auth_file:", "prune_max_age_days:",
                "default_queue:", "client:", "tm_max_connections:", "tm:"):
        assert key in text, key


def test_mom_priv_config_lines():
    text = (REPO / "config" / "mom_priv-config").read_text()
    assert "$job_starter /usr/libexec/cbatch/job_starter" in text.splitlines()
    assert "install-hooks" in text


@pytest.mark.parametrize("text,message", [
    ("[1, 2]", "cbatch: site.yaml: expected a mapping: [1, 2] (a YAML mapping of key: value)"),
    ("foo: 1", "cbatch: site.yaml: foo: unknown key: foo (known keys: engine, daemon, defaults, queues, registry, images, torque)"),
    ("engine: {url: /var/run/docker.sock}", "cbatch: site.yaml: engine.url: not an engine URL: /var/run/docker.sock "
                                            "(scheme one of unix, tcp, http, https, ssh)"),
    ("engine: {timeout: 0}", "cbatch: site.yaml: engine.timeout: expected a number: 0 (a number > 0)"),
    ("engine: {timeout: true}", "cbatch: site.yaml: engine.timeout: expected a number: True (a number > 0)"),
    ("engine: {tls: 1}", "cbatch: site.yaml: engine.tls: unknown key: tls (known keys: url, timeout)"),
    ("daemon: {socket: run/x.sock}", "cbatch: site.yaml: daemon.socket: not an absolute path: run/x.sock (an absolute path)"),
    ("daemon: {state_dir: 5}", "cbatch: site.yaml: daemon.state_dir: expected a non-empty string: 5 (an absolute path)"),
    ("daemon: {instance: 'a b'}", "cbatch: site.yaml: daemon.instance: not a valid instance name: a b (letters, digits, _ . -)"),
    ("daemon: {stop_grace: -1}", "cbatch: site.yaml: daemon.stop_grace: expected a number: -1 (a number >= 0)"),
    ("daemon: {helper: ''}", "cbatch: site.yaml: daemon.helper: expected a non-empty string:  (an absolute path)"),
    ("defaults: {image: 'Bad Image'}", "cbatch: site.yaml: defaults.image: not a valid image reference: Bad Image "
                                       "([registry[:port]/]name[:tag][@sha256:<64 hex>] or native)"),
    ("defaults: {images: debian}", "cbatch: site.yaml: defaults.images: expected a list: debian (a YAML list, e.g. [a, b])"),
    ("queues: {batch: {images: [a, b, 'Bad Ref']}}", "cbatch: site.yaml: queues.batch.images[2]: not a valid image "
                                                     "reference: Bad Ref (an exact reference or a glob like debian:*)"),
    ("defaults: {native: 'yes'}", "cbatch: site.yaml: defaults.native: expected true or false: yes (true | false)"),
    ("defaults: {env: [A]}", "cbatch: site.yaml: defaults.env: expected a mapping: ['A'] (a YAML mapping of key: value)"),
    ("defaults: {env: {1A: x}}", "cbatch: site.yaml: defaults.env.1A: not a valid variable name: 1A (letters, digits and _)"),
    ("defaults: {env: {A: [1]}}", "cbatch: site.yaml: defaults.env.A: expected a string: [1] (quote the value)"),
    ("defaults: {env_drop: ['A B']}", "cbatch: site.yaml: defaults.env_drop[0]: not a variable name or glob: A B "
                                      "(e.g. LD_PRELOAD or BASH_FUNC_*)"),
    ("defaults: {mounts: [relative:/x]}", "cbatch: site.yaml: defaults.mounts[0]: malformed mount: relative:/x "
                                          "(SRC[:DST][:ro|rw] with absolute paths)"),
    ("defaults: {mounts: ['/a:/etc/shadow']}", "cbatch: site.yaml: defaults.mounts[0]: mount onto a reserved path: "
     "/a:/etc/shadow (not /, /etc/passwd, /etc/group, /etc/shadow, /proc, /sys, /dev, /.cbatch)"),
    ("defaults: {mounts: ['/:/']}", "cbatch: site.yaml: defaults.mounts[0]: mount onto a reserved path: /:/ "
     "(not /, /etc/passwd, /etc/group, /etc/shadow, /proc, /sys, /dev, /.cbatch)"),
    ("defaults: {mounts: ['/x:/proc/../dev/x']}", "cbatch: site.yaml: defaults.mounts[0]: mount onto a reserved path: "
     "/x:/proc/../dev/x (not /, /etc/passwd, /etc/group, /etc/shadow, /proc, /sys, /dev, /.cbatch)"),
    ("defaults: {user_mounts: {allowed: 1}}", "cbatch: site.yaml: defaults.user_mounts.allowed: expected true or false: 1 (true | false)"),
    ("defaults: {user_mounts: {prefixes: [scratch]}}", "cbatch: site.yaml: defaults.user_mounts.prefixes[0]: not an "
                                                       "absolute path: scratch (an absolute path)"),
    ("defaults: {user_mounts: {prefix: []}}", "cbatch: site.yaml: defaults.user_mounts.prefix: unknown key: prefix "
                                              "(known keys: allowed, prefixes)"),
    ("defaults: {network: host}", "cbatch: site.yaml: defaults.network: default network is not in networks: host (allowed: none)"),
    ("defaults: {networks: ['a b']}", "cbatch: site.yaml: defaults.networks[0]: not a valid network name: a b (letters, digits, _ . -)"),
    ("queues: {q: {networks: [bridge]}}", "cbatch: site.yaml: defaults.network: default network is not in networks: "
                                          "none (allowed: bridge)"),
    ("defaults: {allow_root: null}", "cbatch: site.yaml: defaults.allow_root: expected true or false: null (true | false)"),
    ("defaults: {hardening: {pids_limit: 0}}", "cbatch: site.yaml: defaults.hardening.pids_limit: expected an integer: 0 "
                                               "(an integer >= 1 or null)"),
    ("defaults: {hardening: {seccomp: x}}", "cbatch: site.yaml: defaults.hardening.seccomp: unknown key: seccomp (known "
     "keys: pids_limit, read_only_rootfs, no_new_privileges, init, cap_drop_all, layer_size)"),
    ("defaults: {hardening: {read_only_rootfs: 'no'}}", "cbatch: site.yaml: defaults.hardening.read_only_rootfs: "
                                                         "expected true or false: no (true | false)"),
    ("defaults: {pull: always}", "cbatch: site.yaml: defaults.pull: not a pull mode: always (never | missing)"),
    ("defaults: {prepull: ['debian:*']}", "cbatch: site.yaml: defaults.prepull[0]: not a valid image reference: debian:* "
                                          "([registry[:port]/]name[:tag][@sha256:<64 hex>])"),
    ("defaults: {shm_size: 64m}", "cbatch: site.yaml: defaults.shm_size: not a size: 64m (an integer with an optional "
     "unit b, kb, mb, gb, tb, w (8-byte words), kw, mw, gw; e.g. 100mb)"),
    ("defaults: {colour: red}", None),
    ("defaults: {image: debian:12}", "cbatch: site.yaml: defaults.image: default image is not in images: debian:12 (allowed: none)"),
    ("queues: {gpu: {native: false}}", "cbatch: site.yaml: defaults.image: default image is native but native is false: "
                                       "native (set an allowed image, or native: true)"),
    ("queues: {gpu: {image: 'x:1', images: ['y:*']}}", "cbatch: site.yaml: queues.gpu.image: default image is not in "
                                                       "images: x:1 (allowed: y:*)"),
    ("queues: {'a b': {}}", "cbatch: site.yaml: queues.a b: not a valid queue name: a b (letters, digits, _ . -)"),
    ("queues: [batch]", "cbatch: site.yaml: queues: expected a mapping: ['batch'] (a YAML mapping of key: value)"),
    ("registry: {auth_file: auth.json}", "cbatch: site.yaml: registry.auth_file: not an absolute path: auth.json (an absolute path)"),
    ("registry: {user: x}", "cbatch: site.yaml: registry.user: unknown key: user (known keys: auth_file)"),
    ("images: {prune_max_age_days: 0}", "cbatch: site.yaml: images.prune_max_age_days: expected an integer: 0 "
                                        "(an integer >= 1 or null)"),
    ("images: {prune_max_age_days: '7'}", "cbatch: site.yaml: images.prune_max_age_days: expected an integer: 7 "
                                          "(an integer >= 1 or null)"),
    ("defaults: [\n", None),
])
def test_errors(text, message):
    got = bad(text)
    if message is not None:
        assert got == message
    assert got.startswith("cbatch: site.yaml")
    assert "\n" not in got


def test_yaml_syntax_error_names_line():
    assert bad("defaults:\n  image: [\n").startswith("cbatch: site.yaml: line 3: not valid YAML:")


def test_hardening_on_is_yaml_true():
    # YAML 1.1 (safe_load) reads "on" as true; documented rather than surprising.
    with pytest.raises(ConfigError):
        parse("defaults: {hardening: {init: maybe}}", hostname="n")
    assert parse("defaults: {hardening: {init: off}}", hostname="n").defaults.hardening.init is False


def test_unknown_defaults_key_message():
    assert bad("defaults: {colour: red}").startswith("cbatch: site.yaml: defaults.colour: unknown key: colour (known keys: image, images,")


def test_image_matching():
    assert image_allowed("debian:12", ("debian:12",))
    assert image_allowed("docker.io/library/debian:12", ("debian:12",))
    assert image_allowed("debian", ("debian:latest",))
    assert not image_allowed("debian:11", ("debian:12",))
    assert image_allowed("cbatch-test/busybox:1", ("cbatch-test/*",))
    assert image_allowed("debian:12", ("docker.io/library/debian:*",))
    assert not image_allowed("evil/cbatch-test:1", ("cbatch-test/*",))
    assert not image_allowed("anything", ())
    assert normalize_reference("busybox") == "docker.io/library/busybox:latest"
    assert normalize_reference("reg:5000/a@sha256:" + "a" * 64) == "reg:5000/a@sha256:" + "a" * 64
    assert normalize_reference("localhost/a") == "localhost/a:latest"


# --- loading from disk, and the trusted (root daemon) checks ----------------------------------------------

def test_load_reads_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("daemon: {instance: t1}\n")
    cfg = load(str(p))
    assert cfg.path == str(p) and cfg.daemon.instance == "t1"


def test_load_missing_file(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load(str(tmp_path / "nope.yaml"))
    assert exc.value.message == f"cbatch: {tmp_path}/nope.yaml: cannot read: No such file or directory (create it, or pass --config FILE)"


def test_load_not_utf8_and_directory(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"defaults: {env: {A: caf\xe9}}\n")
    with pytest.raises(ConfigError) as exc:
        load(str(p))
    assert exc.value.message == f"cbatch: {p}: not valid UTF-8: byte 23 (save the file as UTF-8)"
    with pytest.raises(ConfigError):
        load(str(tmp_path))


def test_world_writable_config_refused_when_trusted(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("{}\n")
    os.chmod(p, 0o666)
    load(str(p))                                # untrusted readers (cbatch check) may read it
    with pytest.raises(ConfigError) as exc:
        load(str(p), trusted=True)
    msg = exc.value.message
    if os.geteuid() == 0:
        assert msg == (f"cbatch: {p}: unsafe config file: writable by group or others (mode 0666): {p} "
                       "(chown root and chmod go-w the file: a root daemon will not trust it)")
    else:
        assert msg.startswith(f"cbatch: {p}: unsafe config file: owned by uid {os.geteuid()}, not root")


class FakeStat:
    def __init__(self, uid: int, mode: int):
        self.st_uid = uid
        self.st_mode = mode


def _fake_tree(monkeypatch, tree: dict):
    monkeypatch.setattr(C.os, "stat", lambda p: tree[p])


def test_trusted_checks_file_owner_and_parents(monkeypatch):
    good_dir = FakeStat(0, stat.S_IFDIR | 0o755)
    good_file = FakeStat(0, stat.S_IFREG | 0o644)
    tree = {"/": good_dir, "/etc": good_dir, "/etc/cbatch": good_dir}
    _fake_tree(monkeypatch, tree)
    C.check_trusted("/etc/cbatch/cbatch.yaml", "/etc/cbatch/cbatch.yaml", good_file)      # accepted

    with pytest.raises(ConfigError) as exc:
        C.check_trusted("/etc/cbatch/cbatch.yaml", "/etc/cbatch/cbatch.yaml", FakeStat(1000, stat.S_IFREG | 0o644))
    assert exc.value.message == ("cbatch: /etc/cbatch/cbatch.yaml: unsafe config file: owned by uid 1000, not root: "
                                 "/etc/cbatch/cbatch.yaml (chown root and chmod go-w the file: a root daemon will not trust it)")
    with pytest.raises(ConfigError) as exc:
        C.check_trusted("/etc/cbatch/cbatch.yaml", "/etc/cbatch/cbatch.yaml", FakeStat(0, stat.S_IFREG | 0o664))
    assert "unsafe config file: writable by group or others (mode 0664)" in exc.value.message

    tree["/etc/cbatch"] = FakeStat(0, stat.S_IFDIR | 0o777)
    with pytest.raises(ConfigError) as exc:
        C.check_trusted("/etc/cbatch/cbatch.yaml", "/etc/cbatch/cbatch.yaml", good_file)
    assert exc.value.message == ("cbatch: /etc/cbatch/cbatch.yaml: unsafe config directory: writable by group or "
                                 "others (mode 0777): /etc/cbatch (chown root and chmod go-w every parent directory "
                                 "of the config)")
    tree["/etc/cbatch"] = good_dir
    tree["/etc"] = FakeStat(1000, stat.S_IFDIR | 0o755)
    with pytest.raises(ConfigError) as exc:
        C.check_trusted("/etc/cbatch/cbatch.yaml", "/etc/cbatch/cbatch.yaml", good_file)
    assert "unsafe config directory: owned by uid 1000, not root: /etc " in exc.value.message


def test_trusted_load_in_tmp_is_refused_because_of_tmp(tmp_path):
    # /tmp is world-writable (sticky or not): a root daemon must not read its config from there.
    p = tmp_path / "c.yaml"
    p.write_text("{}\n")
    os.chmod(p, 0o644)
    os.chmod(tmp_path, 0o755)
    with pytest.raises(ConfigError) as exc:
        load(str(p), trusted=True)
    assert "unsafe config" in exc.value.message


def test_symlinked_config_checks_the_real_path(tmp_path, monkeypatch):
    real = tmp_path / "real.yaml"
    real.write_text("daemon: {instance: via-link}\n")
    link = tmp_path / "link.yaml"
    link.symlink_to(real)
    assert load(str(link)).daemon.instance == "via-link"


def test_frozen():
    import dataclasses
    cfg = parse("", hostname="n")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.defaults.allow_root = True
    assert isinstance(cfg.defaults, QueuePolicy)


def test_daemon_mount_dir():
    assert parse("", hostname="n").daemon.mount_dir == "/run/cbatch/mounts"
    assert parse("daemon: {mount_dir: /srv/cbatch//pins/}", hostname="n").daemon.mount_dir == "/srv/cbatch/pins"
    with pytest.raises(ConfigError) as exc:
        parse("daemon: {mount_dir: pins}", hostname="n")
    assert "daemon.mount_dir: not an absolute path: pins" in exc.value.message


def test_layer_size_default_bound_and_null():
    assert parse("defaults: {}", hostname="n").defaults.hardening.layer_size == 1024 ** 3
    cfg = parse("defaults: {hardening: {layer_size: 32mb}}\nqueues: {free: {hardening: {layer_size: null}}}",
                hostname="n")
    assert cfg.defaults.hardening.layer_size == 32 * 1024 ** 2
    assert cfg.queue("free").hardening.layer_size is None
    assert bad("defaults: {hardening: {layer_size: 4kb}}").startswith(
        "cbatch: site.yaml: defaults.hardening.layer_size: too small: 4kb (at least 1mb, or null for no bound)")
    assert "not a size" in bad("defaults: {hardening: {layer_size: lots}}")
