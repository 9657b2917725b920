"""The Groups page: auto-scaling groups, their instances and their activity history.

Data comes from ``GET /groups`` (every 2.5 s while the page is shown) and
``GET /groups/{name}/activity`` for the selected group; both go through the
page's own request worker, so the GUI thread never waits.  Create and edit go
through :class:`~cloudmon.ui.group_dialog.GroupDialog` and ``PUT``; the server
validates, and its error text is shown inside the dialog, which stays open.
Delete asks first (with a *force* box for groups that still run instances).

The ``apply_*`` slots take the collector's JSON documents as they come; the
tests feed them directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QModelIndex, QPersistentModelIndex, QRect, Qt, Signal
from PySide6.QtGui import QColor, QFont, QPainter
from PySide6.QtWidgets import (
    QCheckBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QMessageBox,
    QPushButton,
    QSplitter,
    QStackedWidget,
    QStyledItemDelegate,
    QStyleOptionViewItem,
    QVBoxLayout,
    QWidget,
)

from cloudmon.ui import format as fmt
from cloudmon.ui.group_dialog import GroupDialog
from cloudmon.ui.polling import (
    PAGE_STYLE,
    PollingPage,
    as_float,
    clock_time,
    empty_state,
    esc,
    make_item,
    make_table,
    number,
)
from cloudmon.ui.workers import Reply

logger = logging.getLogger(__name__)

GROUPS_POLL_MS = 2500
ACTIVITY_LIMIT = 100
#: Item role holding the badge text drawn after a group's name ("simulated").
BADGE_ROLE = Qt.ItemDataRole.UserRole + 10
#: Item role holding a row's group name.
NAME_ROLE = Qt.ItemDataRole.UserRole + 11

KIND_LABELS: dict[str, str] = {
    "scale_out": "Scale out",
    "scale_in": "Scale in",
    "no_action": "No action",
    "launch": "Launched",
    "launch_failed": "Launch failed",
    "terminate": "Terminated",
    "terminate_failed": "Terminate failed",
    "replace_unhealthy": "Replaced unhealthy",
    "scheduled": "Scheduled action",
    "drain": "Draining",
    "drain_timeout": "Drain timed out",
    "in_service": "In service",
    "capacity_set": "Capacity set",
    "group_put": "Group saved",
    "group_deleting": "Deleting group",
    "group_deleted": "Group deleted",
    "error": "Error",
}

_GOOD, _BAD, _QUIET, _INFO, _WARN = "#1e7a3c", "#b3261e", "#80858f", "#1f5fbf", "#8a5a00"
KIND_COLOURS: dict[str, str] = {
    "scale_out": _INFO,
    "scale_in": _INFO,
    "no_action": _QUIET,
    "launch": _GOOD,
    "in_service": _GOOD,
    "terminate": _WARN,
    "drain": _WARN,
    "replace_unhealthy": _WARN,
    "scheduled": _INFO,
}
STATE_COLOURS: dict[str, str] = {
    "in_service": "#1e7a3c",
    "pending": "#8a5a00",
    "unhealthy": "#b3261e",
    "draining": "#a85d00",
    "terminating": "#80858f",
}


def kind_label(kind: str) -> str:
    """``"autoscale.scale_out"`` -> ``"Scale out"``; unknown kinds read sensibly too."""
    short = kind.rpartition(".")[2]
    return KIND_LABELS.get(short) or short.replace("_", " ").capitalize() or kind


def kind_colour(kind: str) -> str:
    short = kind.rpartition(".")[2]
    if short.endswith(("failed", "error", "timeout")):
        return _BAD
    return KIND_COLOURS.get(short, "#3c4048")


def numbers_text(numbers: Any) -> str:
    """``{"metric": 71.23, "desired_before": 3, "desired_after": 4}`` -> ``"metric 71.23 · desired 3 → 4"``."""
    if not isinstance(numbers, dict):
        return ""
    parts: list[str] = []
    for k, v in numbers.items():
        key = str(k)
        if key.endswith("_after") and f"{key[:-6]}_before" in numbers:
            continue  # shown with its _before
        if key.endswith("_before") and f"{key[:-7]}_after" in numbers:
            parts.append(f"{key[:-7]} {number(v)} → {number(numbers[key[:-7] + '_after'])}")
        else:
            parts.append(f"{key} {number(v)}")
    return " · ".join(parts)


def metric_text(metric: Any) -> str:
    """``{"name": "cpu", "value": 71.2, "target": 50}`` -> ``"cpu 71.2 / 50"``."""
    if not isinstance(metric, dict):
        return "–"
    value, target = as_float(metric.get("value")), as_float(metric.get("target"))
    name = str(metric.get("name") or "metric")
    shown = number(value) if value is not None else "–"
    return f"{name} {shown} / {number(target)}" if target is not None else f"{name} {shown}"


def _spec(group: dict[str, Any]) -> dict[str, Any]:
    spec = group.get("spec")
    return spec if isinstance(spec, dict) else {}


def _instances(group: dict[str, Any]) -> list[dict[str, Any]]:
    found = group.get("instances")
    return [i for i in found if isinstance(i, dict)] if isinstance(found, list) else []


class BadgeDelegate(QStyledItemDelegate):
    """Paints the cell as usual, then a small rounded badge at its right end."""

    def paint(
        self, painter: QPainter, option: QStyleOptionViewItem, index: QModelIndex | QPersistentModelIndex
    ) -> None:
        super().paint(painter, option, index)
        badge = index.data(BADGE_ROLE)
        if not badge:
            return
        painter.save()
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        font = QFont(option.font)
        font.setPointSizeF(max(6.0, font.pointSizeF() * 0.8))
        font.setBold(True)
        painter.setFont(font)
        rect: QRect = option.rect
        width = painter.fontMetrics().horizontalAdvance(str(badge)) + 12
        height = min(rect.height() - 6, painter.fontMetrics().height() + 4)
        pill = QRect(rect.right() - width - 6, rect.center().y() - height // 2, width, height)
        painter.setPen(QColor("#e0b64c"))
        painter.setBrush(QColor("#fff4d6"))
        painter.drawRoundedRect(pill, height / 2, height / 2)
        painter.setPen(QColor("#6b4a00"))
        painter.drawText(pill, Qt.AlignmentFlag.AlignCenter, str(badge))
        painter.restore()


class GroupsPage(PollingPage):
    """Groups list, the selected group's instances and activity, create/edit/delete."""

    #: Emitted after each applied ``GET /groups`` answer (tests wait on it).
    groups_applied = Signal()
    #: Emitted after each applied activity answer.
    activity_applied = Signal()

    def __init__(
        self,
        url: str,
        token: str | None,
        parent: QWidget | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(url, token, "groups", GROUPS_POLL_MS, parent)
        self.setObjectName("groupsPage")
        self.setStyleSheet(PAGE_STYLE)
        self._clock = clock
        self.groups: list[dict[str, Any]] = []
        self.selected: str | None = None
        self.events: list[dict[str, Any]] = []
        self.dialog: GroupDialog | None = None
        self.delete_box: QMessageBox | None = None
        self._loaded = False

        title = QLabel("Auto-scaling groups", self)
        title.setObjectName("pageTitle")
        self.count_label = QLabel(self)
        self.count_label.setObjectName("pageInfo")
        self.new_button = QPushButton("New group…", self)
        self.new_button.setObjectName("primary")
        self.new_button.clicked.connect(self.new_group)
        self.edit_button = QPushButton("Edit…", self)
        self.edit_button.clicked.connect(self.edit_group)
        self.delete_button = QPushButton("Delete…", self)
        self.delete_button.setObjectName("danger")
        self.delete_button.clicked.connect(self.confirm_delete)
        head = QHBoxLayout()
        head.addWidget(title)
        head.addSpacing(10)
        head.addWidget(self.count_label)
        head.addStretch(1)
        head.addWidget(self.new_button)
        head.addWidget(self.edit_button)
        head.addWidget(self.delete_button)

        self.table = make_table(
            self,
            ["Group", "Capacity", "In service", "Metric / target", "Policies"],
            "groupTable",
            single=True,
        )
        self.table.setItemDelegateForColumn(0, BadgeDelegate(self.table))
        gh = self.table.horizontalHeader()
        gh.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for col, width in ((1, 150), (2, 90), (3, 140), (4, 170)):
            self.table.setColumnWidth(col, width)
        self.table.itemSelectionChanged.connect(self._selection_changed)
        self.table.doubleClicked.connect(lambda _i: self.edit_group())

        self.instances_title = QLabel("Instances", self)
        self.instances_title.setObjectName("sectionTitle")
        self.instances = make_table(
            self, ["Instance", "State", "Host", "Launched"], "instanceTable", single=True
        )
        ih = self.instances.horizontalHeader()
        ih.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for col, width in ((1, 110), (2, 120), (3, 90)):
            self.instances.setColumnWidth(col, width)

        self.activity_title = QLabel("Activity history", self)
        self.activity_title.setObjectName("sectionTitle")
        self.activity = make_table(self, ["Time", "Event", "Reason", "Numbers"], "activityTable", single=True)
        ah = self.activity.horizontalHeader()
        ah.setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)
        for col, width in ((0, 84), (1, 150), (3, 300)):
            self.activity.setColumnWidth(col, width)

        top = QSplitter(Qt.Orientation.Horizontal, self)
        top.addWidget(self.table)
        right = QWidget(top)
        rl = QVBoxLayout(right)
        rl.setContentsMargins(0, 0, 0, 0)
        rl.setSpacing(4)
        rl.addWidget(self.instances_title)
        rl.addWidget(self.instances, 1)
        top.addWidget(right)
        top.setStretchFactor(0, 3)
        top.setStretchFactor(1, 2)
        bottom = QWidget(self)
        bl = QVBoxLayout(bottom)
        bl.setContentsMargins(0, 0, 0, 0)
        bl.setSpacing(4)
        bl.addWidget(self.activity_title)
        bl.addWidget(self.activity, 1)
        self.content = QSplitter(Qt.Orientation.Vertical, self)
        self.content.addWidget(top)
        self.content.addWidget(bottom)
        self.content.setStretchFactor(0, 1)
        self.content.setStretchFactor(1, 1)

        empty_new = QPushButton("New group…")
        empty_new.clicked.connect(self.new_group)
        self.empty = empty_state(
            self,
            "No groups yet",
            "Create one here with <b>New group…</b>, or describe it in a file and run "
            "<code>cloudmon apply FILE</code>.<br>A group keeps its instances between min and max "
            "and follows its policies.",
            empty_new,
        )
        self.empty_title = self.empty.findChild(QLabel, "emptyTitle")
        self.empty_hint = self.empty.findChild(QLabel, "emptyHint")
        self.loading = empty_state(
            self, "Loading groups…", "Asking the collector for its auto-scaling groups."
        )
        self.stack = QStackedWidget(self)
        self.stack.addWidget(self.loading)
        self.stack.addWidget(self.empty)
        self.stack.addWidget(self.content)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(12, 10, 12, 8)
        layout.setSpacing(8)
        layout.addLayout(head)
        layout.addWidget(self.error_label)
        layout.addWidget(self.stack, 1)
        self._update_buttons()

    # --- polling -------------------------------------------------------------------

    def poll(self) -> None:
        self.issue("groups", lambda c: c.groups())
        self._poll_activity()

    def _poll_activity(self) -> None:
        name = self.selected
        if name is not None and self._started:
            self.issue("activity", lambda c: c.group_activity(name, ACTIVITY_LIMIT))

    def on_reply(self, reply: Reply) -> None:
        if reply.key == "put":
            self._on_put_reply(reply)
            return
        if reply.key == "delete":
            if reply.error:
                self.show_error(f"Could not delete the group: {reply.error}", "delete")
            else:
                self.clear_error()
                self.poll()
            return
        if reply.error:
            what = "the groups" if reply.key == "groups" else "the activity history"
            self.show_error(f"Could not load {what}: {reply.error}", reply.key)
            return
        try:
            if reply.key == "groups":
                self.apply_groups(reply.value)
                self.clear_error("groups")
            elif reply.key == "activity":
                self.apply_activity(reply.value)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            logger.warning("unexpected %s answer: %s", reply.key, exc)
            self.show_error(f"Unexpected answer from the collector for {reply.key}: {exc}", reply.key)

    # --- data in -------------------------------------------------------------------

    def apply_groups(self, data: dict[str, Any]) -> None:
        """Show a ``GET /groups`` answer: ``{"groups": [...]}``."""
        groups = [g for g in data.get("groups") or [] if isinstance(g, dict) and g.get("name")]
        groups.sort(key=lambda g: str(g["name"]).casefold())
        self._loaded = True
        self.groups = groups
        names = [str(g["name"]) for g in groups]
        if self.selected not in names:
            self.selected = names[0] if names else None
            self.events = []
            self._tracker.forget("activity")
            self.activity.setRowCount(0)
            self._poll_activity()
        self.table.blockSignals(True)
        try:
            self.table.setRowCount(len(groups))
            for row, g in enumerate(groups):
                self._fill_group_row(row, g)
            if self.selected is not None:
                self.table.selectRow(names.index(self.selected))
        finally:
            self.table.blockSignals(False)
        self._fill_instances()
        self.stack.setCurrentWidget(self.content if groups else self.empty)
        n = len(groups)
        self.count_label.setText(f"{n} group{'s' if n != 1 else ''}" if n else "")
        self._update_buttons()
        self.groups_applied.emit()

    def _fill_group_row(self, row: int, g: dict[str, Any]) -> None:
        spec = _spec(g)
        name = str(g["name"])
        insts = _instances(g)
        in_service = sum(1 for i in insts if i.get("state") == "in_service")
        desired = g.get("desired", spec.get("desired"))
        cap = f"{number(desired)}  ({number(spec.get('min_size'))}–{number(spec.get('max_size'))})"
        metric = g.get("metric")
        policies = [p for p in spec.get("policies") or [] if isinstance(p, dict)]
        policy_text = ", ".join(str(p.get("name") or p.get("type") or "?") for p in policies) or "none"
        name_item = make_item(name, bold=True)
        name_item.setData(NAME_ROLE, name)
        if g.get("simulated"):
            name_item.setData(BADGE_ROLE, "simulated")
            name_item.setToolTip(f"{name}: a simulation (simulated provider; no real machines)")
        colour = None
        value = as_float(metric.get("value")) if isinstance(metric, dict) else None
        target = as_float(metric.get("target")) if isinstance(metric, dict) else None
        if value is not None and target:
            # Off by more than 10 % from the target: the policy has work to do.
            colour = "#b3261e" if value > target * 1.1 else _INFO if value < target * 0.9 else "#1e7a3c"
        cells = [
            name_item,
            make_item(cap, "desired capacity (min–max)"),
            make_item(
                f"{in_service} / {len(insts)}",
                "instances in service / all instances",
                colour="#b3261e" if insts and in_service < len(insts) else None,
            ),
            make_item(metric_text(metric), "the policy's metric now / its target", colour=colour),
            make_item(policy_text, "\n".join(f"{p.get('type')}: {p.get('name')}" for p in policies)),
        ]
        for col, item in enumerate(cells):
            self.table.setItem(row, col, item)

    def _fill_instances(self) -> None:
        group = self.group(self.selected) if self.selected else None
        insts = _instances(group) if group else []
        now = self._clock()
        self.instances.setRowCount(len(insts))
        for row, inst in enumerate(insts):
            state = str(inst.get("state") or "?")
            launched = as_float(inst.get("launched_at"))
            node = inst.get("node_id")
            cells = [
                make_item(str(inst.get("id") or "?"), f"node: {node}" if node else "no agent reports yet"),
                make_item(f"● {state.replace('_', ' ')}", colour=STATE_COLOURS.get(state)),
                make_item(str(inst.get("host") or "–")),
                make_item(
                    fmt.ago(now - launched) if launched is not None else "–", clock_time(launched, now)
                ),
            ]
            for col, item in enumerate(cells):
                self.instances.setItem(row, col, item)
        if group is None:
            self.instances_title.setText("Instances")
        else:
            spec = _spec(group)
            tmpl = spec.get("template") if isinstance(spec.get("template"), dict) else {}
            assert isinstance(tmpl, dict)
            what = f"{tmpl.get('provider', '?')} · {tmpl.get('vcpus', '?')} vCPU · {tmpl.get('memory_mib', '?')} MiB"
            self.instances_title.setText(
                f"Instances of <b>{esc(self.selected)}</b>  <span style='color:#5f6673'>({esc(what)})</span>"
            )

    def apply_activity(self, data: dict[str, Any]) -> None:
        """Show a ``GET /groups/{name}/activity`` answer: ``{"events": [...]}``, newest first."""
        events = [e for e in data.get("events") or [] if isinstance(e, dict)]
        # The contract says newest first; sort anyway so a server change cannot scramble it.
        events.sort(key=lambda e: as_float(e.get("ts")) or 0.0, reverse=True)
        self.events = events
        now = self._clock()
        self.activity.setRowCount(len(events))
        for row, ev in enumerate(events):
            kind = str(ev.get("kind") or "")
            reason = str(ev.get("reason") or "")
            nums = numbers_text(ev.get("numbers"))
            ts = as_float(ev.get("ts"))
            cells = [
                make_item(
                    clock_time(ts, now),
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else None,
                ),
                make_item(kind_label(kind), kind, colour=kind_colour(kind), bold=kind_colour(kind) == _BAD),
                make_item(reason, reason),
                make_item(nums, nums.replace(" · ", "\n")),
            ]
            for col, item in enumerate(cells):
                self.activity.setItem(row, col, item)
        n = len(events)
        self.activity_title.setText(
            f"Activity history of <b>{esc(self.selected)}</b>  <span style='color:#5f6673'>"
            f"({n} event{'s' if n != 1 else ''}, newest first)</span>"
            if self.selected
            else "Activity history"
        )
        self.activity_applied.emit()

    # --- selection -----------------------------------------------------------------

    def group(self, name: str | None) -> dict[str, Any] | None:
        """The last received group called ``name``."""
        return next((g for g in self.groups if g.get("name") == name), None)

    def select_group(self, name: str) -> None:
        """Select ``name`` in the list (and load its activity)."""
        for row in range(self.table.rowCount()):
            item = self.table.item(row, 0)
            if item is not None and item.data(NAME_ROLE) == name:
                self.table.selectRow(row)
                return

    def _selection_changed(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return
        item = self.table.item(rows[0].row(), 0)
        name = item.data(NAME_ROLE) if item is not None else None
        if not name or name == self.selected:
            return
        self.selected = str(name)
        self.events = []
        self.activity.setRowCount(0)
        self.activity_title.setText(f"Activity history of <b>{esc(self.selected)}</b>  (loading…)")
        self._fill_instances()
        self._update_buttons()
        self._poll_activity()

    def _update_buttons(self) -> None:
        has = self.selected is not None and self.group(self.selected) is not None
        self.edit_button.setEnabled(has)
        self.delete_button.setEnabled(has)

    # --- create / edit / delete ------------------------------------------------------

    def new_group(self) -> GroupDialog:
        """Open the dialog for a new group."""
        return self._open_dialog(None)

    def edit_group(self) -> GroupDialog | None:
        """Open the dialog on the selected group."""
        group = self.group(self.selected)
        if group is None:
            return None
        return self._open_dialog(group)

    def _open_dialog(self, group: dict[str, Any] | None) -> GroupDialog:
        if self.dialog is not None:
            self.dialog.close()
        dialog = GroupDialog(group, self)
        dialog.save_requested.connect(self._save)
        dialog.finished.connect(lambda _r, d=dialog: self._dialog_done(d))
        self.dialog = dialog
        dialog.open()
        return dialog

    def _dialog_done(self, dialog: GroupDialog) -> None:
        if self.dialog is dialog:
            self.dialog = None
            self._tracker.forget("put")
        dialog.deleteLater()

    def _save(self, name: str, spec: dict[str, Any]) -> None:
        self.issue("put", lambda c: c.put_group(name, spec))

    def _on_put_reply(self, reply: Reply) -> None:
        dialog = self.dialog
        if dialog is None:
            return
        if reply.error:
            dialog.show_error(reply.error)
            return
        group = reply.value.get("group") if isinstance(reply.value, dict) else None
        dialog.accept()
        if isinstance(group, dict) and group.get("name"):
            self.selected = str(group["name"])
        self.poll()

    def confirm_delete(self) -> QMessageBox | None:
        """Ask before deleting the selected group (non-modal; answers arrive by signal)."""
        group = self.group(self.selected)
        if group is None:
            return None
        name = str(group["name"])
        n = len(_instances(group))
        box = QMessageBox(self)
        box.setIcon(QMessageBox.Icon.Warning)
        box.setWindowTitle("Delete group")
        box.setText(f"Delete the group <b>{esc(name)}</b>?")
        box.setInformativeText(
            f"It has {n} instance{'s' if n != 1 else ''}. Without <i>force</i>, the collector refuses to delete "
            "a group that still has instances: set its max size to 0 first and let it scale in."
            if n
            else "It has no instances. Its policies and history go with it."
        )
        force = QCheckBox("Force: terminate its instances and delete it now", box)
        force.setChecked(False)
        box.setCheckBox(force)
        box.setStandardButtons(QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.Cancel)
        box.setDefaultButton(QMessageBox.StandardButton.Cancel)
        box.button(QMessageBox.StandardButton.Yes).setText("Delete")

        def done(result: int) -> None:
            if result == QMessageBox.StandardButton.Yes:
                self.delete_group(name, force.isChecked())
            self.delete_box = None
            box.deleteLater()

        box.finished.connect(done)
        self.delete_box = box
        box.open()
        return box

    def delete_group(self, name: str, force: bool = False) -> None:
        """Send ``DELETE /groups/{name}`` (no question asked)."""
        self.issue("delete", lambda c: c.delete_group(name, force))
