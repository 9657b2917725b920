"""Human-readable numbers for the console (Qt-free, so it is easy to test).

Rates and sizes use binary units (KiB/s, MiB/s) in tables, the way ``top``
and ``iotop`` show them; chart axes use pyqtgraph's SI prefixes instead.
"""

from __future__ import annotations

import itertools
import math

_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(value: float | None, suffix: str = "") -> str:
    """``1536`` -> ``"1.5 KiB"``; ``None``/NaN -> ``"–"``."""
    if value is None or math.isnan(value):
        return "–"
    size = float(value)
    for unit in _BINARY_UNITS:
        if abs(size) < 1024.0 or unit == _BINARY_UNITS[-1]:
            if unit == "B":
                return f"{size:.0f} B{suffix}"
            # Three significant digits are enough to compare rows at a glance.
            if abs(size) >= 100:
                return f"{size:.0f} {unit}{suffix}"
            if abs(size) >= 10:
                return f"{size:.1f} {unit}{suffix}"
            return f"{size:.2f} {unit}{suffix}"
        size /= 1024.0
    raise AssertionError("unreachable")  # pragma: no cover


def human_rate(value: float | None) -> str:
    """Bytes per second as ``"12.3 MiB/s"``."""
    return human_bytes(value, "/s")


def percent(value: float | None) -> str:
    """``42.345`` -> ``"42.3 %"``."""
    if value is None or math.isnan(value):
        return "–"
    return f"{value:.1f} %"


def load(value: float | None) -> str:
    """Load average with two decimals."""
    if value is None or math.isnan(value):
        return "–"
    return f"{value:.2f}"


def ago(seconds: float | None) -> str:
    """Age as ``"3 s ago"``, ``"4 min ago"``, ``"2 h ago"``, ``"5 d ago"``."""
    if seconds is None or math.isnan(seconds):
        return "never"
    s = max(0.0, seconds)
    if s < 1.5:
        return "just now"
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 90 * 60:
        return f"{s / 60:.0f} min ago"
    if s < 36 * 3600:
        return f"{s / 3600:.0f} h ago"
    return f"{s / 86400:.0f} d ago"


def duration(seconds: float | None) -> str:
    """Uptime as ``"3 d 4 h"``, ``"5 h 12 min"``, ``"42 min"``."""
    if seconds is None or math.isnan(seconds) or seconds <= 0:
        return "–"
    s = int(seconds)
    days, rem = divmod(s, 86400)
    hours, rem = divmod(rem, 3600)
    minutes = rem // 60
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min"


def short_id(node_id: str, hostname: str = "", keep: int = 8) -> str:
    """The distinctive part of a node id, short enough for a table cell.

    Agents generate ids as ``<hostname>-<8 hex>``: repeating the hostname says
    nothing, so only the suffix is shown.  The full id goes in the tooltip.
    """
    prefix = hostname + "-"
    if hostname and node_id.startswith(prefix) and len(node_id) > len(prefix):
        node_id = node_id[len(prefix) :]
    return node_id if len(node_id) <= keep + 2 else node_id[:keep] + "…"


# Gentle background scale for utilisation cells: pale green, amber, soft red.
# Pastel on purpose so that the black cell text stays readable everywhere.
_SCALE: tuple[tuple[float, tuple[int, int, int]], ...] = (
    (0.0, (0xDD, 0xF0, 0xDA)),
    (50.0, (0xE9, 0xF2, 0xC6)),
    (75.0, (0xFB, 0xE3, 0xA6)),
    (90.0, (0xF7, 0xBE, 0xA0)),
    (100.0, (0xF2, 0xA0, 0x9A)),
)


def load_colour(pct: float) -> tuple[int, int, int]:
    """RGB of the background for a utilisation of ``pct`` percent (0-100, clamped)."""
    p = min(100.0, max(0.0, pct))
    for (p0, c0), (p1, c1) in itertools.pairwise(_SCALE):
        if p <= p1:
            t = 0.0 if p1 == p0 else (p - p0) / (p1 - p0)
            r, g, b = (round(a + (z - a) * t) for a, z in zip(c0, c1, strict=True))
            return (r, g, b)
    return _SCALE[-1][1]
