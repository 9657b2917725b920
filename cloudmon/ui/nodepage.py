"""One node: header, live and historical charts, filesystem usage, and what runs on it.

The **Host** tab holds the charts; **VMs**, **Containers** and **GPUs** tabs
(:mod:`cloudmon.ui.guests`) appear once the node reports any, with each
guest's latest figures from the same live stream.

Live mode keeps a :class:`~cloudmon.ui.ringbuffer.RingBuffer` (10 min at 1 s)
seeded from ``GET /series`` and fed by the node's ``sample`` events; a
``QTimer`` redraws the plots from it twice a second (never ``setData`` per
sample, and only while the page is visible and something changed).  The
15 min / 1 h / 24 h ranges make one ``series`` request and draw the average
with a faint min/max band.

This module imports pyqtgraph (≈ 0.7 s); the main window imports it only when
the first node page opens, so the overview appears without paying for it.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QEvent, QObject, QPointF, Qt, QTimer
from PySide6.QtGui import QColor, QFont
from PySide6.QtWidgets import (
    QAbstractItemView,
    QButtonGroup,
    QCheckBox,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from cloudmon.client import ApiClient, NodeDetail
from cloudmon.model.cluster import NodeStatus, NodeSummary
from cloudmon.store.base import SeriesResult
from cloudmon.ui import format as fmt
from cloudmon.ui.guests import CONTAINER_COLUMNS, GPU_COLUMNS, VM_COLUMNS, GuestTable, group_rows, guest_words
from cloudmon.ui.ringbuffer import FloatArray, RingBuffer, compact
from cloudmon.ui.workers import LiveSample, Reply, RequestTracker, RequestWorker, StreamState, StreamWorker

logger = logging.getLogger(__name__)

pg.setConfigOptions(antialias=False, background="w", foreground="#3c4048")

#: Live window: 10 minutes of 1 s samples.
LIVE_SECONDS = 600
REDRAW_MS = 500
#: Reports further apart than this are an outage: the lines break there.
MAX_GAP_S = 5.0


@dataclass(frozen=True, slots=True)
class Range:
    """A selectable time range and the series step it is read at."""

    key: str
    label: str
    seconds: int
    step: int


RANGES: tuple[Range, ...] = (
    Range("live", "Live", LIVE_SECONDS, 1),
    Range("15m", "15 min", 15 * 60, 1),
    Range("1h", "1 h", 3600, 5),
    Range("24h", "24 h", 24 * 3600, 60),
)
RANGE_BY_KEY = {r.key: r for r in RANGES}


@dataclass(frozen=True, slots=True)
class Line:
    metric: str
    label: str
    colour: str
    width: float = 1.6


@dataclass(frozen=True, slots=True)
class ChartSpec:
    key: str
    title: str
    units: str
    lines: tuple[Line, ...]
    percent: bool = False


CHARTS: tuple[ChartSpec, ...] = (
    ChartSpec("cpu", "CPU", "%", (Line("cpu.percent", "total", "#1f5fbf", 2.2),), percent=True),
    ChartSpec(
        "mem",
        "Memory",
        "%",
        (Line("mem.percent", "memory", "#7b3fb5", 2.0), Line("swap.percent", "swap", "#d9822b")),
        percent=True,
    ),
    ChartSpec(
        "disk",
        "Disk I/O",
        "B/s",
        (Line("disk.read_bps", "read", "#2a9d8f"), Line("disk.write_bps", "write", "#e76f51")),
    ),
    ChartSpec(
        "net", "Network", "B/s", (Line("net.rx_bps", "rx", "#1f77b4"), Line("net.tx_bps", "tx", "#d6336c"))
    ),
    ChartSpec(
        "load",
        "Load average",
        "",
        (
            Line("load.1", "1 min", "#264653", 1.8),
            Line("load.5", "5 min", "#2a9d8f"),
            Line("load.15", "15 min", "#e9c46a"),
        ),
    ),
)
CHART_METRICS: tuple[str, ...] = tuple(line.metric for spec in CHARTS for line in spec.lines)
CORE_COLOUR = QColor(31, 95, 191, 70)
CORE_BAND = QColor(31, 95, 191, 38)
_CORE_RE = re.compile(r"^cpu\.core\.(\d+)$")
_FS_RE = re.compile(r"^fs\.(.+)\.percent$")


def core_metrics(metric_names: Sequence[str]) -> list[str]:
    """``cpu.core.N`` names in numeric order."""
    found = [(int(m.group(1)), name) for name in metric_names if (m := _CORE_RE.match(name))]
    return [name for _, name in sorted(found)]


def _nan_array(values: Sequence[float | None]) -> FloatArray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _title(spec: ChartSpec, visible: Sequence[Line]) -> str:
    keys = "  ".join(f"<span style='color:{line.colour}'>━ {line.label}</span>" for line in visible)
    unit = f" <span style='color:#80858f'>({spec.units})</span>" if spec.units == "%" else ""
    return f"<b>{spec.title}</b>{unit}&nbsp;&nbsp;&nbsp;{keys}"


def _band(plot: Any, brush: QColor) -> tuple[Any, Any, Any]:
    """Two invisible edge curves and the fill between them.

    The edges are PlotCurveItems with a transparent pen: a PlotDataItem with
    ``pen=None`` keeps no path, and FillBetweenItem would have nothing to fill.
    """
    clear = pg.mkPen(QColor(0, 0, 0, 0))
    lo, hi = pg.PlotCurveItem(pen=clear), pg.PlotCurveItem(pen=clear)
    plot.addItem(lo)
    plot.addItem(hi)
    fill = pg.FillBetweenItem(lo, hi, brush=brush)
    plot.addItem(fill)
    return lo, hi, fill


class Chart:
    """One PlotWidget with its curves, min/max bands and optional per-core lines."""

    def __init__(self, spec: ChartSpec, parent: QWidget) -> None:
        self.spec = spec
        self.widget = pg.PlotWidget(
            parent=parent, axisItems={"bottom": pg.DateAxisItem(orientation="bottom")}
        )
        self.widget.setMinimumHeight(170)
        plot = self.widget.getPlotItem()
        self.plot = plot
        plot.setTitle(_title(spec, spec.lines), size="9pt", justify="left")
        plot.showGrid(x=True, y=True, alpha=0.15)
        plot.setDownsampling(auto=True, mode="peak")
        plot.setClipToView(True)
        plot.hideButtons()
        plot.setMenuEnabled(False)
        plot.setMouseEnabled(x=False, y=False)
        left = plot.getAxis("left")
        left.setWidth(58)
        if spec.percent:
            # Room for the 0 and 100 labels: with the grid on, pyqtgraph drops
            # tick labels that would stick out of the view box.
            plot.setYRange(0, 100, padding=0.06)
            plot.enableAutoRange(axis="y", enable=False)
            left.setTicks([[(v, str(v)) for v in (0, 25, 50, 75, 100)], []])
        else:
            plot.enableAutoRange(axis="y", enable=True)
            plot.setAutoVisible(y=True)
            plot.setLimits(yMin=0)
            if spec.units:
                left.setLabel(units=spec.units)
        self.bands: dict[str, tuple[pg.PlotCurveItem, pg.PlotCurveItem, pg.FillBetweenItem]] = {}
        self.curves: dict[str, pg.PlotDataItem] = {}
        for line in spec.lines:
            band_colour = QColor(line.colour)
            band_colour.setAlpha(50)
            lo, hi, fill = _band(plot, band_colour)
            fill.setVisible(False)
            self.bands[line.metric] = (lo, hi, fill)
        # Curves go on top of the bands.
        for line in spec.lines:
            pen = pg.mkPen(QColor(line.colour), width=line.width)
            self.curves[line.metric] = plot.plot(pen=pen, connect="finite", name=line.label)
        self.core_curves: list[pg.PlotDataItem] = []
        self.core_band: tuple[pg.PlotCurveItem, pg.PlotCurveItem, pg.FillBetweenItem] | None = None
        # Hover readout: a cursor line (shown on every linked chart) and the values under it.
        self.cursor = pg.InfiniteLine(angle=90, movable=False, pen=pg.mkPen(QColor(60, 64, 72, 110), width=1))
        self.cursor.setVisible(False)
        plot.addItem(self.cursor, ignoreBounds=True)
        self.hover_box = pg.TextItem(
            anchor=(0, 0), fill=pg.mkBrush(255, 255, 255, 225), border=pg.mkPen("#d0d4da")
        )
        self.hover_box.setZValue(100)
        self.hover_box.setVisible(False)
        plot.addItem(self.hover_box, ignoreBounds=True)

    def format_value(self, value: float) -> str:
        """A value in this chart's unit (the axis uses SI prefixes, so does this)."""
        if not np.isfinite(value):
            return "–"
        if self.spec.percent:
            return f"{value:.1f} %"
        if self.spec.units:
            return str(pg.siFormat(value, precision=3, suffix=self.spec.units))
        return f"{value:.2f}"

    def values_at(self, x: float) -> tuple[float, list[tuple[Line, float]]] | None:
        """The drawn sample nearest to ``x``: its time and each line's value."""
        xs, _ = self.curves[self.spec.lines[0].metric].getData()
        if xs is None or not len(xs):
            return None
        i = int(np.clip(np.searchsorted(xs, x), 1, len(xs) - 1))
        i = i - 1 if abs(xs[i - 1] - x) <= abs(xs[i] - x) else i
        out = []
        for line in self.spec.lines:
            _, ys = self.curves[line.metric].getData()
            out.append((line, float(ys[i]) if ys is not None and i < len(ys) else float("nan")))
        return float(xs[i]), out

    def add_cores(self, count: int) -> None:
        """Per-core lines (thin, faint) and a min–max band across cores; both start hidden."""
        pen = pg.mkPen(CORE_COLOUR, width=1)
        for _ in range(count):
            curve = self.plot.plot(pen=pen, connect="finite")
            curve.setZValue(-5)
            self.core_curves.append(curve)
        lo, hi, fill = _band(self.plot, CORE_BAND)
        fill.setZValue(-10)
        self.core_band = (lo, hi, fill)

    def show_cores(self, mode: str) -> None:
        """``mode`` is ``"lines"``, ``"band"`` or ``"off"``."""
        for curve in self.core_curves:
            curve.setVisible(mode == "lines")
        if self.core_band is not None:
            self.core_band[2].setVisible(mode == "band")

    def set_band(
        self, metric: str, x: FloatArray | None, lo: FloatArray | None, hi: FloatArray | None
    ) -> None:
        lo_item, hi_item, fill = self.bands[metric]
        if x is None or lo is None or hi is None or not len(x):
            fill.setVisible(False)
            lo_item.setData([], [])
            hi_item.setData([], [])
            return
        # FillBetweenItem cannot follow NaN gaps (its path would jump to 0):
        # drop those points so the band simply bridges a gap.
        ok = np.isfinite(lo) & np.isfinite(hi)
        lo_item.setData(x[ok], lo[ok])
        hi_item.setData(x[ok], hi[ok])
        fill.setVisible(bool(ok.any()))

    def set_core_band(self, x: FloatArray, lo: FloatArray, hi: FloatArray) -> None:
        if self.core_band is None:
            return
        ok = np.isfinite(lo) & np.isfinite(hi)
        self.core_band[0].setData(x[ok], lo[ok])
        self.core_band[1].setData(x[ok], hi[ok])


class NodePage(QWidget):
    """The detail page of one node; owns its request and stream workers."""

    def __init__(
        self,
        url: str,
        token: str | None,
        node_id: str,
        summary: NodeSummary | None = None,
        clock: Callable[[], float] = time.time,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.setObjectName("nodePage")
        self.node_id = node_id
        self._clock = clock
        self._requests = RequestWorker(url, token, name=f"node-{node_id}")
        self._requests.replied.connect(self._on_reply, Qt.ConnectionType.QueuedConnection)
        self._tracker = RequestTracker()
        self._stream = StreamWorker(url, token, node_id, nodes=False)
        self._stream.sample.connect(self._on_sample, Qt.ConnectionType.QueuedConnection)
        self._stream.state.connect(self._on_stream_state, Qt.ConnectionType.QueuedConnection)
        self._started = False
        self._closed = False

        self.range = RANGE_BY_KEY["live"]
        self.cores: list[str] = []
        self.ring: RingBuffer | None = None
        self._pending: list[LiveSample] = []  # samples that arrive before the detail
        self._drawn_version = -1
        self._latest: dict[str, float] = {}
        self._latest_ts = 0.0
        self._fs_drawn: dict[str, float] = {}
        self.history: SeriesResult | None = None
        self.summary = summary

        self._build_header()
        self._build_toolbar()
        self.charts = {spec.key: Chart(spec, self) for spec in CHARTS}
        self._build_fs_table()

        grid = QGridLayout()
        grid.setHorizontalSpacing(10)
        grid.setVerticalSpacing(10)
        grid.addWidget(self.charts["cpu"].widget, 0, 0)
        grid.addWidget(self.charts["mem"].widget, 0, 1)
        grid.addWidget(self.charts["disk"].widget, 1, 0)
        grid.addWidget(self.charts["net"].widget, 1, 1)
        grid.addWidget(self.charts["load"].widget, 2, 0)
        grid.addWidget(self.fs_box, 2, 1)
        for row in range(3):
            grid.setRowStretch(row, 1)
        cpu_view = self.charts["cpu"].plot
        for chart in self.charts.values():
            if chart.plot is not cpu_view:
                chart.plot.setXLink(cpu_view)
            chart.widget.scene().sigMouseMoved.connect(lambda pos, c=chart: self._hover(c, pos))
            chart.widget.installEventFilter(self)

        host = QWidget(self)
        host_layout = QVBoxLayout(host)
        host_layout.setContentsMargins(0, 6, 0, 0)
        host_layout.setSpacing(8)
        host_layout.addLayout(self.toolbar)
        host_layout.addLayout(grid, 1)
        self.sections = QTabWidget(self)
        self.sections.setObjectName("nodeSections")
        self.sections.setDocumentMode(True)
        self.sections.addTab(host, "Host")
        self.vm_table = GuestTable(
            VM_COLUMNS,
            "vmTable",
            "No VMs in the node's last report. Its agent reads them from libvirt (libvirt_uri); "
            "if VMs run there, the agent's log says why it cannot reach libvirt.",
            "host_cpu_percent",
            self,
        )
        self.container_table = GuestTable(
            CONTAINER_COLUMNS,
            "containerTable",
            "No containers or units in the node's last report.",
            "cpu_percent",
            self,
        )
        self.gpu_table = GuestTable(
            GPU_COLUMNS, "gpuTable", "No GPUs in the node's last report.", "util_percent", self
        )
        #: (prefix, table, tab label) of each guest tab; a tab shows once it has had rows.
        self._guest_tabs: tuple[tuple[str, GuestTable, str], ...] = (
            ("vm.", self.vm_table, "VMs"),
            ("container.", self.container_table, "Containers"),
            ("gpu.", self.gpu_table, "GPUs"),
        )
        for _prefix, table, label in self._guest_tabs:
            i = self.sections.addTab(table, label)
            self.sections.setTabVisible(i, False)
        self._guests_from: dict[str, float] | None = None

        layout = QVBoxLayout(self)
        layout.setContentsMargins(12, 10, 12, 8)
        layout.setSpacing(8)
        layout.addLayout(self.header)
        layout.addWidget(self.sections, 1)

        self._timer = QTimer(self)
        self._timer.setInterval(REDRAW_MS)
        self._timer.timeout.connect(self.redraw)
        if summary is not None:
            self.update_summary(summary)

    # --- construction ----------------------------------------------------------

    def _build_header(self) -> None:
        self.title = QLabel(self.node_id, self)
        self.title.setObjectName("nodeTitle")
        f = QFont(self.title.font())
        f.setPointSizeF(f.pointSizeF() * 1.5)
        f.setBold(True)
        self.title.setFont(f)
        self.status_pill = QLabel("…", self)
        self.status_pill.setObjectName("statusPill")
        self.facts = QLabel(self)
        self.facts.setObjectName("nodeFacts")
        self.facts.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.readout = QLabel(self)
        self.readout.setObjectName("nodeReadout")
        left = QVBoxLayout()
        left.setSpacing(2)
        top = QHBoxLayout()
        top.addWidget(self.title)
        top.addSpacing(8)
        top.addWidget(self.status_pill)
        top.addStretch(1)
        left.addLayout(top)
        left.addWidget(self.facts)
        self.header = QHBoxLayout()
        self.header.addLayout(left, 1)
        self.header.addWidget(self.readout, 0, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignBottom)

    def _build_toolbar(self) -> None:
        self.range_buttons: dict[str, QToolButton] = {}
        self.range_group = QButtonGroup(self)
        self.range_group.setExclusive(True)
        self.toolbar = QHBoxLayout()
        self.toolbar.setSpacing(0)
        for i, r in enumerate(RANGES):
            b = QToolButton(self)
            b.setText(r.label)
            b.setCheckable(True)
            b.setObjectName("rangeButton")
            b.setProperty("segment", "first" if i == 0 else "last" if i == len(RANGES) - 1 else "mid")
            b.setToolTip(
                "Last 10 minutes, updated every second"
                if r.key == "live"
                else f"Last {r.label} from the store, {r.step} s steps"
            )
            self.range_group.addButton(b)
            self.range_buttons[r.key] = b
            self.toolbar.addWidget(b)
            b.clicked.connect(lambda _checked=False, key=r.key: self.select_range(key))
        self.range_buttons["live"].setChecked(True)
        self.toolbar.addSpacing(16)
        self.per_core = QCheckBox("Per-core lines", self)
        self.per_core.setToolTip("Show each core as a thin line; off shows the min–max band across cores")
        self.per_core.toggled.connect(self._apply_core_mode)
        self.toolbar.addWidget(self.per_core)
        self.toolbar.addStretch(1)
        self.range_info = QLabel(self)
        self.range_info.setObjectName("rangeInfo")
        self.toolbar.addWidget(self.range_info)

    def _build_fs_table(self) -> None:
        self.fs_box = QWidget(self)
        self.fs_box.setObjectName("fsBox")
        title = QLabel("<b>Filesystems</b>", self.fs_box)
        self.fs_table = QTableWidget(0, 4, self.fs_box)
        self.fs_table.setHorizontalHeaderLabels(["Mount", "Used", "Size", "Use"])
        self.fs_table.verticalHeader().setVisible(False)
        self.fs_table.setShowGrid(False)
        self.fs_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.fs_table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.fs_table.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        h = self.fs_table.horizontalHeader()
        h.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        h.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        h.setSectionResizeMode(2, QHeaderView.ResizeMode.ResizeToContents)
        h.setSectionResizeMode(3, QHeaderView.ResizeMode.Fixed)
        self.fs_table.setColumnWidth(3, 130)
        box = QVBoxLayout(self.fs_box)
        box.setContentsMargins(6, 4, 0, 0)
        box.addWidget(title)
        box.addWidget(self.fs_table, 1)

    # --- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start the workers and ask for the node's detail (call once)."""
        if self._started:
            return
        self._started = True
        self._requests.start()
        self._stream.start()
        nid = self.node_id
        self._issue("detail", lambda c: c.node(nid))
        self._timer.start()

    def shutdown(self) -> None:
        """Stop the timer and both workers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._timer.stop()
        self._stream.stop()
        self._requests.close()
        self._stream.close()

    def stop_async(self) -> None:
        """Ask the workers to stop without joining (the window joins later)."""
        self._timer.stop()
        self._stream.stop()
        self._requests.stop()

    def threads_alive(self) -> bool:
        """Whether either worker thread still runs."""
        return self._stream.is_alive() or self._requests.is_alive()

    def _issue(self, key: str, fn: Callable[[ApiClient], Any]) -> None:
        self._tracker.issued(key, self._requests.submit(key, fn))

    # --- data in ---------------------------------------------------------------

    def update_summary(self, summary: NodeSummary) -> None:
        """Header status from the overview's ``nodes`` events."""
        self.summary = summary
        self._guests_from = None  # VM states and GPU names come with the summary
        self.title.setText(summary.hostname)
        online = summary.status == NodeStatus.ONLINE
        self.status_pill.setText("● online" if online else "● unreachable")
        self.status_pill.setProperty("state", "online" if online else "down")
        self.status_pill.style().unpolish(self.status_pill)
        self.status_pill.style().polish(self.status_pill)
        info = summary.info
        facts = [f"id {summary.node_id}"]
        if info.get("os"):
            facts.append(str(info["os"]))
        if info.get("cpu_count"):
            n = info["cpu_count"]
            facts.append(f"{n} core{'s' if n != 1 else ''}")
        if info.get("agent_version"):
            facts.append(f"agent {info['agent_version']}")
        if not online:
            facts.append(f"last report {fmt.ago(self._clock() - summary.last_seen)}")
        self.facts.setText("   ·   ".join(facts))

    def _on_reply(self, reply: Reply) -> None:
        if self._closed or not self._tracker.is_current(reply):
            return
        if reply.error:
            self._show_error(reply)
            return
        if reply.key == "detail":
            self._on_detail(reply.value)
        elif reply.key == "seed":
            self._on_seed(reply.value)
        elif reply.key == "history":
            self._on_history(reply.value)

    def _show_error(self, reply: Reply) -> None:
        if reply.key == "detail":
            # Keep trying: the collector may be restarting or the node not yet known.
            QTimer.singleShot(2000, self, self._retry_detail)
        self.range_info.setText(f"<span style='color:#c0392b'>{reply.error}</span>")

    def _retry_detail(self) -> None:
        if not self._closed and self.ring is None:
            nid = self.node_id
            self._issue("detail", lambda c: c.node(nid))

    def _on_detail(self, detail: NodeDetail) -> None:
        self.update_summary(detail.node)
        self.cores = core_metrics(detail.metrics)
        self.charts["cpu"].add_cores(len(self.cores))
        self.per_core.setChecked(0 < len(self.cores) <= 16)
        self._apply_core_mode()
        self.ring = RingBuffer(LIVE_SECONDS, (*CHART_METRICS, *self.cores))
        self._latest = dict(detail.latest)
        self._update_fs(force=True)
        for s in self._pending:
            self._on_sample(s)
        self._pending.clear()
        self._request_seed()
        self.redraw()

    def _request_seed(self) -> None:
        end = self._clock()
        metrics = [*CHART_METRICS, *self.cores]
        nid = self.node_id
        self._issue(
            "seed",
            lambda c: c.series(nid, metrics, start=end - LIVE_SECONDS, end=end + 1, step=1),
        )

    def _on_seed(self, result: SeriesResult) -> None:
        if self.ring is None:
            return
        ring = RingBuffer(LIVE_SECONDS, self.ring.columns)
        names = [n for n in ring.columns if n in result.metrics]
        x, cols = compact(
            np.asarray(result.timestamps, dtype=np.float64),
            [_nan_array(result.metrics[n].avg) for n in names],
            max_gap=MAX_GAP_S,
        )
        for k in range(len(x)):
            ring.append(float(x[k]), {n: float(c[k]) for n, c in zip(names, cols, strict=True)})
        # Samples that streamed in while the seed was in flight go on top.
        last = ring.last_ts if ring.last_ts is not None else -math.inf
        for ts, values in self.ring.rows_after(last):
            ring.append(ts, values)
        self.ring = ring
        self._drawn_version = -1

    def _on_sample(self, sample: LiveSample) -> None:
        if self._closed:
            return
        if self.ring is None:
            self._pending.append(sample)
            del self._pending[:-LIVE_SECONDS]
            return
        last = self.ring.last_ts
        if last is not None and sample.ts <= last:
            return  # replayed or duplicate report: live buffers only move forward
        if last is not None and sample.ts - last > MAX_GAP_S:
            self.ring.append(last + 1e-3, {})  # an all-NaN row: the lines break at the outage
        self.ring.append(sample.ts, sample.values)
        self._latest = sample.values
        self._latest_ts = sample.ts

    def _on_stream_state(self, state: StreamState) -> None:
        if self._closed:
            return
        if not state.connected and self.range.key == "live":
            self.range_info.setText(
                f"<span style='color:#c0392b'>Live stream lost — retrying ({state.message})</span>"
            )
        elif state.connected and self.range.key == "live":
            self.range_info.setText("Live · last 10 min · 1 s")
            if self.ring is None and self.summary is not None:
                self._retry_detail()

    # --- range selection ---------------------------------------------------------

    def select_range(self, key: str) -> None:
        """Switch to ``"live"``, ``"15m"``, ``"1h"`` or ``"24h"``."""
        r = RANGE_BY_KEY[key]
        self.range = r
        self._hide_cursor()
        self.range_buttons[key].setChecked(True)
        self.history = None
        live = key == "live"
        for chart in self.charts.values():
            chart.plot.setMouseEnabled(x=not live, y=False)
            for metric in chart.bands:
                chart.set_band(metric, None, None, None)
        if live:
            self._tracker.forget("history")
            self.range_info.setText("Live · last 10 min · 1 s")
            self._drawn_version = -1
            self.redraw()
            return
        self.range_info.setText(f"Loading {r.label}…")
        end = self._clock()
        metrics = [*CHART_METRICS, *self.cores]
        nid = self.node_id
        self._issue(
            "history",
            lambda c: c.series(nid, metrics, start=end - r.seconds, end=end, step=r.step),
        )

    def _on_history(self, result: SeriesResult) -> None:
        if self.range.key == "live":
            return
        self.history = result
        # Draw each bucket at its middle; compact all columns together so they stay aligned.
        x0 = np.asarray(result.timestamps, dtype=np.float64) + result.step / 2
        names = [m for m in (*CHART_METRICS, *self.cores) if m in result.metrics]
        columns: list[FloatArray] = []
        for m in names:
            s = result.metrics[m]
            columns += [_nan_array(s.avg), _nan_array(s.min), _nan_array(s.max)]
        x, cols = compact(x0, columns, max_gap=max(MAX_GAP_S, 3 * result.step))
        series = {m: (cols[3 * i], cols[3 * i + 1], cols[3 * i + 2]) for i, m in enumerate(names)}
        for chart in self.charts.values():
            for metric, curve in chart.curves.items():
                if metric not in series:
                    curve.setData([], [])
                    chart.set_band(metric, None, None, None)
                    continue
                avg, lo, hi = series[metric]
                curve.setData(x, avg)
                chart.set_band(metric, x, lo, hi)
        self._draw_cores(x, [series[c][0] if c in series else np.array([]) for c in self.cores])
        cpu = result.metrics.get("cpu.percent")
        n = sum(v is not None for v in cpu.avg) if cpu is not None else 0
        self.charts["cpu"].plot.setXRange(result.start, result.end, padding=0)
        self.range_info.setText(
            f"{self.range.label} · {fmt.duration(result.step) if result.step >= 60 else f'{result.step:g} s'} steps"
            f" · {result.tier} tier · {n} points"
        )

    def _draw_cores(self, x: FloatArray, columns: Sequence[Sequence[float | None] | FloatArray]) -> None:
        chart = self.charts["cpu"]
        if not chart.core_curves:
            return
        arrays = [c if isinstance(c, np.ndarray) else _nan_array(c) for c in columns]
        for curve, y in zip(chart.core_curves, arrays, strict=False):
            if len(y) == len(x):
                curve.setData(x, y)
            else:
                curve.setData([], [])
        full = [a for a in arrays if len(a) == len(x)]
        if full:
            stack = np.vstack(full)
            # fmin/fmax ignore NaN without the all-NaN warnings of nanmin.
            chart.set_core_band(x, np.fmin.reduce(stack, axis=0), np.fmax.reduce(stack, axis=0))

    def _apply_core_mode(self) -> None:
        self.charts["cpu"].show_cores("lines" if self.per_core.isChecked() else "band")

    # --- hover readout ---------------------------------------------------------------

    def _hover(self, chart: Chart, pos: QPointF) -> None:
        vb = chart.plot.getViewBox()
        if not vb.sceneBoundingRect().contains(pos):
            self._hide_cursor()
            return
        found = chart.values_at(vb.mapSceneToView(pos).x())
        if found is None:
            self._hide_cursor()
            return
        ts, values = found
        for c in self.charts.values():
            c.cursor.setPos(ts)
            c.cursor.setVisible(True)
            c.hover_box.setVisible(c is chart)
        stamp = time.strftime("%H:%M:%S" if self.range.seconds <= 3600 else "%a %H:%M", time.localtime(ts))
        rows = "".join(
            f"<br><span style='color:{line.colour}'>━</span> {line.label} <b>{chart.format_value(v)}</b>"
            for line, v in values
        )
        chart.hover_box.setHtml(f"<span style='color:#3c4048; font-size:8pt'>{stamp}{rows}</span>")
        (x0, x1), (_, y1) = vb.viewRange()
        # Keep the box on the side away from the cursor so it never hides the point.
        left = ts > (x0 + x1) / 2
        chart.hover_box.setAnchor((0, 0) if left else (1, 0))
        chart.hover_box.setPos(x0 + (x1 - x0) * (0.01 if left else 0.99), y1)

    def _hide_cursor(self) -> None:
        for c in self.charts.values():
            c.cursor.setVisible(False)
            c.hover_box.setVisible(False)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if event.type() == QEvent.Type.Leave:
            self._hide_cursor()
        return super().eventFilter(watched, event)

    # --- drawing -------------------------------------------------------------------

    def redraw(self) -> None:
        """Timer tick: redraw the live charts from the ring buffer if it changed."""
        self._update_readout()
        self._update_fs()
        self._update_guests()
        ring = self.ring
        if self.range.key != "live" or ring is None or ring.version == self._drawn_version:
            return
        if not self.isVisible() and self._drawn_version >= 0:
            return  # hidden tab: draw when it is shown again
        self._drawn_version = ring.version
        x = ring.timestamps().copy()
        for chart in self.charts.values():
            for metric, curve in chart.curves.items():
                curve.setData(x, ring.column(metric).copy())
        self._draw_cores(x, [ring.column(c).copy() for c in self.cores])
        if len(x):
            last = float(x[-1])
            first = max(float(x[0]), last - LIVE_SECONDS)
            self.charts["cpu"].plot.setXRange(first, last if last > first else first + 1, padding=0.01)
        if self.range_info.text() == "" or self.range_info.text().startswith("Loading"):
            self.range_info.setText("Live · last 10 min · 1 s")

    def _update_guests(self) -> None:
        latest = self._latest
        if latest is self._guests_from:
            return
        self._guests_from = latest
        info = self.summary.info if self.summary is not None else {}
        for prefix, table, label in self._guest_tabs:
            rows = group_rows(latest, prefix)
            i = self.sections.indexOf(table)
            if rows or self.sections.isTabVisible(i):
                table.show_rows(rows, guest_words(prefix, rows, info))
                self.sections.setTabVisible(i, True)
                self.sections.setTabText(i, f"{label} ({len(rows)})")

    def _update_readout(self) -> None:
        v = self._latest
        if not v:
            return
        parts = [
            f"CPU <b>{fmt.percent(v.get('cpu.percent'))}</b>",
            f"Mem <b>{fmt.percent(v.get('mem.percent'))}</b>",
            f"Load <b>{fmt.load(v.get('load.1'))}</b>",
            f"Net ↓ <b>{fmt.human_rate(v.get('net.rx_bps'))}</b> ↑ <b>{fmt.human_rate(v.get('net.tx_bps'))}</b>",
        ]
        self.readout.setText("&nbsp;&nbsp;&nbsp;".join(parts))

    def _update_fs(self, force: bool = False) -> None:
        fs = {m.group(1): value for name, value in self._latest.items() if (m := _FS_RE.match(name))}
        if not force and fs == self._fs_drawn:
            return
        self._fs_drawn = fs
        mounts = sorted(fs)
        self.fs_table.setRowCount(len(mounts))
        for row, mount in enumerate(mounts):
            used = self._latest.get(f"fs.{mount}.used")
            total = self._latest.get(f"fs.{mount}.total")
            cells = (mount, fmt.human_bytes(used), fmt.human_bytes(total))
            for col, text in enumerate(cells):
                item = self.fs_table.item(row, col)
                if item is None:
                    item = QTableWidgetItem()
                    self.fs_table.setItem(row, col, item)
                item.setText(text)
                if col:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            bar = self.fs_table.cellWidget(row, 3)
            if not isinstance(bar, QProgressBar):
                bar = QProgressBar(self.fs_table)
                bar.setRange(0, 1000)
                bar.setTextVisible(True)
                self.fs_table.setCellWidget(row, 3, bar)
            pct = fs[mount]
            bar.setValue(round(pct * 10))
            bar.setFormat(f"{pct:.0f} %")
            r, g, b = fmt.load_colour(pct)
            bar.setStyleSheet(
                "QProgressBar { border: 1px solid #c9ccd1; border-radius: 3px; background: #f4f5f7;"
                " text-align: center; margin: 3px 4px; }"
                f"QProgressBar::chunk {{ background: rgb({max(r - 40, 0)},{max(g - 40, 0)},{max(b - 40, 0)});"
                " border-radius: 2px; }"
            )
