"""GET /api/v1/stream: nodes and sample events, bounded per client, ended by close()."""

from __future__ import annotations

from collections.abc import Iterator

from cloudmon.client import ApiClient, StreamEvent
from cloudmon.collector import CollectorThread
from cloudmon.collector.stream import StreamHub
from tests.unit.collector.helpers import TOKEN, FakeClock, post, report_json


def _next_sample(events: Iterator[StreamEvent]) -> StreamEvent:
    for event in events:
        if event.event == "sample":
            return event
    raise AssertionError("stream ended before a sample event")


def test_stream_sends_nodes_then_samples_of_the_watched_node(
    collector: CollectorThread, clock: FakeClock
) -> None:
    assert post(collector.url, report_json(node_id="node-b", ts=clock.now)).status == 200
    events = ApiClient(collector.url, TOKEN).stream("node-a", timeout=10)
    first = next(events)
    assert first.event == "nodes"
    assert [n["node_id"] for n in first.data["nodes"]] == ["node-b"]

    assert post(collector.url, report_json(node_id="node-b", ts=clock.now + 1, cpu=1.0)).status == 200
    assert post(collector.url, report_json(node_id="node-a", ts=clock.now + 1, cpu=42.0)).status == 200
    sample = _next_sample(events)
    assert sample.data["node_id"] == "node-a"
    assert sample.data["ts"] == clock.now + 1
    assert sample.data["values"]["cpu.percent"] == 42.0
    assert sample.data["values"]["cpu.core.0"] == 42.0

    assert post(collector.url, report_json(node_id="node-b", ts=clock.now + 2, cpu=2.0)).status == 200
    assert post(collector.url, report_json(node_id="node-a", ts=clock.now + 2, cpu=43.0)).status == 200
    assert _next_sample(events).data["values"]["cpu.percent"] == 43.0  # node-b's never came

    status = ApiClient(collector.url, TOKEN).status()
    assert status["stream_clients"] == 1

    # Closing the collector ends the stream cleanly (end of response, not a client timeout).
    collector.close()
    rest = list(events)
    assert all(e.event == "nodes" for e in rest)


def test_stream_without_node_gets_nodes_events_only(collector: CollectorThread, clock: FakeClock) -> None:
    events = ApiClient(collector.url, TOKEN).stream(timeout=10)
    assert next(events).data["nodes"] == []
    assert post(collector.url, report_json(node_id="node-a", ts=clock.now)).status == 200
    for event in events:  # a nodes event every second
        assert event.event == "nodes"
        if event.data["nodes"]:
            assert event.data["nodes"][0]["node_id"] == "node-a"
            break
    collector.close()
    assert all(e.event == "nodes" for e in events)


def test_hub_bounds_each_client_and_counts_drops() -> None:
    hub = StreamHub(max_samples=3)
    slow = hub.subscribe("n1")
    other = hub.subscribe(None)
    for i in range(5):
        hub.publish_sample("n1", f"s{i}".encode())
    hub.publish_sample("n2", b"not watched")
    hub.publish_nodes(b"nodes-1")
    hub.publish_nodes(b"nodes-2")  # replaces the unsent snapshot
    assert slow.dropped == 2 + 1
    assert other.dropped == 1
    assert hub.dropped == 4
    assert slow.take() == b"s2s3s4nodes-2"
    assert other.take() == b"nodes-2"
    assert slow.take() == b""
    assert hub.watched("n1")
    hub.unsubscribe(slow)
    hub.unsubscribe(slow)  # idempotent
    assert not hub.watched("n1")
    assert len(hub) == 1
