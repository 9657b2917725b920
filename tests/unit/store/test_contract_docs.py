"""Contract of the event log and the documents of a TelemetryStore (same ``store`` fixture as
test_contract.py, so every backend runs it unchanged)::

    def append_event(self, event: Mapping[str, object]) -> str
    def events(self, start: float, end: float, limit: int = 1000) -> list[dict[str, object]]
    def put_document(self, kind: str, key: str, doc: Mapping[str, object]) -> None
    def get_document(self, kind: str, key: str) -> dict[str, object] | None
    def list_documents(self, kind: str) -> dict[str, dict[str, object]]
    def delete_document(self, kind: str, key: str) -> bool
"""

from __future__ import annotations

import pytest

from cloudmon.store import TelemetryStore


@pytest.fixture
def docs(store: TelemetryStore) -> TelemetryStore:
    return store


def test_events_come_back_in_time_order_within_the_range(docs: TelemetryStore, hour: float) -> None:
    ids = [
        docs.append_event(
            {"ts": hour + 5, "kind": "action", "action": "migrate", "reason": "hot", "result": "ok"}
        ),
        docs.append_event({"ts": hour + 1, "kind": "decision", "rule": "cpu>90", "node": "a"}),
        docs.append_event({"ts": hour + 9, "kind": "action", "action": "drain", "result": "failed"}),
    ]
    assert len(set(ids)) == 3
    got = docs.events(hour, hour + 9)
    assert [e["ts"] for e in got] == [hour + 1, hour + 5]
    assert got[1]["action"] == "migrate"
    assert got[1]["reason"] == "hot"
    assert got[1]["id"] == ids[0]
    assert [e["ts"] for e in docs.events(hour, hour + 60, limit=2)] == [hour + 5, hour + 9]  # the newest 2
    assert docs.events(hour + 100, hour + 200) == []


def test_events_with_the_same_ts_are_all_kept(docs: TelemetryStore, hour: float) -> None:
    for i in range(3):
        docs.append_event({"ts": hour, "n": i})
    assert sorted(str(e["n"]) for e in docs.events(hour, hour + 1)) == ["0", "1", "2"]


def test_range_ends_are_exact_below_a_millisecond(docs: TelemetryStore, hour: float) -> None:
    # An event 0.7 ms before "now" must be in a range that ends now (a console asking for
    # "the last hour" right after an action); one exactly at the end must not.
    docs.append_event({"ts": hour + 0.3616, "n": "inside"})
    docs.append_event({"ts": hour + 0.3622, "n": "at_end"})
    docs.append_event({"ts": hour - 0.0004, "n": "before"})
    assert [e["n"] for e in docs.events(hour, hour + 0.3622)] == ["inside"]
    assert [e["n"] for e in docs.events(hour - 0.0004, hour + 0.36221)] == ["before", "inside", "at_end"]
    assert [e["n"] for e in docs.events(hour - 0.0004, hour + 1, limit=1)] == ["at_end"]


def test_a_bad_event_is_rejected_and_stores_nothing(docs: TelemetryStore, hour: float) -> None:
    with pytest.raises(ValueError, match="ts"):
        docs.append_event({"ts": "yesterday"})
    with pytest.raises(ValueError, match="event"):
        docs.append_event({"ts": hour, "obj": object()})
    assert docs.events(0, hour + 3600) == []


def test_documents_are_stored_by_kind_and_key(docs: TelemetryStore) -> None:
    docs.put_document("rule", "cpu-hot", {"metric": "cpu.percent", "above": 90.0, "for_s": 60})
    docs.put_document("rule", "mem-full", {"metric": "mem.used_pct", "above": 95.0})
    docs.put_document("group", "web", {"nodes": ["a", "b"], "labels": {"tier": "front"}})
    assert docs.get_document("rule", "cpu-hot") == {"metric": "cpu.percent", "above": 90.0, "for_s": 60}
    assert set(docs.list_documents("rule")) == {"cpu-hot", "mem-full"}
    assert docs.list_documents("group")["web"]["labels"] == {"tier": "front"}
    docs.put_document("rule", "cpu-hot", {"metric": "cpu.percent", "above": 80.0})  # replaced
    assert docs.get_document("rule", "cpu-hot") == {"metric": "cpu.percent", "above": 80.0}
    assert docs.delete_document("rule", "cpu-hot") is True
    assert docs.delete_document("rule", "cpu-hot") is False
    assert docs.get_document("rule", "cpu-hot") is None
    assert docs.list_documents("nothing") == {}


def test_bad_documents_are_rejected_naming_the_field(docs: TelemetryStore) -> None:
    with pytest.raises(ValueError, match="kind"):
        docs.put_document("", "k", {})
    with pytest.raises(ValueError, match="key"):
        docs.put_document("rule", "", {})
    with pytest.raises(ValueError, match="doc"):
        docs.put_document("rule", "k", {"x": float("nan")})
    assert docs.list_documents("rule") == {}
