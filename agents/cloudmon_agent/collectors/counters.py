"""Owners of stateful counters: each turns raw cumulative counters into rates.

The kernel exposes cumulative counters (CPU jiffies, sectors, bytes, packets);
a rate needs the previous value.  Each counter group has exactly one owner
object holding that previous value, so two readers can never steal each
other's deltas (the classic ``psutil.cpu_percent(interval=None)`` pitfall).
The first update of an owner only primes it.

Counters are kept per device and deltas are taken per device before summing:
an interface or disk that appears mid-run primes itself instead of adding its
whole history as one spike, one that vanishes just stops contributing, and a
counter that goes backwards (32-bit wrap, driver reset, device re-created)
counts as zero for that interval instead of turning the sum negative.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class RateCounter:
    """Per-second rates of keyed groups of ``width`` cumulative counters, summed over keys."""

    def __init__(self, width: int) -> None:
        self.width = width
        self._prev: dict[str, Sequence[int]] = {}
        self._prev_t: float | None = None

    @property
    def primed(self) -> bool:
        """True once one update has been seen (the next one yields rates)."""
        return self._prev_t is not None

    def update(self, values: Mapping[str, Sequence[int]], now: float) -> list[float] | None:
        """Record ``values`` (key -> counters) taken at monotonic time ``now``.

        Returns the per-second rates summed over the keys present both now and
        last time, or ``None`` on the first call (priming).
        """
        prev, prev_t = self._prev, self._prev_t
        self._prev, self._prev_t = dict(values), now
        if prev_t is None:
            return None
        dt = now - prev_t
        sums = [0] * self.width
        if dt <= 0:
            return [0.0] * self.width
        for key, cur in values.items():
            old = prev.get(key)
            if old is None:
                continue  # a new device: primed now, counted from the next interval
            for i in range(self.width):
                d = cur[i] - old[i]
                if d > 0:  # d < 0: wrapped or reset; count the interval as zero
                    sums[i] += d
        return [s / dt for s in sums]

    def reset(self) -> None:
        """Forget the previous values (the next update primes again)."""
        self._prev = {}
        self._prev_t = None


class CpuPercent:
    """Busy percentage per CPU and in total, from cumulative (busy, idle) times.

    The total is the busy share of the summed per-CPU deltas, so it is by
    construction the time-weighted mean of the per-core figures.  CPUs are
    indexed by their number; one that is offline (absent) reports 0.
    """

    def __init__(self) -> None:
        self._prev: dict[int, tuple[float, float]] | None = None

    @property
    def primed(self) -> bool:
        """True once one update has been seen."""
        return self._prev is not None

    def update(self, times: Mapping[int, tuple[float, float]]) -> tuple[float, list[float]] | None:
        """Record ``cpu number -> (busy, idle)`` times; ``None`` on the first call."""
        prev, self._prev = self._prev, dict(times)
        if prev is None:
            return None
        n = max(times, default=-1) + 1
        per_core = [0.0] * n
        busy_sum = total_sum = 0.0
        for cpu, (busy, idle) in times.items():
            old = prev.get(cpu)
            if old is None:
                continue  # came online since the last sample
            # Either field can step back (idle/iowait accounting on NO_HZ
            # kernels is known to); clamp each instead of the sum.
            d_busy = max(busy - old[0], 0.0)
            d_total = d_busy + max(idle - old[1], 0.0)
            if d_total > 0:
                per_core[cpu] = _pct(d_busy, d_total)
                busy_sum += d_busy
                total_sum += d_total
        return (_pct(busy_sum, total_sum) if total_sum else 0.0), per_core

    def reset(self) -> None:
        """Forget the previous times (the next update primes again)."""
        self._prev = None


def _pct(part: float, whole: float) -> float:
    return min(100.0, max(0.0, 100.0 * part / whole))


class KeyedRates:
    """Per-key per-second rates of groups of cumulative counters (not summed).

    Like :class:`RateCounter`, but every key keeps its own rates: a key seen
    for the first time (a new disk, VM or container) gets ``None`` until its
    second update, a counter that goes backwards counts as zero, and keys that
    vanished are forgotten.  ``now`` may be passed per key (a group that is
    read at a different time than the others).
    """

    def __init__(self) -> None:
        self._prev: dict[str, tuple[float, Sequence[float]]] = {}

    def update(self, values: Mapping[str, Sequence[float]], now: float) -> dict[str, list[float] | None]:
        """Record ``key -> counters`` taken at ``now``; returns ``key -> rates`` (None while priming)."""
        prev, self._prev = self._prev, {k: (now, v) for k, v in values.items()}
        out: dict[str, list[float] | None] = {}
        for key, cur in values.items():
            old = prev.get(key)
            if old is None or len(old[1]) != len(cur):
                out[key] = None
                continue
            dt = now - old[0]
            if dt <= 0:
                out[key] = [0.0] * len(cur)
                continue
            out[key] = [max(0.0, (c - o) / dt) for c, o in zip(cur, old[1], strict=True)]
        return out
