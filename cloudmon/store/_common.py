"""What every store backend shares: validation, tiers, rollup maths, queries, event and document encoding.

Rollups by deterministic recomputation
======================================

Both server backends compute a rollup bucket **from the stored data below
it**, never by accumulating deltas in the collector's memory: a 1 min bucket
is the aggregate of the raw samples in that minute, a 1 h bucket the merge of
its 1 min buckets.  Writing a sample marks its bucket *dirty* (in the server,
next to the sample); once the newest sample seen is ``grace_s`` past the
bucket's end (or at ``flush()``) a writer *claims* the mark with a lease,
recomputes the bucket and replaces it, which marks the next coarser bucket, and
only then removes the mark.  A writer killed in between leaves the claimed mark
in the server; any writer reclaims it once its lease has expired, so no bucket
whose samples are stored is left unbuilt.  A sample arriving during the
recomputation marks its bucket again, and that mark survives the release.

Why: the raw tier is deduplicated by ``(node, ts)`` in the server, so a
recomputed bucket counts every sample exactly once whatever was replayed, a
crash of a collector loses no open bucket (the mark is in the server), several
collectors can share one store (the same recomputation gives the same
result), and a late sample only marks its bucket again.  The cost is reading
each node-minute back once (≈ 60 samples) when it closes.

Queries on a rollup tier read its buckets; the range after the last written
bucket (the current, still open one) is read from the next finer tier, so
series are current up to the last write on every tier.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import msgspec

from cloudmon.store.base import MetricSeries, NodeRecord, Sample, StoreError, TierSpec

MAX_POINTS: Final = 100_000
INF: Final = math.inf
_TIER_NAME = re.compile(r"^[A-Za-z0-9_]{1,32}$")
_KIND = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

_VALUES = dict[str, float]
_convert = msgspec.convert

# An aggregate: metric -> [count, sum, min, max]
Agg = dict[str, list[float]]


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def finite(name: str, value: object) -> float:
    """``value`` as a float, or ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number of seconds, got {value!r}")
    return float(value)


def plan_tiers(tiers: Sequence[TierSpec]) -> tuple[TierSpec, list[TierSpec]]:
    """Check the tiers; return the raw tier and the rollup tiers from fine to coarse."""
    if not tiers:
        raise StoreError("tiers: at least the raw tier (resolution_s=1) is needed")
    names = [t.name for t in tiers]
    for t in tiers:
        if not _TIER_NAME.match(t.name):
            raise StoreError(f"tier name {t.name!r}: use 1-32 letters, digits or underscores")
        if t.resolution_s < 1 or t.retention_s <= 0:
            raise StoreError(f"tier {t.name!r}: resolution_s must be ≥ 1 and retention_s > 0")
    if len(set(names)) != len(names):
        raise StoreError(f"tiers: names must be unique, got {names}")
    raws = [t for t in tiers if t.resolution_s == 1]
    if len(raws) != 1:
        raise StoreError(f"tiers: exactly one raw tier with resolution_s=1 is needed, got {names}")
    rollups = sorted((t for t in tiers if t.resolution_s > 1), key=lambda t: t.resolution_s)
    prev = 1
    for t in rollups:
        if t.resolution_s % prev:
            raise StoreError(
                f"tier {t.name!r}: resolution_s {t.resolution_s} must be a multiple of {prev} "
                "(coarser rollups are built from finer ones)"
            )
        prev = t.resolution_s
    return raws[0], rollups


def check_node_record(rec: NodeRecord) -> tuple[float, float, str]:
    """``(first_seen, last_seen, info as JSON)`` of an inventory entry, or a clear error."""
    if not isinstance(rec.node_id, str) or not rec.node_id:
        raise ValueError(f"node record: node_id must be a non-empty string, got {rec.node_id!r}")
    where = f"node record {rec.node_id!r}"
    if not isinstance(rec.hostname, str):
        raise TypeError(f"{where}: hostname must be a string, got {rec.hostname!r}")
    first = finite(f"{where}: first_seen", rec.first_seen)
    last = finite(f"{where}: last_seen", rec.last_seen)
    try:
        info = json.dumps(dict(rec.info), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: info must be JSON-serialisable: {exc}") from None
    return first, last, info


def bad_values(sample: Sample) -> ValueError:
    """The clear error for a sample whose values are not a name -> number mapping."""
    where = f"sample of node {sample.node_id!r} at ts {sample.ts!r}"
    try:
        items: list[tuple[object, object]] = list(sample.values.items())
    except AttributeError:
        return ValueError(f"{where}: values must map metric names to numbers")
    for name, value in items:
        if not isinstance(name, str):
            return ValueError(f"{where}: metric names must be strings, got {name!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            return ValueError(
                f"{where}: metric {name!r} must be a number, got {type(value).__name__} {repr(value)[:40]}"
            )
    return ValueError(f"{where}: values must map metric names to numbers")


Prepared = tuple[str, int, dict[str, float]]  # node, ts_ms, finite values


def prepare(samples: Sequence[Sample]) -> list[Prepared]:
    """Validate a whole batch (``ValueError`` naming the field before anything is written).

    Non-finite values (NaN, ±inf) mean "no value" and are left out.  The result is
    sorted by time so that a stream receives a batch in order.
    """
    out: list[Prepared] = []
    for s in samples:
        if not isinstance(s.node_id, str) or not s.node_id:
            raise ValueError(f"sample node_id must be a non-empty string, got {s.node_id!r}")
        ts = s.ts
        if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
            raise ValueError(
                f"sample of node {s.node_id!r}: ts must be a finite number of seconds, got {ts!r}"
            )
        ts_ms = round(ts * 1000)
        if ts_ms <= 0:
            raise ValueError(f"sample of node {s.node_id!r}: ts must be > 0 (UNIX seconds), got {ts!r}")
        try:
            # msgspec checks names (str) and numbers (no bool, no str) in C: the hot path.
            raw = s.values if type(s.values) is dict else dict(s.values)
            values = _convert(raw, _VALUES)
        except (msgspec.ValidationError, TypeError, ValueError):
            raise bad_values(s) from None
        if not math.isfinite(sum(values.values())):
            values = {k: v for k, v in values.items() if math.isfinite(v)}
        out.append((s.node_id, ts_ms, values))
    out.sort(key=lambda p: p[1])
    return out


def aggregate(rows: Sequence[Mapping[str, float]]) -> Agg:
    """count/sum/min/max per metric over ``rows`` (each a metric -> value mapping)."""
    cols: dict[str, list[float]] = {}
    for row in rows:
        for k, v in row.items():
            col = cols.get(k)
            if col is None:
                cols[k] = [v]
            else:
                col.append(v)
    # Per column in C (len/sum/min/max) rather than per value in Python.
    return {k: [len(c), sum(c), min(c), max(c)] for k, c in cols.items()}


def merge(aggs: Sequence[Mapping[str, Sequence[float]]]) -> Agg:
    """The element-wise merge of aggregates."""
    out: Agg = {}
    for agg in aggs:
        for k, (c, s, lo, hi) in agg.items():
            a = out.get(k)
            if a is None:
                out[k] = [c, s, lo, hi]
            else:
                a[0] += c
                a[1] += s
                a[2] = min(a[2], lo)
                a[3] = max(a[3], hi)
    return out


@dataclass(frozen=True, slots=True)
class Query:
    """A checked ``series`` request, in milliseconds."""

    names: list[str]
    start_ms: int
    end_ms: int
    step_ms: int
    b0: int
    n: int


def check_query(metrics: Sequence[str], start: float, end: float, step: float) -> Query:
    """Validate ``series`` arguments (``ValueError`` naming the parameter) and align the buckets."""
    start_s, end_s, step_s = finite("start", start), finite("end", end), finite("step", step)
    if step_s <= 0:
        raise ValueError(f"step: must be > 0 seconds, got {step!r}")
    step_ms = round(step_s * 1000)
    if step_ms < 1:
        raise ValueError(f"step: must be at least 0.001 s, got {step!r}")
    if end_s <= start_s:
        raise ValueError(f"end: must be after start (start={start!r}, end={end!r})")
    if isinstance(metrics, str) or not all(isinstance(m, str) for m in metrics):
        raise ValueError(f"metrics: must be a list of metric names, got {metrics!r}")
    start_ms, end_ms = math.floor(start_s * 1000), math.ceil(end_s * 1000)
    b0 = start_ms // step_ms * step_ms
    n = -(-(end_ms - b0) // step_ms)
    if n > MAX_POINTS:
        raise ValueError(
            f"step: {step!r} s over [{start!r}, {end!r}) gives {n} points, more than {MAX_POINTS}; "
            "use a larger step or a shorter range"
        )
    return Query(list(dict.fromkeys(metrics)), start_ms, end_ms, step_ms, b0, n)


def pick_tier(
    raw: TierSpec, rollups: Sequence[TierSpec], step_s: float, start_ms: int, horizons: Mapping[str, int]
) -> TierSpec:
    """Coarsest tier with resolution ≤ step still holding ``start``; else a coarser one that does."""
    now_ms = time.time() * 1000
    tiers = [raw, *rollups]

    def covers(t: TierSpec) -> bool:
        return start_ms >= max(now_ms - t.retention_s * 1000, horizons.get(t.name, 0))

    fine = [t for t in reversed(tiers) if t.resolution_s <= step_s]
    coarse = [t for t in tiers if t.resolution_s > step_s]
    for t in (*fine, *coarse):
        if covers(t):
            return t
    return max(tiers, key=lambda t: (t.retention_s, t.resolution_s))


class StepAcc:
    """Per-step count/sum/min/max of the requested metrics."""

    __slots__ = ("cnt", "mn", "mx", "q", "sm")

    def __init__(self, q: Query) -> None:
        self.q = q
        k = len(q.names)
        self.cnt = [[0] * q.n for _ in range(k)]
        self.sm = [[0.0] * q.n for _ in range(k)]
        self.mn = [[INF] * q.n for _ in range(k)]
        self.mx = [[-INF] * q.n for _ in range(k)]

    def _index(self, t_ms: int) -> int:
        return max(0, (t_ms - self.q.b0) // self.q.step_ms)

    def add_raw(self, t_ms: int, values: Mapping[str, float]) -> None:
        """Fold one sample in (its step bucket)."""
        i = self._index(t_ms)
        if i >= self.q.n:
            return
        for k, name in enumerate(self.q.names):
            v = values.get(name)
            if v is None:
                continue
            self.cnt[k][i] += 1
            self.sm[k][i] += v
            if v < self.mn[k][i]:
                self.mn[k][i] = v
            if v > self.mx[k][i]:
                self.mx[k][i] = v

    def add_agg(self, t_ms: int, agg: Mapping[str, Sequence[float]]) -> None:
        """Fold one rollup bucket in (the step bucket holding its start)."""
        i = self._index(t_ms)
        if i >= self.q.n:
            return
        for k, name in enumerate(self.q.names):
            a = agg.get(name)
            if a is None:
                continue
            c, s, lo, hi = a
            self.cnt[k][i] += int(c)
            self.sm[k][i] += s
            self.mn[k][i] = min(self.mn[k][i], lo)
            self.mx[k][i] = max(self.mx[k][i], hi)

    def add_metric(self, k: int, t_ms: int, c: int, s: float, lo: float, hi: float) -> None:
        """Fold one rollup bucket of metric ``k`` (its index in the query) in."""
        i = self._index(t_ms)
        if i >= self.q.n or c <= 0:
            return
        self.cnt[k][i] += c
        self.sm[k][i] += s
        if lo < self.mn[k][i]:
            self.mn[k][i] = lo
        if hi > self.mx[k][i]:
            self.mx[k][i] = hi

    def result(self) -> dict[str, MetricSeries]:
        """avg/min/max lists per metric (``None`` where a step has no data)."""
        out: dict[str, MetricSeries] = {}
        for k, name in enumerate(self.q.names):
            cnt = self.cnt[k]
            out[name] = MetricSeries(
                avg=[s / c if c else None for s, c in zip(self.sm[k], cnt, strict=True)],
                min=[v if c else None for v, c in zip(self.mn[k], cnt, strict=True)],
                max=[v if c else None for v, c in zip(self.mx[k], cnt, strict=True)],
            )
        return out

    def timestamps(self) -> list[float]:
        """Start of every step bucket, in seconds."""
        q = self.q
        return [(q.b0 + i * q.step_ms) / 1000 for i in range(q.n)]


def check_kind_key(kind: object, key: object = "x") -> None:
    """``ValueError`` unless ``kind`` is a short identifier and ``key`` a non-empty string."""
    if not isinstance(kind, str) or not _KIND.match(kind):
        raise ValueError(f"kind: use 1-64 letters, digits, '_', '.' or '-', got {kind!r}")
    if not isinstance(key, str) or not key or len(key) > 512:
        raise ValueError(f"key: must be a non-empty string of at most 512 characters, got {key!r}")


def event_ts(event: Mapping[str, object]) -> float:
    """The event's ``ts`` (UNIX seconds; now when absent), or ``ValueError``."""
    if not isinstance(event, Mapping):
        raise TypeError(f"event: must be a mapping, got {type(event).__name__}")
    ts = event.get("ts")
    if ts is None:
        return time.time()
    return finite("event ts", ts)


def encode_event(event: Mapping[str, object]) -> tuple[str, float, str]:
    """A new event's id, its ``ts`` and its JSON body (``ValueError`` if it cannot be stored)."""
    ts = event_ts(event)
    eid = uuid.uuid4().hex
    try:
        body = json.dumps({**event, "ts": ts, "id": eid}, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"event: must be JSON-serialisable: {exc}") from None
    return eid, ts, body


#: Extra events a millisecond-keyed store reads past each end of a range (see :func:`events_in`).
EVENT_SLACK: Final = 64


def event_key_range(start: float, end: float) -> tuple[int, int]:
    """Millisecond keys ``[lo, hi)`` that cover every event with ``start <= ts < end``.

    Stores key events by ``round(ts * 1000)``, so an event in the last half
    millisecond before ``end`` has the same key as ``end`` itself: the range is
    widened by a millisecond each side and :func:`events_in` cuts it exactly.
    """
    return math.floor(start * 1000) - 1, math.ceil(end * 1000) + 1


def events_in(
    bodies: list[dict[str, object]], start: float, end: float, limit: int
) -> list[dict[str, object]]:
    """Of ``bodies`` (oldest first), those with ``start <= ts < end``: the newest ``limit``."""
    inside = [b for b in bodies if start <= float(b["ts"]) < end]  # type: ignore[arg-type]
    return inside[-limit:]


def encode_document(kind: str, key: str, doc: Mapping[str, object]) -> str:
    """A document's JSON body, after checking ``kind`` and ``key``."""
    check_kind_key(kind, key)
    try:
        return json.dumps(dict(doc), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"doc: must be a JSON-serialisable mapping: {exc}") from None
