"""The main window: overview tab, one tab per opened node, toolbar, status bar.

The window owns the overview's stream worker (``nodes`` events every second)
and a request worker for ``/status`` (loopback, degraded) polled every few
seconds.  Node pages own their own workers.  :meth:`MainWindow.shutdown`
stops every timer and joins every thread; it runs from ``closeEvent`` and
again (idempotently) from :func:`cloudmon.ui.app.run_console`.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QAction, QCloseEvent, QKeySequence
from PySide6.QtWidgets import (
    QLabel,
    QMainWindow,
    QTabBar,
    QTabWidget,
    QToolBar,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from cloudmon.client import NodesResponse
from cloudmon.ui.add_node import AddNodeDialog
from cloudmon.ui.overview import OverviewPage
from cloudmon.ui.workers import Reply, RequestTracker, RequestWorker, StreamState, StreamWorker

if TYPE_CHECKING:
    from cloudmon.ui.balance import BalancePage
    from cloudmon.ui.groups import GroupsPage
    from cloudmon.ui.nodepage import NodePage
    from cloudmon.ui.polling import PollingPage

logger = logging.getLogger(__name__)

STATUS_POLL_MS = 5000
#: While the overview is still empty, also ask ``/nodes`` this often: the
#: stream's snapshots come once a second, and the first row should not wait
#: for the next one (start-up time).  Only for the first seconds after start.
EMPTY_POLL_MS = 200
EMPTY_POLL_FOR_S = 15.0


class MainWindow(QMainWindow):
    """cloudmon's console window for one collector."""

    #: Emitted once, when the overview first shows at least one node row.
    first_overview_drawn = Signal()
    #: Emitted with every applied ``nodes`` snapshot (tests wait on it).
    nodes_updated = Signal(object)
    #: Emitted with every collector connection change (``StreamState``).
    connection_changed = Signal(object)
    #: Emitted when the window has been closed (and its workers stopped).
    closed = Signal()

    def __init__(self, url: str, token: str | None, *, embedded: bool, simulated: bool = False) -> None:
        super().__init__()
        self.url = url
        self.token = token
        self.embedded = embedded
        self.simulated = simulated
        self.setWindowTitle("cloudmon — demo: simulated cluster" if simulated else "cloudmon")
        self.setObjectName("mainWindow")
        self.status: dict[str, Any] | None = None
        self.connected: bool | None = None
        self.pages: dict[str, NodePage] = {}
        self._closing_pages: list[NodePage] = []
        #: The Groups and Balance pages, by key, while their tabs are open.
        self.tool_pages: dict[str, PollingPage] = {}
        self._closing_tools: list[PollingPage] = []
        self._skew = 0.0
        self._last_snapshot = 0.0
        self._started_at = 0.0
        self._shut = False

        self.overview = OverviewPage(self)
        self.overview.open_requested.connect(self.open_node)
        self.overview.add_node_requested.connect(self.show_add_node)
        self.overview.first_rows_shown.connect(self.first_overview_drawn)

        self.tabs = QTabWidget(self)
        self.tabs.setObjectName("pages")
        self.tabs.setDocumentMode(True)
        self.tabs.setMovable(True)
        self.tabs.addTab(self.overview, "Overview")
        # Tabs appear once a node page is open; until then the overview is all there is.
        self.tabs.setTabBarAutoHide(True)

        self.banner = QLabel(self)
        self.banner.setObjectName("banner")
        self.banner.setWordWrap(True)
        self.banner.hide()

        central = QWidget(self)
        box = QVBoxLayout(central)
        box.setContentsMargins(0, 0, 0, 0)
        box.setSpacing(0)
        if simulated:
            # Always visible: nobody should mistake the demo's hosts for real ones.
            ribbon = QLabel(
                "SIMULATION · cloudmon demo: simulated hosts, VMs and auto-scaling group, speaking the real "
                "protocol to a real embedded collector. Nothing real is touched.",
                self,
            )
            ribbon.setObjectName("simulationRibbon")
            ribbon.setWordWrap(True)
            box.addWidget(ribbon)
        box.addWidget(self.banner)
        box.addWidget(self.tabs, 1)
        self.setCentralWidget(central)

        self._build_toolbar()
        self._build_status_bar()

        self._stream = StreamWorker(url, token)
        self._stream.nodes.connect(self._on_nodes, Qt.ConnectionType.QueuedConnection)
        self._stream.state.connect(self._on_stream_state, Qt.ConnectionType.QueuedConnection)
        self._requests = RequestWorker(url, token, name="status", timeout=5.0)
        self._requests.replied.connect(self._on_reply, Qt.ConnectionType.QueuedConnection)
        self._tracker = RequestTracker()
        self._status_timer = QTimer(self)
        self._status_timer.setInterval(STATUS_POLL_MS)
        self._status_timer.timeout.connect(self.poll_status)
        self._empty_timer = QTimer(self)
        self._empty_timer.setInterval(EMPTY_POLL_MS)
        self._empty_timer.timeout.connect(self._poll_while_empty)
        self._reap_timer = QTimer(self)
        self._reap_timer.setInterval(200)
        self._reap_timer.timeout.connect(self._reap_pages)

    # --- construction ----------------------------------------------------------

    def _build_toolbar(self) -> None:
        tb = QToolBar("Main", self)
        tb.setObjectName("mainToolbar")
        tb.setMovable(False)
        tb.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextOnly)
        self.overview_action = QAction("Overview", self)
        self.overview_action.setShortcut(QKeySequence("Ctrl+1"))
        self.overview_action.setToolTip("Show every node (Ctrl+1)")
        self.overview_action.triggered.connect(lambda: self.tabs.setCurrentWidget(self.overview))
        self.add_node_action = QAction("Add node…", self)
        # QToolButton drops a trailing ellipsis from the action text; keep it (a dialog follows).
        self.add_node_action.setIconText("Add node…")
        self.add_node_action.setToolTip("How to connect a machine to this collector")
        self.add_node_action.triggered.connect(self.show_add_node)
        self.groups_action = QAction("Groups", self)
        self.groups_action.setShortcut(QKeySequence("Ctrl+2"))
        self.groups_action.setToolTip("Auto-scaling groups: instances, activity, create and edit (Ctrl+2)")
        self.groups_action.triggered.connect(self.open_groups)
        self.balance_action = QAction("Balance", self)
        self.balance_action.setShortcut(QKeySequence("Ctrl+3"))
        self.balance_action.setToolTip("Rebalancing: imbalance, plans, approval and progress (Ctrl+3)")
        self.balance_action.triggered.connect(self.open_balance)
        close_tab = QAction("Close node tab", self)
        close_tab.setShortcut(QKeySequence.StandardKey.Close)
        close_tab.triggered.connect(lambda: self._close_tab(self.tabs.currentIndex()))
        self.addAction(close_tab)
        self.addAction(self.overview_action)
        tb.addAction(self.groups_action)
        tb.addAction(self.balance_action)
        tb.addSeparator()
        tb.addAction(self.add_node_action)
        self.addToolBar(tb)

    def _build_status_bar(self) -> None:
        sb = self.statusBar()
        kind = "Embedded collector" if self.embedded else "Collector"
        self.collector_label = QLabel(f"{kind}  {self.url}", self)
        self.collector_label.setObjectName("collectorLabel")
        self.collector_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.nodes_label = QLabel("connecting…", self)
        self.nodes_label.setObjectName("nodesLabel")
        self.warning_label = QLabel(self)
        self.warning_label.setObjectName("warningLabel")
        self.warning_label.hide()
        sb.addWidget(self.collector_label)
        sb.addWidget(self.warning_label)
        sb.addPermanentWidget(self.nodes_label)

    # --- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start the workers (after ``show()``: nothing here blocks)."""
        self._started_at = time.monotonic()
        self._stream.start()
        self._requests.start()
        self.poll_status()
        self._status_timer.start()
        self._empty_timer.start()

    def shutdown(self) -> None:
        """Stop every timer and worker and join their threads (idempotent)."""
        if self._shut:
            return
        self._shut = True
        self._status_timer.stop()
        self._empty_timer.stop()
        self._reap_timer.stop()
        self.overview.shutdown()
        pages: list[NodePage | PollingPage] = [
            *self.pages.values(),
            *self._closing_pages,
            *self.tool_pages.values(),
            *self._closing_tools,
        ]
        # Ask everyone to stop first, then join: the waits overlap.
        self._stream.stop()
        for page in pages:
            page.stop_async()
        self._requests.close()
        self._stream.close()
        for page in pages:
            page.shutdown()
        self.pages.clear()
        self._closing_pages.clear()
        self.tool_pages.clear()
        self._closing_tools.clear()

    def closeEvent(self, event: QCloseEvent) -> None:
        self.shutdown()
        super().closeEvent(event)
        self.closed.emit()

    # --- collector data ------------------------------------------------------------

    def collector_now(self) -> float:
        """The collector's clock, estimated from the last ``nodes`` event."""
        return time.time() + self._skew

    def _poll_while_empty(self) -> None:
        if self.overview.model.rowCount() or time.monotonic() - self._started_at > EMPTY_POLL_FOR_S:
            self._empty_timer.stop()
            return
        if self.connected is not False:
            self._tracker.issued("nodes", self._requests.submit("nodes", lambda c: c.nodes()))

    def _on_nodes(self, response: NodesResponse) -> None:
        if self._shut or response.now < self._last_snapshot:
            return  # a polled snapshot can arrive after a newer streamed one
        self._last_snapshot = response.now
        self._skew = response.now - time.time()
        self.overview.update_nodes(response)
        for node in response.nodes:
            page = self.pages.get(node.node_id)
            if page is not None:
                page.update_summary(node)
        total = len(response.nodes)
        online = self.overview.model.online_count()
        self.nodes_label.setText(f"{online} / {total} node{'s' if total != 1 else ''} online")
        self.nodes_updated.emit(response)

    def _on_stream_state(self, state: StreamState) -> None:
        if self._shut:
            return
        self.connected = state.connected
        if state.connected:
            self._show_warning(None)
            self.poll_status()
        elif state.refused:
            self._show_warning(f"Collector refused the console — {state.message}", severe=True)
        else:
            self._show_warning(
                f"Collector unreachable — retrying (next try in {state.retry_in:g} s)", severe=True
            )
            self.nodes_label.setText("no data")
        self.overview.set_connection(state.connected, self.url, state.message)
        self.connection_changed.emit(state)

    def poll_status(self) -> None:
        if not self._shut:
            self._tracker.issued("status", self._requests.submit("status", lambda c: c.status()))

    def _on_reply(self, reply: Reply) -> None:
        if self._shut or not self._tracker.is_current(reply):
            return
        if reply.error is not None:
            # The stream reports reachability; a failed poll only matters if it is not that.
            if not reply.unreachable:
                logger.warning("%s request failed: %s", reply.key, reply.error)
            return
        if reply.key == "nodes":
            self._on_nodes(reply.value)
            return
        self.status = reply.value
        if self.connected:
            self._apply_status()

    def _apply_status(self) -> None:
        st = self.status or {}
        if st.get("degraded"):
            err = st.get("last_store_error") or "the store is failing"
            queued = st.get("write_queue")
            extra = f"; {queued} samples waiting to be written" if queued else ""
            self._show_warning(f"Collector degraded — {err}{extra}", severe=False)
        else:
            self._show_warning(None)
        listen = st.get("listen")
        kind = "Embedded collector" if self.embedded else "Collector"
        where = f"{self.url}" + (f"  (listening on {listen})" if listen and not st.get("loopback") else "")
        self.collector_label.setText(f"{kind}  {where}")

    def _show_warning(self, text: str | None, severe: bool = True) -> None:
        if text is None:
            self.warning_label.hide()
            self.banner.hide()
            return
        level = "severe" if severe else "warn"
        for label in (self.warning_label, self.banner):
            label.setProperty("level", level)
            label.style().unpolish(label)
            label.style().polish(label)
        self.warning_label.setText(f"⚠ {text}")
        self.banner.setText(f"⚠  {text}")
        self.warning_label.show()
        self.banner.show()

    # --- node pages ----------------------------------------------------------------

    def open_node(self, node_id: str) -> NodePage:
        """Show the node's page, creating it on first use."""
        page = self.pages.get(node_id)
        if page is None:
            # Imported here: pyqtgraph costs ≈ 0.7 s and the overview does not need it.
            from cloudmon.ui.nodepage import NodePage

            summary = self.overview.model.node(node_id)
            page = NodePage(self.url, self.token, node_id, summary, clock=self.collector_now, parent=self)
            self.pages[node_id] = page
            label = summary.hostname if summary is not None else node_id
            index = self.tabs.addTab(page, label)
            self.tabs.setTabToolTip(index, node_id)
            close = QToolButton(self.tabs)
            close.setObjectName("tabClose")
            close.setText("×")
            close.setToolTip("Close this node's page (Ctrl+W)")
            close.setAutoRaise(True)
            close.clicked.connect(lambda _=False, p=page: self._close_page(p))
            self.tabs.tabBar().setTabButton(index, QTabBar.ButtonPosition.RightSide, close)
            page.start()
        self.tabs.setCurrentWidget(page)
        return page

    def _close_tab(self, index: int) -> None:
        page = self.tabs.widget(index)
        if page is not None and page in self.tool_pages.values():
            self._close_tool(page)  # type: ignore[arg-type]
            return
        if page is not None and page is not self.overview:
            node_id = getattr(page, "node_id", None)
            if node_id in self.pages:
                self._close_page(self.pages[node_id])

    def _close_page(self, node_page: NodePage) -> None:
        """Remove a node tab; its threads are stopped now and joined later."""
        if self.pages.get(node_page.node_id) is not node_page:
            return
        del self.pages[node_page.node_id]
        self.tabs.removeTab(self.tabs.indexOf(node_page))
        # Joining would block the GUI for up to a stream read: stop now, reap later.
        node_page.stop_async()
        node_page.hide()
        self._closing_pages.append(node_page)
        self._reap_timer.start()

    def _reap_pages(self) -> None:
        still: list[NodePage] = []
        for page in self._closing_pages:
            if page.threads_alive():
                still.append(page)
            else:
                page.shutdown()
                page.deleteLater()
        self._closing_pages = still
        tools: list[PollingPage] = []
        for tool in self._closing_tools:
            if tool.threads_alive():
                tools.append(tool)
            else:
                tool.shutdown()
                tool.deleteLater()
        self._closing_tools = tools
        if not still and not tools:
            self._reap_timer.stop()

    # --- groups and balance ----------------------------------------------------------

    def open_groups(self) -> GroupsPage:
        """Show the Groups tab, creating it on first use."""
        from cloudmon.ui.groups import GroupsPage

        page = self.tool_pages.get("groups")
        if page is None:
            page = GroupsPage(self.url, self.token, self)
            self._add_tool_tab("groups", page, "Groups")
        assert isinstance(page, GroupsPage)
        self.tabs.setCurrentWidget(page)
        return page

    def open_balance(self) -> BalancePage:
        """Show the Balance tab, creating it on first use (pyqtgraph loads then)."""
        from cloudmon.ui.balance import BalancePage

        page = self.tool_pages.get("balance")
        if page is None:
            page = BalancePage(self.url, self.token, self)
            self._add_tool_tab("balance", page, "Balance")
        assert isinstance(page, BalancePage)
        self.tabs.setCurrentWidget(page)
        return page

    def _add_tool_tab(self, key: str, page: PollingPage, label: str) -> None:
        self.tool_pages[key] = page
        # Next to the overview, before the node tabs.
        index = self.tabs.insertTab(1 + len(self.tool_pages) - 1, page, label)
        close = QToolButton(self.tabs)
        close.setObjectName("tabClose")
        close.setText("×")
        close.setToolTip(f"Close the {label} page (Ctrl+W)")
        close.setAutoRaise(True)
        close.clicked.connect(lambda _=False, p=page: self._close_tool(p))
        self.tabs.tabBar().setTabButton(index, QTabBar.ButtonPosition.RightSide, close)
        page.start()

    def _close_tool(self, page: PollingPage) -> None:
        key = next((k for k, p in self.tool_pages.items() if p is page), None)
        if key is None:
            return
        del self.tool_pages[key]
        self.tabs.removeTab(self.tabs.indexOf(page))
        page.stop_async()
        page.hide()
        self._closing_tools.append(page)
        self._reap_timer.start()

    def show_add_node(self) -> AddNodeDialog:
        """Open the Add node dialog (non-modal, so the console keeps updating)."""
        dialog = AddNodeDialog(self.url, self.token, self.status, self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.show()
        return dialog
