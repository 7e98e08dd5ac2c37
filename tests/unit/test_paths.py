"""resolve_as_user on a real temporary tree: symlinks, .., missing and inaccessible paths."""

import os

import pytest

from cbatch.core.errors import PolicyError
from cbatch.core.job import Identity
from cbatch.host.paths import resolve_as_user


def me() -> Identity:
    return Identity.lookup_uid(os.geteuid())


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "scratch" / "data").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "file").write_text("x")
    (tmp_path / "scratch" / "to-secret").symlink_to(tmp_path / "secret" / "file")
    (tmp_path / "scratch" / "rel-up").symlink_to("../secret")
    (tmp_path / "scratch" / "dangling").symlink_to(tmp_path / "nowhere")
    return tmp_path


def test_plain_path(tree):
    assert resolve_as_user(str(tree / "scratch" / "data"), me()) == str(tree / "scratch" / "data")


def test_dotdot_is_resolved(tree):
    assert resolve_as_user(f"{tree}/scratch/../secret/file", me()) == str(tree / "secret" / "file")


def test_symlinks_are_resolved(tree):
    assert resolve_as_user(str(tree / "scratch" / "to-secret"), me()) == str(tree / "secret" / "file")
    assert resolve_as_user(str(tree / "scratch" / "rel-up" / "file"), me()) == str(tree / "secret" / "file")


def test_etc_shadow_symlink_resolves_to_etc_shadow(tree):
    # The resolver reports the truth; the policy's prefix check then refuses it.
    (tree / "scratch" / "shadow").symlink_to("/etc/shadow")
    assert os.path.exists("/etc/shadow"), "Debian always has /etc/shadow: this case must run"
    if os.geteuid() == 0:
        assert resolve_as_user(str(tree / "scratch" / "shadow"), me()) == "/etc/shadow"
    else:
        with pytest.raises(PolicyError) as exc:
            resolve_as_user(str(tree / "scratch" / "shadow"), me())
        assert exc.value.message == f"cbatch: path: permission denied: {tree}/scratch/shadow (the job's user cannot access it)"


def test_missing_and_dangling(tree):
    with pytest.raises(PolicyError) as exc:
        resolve_as_user(str(tree / "nope"), me())
    assert exc.value.message == f"cbatch: path: no such file or directory: {tree}/nope (check the path exists on this node)"
    with pytest.raises(PolicyError):
        resolve_as_user(str(tree / "scratch" / "dangling"), me())


def test_relative_and_nul_refused():
    with pytest.raises(PolicyError) as exc:
        resolve_as_user("scratch", me())
    assert exc.value.message == "cbatch: path: not an absolute path: scratch"
    with pytest.raises(PolicyError):
        resolve_as_user("/tmp/a\0b", me())


def _as_non_root(check):
    """Run ``check`` with a non-root uid: directly when we are not root, else in a child that drops to
    nobody (CI runs as root, and this refusal only exists for non-root callers)."""
    if os.geteuid() != 0:
        check()
        return
    nobody = _nobody()
    assert nobody is not None, "the nobody user is needed"
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(nobody.gid)
            os.setuid(nobody.uid)
            check()
            code = 0
        except BaseException as exc:          # report and leave the child without running pytest's teardown
            print(f"in the child: {type(exc).__name__}: {exc}")
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_other_user_needs_root():
    def check():
        other = Identity("root", 0, 0, (0,), "/root", "/bin/sh")
        with pytest.raises(PolicyError) as exc:
            resolve_as_user("/", other)
        assert exc.value.message == "cbatch: path: cannot resolve paths as another user without root: root"
    _as_non_root(check)


def _nobody():
    try:
        return Identity.lookup("nobody")
    except PolicyError:
        return None


@pytest.mark.skipif(os.geteuid() != 0 or _nobody() is None, reason="needs root and the nobody user")
def test_as_root_resolves_with_the_users_rights():
    import shutil
    import tempfile
    from pathlib import Path

    nobody = _nobody()
    tree = Path(tempfile.mkdtemp(prefix="cbatch-paths-", dir="/tmp"))     # pytest's tmp is root-only
    try:
        os.chmod(tree, 0o755)
        (tree / "scratch" / "data").mkdir(parents=True)
        (tree / "secret").mkdir(mode=0o700)                                # root-only directory
        (tree / "secret" / "file").write_text("x")
        (tree / "scratch" / "to-secret").symlink_to(tree / "secret" / "file")
        # root sees through the symlink; nobody must not get a canonical path out of it.
        assert resolve_as_user(str(tree / "scratch" / "to-secret"), me()) == str(tree / "secret" / "file")
        with pytest.raises(PolicyError) as exc:
            resolve_as_user(str(tree / "scratch" / "to-secret"), nobody)
        assert exc.value.message == (f"cbatch: path: permission denied: {tree}/scratch/to-secret "
                                     "(the job's user cannot access it)")
        assert resolve_as_user(str(tree / "scratch" / "data"), nobody) == str(tree / "scratch" / "data")
        assert os.geteuid() == 0                                           # the parent kept its rights
    finally:
        shutil.rmtree(tree)


# ---- open_all_as_user: the pinning walk (no symlink followed, one child for all paths) ---------------------------
def test_open_as_user_pins_the_canonical_object(tree):
    from cbatch.host.paths import open_all_as_user
    fd, = open_all_as_user([str(tree / "secret" / "file")], me())
    try:
        assert os.readlink(f"/proc/self/fd/{fd}") == str(tree / "secret" / "file")
        assert os.get_inheritable(fd) is False
    finally:
        os.close(fd)
    fds = open_all_as_user([str(tree / "scratch" / "data"), str(tree / "secret")], me())
    try:
        assert [os.readlink(f"/proc/self/fd/{fd}") for fd in fds] == [str(tree / "scratch" / "data"),
                                                                       str(tree / "secret")]
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("path", ["scratch/to-secret", "scratch/rel-up/file"])
def test_open_as_user_refuses_any_symlink_component(tree, path):
    from cbatch.host.paths import open_all_as_user
    with pytest.raises(PolicyError) as exc:
        open_all_as_user([str(tree / "scratch" / "data"), f"{tree}/{path}"], me())
    assert exc.value.message == (f"cbatch: mount: changed while being checked: {tree}/{path} "
                                 "(a symlink appeared; refusing)")


def test_open_as_user_missing(tree):
    from cbatch.host.paths import open_all_as_user
    with pytest.raises(PolicyError) as exc:
        open_all_as_user([str(tree / "nope")], me())
    assert exc.value.problem == "no such file or directory"


# ---- resolve_many_as_user / batch_resolver: the job's paths in one child, same answers and errors -----------------
@pytest.fixture
def nobody_tree():
    """A tree under /tmp the nobody user may enter: scratch/data, a 0700 secret/file, scratch/to-secret
    (a link to it) and scratch/up (a link to ../scratch)."""
    import shutil
    import tempfile
    from pathlib import Path

    if os.geteuid() != 0 or _nobody() is None:
        pytest.skip("needs root and the nobody user")
    tree = Path(tempfile.mkdtemp(prefix="cbatch-paths-", dir="/tmp"))
    try:
        os.chmod(tree, 0o755)
        (tree / "scratch" / "data").mkdir(parents=True)
        (tree / "secret").mkdir(mode=0o700)
        (tree / "secret" / "file").write_text("x")
        (tree / "scratch" / "to-secret").symlink_to(tree / "secret" / "file")
        (tree / "scratch" / "up").symlink_to("../scratch")
        yield tree
    finally:
        shutil.rmtree(tree)


def test_batched_resolve_gives_the_user_nothing_resolve_as_user_would_refuse(nobody_tree):
    from cbatch.host.paths import batch_resolver, resolve_many_as_user

    nobody, tree = _nobody(), nobody_tree
    ok, up = str(tree / "scratch" / "data"), f"{tree}/scratch/up/data"
    hidden, missing = str(tree / "scratch" / "to-secret"), str(tree / "nope")
    # Only what nobody can resolve alone is in the answer, canonical.
    assert resolve_many_as_user([ok, up, hidden, missing, "relative"], nobody) == {ok: ok, up: ok}
    resolve = batch_resolver([ok, hidden, missing], nobody)
    assert resolve(ok, nobody) == ok and resolve(up, nobody) == ok
    for path in (hidden, missing):           # a failed one is asked again alone: the very same error
        with pytest.raises(PolicyError) as batched:
            resolve(path, nobody)
        with pytest.raises(PolicyError) as alone:
            resolve_as_user(path, nobody)
        assert batched.value.message == alone.value.message
    # Another identity never gets nobody's answers: root sees through the link only when asking itself.
    assert resolve(hidden, me()) == str(tree / "secret" / "file")


def test_batched_resolve_asks_once_for_all_the_jobs_paths(tree, monkeypatch):
    from cbatch.host import paths

    calls = []
    real = paths._as_user
    monkeypatch.setattr(paths, "_as_user", lambda *a: calls.append(a) or real(*a))
    who = me()
    data, secret = str(tree / "scratch" / "data"), str(tree / "secret")
    resolve = paths.batch_resolver([data, secret, None], who)
    assert [resolve(data, who), resolve(secret, who)] == [data, secret]
    assert len(calls) == 1          # one child (as root: one fork) for both
    assert resolve(str(tree / "scratch"), who) == str(tree / "scratch")
    assert len(calls) == 2          # a path not asked up front: resolved alone


def test_batched_resolve_with_pin_opens_only_what_the_user_reaches(monkeypatch, nobody_tree):
    import fcntl

    from cbatch.host import paths

    nobody, tree = _nobody(), nobody_tree
    calls = []
    real = paths._as_user
    monkeypatch.setattr(paths, "_as_user", lambda *a: calls.append(a) or real(*a))
    ok, up, hidden = str(tree / "scratch" / "data"), f"{tree}/scratch/up/data", str(tree / "scratch" / "to-secret")
    resolve = paths.batch_resolver([ok, up, hidden, str(tree / "nope")], nobody, pin=True)
    assert calls == [] and resolve.opened == {}          # no child until the policy asks
    assert resolve(up, nobody) == ok and resolve(ok, nobody) == ok
    assert len(calls) == 1                              # one child resolved and opened them all
    assert list(resolve.opened) == [ok]                 # one fd per canonical path, none for a refusal
    fd = resolve.opened[ok]
    assert os.readlink(f"/proc/self/fd/{fd}") == ok
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert os.fstat(fd).st_ino == os.stat(ok).st_ino
    resolve.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    assert resolve.opened == {}
    # Without pin the batch opens nothing (the policy-only callers: cbatch check, the bench).
    plain = paths.batch_resolver([ok], nobody)
    assert plain(ok, nobody) == ok and plain.opened == {}
