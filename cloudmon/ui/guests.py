"""What runs on a node: its VMs, containers and GPUs, as live tables.

The agent reports them in its report's sections; the collector flattens each
to ``vm.<name>.<field>``, ``container.<name>.<field>`` and
``gpu.<index>.<field>`` (``cloudmon_agent.schema.flatten``), and the node
page's live stream carries them every second.  A name may contain dots
(``nginx.service``): the field is the last part.  :func:`group_rows` does
that split (no Qt); :class:`GuestTable` shows one kind, sortable, updated in
place, with a sentence instead of an empty table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor
from PySide6.QtWidgets import QHeaderView, QLabel, QStackedLayout, QTableWidget, QTableWidgetItem, QWidget

from cloudmon.ui import format as fmt
from cloudmon.ui.polling import make_table


@dataclass(frozen=True, slots=True)
class Column:
    """One column: its header, the flattened field it shows (None: the name), how to format it."""

    title: str
    field: str | None
    kind: str  # "name", "text" (from the node's info), "int", "pct", "bytes", "rate", "celsius", "watts"
    tip: str


VM_COLUMNS: tuple[Column, ...] = (
    Column("VM", None, "name", "The libvirt domain"),
    Column("State", "state", "text", "running, paused, shutoff ... as libvirt says"),
    Column("vCPUs", "vcpus", "int", "Virtual CPUs"),
    Column("CPU", "cpu_percent", "pct", "CPU used, as a share of the VM's own vCPUs"),
    Column(
        "Host CPU",
        "host_cpu_percent",
        "pct",
        "CPU used, as a share of all the host's CPUs: sort by it to see which VM loads the host",
    ),
    Column("Memory", "mem_current", "bytes", "Memory the guest has now (balloon)"),
    Column("Max", "mem_max", "bytes", "Configured memory"),
    Column("RSS", "mem_rss", "bytes", "Host memory the VM's process uses"),
    Column(
        "Unused", "mem_unused", "bytes", "Free inside the guest, as its balloon driver says (– without one)"
    ),
    Column("Disk read", "disk_read_bps", "rate", "All of the VM's disks"),
    Column("Disk write", "disk_write_bps", "rate", "All of the VM's disks"),
    Column("Net ↓", "net_rx_bps", "rate", "All of the VM's interfaces, received"),
    Column("Net ↑", "net_tx_bps", "rate", "All of the VM's interfaces, sent"),
)
CONTAINER_COLUMNS: tuple[Column, ...] = (
    Column(
        "Container or unit",
        None,
        "name",
        "Docker or Podman container, systemd service, or libvirt VM scope (cgroups)",
    ),
    Column("CPU", "cpu_percent", "pct", "CPU used, as a share of all the host's CPUs"),
    Column("Memory", "mem_bytes", "bytes", "Memory charged to its cgroup"),
    Column("Disk read", "io_read_bps", "rate", "Block I/O read"),
    Column("Disk write", "io_write_bps", "rate", "Block I/O written"),
)
GPU_COLUMNS: tuple[Column, ...] = (
    Column("GPU", None, "name", "NVIDIA GPU index on the host (NVML)"),
    Column("Model", "model", "text", "As NVML names it"),
    Column(
        "Passed to",
        "vm",
        "text",
        "The VM a passed-through GPU is assigned to (the host's NVML cannot see inside it)",
    ),
    Column("Utilization", "util_percent", "pct", "Share of time a kernel ran"),
    Column("Memory used", "mem_used", "bytes", "GPU memory in use"),
    Column("Memory", "mem_total", "bytes", "GPU memory in all"),
    Column("Temperature", "temp_c", "celsius", "GPU temperature"),
    Column("Power", "power_w", "watts", "Power draw"),
)


def group_rows(latest: Mapping[str, float], prefix: str) -> dict[str, dict[str, float]]:
    """``{"vm.web.1.cpu_percent": 3.0, ...}`` with prefix ``"vm."`` -> ``{"web.1": {"cpu_percent": 3.0}}``."""
    out: dict[str, dict[str, float]] = {}
    n = len(prefix)
    for key, value in latest.items():
        if not key.startswith(prefix):
            continue
        name, _, field = key[n:].rpartition(".")
        if name and field:
            out.setdefault(name, {})[field] = value
    return out


def guest_words(
    prefix: str, rows: Mapping[str, Mapping[str, float]], info: Mapping[str, object]
) -> dict[str, dict[str, str]]:
    """The "text" columns of each row, from the node's info: a VM's state, a GPU's model and owner."""
    out: dict[str, dict[str, str]] = {}
    if prefix == "vm.":
        stopped = info.get("vms_not_running")
        states = stopped if isinstance(stopped, dict) else {}
        for name in rows:
            out[name] = {"state": str(states.get(name, "running"))}
    elif prefix == "gpu.":
        names, vms = info.get("gpu_names"), info.get("gpu_vms")
        for idx in rows:
            out[idx] = {
                "model": str(names.get(idx, "")) if isinstance(names, dict) else "",
                "vm": str(vms.get(idx, "")) if isinstance(vms, dict) else "",
            }
    return out


def cell_text(kind: str, value: float | None) -> str:
    """A figure as the tables show it (``–`` when the agent did not report it)."""
    if value is None or value != value:  # None or NaN
        return "–"
    if kind == "int":
        return f"{value:.0f}"
    if kind == "pct":
        return fmt.percent(value)
    if kind == "bytes":
        return fmt.human_bytes(value)
    if kind == "rate":
        return fmt.human_rate(value)
    if kind == "celsius":
        return f"{value:.0f} °C"
    if kind == "watts":
        return f"{value:.0f} W"
    return f"{value:g}"


class _Item(QTableWidgetItem):
    """A cell that sorts by its number (names sort as text)."""

    def __lt__(self, other: QTableWidgetItem) -> bool:
        a, b = self.data(Qt.ItemDataRole.UserRole), other.data(Qt.ItemDataRole.UserRole)
        if isinstance(a, float) and isinstance(b, float):
            return a < b
        return super().__lt__(other)


class GuestTable(QWidget):
    """One kind of guest as a sortable table (biggest first by ``sort_field``), or a sentence when there is none."""

    def __init__(
        self,
        columns: Sequence[Column],
        object_name: str,
        empty_text: str,
        sort_field: str,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.columns = tuple(columns)
        self.table: QTableWidget = make_table(self, [c.title for c in self.columns], object_name)
        for i, c in enumerate(self.columns):
            header_item = self.table.horizontalHeaderItem(i)
            if header_item is not None:
                header_item.setToolTip(c.tip)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.table.setSortingEnabled(True)
        sort_col = next(i for i, c in enumerate(self.columns) if c.field == sort_field)
        self.table.sortByColumn(sort_col, Qt.SortOrder.DescendingOrder)
        self.empty = QLabel(empty_text, self)
        self.empty.setObjectName("emptyHint")
        self.empty.setWordWrap(True)
        self.empty.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self._stack = QStackedLayout(self)
        self._stack.addWidget(self.empty)
        self._stack.addWidget(self.table)
        self._shown: dict[str, dict[str, float]] = {}
        self._words: dict[str, dict[str, str]] = {}

    def names(self) -> list[str]:
        """The names in the table, in its current (sorted) order."""
        out = []
        for r in range(self.table.rowCount()):
            item = self.table.item(r, 0)
            if item is not None:
                out.append(item.text())
        return out

    def show_rows(
        self, rows: Mapping[str, Mapping[str, float]], text: Mapping[str, Mapping[str, str]] | None = None
    ) -> None:
        """Show these rows (name -> field -> value; ``text``: name -> field -> words for "text" columns)."""
        words = {k: dict(v) for k, v in (text or {}).items()}
        if rows == self._shown and words == self._words:
            return
        self._shown = {k: dict(v) for k, v in rows.items()}
        self._words = words
        self._stack.setCurrentWidget(self.table if rows else self.empty)
        t = self.table
        t.setSortingEnabled(False)  # re-sorted once below, not per cell
        # Each guest keeps its row (found by name), so a selected row stays on its guest when
        # the figures, and with them the order, change; gone guests lose their rows.
        at = {name: r for r, name in enumerate(self.names())}
        for r in sorted((r for name, r in at.items() if name not in rows), reverse=True):
            t.removeRow(r)
        at = {name: r for r, name in enumerate(self.names())}
        for name in sorted(rows):
            row = at.get(name)
            if row is None:
                row = t.rowCount()
                t.insertRow(row)
            self._fill(row, name, rows[name], words.get(name, {}))
        t.setSortingEnabled(True)

    def _fill(self, r: int, name: str, values: Mapping[str, float], words: Mapping[str, str]) -> None:
        t = self.table
        for col, c in enumerate(self.columns):
            value = None if c.field is None or c.kind == "text" else values.get(c.field)
            if c.field is None:
                shown = name
            elif c.kind == "text":
                shown = words.get(c.field, "")
            else:
                shown = cell_text(c.kind, value)
            item = t.item(r, col)
            if not isinstance(item, _Item):
                item = _Item()
                if c.kind not in ("name", "text"):
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                t.setItem(r, col, item)
            item.setText(shown)
            if c.kind in ("name", "text"):
                item.setData(Qt.ItemDataRole.UserRole, None)  # names sort as text
                item.setToolTip(name)
            else:
                item.setData(Qt.ItemDataRole.UserRole, float(value) if value is not None else -1.0)
            if c.kind == "pct":
                if value is None:
                    item.setData(Qt.ItemDataRole.BackgroundRole, None)
                else:
                    red, green, blue = fmt.load_colour(value)
                    item.setBackground(QColor(red, green, blue))
