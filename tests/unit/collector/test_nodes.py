"""GET /api/v1/nodes and /api/v1/nodes/{id}: status from the clock, restore after restart."""

from __future__ import annotations

import pytest

from cloudmon.client import ApiClient, ApiError
from cloudmon.store import TelemetryStore
from tests.unit.collector.conftest import StartCollector
from tests.unit.collector.helpers import TOKEN, FakeClock, post, report_json, wait_for


def _statuses(api: ApiClient) -> dict[str, str]:
    return {n.node_id: n.status for n in api.nodes().nodes}


def test_silent_node_turns_unreachable_and_stays_listed(
    start_collector: StartCollector, clock: FakeClock
) -> None:
    ct = start_collector(node_timeout=5.0)
    api = ApiClient(ct.url, TOKEN)
    for node_id in ("quiet", "chatty"):
        assert post(ct.url, report_json(node_id=node_id, ts=clock.now)).status == 200
    resp = api.nodes()
    assert resp.node_timeout == 5.0
    assert resp.now == clock.now
    assert _statuses(api) == {"quiet": "online", "chatty": "online"}

    clock.advance(5.0)  # exactly the timeout: still online
    assert post(ct.url, report_json(node_id="chatty", ts=clock.now)).status == 200
    assert _statuses(api) == {"quiet": "online", "chatty": "online"}

    clock.advance(0.5)
    assert _statuses(api) == {"quiet": "unreachable", "chatty": "online"}
    assert api.status()["online"] == 1
    assert api.status()["nodes"] == 2

    assert post(ct.url, report_json(node_id="quiet", ts=clock.now)).status == 200
    assert _statuses(api) == {"quiet": "online", "chatty": "online"}


def test_node_detail_has_every_latest_value(start_collector: StartCollector, clock: FakeClock) -> None:
    ct = start_collector()
    assert post(ct.url, report_json(node_id="n1", ts=clock.now, cpu=33.0)).status == 200
    detail = ApiClient(ct.url, TOKEN).node("n1")
    assert detail.node.node_id == "n1"
    assert detail.node.hostname == "host-n1"
    assert detail.node.info == {"os": "Linux", "cpu_count": 2, "agent_version": "0.1.0"}
    assert detail.latest["cpu.percent"] == 33.0
    assert detail.latest["mem.total"] == 8000.0
    assert detail.metrics == sorted(detail.latest)
    assert "cpu.core.0" in detail.metrics


def test_unknown_node_is_404(start_collector: StartCollector) -> None:
    ct = start_collector()
    with pytest.raises(ApiError) as err:
        ApiClient(ct.url, TOKEN).node("ghost")
    assert err.value.status == 404
    assert "ghost" in err.value.message


def test_restarted_collector_lists_known_nodes_and_reads_latest_from_store(
    start_collector: StartCollector, store: TelemetryStore, clock: FakeClock
) -> None:
    first = start_collector(node_timeout=5.0)
    assert post(first.url, report_json(node_id="old", ts=clock.now, cpu=77.0)).status == 200
    first.close()  # flushes the queue and the inventory to the store
    assert store.latest("old") is not None

    clock.advance(60)
    second = start_collector(node_timeout=5.0)
    api = ApiClient(second.url, TOKEN)
    (node,) = api.nodes().nodes
    assert (node.node_id, node.hostname, node.status) == ("old", "host-old", "unreachable")
    assert node.last_seen == clock.now - 60
    detail = api.node("old")
    assert detail.latest["cpu.percent"] == 77.0
    assert detail.node.values["cpu.percent"] == 77.0
    assert "mem.percent" in detail.metrics

    assert post(second.url, report_json(node_id="old", ts=clock.now, cpu=1.0)).status == 200
    wait_for(lambda: {n.node_id: n.status for n in api.nodes().nodes} == {"old": "online"})
    assert api.node("old").latest["cpu.percent"] == 1.0
