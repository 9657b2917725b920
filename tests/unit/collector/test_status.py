"""GET /api/v1/status and /healthz."""

from __future__ import annotations

from urllib.parse import urlsplit

from cloudmon.client import ApiClient
from cloudmon.collector import CollectorThread, redact_url
from cloudmon.store.embedded import EmbeddedStore
from tests.unit.collector.conftest import StartCollector
from tests.unit.collector.helpers import TOKEN, FakeClock, get, post, report_json, wait_for


def test_status_counts_what_happened(
    start_collector: StartCollector, clock: FakeClock, tmp_path: object
) -> None:
    ct = start_collector(write_queue_max=1234, node_timeout=5.0)
    for i in range(3):
        assert post(ct.url, report_json(node_id=f"n{i}", ts=clock.now)).status == 200
    assert post(ct.url, b"{", token=TOKEN).status == 400
    assert post(ct.url, b"{", token=TOKEN).status == 400
    assert post(ct.url, report_json(), token="wrong").status == 401
    assert post(ct.url, report_json(), content_type="text/plain").status == 415
    clock.advance(10)
    assert post(ct.url, report_json(node_id="n0", ts=clock.now)).status == 200

    api = ApiClient(ct.url, TOKEN)
    wait_for(lambda: api.status()["samples_written"] == 4, what="4 samples written")
    status = api.status()
    parts = urlsplit(ct.url)
    assert status["listen"] == f"{parts.hostname}:{parts.port}"
    assert status["loopback"] is True
    assert status["nodes"] == 3
    assert status["online"] == 1
    assert status["reports_accepted"] == 4
    assert status["reports_rejected"] == {"malformed": 2, "unauthorized": 1, "unsupported_media_type": 1}
    assert status["write_queue"] == 0
    assert status["write_queue_max"] == 1234
    assert status["dropped"] == 0
    assert status["store_errors"] == 0
    assert status["last_store_error"] is None
    assert status["degraded"] is False
    assert status["store"].startswith("sqlite:///")
    assert status["uptime_s"] >= 0


def test_healthz_needs_no_token(collector: CollectorThread) -> None:
    answer = get(collector.url, "/healthz", token=None)
    assert answer.status == 200
    assert answer.body["status"] == "ok"
    assert get(collector.url, "/api/v1/status", token=None).status == 401


def test_store_url_password_is_removed() -> None:
    assert redact_url("mongodb://admin:s3cret@db.example:27017/cm?tls=true") == (
        "mongodb://admin:***@db.example:27017/cm?tls=true"
    )
    assert redact_url("redis://:pw@[::1]:6379/0") == "redis://:***@[::1]:6379/0"
    assert redact_url("sqlite:////var/lib/cloudmon/t.db") == "sqlite:////var/lib/cloudmon/t.db"


def test_full_store_shows_degraded_and_turns_into_503(
    start_collector: StartCollector, full_store: EmbeddedStore, clock: FakeClock
) -> None:
    ct = start_collector(store_=full_store, write_queue_max=1500)
    api = ApiClient(ct.url, TOKEN)

    def batch(first: int) -> bytes:
        reports = (report_json(node_id=f"n{i}", ts=clock.now) for i in range(first, first + 1000))
        return b"[" + b",".join(reports) + b"]"

    assert post(ct.url, batch(0)).status == 200
    wait_for(lambda: api.status()["degraded"], what="degraded status")
    refused = post(ct.url, batch(1000))
    assert refused.status == 503
    assert refused.headers["Retry-After"]
    status = api.status()
    assert status["store_errors"] >= 1
    assert "disk full" in status["last_store_error"]
    assert status["write_queue"] == 1000  # kept for a retry, not dropped
    assert status["dropped"] == 0
    assert status["reports_rejected"] == {"queue_full": 1}
    assert len(api.nodes().nodes) == 1000  # the model has what was accepted
    ct.close(flush_timeout=0.2)
    assert full_store.latest("n0") is None
