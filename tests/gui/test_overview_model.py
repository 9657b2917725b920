"""The overview's table model: in-place updates at 1,000+ rows, sorting, filtering."""

from __future__ import annotations

import time

import pytest
from PySide6.QtCore import QModelIndex, Qt
from PySide6.QtTest import QTest
from pytestqt.qtbot import QtBot

from cloudmon.client import NodesResponse
from cloudmon.model.cluster import NodeSummary
from cloudmon.ui.overview import NODE_ID_ROLE, Col, NodeFilterProxy, NodeTableModel, OverviewPage

pytestmark = pytest.mark.gui


def _node(i: int, cpu: float, status: str = "online", now: float | None = None) -> NodeSummary:
    now = time.time() if now is None else now
    return NodeSummary(
        node_id=f"host{i:04d}-{i:08x}",
        hostname=f"host{i:04d}",
        status=status,
        last_seen=now - 1,
        last_ts=now - 1,
        interval=1.0,
        info={"os": "Linux", "cpu_count": 4},
        values={
            "cpu.percent": cpu,
            "mem.percent": 50.0,
            "net.rx_bps": 2048.0,
            "net.tx_bps": 1.0,
            "load.1": 0.5,
        },
    )


def _snapshot(nodes: list[NodeSummary]) -> NodesResponse:
    return NodesResponse(now=time.time(), node_timeout=5.0, nodes=nodes)


def test_rows_update_in_place_at_scale(qtbot: QtBot) -> None:
    model = NodeTableModel()
    resets: list[int] = []
    inserted: list[tuple[int, int]] = []
    changed: list[tuple[int, int]] = []
    model.modelReset.connect(lambda: resets.append(1))
    model.rowsInserted.connect(lambda _p, a, b: inserted.append((a, b)))
    model.dataChanged.connect(lambda tl, br, _roles=None: changed.append((tl.row(), br.row())))

    n = 1500
    model.update_nodes(_snapshot([_node(i, float(i % 100)) for i in range(n)]))
    assert model.rowCount() == n
    assert inserted == [(0, n - 1)]

    # Second tick: only nodes 10 and 20 changed; one dataChanged spans exactly them.
    nodes = [_node(i, float(i % 100)) for i in range(n)]
    nodes = [model.nodes()[i] for i in range(n)]
    nodes[10] = _node(10, 99.0)
    nodes[20] = _node(20, 1.0)
    model.update_nodes(_snapshot(nodes))
    assert resets == []
    assert changed == [(10, 20)]
    assert inserted == [(0, n - 1)]
    assert model.data(model.index(10, Col.CPU)) == "99.0 %"
    assert model.data(model.index(10, Col.RX)) == "2.00 KiB/s"

    # A new node is appended, a vanished one removed, still no reset.
    nodes = [*nodes[1:], _node(n, 5.0)]
    model.update_nodes(_snapshot(nodes))
    assert resets == []
    assert model.rowCount() == n
    assert model.node(nodes[0].node_id) is not None
    assert model.node("host0000-00000000") is None


def test_proxy_sorts_by_value_and_keeps_unreachable_last(qtbot: QtBot) -> None:
    model = NodeTableModel()
    proxy = NodeFilterProxy()
    proxy.setSourceModel(model)
    model.update_nodes(
        _snapshot([_node(1, 10.0), _node(2, 95.0, "unreachable"), _node(3, 50.0), _node(4, 9.5)])
    )

    def order() -> list[str]:
        return [str(proxy.data(proxy.index(r, 0), NODE_ID_ROLE))[:8] for r in range(proxy.rowCount())]

    proxy.sort(Col.CPU, Qt.SortOrder.DescendingOrder)
    assert order() == ["host0003", "host0001", "host0004", "host0002"]
    proxy.sort(Col.CPU, Qt.SortOrder.AscendingOrder)
    # Numeric, not text order ("9.5 %" < "10.0 %"), and the unreachable node still last.
    assert order() == ["host0004", "host0001", "host0003", "host0002"]

    proxy.set_needle("0003")
    assert order() == ["host0003"]
    proxy.set_needle("HOST")
    assert proxy.rowCount() == 4


def test_unreachable_rows_are_greyed_and_marked(qtbot: QtBot) -> None:
    model = NodeTableModel()
    model.update_nodes(_snapshot([_node(1, 80.0), _node(2, 80.0, "unreachable")]))
    up, down = model.index(0, Col.CPU), model.index(1, Col.CPU)
    assert model.data(model.index(1, Col.STATUS)) == "unreachable"
    assert model.data(up, Qt.ItemDataRole.BackgroundRole) is not None  # coloured by load
    assert model.data(down, Qt.ItemDataRole.BackgroundRole) is None  # stale values: no colour
    assert model.data(down, Qt.ItemDataRole.ForegroundRole).color().name() == "#8a8f98"
    assert model.data(model.index(0, Col.HOST)) == "host0001  ·  00000001"
    assert model.rowCount(model.index(0, 0)) == 0
    assert model.columnCount(QModelIndex()) == len(Col)


def test_empty_state_then_table(qtbot: QtBot) -> None:
    page = OverviewPage()
    qtbot.addWidget(page)
    assert page.stack.currentWidget() is page.empty
    assert page.empty_title.text() == "No nodes yet"
    assert "Add node…" in page.empty_hint.text()
    with qtbot.waitSignal(page.first_rows_shown, timeout=1000):
        page.update_nodes(_snapshot([_node(1, 1.0)]))
    assert page.stack.currentWidget() is page.table
    page.resize(900, 400)
    page.show()
    qtbot.waitExposed(page)
    opened: list[str] = []
    page.open_requested.connect(opened.append)
    cell = page.table.visualRect(page.proxy.index(0, Col.HOST)).center()
    # QTest's double click alone skips the press the view pairs it with: press first, like a hand.
    none = Qt.KeyboardModifier.NoModifier
    QTest.mouseClick(page.table.viewport(), Qt.MouseButton.LeftButton, none, cell)
    QTest.mouseDClick(page.table.viewport(), Qt.MouseButton.LeftButton, none, cell)
    assert opened[-1] == "host0001-00000001"
    count = len(opened)
    page.table.setFocus()
    page.table.setCurrentIndex(page.proxy.index(0, Col.CPU))
    QTest.keyClick(page.table, Qt.Key.Key_Return)
    assert len(opened) > count
    assert opened[-1] == "host0001-00000001"
    page.shutdown()


def test_selection_follows_its_node_when_a_tick_reorders_rows(qtbot: QtBot) -> None:
    page = OverviewPage()
    qtbot.addWidget(page)
    page.table.sortByColumn(Col.CPU, Qt.SortOrder.DescendingOrder)
    page.update_nodes(_snapshot([_node(1, 90.0), _node(2, 50.0), _node(3, 10.0)]))
    page.table.selectRow(2)  # host0003, the idlest

    def selected() -> str:
        rows = page.table.selectionModel().selectedRows()
        assert len(rows) == 1
        return str(page.proxy.data(rows[0], NODE_ID_ROLE))

    assert selected() == "host0003-00000003"
    # host0003 gets busy: it moves to the top and stays selected.
    page.update_nodes(_snapshot([_node(1, 90.0), _node(2, 50.0), _node(3, 99.0)]))
    assert page.proxy.data(page.proxy.index(0, Col.HOST), NODE_ID_ROLE) == "host0003-00000003"
    assert selected() == "host0003-00000003"
    page.shutdown()
