"""HttpTransport against a real HTTP server on a free port (and raw canned answers)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from cloudmon_agent.schema import IngestResponse
from cloudmon_agent.transport import AuthRejected, CollectorUnreachable, HttpTransport, ReportRejected
from tests.unit.agent.sink import Sink, closed_port

TOKEN = "s3cret-token-value"


@pytest.fixture
def transport(sink: Sink) -> Iterator[HttpTransport]:
    t = HttpTransport(sink.url, TOKEN, timeout=5.0)
    try:
        yield t
    finally:
        t.close()


def test_posts_the_body_with_bearer_token(sink: Sink, transport: HttpTransport) -> None:
    answer = transport.send(b'{"v": 1}')
    assert answer == IngestResponse(accepted=1)
    [req] = sink.requests
    assert req.method == "POST"
    assert req.path == "/api/v1/ingest"
    assert req.headers["Authorization"] == f"Bearer {TOKEN}"
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["User-Agent"].startswith("cloudmon-agent/")
    assert req.body == b'{"v": 1}'


def test_keep_alive_reuses_one_connection(sink: Sink, transport: HttpTransport) -> None:
    for i in range(5):
        transport.send(b'{"n": %d}' % i)
    ports = {r.client_port for r in sink.requests}
    assert len(sink.requests) == 5
    assert len(ports) == 1
    assert transport.connections_opened == 1


def test_reconnects_after_the_collector_restarts() -> None:
    first = Sink()
    t = HttpTransport(first.url, TOKEN)
    second: Sink | None = None
    try:
        t.send(b"{}")
        port_before = first.requests[0].client_port
        first.close()  # drops the kept-alive connection, like a collector restart
        second = Sink(port=first.port)
        t.send(b"{}")  # the stale connection fails; retried once on a fresh one
        assert len(second.requests) == 1
        assert second.requests[0].client_port != port_before
        assert t.connections_opened == 2
    finally:
        t.close()
        if second is not None:
            second.close()


def test_unreachable_collector_raises_typed_error_without_token() -> None:
    port = closed_port()
    t = HttpTransport(f"http://127.0.0.1:{port}", TOKEN)
    try:
        with pytest.raises(CollectorUnreachable) as err:
            t.send(b"{}")
    finally:
        t.close()
    assert err.value.reason == "connection refused"
    assert f"127.0.0.1:{port}" in str(err.value)
    assert TOKEN not in str(err.value)
    assert TOKEN not in repr(t)


def test_401_raises_auth_rejected(sink: Sink, transport: HttpTransport) -> None:
    sink.answer = (401, b'{"error": "missing or wrong bearer token"}')
    with pytest.raises(AuthRejected) as err:
        transport.send(b"{}")
    assert err.value.status == 401
    assert err.value.message == "missing or wrong bearer token"
    assert TOKEN not in str(err.value)


@pytest.mark.parametrize("status", [400, 413])
def test_rejected_report_carries_the_server_message(
    sink: Sink, transport: HttpTransport, status: int
) -> None:
    sink.answer = (status, b'{"error": "invalid report: Expected `float` <= 100 - at `$.host.cpu_percent`"}')
    with pytest.raises(ReportRejected) as err:
        transport.send(b"{}")
    assert err.value.status == status
    assert "$.host.cpu_percent" in err.value.message
    # the connection survives a rejection: the next post reuses it
    sink.answer = (200, b'{"accepted": 1}')
    transport.send(b"{}")
    assert len({r.client_port for r in sink.requests}) == 1


def test_server_errors_and_foreign_servers_count_as_unreachable(sink: Sink, transport: HttpTransport) -> None:
    sink.answer = (503, b"store unavailable")
    with pytest.raises(CollectorUnreachable, match=r"HTTP 503 .*store unavailable"):
        transport.send(b"{}")
    sink.answer = (200, b"<html>not a collector</html>")
    with pytest.raises(CollectorUnreachable, match="unexpected answer"):
        transport.send(b"{}")


def test_base_path_and_credentials_in_url(sink: Sink) -> None:
    t = HttpTransport(f"http://user:pw@127.0.0.1:{sink.port}/cloudmon/", None)
    try:
        t.send(b"{}")
    finally:
        t.close()
    assert sink.requests[0].path == "/cloudmon/api/v1/ingest"
    assert "Authorization" not in sink.requests[0].headers
    assert t.url == f"http://127.0.0.1:{sink.port}/cloudmon"  # safe to log


def test_bad_url_is_refused() -> None:
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        HttpTransport("ftp://x", None)


class _Canned:
    """A raw TCP server answering each request on a connection with the next canned bytes, then hanging up."""

    def __init__(self, answers: list[bytes]) -> None:
        self._answers = answers
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._srv.getsockname()[1]}"
        self.requests: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, name="canned-http")
        self._thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self._srv.accept()
            with conn:
                for answer in self._answers:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        data += conn.recv(65536)
                    head, _, body = data.partition(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    while len(body) < length:
                        body += conn.recv(65536)
                    self.requests.append(head + b"\r\n\r\n" + body)
                    conn.sendall(answer)

    def close(self) -> None:
        self._srv.close()
        self._thread.join(timeout=10)


def test_plain_client_reads_chunked_and_keeps_the_connection() -> None:
    chunked = b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"acc\r\n9\r\nepted": 2\r\n1\r\n}\r\n0\r\n\r\n'
    canned = _Canned([chunked, b'HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{"accepted": 1}'])
    t = HttpTransport(canned.url, TOKEN)
    try:
        assert t.send(b'{"a": 1}').accepted == 2
        assert t.send(b'{"b": 2}').accepted == 1
    finally:
        t.close()
        canned.close()
    assert t.connections_opened == 1
    first = canned.requests[0]
    assert first.startswith(b"POST /api/v1/ingest HTTP/1.1\r\n")
    assert f"Authorization: Bearer {TOKEN}\r\n".encode() in first
    assert first.endswith(b'\r\n\r\n{"a": 1}')


def test_plain_client_honours_connection_close_and_http10() -> None:
    close = b'HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 15\r\n\r\n{"accepted": 3}'
    canned = _Canned([close])
    t = HttpTransport(canned.url, TOKEN)
    try:
        assert t.send(b"{}").accepted == 3
        assert t._conn is None  # closed as the server asked
    finally:
        t.close()
        canned.close()
    until_eof = _Canned([b'HTTP/1.0 200 OK\r\n\r\n{"accepted": 4}'])
    t = HttpTransport(until_eof.url, TOKEN)
    try:
        # An HTTP/1.0 answer without a length ends with the connection; the server hangs up after it.
        assert t.send(b"{}").accepted == 4
    finally:
        t.close()
        until_eof.close()


@pytest.mark.parametrize(
    ("answer", "fragment"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "bad HTTP answer: not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "bad HTTP answer: bad Content-Length"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{}",
            "bad HTTP answer: connection closed in the response body",
        ),
    ],
)
def test_plain_client_turns_garbage_into_unreachable(answer: bytes, fragment: str) -> None:
    canned = _Canned([answer])
    t = HttpTransport(canned.url, TOKEN)
    try:
        with pytest.raises(CollectorUnreachable) as err:
            t.send(b"{}")
    finally:
        t.close()
        canned.close()
    assert fragment in err.value.reason
    assert TOKEN not in str(err.value)


def test_https_urls_go_through_the_stdlib_client() -> None:
    # No TLS server here: a refused connection proves the https path connects and maps errors.
    port = closed_port()
    t = HttpTransport(f"https://127.0.0.1:{port}", TOKEN, timeout=2.0)
    try:
        with pytest.raises(CollectorUnreachable, match="connection refused"):
            t.send(b"{}")
    finally:
        t.close()
    assert t.url == f"https://127.0.0.1:{port}"


def test_begin_then_finish_is_one_post_and_its_answer(sink: Sink, transport: HttpTransport) -> None:
    assert transport.begin(b'{"n": 1}') is True
    assert transport.finish() == IngestResponse(accepted=1)
    sink.answer = (400, b'{"error": "invalid report"}')
    assert transport.begin(b'{"n": 2}') is True
    with pytest.raises(ReportRejected, match="invalid report"):
        transport.finish()
    sink.answer = (200, b'{"accepted": 1}')
    transport.send(b'{"n": 3}')  # the connection is still in step: the next exchange works
    assert [r.body for r in sink.requests] == [b'{"n": 1}', b'{"n": 2}', b'{"n": 3}']
    assert transport.connections_opened == 1


def test_an_answer_that_never_comes_is_unreachable_and_the_next_post_reconnects(sink: Sink) -> None:
    t = HttpTransport(sink.url, TOKEN, timeout=5.0)
    try:
        sink.delay_s = 1.0
        assert t.begin(b"{}") is True
        with pytest.raises(CollectorUnreachable, match="timed out"):
            t.finish(timeout=0.1)
        sink.delay_s = 0.0
        assert t.send(b"{}") == IngestResponse(accepted=1)
        assert t.connections_opened == 2  # the late answer was on the dropped connection
    finally:
        t.close()


def test_begin_to_a_closed_port_raises_and_https_does_not_split() -> None:
    t = HttpTransport(f"http://127.0.0.1:{closed_port()}", TOKEN, timeout=1.0)
    with pytest.raises(CollectorUnreachable, match="connection refused"):
        t.begin(b"{}")
    assert HttpTransport("https://127.0.0.1:1", TOKEN).begin(b"{}") is False


def test_repeated_answers_decode_the_same_and_commands_always_come_through(
    sink: Sink, transport: HttpTransport
) -> None:
    assert transport.send(b"{}") == transport.send(b"{}") == IngestResponse(accepted=1)
    cmd = b'{"accepted":1,"commands":[{"id":"c1","action":"vm.state","deadline":1.0,"timeout_s":5,"params":{"vm":"a"}}]}'
    sink.answer = (200, cmd)
    for _ in range(2):
        answer = transport.send(b"{}")
        assert [c.id for c in answer.commands] == ["c1"]
    sink.answer = (200, b'{"accepted":1}')
    assert transport.send(b"{}").commands == []
