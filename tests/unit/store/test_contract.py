"""The TelemetryStore contract: every backend must pass these unchanged (see conftest.BACKENDS)."""

from __future__ import annotations

import math
import threading

import pytest

from cloudmon.store import DEFAULT_TIERS, NodeRecord, Sample, StoreError, TelemetryStore

METRICS = ("cpu.percent", "mem.used", "load.1")


def minute_of(node: str, start: float, n: int = 60, *, offset: float = 0.0) -> list[Sample]:
    """``n`` samples one second apart with known values: cpu = i, mem = 1000 + 2i, load = 0.5."""
    return [
        Sample(node, start + i, {"cpu.percent": i + offset, "mem.used": 1000.0 + 2 * i, "load.1": 0.5})
        for i in range(n)
    ]


def test_is_a_telemetry_store(store: TelemetryStore) -> None:
    assert isinstance(store, TelemetryStore)
    assert [t.name for t in store.tiers] == [t.name for t in DEFAULT_TIERS]


def test_latest_is_the_newest_sample_with_all_metrics(store: TelemetryStore, hour: float) -> None:
    store.write_samples(minute_of("a", hour, 10))
    store.write_samples([Sample("a", hour - 100, {"cpu.percent": 99.0})])  # older, written later
    got = store.latest("a")
    assert got is not None
    assert got.node_id == "a"
    assert got.ts == hour + 9
    assert dict(got.values) == {"cpu.percent": 9.0, "mem.used": 1018.0, "load.1": 0.5}


def test_unknown_node_has_no_latest_and_no_names(store: TelemetryStore) -> None:
    assert store.latest("nope") is None
    assert store.metric_names("nope") == []


def test_metric_names_cover_every_metric_ever_written(store: TelemetryStore, hour: float) -> None:
    store.write_samples(minute_of("a", hour, 3))
    store.write_samples([Sample("a", hour + 3, {"cpu.percent": 1.0, "gpu.0.util": 50.0})])
    assert set(store.metric_names("a")) == {*METRICS, "gpu.0.util"}


def test_raw_series_at_one_second_returns_the_samples(store: TelemetryStore, hour: float) -> None:
    store.write_samples(minute_of("a", hour, 30))
    res = store.series("a", ["cpu.percent", "mem.used"], hour, hour + 40, 1)
    assert res.tier == "raw"
    assert res.node_id == "a"
    assert res.timestamps == [hour + i for i in range(40)]
    cpu = res.metrics["cpu.percent"]
    assert cpu.avg == [float(i) for i in range(30)] + [None] * 10
    assert cpu.min == cpu.avg
    assert cpu.max == cpu.avg
    assert res.metrics["mem.used"].avg[:3] == [1000.0, 1002.0, 1004.0]


def test_buckets_are_aligned_on_step_and_cover_the_range(store: TelemetryStore, hour: float) -> None:
    store.write_samples(minute_of("a", hour, 60))
    res = store.series("a", ["cpu.percent"], hour + 7, hour + 33, 10)
    assert res.timestamps == [hour, hour + 10, hour + 20, hour + 30]
    assert res.metrics["cpu.percent"].min == [7.0, 10.0, 20.0, 30.0]
    assert res.metrics["cpu.percent"].max == [9.0, 19.0, 29.0, 32.0]


def test_one_minute_tier_gives_avg_min_max(store: TelemetryStore, hour: float) -> None:
    samples = [s for m in range(3) for s in minute_of("a", hour + 60 * m, 60, offset=100.0 * m)]
    store.write_samples(samples)
    store.flush()
    res = store.series("a", ["cpu.percent", "load.1"], hour, hour + 240, 60)
    assert res.tier == "1m"
    assert res.timestamps == [hour, hour + 60, hour + 120, hour + 180]
    cpu = res.metrics["cpu.percent"]
    assert cpu.avg == pytest.approx([29.5, 129.5, 229.5, None])
    assert cpu.min == [0.0, 100.0, 200.0, None]
    assert cpu.max == [59.0, 159.0, 259.0, None]
    assert res.metrics["load.1"].avg == pytest.approx([0.5, 0.5, 0.5, None])


def test_one_hour_tier_for_hour_steps(store: TelemetryStore, hour: float) -> None:
    store.write_samples(minute_of("a", hour + 600, 60))
    store.write_samples(minute_of("a", hour + 3600 + 600, 60, offset=1000.0))
    store.flush()
    res = store.series("a", ["cpu.percent"], hour, hour + 3 * 3600, 3600)
    assert res.tier == "1h"
    assert res.metrics["cpu.percent"].avg == pytest.approx([29.5, 1029.5, None])
    assert res.metrics["cpu.percent"].max == [59.0, 1059.0, None]


def test_unknown_node_or_metric_gives_none_lists_of_the_right_length(
    store: TelemetryStore, hour: float
) -> None:
    store.write_samples(minute_of("a", hour, 5))
    res = store.series("ghost", ["cpu.percent"], hour, hour + 5, 1)
    assert res.timestamps == [hour + i for i in range(5)]
    assert res.metrics["cpu.percent"].avg == [None] * 5
    res = store.series("a", ["no.such.metric", "cpu.percent"], hour, hour + 5, 1)
    assert res.metrics["no.such.metric"].avg == [None] * 5
    assert res.metrics["no.such.metric"].max == [None] * 5
    assert res.metrics["cpu.percent"].avg == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_metrics_missing_from_some_samples_are_none_there(store: TelemetryStore, hour: float) -> None:
    store.write_samples(
        [
            Sample("a", hour, {"cpu.percent": 1.0, "disk.read_bps": 5.0}),
            Sample("a", hour + 1, {"cpu.percent": 2.0}),
            Sample("a", hour + 2, {"cpu.percent": 3.0, "disk.read_bps": 7.0}),
        ]
    )
    res = store.series("a", ["disk.read_bps"], hour, hour + 3, 1)
    assert res.metrics["disk.read_bps"].avg == [5.0, None, 7.0]
    res = store.series("a", ["disk.read_bps"], hour, hour + 60, 60)
    assert res.metrics["disk.read_bps"].avg == pytest.approx([6.0])


@pytest.mark.parametrize(
    ("args", "param"),
    [
        ((0.0, 10.0, 0.0), "step"),
        ((0.0, 10.0, -1.0), "step"),
        ((0.0, 10.0, math.nan), "step"),
        ((10.0, 10.0, 1.0), "end"),
        ((10.0, 5.0, 1.0), "end"),
        ((0.0, 200_001.0, 1.0), "step"),
        ((math.inf, 10.0, 1.0), "start"),
    ],
)
def test_nonsense_queries_are_rejected_naming_the_parameter(
    store: TelemetryStore, args: tuple[float, float, float], param: str
) -> None:
    start, end, step = args
    with pytest.raises(ValueError, match=param):
        store.series("a", ["cpu.percent"], start, end, step)


def test_a_duplicate_sample_is_stored_once(store: TelemetryStore, hour: float) -> None:
    store.write_samples(minute_of("a", hour, 60))
    store.write_samples([Sample("a", hour + 5, {"cpu.percent": 500.0, "mem.used": 0.0, "load.1": 0.5})])
    store.write_samples(minute_of("a", hour, 60))  # a replayed batch
    store.flush()
    store.write_samples(minute_of("a", hour, 60))  # replayed after the bucket was closed
    store.flush()
    raw = store.series("a", ["cpu.percent"], hour, hour + 60, 1).metrics["cpu.percent"]
    assert raw.avg[5] == 5.0
    one = store.series("a", ["cpu.percent"], hour, hour + 60, 60).metrics["cpu.percent"]
    assert one.avg == pytest.approx([29.5])
    assert one.max == [59.0]


def test_a_bad_sample_rejects_the_whole_batch(store: TelemetryStore, hour: float) -> None:
    good = minute_of("a", hour, 3)
    bad = Sample("b", hour, {"cpu.percent": "high"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"cpu\.percent"):
        store.write_samples([*good, bad])
    assert store.latest("a") is None
    assert store.latest("b") is None
    store.write_samples(good)  # the store still works
    assert store.latest("a") is not None


def test_inventory_upsert_keeps_first_seen(store: TelemetryStore) -> None:
    store.upsert_nodes([NodeRecord("a", "host-a", 100.0, 100.0, {"os": "Linux", "cpus": 8})])
    store.upsert_nodes(
        [
            NodeRecord("a", "host-a2", 500.0, 900.0, {"os": "Linux", "cpus": 16, "tags": ["x"]}),
            NodeRecord("b", "host-b", 300.0, 350.0),
        ]
    )
    nodes = {n.node_id: n for n in store.nodes()}
    assert set(nodes) == {"a", "b"}
    a = nodes["a"]
    assert (a.hostname, a.first_seen, a.last_seen) == ("host-a2", 100.0, 900.0)
    assert dict(a.info) == {"os": "Linux", "cpus": 16, "tags": ["x"]}
    assert dict(nodes["b"].info) == {}


def test_retention_removes_old_data(store: TelemetryStore, hour: float) -> None:
    store.write_samples(minute_of("a", hour, 60))
    store.flush()
    raw_retention = next(t.retention_s for t in store.tiers if t.resolution_s == 1)
    removed = store.enforce_retention(hour + raw_retention + 3600)
    assert removed > 0
    assert store.enforce_retention(hour + raw_retention + 3600) == 0
    # The raw tier no longer holds that hour; a coarser tier still does.
    res = store.series("a", ["cpu.percent"], hour, hour + 60, 60)
    assert res.tier != "raw"
    assert res.metrics["cpu.percent"].avg == pytest.approx([29.5])


def test_readers_run_while_the_writer_writes(store: TelemetryStore, hour: float) -> None:
    errors: list[Exception] = []
    seen: list[int] = []
    done = threading.Event()

    def read() -> None:
        try:
            while not done.is_set():
                res = store.series("a", ["cpu.percent"], hour, hour + 600, 1)
                seen.append(sum(v is not None for v in res.metrics["cpu.percent"].avg))
                store.latest("a")
                store.metric_names("a")
        except Exception as exc:  # noqa: BLE001 - any failure in a reader is reported below
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        for m in range(10):
            store.write_samples(minute_of("a", hour + 60 * m, 60))
    finally:
        done.set()
        for t in readers:
            t.join(30)
    assert not errors
    assert not any(t.is_alive() for t in readers)
    assert seen
    assert store.series("a", ["cpu.percent"], hour, hour + 600, 1).metrics["cpu.percent"].avg.count(None) == 0


def test_close_is_idempotent_and_later_use_fails_clearly(store: TelemetryStore, hour: float) -> None:
    store.write_samples(minute_of("a", hour, 3))
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.write_samples(minute_of("a", hour + 3, 1))
    with pytest.raises(StoreError, match="closed"):
        store.latest("a")


@pytest.fixture
def many_nodes(store: TelemetryStore, hour: float) -> list[str]:
    ids = [f"node-{i}" for i in range(50)]
    for sec in range(120):
        store.write_samples(
            [Sample(n, hour + sec, {"cpu.percent": float(i + sec)}) for i, n in enumerate(ids)]
        )
    return ids


def test_many_nodes_keep_their_own_series(store: TelemetryStore, hour: float, many_nodes: list[str]) -> None:
    for i in (0, 17, 49):
        res = store.series(many_nodes[i], ["cpu.percent"], hour, hour + 120, 60)
        assert res.metrics["cpu.percent"].avg == pytest.approx([i + 29.5, i + 89.5])
        raw = store.series(many_nodes[i], ["cpu.percent"], hour + 100, hour + 103, 1)
        assert raw.metrics["cpu.percent"].avg == [i + 100.0, i + 101.0, i + 102.0]
