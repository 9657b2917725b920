"""The embedded store's binary encodings round-trip exactly and stay compact."""

from __future__ import annotations

import math
import struct

import pytest

from cloudmon.store._codec import (
    INF,
    NAN,
    Agg,
    AggView,
    BlockView,
    CodecError,
    aggregate,
    doubles,
    encode_agg,
    encode_block,
    rollup_metrics,
)


def _flat(rows: list[list[float]]) -> bytes:
    return b"".join(doubles(len(r)).pack(*r) for r in rows)


def test_block_round_trips_columns_times_and_rows() -> None:
    times = [1_000_000, 1_000_999, 1_002_000]
    rows = [[1.0, 5.0, NAN, 7.0], [2.0, 5.0, NAN, NAN], [3.5, 5.0, NAN, 9.0]]
    blob, columns, constant = encode_block(times[0], times, _flat(rows), 4)
    view = BlockView(blob)
    assert (view.n, view.m) == (3, 4)
    assert view.times(times[0]) == times
    assert view.column(0) == (1.0, 2.0, 3.5)
    assert view.column(1) == (5.0, 5.0, 5.0)
    col2 = view.column(2)
    assert col2 is not None
    assert all(math.isnan(v) for v in col2)
    assert view.column(3)[0::2] == (7.0, 9.0)  # type: ignore[index]
    assert view.column(4) is None  # beyond the layout
    assert view.row(2)[:2] == [3.5, 5.0]
    assert columns[0] == [1.0, 2.0, 3.5]
    assert constant == [False, True, True, False]
    agg = aggregate(columns, 0, 3, constant)
    assert (agg.counts, agg.sums[1], agg.maxs[1]) == ([3, 3, 0, 2], 15.0, 5.0)


def test_constant_columns_are_stored_once() -> None:
    n, m = 60, 10
    times = [i * 1000 for i in range(n)]
    varying = _flat([[float(i + j) for j in range(m)] for i in range(n)])
    constant = _flat([[42.0] * m for _ in range(n)])
    big, _, _ = encode_block(0, times, varying, m)
    small, _, _ = encode_block(0, times, constant, m)
    assert len(big) - len(small) == 8 * m * (n - 1)
    assert BlockView(small).column(9) == (42.0,) * n


def test_aggregate_skips_nan_and_counts_per_metric() -> None:
    columns = [[1.0, 2.0, 3.0, 4.0], [NAN, 10.0, NAN, 20.0], [NAN] * 4]
    agg = aggregate(columns, 0, 4)
    assert agg.counts == [4, 2, 0]
    assert agg.sums[:2] == [10.0, 30.0]
    assert agg.mins[:2] == [1.0, 10.0]
    assert agg.maxs[:2] == [4.0, 20.0]
    assert (agg.mins[2], agg.maxs[2]) == (INF, -INF)
    part = aggregate(columns, 1, 3)
    assert part.counts == [2, 1, 0]
    assert part.sums[0] == 5.0


@pytest.mark.parametrize("uniform", [True, False])
def test_rollup_rows_round_trip(uniform: bool) -> None:
    counts = [60, 60, 60, 60] if uniform else [60, 0, 3, 60]
    agg = Agg(counts, [1770.0, 0.0, 15.0, 30.0], [0.0, INF, 5.0, 0.5], [59.0, -INF, 5.0, 0.5])
    if uniform:
        agg.sums[1], agg.mins[1], agg.maxs[1] = 120.0, 1.0, 3.0
        agg.sums[2] = 300.0  # 60 x 5.0
    blob = encode_agg(agg)
    back = AggView(blob).full()
    assert back.counts == agg.counts
    assert back.mins == agg.mins
    assert back.maxs == agg.maxs
    assert back.sums == pytest.approx(agg.sums)
    got = rollup_metrics(blob, [0, -1, 2, 7])
    assert got[0] == (60, 1770.0, 0.0, 59.0)
    assert got[1] is None
    assert got[3] is None
    assert got[2] == ((60, 300.0, 5.0, 5.0) if uniform else (3, 15.0, 5.0, 5.0))


def test_single_value_metrics_take_one_float() -> None:
    m = 40
    varying = Agg([60] * m, [float(j) for j in range(m)], [0.0] * m, [1.0 + j for j in range(m)])
    flat = Agg(
        [60] * m, [60.0 * j for j in range(m)], [float(j) for j in range(m)], [float(j) for j in range(m)]
    )
    assert len(encode_agg(varying)) - len(encode_agg(flat)) == 16 * m


def test_merge_and_remap() -> None:
    a = Agg([2, 0], [3.0, 0.0], [1.0, INF], [2.0, -INF])
    b = Agg([1, 1], [5.0, 7.0], [5.0, 7.0], [5.0, 7.0])
    merged = a.merged(b)
    assert merged == Agg([3, 1], [8.0, 7.0], [1.0, 7.0], [5.0, 7.0])
    moved = a.remapped([2, 0], 3)
    assert moved.counts == [0, 0, 2]
    assert moved.sums[2] == 3.0


def test_bad_blobs_raise_codec_errors() -> None:
    with pytest.raises(CodecError):
        BlockView(b"\x01\x00")
    with pytest.raises(CodecError, match="version"):
        BlockView(struct.pack("<BIH", 9, 0, 0))
    with pytest.raises(CodecError, match="version"):
        AggView(struct.pack("<BBH", 9, 1, 0) + b"\0\0\0\0")
    with pytest.raises(CodecError):
        rollup_metrics(b"", [0])
