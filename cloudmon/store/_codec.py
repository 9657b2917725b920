"""Compact binary encodings used by the embedded store (stdlib only).

Three encodings, all little-endian:

* **Sample row** (the head tables): the values of one sample in its layout's
  order, ``m`` float64 (NaN where the sample lacks a metric).
* **Block** (one node, one compaction span, column-major)::

      u8 version | u32 n | u16 m | n x u32 ts offset (ms from the row's t0)
      | bitmap ceil(m/8) (bit j: column j is constant) | columns

  A constant column (all ``n`` values bit-identical, e.g. ``mem.total`` or a
  metric missing from every sample) is stored once; every other column as
  ``n`` float64.  Column ``j`` starts at ``8 * (n * (j - c) + c)`` where ``c``
  is the number of constant columns before it, so a query decodes exactly the
  columns it needs with one ``unpack_from``.
* **Rollup row** (one node, one bucket)::

      u8 version | u8 flags | u16 m | count(s) | bitmap ceil(m/8) | values

  ``flags & 1``: one u32 count shared by every metric (the usual case),
  otherwise ``m`` u32 counts.  Bit ``j`` set: metric ``j`` is a single value
  (min == max, or no data: NaN with count 0) stored as one float64; otherwise
  ``sum, min, max`` as three float64.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from functools import lru_cache
from operator import add
from typing import Final

NAN: Final = math.nan
INF: Final = math.inf

BLOCK_VERSION: Final = 1
ROLLUP_VERSION: Final = 1

_BLOCK_HDR: Final = struct.Struct("<BIH")
_ROLLUP_HDR: Final = struct.Struct("<BBH")
_U32: Final = struct.Struct("<I")
_F64: Final = struct.Struct("<d")
_F64X3: Final = struct.Struct("<3d")


class CodecError(ValueError):
    """A stored blob does not decode (corrupt or written by a newer version)."""


@lru_cache(maxsize=1024)
def doubles(n: int) -> struct.Struct:
    """A cached ``Struct`` of ``n`` little-endian float64."""
    return struct.Struct(f"<{n}d")


@lru_cache(maxsize=1024)
def _u32s(n: int) -> struct.Struct:
    return struct.Struct(f"<{n}I")


@dataclass(slots=True)
class Agg:
    """count/sum/min/max per metric of one bucket, in a layout's order.

    A metric without data has count 0, sum 0, min +inf and max -inf, so that
    merging is plain element-wise arithmetic.
    """

    counts: list[int]
    sums: list[float]
    mins: list[float]
    maxs: list[float]

    @classmethod
    def empty(cls, m: int) -> Agg:
        """An aggregate of ``m`` metrics without data."""
        return cls([0] * m, [0.0] * m, [INF] * m, [-INF] * m)

    def merged(self, other: Agg) -> Agg:
        """The element-wise merge of two aggregates of the same layout."""
        return Agg(
            list(map(add, self.counts, other.counts)),
            list(map(add, self.sums, other.sums)),
            list(map(min, self.mins, other.mins)),
            list(map(max, self.maxs, other.maxs)),
        )

    def remapped(self, positions: list[int], m: int) -> Agg:
        """This aggregate moved into a layout of ``m`` metrics; ``positions[j]`` is metric j's new index."""
        out = Agg.empty(m)
        for j, k in enumerate(positions):
            out.counts[k] = self.counts[j]
            out.sums[k] = self.sums[j]
            out.mins[k] = self.mins[j]
            out.maxs[k] = self.maxs[j]
        return out


# -- blocks --------------------------------------------------------------------------------------


def encode_block(
    t0_ms: int, times: list[int], flat: bytes, m: int
) -> tuple[bytes, list[list[float]], list[bool]]:
    """Encode ``len(times)`` sample rows (``flat``: their m-float64 rows joined) as one block.

    Returns the blob, the columns as float lists (the caller aggregates them) and
    which columns are constant.
    """
    n = len(times)
    parts = [_BLOCK_HDR.pack(BLOCK_VERSION, n, m), _u32s(n).pack(*[t - t0_ms for t in times])]
    if m == 0:
        parts.append(b"")
        return b"".join(parts), [], []
    view = memoryview(flat).cast("d")
    values: list[float] = view.tolist()  # type: ignore[assignment]  # a "d" view gives floats
    columns = [values[j::m] for j in range(m)]
    bits = 0
    chunks: list[bytes] = []
    constant: list[bool] = []
    for j in range(m):
        raw = view[j::m].tobytes()
        head = raw[:8]
        if raw == head * n:  # bit-identical: also catches all-NaN columns
            bits |= 1 << j
            chunks.append(head)
            constant.append(True)
        else:
            chunks.append(raw)
            constant.append(False)
    parts.append(bits.to_bytes((m + 7) // 8, "little"))
    parts.extend(chunks)
    return b"".join(parts), columns, constant


class BlockView:
    """The parsed header of a block: where each column lives (cheap: one per row read)."""

    __slots__ = ("bits", "blob", "data_off", "m", "n")

    def __init__(self, blob: bytes) -> None:
        """Parse a block's header (raises :class:`CodecError` on a bad blob)."""
        try:
            version, n, m = _BLOCK_HDR.unpack_from(blob, 0)
        except struct.error as exc:
            raise CodecError(f"truncated block header: {exc}") from None
        if version != BLOCK_VERSION:
            raise CodecError(f"unknown block version {version}")
        bits_off = _BLOCK_HDR.size + 4 * n
        nb = (m + 7) // 8
        self.blob = blob
        self.n: int = n
        self.m: int = m
        self.bits = int.from_bytes(blob[bits_off : bits_off + nb], "little")
        self.data_off = bits_off + nb

    @classmethod
    def parse(cls, blob: bytes) -> BlockView:
        """Same as the constructor."""
        return cls(blob)

    def times(self, t0_ms: int) -> list[int]:
        """Sample timestamps (ms)."""
        return [t0_ms + o for o in _u32s(self.n).unpack_from(self.blob, _BLOCK_HDR.size)]

    def column(self, j: int) -> tuple[float, ...] | None:
        """Column ``j``'s ``n`` values, or ``None`` if the block's layout is shorter."""
        if j >= self.m:
            return None
        bits = self.bits
        before = (bits & ((1 << j) - 1)).bit_count()
        pos = self.data_off + 8 * (self.n * (j - before) + before)
        if bits >> j & 1:
            return (_F64.unpack_from(self.blob, pos)[0],) * self.n
        return doubles(self.n).unpack_from(self.blob, pos)

    def row(self, i: int) -> list[float]:
        """All ``m`` values of sample ``i``."""
        out: list[float] = []
        for j in range(self.m):
            col = self.column(j)
            out.append(col[i] if col is not None else NAN)
        return out


def aggregate(columns: list[list[float]], a: int, b: int, constant: list[bool] | None = None) -> Agg:
    """count/sum/min/max of rows ``[a, b)`` of each column, NaN meaning "no value".

    ``constant[j]``: column ``j`` holds one value throughout (no need to scan it).
    """
    counts: list[int] = []
    sums: list[float] = []
    mins: list[float] = []
    maxs: list[float] = []
    whole = a == 0 and columns and b == len(columns[0])
    for j, col in enumerate(columns):
        if constant is not None and constant[j]:
            v = col[0]
            if v == v:
                counts.append(b - a)
                sums.append(v * (b - a))
                mins.append(v)
                maxs.append(v)
            else:
                counts.append(0)
                sums.append(0.0)
                mins.append(INF)
                maxs.append(-INF)
            continue
        seg = col if whole else col[a:b]
        s = sum(seg)
        if s == s:  # no NaN anywhere: the common case, all in C
            counts.append(len(seg))
            sums.append(s)
            mins.append(min(seg))
            maxs.append(max(seg))
            continue
        present = [v for v in seg if v == v]
        if present:
            counts.append(len(present))
            sums.append(sum(present))
            mins.append(min(present))
            maxs.append(max(present))
        else:
            counts.append(0)
            sums.append(0.0)
            mins.append(INF)
            maxs.append(-INF)
    return Agg(counts, sums, mins, maxs)


# -- rollup rows ---------------------------------------------------------------------------------


def encode_agg(agg: Agg) -> bytes:
    """Encode one bucket's aggregate compactly (see the module docstring)."""
    counts = agg.counts
    m = len(counts)
    c0 = counts[0] if m else 0
    uniform = counts.count(c0) == m
    parts = [_ROLLUP_HDR.pack(ROLLUP_VERSION, 1 if uniform else 0, m)]
    parts.append(_U32.pack(c0) if uniform else _u32s(m).pack(*counts))
    bits = 0
    values: list[float] = []
    mins, maxs, sums = agg.mins, agg.maxs, agg.sums
    for j in range(m):
        if counts[j] == 0:
            bits |= 1 << j
            values.append(NAN)
        elif mins[j] == maxs[j]:
            bits |= 1 << j
            values.append(mins[j])
        else:
            values.append(sums[j])
            values.append(mins[j])
            values.append(maxs[j])
    parts.append(bits.to_bytes((m + 7) // 8, "little"))
    parts.append(doubles(len(values)).pack(*values))
    return b"".join(parts)


class AggView:
    """The parsed header of a rollup row (cheap: one per row read)."""

    __slots__ = ("bits", "blob", "count", "data_off", "m")

    def __init__(self, blob: bytes) -> None:
        """Parse a rollup row's header (raises :class:`CodecError` on a bad blob)."""
        try:
            version, flags, m = _ROLLUP_HDR.unpack_from(blob, 0)
            off = _ROLLUP_HDR.size
            if flags & 1:
                count = _U32.unpack_from(blob, off)[0]
                off += 4
            else:
                count = -1  # per-metric counts follow
                off += 4 * m
        except struct.error as exc:
            raise CodecError(f"truncated rollup header: {exc}") from None
        if version != ROLLUP_VERSION:
            raise CodecError(f"unknown rollup version {version}")
        nb = (m + 7) // 8
        self.blob = blob
        self.m: int = m
        self.count: int = count
        self.bits = int.from_bytes(blob[off : off + nb], "little")
        self.data_off = off + nb

    @classmethod
    def parse(cls, blob: bytes) -> AggView:
        """Same as the constructor."""
        return cls(blob)

    def metric(self, j: int) -> tuple[int, float, float, float] | None:
        """``(count, sum, min, max)`` of metric ``j``, or ``None`` when it has no data here."""
        if j >= self.m:
            return None
        count = self.count
        if count < 0:
            count = _U32.unpack_from(self.blob, _ROLLUP_HDR.size + 4 * j)[0]
        if count == 0:
            return None
        bits = self.bits
        before = (bits & ((1 << j) - 1)).bit_count()
        pos = self.data_off + 8 * (3 * j - 2 * before)
        if bits >> j & 1:
            v = _F64.unpack_from(self.blob, pos)[0]
            return count, v * count, v, v
        s, lo, hi = _F64X3.unpack_from(self.blob, pos)
        return count, s, lo, hi

    def full(self) -> Agg:
        """The whole aggregate (for merging): one unpack, then a walk along the bitmap."""
        m, blob = self.m, self.blob
        shared = self.count >= 0
        counts = [self.count] * m if shared else list(_u32s(m).unpack_from(blob, _ROLLUP_HDR.size))
        values = doubles((len(blob) - self.data_off) // 8).unpack_from(blob, self.data_off)
        sums: list[float] = []
        mins: list[float] = []
        maxs: list[float] = []
        bits = self.bits
        p = 0
        for j in range(m):
            if bits >> j & 1:
                v = values[p]
                p += 1
                if counts[j]:
                    sums.append(v * counts[j])
                    mins.append(v)
                    maxs.append(v)
                else:
                    sums.append(0.0)
                    mins.append(INF)
                    maxs.append(-INF)
            else:
                sums.append(values[p])
                mins.append(values[p + 1])
                maxs.append(values[p + 2])
                p += 3
        return Agg(counts, sums, mins, maxs)


def rollup_metrics(blob: bytes, positions: list[int]) -> list[tuple[int, float, float, float] | None]:
    """``(count, sum, min, max)`` of the metrics at ``positions`` (-1: absent) of a rollup row.

    The query hot path: the header is parsed inline instead of building an :class:`AggView`.
    """
    try:
        version, flags, m = _ROLLUP_HDR.unpack_from(blob, 0)
    except struct.error as exc:
        raise CodecError(f"truncated rollup header: {exc}") from None
    if version != ROLLUP_VERSION:
        raise CodecError(f"unknown rollup version {version}")
    off = _ROLLUP_HDR.size
    count = -1
    if flags & 1:
        count = _U32.unpack_from(blob, off)[0]
        off += 4
    else:
        off += 4 * m
    nb = (m + 7) // 8
    bits = int.from_bytes(blob[off : off + nb], "little")
    off += nb
    out: list[tuple[int, float, float, float] | None] = []
    for j in positions:
        if j < 0 or j >= m:
            out.append(None)
            continue
        c = count if count >= 0 else _U32.unpack_from(blob, _ROLLUP_HDR.size + 4 * j)[0]
        if c == 0:
            out.append(None)
            continue
        before = (bits & ((1 << j) - 1)).bit_count()
        pos = off + 8 * (3 * j - 2 * before)
        if bits >> j & 1:
            v = _F64.unpack_from(blob, pos)[0]
            out.append((c, v * c, v, v))
        else:
            s, lo, hi = _F64X3.unpack_from(blob, pos)
            out.append((c, s, lo, hi))
    return out


class RollupPlans:
    """Where chosen metrics sit in rollup rows, cached per row shape.

    The offsets of the requested metrics depend only on the row's layout, its
    shared count and the single-value bits up to the last requested metric, and
    consecutive buckets of a node nearly always agree on those: a long series
    then decodes each row with one dict lookup and one ``unpack_from`` per metric.
    """

    __slots__ = ("_plans",)

    def __init__(self) -> None:
        self._plans: dict[tuple[int, int, int, int], list[tuple[int, int, int, bool]]] = {}

    def plan(self, lid: int, blob: bytes, positions: list[int]) -> list[tuple[int, int, int, bool]]:
        """``(k, count, offset, single)`` for each requested metric ``k`` with data in ``blob``."""
        try:
            version, flags, m = _ROLLUP_HDR.unpack_from(blob, 0)
            count = _U32.unpack_from(blob, _ROLLUP_HDR.size)[0] if flags & 1 else -1
        except struct.error as exc:
            raise CodecError(f"truncated rollup header: {exc}") from None
        if version != ROLLUP_VERSION:
            raise CodecError(f"unknown rollup version {version}")
        nb = (m + 7) // 8
        off = (8 if flags & 1 else 4 + 4 * m) + nb
        top = max(positions, default=-1)
        bits = int.from_bytes(blob[off - nb : off], "little") & ((2 << top) - 1 if top >= 0 else 0)
        key = (lid, m, count, bits)
        plan = self._plans.get(key) if count >= 0 else None
        if plan is None:
            plan = []
            for k, got in enumerate(rollup_metrics(blob, positions)):
                if got is not None:
                    j = positions[k]
                    before = (bits & ((1 << j) - 1)).bit_count()
                    plan.append((k, got[0], off + 8 * (3 * j - 2 * before), bool(bits >> j & 1)))
            if count >= 0:  # per-metric counts vary row by row: not worth caching
                self._plans[key] = plan
        return plan


unpack_f64x3 = _F64X3.unpack_from
