"""The Balance page: cluster imbalance, DRS-like settings, the plan and its execution.

``GET /balance`` is polled every 2.5 s while the page is shown; it carries the
settings, the imbalance over the last hour, current host utilisation, the
current plan and the execution state.  *Compute plan* posts the settings
shown; *Approve* / *Reject* post to the plan.  Everything goes through the
page's request worker; errors show in the page.

The plan view shows CPU (or memory) per host before and after as paired bars,
the ordered moves with their reasons, gains and costs, and, folded away, what
the planner considered and rejected and why.

This module imports pyqtgraph: the window imports it when the tab first opens.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QButtonGroup,
    QComboBox,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QSlider,
    QSplitter,
    QStackedWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from cloudmon.ui.polling import (
    PAGE_STYLE,
    PollingPage,
    as_float,
    clock_time,
    esc,
    make_item,
    make_table,
    number,
)
from cloudmon.ui.workers import Reply

logger = logging.getLogger(__name__)

pg.setConfigOptions(antialias=False, background="w", foreground="#3c4048")

BALANCE_POLL_MS = 2500
#: The bar chart shows at most this many hosts: those whose load changes most.
MAX_BAR_HOSTS = 24

#: vSphere DRS's migration threshold, 1 (conservative) to 5 (aggressive).
THRESHOLD_LABELS: dict[int, str] = {
    1: "1 · conservative: mandatory moves only (rules, maintenance)",
    2: "2 · moves with a large improvement",
    3: "3 · default: moves with a good improvement",
    4: "4 · moves with a moderate improvement",
    5: "5 · aggressive: even small improvements",
}
AUTOMATION: tuple[tuple[str, str], ...] = (
    ("manual", "Manual: recommend, I approve"),
    ("partial", "Partial: mandatory moves run by themselves"),
    ("full", "Full: plans run by themselves"),
)
MODES: tuple[tuple[str, str], ...] = (
    ("balance", "Balance load across hosts"),
    ("consolidate", "Consolidate: empty hosts to power them off"),
)
STATUS_COLOURS = {
    "proposed": "#1f5fbf",
    "approved": "#1e7a3c",
    "running": "#1e7a3c",
    "done": "#1e7a3c",
    "failed": "#b3261e",
    "rejected": "#80858f",
}
BEFORE_COLOUR = QColor("#b9c3d1")
AFTER_COLOUR = QColor("#1f5fbf")


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def pct(value: Any) -> str:
    """A 0..1 utilisation as ``"62 %"``."""
    f = as_float(value)
    return "–" if f is None else f"{f * 100:.0f} %"


def seconds(value: Any) -> str:
    f = as_float(value)
    if f is None:
        return "–"
    return f"{f:.0f} s" if f < 90 else f"{f / 60:.1f} min"


def bar_hosts(
    before: dict[str, Any], after: dict[str, Any], key: str, limit: int = MAX_BAR_HOSTS
) -> list[str]:
    """Hosts for the bar chart: all of them if few, else those that change most, by name."""
    hosts = sorted(set(before) | set(after))
    if len(hosts) <= limit:
        return hosts

    def change(h: str) -> float:
        b = as_float(_dict(before.get(h)).get(key)) or 0.0
        a = as_float(_dict(after.get(h)).get(key)) or 0.0
        return abs(a - b)

    return sorted(sorted(hosts, key=change, reverse=True)[:limit])


def host_tables(plan: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(hosts_before, hosts_after)`` of a plan, as ``{host: {"cpu", "mem"}}``.

    Reads the contract's two maps, or the planner's own list
    ``hosts: [{"host", "before", "after", ...}]`` when the maps are absent.
    """
    before, after = _dict(plan.get("hosts_before")), _dict(plan.get("hosts_after"))
    if not before and not after:
        for h in _dicts(plan.get("hosts")):
            name = h.get("host") or h.get("name")
            if name:
                before[str(name)] = _dict(h.get("before"))
                after[str(name)] = _dict(h.get("after"))
    return before, after


class HostBars:
    """Paired bars per host: utilisation before (grey) and after (blue) the plan."""

    def __init__(self, parent: QWidget) -> None:
        self.widget = pg.PlotWidget(parent=parent)
        self.widget.setMinimumHeight(200)
        plot = self.widget.getPlotItem()
        self.plot = plot
        plot.hideButtons()
        plot.setMenuEnabled(False)
        plot.setMouseEnabled(x=False, y=False)
        plot.showGrid(y=True, alpha=0.15)
        plot.setYRange(0, 100, padding=0.06)
        plot.enableAutoRange(axis="y", enable=False)
        plot.getAxis("left").setTicks([[(v, f"{v} %") for v in (0, 25, 50, 75, 100)], []])
        plot.getAxis("left").setWidth(48)
        self.before_item = pg.BarGraphItem(x=[], height=[], width=0.38, brush=BEFORE_COLOUR, pen=None)
        self.after_item = pg.BarGraphItem(x=[], height=[], width=0.38, brush=AFTER_COLOUR, pen=None)
        plot.addItem(self.before_item)
        plot.addItem(self.after_item)
        self.hosts: list[str] = []
        self.before: list[float] = []
        self.after: list[float] = []

    def set_data(
        self, hosts: list[str], before: list[float], after: list[float], off: set[str], title: str
    ) -> None:
        """Draw one pair of bars per host; values are percent (0..100)."""
        self.hosts, self.before, self.after = hosts, before, after
        x = np.arange(len(hosts), dtype=np.float64)
        self.before_item.setOpts(x=x - 0.2, height=np.asarray(before, dtype=np.float64), width=0.38)
        self.after_item.setOpts(x=x + 0.2, height=np.asarray(after, dtype=np.float64), width=0.38)
        # Long lists of hosts: show every n-th name so the labels stay readable.
        step = max(1, math.ceil(len(hosts) / 12))
        ticks = [
            (float(i), f"{h}{' (off)' if h in off else ''}") for i, h in enumerate(hosts) if i % step == 0
        ]
        self.plot.getAxis("bottom").setTicks([ticks, []])
        self.plot.setXRange(-0.6, max(len(hosts) - 0.4, 0.6), padding=0)
        self.plot.setTitle(title, size="9pt", justify="left")


def _card(parent: QWidget) -> QFrame:
    f = QFrame(parent)
    f.setObjectName("card")
    return f


class BalancePage(PollingPage):
    """Imbalance chart, settings, plan (bars, moves, rejected) and execution progress."""

    #: Emitted after each applied ``GET /balance`` answer (tests wait on it).
    balance_applied = Signal()
    #: Emitted after a plan was shown (from a poll, compute, approve or reject).
    plan_applied = Signal()

    def __init__(
        self,
        url: str,
        token: str | None,
        parent: QWidget | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(url, token, "balance", BALANCE_POLL_MS, parent)
        self.setObjectName("balancePage")
        self.setStyleSheet(PAGE_STYLE)
        self._clock = clock
        self.plan: dict[str, Any] | None = None
        self.settings: dict[str, Any] = {}
        self.execution: dict[str, Any] = {}
        self._settings_touched = False
        self._busy: str | None = None  # the action in flight: compute / approve / reject

        title = QLabel("Balance", self)
        title.setObjectName("pageTitle")
        self.summary = QLabel(self)
        self.summary.setObjectName("pageInfo")
        head = QHBoxLayout()
        head.addWidget(title)
        head.addSpacing(10)
        head.addWidget(self.summary, 1)

        top = QHBoxLayout()
        top.setSpacing(10)
        top.addWidget(self._build_chart(), 1)
        top.addWidget(self._build_settings(), 0)

        self.plan_stack = QStackedWidget(self)
        self.plan_empty = QLabel(self)
        self.plan_empty.setObjectName("emptyHint")
        self.plan_empty.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.plan_empty.setWordWrap(True)
        empty_card = _card(self)
        el = QVBoxLayout(empty_card)
        el.addWidget(self.plan_empty)
        self.plan_stack.addWidget(empty_card)
        self.plan_stack.addWidget(self._build_plan())

        layout = QVBoxLayout(self)
        layout.setContentsMargins(12, 10, 12, 8)
        layout.setSpacing(8)
        layout.addLayout(head)
        layout.addWidget(self.error_label)
        layout.addLayout(top, 0)
        layout.addWidget(self._build_plan_header())
        layout.addWidget(self.plan_stack, 1)
        layout.addWidget(self._build_execution())
        self._show_plan_state()

    # --- construction ---------------------------------------------------------------

    def _build_chart(self) -> QWidget:
        card = _card(self)
        self.chart = pg.PlotWidget(parent=card, axisItems={"bottom": pg.DateAxisItem(orientation="bottom")})
        self.chart.setMinimumHeight(170)
        self.chart.setMaximumHeight(230)
        plot = self.chart.getPlotItem()
        plot.setTitle(
            "<b>Imbalance</b> <span style='color:#80858f'>(std. dev. of normalised host load, last hour)</span>",
            size="9pt",
            justify="left",
        )
        plot.hideButtons()
        plot.setMenuEnabled(False)
        plot.setMouseEnabled(x=False, y=False)
        plot.showGrid(x=True, y=True, alpha=0.15)
        plot.setLimits(yMin=0)
        plot.getAxis("left").setWidth(48)
        self.imbalance_curve = plot.plot(
            pen=pg.mkPen(QColor("#7b3fb5"), width=2),
            fillLevel=0,
            brush=QColor(123, 63, 181, 40),
            connect="finite",
        )
        box = QVBoxLayout(card)
        box.setContentsMargins(4, 4, 4, 4)
        box.addWidget(self.chart)
        self._show_imbalance({})
        return card

    def _build_settings(self) -> QWidget:
        card = _card(self)
        card.setFixedWidth(380)
        self.threshold = QSlider(Qt.Orientation.Horizontal, card)
        self.threshold.setObjectName("thresholdSlider")
        self.threshold.setRange(1, 5)
        self.threshold.setPageStep(1)
        self.threshold.setTickPosition(QSlider.TickPosition.TicksBelow)
        self.threshold.setTickInterval(1)
        self.threshold.setValue(3)
        ends = QHBoxLayout()
        lo, hi = QLabel("Conservative", card), QLabel("Aggressive", card)
        lo.setObjectName("pageInfo")
        hi.setObjectName("pageInfo")
        ends.addWidget(lo)
        ends.addStretch(1)
        ends.addWidget(hi)
        self.threshold_label = QLabel(card)
        self.threshold_label.setObjectName("thresholdLabel")
        self.threshold_label.setWordWrap(True)
        self.automation = QComboBox(card)
        for key, text in AUTOMATION:
            self.automation.addItem(text, key)
        self.mode = QComboBox(card)
        for key, text in MODES:
            self.mode.addItem(text, key)
        self.compute_button = QPushButton("Compute plan", card)
        self.compute_button.setObjectName("primary")
        self.compute_button.setToolTip("Ask the planner for a plan with these settings (it changes nothing)")
        self.compute_button.clicked.connect(self.compute_plan)
        self.save_button = QPushButton("Save settings", card)
        self.save_button.setToolTip(
            "Keep these settings on the collector: the automation level decides whether plans run by themselves"
        )
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(self.save_settings)
        self.threshold.valueChanged.connect(self._threshold_changed)
        self.automation.currentIndexChanged.connect(self._touched)
        self.mode.currentIndexChanged.connect(self._touched)

        form = QFormLayout(card)
        form.setContentsMargins(12, 10, 12, 10)
        title = QLabel("Settings", card)
        title.setObjectName("sectionTitle")
        form.addRow(title)
        slider_box = QVBoxLayout()
        slider_box.setSpacing(0)
        slider_box.addWidget(self.threshold)
        slider_box.addLayout(ends)
        form.addRow("Migration threshold", slider_box)
        form.addRow("", self.threshold_label)
        form.addRow("Automation", self.automation)
        form.addRow("Mode", self.mode)
        buttons = QHBoxLayout()
        buttons.addWidget(self.save_button)
        buttons.addWidget(self.compute_button, 1)
        form.addRow("", buttons)
        self._threshold_changed(self.threshold.value(), touched=False)
        return card

    def _build_plan_header(self) -> QWidget:
        bar = QWidget(self)
        lay = QHBoxLayout(bar)
        lay.setContentsMargins(0, 4, 0, 0)
        self.plan_title = QLabel("<b>Plan</b>", bar)
        self.plan_title.setObjectName("planTitle")
        self.plan_title.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.approve_button = QPushButton("Approve and run", bar)
        self.approve_button.setObjectName("primary")
        self.approve_button.clicked.connect(self.approve_plan)
        self.reject_button = QPushButton("Reject", bar)
        self.reject_button.clicked.connect(self.reject_plan)
        self.plan_notes = QLabel(bar)
        self.plan_notes.setObjectName("planNotes")
        self.plan_notes.setWordWrap(True)
        self.plan_notes.hide()
        text = QVBoxLayout()
        text.setSpacing(2)
        text.addWidget(self.plan_title)
        text.addWidget(self.plan_notes)
        lay.addLayout(text, 1)
        lay.addWidget(self.reject_button, 0, Qt.AlignmentFlag.AlignTop)
        lay.addWidget(self.approve_button, 0, Qt.AlignmentFlag.AlignTop)
        return bar

    def _build_plan(self) -> QWidget:
        page = QWidget(self)
        bars_card = _card(page)
        self.bars = HostBars(bars_card)
        self.bar_metric = "cpu"
        seg = QHBoxLayout()
        seg.setSpacing(0)
        self.bar_buttons: dict[str, QToolButton] = {}
        group = QButtonGroup(bars_card)
        for i, (key, label) in enumerate((("cpu", "CPU"), ("mem", "Memory"))):
            b = QToolButton(bars_card)
            b.setText(label)
            b.setCheckable(True)
            b.setObjectName("rangeButton")
            b.setProperty("segment", "first" if i == 0 else "last")
            b.clicked.connect(lambda _c=False, k=key: self.set_bar_metric(k))
            group.addButton(b)
            seg.addWidget(b)
            self.bar_buttons[key] = b
        self.bar_buttons["cpu"].setChecked(True)
        legend = QLabel(
            f"<span style='color:{BEFORE_COLOUR.name()}'>■</span> before &nbsp; "
            f"<span style='color:{AFTER_COLOUR.name()}'>■</span> after &nbsp; (off): powered off after",
            bars_card,
        )
        legend.setObjectName("pageInfo")
        seg.addSpacing(12)
        seg.addWidget(legend)
        seg.addStretch(1)
        bl = QVBoxLayout(bars_card)
        bl.setContentsMargins(6, 6, 6, 4)
        bl.addLayout(seg)
        bl.addWidget(self.bars.widget, 1)

        moves_box = QWidget(page)
        self.moves_title = QLabel("Moves", moves_box)
        self.moves_title.setObjectName("sectionTitle")
        self.moves = make_table(moves_box, ["Wave", "VM", "From → to", "Why", "Gain", "Cost"], "moveTable")
        mh = self.moves.horizontalHeader()
        mh.setSectionResizeMode(3, QHeaderView.ResizeMode.Stretch)
        for col, width in ((0, 54), (1, 110), (2, 150), (4, 58), (5, 58)):
            self.moves.setColumnWidth(col, width)
        self.rejected_toggle = QToolButton(moves_box)
        self.rejected_toggle.setObjectName("rejectedToggle")
        self.rejected_toggle.setCheckable(True)
        self.rejected_toggle.setAutoRaise(True)
        self.rejected_toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.rejected_toggle.setArrowType(Qt.ArrowType.RightArrow)
        self.rejected_toggle.toggled.connect(self._toggle_rejected)
        self.rejected = make_table(moves_box, ["VM", "Target", "Why not", "Detail"], "rejectedTable")
        rh = self.rejected.horizontalHeader()
        rh.setSectionResizeMode(3, QHeaderView.ResizeMode.Stretch)
        for col, width in ((0, 120), (1, 110), (2, 130)):
            self.rejected.setColumnWidth(col, width)
        self.rejected.hide()
        ml = QVBoxLayout(moves_box)
        ml.setContentsMargins(0, 0, 0, 0)
        ml.setSpacing(4)
        ml.addWidget(self.moves_title)
        ml.addWidget(self.moves, 3)
        ml.addWidget(self.rejected_toggle, 0, Qt.AlignmentFlag.AlignLeft)
        ml.addWidget(self.rejected, 2)

        split = QSplitter(Qt.Orientation.Horizontal, page)
        split.addWidget(bars_card)
        split.addWidget(moves_box)
        split.setStretchFactor(0, 2)
        split.setStretchFactor(1, 3)
        split.setSizes([480, 720])  # the moves' reasons need the width more than the bars
        lay = QVBoxLayout(page)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(split)
        return page

    def _build_execution(self) -> QWidget:
        self.execution_box = _card(self)
        self.progress = QProgressBar(self.execution_box)
        self.progress.setObjectName("executionProgress")
        self.progress.setMinimumWidth(260)
        self.progress.setMaximumWidth(360)
        self.execution_label = QLabel(self.execution_box)
        self.execution_label.setObjectName("executionLabel")
        self.execution_label.setWordWrap(True)
        lay = QHBoxLayout(self.execution_box)
        lay.setContentsMargins(10, 6, 10, 6)
        lay.addWidget(QLabel("<b>Execution</b>", self.execution_box))
        lay.addWidget(self.progress)
        lay.addWidget(self.execution_label, 1)
        self.execution_box.hide()
        return self.execution_box

    # --- settings ------------------------------------------------------------------

    def _threshold_changed(self, value: int, touched: bool = True) -> None:
        self.threshold_label.setText(THRESHOLD_LABELS.get(value, str(value)))
        if touched:
            self._touched()

    def _touched(self, *_args: object) -> None:
        self._settings_touched = True
        self._update_buttons()

    def current_settings(self) -> dict[str, Any]:
        """The settings the controls show, as ``POST /balance/plan`` takes them."""
        out = dict(self.settings)  # keeps settings the page has no control for
        out.update(
            threshold=self.threshold.value(),
            automation=self.automation.currentData(),
            mode=self.mode.currentData(),
        )
        return out

    def _show_settings(self, settings: dict[str, Any]) -> None:
        if self._settings_touched:
            return  # the operator is choosing: a poll must not undo it
        for w in (self.threshold, self.automation, self.mode):
            w.blockSignals(True)
        try:
            t = as_float(settings.get("threshold"))
            if t is not None:
                self.threshold.setValue(int(t))
                self.threshold_label.setText(THRESHOLD_LABELS.get(int(t), str(int(t))))
            for combo, key in ((self.automation, "automation"), (self.mode, "mode")):
                i = combo.findData(settings.get(key))
                if i >= 0:
                    combo.setCurrentIndex(i)
        finally:
            for w in (self.threshold, self.automation, self.mode):
                w.blockSignals(False)

    # --- polling and actions -------------------------------------------------------

    def poll(self) -> None:
        self.issue("balance", lambda c: c.balance())

    def compute_plan(self) -> None:
        """Ask the planner for a plan with the settings shown."""
        settings = self.current_settings()
        self._set_busy("compute")
        self.issue("compute", lambda c: c.compute_plan(settings))

    def save_settings(self) -> None:
        """Keep the settings shown on the collector (``PUT /balance/settings``)."""
        settings = self.current_settings()
        self._set_busy("save")
        self.issue("save", lambda c: c.put_balance_settings(settings))

    def approve_plan(self) -> None:
        plan_id = self._plan_id()
        if plan_id is not None:
            self._set_busy("approve")
            self.issue("approve", lambda c: c.approve_plan(plan_id))

    def reject_plan(self) -> None:
        plan_id = self._plan_id()
        if plan_id is not None:
            self._set_busy("reject")
            self.issue("reject", lambda c: c.reject_plan(plan_id))

    def _plan_id(self) -> str | None:
        plan_id = self.plan.get("id") if self.plan else None
        return None if plan_id is None else str(plan_id)

    def _set_busy(self, action: str | None) -> None:
        self._busy = action
        self.compute_button.setText("Computing…" if action == "compute" else "Compute plan")
        self._update_buttons()

    def on_reply(self, reply: Reply) -> None:
        action = reply.key in ("compute", "approve", "reject", "save")
        if action:
            self._set_busy(None)
        if reply.error:
            what = {
                "balance": "Could not load the balance state",
                "compute": "Could not compute a plan",
                "approve": "Could not approve the plan",
                "reject": "Could not reject the plan",
                "save": "Could not save the settings",
            }.get(reply.key, reply.key)
            self.show_error(f"{what}: {reply.error}", reply.key)
            return
        try:
            if reply.key == "balance":
                self.apply_balance(reply.value)
            elif action:
                if reply.key in ("compute", "save"):
                    self._settings_touched = False
                if reply.key == "save":
                    self.settings = _dict(_dict(reply.value).get("settings")) or self.settings
                    self._update_buttons()
                else:
                    self.apply_plan(_dict(reply.value).get("plan"))
                self.poll()  # execution state and settings follow the action
            # A poll clears only a poll's error; an action's answer clears any.
            self.clear_error("balance" if reply.key == "balance" else None)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            logger.warning("unexpected %s answer: %s", reply.key, exc)
            self.show_error(f"Unexpected answer from the collector for {reply.key}: {exc}", reply.key)

    # --- data in -------------------------------------------------------------------

    def apply_balance(self, data: dict[str, Any]) -> None:
        """Show a ``GET /balance`` answer."""
        self.settings = _dict(data.get("settings"))
        self._show_settings(self.settings)
        self._show_imbalance(_dict(data.get("imbalance")))
        hosts = _dicts(data.get("hosts"))
        self.apply_plan(data.get("plan"))
        self.apply_execution(_dict(data.get("execution")))
        parts = [f"{len(hosts)} host{'s' if len(hosts) != 1 else ''}"]
        if hosts:
            cpu = [f for h in hosts if (f := as_float(h.get("cpu"))) is not None]
            if cpu:
                parts.append(f"CPU {min(cpu) * 100:.0f}–{max(cpu) * 100:.0f} %")
        values = _dict(data.get("imbalance")).get("value")
        if isinstance(values, list) and values and as_float(values[-1]) is not None:
            parts.append(f"imbalance now <b>{number(as_float(values[-1]))}</b>")
        self.summary.setText("&nbsp;&nbsp;·&nbsp;&nbsp;".join(parts))
        self.balance_applied.emit()

    def _show_imbalance(self, series: dict[str, Any]) -> None:
        ts, vs = series.get("ts"), series.get("value")
        plot = self.chart.getPlotItem()
        if not isinstance(ts, list) or not isinstance(vs, list) or len(ts) != len(vs) or not ts:
            self.imbalance_curve.setData([], [])
            # An empty hour on a time axis, not pyqtgraph's 0..1 "seconds since 1970".
            now = self._clock()
            plot.setXRange(now - 3600, now, padding=0)
            plot.setYRange(0, 0.5, padding=0)
            return
        x = np.array([as_float(t) if as_float(t) is not None else np.nan for t in ts], dtype=np.float64)
        y = np.array([as_float(v) if as_float(v) is not None else np.nan for v in vs], dtype=np.float64)
        ok = np.isfinite(x)
        # A line needs two points: right after start-up, show the few there are as dots.
        few = int(ok.sum()) < 3
        self.imbalance_curve.setData(
            x[ok], y[ok], symbol="o" if few else None, symbolSize=6, symbolBrush=QColor("#7b3fb5")
        )
        plot.enableAutoRange()

    def apply_plan(self, plan: Any) -> None:
        """Show a plan (``P`` of the contract) or None."""
        self.plan = plan if isinstance(plan, dict) else None
        self._show_plan_state()
        self.plan_applied.emit()

    def _threshold_shown(self) -> int:
        t = as_float((self.plan or {}).get("threshold"))
        if t is None:
            t = as_float(self.settings.get("threshold"))
        return int(t) if t is not None else self.threshold.value()

    def _show_plan_state(self) -> None:
        plan = self.plan
        if plan is None:
            self.plan_title.setText("<b>Plan</b>  <span style='color:#5f6673'>none</span>")
            self.plan_empty.setText(
                "<span style='font-size:14pt; color:#3c4048'>No plan yet</span><br>"
                "Choose a migration threshold and press <b>Compute plan</b>. "
                "Computing changes nothing: you see the moves and approve them."
            )
            self.plan_stack.setCurrentIndex(0)
            self.plan_notes.hide()
            self._update_buttons()
            return
        moves = _dicts(plan.get("moves"))
        status = str(plan.get("status") or "?")
        before, after = as_float(plan.get("imbalance_before")), as_float(plan.get("imbalance_after"))
        colour = STATUS_COLOURS.get(status, "#3c4048")
        parts = [
            f"<b>Plan {esc(plan.get('id', ''))}</b>",
            f"<span style='color:{colour}; font-weight:bold'>{esc(status)}</span>",
            f"{len(moves)} move{'s' if len(moves) != 1 else ''}",
        ]
        if before is not None and after is not None:
            parts.append(f"imbalance <b>{number(before)} → {number(after)}</b>")
        off = [str(h) for h in plan.get("power_off") or []]
        if off:
            parts.append(f"power off: {esc(', '.join(off))}")
        if plan.get("solver"):
            parts.append(f"<span style='color:#80858f'>solver {esc(plan['solver'])}</span>")
        if as_float(plan.get("created")) is not None:
            parts.append(
                f"<span style='color:#80858f'>computed {clock_time(plan['created'], self._clock())}</span>"
            )
        self.plan_title.setText("&nbsp;&nbsp;·&nbsp;&nbsp;".join(parts))
        unresolved = [str(u) for u in plan.get("unresolved") or []]
        notes = [str(n) for n in plan.get("notes") or []]
        if plan.get("message"):
            notes.insert(0, str(plan["message"]))
        lines = [f"<span style='color:#b3261e'><b>Not fixed:</b> {esc(u)}</span>" for u in unresolved]
        lines += [f"<span style='color:#5f6673'>{esc(n)}</span>" for n in notes]
        self.plan_notes.setText("<br>".join(lines))
        self.plan_notes.setVisible(bool(lines))
        if not moves:
            self.plan_empty.setText(
                "<span style='font-size:14pt; color:#1e7a3c'>The cluster is balanced</span><br>"
                f"No move improves it at threshold {self._threshold_shown()}. "
                "A higher threshold takes smaller improvements too."
            )
            self.plan_stack.setCurrentIndex(0)
        else:
            self.plan_stack.setCurrentIndex(1)
            self._fill_moves(moves)
            self._draw_bars()
        self._fill_rejected(_dicts(plan.get("rejected")))
        self._update_buttons()

    def _fill_moves(self, moves: list[dict[str, Any]]) -> None:
        self.moves.setRowCount(len(moves))
        # Waves are shown from 1 whether the planner counts from 0 or from 1.
        numbered = [w for m in moves if (w := as_float(m.get("wave"))) is not None]
        first = min(numbered, default=1.0)
        for row, m in enumerate(moves):
            wave = as_float(m.get("wave"))
            sb, sa = _dict(m.get("source_before")), _dict(m.get("source_after"))
            tb, ta = _dict(m.get("target_before")), _dict(m.get("target_after"))
            detail = (
                f"{m.get('source')}: CPU {pct(sb.get('cpu'))} → {pct(sa.get('cpu'))}, "
                f"memory {pct(sb.get('mem'))} → {pct(sa.get('mem'))}\n"
                f"{m.get('target')}: CPU {pct(tb.get('cpu'))} → {pct(ta.get('cpu'))}, "
                f"memory {pct(tb.get('mem'))} → {pct(ta.get('mem'))}"
            )
            reason = str(m.get("reason") or "")
            mandatory = bool(m.get("mandatory"))
            cells = [
                make_item(
                    "–" if wave is None else number(int(wave - first) + 1),
                    "moves in one wave run together",
                    right=True,
                ),
                make_item(str(m.get("vm") or "?"), detail),
                make_item(f"{m.get('source', '?')} → {m.get('target', '?')}", detail),
                make_item(
                    # The gist up front (the planner's full sentence is the tooltip): a
                    # required move's cause, or what a balancing move does to both hosts.
                    f"required: {reason.split(':')[0]}"
                    if mandatory
                    else f"{m.get('source')} CPU {pct(sb.get('cpu'))} → {pct(sa.get('cpu'))}, "
                    f"{m.get('target')} {pct(tb.get('cpu'))} → {pct(ta.get('cpu'))}",
                    f"{reason}\n\n{detail}",
                    colour="#8a1c12" if mandatory else None,
                ),
                make_item(number(as_float(m.get("gain"))), "imbalance reduction of this move", right=True),
                make_item(seconds(m.get("cost_s")), "estimated migration time", right=True),
            ]
            for col, item in enumerate(cells):
                self.moves.setItem(row, col, item)
        waves = {m.get("wave") for m in moves}
        self.moves_title.setText(
            f"Moves  <span style='color:#5f6673'>({len(moves)} in {len(waves)} wave{'s' if len(waves) != 1 else ''},"
            " in order)</span>"
        )

    def _fill_rejected(self, rejected: list[dict[str, Any]]) -> None:
        self.rejected.setRowCount(len(rejected))
        for row, r in enumerate(rejected):
            detail = str(r.get("detail") or "")
            cells = [
                make_item(str(r.get("vm") or "?")),
                make_item(str(r.get("target") or "–")),
                make_item(str(r.get("why") or "?").replace("_", " ")),
                make_item(detail, detail),
            ]
            for col, item in enumerate(cells):
                self.rejected.setItem(row, col, item)
        self.rejected_toggle.setText(f"Considered and rejected ({len(rejected)})")
        self.rejected_toggle.setEnabled(bool(rejected))
        if not rejected:
            self.rejected_toggle.setChecked(False)

    def _toggle_rejected(self, shown: bool) -> None:
        self.rejected.setVisible(shown)
        self.rejected_toggle.setArrowType(Qt.ArrowType.DownArrow if shown else Qt.ArrowType.RightArrow)

    def set_bar_metric(self, key: str) -> None:
        """Show ``"cpu"`` or ``"mem"`` in the before/after bars."""
        self.bar_metric = key
        self.bar_buttons[key].setChecked(True)
        self._draw_bars()

    def _draw_bars(self) -> None:
        plan = self.plan or {}
        before, after = host_tables(plan)
        key = self.bar_metric
        hosts = bar_hosts(before, after, key)

        def value(table: dict[str, Any], host: str) -> float:
            f = as_float(_dict(table.get(host)).get(key))
            return 0.0 if f is None else f * 100.0

        total = len(set(before) | set(after))
        label = "CPU" if key == "cpu" else "Memory"
        title = f"<b>{label} per host</b>, before and after"
        if total > len(hosts):
            title += (
                f" <span style='color:#80858f'>({len(hosts)} of {total} hosts: those that change most)</span>"
            )
        off = {str(h) for h in plan.get("power_off") or []}
        self.bars.set_data(
            hosts, [value(before, h) for h in hosts], [value(after, h) for h in hosts], off, title
        )

    def apply_execution(self, execution: dict[str, Any]) -> None:
        """Show the executor's state: progress bar and the move in progress."""
        self.execution = execution
        state = str(execution.get("state") or "idle")
        done = int(as_float(execution.get("moves_done")) or 0)
        total = int(as_float(execution.get("moves_total")) or 0)
        if state == "idle" and not total:
            self.execution_box.hide()
            return
        self.execution_box.show()
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(min(done, max(total, 1)))
        self.progress.setFormat(f"{done} / {total} moves")
        current = _dict(execution.get("current"))
        text = {
            "running": "Running",
            "done": "Done",
            "failed": "Stopped: a move failed",
            "cancelled": "Cancelled",
            "idle": "Idle",
        }.get(state, state)
        if current and state == "running":
            text += (
                f": moving <b>{esc(current.get('vm'))}</b> {esc(current.get('source'))} → {esc(current.get('target'))}"
                f" ({number(as_float(current.get('percent')) or 0)} %)"
            )
        if execution.get("message"):
            text += f" — {esc(execution['message'])}"
        colour = "#b3261e" if state == "failed" else "#3c4048"
        self.execution_label.setText(f"<span style='color:{colour}'>{text}</span>")
        self.progress.setProperty("state", state)

    def _update_buttons(self) -> None:
        proposed = self.plan is not None and self.plan.get("status") == "proposed"
        has_moves = bool(self.plan and _dicts(self.plan.get("moves")))
        idle = self._busy is None
        self.approve_button.setEnabled(proposed and has_moves and idle)
        self.reject_button.setEnabled(proposed and idle)
        self.compute_button.setEnabled(idle)
        self.save_button.setEnabled(idle and self._settings_touched)
        tip = "" if proposed else "Only a proposed plan can be approved or rejected"
        self.approve_button.setToolTip(tip or "Run the moves in order, one wave at a time")
        self.reject_button.setToolTip(tip or "Discard this plan; nothing moves")
