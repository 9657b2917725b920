"""The node page's VMs tab, fed by a real agent whose VMs come from libvirt's test driver."""

from __future__ import annotations

from pathlib import Path

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QTableWidgetItem
from pytestqt.qtbot import QtBot

from cloudmon.collector import CollectorThread
from cloudmon.ui.guests import VM_COLUMNS, GuestTable, cell_text, group_rows
from cloudmon_agent.agent import Agent
from cloudmon_agent.config import AgentConfig
from tests.gui.conftest import AGENT_INTERVAL, TOKEN, WindowFactory

pytestmark = pytest.mark.gui

TEN_VMS = Path(__file__).resolve().parents[1] / "unit" / "agent" / "data" / "libvirt-test-10vms.xml"


def _cell(table: GuestTable, row: int, col: int) -> QTableWidgetItem:
    item = table.table.item(row, col)
    assert item is not None
    return item


def test_group_rows_splits_names_with_dots_at_the_last_one() -> None:
    latest = {
        "vm.web.1.cpu_percent": 3.0,
        "vm.web.1.vcpus": 2.0,
        "vm.db.host_cpu_percent": 7.5,
        "container.nginx.service.mem_bytes": 1024.0,
        "cpu.percent": 50.0,
    }
    assert group_rows(latest, "vm.") == {
        "web.1": {"cpu_percent": 3.0, "vcpus": 2.0},
        "db": {"host_cpu_percent": 7.5},
    }
    assert group_rows(latest, "container.") == {"nginx.service": {"mem_bytes": 1024.0}}
    assert group_rows(latest, "gpu.") == {}
    assert cell_text("pct", None) == "–"
    assert cell_text("bytes", 1536.0) == "1.50 KiB"
    assert cell_text("int", 4.0) == "4"


def test_node_page_lists_the_nodes_vms_biggest_host_cpu_first(
    qtbot: QtBot, collector: CollectorThread, tmp_path: Path, make_window: WindowFactory
) -> None:
    pytest.importorskip("libvirt")
    cfg = AgentConfig(
        collector=collector.url,
        token=TOKEN,
        interval=AGENT_INTERVAL,
        node_id="kvm-01-00000003",
        name="kvm-01",
        state_dir=tmp_path / "agent-kvm",
        libvirt_uri=f"test://{TEN_VMS}",
        budget_ms=0,  # every cycle carries the VMs
    )
    agent = Agent(cfg)
    agent.start()
    try:
        window = make_window(collector.url)
        qtbot.waitUntil(lambda: window.overview.model.rowCount() == 1, timeout=15_000)
        page = window.open_node("kvm-01-00000003")
        vms = page.vm_table
        i = page.sections.indexOf(vms)
        qtbot.waitUntil(lambda: page.sections.isTabVisible(i) and vms.table.rowCount() == 10, timeout=15_000)
        assert page.sections.tabText(i) == "VMs (10)"
        assert sorted(vms.names()) == [f"vm-{k:02d}" for k in range(1, 11)]
        # Every test-driver VM has the same share here; the order is tested with varied shares below.
        host_col = next(k for k, c in enumerate(VM_COLUMNS) if c.field == "host_cpu_percent")
        shares = [_cell(vms, r, host_col).data(Qt.ItemDataRole.UserRole) for r in range(10)]
        assert all(0.0 <= s <= 100.0 for s in shares)
        # Each row carries the agent's figures, formatted.
        vcpu_col = next(k for k, c in enumerate(VM_COLUMNS) if c.field == "vcpus")
        mem_col = next(k for k, c in enumerate(VM_COLUMNS) if c.field == "mem_max")
        assert {_cell(vms, r, vcpu_col).text() for r in range(10)} == {"2"}
        assert {_cell(vms, r, mem_col).text() for r in range(10)} == {"1.00 GiB"}
        assert {_cell(vms, r, 1).text() for r in range(10)} == {"running"}  # the State column
        # The host's charts are still the first tab; no GPU tab on a node without GPUs.
        assert page.sections.currentIndex() == 0
        assert not page.sections.isTabVisible(page.sections.indexOf(page.gpu_table))
    finally:
        agent.close()


def test_gpu_tab_shows_a_real_h100_report(qtbot: QtBot) -> None:
    """The report ``bench_gpu.py`` took on an NVIDIA H100 under load, flattened as the collector does."""
    from cloudmon.client import NodeDetail
    from cloudmon.collector.server import _node_info
    from cloudmon.model.cluster import NodeSummary
    from cloudmon.ui.nodepage import NodePage
    from cloudmon_agent.schema import decode_report, flatten

    report = decode_report((Path(__file__).parent / "data" / "h100-report.json").read_bytes())
    latest = flatten(report)
    info = _node_info(report)  # what the collector keeps beside the flattened values
    summary = NodeSummary(report.node_id, report.node.hostname, "online", report.ts, report.ts, 1.0, info, {})
    page = NodePage("http://127.0.0.1:9", None, report.node_id)  # never started: no network
    qtbot.addWidget(page)
    page._on_detail(NodeDetail(node=summary, latest=latest, metrics=sorted(latest)))
    page.redraw()
    gpus = page.gpu_table
    i = page.sections.indexOf(gpus)
    assert page.sections.isTabVisible(i)
    assert page.sections.tabText(i) == "GPUs (1)"
    cells = [_cell(gpus, 0, c).text() for c in range(gpus.table.columnCount())]
    assert cells == ["0", "NVIDIA H100 80GB HBM3", "", "99.0 %", "1.83 GiB", "79.6 GiB", "62 °C", "696 W"]
    assert not page.sections.isTabVisible(page.sections.indexOf(page.vm_table))  # that node had no VMs
    page.shutdown()


def test_table_sorts_by_host_cpu_and_a_selected_vm_stays_selected(qtbot: QtBot) -> None:
    table = GuestTable(VM_COLUMNS, "vmTable", "none", "host_cpu_percent")
    qtbot.addWidget(table)

    def rows(shares: dict[str, float]) -> dict[str, dict[str, float]]:
        return {n: {"host_cpu_percent": v, "cpu_percent": 2 * v, "vcpus": 2.0} for n, v in shares.items()}

    table.show_rows(rows({"a": 5.0, "b": 30.0, "c": 12.0}))
    assert table.names() == ["b", "c", "a"]  # biggest share of the host first
    table.table.selectRow(table.names().index("c"))
    table.show_rows(rows({"a": 50.0, "b": 1.0, "c": 12.0, "d": 3.0}))  # new order, one new VM
    assert table.names() == ["a", "c", "d", "b"]
    [selected] = {i.row() for i in table.table.selectedIndexes()}
    assert table.names()[selected] == "c"  # the selection followed its VM
    table.show_rows(rows({"a": 50.0, "d": 3.0}))  # b and c are gone
    assert table.names() == ["a", "d"]
    table.show_rows({})
    assert table._stack.currentWidget() is table.empty  # a sentence, not an empty grid
