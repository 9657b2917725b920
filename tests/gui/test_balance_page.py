"""The Balance page: settings, imbalance, plan bars and moves, buttons, progress, errors."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import numpy as np
import pytest
from PySide6.QtWidgets import QTableWidget, QTableWidgetItem
from pytestqt.qtbot import QtBot

from cloudmon.collector import CollectorThread
from cloudmon.ui.balance import BalancePage, bar_hosts
from cloudmon.ui.workers import Reply
from tests.gui import sample_data
from tests.gui.conftest import TOKEN

pytestmark = pytest.mark.gui

NOW = 1_700_000_000.0


@pytest.fixture
def page(qtbot: QtBot) -> Iterator[BalancePage]:
    """A page that is never started: data goes in through its apply_* slots only."""
    p = BalancePage("http://127.0.0.1:9", None, clock=lambda: NOW)
    qtbot.addWidget(p)
    p.resize(1280, 800)
    p.show()
    yield p
    p.shutdown()


def _at(table: QTableWidget, row: int, col: int) -> QTableWidgetItem:
    item = table.item(row, col)
    assert item is not None, f"no item at ({row}, {col})"
    return item


def _cells(table: QTableWidget, row: int) -> list[str]:
    return [_at(table, row, c).text() for c in range(table.columnCount())]


def _heights(item: object) -> list[float]:
    return [round(float(h), 1) for h in np.asarray(item.opts["height"])]  # type: ignore[attr-defined]


def test_plan_with_bars_moves_and_buttons(page: BalancePage) -> None:
    page.apply_balance(sample_data.balance_answer(NOW))
    # Settings from the collector.
    assert page.threshold.value() == 3
    assert page.threshold_label.text().startswith("3 · default")
    assert page.automation.currentData() == "manual"
    assert page.mode.currentData() == "balance"
    # An hour of imbalance, one point a minute.
    x, y = page.imbalance_curve.getData()
    assert x is not None
    assert y is not None
    assert len(x) == 61
    assert y[-1] == pytest.approx(0.284)
    assert "imbalance now <b>0.284</b>" in page.summary.text()
    # The plan: header, bars per host before/after, moves in order.
    title = page.plan_title.text()
    assert "Plan p-0042" in title
    assert "proposed" in title
    assert "0.284 → 0.112" in title
    assert page.plan_stack.currentIndex() == 1
    assert page.bars.hosts == list(sample_data.HOSTS)
    assert _heights(page.bars.before_item) == [91.0, 84.0, 35.0, 22.0, 58.0, 12.0]
    assert _heights(page.bars.after_item) == [63.0, 61.0, 52.0, 49.0, 58.0, 29.0]
    assert page.moves.rowCount() == 3
    assert _cells(page.moves, 0)[:3] == ["1", "db-replica-2", "node-01 → node-04"]
    assert _cells(page.moves, 0)[4:] == ["0.071", "42 s"]
    assert _cells(page.moves, 2)[3].startswith("required: spreads cache-1")
    assert "node-01: CPU 91 % → 63 %" in _at(page.moves, 0, 2).toolTip()
    assert "3 in 2 waves" in page.moves_title.text()
    assert page.approve_button.isEnabled()
    assert page.reject_button.isEnabled()

    page.set_bar_metric("mem")
    assert _heights(page.bars.before_item)[0] == pytest.approx(round((0.3 + 0.91 * 0.4) * 100, 1))


def test_planner_shaped_plan_with_unresolved_rules(page: BalancePage) -> None:
    """The planner's own shape (``hosts`` list, ``threshold``, ``unresolved``) reads the same."""
    plan = sample_data.plan()
    before, after = plan.pop("hosts_before"), plan.pop("hosts_after")
    plan["hosts"] = [
        {"host": h, "before": before[h], "after": after[h], "active": True, "vms_before": 3, "vms_after": 3}
        for h in sample_data.HOSTS
    ]
    plan.update(threshold=4, unresolved=["db-primary and db-replica-1 must not share a host"], notes=[])
    page.apply_plan(plan)
    assert _heights(page.bars.before_item) == [91.0, 84.0, 35.0, 22.0, 58.0, 12.0]
    assert page.plan_notes.isVisible()
    assert "Not fixed:</b> db-primary and db-replica-1 must not share a host" in page.plan_notes.text()
    page.apply_plan(dict(plan, moves=[], unresolved=[]))
    assert "No move improves it at threshold 4" in page.plan_empty.text()
    assert not page.plan_notes.isVisible()


def test_rejected_list_is_folded_away(page: BalancePage) -> None:
    page.apply_balance(sample_data.balance_answer(NOW))
    assert page.rejected_toggle.text() == "Considered and rejected (3)"
    assert page.rejected.isHidden()
    page.rejected_toggle.click()
    assert page.rejected.isVisible()
    assert _cells(page.rejected, 1) == [
        "web-7f3a",
        "node-06",
        "too small gain",
        "gain 0.004 below 0.02 at threshold 3",
    ]
    assert _cells(page.rejected, 2)[2] == "capacity"


def test_running_plan_disables_buttons_and_shows_progress(page: BalancePage) -> None:
    page.apply_balance(sample_data.balance_answer(NOW))
    assert page.execution_box.isHidden()
    page.apply_balance(sample_data.balance_answer(NOW, executing=True))
    assert not page.approve_button.isEnabled()
    assert not page.reject_button.isEnabled()
    assert page.execution_box.isVisible()
    assert (page.progress.value(), page.progress.maximum()) == (1, 3)
    assert page.progress.format() == "1 / 3 moves"
    assert "moving <b>web-91c2</b> node-02 → node-03 (64 %)" in page.execution_label.text()
    failed = sample_data.balance_answer(NOW, executing=True)
    failed["execution"].update(state="failed", current=None, message="web-91c2 is not running on node-03")
    page.apply_balance(failed)
    assert "Stopped: a move failed — web-91c2 is not running on node-03" in page.execution_label.text()


def test_names_from_agents_are_shown_as_text_not_markup(page: BalancePage) -> None:
    answer = sample_data.balance_answer(NOW, executing=True)
    answer["execution"]["current"]["vm"] = "<img src=x>web"
    answer["execution"]["message"] = "<b>bold</b> claim"
    page.apply_balance(answer)
    text = page.execution_label.text()
    assert "&lt;img src=x&gt;web" in text
    assert "&lt;b&gt;bold&lt;/b&gt; claim" in text
    assert "<img" not in text


def test_empty_states(page: BalancePage) -> None:
    page.apply_balance(sample_data.balance_answer(NOW, with_plan=False))
    assert page.plan_stack.currentIndex() == 0
    assert "No plan yet" in page.plan_empty.text()
    assert "Compute plan" in page.plan_empty.text()
    assert not page.approve_button.isEnabled()
    assert not page.reject_button.isEnabled()
    balanced = sample_data.balance_answer(NOW)
    balanced["settings"]["threshold"] = 2
    balanced["plan"].update(moves=[], rejected=[])
    page.apply_balance(balanced)
    assert "The cluster is balanced" in page.plan_empty.text()
    assert "No move improves it at threshold 2" in page.plan_empty.text()
    assert not page.approve_button.isEnabled()  # nothing to run
    assert not page.rejected_toggle.isEnabled()


def test_settings_the_operator_chose_survive_polls(page: BalancePage) -> None:
    page.apply_balance(sample_data.balance_answer(NOW))
    page.threshold.setValue(5)
    page.mode.setCurrentIndex(page.mode.findData("consolidate"))
    assert page.threshold_label.text().startswith("5 · aggressive")
    page.apply_balance(sample_data.balance_answer(NOW))  # the next poll still says 3 / balance
    assert page.threshold.value() == 5
    settings = page.current_settings()
    assert settings == {"threshold": 5, "automation": "manual", "mode": "consolidate"}
    # Once a plan is computed with them, polls drive the controls again.
    page.compute_plan()
    assert not page.compute_button.isEnabled()
    assert page.compute_button.text() == "Computing…"
    assert page._requests._pending["compute"] is not None
    compute_id = page._tracker._latest["compute"]
    page._on_reply(Reply(compute_id, "compute", value={"plan": sample_data.plan()}))
    assert page.compute_button.isEnabled()
    page.apply_balance(sample_data.balance_answer(NOW))
    assert page.threshold.value() == 3


def test_action_errors_show_in_the_page(page: BalancePage) -> None:
    page.apply_balance(sample_data.balance_answer(NOW))
    page.approve_plan()
    assert not page.approve_button.isEnabled()
    approve_id = page._tracker._latest["approve"]
    page._on_reply(Reply(approve_id, "approve", error="HTTP 409: plan p-0042 is stale: node-04 went down"))
    assert page.error_label.isVisible()
    assert "Could not approve the plan: HTTP 409" in page.error_label.text()
    assert page.approve_button.isEnabled()
    # The next successful poll does not hide what went wrong with the operator's action.
    page._tracker.issued("balance", 4)
    page._on_reply(Reply(4, "balance", value=sample_data.balance_answer(NOW)))
    assert page.error_label.isVisible()
    assert "HTTP 409" in page.error_label.text()
    page._tracker.issued("reject", 5)
    page._on_reply(Reply(5, "reject", value={"plan": sample_data.plan("rejected")}))
    assert not page.error_label.isVisible()
    assert "rejected" in page.plan_title.text()
    assert not page.approve_button.isEnabled()


def test_bar_hosts_keeps_those_that_change_most() -> None:
    before = {f"h{i:03d}": {"cpu": 0.5} for i in range(100)}
    after = {f"h{i:03d}": {"cpu": 0.5 + (0.3 if i % 10 == 0 else 0.0)} for i in range(100)}
    chosen = bar_hosts(before, after, "cpu", limit=12)
    assert len(chosen) == 12
    assert {f"h{i:03d}" for i in range(0, 100, 10)} <= set(chosen)
    assert chosen == sorted(chosen)
    assert bar_hosts({"a": {}}, {"b": {}}, "cpu") == ["a", "b"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_compute_against_an_unreachable_collector(qtbot: QtBot) -> None:
    """The real worker round trip: the button comes back and the page says why."""
    p = BalancePage(f"http://127.0.0.1:{_free_port()}", "t")
    qtbot.addWidget(p)
    p.show()
    p.start()
    try:
        p.compute_plan()
        qtbot.waitUntil(lambda: "Could not compute a plan" in p.error_label.text(), timeout=10_000)
        assert "cannot reach the collector" in p.error_label.text()
        assert p.compute_button.isEnabled()
    finally:
        p.shutdown()
    assert not p.threads_alive()


def test_balance_state_and_compute_against_the_real_collector(
    qtbot: QtBot, collector: CollectorThread
) -> None:
    """End to end through the worker: the state loads; computing with no hosts says why in the page."""
    p = BalancePage(collector.url, TOKEN)
    qtbot.addWidget(p)
    p.show()
    with qtbot.waitSignal(p.balance_applied, timeout=10_000):
        p.start()
    assert not p.error_label.isVisible()
    assert p.threshold.value() in range(1, 6)
    assert p.automation.currentData() in ("manual", "partial", "full")
    try:
        p.threshold.setValue(5)
        assert p.save_button.isEnabled()
        p.save_settings()
        qtbot.waitUntil(
            lambda: not p.save_button.isEnabled() and p.compute_button.isEnabled(), timeout=10_000
        )
        assert p.settings.get("threshold") == 5
        p.compute_plan()
        qtbot.waitUntil(lambda: p.compute_button.isEnabled(), timeout=10_000)
        # No agent reports VMs here: the collector refuses, and the page says why and how to fix it.
        assert p.error_label.isVisible()
        assert "Could not compute a plan: HTTP 400" in p.error_label.text()
        assert "no host reports VMs yet" in p.error_label.text()
        assert p.plan is None
    finally:
        p.shutdown()
    assert not p.threads_alive()
