"""A unix-socket forwarder to the real container engine for integration tests: ``down()`` drops every
connection and stops listening (what cbatchd sees when dockerd stops), ``up()`` listens again (dockerd
restarted); it keeps what clients sent, so a test can count the requests cbatchd made
(:meth:`EngineProxy.requests`), and :meth:`EngineProxy.before` runs a test's action once, just before the
first request containing a needle reaches the engine (a change made at exactly that moment of a start)."""

from __future__ import annotations

import os
import socket
import threading
from typing import List


class EngineProxy:
    """See the module docstring."""

    def __init__(self, path: str, target: str):
        self.path, self.target = path, target
        self.listener = None
        self.conns: List[socket.socket] = []
        self.sent: List[bytearray] = []
        self.lock = threading.Lock()
        self.hooks: List[list] = []           # [needle, action, done Event]

    def before(self, needle: bytes, action) -> threading.Event:
        """Run ``action()`` once, before the first chunk a client sends that contains ``needle`` is forwarded;
        the returned event is set once it ran (the moment was reached)."""
        done = threading.Event()
        with self.lock:
            self.hooks.append([needle, action, done])
        return done

    def requests(self, needle: bytes) -> int:
        with self.lock:
            return sum(bytes(buf).count(needle) for buf in self.sent)

    def up(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        s.listen(64)
        self.listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def down(self) -> None:
        s, self.listener = self.listener, None
        if s is not None:
            s.close()
            os.unlink(self.path)
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self, s) -> None:
        while True:
            try:
                a, _ = s.accept()
            except OSError:
                return
            b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            b.connect(self.target)
            buf = bytearray()
            with self.lock:
                self.conns += [a, b]
                self.sent.append(buf)
            threading.Thread(target=self._pump, args=(a, b, buf), daemon=True).start()
            threading.Thread(target=self._pump, args=(b, a, None), daemon=True).start()

    def _pump(self, src, dst, keep) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if keep is not None:
                    with self.lock:
                        keep += data
                        due = [h for h in self.hooks if h[0] in data]
                        self.hooks = [h for h in self.hooks if h not in due]
                    for _needle, action, done in due:
                        action()
                        done.set()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
