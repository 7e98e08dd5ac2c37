"""Registry credentials for cbatchd's pulls, from the admin-only Docker-style auth file.

The file (``registry.auth_file`` in the site config) has the shape of ``~/.docker/config.json``::

    {"auths": {"127.0.0.1:5001": {"auth": "<base64 of user:password>"}}}

(``username``/``password`` keys are accepted too). It holds secrets, so the root daemon refuses it unless it
is a regular root-owned file that nobody else can read or write (0600 or 0400): a file a user could write
would let them redirect pulls with their own credentials; one they could read would leak the site's.
The credentials are handed to the engine for one pull and never reach a job: not its environment, not a
mount, not an error message.

Stdlib only.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from typing import Dict, Optional

from cbatch.core.errors import ConfigError

MAX_AUTH_FILE = 1 << 20
_KEY = "registry.auth_file"
DOCKER_HUB = "docker.io"


def registry_of(ref: str) -> str:
    """The registry host[:port] an image reference is pulled from (Docker's rule: the first path
    component is a registry when it has a ``.`` or ``:`` or is ``localhost``; otherwise Docker Hub)."""
    name = ref.split("@", 1)[0]
    first, slash, _ = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first
    return DOCKER_HUB


def _host_key(key: str) -> str:
    """``https://127.0.0.1:5001/v2/`` -> ``127.0.0.1:5001``: config.json keys come in several spellings."""
    for scheme in ("https://", "http://"):
        if key.startswith(scheme):
            key = key[len(scheme):]
    key = key.split("/", 1)[0]
    if key in ("index.docker.io", "registry-1.docker.io"):
        return DOCKER_HUB
    return key


def _read_safely(path: str) -> bytes:
    """Read the file through one descriptor, checking that descriptor: no symlink, root-owned, 0600/0400."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(path, _KEY, "cannot read the registry auth file", exc.strerror,
                          "create it root-owned with mode 0600, or remove registry.auth_file") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(path, _KEY, "registry auth file is not a regular file", path)
        if st.st_uid != 0:
            raise ConfigError(path, _KEY, "registry auth file refused: owned by uid %d, not root" % st.st_uid,
                              path, "chown root:root and chmod 0600 it")
        if st.st_mode & 0o077:
            raise ConfigError(path, _KEY, "registry auth file refused: mode %04o" % stat.S_IMODE(st.st_mode),
                              path, "chmod 0600 it: it holds registry passwords")
        if st.st_size > MAX_AUTH_FILE:
            raise ConfigError(path, _KEY, "registry auth file too large", st.st_size, "at most 1 MiB")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read(MAX_AUTH_FILE)
    finally:
        os.close(fd)


def load_auths(path: str) -> Dict[str, Dict[str, str]]:
    """host[:port] -> {"username", "password", "serveraddress"} from the auth file. ConfigError when the
    file is unsafe or malformed (the message never contains a credential)."""
    raw = _read_safely(path)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(path, _KEY, "registry auth file is not valid JSON", None,
                          'expected {"auths": {"host:port": {"auth": "<base64 user:password>"}}}') from exc
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        raise ConfigError(path, _KEY, "registry auth file has no auths map", None,
                          'expected {"auths": {"host:port": {"auth": "<base64 user:password>"}}}')
    out: Dict[str, Dict[str, str]] = {}
    for key, entry in auths.items():
        host = _host_key(str(key))
        if not isinstance(entry, dict):
            raise ConfigError(path, f"{_KEY}: auths.{host}", "not a map", None, '{"auth": "<base64>"}')
        user, password = entry.get("username"), entry.get("password")
        if "auth" in entry:
            try:
                decoded = base64.b64decode(str(entry["auth"]), validate=True).decode("utf-8")
            except (binascii.Error, ValueError) as exc:
                raise ConfigError(path, f"{_KEY}: auths.{host}.auth", "not base64 of user:password", None,
                                  "base64 -w0 <<< 'user:password'") from exc
            user, sep, password = decoded.partition(":")
            if not sep:
                raise ConfigError(path, f"{_KEY}: auths.{host}.auth", "not base64 of user:password", None,
                                  "the decoded value needs a colon")
        if not user or password is None:
            raise ConfigError(path, f"{_KEY}: auths.{host}", "no credentials", None,
                              'give "auth" (base64 of user:password) or "username" and "password"')
        out[host] = {"username": str(user), "password": str(password), "serveraddress": host}
    return out


def auth_for(path: Optional[str], ref: str) -> Optional[Dict[str, str]]:
    """The engine ``auth_config`` for pulling ``ref``, or None (no auth file, or no entry for its registry).
    The file is read on every call so that an admin's edit applies to the next pull without a restart."""
    if not path:
        return None
    return load_auths(path).get(registry_of(ref))
