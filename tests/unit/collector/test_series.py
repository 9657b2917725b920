"""GET /api/v1/series: parameter validation and the data coming back from the store."""

from __future__ import annotations

import pytest

from cloudmon.client import ApiClient
from cloudmon.collector import CollectorThread
from cloudmon.store import TelemetryStore
from tests.unit.collector.helpers import TOKEN, FakeClock, get, post, report_json, wait_for


@pytest.fixture
def loaded(collector: CollectorThread, store: TelemetryStore, clock: FakeClock) -> float:
    """Ten reports of node-a, one per second ending at the clock's now; returns the first ts."""
    t0 = clock.now - 9
    body = b"[" + b",".join(report_json(ts=t0 + i, cpu=float(i), seq=i) for i in range(10)) + b"]"
    assert post(collector.url, body).status == 200
    wait_for(lambda: (s := store.latest("node-a")) is not None and s.ts == clock.now, what="samples stored")
    return t0


def test_series_returns_what_was_ingested(collector: CollectorThread, loaded: float) -> None:
    api = ApiClient(collector.url, TOKEN)
    result = api.series("node-a", ["cpu.percent", "load.1"], start=loaded, end=loaded + 10, step=1)
    assert result.node_id == "node-a"
    assert result.step == 1
    assert result.timestamps[0] == loaded
    assert result.metrics["cpu.percent"].avg == [float(i) for i in range(10)]
    assert result.metrics["load.1"].max == [0.5] * 10


def test_default_step_keeps_points_at_most_3600(collector: CollectorThread, loaded: float) -> None:
    api = ApiClient(collector.url, TOKEN)
    end = loaded + 10
    assert api.series("node-a", ["cpu.percent"], start=end - 3600, end=end).step == 1
    assert api.series("node-a", ["cpu.percent"], start=end - 7200, end=end).step == 60
    assert api.series("node-a", ["cpu.percent"], start=end - 10 * 86400, end=end).step == 3600


BAD_PARAMS = {
    "no node": ("metric=cpu.percent", 400, "'node'"),
    "no metric": ("node=node-a", 400, "'metric'"),
    "empty metric": ("node=node-a&metric=", 400, "'metric'"),
    "start not a number": ("node=node-a&metric=cpu.percent&start=yesterday", 400, "'start'"),
    "end not finite": ("node=node-a&metric=cpu.percent&end=nan", 400, "'end'"),
    "step zero": ("node=node-a&metric=cpu.percent&step=0", 400, "'step'"),
    "step negative": ("node=node-a&metric=cpu.percent&step=-5", 400, "'step'"),
    "start after end": ("node=node-a&metric=cpu.percent&start=200&end=100", 400, "'start'"),
    "too many points": ("node=node-a&metric=cpu.percent&start=0&end=3600&step=0.001", 400, "'step'"),
    "too many metrics": ("node=node-a&" + "&".join(f"metric=m{i}" for i in range(257)), 400, "'metric'"),
    "unknown node": ("node=ghost&metric=cpu.percent", 404, "ghost"),
}


@pytest.mark.parametrize(("query", "status", "says"), BAD_PARAMS.values(), ids=list(BAD_PARAMS))
def test_bad_parameters_are_named(
    collector: CollectorThread, loaded: float, query: str, status: int, says: str
) -> None:
    answer = get(collector.url, f"/api/v1/series?{query}")
    assert answer.status == status
    assert says in answer.body["error"]
