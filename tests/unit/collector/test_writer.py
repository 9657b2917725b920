"""The store writer thread against a real embedded store: batching, bounds, failures."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest

from cloudmon.collector.writer import StoreWriter
from cloudmon.store import NodeRecord, Sample, TelemetryStore
from cloudmon.store.embedded import EmbeddedStore
from tests.unit.collector.helpers import wait_for

NOW = float(int(time.time()))


def samples(node_id: str, n: int, start: float = NOW - 600) -> list[Sample]:
    return [Sample(node_id, start + i, {"cpu.percent": float(i % 100), "mem.used": 1e9}) for i in range(n)]


def record(node_id: str, last_seen: float = NOW) -> NodeRecord:
    return NodeRecord(node_id, f"host-{node_id}", NOW - 100, last_seen, {"os": "Linux"})


@pytest.fixture
def writer(store: TelemetryStore, no_thread_leaks: None) -> Iterator[StoreWriter]:
    w = StoreWriter(store, max_queue=50_000, batch_max=1000, flush_interval=0.05)
    try:
        yield w
    finally:
        w.close()


def test_batches_are_written_and_close_flushes_everything(writer: StoreWriter, store: TelemetryStore) -> None:
    writer.start()
    for node in ("a", "b", "c"):
        assert writer.offer(samples(node, 1500), [record(node)], new_node=True)
    writer.close()
    stats = writer.stats()
    assert (stats.written, stats.queued, stats.dropped, stats.store_errors) == (4500, 0, 0, 0)
    for node in ("a", "b", "c"):
        latest = store.latest(node)
        assert latest is not None
        assert latest.ts == NOW - 600 + 1499
    assert {r.node_id: r.hostname for r in store.nodes()} == {"a": "host-a", "b": "host-b", "c": "host-c"}
    assert not writer.offer(samples("d", 1), [])  # closed: takes nothing


def test_new_node_inventory_is_written_without_waiting(writer: StoreWriter, store: TelemetryStore) -> None:
    writer.start()
    assert writer.offer(samples("fresh", 1), [record("fresh")], new_node=True)
    wait_for(lambda: [r.node_id for r in store.nodes()] == ["fresh"], what="the new node in the inventory")


def test_queue_bound_is_all_or_nothing(writer: StoreWriter, store: TelemetryStore) -> None:
    small = StoreWriter(store, max_queue=10)
    assert small.offer(samples("a", 8), [])
    assert not small.offer(samples("b", 3), [])  # would make 11: none of it is taken
    assert small.offer(samples("c", 2), [])
    assert small.stats().queued == 10
    small.start()
    small.close()
    assert small.stats().written == 10
    assert store.latest("b") is None
    assert store.latest("c") is not None


def test_a_sample_the_store_refuses_costs_only_itself(
    writer: StoreWriter, store: TelemetryStore, caplog: pytest.LogCaptureFixture
) -> None:
    batch = [*samples("good", 3), Sample("bad", 1e300, {"cpu.percent": 1.0}), *samples("good2", 2)]
    assert writer.offer(batch, [])
    writer.start()
    writer.close()
    stats = writer.stats()
    assert (stats.written, stats.dropped, stats.queued) == (5, 1, 0)
    assert stats.store_errors >= 1
    assert stats.last_store_error is not None
    assert stats.degraded is False
    assert store.latest("good2") is not None
    assert store.latest("bad") is None
    assert "refused 1 samples" in caplog.text


def test_unavailable_store_keeps_samples_degrades_and_counts_losses_at_close(
    full_store: EmbeddedStore, no_thread_leaks: None, caplog: pytest.LogCaptureFixture
) -> None:
    writer = StoreWriter(full_store, max_queue=3000, batch_max=1000, flush_interval=0.05, max_backoff=0.1)
    writer.start()
    try:
        for i in range(3):
            assert writer.offer(
                [Sample(f"n{j}", NOW + i, {f"m{k}": float(k) for k in range(40)}) for j in range(1000)], []
            )
        wait_for(lambda: writer.stats().degraded, what="the writer to notice the full store")
        stats = writer.stats()
        assert "disk full" in (stats.last_store_error or "")
        assert stats.dropped == 0  # kept, retried
        assert stats.queued + stats.written == 3000
        assert stats.queued > 0
        assert not writer.offer(samples("late", 1), [])  # full queue: refused, agents will retry
    finally:
        writer.close(timeout=0.3)
    stats = writer.stats()
    assert stats.dropped == 3000 - stats.written
    assert stats.queued == 0
    warnings = [r for r in caplog.records if "store unavailable" in r.getMessage()]
    assert len(warnings) == 1  # once per outage, not per retry
    assert any("were not written" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
