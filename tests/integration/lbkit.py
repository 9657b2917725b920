"""Real HTTP backends behind a real HAProxy, for the load-balancer tests.

:class:`HttpBackend` answers its name on a free loopback port (``/hold`` waits
until released); :func:`running_backends` and :func:`running_haproxy` start and
stop them around a test; :func:`distribution` counts which backend served each
of N requests; :class:`HeldRequest` keeps one request open through HAProxy.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from tests.servers import HaproxyServer


class HttpBackend:
    """A threaded HTTP server on a free loopback port that answers its name; ``/hold`` waits."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.hits: Counter[str] = Counter()
        self.release = threading.Event()
        self._lock = threading.Lock()
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with backend._lock:
                    backend.hits[self.path] += 1
                if self.path == "/hold":
                    # Bounded, so that a failing test cannot hang the server thread forever.
                    backend.release.wait(60)
                body = backend.name.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep the test output clean

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port: int = self.httpd.server_address[1]
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, args=(0.05,), name=f"backend-{name}", daemon=True
        )
        self._thread.start()

    def count(self, path: str = "/") -> int:
        """Requests for ``path`` so far."""
        with self._lock:
            return self.hits[path]

    def close(self) -> None:
        """Release held requests, stop serving and join the thread."""
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(10)


def get(url: str, path: str = "/") -> tuple[int, str]:
    """One request through ``url`` on a fresh connection: (status, body)."""
    host, _, port = url.removeprefix("http://").rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


@contextlib.contextmanager
def running_backends(names: Iterable[str]) -> Iterator[dict[str, HttpBackend]]:
    """One :class:`HttpBackend` per name, all closed afterwards."""
    started = {name: HttpBackend(name) for name in names}
    try:
        yield started
    finally:
        for b in started.values():
            b.close()


@contextlib.contextmanager
def running_haproxy(directory: Path, backends: dict[str, HttpBackend]) -> Iterator[HaproxyServer]:
    """HAProxy with backend ``app`` over ``backends`` (weight 100 each), stopped by pid afterwards."""
    server = HaproxyServer.start(directory, {"app": {name: (b.port, 100) for name, b in backends.items()}})
    try:
        yield server
    finally:
        server.close()


def distribution(url: str, n: int) -> Counter[str]:
    counts: Counter[str] = Counter()
    for _ in range(n):
        status, body = get(url)
        assert status == 200
        counts[body] += 1
    return counts


class HeldRequest:
    """A ``/hold`` request in flight through haproxy, in its own thread."""

    def __init__(self, url: str) -> None:
        self.result: list[tuple[int, str]] = []
        self.errors: list[Exception] = []
        self._thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self._thread.start()

    def _run(self, url: str) -> None:
        try:
            self.result.append(get(url, "/hold"))
        except (OSError, http.client.HTTPException) as exc:  # reported by finish()
            self.errors.append(exc)

    def finish(self) -> tuple[int, str]:
        self._thread.join(60)
        assert not self.errors, self.errors
        assert self.result, "the held request did not finish"
        return self.result[0]
