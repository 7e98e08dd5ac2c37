"""Shared by the client protocol tests: the C client fixture, a fake cbatchd, shims, a directory nobody
can use."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from cbatch import protocol
from cbatch.admin import install
from cbatch.clients import cclient

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def c_client():
    """The C client: ``$CBATCH_CLIENT``, or built here with ``make -C libexec cbatch-client``."""
    if os.environ.get(cclient.ENV_CLIENT):
        return os.environ[cclient.ENV_CLIENT]
    built = ROOT / "libexec" / cclient.CLIENT_NAME      # this checkout's (the package may be installed elsewhere)
    if not shutil.which("musl-gcc") and not built.exists():
        pytest.skip("musl-gcc not installed (apt-get install musl-tools)")
    subprocess.run(["make", "-s", "-C", str(ROOT / "libexec"), "cbatch-client"], check=True)
    return str(built)


class FakeDaemon:
    """Accepts connections on a unix socket; the first request gets ``replies`` (frames or raw bytes), later
    ones (a reattach, a ping) an error reply; then the connection is closed."""

    def __init__(self, path: str, replies, raw_fds=None) -> None:
        self.path, self.replies, self.raw_fds = path, replies, raw_fds
        self.requests, self.raw, self.fds = [], [], []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        os.chmod(path, 0o666)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    self._one(conn)
                except Exception:       # noqa: BLE001 - a client that went away is the test's business
                    pass

    def _one(self, conn) -> None:
        conn.settimeout(20)
        head, anc, _, _ = conn.recvmsg(4, socket.CMSG_SPACE(16), socket.MSG_WAITALL)
        fds = []
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(struct.unpack(f"{len(data) // 4}i", data[:len(data) - len(data) % 4]))
        (size,) = struct.unpack(">I", head)
        body = b""
        while len(body) < size:
            chunk = conn.recv(size - len(body))
            if not chunk:
                raise EOFError
            body += chunk
        first = not self.requests
        self.raw.append(body)
        self.requests.append(protocol.decode(body))
        for fd in fds:
            self.fds.append(os.fstat(fd).st_ino)
            os.close(fd)
        if not first:
            protocol.send(conn, {"ok": False, "error": {"subject": "daemon", "problem": "refused"}})
            return
        for reply in self.replies:
            if isinstance(reply, bytes):
                if self.raw_fds:
                    conn.sendmsg([reply[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                struct.pack(f"{len(self.raw_fds)}i", *self.raw_fds))])
                    conn.sendall(reply[1:])
                else:
                    conn.sendall(reply)
            else:
                protocol.send(conn, reply)
        conn.shutdown(socket.SHUT_WR)
        try:
            conn.settimeout(10)
            while conn.recv(4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


NOBODY = 65534
# The starter drops to the script's owner when it runs as root: run the clients as nobody, as pbs_mom would
# run a job user's starter.
AS_USER = {"user": NOBODY, "group": NOBODY} if os.geteuid() == 0 else {}


@pytest.fixture
def wd():
    """A directory nobody can enter (pytest's wd is 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix="cbatch-golden-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def write_shim(tmp: Path, role: str, sock: str, client) -> str:
    path = tmp / role
    text = install.shim_text(role, sock, sys.executable, client)
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


