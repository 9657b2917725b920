"""Redis backend specifics on a real private redis-server: layout, duplicates, late samples,
retention trimming, live updates and an outage with recovery on the same port."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from cloudmon.store import Sample, StoreUnavailable, open_store
from cloudmon.store.redis import LIVE_CHANNEL, RedisStore
from tests.servers import RedisServer, free_port, pid_alive, port_open, wait_for

ROOT = Path(__file__).resolve().parents[3]


def minute(node: str, start: float, n: int = 60, offset: float = 0.0) -> list[Sample]:
    return [Sample(node, start + i, {"cpu.percent": i + offset, "mem.used": 1000.0 + i}) for i in range(n)]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    # appendonly: a restart keeps the data, as a production Redis with persistence would.
    srv = RedisServer.start(tmp_path / "redis", appendonly=True)
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def store(server: RedisServer) -> Iterator[RedisStore]:
    st = open_store(server.url)
    assert isinstance(st, RedisStore)
    try:
        yield st
    finally:
        st.close()


@pytest.fixture
def client(server: RedisServer) -> Iterator[Any]:
    c = redis.Redis.from_url(server.url)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def hour() -> float:
    return float(int(time.time()) // 3600 * 3600 - 3 * 3600)


def test_samples_go_to_a_stream_per_node_with_time_ids(store: RedisStore, client: Any, hour: float) -> None:
    store.write_samples(minute("a", hour, 5) + minute("b", hour, 3))
    ids = [eid for eid, _ in client.xrange("cloudmon:raw:a")]
    assert ids == [f"{int(hour * 1000) + 1000 * i}-0".encode() for i in range(5)]
    assert client.xlen("cloudmon:raw:b") == 3
    assert client.hget("cloudmon:latest_ts", "a") == str(int((hour + 4) * 1000)).encode()


def test_replayed_batches_are_refused_by_id_and_counted_once(
    store: RedisStore, client: Any, hour: float
) -> None:
    batch = minute("a", hour)
    store.write_samples(batch)
    store.write_samples(batch)
    store.flush()
    store.write_samples(batch[10:20])  # after the bucket was recomputed
    store.flush()
    assert client.xlen("cloudmon:raw:a") == 60
    assert client.zcard("cloudmon:late:a") == 0
    assert client.zcard("cloudmon:ru:1m:a:cpu.percent") == 1
    one = store.series("a", ["cpu.percent"], hour, hour + 60, 60).metrics["cpu.percent"]
    assert one.avg == pytest.approx([29.5])
    assert one.min == [0.0]
    assert one.max == [59.0]


def test_out_of_order_samples_are_kept_once_and_folded_into_rollups(
    store: RedisStore, client: Any, hour: float
) -> None:
    batch = minute("a", hour)
    store.write_samples(batch[30:])
    store.write_samples(batch[:30])  # older than the stream's top: the late set takes them
    store.write_samples(batch[:30])  # and refuses them a second time
    store.write_samples(batch[40:45])  # duplicates of stream entries
    assert client.zcard("cloudmon:late:a") == 30
    raw = store.series("a", ["cpu.percent"], hour, hour + 60, 1).metrics["cpu.percent"]
    assert raw.avg == [float(i) for i in range(60)]
    store.flush()
    one = store.series("a", ["cpu.percent"], hour, hour + 60, 60)
    assert one.tier == "1m"
    assert one.metrics["cpu.percent"].avg == pytest.approx([29.5])
    latest = store.latest("a")
    assert latest is not None
    assert latest.ts == hour + 59


def test_rollups_are_recomputed_when_a_late_sample_arrives(store: RedisStore, hour: float) -> None:
    store.write_samples(minute("a", hour, 59))  # second 59 missing
    store.flush()
    assert store.series("a", ["cpu.percent"], hour, hour + 60, 60).metrics["cpu.percent"].max == [58.0]
    store.write_samples(minute("a", hour + 60, 60, offset=100.0))
    store.write_samples([Sample("a", hour + 59, {"cpu.percent": 59.0})])
    store.flush()
    res = store.series("a", ["cpu.percent"], hour, hour + 120, 60).metrics["cpu.percent"]
    assert res.max == [59.0, 159.0]
    assert res.avg == pytest.approx([29.5, 129.5])
    hourly = store.series("a", ["cpu.percent"], hour, hour + 3600, 3600)
    assert hourly.tier == "1h"
    assert hourly.metrics["cpu.percent"].avg == pytest.approx([79.5])


def test_open_buckets_are_read_from_the_finer_tier(store: RedisStore, hour: float) -> None:
    store.write_samples(minute("a", hour, 60) + minute("a", hour + 60, 20, offset=100.0))
    # No flush: minute 0 is due (data time passed its end + grace), minute 1 is still open.
    res = store.series("a", ["cpu.percent"], hour, hour + 120, 60).metrics["cpu.percent"]
    assert res.avg == pytest.approx([29.5, 109.5])


def test_retention_trims_streams_with_minid_and_rollups_by_score(
    store: RedisStore, client: Any, hour: float
) -> None:
    store.write_samples(minute("a", hour, 60) + minute("a", hour + 60, 60))
    store.write_samples([Sample("a", hour - 30, {"cpu.percent": 1.0})])  # a late one
    store.flush()
    raw_ret = store.tiers[0].retention_s
    removed = store.enforce_retention(hour + 60 + raw_ret)  # cutoff: the start of minute 1
    assert removed == 61
    assert client.xlen("cloudmon:raw:a") == 60
    assert client.zcard("cloudmon:late:a") == 0
    assert client.xrange("cloudmon:raw:a", count=1)[0][0] == f"{int((hour + 60) * 1000)}-0".encode()
    assert store.enforce_retention(hour + 60 + raw_ret) == 0
    month = next(t.retention_s for t in store.tiers if t.name == "1m")
    assert store.enforce_retention(hour + 120 + month) >= 3  # every 1 min bucket, and the raw rest
    assert client.zcard("cloudmon:ru:1m:a:cpu.percent") == 0
    assert client.zcard("cloudmon:ru:1h:a:cpu.percent") == 2  # the hour before (the late sample) and this one


def test_latest_summaries_are_published_on_the_live_channel(
    store: RedisStore, client: Any, hour: float
) -> None:
    pubsub = client.pubsub()
    try:
        pubsub.subscribe(LIVE_CHANNEL)
        wait_for(lambda: pubsub.get_message(timeout=0.1) is not None, 10, "the subscription")
        store.write_samples(minute("a", hour, 3))
        store.write_samples([Sample("a", hour - 10, {"cpu.percent": 1.0})])  # older: not published
        got: list[dict[str, Any]] = []

        def message() -> bool:
            msg = pubsub.get_message(timeout=0.1)
            if msg is not None and msg["type"] == "message":
                got.append(json.loads(msg["data"]))
            return bool(got)

        wait_for(message, 10, "a live message")
        assert got[0]["node_id"] == "a"
        assert got[0]["ts"] == hour + 2
        assert got[0]["values"]["cpu.percent"] == 2.0
        assert pubsub.get_message(timeout=0.3) is None
    finally:
        pubsub.close()


def test_an_unreachable_server_names_the_url_without_its_password() -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    st = open_store(url)  # does not connect yet: the collector may start before Redis
    try:
        with pytest.raises(StoreUnavailable) as info:
            st.write_samples(minute("a", 1_700_000_000.0, 1))
        text = str(info.value)
        assert "s3cret" not in text
        assert f"redis://:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in text
        assert "start redis-server" in text
    finally:
        st.close()


def test_outage_then_recovery_on_the_same_port(server: RedisServer, store: RedisStore, hour: float) -> None:
    store.write_samples(minute("a", hour, 30))
    server.stop()
    with pytest.raises(StoreUnavailable, match="cannot reach"):
        store.write_samples(minute("a", hour + 30, 30, offset=30.0))
    with pytest.raises(StoreUnavailable):
        store.latest("a")
    server.restart()
    store.write_samples(minute("a", hour + 30, 30, offset=30.0))  # the batch the collector retries
    store.flush()
    res = store.series("a", ["cpu.percent"], hour, hour + 60, 1).metrics["cpu.percent"]
    assert res.avg == [float(i) for i in range(60)]
    assert store.series("a", ["cpu.percent"], hour, hour + 60, 60).metrics[
        "cpu.percent"
    ].avg == pytest.approx([29.5])


def test_two_writers_share_one_store_and_count_each_sample_once(server: RedisServer, hour: float) -> None:
    a, b = RedisStore(server.url), RedisStore(server.url)
    try:
        batch = minute("n", hour, 120)
        a.write_samples(batch[0::2])
        b.write_samples(batch[1::2])
        b.write_samples(batch[:30])  # a replay through the other collector
        a.flush()
        b.flush()
        for st in (a, b):
            res = st.series("n", ["cpu.percent"], hour, hour + 120, 60).metrics["cpu.percent"]
            assert res.avg == pytest.approx([29.5, 89.5])
            assert res.max == [59.0, 119.0]
    finally:
        a.close()
        b.close()


def test_the_test_server_restarts_on_its_port_and_stops_by_pid(tmp_path: Path) -> None:
    srv = RedisServer.start(tmp_path / "r")
    try:
        first = srv.pid
        assert first is not None
        srv.restart()
        assert srv.pid not in (None, first)
        assert not pid_alive(first)
        c = redis.Redis.from_url(srv.url)
        try:
            assert c.ping()
        finally:
            c.close()
        last = srv.pid
    finally:
        srv.close()
    assert last is not None
    assert not pid_alive(last)
    assert not port_open(srv.port)


class _Killed(BaseException):
    """Stands for SIGKILL inside write_samples: nothing in the store may catch it and clean up."""


def test_a_writer_killed_between_claim_and_write_leaves_its_buckets_to_the_others(
    server: RedisServer, hour: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [time.time()]
    crashed = RedisStore(server.url, lease_s=30, clock=lambda: now[0])
    survivor = RedisStore(server.url, lease_s=30, clock=lambda: now[0])

    def killed(jobs: list[tuple[int, int, str]], lease: int) -> None:
        raise _Killed

    try:
        # Fault injection: the writer dies after claiming bucket 0's mark, before writing it.
        monkeypatch.setattr(crashed, "_recompute_jobs", killed)
        with pytest.raises(_Killed):
            crashed.write_samples(minute("n", hour, 60) + minute("n", hour + 60, 16))
        monkeypatch.undo()
        survivor.write_samples(minute("n", hour + 60, 60) + minute("n", hour + 120, 20))
        survivor.flush()
        res = survivor.series("n", ["cpu.percent"], hour, hour + 120, 60)
        assert res.tier == "1m"
        # While the dead writer's lease runs, its bucket is not built (a live writer may be on it).
        assert res.metrics["cpu.percent"].avg == [None, 29.5]
        now[0] += 31
        # Any writer (a fresh one here) reclaims marks whose lease expired.
        fresh = RedisStore(server.url, lease_s=30, clock=lambda: now[0])
        try:
            fresh.flush()
        finally:
            fresh.close()
        got = survivor.series("n", ["cpu.percent"], hour, hour + 120, 60).metrics["cpu.percent"]
        assert got.avg == [29.5, 29.5]
        assert got.max == [59.0, 59.0]
        hourly = survivor.series("n", ["cpu.percent"], hour, hour + 3600, 3600)
        assert hourly.tier == "1h"
        assert hourly.metrics["cpu.percent"].max == [59.0]
        assert hourly.metrics["cpu.percent"].avg == pytest.approx([(29.5 * 120 + 9.5 * 20) / 140])
    finally:
        monkeypatch.undo()
        crashed.close()
        survivor.close()


def test_a_failed_recomputation_gives_its_marks_back_at_once(
    server: RedisServer, hour: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = RedisStore(server.url, lease_s=3600)

    def broken(jobs: list[tuple[int, int, str]], lease: int) -> None:
        raise RuntimeError("injected")

    try:
        monkeypatch.setattr(st, "_recompute_jobs", broken)
        with pytest.raises(RuntimeError):
            st.write_samples(minute("n", hour, 60) + minute("n", hour + 60, 16))
        monkeypatch.undo()
        st.flush()  # no lease to wait for: the live writer gave the mark back
        got = st.series("n", ["cpu.percent"], hour, hour + 120, 60).metrics["cpu.percent"]
        assert got.avg == pytest.approx([29.5, 7.5])
    finally:
        monkeypatch.undo()
        st.close()


# A writer process that dies (no cleanup, no finally: as under SIGKILL) after claiming the
# marks of the minute it completes, before writing that minute's rollup.
_DIE_IN_RECOMPUTE = """
import os, sys
from cloudmon.store import Sample
from cloudmon.store.redis import RedisStore

def die(self, jobs, lease):
    os._exit(9)

RedisStore._recompute_jobs = die
st = RedisStore(sys.argv[1])
t0 = float(sys.argv[2])
st.write_samples([Sample("n", t0 + i, {"cpu.percent": float(i % 60), "mem.used": 1000.0 + i % 60}) for i in range(76)])
"""


def test_the_claims_of_a_dead_writer_process_are_taken_over_at_once(
    server: RedisServer, client: Any, hour: float
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _DIE_IN_RECOMPUTE, server.url, str(hour)], cwd=ROOT, timeout=60
    )
    assert proc.returncode == 9
    assert client.zcard("cloudmon:claimed") == 1  # its claim is still there, lease running
    wait_for(
        lambda: not any(str(c["name"]).startswith("cloudmon-w-") for c in client.client_list()),
        10,
        "Redis to notice the dead writer's connection closed",
    )
    st = RedisStore(server.url)  # the default lease (60 s) is far from expired
    try:
        st.write_samples(minute("n", hour + 60, 60) + minute("n", hour + 120, 20))
        got = st.series("n", ["cpu.percent"], hour, hour + 120, 60).metrics["cpu.percent"]
        assert got.avg == [29.5, 29.5]
        assert client.zcard("cloudmon:claimed") == 0
    finally:
        st.close()
