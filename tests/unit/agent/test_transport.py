"""HttpTransport against a real HTTP server on a free port."""

from __future__ import annotations

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
