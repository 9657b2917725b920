"""The console against a real collector, a real embedded store and real agents."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
from PySide6.QtCore import QPointF, QTimer
from pytestqt.qtbot import QtBot

from cloudmon.collector import CollectorThread
from cloudmon.store import Sample, TelemetryStore
from cloudmon.ui.nodepage import NodePage
from cloudmon.ui.workers import Reply
from cloudmon_agent.agent import Agent
from tests.gui.conftest import NODE_IDS, TOKEN, WindowFactory

pytestmark = pytest.mark.gui


def _ui_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("cloudmon-ui")]


def _curve_len(page: NodePage, chart: str = "cpu", metric: str = "cpu.percent") -> int:
    _x, y = page.charts[chart].curves[metric].getData()
    return 0 if y is None else int(np.isfinite(y).sum())


def test_overview_shows_both_nodes(
    qtbot: QtBot, collector: CollectorThread, agents: list[Agent], make_window: WindowFactory
) -> None:
    window = make_window(collector.url)
    with qtbot.waitSignal(window.first_overview_drawn, timeout=15_000):
        pass
    qtbot.waitUntil(lambda: window.overview.model.online_count() == 2, timeout=15_000)
    ids = {n.node_id for n in window.overview.model.nodes()}
    assert ids == set(NODE_IDS)
    assert window.nodes_label.text() == "2 / 2 nodes online"
    assert window.collector_label.text().startswith(f"Embedded collector  {collector.url}")
    assert window.overview.stack.currentWidget() is window.overview.table
    node = window.overview.model.node(NODE_IDS[0])
    assert node is not None
    assert 0.0 <= node.values["cpu.percent"] <= 100.0
    assert not window.warning_label.isVisible()

    window.shutdown()
    assert _ui_threads() == []


def test_node_page_live_charts_receive_data(
    qtbot: QtBot, collector: CollectorThread, agents: list[Agent], make_window: WindowFactory
) -> None:
    window = make_window(collector.url)
    qtbot.waitUntil(lambda: window.overview.model.rowCount() == 2, timeout=15_000)
    page = window.open_node(NODE_IDS[1])
    assert window.tabs.currentWidget() is page
    qtbot.waitUntil(lambda: _curve_len(page) >= 2, timeout=15_000)
    first = _curve_len(page)
    qtbot.waitUntil(lambda: _curve_len(page) >= first + 4, timeout=15_000)
    # Every chart got the same live samples; the header knows the node.
    assert _curve_len(page, "net", "net.rx_bps") >= first
    assert _curve_len(page, "load", "load.1") >= first
    assert page.title.text() == "beta"
    assert page.status_pill.text() == "● online"
    assert page.cores, "per-core metrics were discovered from the node detail"
    assert page.fs_table.rowCount() >= 1

    # Hovering a chart shows a cursor on every chart and the values under it.
    cpu = page.charts["cpu"]
    centre = cpu.plot.getViewBox().sceneBoundingRect().center()
    cpu.widget.scene().sigMouseMoved.emit(centre)
    assert all(c.cursor.isVisible() for c in page.charts.values())
    assert cpu.hover_box.isVisible()
    assert "total" in cpu.hover_box.toPlainText()
    assert "%" in cpu.hover_box.toPlainText()
    cpu.widget.scene().sigMouseMoved.emit(QPointF(-50, -50))
    assert not cpu.cursor.isVisible()

    # Closing the tab stops the page's threads without blocking the GUI.
    window._close_page(page)
    assert window.tabs.indexOf(page) == -1
    qtbot.waitUntil(lambda: not any(NODE_IDS[1] in n for n in _ui_threads()), timeout=10_000)


def test_range_1h_reads_history_from_the_store(
    qtbot: QtBot,
    store: TelemetryStore,
    collector: CollectorThread,
    agents: list[Agent],
    make_window: WindowFactory,
) -> None:
    node_id = NODE_IDS[0]
    now = time.time()
    first_ts = now - 3500
    past = [
        Sample(node_id, first_ts + 10 * k, {"cpu.percent": 42.0, "mem.percent": 7.0, "load.1": 3.0})
        for k in range(320)  # up to ~now - 310 s: well before the agents started
    ]
    store.write_samples(past)
    store.flush()

    window = make_window(collector.url)
    qtbot.waitUntil(lambda: window.overview.model.rowCount() == 2, timeout=15_000)
    page = window.open_node(node_id)
    qtbot.waitUntil(lambda: page.ring is not None, timeout=15_000)
    page.range_buttons["1h"].click()
    assert page.range.key == "1h"
    qtbot.waitUntil(lambda: page.history is not None, timeout=15_000)

    x, y = page.charts["cpu"].curves["cpu.percent"].getData()
    assert x is not None
    assert y is not None
    finite = np.isfinite(y)
    xs, ys = x[finite], y[finite]
    # The plotted data spans the hour written into the store...
    assert xs.min() <= first_ts + 10
    assert xs.max() >= first_ts + 3190 - 10
    # ...with the values written there (buckets wholly inside the past hour average to 42).
    old = ys[xs < now - 400]
    assert len(old) >= 300
    assert np.allclose(old, 42.0)
    result = page.history
    assert result is not None
    assert result.step == 5
    assert "1 h" in page.range_info.text()

    # Back to live: history is dropped and the ring buffer drives the charts again.
    page.range_buttons["live"].click()
    assert page.history is None
    qtbot.waitUntil(lambda: _curve_len(page) > 0, timeout=5_000)


def test_add_node_dialog_shows_url_and_token(
    qtbot: QtBot, collector: CollectorThread, make_window: WindowFactory
) -> None:
    window = make_window(collector.url)
    qtbot.waitUntil(lambda: window.status is not None, timeout=10_000)
    dialog = window.show_add_node()
    qtbot.addWidget(dialog)
    assert dialog.isVisible()
    command = dialog.command_field.edit.text()
    assert command == f"cloudmon-agent --collector {collector.url} --token {TOKEN}"
    assert dialog.command_field.edit.isReadOnly()
    assert dialog.install_field.edit.text() == "python3 -m pip install ./agents"
    # The collector listens on loopback: say so, and how to accept remote agents.
    assert dialog.loopback_warning is not None
    assert "cloudmon --listen 0.0.0.0:" in dialog.loopback_warning.text()
    dialog.command_field.copy()
    from PySide6.QtGui import QGuiApplication

    assert QGuiApplication.clipboard().text() == command
    dialog.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_closed_port_shows_unreachable_and_stays_responsive(qtbot: QtBot, make_window: WindowFactory) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    window = make_window(url, embedded=False)
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(50)
    timer.timeout.connect(lambda: ticks.append(time.monotonic()))
    timer.start()
    try:
        qtbot.waitUntil(lambda: window.connected is False, timeout=10_000)
        assert window.warning_label.isVisible()
        assert window.warning_label.text().startswith("⚠ Collector unreachable — retrying")
        assert window.banner.isVisible()
        assert window.overview.empty_title.text() == "Cannot reach the collector"
        # The event loop keeps turning while the workers retry in the background.
        qtbot.waitUntil(lambda: len(ticks) >= 10, timeout=5_000)
        assert window.collector_label.text() == f"Collector  {url}"
    finally:
        timer.stop()
    window.shutdown()
    assert _ui_threads() == []


def test_degraded_collector_is_shown_as_a_warning(
    qtbot: QtBot, collector: CollectorThread, make_window: WindowFactory
) -> None:
    window = make_window(collector.url)
    qtbot.waitUntil(lambda: window.connected is True and window.status is not None, timeout=10_000)
    assert not window.warning_label.isVisible()
    # The real collector is healthy; feed the window the status a failing store produces.
    status = dict(window.status or {})
    status.update(degraded=True, last_store_error="disk I/O error", write_queue=1234)
    window._tracker.issued("status", 10**9)
    window._on_reply(Reply(10**9, "status", value=status))
    assert window.warning_label.isVisible()
    assert window.warning_label.text() == (
        "⚠ Collector degraded — disk I/O error; 1234 samples waiting to be written"
    )
    assert window.banner.property("level") == "warn"
    # The next real poll says healthy again and the warning goes away.
    window.poll_status()
    qtbot.waitUntil(lambda: not window.warning_label.isVisible(), timeout=10_000)
