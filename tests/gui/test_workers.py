"""Worker threads: newest request wins, streams reconnect when the collector appears."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PySide6.QtCore import Qt
from pytestqt.qtbot import QtBot

from cloudmon.client import ApiClient, NodesResponse
from cloudmon.collector import CollectorThread
from cloudmon.config import Config
from cloudmon.store import TelemetryStore
from cloudmon.ui.workers import Reply, RequestTracker, RequestWorker, StreamState, StreamWorker
from tests.gui.conftest import TOKEN

pytestmark = pytest.mark.gui


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def worker(collector: CollectorThread) -> Iterator[RequestWorker]:
    w = RequestWorker(collector.url, TOKEN, name="test")
    w.start()
    try:
        yield w
    finally:
        w.close()


def test_newer_request_for_the_same_key_wins(qtbot: QtBot, worker: RequestWorker) -> None:
    replies: list[Reply] = []
    worker.replied.connect(replies.append, Qt.ConnectionType.QueuedConnection)
    tracker = RequestTracker()
    gate = threading.Event()

    def blocked(c: ApiClient) -> str:
        gate.wait(10)  # keeps the worker busy so the next two requests queue up
        return "first"

    tracker.issued("a", worker.submit("a", blocked))
    stale = worker.submit("b", lambda c: "stale")
    tracker.issued("b", stale)
    newest = worker.submit("b", lambda c: c.status()["listen"])
    tracker.issued("b", newest)
    gate.set()
    qtbot.waitUntil(lambda: len(replies) == 2, timeout=10_000)
    assert [r.key for r in replies] == ["a", "b"]
    assert replies[1].request_id == newest  # the queued stale one never ran
    assert str(replies[1].value).startswith("127.0.0.1:")
    assert all(tracker.is_current(r) for r in replies)


def test_errors_come_back_as_replies(qtbot: QtBot, worker: RequestWorker) -> None:
    with qtbot.waitSignal(worker.replied, timeout=10_000) as blocker:
        worker.submit("n", lambda c: c.node("no-such-node"))
    reply = blocker.args[0]
    assert reply.value is None
    assert reply.error is not None
    assert "404" in reply.error
    assert not reply.unreachable


def test_stream_reports_unreachable_then_reconnects(
    qtbot: QtBot, store: TelemetryStore, tmp_path: Path
) -> None:
    port = _free_port()
    stream = StreamWorker(f"http://127.0.0.1:{port}", TOKEN)
    states: list[StreamState] = []
    snapshots: list[NodesResponse] = []
    stream.state.connect(states.append, Qt.ConnectionType.QueuedConnection)
    stream.nodes.connect(snapshots.append, Qt.ConnectionType.QueuedConnection)
    stream.start()
    collector: CollectorThread | None = None
    try:
        qtbot.waitUntil(lambda: any(not s.connected for s in states), timeout=10_000)
        down = next(s for s in states if not s.connected)
        assert down.retry_in > 0
        assert not down.refused
        config = Config(listen_host="127.0.0.1", listen_port=port, data_dir=str(tmp_path))
        collector = CollectorThread(config, store, TOKEN)
        collector.start()
        qtbot.waitUntil(lambda: bool(states) and states[-1].connected, timeout=15_000)
        qtbot.waitUntil(lambda: len(snapshots) >= 1, timeout=10_000)
        assert snapshots[-1].nodes == []
    finally:
        stream.close()
        if collector is not None:
            collector.close()
    assert not stream.is_alive()


def test_stream_with_a_wrong_token_is_refused(qtbot: QtBot, collector: CollectorThread) -> None:
    stream = StreamWorker(collector.url, "wrong-token")
    try:
        with qtbot.waitSignal(stream.state, timeout=10_000) as blocker:
            stream.start()
        state = blocker.args[0]
        assert not state.connected
        assert state.refused
        assert "token" in state.message
    finally:
        stream.close()
