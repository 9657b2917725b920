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


# -- exactly once: retries, replays and late reports -------------------------------


def _batch(node_id: str, items: list[tuple[float, float]]) -> bytes:
    """A JSON array of reports ``(ts, cpu)``, as an agent replays its spool."""
    return b"[" + b",".join(report_json(node_id=node_id, ts=ts, cpu=cpu) for ts, cpu in items) + b"]"


def _written(client: ApiClient, n: int) -> bool:
    st = client.status()
    return bool(st["samples_written"] >= n and st["write_queue"] == 0)


def test_retries_and_replays_are_stored_once_in_every_tier(
    collector: CollectorThread, store: TelemetryStore, clock: FakeClock
) -> None:
    node = "node-once"
    t0 = float(int(clock.now) // 3600 * 3600 - 7200)  # an hour bucket in the past
    on_time = [(t0 + i, float(i % 7) * 10) for i in range(120)]  # two minutes, 1 s apart
    late = [(t0 + i + 0.5, 100.0) for i in range(60)]  # arrive after the first minute was compacted
    client = ApiClient(collector.url, TOKEN)
    sent = 0

    def send(body: bytes, n: int) -> None:
        nonlocal sent
        answer = post(collector.url, body)
        assert answer.status == 200, answer.body
        assert answer.body["accepted"] == n
        sent += n

    try:
        send(_batch(node, on_time), 120)
        send(_batch(node, on_time), 120)  # the agent's retry after a lost answer
        send(report_json(node_id=node, ts=on_time[5][0], cpu=on_time[5][1]), 1)
        wait_for(lambda: _written(client, sent), what="the first batches written")
        store.flush()  # compact: the raw samples are in blocks and folded into the rollups
        send(_batch(node, on_time[:60]), 60)  # a replay of what is compacted already
        send(_batch(node, late), 60)  # late but new: must count, once
        send(_batch(node, late), 60)  # ... and their retry must not
        wait_for(lambda: _written(client, sent), what="the replays written")
        for flushed in (False, True):  # before compaction (head rows) and after
            if flushed:
                store.flush()
            raw = client.series(node, ["cpu.percent"], t0, t0 + 120, step=0.5)
            assert raw.tier == "raw"
            want_raw: list[float | None] = [None] * 240
            for ts, cpu in [*on_time, *late]:
                want_raw[int((ts - t0) * 2)] = cpu
            assert raw.metrics["cpu.percent"].avg == want_raw
            minute = client.series(node, ["cpu.percent"], t0, t0 + 120, step=60)
            assert minute.tier == "1m"
            m0 = [c for _, c in on_time[:60]] + [c for _, c in late]
            m1 = [c for _, c in on_time[60:]]
            assert minute.metrics["cpu.percent"].avg == pytest.approx([sum(m0) / 120, sum(m1) / 60])
            hour = client.series(node, ["cpu.percent"], t0, t0 + 3600, step=3600)
            assert hour.tier == "1h"
            everything = [c for _, c in [*on_time, *late]]
            assert hour.metrics["cpu.percent"].avg == pytest.approx([sum(everything) / 180])
        # Replayed old reports do not roll the live values back.
        (summary,) = [n for n in client.nodes().nodes if n.node_id == node]
        assert summary.values["cpu.percent"] == on_time[-1][1]
    finally:
        client.close()


def test_retries_and_replays_do_not_reach_the_live_stream_again(
    collector: CollectorThread, clock: FakeClock
) -> None:
    node = "node-live"
    t = clock.now
    assert post(collector.url, report_json(node_id=node, ts=t, cpu=1.0)).status == 200
    events = ApiClient(collector.url, TOKEN).stream(node, timeout=10)
    assert next(events).event == "nodes"
    for ts, cpu in ((t + 1, 2.0), (t + 1, 2.0), (t - 5, 9.0), (t + 2, 3.0)):  # new, retry, replay, new
        assert post(collector.url, report_json(node_id=node, ts=ts, cpu=cpu)).status == 200
    seen: list[tuple[float, float]] = []
    for event in events:
        if event.event == "sample":
            seen.append((event.data["ts"], event.data["values"]["cpu.percent"]))
            if event.data["ts"] == t + 2:
                break
    collector.close()
    list(events)
    assert seen == [(t + 1, 2.0), (t + 2, 3.0)]
