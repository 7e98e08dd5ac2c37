"""Which client program the pbs_mom shims run: the static C ``cbatch-client`` or the Python reference.

Both speak the same protocol (docs/protocol.md). The C client is the hot path: no interpreter start-up
(~70 ms per hook) and a starter of ~100 KiB RSS that runs under pbs_mom's ``RLIMIT_DATA`` for tiny
``mem=`` requests; the Python client stays the reference. A C shim is

    #!<libexec>/cbatch-client shim
    # written by cbatch install-hooks (prologue); do not edit, re-run it instead.
    role prologue
    socket /run/cbatch/cbatchd.sock

Stdlib only.
"""

from __future__ import annotations

import os
from typing import Optional

HOOKS = ("c", "python")
CLIENT_NAME = "cbatch-client"
ENV_HOOKS = "CBATCH_TEST_HOOKS"     # tests and the emulator: force python or c
ENV_CLIENT = "CBATCH_CLIENT"        # tests and the emulator: the C client to use
INSTALLED = "/usr/libexec/cbatch/" + CLIENT_NAME


def built_client() -> Optional[str]:
    """The C client next to this source tree (``libexec/cbatch-client`` after ``make -C libexec``), or None."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(here, "libexec", CLIENT_NAME)
    return path if os.access(path, os.X_OK) else None


def default_client(libexec: Optional[str] = None, tests: bool = False) -> Optional[str]:
    """The C client to use when none is named: ``<libexec>/cbatch-client``, else the installed
    ``/usr/libexec/cbatch/cbatch-client``; for tests and the emulator (``tests``) first ``$CBATCH_CLIENT``
    and, before the installed one, the one built in this source tree."""
    env = os.environ.get(ENV_CLIENT) if tests else None
    if env:
        return env
    if libexec:
        path = os.path.join(libexec, CLIENT_NAME)
        if os.access(path, os.X_OK):
            return path
    # tests: a source tree's own build first; then the one scripts/setup installed (also for an
    # install-hooks --libexec elsewhere: the client is the same program wherever the shims are)
    return (built_client() if tests else None) or (INSTALLED if os.access(INSTALLED, os.X_OK) else None)


def unsafe(path: str) -> Optional[str]:
    """Why root hooks must not run ``path`` (not root-owned, group/world-writable, not a regular file), or
    None. A hook's interpreter is as trusted as the hook: pbs_mom checks only the shim itself."""
    import stat
    try:
        st = os.stat(path)
    except OSError as exc:
        return exc.strerror
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != 0:
        return f"owned by uid {st.st_uid}, not root"
    if st.st_mode & 0o022:
        return f"mode {stat.S_IMODE(st.st_mode):04o} is group- or world-writable"
    if not st.st_mode & 0o001:
        return "job users cannot execute it"
    return None


def choose(hooks: Optional[str] = None, client: Optional[str] = None,
           libexec: Optional[str] = None, tests: bool = False) -> Optional[str]:
    """The C client path the shims run, or None for the Python shims.

    ``hooks`` is ``c``, ``python`` or None (then, for ``tests``, ``$CBATCH_TEST_HOOKS``; else C when a
    client is found). Asking for ``c`` without a client is an error for the caller to report: returns ""."""
    hooks = hooks or (os.environ.get(ENV_HOOKS) if tests else None) or None
    if hooks == "python":
        return None
    found = client or default_client(libexec, tests)
    if hooks == "c":
        return found or ""
    return found
