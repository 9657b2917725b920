"""A page that polls the collector while it is visible, and small shared pieces.

:class:`PollingPage` owns one :class:`~cloudmon.ui.workers.RequestWorker`
(its own thread) and a ``QTimer``; the timer runs only while the page is
shown, so a hidden Groups or Balance tab costs nothing.  Replies come back
queued into the GUI thread and only the newest per key reaches
:meth:`PollingPage.on_reply`.  The lifecycle matches the node pages:
``start()``, ``stop_async()`` (no join), ``threads_alive()``, ``shutdown()``.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QColor, QHideEvent, QShowEvent
from PySide6.QtWidgets import (
    QAbstractItemView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from cloudmon.client import ApiClient
from cloudmon.ui.workers import Reply, RequestTracker, RequestWorker

#: Extra rules for the Groups and Balance pages (the app-wide sheet is in theme.py).
PAGE_STYLE = """
QWidget#groupsPage, QWidget#balancePage { background: #f6f7f9; }
QLabel#pageTitle { font-size: 14pt; font-weight: bold; color: #23272e; }
QLabel#sectionTitle { font-weight: bold; color: #3c4048; }
QLabel#pageError {
    background: #fdecea; color: #8a1c12; border: 1px solid #f5c2bd; border-radius: 4px; padding: 5px 9px;
}
QLabel#pageInfo { color: #5f6673; }
QLabel#emptyTitle { font-size: 18pt; color: #3c4048; }
QLabel#emptyHint { color: #5f6673; }
QLabel#dialogError {
    background: #fdecea; color: #8a1c12; border: 1px solid #f5c2bd; border-radius: 4px; padding: 6px 9px;
}
QLineEdit[readOnly="true"] { background: #f1f3f6; color: #5f6673; }
QFrame#card { background: #ffffff; border: 1px solid #dfe2e6; border-radius: 4px; }
QPushButton#primary { background: #1f5fbf; color: #ffffff; border: 1px solid #1a4f9f; border-radius: 4px;
    padding: 5px 14px; font-weight: bold; }
QPushButton#primary:disabled { background: #9db5dc; border-color: #9db5dc; }
QPushButton#danger { color: #b3261e; }
QPushButton#danger:disabled { color: #a0a4ab; }
"""


class PollingPage(QWidget):
    """Base for pages that poll the collector every ``interval_ms`` while visible."""

    def __init__(
        self, url: str, token: str | None, name: str, interval_ms: int, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        # Paint the page's own background from the style sheet (also when shown on its own).
        self.setAttribute(Qt.WidgetAttribute.WA_StyledBackground, True)
        self.url = url
        self._requests = RequestWorker(url, token, name=name)
        self._requests.replied.connect(self._on_reply, Qt.ConnectionType.QueuedConnection)
        self._tracker = RequestTracker()
        self._timer = QTimer(self)
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self.poll)
        self._started = False
        self._closed = False
        self.error_label = QLabel(self)
        self.error_label.setObjectName("pageError")
        self.error_label.setWordWrap(True)
        self.error_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.error_label.hide()
        self._error_source: str | None = None

    # --- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start the worker; polling runs from now on while the page is visible."""
        if self._started or self._closed:
            return
        self._started = True
        self._requests.start()
        if self.isVisible():
            self.poll()
            self._timer.start()

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        if self._started and not self._closed:
            self.poll()
            self._timer.start()

    def hideEvent(self, event: QHideEvent) -> None:
        super().hideEvent(event)
        self._timer.stop()

    def stop_async(self) -> None:
        """Ask the worker to stop without joining (the window joins later)."""
        self._timer.stop()
        self._requests.stop()

    def threads_alive(self) -> bool:
        """Whether the worker thread still runs."""
        return self._requests.is_alive()

    def shutdown(self) -> None:
        """Stop the timer and join the worker (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._timer.stop()
        self._requests.close()

    def is_polling(self) -> bool:
        """Whether the poll timer runs (it runs only while the page is shown)."""
        return self._timer.isActive()

    # --- requests ----------------------------------------------------------------

    def issue(self, key: str, fn: Callable[[ApiClient], Any]) -> int:
        """Queue ``fn(client)`` under ``key``; only its newest reply is delivered."""
        request_id = self._requests.submit(key, fn)
        self._tracker.issued(key, request_id)
        return request_id

    def _on_reply(self, reply: Reply) -> None:
        if self._closed or not self._tracker.is_current(reply):
            return
        self.on_reply(reply)

    def show_error(self, text: str, source: str) -> None:
        """Show ``text`` in the page's error strip; ``source`` is the request key it is about."""
        self._error_source = source
        self.error_label.setText(f"⚠  {text}")
        self.error_label.show()

    def clear_error(self, source: str | None = None) -> None:
        """Hide the error strip if it is about ``source`` (any error when None).

        A successful poll clears only a failed poll's error: the error of an
        action the operator took (delete, approve) stays until the next action.
        """
        if source is None or self._error_source == source:
            self._error_source = None
            self.error_label.hide()
            self.error_label.setText("")

    def poll(self) -> None:
        """Ask for the page's data (timer tick)."""
        raise NotImplementedError

    def on_reply(self, reply: Reply) -> None:
        """Handle the newest reply of a key (GUI thread)."""
        raise NotImplementedError


def empty_state(parent: QWidget, title: str, hint: str, button: QPushButton | None = None) -> QWidget:
    """A centred title, hint and optional button (what to do when there is nothing)."""
    box = QWidget(parent)
    box.setObjectName("emptyState")
    t = QLabel(title, box)
    t.setObjectName("emptyTitle")
    t.setAlignment(Qt.AlignmentFlag.AlignCenter)
    h = QLabel(hint, box)
    h.setObjectName("emptyHint")
    h.setAlignment(Qt.AlignmentFlag.AlignCenter)
    h.setWordWrap(True)
    h.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    lay = QVBoxLayout(box)
    lay.addStretch(2)
    lay.addWidget(t)
    lay.addWidget(h)
    if button is not None:
        button.setParent(box)
        lay.addSpacing(12)
        lay.addWidget(button, 0, Qt.AlignmentFlag.AlignHCenter)
    lay.addStretch(3)
    return box


def clock_time(ts: Any, now: float | None = None) -> str:
    """``"14:03:27"`` today, ``"Mar 04 14:03"`` before; ``"–"`` for no time."""
    if not isinstance(ts, (int, float)) or math.isnan(ts):
        return "–"
    now = time.time() if now is None else now
    lt, ln = time.localtime(ts), time.localtime(now)
    if (lt.tm_year, lt.tm_yday) == (ln.tm_year, ln.tm_yday):
        return time.strftime("%H:%M:%S", lt)
    return time.strftime("%b %d %H:%M", lt)


def number(value: Any) -> str:
    """A number for a table cell: ints plain, floats with up to 3 decimals."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value == int(value) and abs(value) < 1e15:
            return str(int(value))
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}".rstrip("0").rstrip(".")
        return f"{value:.3f}".rstrip("0").rstrip(".")
    return "–" if value is None else str(value)


def as_float(value: Any) -> float | None:
    """``value`` as a float when it is a number, else None (JSON can hold anything)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def make_table(
    parent: QWidget, headers: list[str], object_name: str, *, single: bool = False
) -> QTableWidget:
    """A read-only table in the pages' look: whole-row selection (one row with ``single``)."""
    t = QTableWidget(0, len(headers), parent)
    t.setObjectName(object_name)
    t.setHorizontalHeaderLabels(headers)
    t.verticalHeader().setVisible(False)
    t.verticalHeader().setDefaultSectionSize(26)
    t.setShowGrid(False)
    t.setAlternatingRowColors(True)
    t.setWordWrap(False)
    t.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    t.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    if single:
        t.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
    t.horizontalHeader().setHighlightSections(False)
    t.horizontalHeader().setDefaultAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)
    return t


def make_item(
    text: str,
    tooltip: str | None = None,
    colour: str | None = None,
    *,
    right: bool = False,
    bold: bool = False,
) -> QTableWidgetItem:
    """A table cell: optional tooltip, text colour, right alignment (numbers) and bold."""
    item = QTableWidgetItem(text)
    if tooltip:
        item.setToolTip(tooltip)
    if colour:
        item.setForeground(QColor(colour))
    if right:
        item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
    if bold:
        f = item.font()
        f.setBold(True)
        item.setFont(f)
    return item


def esc(value: object) -> str:
    """``value`` as text safe inside a rich-text label (names come from agents and operators)."""
    return html.escape(str(value), quote=False)
