"""The cluster model: status from silence, never removal, no rollback on late reports."""

from __future__ import annotations

import pytest

from cloudmon.model import ClusterModel, NodeState, NodeStatus


def _update(model: ClusterModel, node: str, ts: float, now: float, cpu: float) -> NodeState:
    return model.update(node, f"host-{node}", ts, 1.0, {"cpu.percent": cpu, "x.other": 1.0}, {}, now)


def test_node_becomes_unreachable_and_stays_listed() -> None:
    model = ClusterModel(node_timeout=5.0)
    _update(model, "a", 100.0, 100.0, 10.0)
    _update(model, "b", 100.0, 100.0, 20.0)
    assert [s.status for s in model.summaries(now=104.0)] == ["online", "online"]
    _update(model, "b", 106.0, 106.0, 30.0)
    statuses = {s.node_id: s.status for s in model.summaries(now=106.0)}
    assert statuses == {"a": NodeStatus.UNREACHABLE, "b": NodeStatus.ONLINE}
    summary = model.summary(model.get("a") or pytest.fail("a vanished"), now=1000.0)
    assert summary.values == {"cpu.percent": 10.0}


def test_late_report_does_not_roll_back_live_values() -> None:
    model = ClusterModel()
    _update(model, "a", 200.0, 200.0, 50.0)
    node = _update(model, "a", 150.0, 201.0, 5.0)
    assert node.latest["cpu.percent"] == 50.0
    assert node.last_seen == 201.0
    assert node.reports == 2


def test_listeners_see_every_update() -> None:
    model = ClusterModel()
    seen: list[str] = []
    model.subscribe(lambda n: seen.append(n.node_id))
    _update(model, "a", 1.0, 1.0, 1.0)
    _update(model, "b", 1.0, 1.0, 1.0)
    assert seen == ["a", "b"]


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="node_timeout"):
        ClusterModel(node_timeout=0)
