"""Test users for the integration suite, created idempotently (run as root).

``cbt-alice`` and ``cbt-bob`` share the group ``cbt-proj``; alice is also in ``cbt-extra`` so tests can see
supplementary groups travel into the container. ``cbt-carol`` has ``/bin/sh`` as login shell, for jobs in
the busybox-based images (which have no bash): pbs_mom always starts the passwd shell. Homes live under /home, mode 0755, so the daemon (and
Docker) can bind-mount and traverse them. Created once per machine and never removed: several test runs
may share the host, and removing a user under a running job of another run would break it.

Usable as a script too: ``python tests/integration/users.py`` creates them and prints the identities.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, Tuple

PROJECT_GROUP = "cbt-proj"
EXTRA_GROUP = "cbt-extra"
# user -> (supplementary groups besides the user's own primary group of the same name, login shell).
USERS: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "cbt-alice": ((PROJECT_GROUP, EXTRA_GROUP), "/bin/bash"),
    "cbt-bob": ((PROJECT_GROUP,), "/bin/bash"),
    "cbt-carol": ((PROJECT_GROUP,), "/bin/sh"),
}


@dataclass(frozen=True)
class TestUser:
    """A host test user as the tests need it."""

    name: str
    uid: int
    gid: int
    groups: Tuple[int, ...]     # sorted gids as `id -G` would list them (primary first)
    home: str
    shell: str

    @property
    def group(self) -> str:
        """The primary group's name."""
        return grp.getgrgid(self.gid).gr_name


def _run(argv) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _ensure_group(name: str) -> None:
    try:
        grp.getgrnam(name)
    except KeyError:
        _run(["groupadd", name])


def _ensure_user(name: str, groups: Tuple[str, ...], shell: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        _run(["useradd", "--create-home", "--user-group", "--shell", shell, name])
    if pwd.getpwnam(name).pw_shell != shell:
        _run(["usermod", "--shell", shell, name])
    current = {g.gr_name for g in grp.getgrall() if name in g.gr_mem}
    missing = [g for g in groups if g not in current]
    if missing:
        _run(["usermod", "-a", "-G", ",".join(missing), name])
    home = pwd.getpwnam(name).pw_dir
    os.makedirs(home, exist_ok=True)
    pw = pwd.getpwnam(name)
    os.chown(home, pw.pw_uid, pw.pw_gid)
    os.chmod(home, 0o755)


def _describe(name: str) -> TestUser:
    pw = pwd.getpwnam(name)
    gids = [pw.pw_gid] + sorted(g for g in os.getgrouplist(name, pw.pw_gid) if g != pw.pw_gid)
    return TestUser(name=name, uid=pw.pw_uid, gid=pw.pw_gid, groups=tuple(gids), home=pw.pw_dir,
                    shell=pw.pw_shell)


def ensure() -> Dict[str, TestUser]:
    """Create (if needed) and return the test users by name. Needs root."""
    for group in (PROJECT_GROUP, EXTRA_GROUP):
        _ensure_group(group)
    for name, (groups, shell) in USERS.items():
        _ensure_user(name, groups, shell)
    return {name: _describe(name) for name in USERS}


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("users.py: must run as root")
    for user in ensure().values():
        print(user)
