"""A small real HTTP/1.1 server that records what agents POST (test helper).

Answers every POST with a configurable status and body, keeps connections
alive, remembers each request's client port (to see connection reuse), and on
:meth:`Sink.close` really closes every connection, so a restarted sink looks
to a client like a restarted collector.  It can also be told to take a while
per request (``delay_s``) or to read the next requests and hang up without an
answer (``drop_responses``: a response lost on the way back).
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Recorded:
    """One request the sink received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    client_port: int


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle on, the body waits for the
    # client's delayed ACK (≈40 ms per request).
    disable_nagle_algorithm = True
    server: _Server

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        sink = self.server.sink
        sink._record(Recorded("POST", self.path, dict(self.headers.items()), body, self.client_address[1]))
        if sink.delay_s:
            time.sleep(sink.delay_s)  # simulates a slow collector (not a readiness wait)
        if sink._take_drop():
            self.close_connection = True
            return  # the request was received; its answer is lost
        status, payload = sink.answer
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins handler threads: nothing left running
    block_on_close = True

    def __init__(self, sink: Sink, port: int) -> None:
        self.sink = sink
        self.open_sockets: set[socket.socket] = set()
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)


class Sink:
    """Records POSTs on ``127.0.0.1:port`` (0 = a free port) until :meth:`close`."""

    def __init__(self, port: int = 0, status: int = 200, body: bytes = b'{"accepted": 1}') -> None:
        self.answer = (status, body)
        #: Seconds each POST takes before it is answered.
        self.delay_s = 0.0
        #: How many of the next POSTs get no answer (the connection is closed instead).
        self.drop_responses = 0
        self._requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._server = _Server(self, port)
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="test-sink")
        self._thread.start()

    def _record(self, r: Recorded) -> None:
        with self._lock:
            self._requests.append(r)

    def _take_drop(self) -> bool:
        with self._lock:
            if self.drop_responses > 0:
                self.drop_responses -= 1
                return True
            return False

    @property
    def requests(self) -> list[Recorded]:
        """What was received so far, in order."""
        with self._lock:
            return list(self._requests)

    def close(self) -> None:
        """Stop serving and close every open connection (like a collector restart)."""
        self._server.shutdown()
        with self._server.lock:
            conns = list(self._server.open_sockets)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        self._thread.join()


def closed_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


__all__ = ["Recorded", "Sink", "closed_port", "wait_until"]
