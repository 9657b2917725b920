"""Render the console with real data and save PNGs, to look at it.

    python -m tests.gui.render_screenshots [--pages] [OUTDIR]   (default: <repo>/artifacts/screens)

``--pages`` renders only the Groups and Balance pages with sample data (fast).

Starts a real collector (port 0) on a real embedded store in a temp dir,
three in-process agents (one is stopped so that it turns unreachable), a
fourth with ten VMs of libvirt's test driver when libvirt-python is installed,
and an hour of synthetic history for one node, then saves: the overview, a
node page (live and 1 h), the VM host's VMs and Containers tabs, the Add node
dialog, and a window pointed at a closed port.
Then the Groups and Balance pages (``groups*.png``, ``balance*.png``) fed with
the realistic answers of ``tests.gui.sample_data`` through their ``apply_*``
slots, plus the window's own Groups and Balance tabs on the real collector.
Runs offscreen unless ``QT_QPA_PLATFORM`` says otherwise.  Not a test.
"""

from __future__ import annotations

import importlib.util
import math
import os
import random
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QPointF
from PySide6.QtWidgets import QApplication, QWidget

from cloudmon.collector import CollectorThread
from cloudmon.config import Config
from cloudmon.store import Sample, TelemetryStore, open_store
from cloudmon.ui.theme import apply_theme
from cloudmon.ui.window import MainWindow
from cloudmon_agent.agent import Agent
from cloudmon_agent.config import AgentConfig

TOKEN = "render-token-3f9a"
TEN_VMS = Path(__file__).resolve().parents[1] / "unit" / "agent" / "data" / "libvirt-test-10vms.xml"


def wait(app: QApplication, cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        app.processEvents()
        time.sleep(0.02)


def settle(app: QApplication, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.02)


def synthetic_history(node_id: str, end: float, seconds: int, cores: int) -> list[Sample]:
    """A plausible hour: a daily-ish wave, bursts, a disk-heavy batch window."""
    rnd = random.Random(7)
    out = []
    for k in range(seconds):
        ts = end - seconds + k
        phase = k / 600.0
        cpu = 35 + 20 * math.sin(phase) + rnd.gauss(0, 4) + (30 if 1500 < k < 1800 else 0)
        cpu = min(100.0, max(0.0, cpu))
        values = {
            "cpu.percent": cpu,
            "mem.percent": 52 + 6 * math.sin(phase / 3) + rnd.gauss(0, 0.5),
            "swap.percent": 3.0 + (k / seconds) * 2,
            "disk.read_bps": max(0.0, 4e6 + 3e6 * math.sin(phase * 2) + rnd.gauss(0, 1e6)),
            "disk.write_bps": max(0.0, (4e7 if 1500 < k < 1800 else 6e6) + rnd.gauss(0, 2e6)),
            "net.rx_bps": max(0.0, 2.5e7 + 1.5e7 * math.sin(phase * 1.3) + rnd.gauss(0, 3e6)),
            "net.tx_bps": max(0.0, 8e6 + 5e6 * math.sin(phase * 0.7) + rnd.gauss(0, 1e6)),
            "load.1": max(0.0, cpu / 25 + rnd.gauss(0, 0.2)),
            "load.5": max(0.0, cpu / 27),
            "load.15": max(0.0, cpu / 30),
        }
        for c in range(cores):
            values[f"cpu.core.{c}"] = min(100.0, max(0.0, cpu + rnd.gauss(0, 12)))
        out.append(Sample(node_id, ts, values))
    return out


def grab(widget: QWidget, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not widget.grab().save(str(path), "PNG"):
        raise OSError(f"cannot save {path}")
    print(f"saved {path}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def render(outdir: Path, store: TelemetryStore, tmp: Path) -> None:
    config = Config(listen_port=0, data_dir=str(tmp), node_timeout=3.0)
    collector = CollectorThread(config, store, TOKEN)
    collector.start()
    agents: list[Agent] = []
    window: MainWindow | None = None
    app = QApplication.instance() or QApplication(sys.argv[:1])
    assert isinstance(app, QApplication)
    apply_theme(app)
    try:
        now = time.time()
        cores = os.cpu_count() or 2
        store.write_samples(synthetic_history("web-01-a1b2c3d4", now - 5, 3600, cores))
        for name, node_id in (
            ("web-01", "web-01-a1b2c3d4"),
            ("db-01", "db-01-5e6f7a8b"),
            ("batch-07", "batch-07-9c0d1e2f"),
        ):
            cfg = AgentConfig(
                collector=collector.url, token=TOKEN, name=name, node_id=node_id, state_dir=tmp / name
            )
            agent = Agent(cfg)
            agent.start()
            agents.append(agent)
        vm_host = None
        if importlib.util.find_spec("libvirt") is not None:
            # A VM host: ten domains of libvirt's test driver (in process, no daemon needed).
            vm_host = "kvm-01-3a4b5c6d"
            cfg = AgentConfig(
                collector=collector.url, token=TOKEN, name="kvm-01", node_id=vm_host, state_dir=tmp / "kvm-01",
                libvirt_uri=f"test://{TEN_VMS}", budget_ms=0,
            )  # fmt: skip
            agent = Agent(cfg)
            agent.start()
            agents.append(agent)
        window = MainWindow(collector.url, TOKEN, embedded=True)
        window.resize(1280, 800)
        window.show()
        window.start()
        w = window
        wait(app, lambda: w.overview.model.rowCount() == len(agents))
        agents[2].close()  # batch-07 goes silent: it must turn unreachable
        wait(app, lambda: w.overview.model.online_count() == len(agents) - 1, timeout=15)
        settle(app, 1.5)
        grab(window, outdir / "overview.png")

        page = window.open_node("web-01-a1b2c3d4")
        wait(app, lambda: page.ring is not None and len(page.ring) > 60, timeout=20)
        settle(app, 3.0)
        # Show the hover readout too: the cursor at 70 % of the CPU chart's width.
        vb = page.charts["cpu"].plot.getViewBox()
        rect = vb.sceneBoundingRect()
        page.charts["cpu"].widget.scene().sigMouseMoved.emit(
            QPointF(rect.left() + 0.7 * rect.width(), rect.center().y())
        )
        grab(window, outdir / "node-live.png")
        page.select_range("1h")
        wait(app, lambda: page.history is not None, timeout=20)
        settle(app, 0.5)
        grab(window, outdir / "node-1h.png")

        if vm_host is not None:
            vm_page = window.open_node(vm_host)
            wait(app, lambda: vm_page.vm_table.table.rowCount() == 10, timeout=20)
            vm_page.sections.setCurrentWidget(vm_page.vm_table)
            settle(app, 1.5)
            grab(window, outdir / "node-vms.png")
            vm_page.sections.setCurrentWidget(vm_page.container_table)
            settle(app, 0.5)
            grab(window, outdir / "node-containers.png")

        dialog = window.show_add_node()
        settle(app, 0.5)
        grab(dialog, outdir / "add-node.png")
        dialog.close()

        render_tabs(outdir, window, app)
    finally:
        if window is not None:
            window.close()
            window.shutdown()
        for agent in agents:
            agent.close()
        collector.close()

    down = MainWindow(f"http://127.0.0.1:{free_port()}", TOKEN, embedded=False)
    down.resize(1000, 560)
    down.show()
    down.start()
    try:
        wait(app, lambda: down.connected is False, timeout=10)
        settle(app, 0.3)
        grab(down, outdir / "unreachable.png")
    finally:
        down.close()
        down.shutdown()
    render_pages(outdir, app)


def render_gpu_page(outdir: Path, app: QApplication) -> None:
    """A node page's GPUs tab with the report ``bench_gpu.py`` took on an NVIDIA H100 (no worker started)."""
    from cloudmon.client import NodeDetail
    from cloudmon.collector.server import _node_info
    from cloudmon.model.cluster import NodeSummary
    from cloudmon.ui.nodepage import NodePage
    from cloudmon_agent.schema import decode_report, flatten

    report = decode_report((Path(__file__).parent / "data" / "h100-report.json").read_bytes())
    latest = flatten(report)
    info = _node_info(report)  # what the collector keeps beside the flattened values
    summary = NodeSummary(report.node_id, report.node.hostname, "online", report.ts, report.ts, 1.0, info, {})
    page = NodePage("http://127.0.0.1:9", None, report.node_id, summary)
    page.resize(1280, 520)
    page.show()
    try:
        page._on_detail(NodeDetail(node=summary, latest=latest, metrics=sorted(latest)))
        page.redraw()
        page.sections.setCurrentWidget(page.gpu_table)
        settle(app, 0.3)
        grab(page, outdir / "node-gpus.png")
    finally:
        page.shutdown()
        page.close()


def render_pages(outdir: Path, app: QApplication) -> None:
    """The Groups and Balance pages with realistic data, standalone (no worker started)."""
    from cloudmon.ui.balance import BalancePage
    from cloudmon.ui.groups import GroupsPage
    from tests.gui import sample_data

    render_gpu_page(outdir, app)

    now = time.time()
    groups = GroupsPage("http://127.0.0.1:9", None)
    groups.resize(1280, 760)
    groups.show()
    try:
        groups.apply_groups({"groups": []})
        settle(app, 0.2)
        grab(groups, outdir / "groups-empty.png")
        groups.apply_groups(sample_data.groups_answer(now))
        groups.select_group("web")
        groups.apply_activity(sample_data.activity_answer(now))
        settle(app, 0.3)
        grab(groups, outdir / "groups.png")
        groups.show_error(
            "Could not load the groups: HTTP 503: the store is unavailable (retrying)", "groups"
        )
        dialog = groups.edit_group()
        assert dialog is not None
        settle(app, 0.3)
        grab(dialog, outdir / "group-dialog.png")
        dialog.tabs.setCurrentIndex(1)
        dialog.policy_list.setCurrentRow(1)
        dialog.show_error("HTTP 422: max_size (8) must be at least min_size (10)")
        settle(app, 0.3)
        grab(dialog, outdir / "group-dialog-policies.png")
        dialog.close()
    finally:
        groups.close()
        groups.shutdown()

    balance = BalancePage("http://127.0.0.1:9", None)
    balance.resize(1280, 800)
    balance.show()
    try:
        balance.apply_balance(sample_data.balance_answer(now))
        balance.rejected_toggle.setChecked(True)
        settle(app, 0.3)
        grab(balance, outdir / "balance.png")
        balance.apply_balance(sample_data.balance_answer(now, executing=True))
        balance.rejected_toggle.setChecked(False)
        settle(app, 0.3)
        grab(balance, outdir / "balance-running.png")
        empty = sample_data.balance_answer(now)
        empty["plan"] = dict(sample_data.plan(), moves=[], rejected=[], imbalance_after=0.284)
        balance.apply_balance(empty)
        settle(app, 0.3)
        grab(balance, outdir / "balance-balanced.png")
    finally:
        balance.close()
        balance.shutdown()


def render_tabs(outdir: Path, window: MainWindow, app: QApplication) -> None:
    """The window's own Groups and Balance tabs, polling the real collector."""
    groups = window.open_groups()
    wait(app, lambda: groups._loaded or groups.error_label.isVisible(), timeout=10)
    settle(app, 0.5)
    grab(window, outdir / "window-groups.png")
    window.open_balance()
    settle(app, 1.0)
    grab(window, outdir / "window-balance.png")


def main() -> int:
    repo = Path(__file__).resolve().parents[2]
    args = [a for a in sys.argv[1:] if a != "--pages"]
    outdir = Path(args[0]) if args else repo / "artifacts" / "screens"
    if "--pages" in sys.argv[1:]:
        app = QApplication.instance() or QApplication(sys.argv[:1])
        assert isinstance(app, QApplication)
        apply_theme(app)
        render_pages(outdir, app)
        return 0
    with tempfile.TemporaryDirectory(prefix="cloudmon-render-") as d:
        tmp = Path(d)
        store = open_store(f"sqlite:///{tmp / 'telemetry.db'}")
        try:
            render(outdir, store, tmp)
        finally:
            store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
