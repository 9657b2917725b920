"""The shared Redis ingest queue (``queue`` setting) on a real private redis-server.

Collectors run in-process (``CollectorThread``) with real embedded stores; the
queue, the consumer group and pub/sub are real Redis.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis

from cloudmon.client import ApiClient
from cloudmon.collector.queue import GROUP, STREAM_KEY, QueuedSample
from cloudmon.store import Sample, TelemetryStore, open_store
from tests.servers import RedisServer
from tests.unit.collector.conftest import StartCollector
from tests.unit.collector.helpers import TOKEN, FakeClock, get, post, report_json, wait_for


@pytest.fixture
def redis_srv(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer.start(tmp_path / "redis")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def rclient(redis_srv: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_srv.url)
    try:
        yield client
    finally:
        client.close()


def _stored_ts(store: TelemetryStore, node: str, start: float, end: float) -> list[float]:
    res = store.series(node, ["cpu.percent"], start, end, 1.0)
    return [t for t, v in zip(res.timestamps, res.metrics["cpu.percent"].avg, strict=True) if v is not None]


def test_reports_go_through_the_queue_into_the_store(
    start_collector: StartCollector,
    store: TelemetryStore,
    redis_srv: RedisServer,
    rclient: redis.Redis,
    clock: FakeClock,
) -> None:
    c = start_collector(queue=redis_srv.url)
    t0 = clock.now - 30
    for i in range(5):
        assert post(c.url, report_json(ts=t0 + i, cpu=float(i))).status == 200
    wait_for(lambda: len(_stored_ts(store, "node-a", t0, t0 + 10)) == 5, what="5 samples stored")
    assert _stored_ts(store, "node-a", t0, t0 + 10) == [t0 + i for i in range(5)]
    # Acknowledged once stored: nothing pending in the group.
    wait_for(lambda: rclient.xpending(STREAM_KEY, GROUP)["pending"] == 0, what="no pending entries")
    status = get(c.url, "/api/v1/status").body
    assert status["samples_written"] == 5
    assert status["degraded"] is False


def test_entries_of_a_dead_consumer_are_claimed_and_stored_once(
    start_collector: StartCollector,
    store: TelemetryStore,
    redis_srv: RedisServer,
    rclient: redis.Redis,
    clock: FakeClock,
) -> None:
    t0 = clock.now - 30
    rclient.xgroup_create(STREAM_KEY, GROUP, id="0", mkstream=True)
    enc = msgspec.msgpack.Encoder()
    for i in range(3):
        sample = QueuedSample("node-dead", t0 + i, {"cpu.percent": float(i)})
        rclient.xadd(STREAM_KEY, {b"r": enc.encode(sample)})
    # A consumer that reads them and dies before acknowledging; one of them it had
    # already written to the store (crash between write and XACK).
    read: Any = rclient.xreadgroup(GROUP, "dead-consumer", {STREAM_KEY: ">"}, count=10)
    assert len(read[0][1]) == 3
    store.write_samples([Sample("node-dead", t0, {"cpu.percent": 0.0})])
    c = start_collector(queue=redis_srv.url, queue_claim_timeout=0.5)
    wait_for(lambda: len(_stored_ts(store, "node-dead", t0, t0 + 10)) == 3, what="claimed samples stored")
    wait_for(lambda: rclient.xpending(STREAM_KEY, GROUP)["pending"] == 0, what="claimed entries acked")
    assert _stored_ts(store, "node-dead", t0, t0 + 10) == [t0, t0 + 1, t0 + 2]
    # The sample written twice counts once in the rollup: the 1 min average is (0+1+2)/3.
    store.flush()
    lo = t0 - t0 % 60
    minute = store.series("node-dead", ["cpu.percent"], lo, lo + 120, 60.0)
    assert minute.tier == "1m"
    expected: dict[float, list[float]] = {}
    for i in range(3):  # the 3 s may straddle a minute boundary
        expected.setdefault(lo + 60 * ((t0 + i - lo) // 60), []).append(float(i))
    got = {
        t: v
        for t, v in zip(minute.timestamps, minute.metrics["cpu.percent"].avg, strict=True)
        if v is not None
    }
    assert got == {t: sum(vs) / len(vs) for t, vs in expected.items()}
    assert get(c.url, "/api/v1/status").body["degraded"] is False


def test_every_collector_lists_nodes_ingested_by_another(
    start_collector: StartCollector, tmp_path: Path, redis_srv: RedisServer, clock: FakeClock
) -> None:
    other_store = open_store(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        a = start_collector(queue=redis_srv.url)
        b = start_collector(other_store, queue=redis_srv.url, data_dir=str(tmp_path / "b"))
        assert post(a.url, report_json(node_id="only-a", ts=clock.now - 1)).status == 200
        assert post(b.url, report_json(node_id="only-b", ts=clock.now - 1)).status == 200

        def ids(url: str) -> set[str]:
            return {n["node_id"] for n in get(url, "/api/v1/nodes").body["nodes"]}

        wait_for(lambda: ids(a.url) == {"only-a", "only-b"}, what="collector a lists both nodes")
        wait_for(lambda: ids(b.url) == {"only-a", "only-b"}, what="collector b lists both nodes")
        node = get(b.url, "/api/v1/nodes/only-a").body
        assert node["latest"]["cpu.percent"] == 12.5
    finally:
        other_store.close()


def test_queue_down_answers_503_and_nothing_is_lost(
    start_collector: StartCollector, store: TelemetryStore, redis_srv: RedisServer, clock: FakeClock
) -> None:
    c = start_collector(queue=redis_srv.url)
    t0 = clock.now - 30
    assert post(c.url, report_json(ts=t0)).status == 200
    redis_srv.stop()
    answer = post(c.url, report_json(ts=t0 + 1))
    assert answer.status == 503
    assert "shared queue" in answer.body["error"]
    assert get(c.url, "/api/v1/status").body["reports_rejected"]["queue_unavailable"] == 1
    redis_srv.restart()  # no persistence: the stream and group are gone and recreated
    wait_for(lambda: post(c.url, report_json(ts=t0 + 1)).status == 200, what="queue back")
    wait_for(lambda: _stored_ts(store, "node-a", t0, t0 + 10) == [t0, t0 + 1], what="both samples stored")


def test_without_a_queue_url_nothing_touches_redis(
    start_collector: StartCollector, store: TelemetryStore, rclient: redis.Redis, clock: FakeClock
) -> None:
    c = start_collector()
    assert post(c.url, report_json(ts=clock.now - 5)).status == 200
    wait_for(lambda: _stored_ts(store, "node-a", clock.now - 10, clock.now) == [clock.now - 5], what="stored")
    assert rclient.exists(STREAM_KEY) == 0


def test_live_stream_of_one_collector_carries_samples_ingested_by_another(
    start_collector: StartCollector, tmp_path: Path, redis_srv: RedisServer, clock: FakeClock
) -> None:
    other_store = open_store(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        a = start_collector(queue=redis_srv.url)
        b = start_collector(other_store, queue=redis_srv.url, data_dir=str(tmp_path / "b"))
        events = ApiClient(b.url, TOKEN).stream("node-a", timeout=10)
        assert next(events).event == "nodes"
        assert post(a.url, report_json(node_id="node-a", ts=clock.now, cpu=42.0)).status == 200
        sample = next(e for _, e in zip(range(20), events, strict=False) if e.event == "sample")
        assert sample.data["node_id"] == "node-a"
        assert sample.data["ts"] == clock.now
        assert sample.data["values"]["cpu.percent"] == 42.0
        b.close()
        assert all(e.event == "nodes" for e in events)
    finally:
        other_store.close()


def test_queue_beyond_its_bound_answers_503(
    start_collector: StartCollector, redis_srv: RedisServer, clock: FakeClock
) -> None:
    c = start_collector(queue=redis_srv.url, queue_max_entries=3)
    t0 = clock.now - 30
    # Acknowledged entries leave the stream only at the next (approximate) trim:
    # right after these appends the stream holds 3 entries, the bound.
    for i in range(3):
        assert post(c.url, report_json(ts=t0 + i)).status == 200
    answer = post(c.url, report_json(ts=t0 + 3))
    assert answer.status == 503
    assert answer.headers["Retry-After"]
    assert get(c.url, "/api/v1/status").body["reports_rejected"]["queue_unavailable"] == 1
