"""Fixed-size numpy ring buffers behind the live charts (Qt-free).

Each row is one instant: a timestamp and one value per column (metric).  Rows
are written twice, at ``i`` and ``i + capacity``, so that the newest
``len(self)`` rows are always one contiguous slice: reading never copies or
concatenates, which keeps the redraw timer cheap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


class RingBuffer:
    """The last ``capacity`` rows of ``columns`` metrics, oldest first."""

    def __init__(self, capacity: int, columns: Sequence[str]) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.columns: tuple[str, ...] = tuple(columns)
        self.index = {name: i for i, name in enumerate(self.columns)}
        self._ts = np.full(2 * capacity, np.nan)
        self._vals = np.full((2 * capacity, len(self.columns)), np.nan)
        self._next = 0  # slot of the next write, in [0, capacity)
        self._size = 0
        #: Bumped on every write; the redraw timer compares it to skip idle ticks.
        self.version = 0

    def __len__(self) -> int:
        return self._size

    @property
    def last_ts(self) -> float | None:
        if not self._size:
            return None
        return float(self._ts[(self._next - 1) % self.capacity])

    @property
    def first_ts(self) -> float | None:
        if not self._size:
            return None
        return float(self.timestamps()[0])

    def append(self, ts: float, values: Mapping[str, float]) -> None:
        """Add one row; metrics not in ``values`` are NaN (drawn as a gap)."""
        row = np.full(len(self.columns), np.nan)
        for name, v in values.items():
            i = self.index.get(name)
            if i is not None:
                row[i] = v
        i = self._next
        self._ts[i] = self._ts[i + self.capacity] = ts
        self._vals[i] = self._vals[i + self.capacity] = row
        self._next = (i + 1) % self.capacity
        self._size = min(self._size + 1, self.capacity)
        self.version += 1

    def extend(self, timestamps: Sequence[float], columns: Mapping[str, Sequence[float | None]]) -> None:
        """Add many rows given column-wise (``None`` becomes NaN)."""
        n = len(timestamps)
        cols = {
            name: np.array([np.nan if v is None else v for v in vals], dtype=np.float64)
            for name, vals in columns.items()
            if name in self.index
        }
        for k in range(n):
            self.append(timestamps[k], {name: float(arr[k]) for name, arr in cols.items()})

    def timestamps(self) -> FloatArray:
        """Timestamps, oldest first (a view: copy before keeping it)."""
        start = self._next - self._size + (self.capacity if self._next < self._size else 0)
        return self._ts[start : start + self._size]

    def column(self, name: str) -> FloatArray:
        """One metric's values aligned with :meth:`timestamps` (a view)."""
        start = self._next - self._size + (self.capacity if self._next < self._size else 0)
        return self._vals[start : start + self._size, self.index[name]]

    def rows_after(self, ts: float) -> list[tuple[float, dict[str, float]]]:
        """Rows strictly newer than ``ts`` (to re-apply on top of fresh seed data)."""
        times = self.timestamps()
        out = []
        for k in np.nonzero(times > ts)[0]:
            start = self._next - self._size + (self.capacity if self._next < self._size else 0)
            row = self._vals[start + int(k)]
            out.append(
                (
                    float(times[k]),
                    {c: float(row[i]) for i, c in enumerate(self.columns) if not np.isnan(row[i])},
                )
            )
        return out


def compact(
    x: FloatArray, columns: Sequence[FloatArray], max_gap: float
) -> tuple[FloatArray, list[FloatArray]]:
    """Drop rows with no value at all and break lines only at real outages.

    Series come in fixed buckets: with a 1 s step a 1 s agent leaves an empty
    bucket now and then (timer jitter), which ``connect="finite"`` would draw
    as a dashed line.  Empty rows are dropped so the line bridges them; where
    consecutive rows are more than ``max_gap`` seconds apart (the node or the
    collector was really away) one NaN row is inserted so the line breaks.
    """
    if not len(x) or not columns:
        return x, list(columns)
    stack = np.vstack(columns)
    keep = np.nonzero(np.isfinite(stack).any(axis=0))[0]
    xs = x[keep]
    cols = [c[keep] for c in columns]
    breaks = np.nonzero(np.diff(xs) > max_gap)[0] + 1
    if len(breaks):
        xs = np.insert(xs, breaks, xs[breaks - 1] + 1e-3)
        cols = [np.insert(c, breaks, np.nan) for c in cols]
    return xs, cols
