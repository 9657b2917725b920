"""Create or edit an auto-scaling group: a form for the main fields and policies.

The dialog edits a copy of the group's spec: fields it has no control for
(anything the server adds later) are kept as they were.  Four tabs: General
(template and capacity), Policies (target tracking and step scaling),
Schedule (cron actions), and JSON (the whole spec, for everything else).  It
never talks to the collector itself: *Save* emits :attr:`GroupDialog.save_requested`
and the page sends the ``PUT``; the page calls :meth:`GroupDialog.show_error`
with the server's validation error, or ``accept()`` when it worked.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QStackedWidget,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from cloudmon.ui.polling import PAGE_STYLE, as_float, number

PROVIDERS = ("simulated", "libvirt", "command")
TERMINATION_POLICIES = ("oldest", "newest", "most_loaded_host")
METRICS = ("cpu.percent", "mem.percent")
#: Step policies: ``"step"`` is the tag cloudmon.autoscale.model decodes; ``"step_scaling"`` is read too.
STEP_TYPES = ("step", "step_scaling")
COMPARISONS = (">", ">=", "<", "<=")
ADJUSTMENT_TYPES = ("change_in_capacity", "exact_capacity", "percent_change_in_capacity")

DEFAULT_SPEC: dict[str, Any] = {
    "template": {"provider": "simulated", "image": "", "vcpus": 1, "memory_mib": 512, "hosts": []},
    "min_size": 1,
    "max_size": 4,
    "desired": 1,
    "health_check_grace_s": 120,
    "default_warmup_s": 60,
    "termination_policy": "oldest",
    "default_cooldown_s": 120,
    "drain_timeout_s": 30,
    "policies": [],
    "scheduled": [],
}


def _combo(parent: QWidget, values: tuple[str, ...], editable: bool = False) -> QComboBox:
    c = QComboBox(parent)
    c.addItems(list(values))
    c.setEditable(editable)
    return c


def _set_combo(combo: QComboBox, value: Any) -> None:
    text = "" if value is None else str(value)
    if combo.findText(text) < 0 and text:
        combo.addItem(text)  # a value the form does not know: keep it selectable, do not lose it
    combo.setCurrentText(text)


def _spin(parent: QWidget, lo: int, hi: int, suffix: str = "") -> QSpinBox:
    s = QSpinBox(parent)
    s.setRange(lo, hi)
    s.setSuffix(suffix)
    s.setMinimumWidth(110)
    return s


def _int(value: Any, default: int) -> int:
    f = as_float(value)
    return int(f) if f is not None else default


def policy_summary(policy: dict[str, Any]) -> str:
    """One line for the policy list: ``"cpu-50 · target tracking · cpu at 50"``."""
    kind = str(policy.get("type") or "?")
    name = str(policy.get("name") or "(unnamed)")
    metric = policy.get("metric", "?")
    if kind == "target_tracking":
        return f"{name} · keep {metric} at {number(policy.get('target'))}"
    if kind in STEP_TYPES:
        alarm = policy.get("alarm") if isinstance(policy.get("alarm"), dict) else {}
        assert isinstance(alarm, dict)
        return (
            f"{name} · step when {metric} {alarm.get('comparison', '?')} {number(alarm.get('threshold'))}"
            f" for {number(alarm.get('duration_s'))} s"
        )
    return f"{name} · {kind}"


def _cell_number(table: QTableWidget, row: int, col: int) -> float | None:
    item = table.item(row, col)
    text = item.text().strip() if item is not None else ""
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        header = table.horizontalHeaderItem(col)
        raise ValueError(
            f"row {row + 1}, {header.text() if header else col}: {text!r} is not a number"
        ) from None
    return int(value) if value == int(value) else value


def _cell_text(table: QTableWidget, row: int, col: int) -> str:
    item = table.item(row, col)
    return item.text().strip() if item is not None else ""


class GroupDialog(QDialog):
    """The form; ``group`` is a ``GET /groups`` entry to edit, or None for a new group."""

    #: ``(name, spec)`` when the user presses Save and the form is complete.
    save_requested = Signal(str, object)

    def __init__(self, group: dict[str, Any] | None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setStyleSheet(PAGE_STYLE)
        self.editing = group is not None
        base = group.get("spec") if group is not None else None
        self._spec: dict[str, Any] = copy.deepcopy(base if isinstance(base, dict) else DEFAULT_SPEC)
        name = str(group.get("name", "")) if group is not None else ""
        self.setWindowTitle(f"Edit group {name}" if self.editing else "New auto-scaling group")
        self.resize(640, 560)
        self._loading = False

        self.tabs = QTabWidget(self)
        self.tabs.addTab(self._build_general(name), "General")
        self.tabs.addTab(self._build_policies(), "Policies")
        self.tabs.addTab(self._build_schedule(), "Schedule")
        self.json_edit = QPlainTextEdit(self)
        self.json_edit.setObjectName("specJson")
        mono = self.json_edit.font()
        mono.setFamily("monospace")
        self.json_edit.setFont(mono)
        json_page = QWidget(self)
        jl = QVBoxLayout(json_page)
        note = QLabel(
            "The whole spec as the collector stores it; fields without a control in the form live here."
        )
        note.setObjectName("pageInfo")
        note.setWordWrap(True)
        jl.addWidget(note)
        jl.addWidget(self.json_edit, 1)
        self.tabs.addTab(json_page, "JSON")
        self._tab = 0
        self.tabs.currentChanged.connect(self._tab_changed)

        self.error_label = QLabel(self)
        self.error_label.setObjectName("dialogError")
        self.error_label.setWordWrap(True)
        self.error_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.error_label.hide()
        self.buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Cancel, self
        )
        self.save_button = self.buttons.button(QDialogButtonBox.StandardButton.Save)
        self.save_button.setText("Save" if self.editing else "Create")
        self.buttons.accepted.connect(self.submit)
        self.buttons.rejected.connect(self.reject)

        layout = QVBoxLayout(self)
        layout.addWidget(self.tabs, 1)
        layout.addWidget(self.error_label)
        layout.addWidget(self.buttons)
        self._load_form()

    # --- tabs ------------------------------------------------------------------------

    def _build_general(self, name: str) -> QWidget:
        page = QWidget(self)
        form = QFormLayout(page)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.ExpandingFieldsGrow)
        self.name_edit = QLineEdit(name, page)
        self.name_edit.setPlaceholderText("web  (letters, digits, - and _)")
        self.name_edit.setReadOnly(self.editing)
        if self.editing:
            self.name_edit.setToolTip("A group keeps its name; create a new group to rename it")
        self.provider = _combo(page, PROVIDERS, editable=True)
        self.image = QLineEdit(page)
        self.image.setPlaceholderText("base image or template domain (provider-specific)")
        self.vcpus = _spin(page, 1, 1024, " vCPU")
        self.memory = _spin(page, 16, 16 * 1024 * 1024, " MiB")
        self.memory.setSingleStep(256)
        self.hosts = QLineEdit(page)
        self.hosts.setPlaceholderText("any host  (or: web-01, web-02)")
        self.min_size = _spin(page, 0, 100_000)
        self.max_size = _spin(page, 0, 100_000)
        self.desired = _spin(page, 0, 100_000)
        cap = QHBoxLayout()
        for label, spin in (("min", self.min_size), ("desired", self.desired), ("max", self.max_size)):
            cap.addWidget(QLabel(label, page))
            cap.addWidget(spin)
        cap.addStretch(1)
        self.grace = _spin(page, 0, 86_400, " s")
        self.warmup = _spin(page, 0, 86_400, " s")
        self.cooldown = _spin(page, 0, 86_400, " s")
        self.drain = _spin(page, 0, 86_400, " s")
        self.termination = _combo(page, TERMINATION_POLICIES, editable=True)
        form.addRow("Name", self.name_edit)
        form.addRow("Provider", self.provider)
        form.addRow("Image", self.image)
        form.addRow("vCPUs", self.vcpus)
        form.addRow("Memory", self.memory)
        form.addRow("Hosts", self.hosts)
        form.addRow("Capacity", cap)
        form.addRow("Health-check grace", self.grace)
        form.addRow("Instance warm-up", self.warmup)
        form.addRow("Cooldown", self.cooldown)
        form.addRow("Drain timeout", self.drain)
        form.addRow("Terminate first", self.termination)
        return page

    def _build_policies(self) -> QWidget:
        page = QWidget(self)
        self.policy_list = QListWidget(page)
        self.policy_list.setObjectName("policyList")
        self.policy_list.currentRowChanged.connect(self._show_policy)
        add_tt = QPushButton("+ Target tracking", page)
        add_tt.clicked.connect(lambda: self.add_policy("target_tracking"))
        add_step = QPushButton("+ Step scaling", page)
        add_step.clicked.connect(lambda: self.add_policy("step"))
        self.remove_policy_button = QPushButton("Remove", page)
        self.remove_policy_button.clicked.connect(self.remove_policy)
        bar = QHBoxLayout()
        bar.addWidget(add_tt)
        bar.addWidget(add_step)
        bar.addStretch(1)
        bar.addWidget(self.remove_policy_button)

        # Target tracking editor.
        tt = QWidget(page)
        tf = QFormLayout(tt)
        self.tt_name = QLineEdit(tt)
        self.tt_metric = _combo(tt, METRICS, editable=True)
        self.tt_target = QDoubleSpinBox(tt)
        self.tt_target.setRange(0, 1e9)
        self.tt_target.setDecimals(2)
        tf.addRow("Name", self.tt_name)
        tf.addRow("Metric", self.tt_metric)
        tf.addRow("Keep it at", self.tt_target)
        # Step scaling editor.
        st = QWidget(page)
        sf = QFormLayout(st)
        self.st_name = QLineEdit(st)
        self.st_metric = _combo(st, METRICS, editable=True)
        self.st_comparison = _combo(st, COMPARISONS, editable=True)
        self.st_threshold = QDoubleSpinBox(st)
        self.st_threshold.setRange(-1e9, 1e9)
        self.st_duration = _spin(st, 0, 86_400, " s")
        alarm = QHBoxLayout()
        alarm.addWidget(self.st_comparison)
        alarm.addWidget(self.st_threshold)
        alarm.addWidget(QLabel("for", st))
        alarm.addWidget(self.st_duration)
        alarm.addStretch(1)
        self.st_adjustment = _combo(st, ADJUSTMENT_TYPES, editable=True)
        self.st_steps = QTableWidget(0, 3, st)
        self.st_steps.setObjectName("stepTable")
        self.st_steps.setHorizontalHeaderLabels(["From (≥)", "To (<)", "Adjustment"])
        self.st_steps.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.st_steps.verticalHeader().setVisible(False)
        self.st_steps.setToolTip("Bounds are relative to the alarm threshold; leave one empty for no bound")
        steps_bar = QHBoxLayout()
        add_row = QPushButton("+ Step", st)
        add_row.clicked.connect(lambda: self.st_steps.insertRow(self.st_steps.rowCount()))
        del_row = QPushButton("Remove step", st)
        del_row.clicked.connect(lambda: self.st_steps.removeRow(max(0, self.st_steps.currentRow())))
        steps_bar.addWidget(add_row)
        steps_bar.addWidget(del_row)
        steps_bar.addStretch(1)
        sf.addRow("Name", self.st_name)
        sf.addRow("Metric", self.st_metric)
        sf.addRow("Alarm", alarm)
        sf.addRow("Adjustment", self.st_adjustment)
        sf.addRow("Steps", self.st_steps)
        sf.addRow("", steps_bar)
        none = QLabel("Add a policy, or select one to edit it.", page)
        none.setObjectName("pageInfo")
        none.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.policy_stack = QStackedWidget(page)
        self.policy_stack.addWidget(none)
        self.policy_stack.addWidget(tt)
        self.policy_stack.addWidget(st)
        self._policy_pages = {"target_tracking": tt, "step": st, "step_scaling": st}
        for w in (self.tt_name, self.st_name):
            w.textEdited.connect(self._store_policy)
        for c in (self.tt_metric, self.st_metric, self.st_comparison, self.st_adjustment):
            c.currentTextChanged.connect(self._store_policy)
        self.tt_target.valueChanged.connect(self._store_policy)
        self.st_threshold.valueChanged.connect(self._store_policy)
        self.st_duration.valueChanged.connect(self._store_policy)
        self.st_steps.itemChanged.connect(self._store_policy)

        layout = QVBoxLayout(page)
        layout.addLayout(bar)
        layout.addWidget(self.policy_list, 1)
        layout.addWidget(self.policy_stack, 2)
        return page

    def _build_schedule(self) -> QWidget:
        page = QWidget(self)
        self.schedule = QTableWidget(0, 5, page)
        self.schedule.setObjectName("scheduleTable")
        self.schedule.setHorizontalHeaderLabels(
            ["Name", "Cron (min hour dom mon dow)", "Min", "Max", "Desired"]
        )
        self.schedule.verticalHeader().setVisible(False)
        h = self.schedule.horizontalHeader()
        h.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        self.schedule.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        add = QPushButton("+ Scheduled action", page)
        add.clicked.connect(lambda: self.schedule.insertRow(self.schedule.rowCount()))
        remove = QPushButton("Remove", page)
        remove.clicked.connect(lambda: self.schedule.removeRow(max(0, self.schedule.currentRow())))
        bar = QHBoxLayout()
        bar.addWidget(add)
        bar.addWidget(remove)
        bar.addStretch(1)
        note = QLabel("Empty min, max or desired cells leave that value as it is.", page)
        note.setObjectName("pageInfo")
        layout = QVBoxLayout(page)
        layout.addLayout(bar)
        layout.addWidget(self.schedule, 1)
        layout.addWidget(note)
        return page

    # --- spec <-> form -------------------------------------------------------------

    def _load_form(self) -> None:
        s = self._spec
        tmpl = s.get("template") if isinstance(s.get("template"), dict) else {}
        assert isinstance(tmpl, dict)
        _set_combo(self.provider, tmpl.get("provider", "simulated"))
        self.image.setText(str(tmpl.get("image") or ""))
        self.vcpus.setValue(_int(tmpl.get("vcpus"), 1))
        self.memory.setValue(_int(tmpl.get("memory_mib"), 512))
        hosts = tmpl.get("hosts")
        self.hosts.setText(", ".join(str(h) for h in hosts) if isinstance(hosts, list) else "")
        self.min_size.setValue(_int(s.get("min_size"), 0))
        self.max_size.setValue(_int(s.get("max_size"), 0))
        self.desired.setValue(_int(s.get("desired"), 0))
        self.grace.setValue(_int(s.get("health_check_grace_s"), 0))
        self.warmup.setValue(_int(s.get("default_warmup_s"), 0))
        self.cooldown.setValue(_int(s.get("default_cooldown_s"), 0))
        self.drain.setValue(_int(s.get("drain_timeout_s"), 0))
        _set_combo(self.termination, s.get("termination_policy", "oldest"))
        policies = s.get("policies")
        self._policies: list[dict[str, Any]] = [
            copy.deepcopy(p) for p in (policies if isinstance(policies, list) else []) if isinstance(p, dict)
        ]
        self.policy_list.clear()
        for p in self._policies:
            self.policy_list.addItem(policy_summary(p))
        self.policy_stack.setCurrentIndex(0)
        if self._policies:
            # currentRowChanged may already have fired for row 0 while the list filled: show it now.
            self.policy_list.setCurrentRow(0)
            self._show_policy(0)
        sched = s.get("scheduled")
        rows = [r for r in (sched if isinstance(sched, list) else []) if isinstance(r, dict)]
        self.schedule.setRowCount(len(rows))
        for i, r in enumerate(rows):
            for col, key in enumerate(("name", "cron", "min_size", "max_size", "desired")):
                v = r.get(key)
                self.schedule.setItem(i, col, QTableWidgetItem("" if v is None else str(v)))
        self._scheduled_extra = rows  # keeps fields the table has no column for

    def form_spec(self) -> dict[str, Any]:
        """The spec as the form shows it (raises ValueError on an unreadable cell)."""
        s = copy.deepcopy(self._spec)
        tmpl = s.get("template") if isinstance(s.get("template"), dict) else {}
        assert isinstance(tmpl, dict)
        tmpl.update(
            provider=self.provider.currentText().strip(),
            image=self.image.text().strip(),
            vcpus=self.vcpus.value(),
            memory_mib=self.memory.value(),
            hosts=[h.strip() for h in self.hosts.text().split(",") if h.strip()],
        )
        s["template"] = tmpl
        s.update(
            name=self.name_edit.text().strip(),
            min_size=self.min_size.value(),
            max_size=self.max_size.value(),
            desired=self.desired.value(),
            health_check_grace_s=self.grace.value(),
            default_warmup_s=self.warmup.value(),
            default_cooldown_s=self.cooldown.value(),
            drain_timeout_s=self.drain.value(),
            termination_policy=self.termination.currentText().strip(),
            policies=copy.deepcopy(self._policies),
        )
        scheduled: list[dict[str, Any]] = []
        for row in range(self.schedule.rowCount()):
            entry = copy.deepcopy(self._scheduled_extra[row]) if row < len(self._scheduled_extra) else {}
            entry["name"] = _cell_text(self.schedule, row, 0)
            entry["cron"] = _cell_text(self.schedule, row, 1)
            for col, key in ((2, "min_size"), (3, "max_size"), (4, "desired")):
                value = _cell_number(self.schedule, row, col)
                if value is None:
                    entry.pop(key, None)
                else:
                    entry[key] = value
            if entry["name"] or entry["cron"]:
                scheduled.append(entry)
        s["scheduled"] = scheduled
        return s

    def _tab_changed(self, index: int) -> None:
        json_tab = self.tabs.count() - 1
        if index == json_tab and self._tab != json_tab:
            try:
                self._spec = self.form_spec()
            except ValueError as exc:
                self.show_error(str(exc))
            self.json_edit.setPlainText(json.dumps(self._spec, indent=2))
        elif index != json_tab and self._tab == json_tab:
            try:
                spec = json.loads(self.json_edit.toPlainText())
                if not isinstance(spec, dict):
                    raise ValueError("the spec must be a JSON object { … }")  # noqa: TRY301, TRY004
            except ValueError as exc:
                self.show_error(f"The JSON is not valid: {exc}. Fix it, or it will not be saved.")
                self.tabs.blockSignals(True)
                self.tabs.setCurrentIndex(json_tab)
                self.tabs.blockSignals(False)
                return
            self._spec = spec
            self._load_form()
            self.show_error(None)
        self._tab = index

    # --- policies ------------------------------------------------------------------

    def add_policy(self, kind: str) -> None:
        """Append a new policy of ``kind`` with sensible defaults and select it."""
        n = len(self._policies) + 1
        if kind == "target_tracking":
            policy: dict[str, Any] = {
                "type": kind,
                "name": f"cpu-target-{n}",
                "metric": "cpu.percent",
                "target": 50.0,
            }
        else:
            policy = {
                "type": kind,
                "name": f"cpu-step-{n}",
                "metric": "cpu.percent",
                "alarm": {"threshold": 80.0, "comparison": ">", "duration_s": 180},
                "adjustment_type": "change_in_capacity",
                "steps": [
                    {"lower": 0, "upper": 10, "adjustment": 1},
                    {"lower": 10, "upper": None, "adjustment": 2},
                ],
            }
        self._policies.append(policy)
        self.policy_list.addItem(policy_summary(policy))
        self.policy_list.setCurrentRow(len(self._policies) - 1)

    def remove_policy(self) -> None:
        row = self.policy_list.currentRow()
        if 0 <= row < len(self._policies):
            del self._policies[row]
            self.policy_list.takeItem(row)
            if not self._policies:
                self.policy_stack.setCurrentIndex(0)

    def _show_policy(self, row: int) -> None:
        if not 0 <= row < len(self._policies):
            self.policy_stack.setCurrentIndex(0)
            return
        p = self._policies[row]
        page = self._policy_pages.get(str(p.get("type")))
        if page is None:
            self.policy_stack.setCurrentIndex(0)
            return
        self._loading = True
        try:
            if p.get("type") == "target_tracking":
                self.tt_name.setText(str(p.get("name") or ""))
                _set_combo(self.tt_metric, p.get("metric", "cpu.percent"))
                self.tt_target.setValue(as_float(p.get("target")) or 0.0)
            else:
                alarm = p.get("alarm") if isinstance(p.get("alarm"), dict) else {}
                assert isinstance(alarm, dict)
                self.st_name.setText(str(p.get("name") or ""))
                _set_combo(self.st_metric, p.get("metric", "cpu.percent"))
                _set_combo(self.st_comparison, alarm.get("comparison", ">"))
                self.st_threshold.setValue(as_float(alarm.get("threshold")) or 0.0)
                self.st_duration.setValue(_int(alarm.get("duration_s"), 0))
                _set_combo(self.st_adjustment, p.get("adjustment_type", "change_in_capacity"))
                steps = [x for x in p.get("steps") or [] if isinstance(x, dict)]
                self.st_steps.setRowCount(len(steps))
                for i, step in enumerate(steps):
                    for col, key in enumerate(("lower", "upper", "adjustment")):
                        v = step.get(key)
                        self.st_steps.setItem(i, col, QTableWidgetItem("" if v is None else number(v)))
            self.policy_stack.setCurrentWidget(page)
        finally:
            self._loading = False

    def _store_policy(self) -> None:
        row = self.policy_list.currentRow()
        if self._loading or not 0 <= row < len(self._policies):
            return
        p = self._policies[row]
        if p.get("type") == "target_tracking":
            p.update(
                name=self.tt_name.text().strip(),
                metric=self.tt_metric.currentText().strip(),
                target=self.tt_target.value(),
            )
        elif p.get("type") in STEP_TYPES:
            alarm = p.get("alarm") if isinstance(p.get("alarm"), dict) else {}
            assert isinstance(alarm, dict)
            alarm.update(
                comparison=self.st_comparison.currentText().strip(),
                threshold=self.st_threshold.value(),
                duration_s=self.st_duration.value(),
            )
            steps = []
            try:
                for r in range(self.st_steps.rowCount()):
                    steps.append(
                        {
                            "lower": _cell_number(self.st_steps, r, 0),
                            "upper": _cell_number(self.st_steps, r, 1),
                            "adjustment": _cell_number(self.st_steps, r, 2) or 0,
                        }
                    )
            except ValueError as exc:
                self.show_error(f"Policy {p.get('name')}: {exc}")
                return
            p.update(
                name=self.st_name.text().strip(),
                metric=self.st_metric.currentText().strip(),
                alarm=alarm,
                adjustment_type=self.st_adjustment.currentText().strip(),
                steps=steps,
            )
        item = self.policy_list.item(row)
        if item is not None:
            item.setText(policy_summary(p))

    # --- submit --------------------------------------------------------------------

    def spec(self) -> dict[str, Any]:
        """The spec to send: from the JSON tab when it is open, else from the form."""
        if self.tabs.currentIndex() == self.tabs.count() - 1:
            spec = json.loads(self.json_edit.toPlainText())
            if not isinstance(spec, dict):
                raise ValueError("the spec must be a JSON object { … }")
            return spec
        return self.form_spec()

    def submit(self) -> None:
        """Check what only the form can know, then ask the page to save."""
        try:
            spec = self.spec()
        except ValueError as exc:
            self.show_error(f"Cannot save: {exc}")
            return
        name = str(spec.get("name") or self.name_edit.text()).strip()
        if not name:
            self.show_error("Give the group a name (letters, digits, - and _).")
            self.tabs.setCurrentIndex(0)
            self.name_edit.setFocus()
            return
        spec["name"] = name
        self.show_error(None)
        self.save_button.setEnabled(False)
        self.save_button.setText("Saving…")
        self.save_requested.emit(name, spec)

    def show_error(self, text: str | None) -> None:
        """Show the server's (or the form's) complaint; the dialog stays open."""
        self.error_label.setVisible(bool(text))
        self.error_label.setText(f"⚠  {text}" if text else "")
        if text:
            self.save_button.setEnabled(True)
            self.save_button.setText("Save" if self.editing else "Create")
