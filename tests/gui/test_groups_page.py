"""The Groups page: what it shows for realistic answers, the dialog, errors, the window tab."""

from __future__ import annotations

import json
import random
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from PySide6.QtGui import QColor
from PySide6.QtWidgets import QMessageBox, QTableWidget, QTableWidgetItem
from pytestqt.qtbot import QtBot

from cloudmon.collector import CollectorThread
from cloudmon.ui.group_dialog import GroupDialog, policy_summary
from cloudmon.ui.groups import BADGE_ROLE, GroupsPage, kind_label, numbers_text
from cloudmon.ui.workers import Reply
from tests.gui import sample_data
from tests.gui.conftest import TOKEN, WindowFactory

pytestmark = pytest.mark.gui

NOW = 1_700_000_000.0


@pytest.fixture
def page(qtbot: QtBot) -> Iterator[GroupsPage]:
    """A page that is never started: data goes in through its apply_* slots only."""
    p = GroupsPage("http://127.0.0.1:9", None, clock=lambda: NOW)
    qtbot.addWidget(p)
    p.resize(1200, 700)
    p.show()
    yield p
    p.shutdown()


def _cells(table: QTableWidget, row: int) -> list[str]:
    return [_at(table, row, c).text() for c in range(table.columnCount())]


def _at(table: QTableWidget, row: int, col: int) -> QTableWidgetItem:
    item = table.item(row, col)
    assert item is not None, f"no item at ({row}, {col})"
    return item


def test_groups_list_instances_and_badge(page: GroupsPage) -> None:
    assert page.stack.currentWidget() is page.loading
    page.apply_groups(sample_data.groups_answer(NOW))
    assert page.stack.currentWidget() is page.content
    assert page.table.rowCount() == 2
    # Sorted by name; the first one is selected and its instances are shown.
    assert _cells(page.table, 0) == ["batch", "1  (0–3)", "1 / 1", "mem.percent 52 / 70", "mem-70"]
    assert _cells(page.table, 1) == ["web", "4  (2–8)", "2 / 4", "cpu.percent 71.4 / 60", "cpu-60, cpu-burst"]
    assert _at(page.table, 0, 0).data(BADGE_ROLE) is None
    assert _at(page.table, 1, 0).data(BADGE_ROLE) == "simulated"
    assert page.selected == "batch"
    assert page.instances.rowCount() == 1
    assert page.count_label.text() == "2 groups"
    assert page.edit_button.isEnabled()
    assert page.delete_button.isEnabled()

    page.select_group("web")
    assert page.selected == "web"
    assert page.instances.rowCount() == 4
    assert _cells(page.instances, 0) == ["web-7f3a", "● in service", "node-01", "2 h ago"]
    assert _cells(page.instances, 2)[1] == "● unhealthy"
    assert _at(page.instances, 2, 1).foreground().color() == QColor("#b3261e")
    assert _cells(page.instances, 3)[3] == "40 s ago"
    # Fewer in service than running, and the metric 19 % above target: both in red.
    assert _at(page.table, 1, 2).foreground().color() == QColor("#b3261e")
    assert _at(page.table, 1, 3).foreground().color() == QColor("#b3261e")

    # A poll keeps the selection even when the order of the answer changes.
    answer = sample_data.groups_answer(NOW)
    answer["groups"].reverse()
    page.apply_groups(answer)
    assert page.selected == "web"
    assert page.table.selectionModel().selectedRows()[0].row() == 1


def test_activity_newest_first_with_labels_and_numbers(page: GroupsPage) -> None:
    page.apply_groups(sample_data.groups_answer(NOW))
    page.select_group("web")
    answer = sample_data.activity_answer(NOW)
    random.Random(3).shuffle(answer["events"])  # the page orders them itself
    page.apply_activity(answer)
    assert page.activity.rowCount() == 6
    kinds = [_at(page.activity, r, 1).text() for r in range(6)]
    assert kinds == ["No action", "Launched", "Scale out", "Launch failed", "Replaced unhealthy", "Scale in"]
    scale_out = _cells(page.activity, 2)
    assert scale_out[2].startswith("Target tracking cpu-60: average CPU 78.2 %")
    assert scale_out[3] == "metric 78.2 · target 60 · desired 3 → 4"
    assert _at(page.activity, 3, 1).foreground().color() == QColor("#b3261e")  # launch_failed
    assert "6 events, newest first" in page.activity_title.text()
    assert "web" in page.activity_title.text()


def test_labels_and_numbers_helpers() -> None:
    assert kind_label("autoscale.scale_out") == "Scale out"
    assert kind_label("autoscale.cooldown_skipped") == "Cooldown skipped"
    assert numbers_text({"cpu": 71.234, "at_max": True}) == "cpu 71.23 · at_max yes"
    assert numbers_text(None) == ""


def test_empty_state_says_what_to_do(page: GroupsPage) -> None:
    page.apply_groups({"groups": []})
    assert page.stack.currentWidget() is page.empty
    assert page.empty_hint is not None
    assert "cloudmon apply FILE" in page.empty_hint.text()
    assert page.empty_title is not None
    assert page.empty_title.text() == "No groups yet"
    assert not page.edit_button.isEnabled()
    assert not page.delete_button.isEnabled()
    assert page.edit_group() is None


def test_bad_answers_and_errors_show_in_the_page(page: GroupsPage) -> None:
    page.apply_groups(
        {"groups": [1, "x", {"spec": {}}, {"name": "ok", "spec": "nonsense", "instances": "no"}]}
    )
    assert page.table.rowCount() == 1
    assert _cells(page.table, 0)[0] == "ok"
    page._tracker.issued("groups", 7)
    page._on_reply(Reply(7, "groups", error="HTTP 503: the store is unavailable"))
    assert page.error_label.isVisible()
    assert "Could not load the groups: HTTP 503" in page.error_label.text()
    page._tracker.issued("groups", 8)
    page._on_reply(Reply(8, "groups", value={"groups": []}))
    assert not page.error_label.isVisible()
    # A stale reply (an older request id) is ignored.
    page._on_reply(Reply(7, "groups", value=sample_data.groups_answer(NOW)))
    assert page.table.rowCount() == 0


def test_dialog_edits_the_spec_and_keeps_unknown_fields(qtbot: QtBot, page: GroupsPage) -> None:
    page.apply_groups(sample_data.groups_answer(NOW))
    page.select_group("web")
    dialog = page.edit_group()
    assert isinstance(dialog, GroupDialog)
    assert dialog.name_edit.text() == "web"
    assert dialog.name_edit.isReadOnly()
    assert (dialog.min_size.value(), dialog.desired.value(), dialog.max_size.value()) == (2, 4, 8)
    assert dialog.hosts.text() == "node-01, node-02, node-03"
    assert dialog.policy_list.count() == 2
    assert dialog.policy_stack.currentWidget() is dialog._policy_pages["target_tracking"]
    assert dialog.tt_target.value() == 60.0

    dialog.max_size.setValue(10)
    dialog.policy_list.setCurrentRow(1)
    assert dialog.st_threshold.value() == 85.0
    assert dialog.st_steps.rowCount() == 2
    dialog.st_threshold.setValue(90.0)
    dialog.add_policy("target_tracking")
    dialog.tt_target.setValue(45.0)
    spec = dialog.form_spec()
    assert spec["max_size"] == 10
    assert [p["name"] for p in spec["policies"]] == ["cpu-60", "cpu-burst", "cpu-target-3"]
    assert spec["policies"][0]["scale_in_enabled"] is True  # no control for it, still there
    assert spec["policies"][1]["alarm"] == {"threshold": 90.0, "comparison": ">", "duration_s": 180}
    assert spec["policies"][1]["steps"][1] == {"lower": 10, "upper": None, "adjustment": 3}
    assert spec["policies"][2]["target"] == 45.0
    assert spec["scheduled"] == [
        {"name": "night", "cron": "0 22 * * *", "min_size": 1, "max_size": 4, "desired": 2}
    ]
    assert "keep cpu.percent at 45" in policy_summary(spec["policies"][2])

    # The JSON tab shows the same spec; an edit there comes back into the form.
    dialog.tabs.setCurrentIndex(3)
    doc = json.loads(dialog.json_edit.toPlainText())
    assert doc["max_size"] == 10
    doc["min_size"] = 3
    doc["extra_field"] = "kept"
    dialog.json_edit.setPlainText(json.dumps(doc))
    dialog.tabs.setCurrentIndex(0)
    assert dialog.min_size.value() == 3
    assert dialog.form_spec()["extra_field"] == "kept"

    # Broken JSON keeps the JSON tab open and says why.
    dialog.tabs.setCurrentIndex(3)
    dialog.json_edit.setPlainText("{ nope")
    dialog.tabs.setCurrentIndex(1)
    assert dialog.tabs.currentIndex() == 3
    assert "The JSON is not valid" in dialog.error_label.text()
    dialog.json_edit.setPlainText(json.dumps(doc))
    dialog.tabs.setCurrentIndex(0)

    with qtbot.waitSignal(dialog.save_requested, timeout=1000) as blocker:
        dialog.submit()
    name, sent = blocker.args
    assert name == "web"
    assert sent["min_size"] == 3
    assert not dialog.save_button.isEnabled()
    # The server's validation error shows in the dialog, which stays open.
    page._tracker.issued("put", 11)
    page._on_reply(Reply(11, "put", error="HTTP 422: max_size (10) must be at least min_size (12)"))
    assert dialog.isVisible()
    assert dialog.error_label.isVisible()
    assert "must be at least min_size" in dialog.error_label.text()
    assert dialog.save_button.isEnabled()
    # Success closes it.
    page._tracker.issued("put", 12)
    page._on_reply(Reply(12, "put", value={"group": {"name": "web"}}))
    assert not dialog.isVisible()


def test_new_group_needs_a_name(qtbot: QtBot, page: GroupsPage) -> None:
    page.apply_groups({"groups": []})
    dialog = page.new_group()
    assert not dialog.name_edit.isReadOnly()
    assert dialog.save_button.text() == "Create"
    with qtbot.assertNotEmitted(dialog.save_requested):
        dialog.submit()
    assert "Give the group a name" in dialog.error_label.text()
    dialog.name_edit.setText("api")
    dialog.add_policy("step")
    with qtbot.waitSignal(dialog.save_requested, timeout=1000) as blocker:
        dialog.submit()
    name, spec = blocker.args
    assert name == "api"
    assert spec["template"]["provider"] == "simulated"
    assert spec["policies"][0]["type"] == "step"
    dialog.close()


def test_delete_asks_first_then_sends_force(qtbot: QtBot, page: GroupsPage) -> None:
    page.apply_groups(sample_data.groups_answer(NOW))
    page.select_group("web")
    box = page.confirm_delete()
    assert box is not None
    assert "web" in box.text()
    assert "4 instances" in box.informativeText()
    check = box.checkBox()
    assert check is not None
    assert not check.isChecked()
    check.setChecked(True)
    box.button(QMessageBox.StandardButton.Yes).click()
    # The page was never started: the request waits in its worker's queue. Run it on a recorder.
    queued = page._requests._pending["delete"]
    calls: list[tuple[str, bool]] = []

    class FakeClient:
        def delete_group(self, name: str, force: bool = False) -> dict[str, Any]:
            calls.append((name, force))
            return {"deleted": True}

    queued.fn(FakeClient())  # type: ignore[arg-type]
    assert calls == [("web", True)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_collector_shows_in_the_page(qtbot: QtBot) -> None:
    """The real worker round trip: the GUI keeps running and says what failed."""
    p = GroupsPage(f"http://127.0.0.1:{_free_port()}", "t")
    qtbot.addWidget(p)
    p.show()
    p.start()
    try:
        assert p.is_polling()
        qtbot.waitUntil(lambda: p.error_label.isVisible(), timeout=10_000)
        assert "Could not load the groups" in p.error_label.text()
        assert "cannot reach the collector" in p.error_label.text()
        p.hide()
        assert not p.is_polling()
    finally:
        p.shutdown()
    assert not p.threads_alive()


def test_window_opens_groups_and_balance_tabs(
    qtbot: QtBot, collector: CollectorThread, make_window: WindowFactory
) -> None:
    window = make_window(collector.url)
    assert window.groups_action.shortcut().toString() == "Ctrl+2"
    groups = window.open_groups()
    assert window.tabs.currentWidget() is groups
    assert window.tabs.tabText(window.tabs.indexOf(groups)) == "Groups"
    assert window.open_groups() is groups  # one page, not two
    balance = window.open_balance()
    assert window.tabs.indexOf(balance) == 2
    assert balance.is_polling()  # only the visible page polls
    assert not groups.is_polling()
    names = {t.name for t in threading.enumerate()}
    assert {"cloudmon-ui-groups", "cloudmon-ui-balance"} <= names
    window._close_tab(window.tabs.indexOf(groups))
    assert "groups" not in window.tool_pages
    qtbot.waitUntil(
        lambda: "cloudmon-ui-groups" not in {t.name for t in threading.enumerate()}, timeout=10_000
    )
    window.shutdown()
    assert not balance.threads_alive()


def test_group_created_in_the_dialog_appears_from_the_real_collector(
    qtbot: QtBot, collector: CollectorThread
) -> None:
    """End to end: dialog -> worker -> PUT on the real collector -> poll -> row and activity."""
    p = GroupsPage(collector.url, TOKEN)
    qtbot.addWidget(p)
    p.resize(1200, 700)
    p.show()
    p.start()
    try:
        qtbot.waitUntil(lambda: p.stack.currentWidget() is p.empty, timeout=10_000)
        assert not p.error_label.isVisible()
        dialog = p.new_group()
        dialog.name_edit.setText("web")
        dialog.min_size.setValue(3)
        dialog.max_size.setValue(2)  # the server refuses: max below min
        dialog.submit()
        qtbot.waitUntil(lambda: dialog.error_label.isVisible(), timeout=10_000)
        assert "max_size" in dialog.error_label.text()
        assert dialog.isVisible()
        dialog.min_size.setValue(0)
        dialog.desired.setValue(0)
        dialog.add_policy("target_tracking")
        with qtbot.waitSignal(dialog.finished, timeout=10_000):
            dialog.submit()
        qtbot.waitUntil(lambda: p.group("web") is not None, timeout=10_000)
        assert p.stack.currentWidget() is p.content
        assert p.selected == "web"
        assert _cells(p.table, 0)[:3] == ["web", "0  (0–2)", "0 / 0"]
        assert _at(p.table, 0, 0).data(BADGE_ROLE) == "simulated"
        assert [q["type"] for q in (p.group("web") or {})["spec"]["policies"]] == ["target_tracking"]
        # The collector recorded the save; the activity history shows it.
        qtbot.waitUntil(
            lambda: any(_cells(p.activity, r)[1] == "Group saved" for r in range(p.activity.rowCount())),
            timeout=10_000,
        )
        # Deleting goes through the same worker; the empty state comes back.
        p.delete_group("web")
        qtbot.waitUntil(lambda: p.stack.currentWidget() is p.empty, timeout=15_000)
        assert not p.error_label.isVisible()
    finally:
        p.shutdown()
    assert not p.threads_alive()
