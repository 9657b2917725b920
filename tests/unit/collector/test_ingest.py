"""POST /api/v1/ingest: what is accepted, what is refused (and then stored nowhere)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
import pytest

from cloudmon.client import ApiClient
from cloudmon.collector import CollectorThread
from cloudmon.store import TelemetryStore
from tests.unit.collector.conftest import StartCollector
from tests.unit.collector.helpers import (
    TOKEN,
    FakeClock,
    get,
    post,
    report_dict,
    report_json,
    wait_for,
)

BAD = "bad-node"


def _stored(store: TelemetryStore, node_id: str) -> bool:
    return store.latest(node_id) is not None and node_id in {n.node_id for n in store.nodes()}


def accept_good(ct: CollectorThread, store: TelemetryStore, node_id: str, ts: float) -> None:
    """Post a valid report and wait until the store has it (and so everything queued before)."""
    answer = post(ct.url, report_json(node_id=node_id, ts=ts))
    assert answer.status == 200, answer.body
    assert answer.body == {"accepted": 1, "commands": []}
    wait_for(lambda: _stored(store, node_id), what=f"{node_id} in the store")


def test_good_report_reaches_model_and_store(
    collector: CollectorThread, store: TelemetryStore, clock: FakeClock
) -> None:
    accept_good(collector, store, "node-a", clock.now)
    sample = store.latest("node-a")
    assert sample is not None
    assert sample.ts == clock.now
    assert sample.values["cpu.percent"] == 12.5
    assert sample.values["cpu.core.1"] == 6.25
    (record,) = store.nodes()
    assert record.hostname == "host-node-a"
    assert record.info["cpu_count"] == 2
    nodes = ApiClient(collector.url, TOKEN).nodes().nodes
    assert [(n.node_id, n.status, n.values["cpu.percent"]) for n in nodes] == [("node-a", "online", 12.5)]


@dataclass(frozen=True)
class Bad:
    body: bytes
    status: int
    reason: str
    says: str
    token: str | None = TOKEN
    content_type: str = "application/json"
    chunked: bool = False


def _with(**changes: Any) -> bytes:
    doc = report_dict(node_id=BAD)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        target = doc
        for p in parents:
            target = target[p]
        target[leaf] = value
    return msgspec.json.encode(doc)


_GOOD_BAD = report_json(node_id=BAD)
_BATCH_OK = report_json(node_id="batch-ok")

BAD_CASES = {
    "missing token": Bad(_GOOD_BAD, 401, "unauthorized", "missing bearer token", token=None),
    "wrong token": Bad(_GOOD_BAD, 401, "unauthorized", "wrong bearer token", token="not-the-token"),
    "malformed json": Bad(b'{"v": 1, "node_id": ', 400, "malformed", "malformed JSON"),
    "not json at all": Bad(b"hello", 400, "malformed", "malformed JSON"),
    "empty body": Bad(b"", 400, "malformed", "malformed JSON"),
    "invalid field": Bad(_with(host__cpu_percent=150.0), 400, "invalid", "host.cpu_percent"),
    "invalid node id": Bad(_with(node_id="bad node!"), 400, "invalid", "node_id"),
    "null field": Bad(_with(host__mem_total=None), 400, "invalid", "host.mem_total"),
    "absurd timestamp": Bad(_with(ts=1e300), 400, "invalid", "$.ts"),
    "unknown version": Bad(_with(v=99), 400, "unsupported_version", "supports v in (1)"),
    "oversize": Bad(_GOOD_BAD + b" " * 5000, 413, "too_large", "max_body_bytes=4096"),
    "oversize chunked": Bad(_GOOD_BAD + b" " * 5000, 413, "too_large", "max_body_bytes", chunked=True),
    "wrong content type": Bad(
        _GOOD_BAD, 415, "unsupported_media_type", "application/json", content_type="text/plain"
    ),
    "batch with one bad element": Bad(
        b"[" + _BATCH_OK + b"," + _with(ts=-1) + b"]", 400, "invalid", "report [1]"
    ),
    "empty batch": Bad(b"[]", 400, "batch_size", "1 to 1000"),
    "batch over 1000": Bad(b"[" + b",".join([b"1"] * 1001) + b"]", 400, "batch_size", "got 1001"),
}


@pytest.mark.parametrize("case", BAD_CASES.values(), ids=list(BAD_CASES))
def test_bad_request_is_refused_stores_nothing_and_serving_goes_on(
    start_collector: StartCollector, store: TelemetryStore, clock: FakeClock, case: Bad
) -> None:
    ct = start_collector(max_body_bytes=4096)
    answer = post(ct.url, case.body, token=case.token, content_type=case.content_type, chunked=case.chunked)
    assert answer.status == case.status
    assert case.says in answer.body["error"]
    if case.status == 401:
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    # The collector still serves; once this later report is stored, anything the
    # bad request might have queued before it would have been stored too.
    accept_good(ct, store, "node-good", clock.now)
    for node_id in (BAD, "batch-ok"):
        assert store.latest(node_id) is None
        assert node_id not in {n.node_id for n in store.nodes()}
    api = ApiClient(ct.url, TOKEN)
    assert [n.node_id for n in api.nodes().nodes] == ["node-good"]
    status = api.status()
    assert status["reports_rejected"] == {case.reason: 1}
    assert status["reports_accepted"] == 1


def test_batch_is_accepted_whole(collector: CollectorThread, store: TelemetryStore, clock: FakeClock) -> None:
    body = b"[" + b",".join(report_json(node_id=f"n{i}", ts=clock.now - i) for i in range(5)) + b"]"
    answer = post(collector.url, body)
    assert answer.status == 200
    assert answer.body["accepted"] == 5
    wait_for(lambda: len(store.nodes()) == 5, what="5 nodes in the store")
    assert {n.node_id for n in store.nodes()} == {f"n{i}" for i in range(5)}
    assert ApiClient(collector.url, TOKEN).status()["reports_accepted"] == 5


def test_full_write_queue_refuses_the_whole_request(
    start_collector: StartCollector, store: TelemetryStore, clock: FakeClock
) -> None:
    ct = start_collector(write_queue_max=2)
    body = b"[" + b",".join(report_json(node_id=f"q{i}", ts=clock.now) for i in range(3)) + b"]"
    answer = post(ct.url, body)
    assert answer.status == 503
    assert answer.headers["Retry-After"] == "2"
    assert "write queue is full" in answer.body["error"]
    accept_good(ct, store, "node-good", clock.now)
    assert all(store.latest(f"q{i}") is None for i in range(3))
    status = ApiClient(ct.url, TOKEN).status()
    assert status["reports_rejected"] == {"queue_full": 1}
    assert status["write_queue_max"] == 2
    assert [n.node_id for n in ApiClient(ct.url, TOKEN).nodes().nodes] == ["node-good"]


def test_late_report_does_not_roll_live_values_back(
    collector: CollectorThread, store: TelemetryStore, clock: FakeClock
) -> None:
    assert post(collector.url, report_json(ts=clock.now, cpu=50.0)).status == 200
    assert post(collector.url, report_json(ts=clock.now - 30, cpu=5.0)).status == 200  # replayed
    node = ApiClient(collector.url, TOKEN).node("node-a")
    assert node.latest["cpu.percent"] == 50.0
    wait_for(
        lambda: ApiClient(collector.url, TOKEN).status()["samples_written"] == 2, what="2 samples written"
    )


def test_unknown_route_and_wrong_method_answer_json(collector: CollectorThread) -> None:
    missing = get(collector.url, "/api/v1/nope")
    assert missing.status == 404
    assert "no such endpoint" in missing.body["error"]
    wrong = get(collector.url, "/api/v1/ingest")
    assert wrong.status == 405
    assert wrong.headers["Allow"] == "POST"
    assert "use POST" in wrong.body["error"]
    # Unknown /api/v1 paths need the token too: nothing is revealed without it.
    assert get(collector.url, "/api/v1/nope", token=None).status == 401
