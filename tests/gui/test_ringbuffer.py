"""The live charts' ring buffer keeps the newest rows, oldest first, contiguous."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cloudmon.ui.ringbuffer import RingBuffer, compact

pytestmark = pytest.mark.gui


def test_wraps_and_keeps_order() -> None:
    ring = RingBuffer(5, ["a", "b"])
    for i in range(12):
        ring.append(float(i), {"a": i * 10.0, "b": -i})
    assert len(ring) == 5
    assert ring.timestamps().tolist() == [7.0, 8.0, 9.0, 10.0, 11.0]
    assert ring.column("a").tolist() == [70.0, 80.0, 90.0, 100.0, 110.0]
    assert ring.column("b").tolist() == [-7.0, -8.0, -9.0, -10.0, -11.0]
    assert ring.first_ts == 7.0
    assert ring.last_ts == 11.0


def test_missing_metrics_are_gaps_and_unknown_ones_ignored() -> None:
    ring = RingBuffer(3, ["a", "b"])
    ring.append(1.0, {"a": 1.0, "zzz": 5.0})
    assert ring.column("a").tolist() == [1.0]
    assert math.isnan(ring.column("b")[0])


def test_extend_and_rows_after() -> None:
    ring = RingBuffer(10, ["a"])
    ring.extend([1.0, 2.0, 3.0], {"a": [1.0, None, 3.0], "other": [9.0, 9.0, 9.0]})
    assert np.isnan(ring.column("a")[1])
    assert ring.rows_after(1.5) == [(2.0, {}), (3.0, {"a": 3.0})]
    v = ring.version
    ring.append(4.0, {"a": 4.0})
    assert ring.version == v + 1


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        RingBuffer(0, ["a"])


def test_compact_bridges_jitter_and_breaks_at_outages() -> None:
    x = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 20.0, 21.0])
    a = np.array([1.0, np.nan, 3.0, 4.0, np.nan, 6.0, 7.0])
    b = np.array([9.0, np.nan, np.nan, 8.0, np.nan, np.nan, 5.0])
    xs, (ca, cb) = compact(x, [a, b], max_gap=5.0)
    # The empty buckets at 1 s and 4 s are gone; one NaN row breaks the 3 s → 20 s outage.
    assert xs[:3].tolist() == [0.0, 2.0, 3.0]
    assert xs[4:].tolist() == [20.0, 21.0]
    assert np.isnan(ca[3])
    assert np.isnan(cb[3])
    assert 3.0 < xs[3] < 20.0
    assert ca[[0, 1, 2, 4, 5]].tolist() == [1.0, 3.0, 4.0, 6.0, 7.0]
