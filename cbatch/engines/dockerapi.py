"""The Docker SDK's API client as cbatchd uses it: one connection pool for the engine's unix socket.

docker-py keys its unix-socket connection pools by the full request URL, so every request naming a new
container id or a new label filter built a new pool (``max_pool_size`` queue slots) and a new connection,
and evicted an older pool's connections: a job's start and end paid for several connects. Here every
request to the socket shares one pool. For a unix socket ``requests`` also stops consulting the
environment (proxy variables, ``.netrc``) on every request: nothing there applies to a local socket.
Other URL schemes (tcp, https, ssh) keep the SDK's own behaviour.
"""

from __future__ import annotations

import threading

import docker
from docker.transport import UnixHTTPAdapter
from docker.transport.unixconn import UnixHTTPConnectionPool


class _OnePoolAdapter(UnixHTTPAdapter):
    """The SDK's unix-socket adapter with a single pool for every URL."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pool = None
        self._pool_lock = threading.Lock()

    def get_connection(self, url, proxies=None):
        """The one pool (made on the first request); the URL only ever named the same socket."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = UnixHTTPConnectionPool(url, self.socket_path, self.timeout, maxsize=self.max_pool_size)
            return self._pool

    def close(self) -> None:
        """Close the pool's idle connections (the session's close)."""
        super().close()
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()


def client(url: str, version: str, timeout: float, max_pool_size: int) -> docker.APIClient:
    """An APIClient for ``url``; raises the SDK's DockerException for a bad URL (the caller maps it)."""
    api = docker.APIClient(base_url=url, version=version, timeout=timeout, max_pool_size=max_pool_size)
    adapter = getattr(api, "_custom_adapter", None)
    if type(adapter) is UnixHTTPAdapter:
        one = _OnePoolAdapter(adapter.socket_path, timeout, max_pool_size=max_pool_size)
        api.mount("http+docker://", one)
        api._custom_adapter = one
        adapter.close()
        api.trust_env = False
    return api
