"""The embedded telemetry store: one SQLite file, no server (``sqlite:///abs/path/file.db``).

Design (and why)
================

The target is 5,000 nodes reporting once a second (≈5,000 samples/s of 40–60
metrics each) on a 2-core machine with CPU left for HTTP, and a 1 h / 1 s query
of one node in ≤ 10 ms.  Stdlib only (``sqlite3``, ``struct``): the headless
collector needs no numpy.

*One row per sample, never one row per metric*, and each node's samples are
packed by a **layout**: an ordered tuple of metric names stored once in
``layouts`` (shared by every node with the same names, cached in memory).  A
sample row holds its values as packed float64 in layout order; a sample with
new names switches its node to a layout of the old names plus the new ones
(missing names read as NaN, i.e. "no value").  When a node's samples cover
less than half of its layout (metrics that came and went, e.g. per-VM names),
the node starts a fresh layout of just its current names so rows do not fill
up with NaN.

Why not the obvious ``raw(node_key, ts_ms, layout, vals) PRIMARY KEY(node_key,
ts_ms)`` table?  Measured here with 5,000 nodes × 45 metrics it takes
40–50 µs per sample (12–25k rows/s, slowing as the file grows): every commit
dirties one b-tree page per node, ≈4 kB of WAL for a 400-byte sample.  The same
rows keyed by time go in at ≈100k rows/s.  So writes land in a small
time-ordered **head**, and a **compaction** moves them per node into
column-major **blocks** and folds them into the rollup tiers:

* ``head_P_G(sec, node_key, ts_ms, layout, vals) WITHOUT ROWID``, primary key
  ``(sec, node_key, ts_ms)``: 2 × G tables (P: parity of the sample's
  compaction span, G = 16 node groups by ``node_key % G``).  Inserts touch
  only the right edge of each b-tree; a per-second primary-key seek finds one
  node's rows.
* ``blocks(node_key, t0_ms, t1_ms, layout, data) WITHOUT ROWID``, key
  ``(node_key, t0_ms)``: one row per node per compaction span (60 s by
  default) holding its samples column by column (:mod:`._codec`), constant
  columns stored once.  A node's time range is contiguous: 1 h of 1 s data is
  60 rows, and a query decodes only the columns it asks for.
* ``"rollup_<tier>"(node_key, bucket, layout, data) WITHOUT ROWID``: one row
  per node per bucket with count/sum/min/max per metric (one shared count and
  one float for metrics that did not change in the bucket).

Pages are 16 KiB so that a block (~17 KiB for a node-minute of 45 metrics)
costs two page reads when the file is not in the OS cache.

Rollups are not accumulated in memory.  Compaction of node group G up to a
cutoff C (the end of a span, once the newest sample written is ``grace_s``
past it; everything at ``flush()``/``close()``) runs in **one transaction**:
read the group's head rows older than C, write their blocks, merge their
aggregates into every rollup tier (read-modify-write where the bucket row
exists: a partial bucket written by ``flush()``/``close()`` before a reopen,
late samples, and the coarser tiers, which are updated every span), delete
those head rows (a head table whose rows are all compacted is emptied at once,
which SQLite does without visiting rows) and advance the group's watermark
``head_state.wm_ms``.  So rollups are derived from committed data only: a crash
loses nothing that was committed, never counts a sample twice, and there is no
open bucket to lose.  Each ``write_samples`` spends at most a small budget on
compaction (one node group per transaction), so the writer never stalls for a
whole minute's worth.

Reads run in one snapshot in which every sample is either still in the head
or compacted, never both: the raw tier is blocks plus head rows; a rollup tier
is its rows plus the head rows not yet folded in, so series are current up to
the last write even on the coarse tiers.  Late samples (older than their
group's watermark) are visible at once and compacted with the group's next
span, so a node whose clock lags still gets one block per span.

Exactly-once: ``(node, ts_ms)`` is the head's key (``INSERT OR IGNORE``), and a
sample older than its group's watermark is first looked up in that node's
blocks, so a replayed sample never makes a second row nor counts twice.

Threads: one writer connection used under a lock (``write_samples``,
``upsert_nodes``, ``enforce_retention``, ``flush``, ``close``) and one reader
connection per reader thread (WAL: readers never block the writer nor each
other).  Durability: WAL with ``synchronous=NORMAL``; ``flush()`` compacts
everything and checkpoints.  One store object per file.

Retention drops whole blocks whose newest sample is older than the raw tier's
cutoff and whole rollup buckets that ended before their tier's cutoff, node by
node in short transactions.  ``series`` picks, among tiers with resolution ≤
``step``, the coarsest whose retention still covers ``start``; if none does it
falls back to coarser tiers (their values land on the step bucket holding
their bucket's start).  Tiers: exactly one raw tier (resolution 1 s); each
rollup's resolution must be a multiple of the previous one's.

Measured on the 2-core dev machine (``tests/benchmarks/bench_store.py`` has the
details): 5,000 nodes × 44 metrics cost ≈16 µs of CPU per sample, compaction
included (≈8 % of one core at 5,000 samples/s); a 1 h / 1 s query of one node
with 5,000 nodes' hour in the file (6 GB) takes ≈3 ms warm, 12–21 ms when read
from disk; 24 h at 60 s from the 1 m tier ≈4 ms.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sqlite3
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from operator import itemgetter
from pathlib import Path
from typing import Final
from urllib.parse import unquote, urlsplit

from cloudmon.store._codec import (
    NAN,
    Agg,
    AggView,
    BlockView,
    CodecError,
    RollupPlans,
    aggregate,
    doubles,
    encode_agg,
    encode_block,
    unpack_f64x3,
)
from cloudmon.store._common import (
    EVENT_SLACK,
    check_kind_key,
    check_node_record,
    check_query,
    encode_document,
    encode_event,
    event_key_range,
    events_in,
    finite,
    plan_tiers,
)
from cloudmon.store.base import (
    DEFAULT_TIERS,
    MetricSeries,
    NodeRecord,
    Sample,
    SeriesResult,
    StoreError,
    StoreUnavailable,
    TierSpec,
)

log = logging.getLogger(__name__)

APPLICATION_ID: Final = 0x636D6F6E  # "cmon" in the SQLite header: marks our files
SCHEMA_VERSION: Final = 1
MAX_POINTS: Final = 100_000
_GROUPS: Final = 16  # node groups: one compaction transaction handles 1/16 of the nodes
_DEFAULT_SPAN_S: Final = 60
_MAX_SPAN_S: Final = 3600
_RESET_MIN: Final = 16  # layouts shorter than this never restart (NaN padding is cheap there)
_FUTURE_MS: Final = 60_000  # samples further ahead of the wall clock do not drive compaction
_SEEK_LIMIT_S: Final = 4_000  # head reads: per-second seeks up to this range, a scan beyond
_BUSY_TIMEOUT_S: Final = 10.0
_RETENTION_CHUNK: Final = 200  # node ranges per retention transaction
_COMPACT_BUDGET_S: Final = 0.15  # compaction time per write_samples call

# Primary SQLite result codes (sqlite3.h), for turning errors into clear messages.
_SQLITE_PERM, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 3, 5, 6, 8
_SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 10, 11, 13, 14, 26

_F64 = struct.Struct("<d")
_first = itemgetter(0)

Row = tuple[int, int, int, int, bytes]  # head row: sec, node_key, ts_ms, layout, vals
Entry = tuple[int, int, int, Agg]  # rollup delta: node_key, bucket (s), layout, aggregate
Undo = list[Callable[[], None]]


class _Node:
    """The writer's view of one node: its key, group and current layout."""

    __slots__ = ("group", "index", "key", "layout", "names", "node_id", "packer")

    def __init__(self, key: int, node_id: str, group: int) -> None:
        self.key = key
        self.node_id = node_id
        self.group = group
        self.layout = -1
        self.names: tuple[str, ...] = ()
        self.index: dict[str, int] = {}
        self.packer = doubles(0)


class _Acc:
    """Per-step accumulators (count/sum/min/max) of the requested metrics."""

    __slots__ = ("cnt", "mn", "mx", "n", "sm")

    def __init__(self, n: int, k: int) -> None:
        self.n = n
        self.cnt = [[0] * n for _ in range(k)]
        self.sm = [[0.0] * n for _ in range(k)]
        self.mn = [[0.0] * n for _ in range(k)]
        self.mx = [[0.0] * n for _ in range(k)]

    def add_values(self, k: int, idxs: Sequence[int], values: Sequence[float]) -> None:
        """Fold raw values (NaN = no value) into step buckets ``idxs``."""
        n = self.n
        cnt, sm, mn, mx = self.cnt[k], self.sm[k], self.mn[k], self.mx[k]
        length = len(idxs)
        if length > 1:
            a, b = idxs[0], idxs[-1] + 1
            total = sum(values)
            # One value per bucket, consecutive, none there yet, no NaN: a slice copy
            # (the usual 1 s samples read at a 1 s step).
            if b - a == length and a >= 0 and b <= n and total == total and not any(cnt[a:b]):
                sm[a:b] = mn[a:b] = mx[a:b] = values
                cnt[a:b] = [1] * length
                return
        for i, v in zip(idxs, values, strict=True):
            if v != v or i < 0 or i >= n:
                continue
            c = cnt[i]
            if c:
                sm[i] += v
                if v < mn[i]:
                    mn[i] = v
                elif v > mx[i]:
                    mx[i] = v
            else:
                sm[i] = mn[i] = mx[i] = v
            cnt[i] = c + 1

    def series(self, k: int) -> MetricSeries:
        cnt = self.cnt[k]
        return MetricSeries(
            avg=[s / c if c else None for s, c in zip(self.sm[k], cnt, strict=True)],
            min=[v if c else None for v, c in zip(self.mn[k], cnt, strict=True)],
            max=[v if c else None for v, c in zip(self.mx[k], cnt, strict=True)],
        )


def parse_url(url: str) -> Path:
    """The absolute file path of a ``sqlite:///abs/path/file.db`` URL, or :class:`StoreError`."""
    hint = "use sqlite:///abs/path/file.db, i.e. 'sqlite://' followed by an absolute file path"
    parts = urlsplit(str(url))
    if parts.scheme != "sqlite":
        raise StoreError(f"not an embedded store URL: {url!r}; {hint}")
    if parts.netloc not in ("", "localhost"):
        raise StoreError(f"store URL {url!r} names a host ({parts.netloc!r}) or a relative path; {hint}")
    if parts.query or parts.fragment:
        raise StoreError(
            f"store URL {url!r} has a query or fragment, which the embedded store does not take; {hint}"
        )
    raw = unquote(parts.path)
    if sys.platform == "win32" and re.match(r"^/+[A-Za-z]:[/\\]", raw):
        raw = raw.lstrip("/")  # sqlite:///C:/dir/file.db
    elif raw.startswith("//"):
        raw = "/" + raw.lstrip("/")  # sqlite:////abs/path (SQLAlchemy's spelling) is the same file
    path = Path(raw)
    if not raw or not path.is_absolute() or raw.endswith(("/", "\\")) or path.name in ("", ".", ".."):
        raise StoreError(f"store URL {url!r} does not name an absolute file path; {hint}")
    return path


def _plan_tiers(tiers: Sequence[TierSpec]) -> tuple[TierSpec, list[TierSpec], int]:
    """Check the tiers (shared rules); return the raw tier, the rollups (fine to coarse) and the block span."""
    raw, rollups = plan_tiers(tiers)
    span = _DEFAULT_SPAN_S
    if rollups:
        r1 = rollups[0].resolution_s
        if r1 > _MAX_SPAN_S:
            raise StoreError(
                f"tier {rollups[0].name!r}: the finest rollup must have resolution_s ≤ {_MAX_SPAN_S}"
            )
        span = r1 * max(1, _DEFAULT_SPAN_S // r1)
    return raw, rollups, span


def _bad_values(sample: Sample) -> ValueError:
    where = f"sample of node {sample.node_id!r} at ts {sample.ts!r}"
    items: list[tuple[object, object]] = list(sample.values.items())  # checked: may come from anywhere
    for name, value in items:
        if not isinstance(name, str):
            return ValueError(f"{where}: metric names must be strings, got {name!r}")
        try:
            _F64.pack(value)
        except (struct.error, TypeError, OverflowError):
            shown = repr(value)[:40]
            return ValueError(
                f"{where}: metric {name!r} must be a number, got {type(value).__name__} {shown}"
            )
    return ValueError(f"{where}: values must map metric names to numbers")


class EmbeddedStore:
    """A :class:`~cloudmon.store.base.TelemetryStore` in one SQLite file (see the module docstring).

    ``grace_s``: how far the newest sample must be past a span's end before the
    span is compacted (absorbs clock skew and batching).  ``max_size_bytes``:
    optional cap on the database file; beyond it writes fail with
    :class:`StoreUnavailable` exactly as on a full disk.
    """

    tiers: Sequence[TierSpec]

    def __init__(
        self,
        url: str,
        tiers: Sequence[TierSpec] = DEFAULT_TIERS,
        *,
        grace_s: float = 10.0,
        max_size_bytes: int | None = None,
        cache_mib: int = 64,
    ) -> None:
        self.url = url
        self.path = parse_url(url)
        self.tiers = tuple(tiers)
        self._raw, self._rollups, span_s = _plan_tiers(self.tiers)
        self._tables = {t.name: f"rollup_{t.name}" for t in self._rollups}
        self._grace_ms = int(finite("grace_s", grace_s) * 1000)
        self._max_size = max_size_bytes
        self._cache_kib = max(1, cache_mib) * 1024
        self._wlock = threading.RLock()
        self._gate = threading.Condition(threading.Lock())
        self._active = 0
        self._closing = False
        self._closed = False
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        # Layout caches, shared by every thread: layouts never change once written.
        self._lay_names: dict[int, tuple[str, ...]] = {}
        self._lay_ids: dict[tuple[str, ...], int] = {}
        self._lay_index: dict[int, dict[str, int]] = {}
        self._remaps: dict[tuple[int, int], list[int]] = {}
        # Writer state (under _wlock).
        self._nodes: dict[str, _Node] = {}
        self._wm: list[int] = []
        self._max_seen_ms = 0
        self._horizon_ms: dict[str, int] = {}
        #: Samples refused because they were older than the raw tier's retention.
        self.skipped_expired = 0
        self._compact_warned = -math.inf
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create the store directory {self.path.parent}: {exc}") from exc
        if self.path.is_dir():
            raise StoreError(
                f"store path {self.path} is a directory; name a file, e.g. {self.path / 'telemetry.db'}"
            )
        self._wcon = self._connect(write=True)
        try:
            self._span_ms, self._groups = self._init_schema(span_s)
            self._load_state()
        except sqlite3.Error as exc:
            self._wcon.close()
            raise self._error(exc, "opening") from exc
        except BaseException:
            self._wcon.close()
            raise
        self._insert_sql = [
            f"INSERT OR IGNORE INTO {self._head(p, g)} VALUES (?,?,?,?,?)"
            for p in (0, 1)
            for g in range(self._groups)
        ]
        log.info(
            "opened embedded store %s (%d nodes, tiers %s)",
            self.path,
            len(self._nodes),
            ", ".join(f"{t.name}={t.resolution_s}s/{t.retention_s}s" for t in self.tiers),
        )

    def __repr__(self) -> str:
        return f"EmbeddedStore({self.url!r})"

    def __enter__(self) -> EmbeddedStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connections and errors -------------------------------------------------------------

    def _connect(self, *, write: bool) -> sqlite3.Connection:
        try:
            con = sqlite3.connect(
                self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise self._error(exc, "opening") from exc
        try:
            if write:
                # 16 KiB pages (new files only: before WAL and the first table): a block of
                # one node-minute (~17 KiB) then costs two page reads instead of five, which
                # is what a query pays when the file is not in the page cache (measured:
                # 1 h at 1 s cold 12 ms instead of 34 ms), and a rollup row stays in its page.
                con.execute("PRAGMA page_size=16384")
                self._enable_wal(con)
                con.execute("PRAGMA synchronous=NORMAL")
                # Fewer, larger checkpoints: each one fsyncs; the WAL is cut back afterwards.
                con.execute("PRAGMA wal_autocheckpoint=4000")
                con.execute(f"PRAGMA journal_size_limit={64 * 1024 * 1024}")
                if self._max_size is not None:
                    page = con.execute("PRAGMA page_size").fetchone()[0]
                    con.execute(f"PRAGMA max_page_count={max(1, int(self._max_size) // int(page))}")
                con.execute(f"PRAGMA cache_size=-{self._cache_kib}")
            else:
                con.execute("PRAGMA query_only=1")
                con.execute(f"PRAGMA cache_size=-{max(2048, self._cache_kib // 4)}")
        except sqlite3.Error as exc:
            con.close()
            raise self._error(exc, "opening") from exc
        except BaseException:
            con.close()
            raise
        return con

    def _enable_wal(self, con: sqlite3.Connection) -> None:
        mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreUnavailable(
                f"cannot use write-ahead logging on {self.path} (journal mode stays {mode!r}); "
                "is the file or its directory read-only?"
            )

    def _error(self, exc: sqlite3.Error, doing: str) -> StoreError:
        """A typed error with a message that says what is wrong, where, and what to do."""
        code = int(getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
        text = str(exc).lower()
        where = f"{doing} {self.path}"
        if code == _SQLITE_FULL or "disk is full" in text:
            return StoreUnavailable(
                f"disk full (or the store's size limit reached) while {where}: {exc}; "
                "free space or shorten retention (data committed before this call is kept)"
            )
        if code in (_SQLITE_READONLY, _SQLITE_PERM) or "readonly" in text:
            return StoreUnavailable(
                f"store is read-only while {where}: {exc}; make the file and its directory writable "
                "(SQLite also creates -wal and -shm files next to it)"
            )
        if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or "not a database" in text or "malformed" in text:
            return StoreUnavailable(
                f"store file is corrupt or not a cloudmon store while {where}: {exc}; move it aside "
                "(`sqlite3 FILE .recover` may rescue data) and start a new file"
            )
        if code == _SQLITE_CANTOPEN or "unable to open" in text:
            return StoreUnavailable(
                f"cannot open the store file while {where}: {exc}; check that the directory exists and is writable"
            )
        if code in (_SQLITE_BUSY, _SQLITE_LOCKED) or "locked" in text:
            return StoreUnavailable(f"store is locked by another process while {where}: {exc}")
        if code == _SQLITE_IOERR or "i/o error" in text:
            return StoreUnavailable(f"I/O error while {where}: {exc}")
        return StoreError(f"SQLite error while {where}: {exc}")

    def _reader(self) -> sqlite3.Connection:
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is None:
            con = self._connect(write=False)
            self._local.con = con
            with self._gate:
                self._readers.append(con)
        return con

    @contextmanager
    def _reading(self, doing: str) -> Iterator[sqlite3.Connection]:
        """A reader connection inside one read transaction (a consistent snapshot)."""
        with self._gate:
            if self._closing or self._closed:
                raise StoreError(f"store {self.path} is closed")
            self._active += 1
        try:
            con = self._reader()
            con.execute("BEGIN")
            try:
                yield con
            finally:
                if con.in_transaction:
                    con.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._error(exc, doing) from exc
        except CodecError as exc:
            raise StoreUnavailable(f"store file is corrupt while {doing} {self.path}: {exc}") from exc
        finally:
            with self._gate:
                self._active -= 1
                if not self._active:
                    self._gate.notify_all()

    def _check_open(self) -> None:
        if self._closing or self._closed:
            raise StoreError(f"store {self.path} is closed")

    @contextmanager
    def _writing(self, doing: str) -> Iterator[Undo]:
        """One write transaction on the writer connection; cache changes are undone on failure."""
        con = self._wcon
        undo: Undo = []
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield undo
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                for step in reversed(undo):
                    step()
                raise
        except sqlite3.Error as exc:
            raise self._error(exc, doing) from exc
        except CodecError as exc:
            raise StoreUnavailable(f"store file is corrupt while {doing} {self.path}: {exc}") from exc

    # -- schema and state ---------------------------------------------------------------------

    @staticmethod
    def _head(p: int, g: int) -> str:
        return f"head_{p}_{g}"

    def _init_schema(self, span_s: int) -> tuple[int, int]:
        con = self._wcon
        with self._writing("creating the schema of"):
            app = con.execute("PRAGMA application_id").fetchone()[0]
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if app != APPLICATION_ID:
                if tables:
                    raise StoreError(
                        f"{self.path} is an SQLite database of another application (application_id {app:#x}); "
                        "point the store URL at a new file"
                    )
                con.execute(f"PRAGMA application_id={APPLICATION_ID}")
            con.execute("CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID")
            meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
            version = meta.get("schema_version")
            if version is not None and version != SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has store schema version {version}; this cloudmon reads version {SCHEMA_VERSION}"
                )
            groups = int(meta.get("head_groups", _GROUPS))
            stored_span = meta.get("span_s")
            if stored_span is not None:
                span_s = int(stored_span)
                if self._rollups and span_s % self._rollups[0].resolution_s:
                    raise StoreError(
                        f"{self.path} was created with {span_s} s blocks; tier {self._rollups[0].name!r} "
                        f"({self._rollups[0].resolution_s} s) does not divide them; keep the old tiers or use a new file"
                    )
            for t in self._rollups:
                res = meta.get(f"tier:{t.name}")
                if res is not None and int(res) != t.resolution_s:
                    raise StoreError(
                        f"tier {t.name!r} of {self.path} has resolution {res} s, not {t.resolution_s} s; "
                        "keep the resolution or use another tier name"
                    )
            settings = {"schema_version": SCHEMA_VERSION, "head_groups": groups, "span_s": span_s}
            settings.update({f"tier:{t.name}": t.resolution_s for t in self._rollups})
            con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(settings.items()))
            con.execute(
                "CREATE TABLE IF NOT EXISTS layouts(id INTEGER PRIMARY KEY, names TEXT NOT NULL UNIQUE)"
            )
            con.execute(
                "CREATE TABLE IF NOT EXISTS series_nodes("
                "node_key INTEGER PRIMARY KEY, node_id TEXT NOT NULL UNIQUE, layout INTEGER NOT NULL)"
            )
            con.execute(
                "CREATE TABLE IF NOT EXISTS node_layouts(node_key INTEGER NOT NULL, layout INTEGER NOT NULL, "
                "PRIMARY KEY(node_key, layout)) WITHOUT ROWID"
            )
            con.execute(
                "CREATE TABLE IF NOT EXISTS inventory(node_id TEXT PRIMARY KEY, hostname TEXT NOT NULL, "
                "first_seen REAL NOT NULL, last_seen REAL NOT NULL, info TEXT NOT NULL) WITHOUT ROWID"
            )
            con.execute(
                "CREATE TABLE IF NOT EXISTS head_state(grp INTEGER PRIMARY KEY, wm_ms INTEGER NOT NULL)"
            )
            # The event log (every decision and action) and configuration documents.
            con.execute(
                "CREATE TABLE IF NOT EXISTS events(seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                "id TEXT NOT NULL UNIQUE, ts_ms INTEGER NOT NULL, body TEXT NOT NULL)"
            )
            con.execute("CREATE INDEX IF NOT EXISTS events_ts ON events(ts_ms)")
            con.execute(
                "CREATE TABLE IF NOT EXISTS documents(kind TEXT NOT NULL, key TEXT NOT NULL, "
                "body TEXT NOT NULL, PRIMARY KEY(kind, key)) WITHOUT ROWID"
            )
            con.executemany("INSERT OR IGNORE INTO head_state VALUES (?, 0)", [(g,) for g in range(groups)])
            for p in (0, 1):
                for g in range(groups):
                    con.execute(
                        f"CREATE TABLE IF NOT EXISTS {self._head(p, g)}(sec INTEGER NOT NULL, "
                        "node_key INTEGER NOT NULL, ts_ms INTEGER NOT NULL, layout INTEGER NOT NULL, "
                        "vals BLOB NOT NULL, PRIMARY KEY(sec, node_key, ts_ms)) WITHOUT ROWID"
                    )
            con.execute(
                "CREATE TABLE IF NOT EXISTS blocks(node_key INTEGER NOT NULL, t0_ms INTEGER NOT NULL, "
                "t1_ms INTEGER NOT NULL, layout INTEGER NOT NULL, data BLOB NOT NULL, "
                "PRIMARY KEY(node_key, t0_ms)) WITHOUT ROWID"
            )
            for table in self._tables.values():
                con.execute(
                    f'CREATE TABLE IF NOT EXISTS "{table}"(node_key INTEGER NOT NULL, bucket INTEGER NOT NULL, '
                    "layout INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY(node_key, bucket)) WITHOUT ROWID"
                )
        return span_s * 1000, groups

    def _load_state(self) -> None:
        con = self._wcon
        for lid, names_json in con.execute("SELECT id, names FROM layouts"):
            self._cache_layout(int(lid), tuple(json.loads(names_json)))
        for key, node_id, layout in con.execute("SELECT node_key, node_id, layout FROM series_nodes"):
            node = _Node(int(key), str(node_id), int(key) % self._groups)
            self._apply_layout(node, int(layout))
            self._nodes[node.node_id] = node
        wm = dict(con.execute("SELECT grp, wm_ms FROM head_state").fetchall())
        self._wm = [int(wm.get(g, 0)) for g in range(self._groups)]
        newest = max(self._wm) - 1
        for p in (0, 1):
            for g in range(self._groups):
                t = self._head(p, g)
                row = con.execute(
                    f"SELECT MAX(ts_ms) FROM {t} WHERE sec = (SELECT MAX(sec) FROM {t})"
                ).fetchone()
                if row[0] is not None:
                    newest = max(newest, int(row[0]))
        self._max_seen_ms = max(newest, 0)
        for key, value in con.execute("SELECT key, value FROM meta WHERE key LIKE 'horizon:%'"):
            self._horizon_ms[str(key).partition(":")[2]] = int(value)

    # -- layouts ------------------------------------------------------------------------------

    def _cache_layout(self, lid: int, names: tuple[str, ...]) -> None:
        self._lay_index[lid] = {n: i for i, n in enumerate(names)}
        self._lay_ids[names] = lid
        self._lay_names[lid] = names

    def _names(self, lid: int, con: sqlite3.Connection | None = None) -> tuple[str, ...]:
        names = self._lay_names.get(lid)
        if names is None:
            row = (con or self._reader()).execute("SELECT names FROM layouts WHERE id=?", (lid,)).fetchone()
            if row is None:
                raise CodecError(f"layout {lid} is missing")
            names = tuple(json.loads(row[0]))
            self._cache_layout(lid, names)
        return names

    def _index(self, lid: int, con: sqlite3.Connection | None = None) -> dict[str, int]:
        index = self._lay_index.get(lid)
        if index is None:
            self._names(lid, con)
            index = self._lay_index[lid]
        return index

    def _layout_id(self, names: tuple[str, ...], undo: Undo) -> int:
        """The id of the layout ``names``, created (in the open write transaction) if new."""
        lid = self._lay_ids.get(names)
        if lid is not None:
            return lid
        cur = self._wcon.execute("INSERT INTO layouts(names) VALUES (?)", (json.dumps(list(names)),))
        lid = int(cur.lastrowid or 0)
        self._cache_layout(lid, names)

        def forget() -> None:
            self._lay_ids.pop(names, None)
            self._lay_names.pop(lid, None)
            self._lay_index.pop(lid, None)
            for pair in [p for p in self._remaps if lid in p]:
                del self._remaps[pair]

        undo.append(forget)
        return lid

    def _apply_layout(self, node: _Node, lid: int) -> None:
        node.layout = lid
        node.names = self._names(lid, self._wcon)
        node.index = self._lay_index[lid]
        node.packer = doubles(len(node.names))

    def _set_node_layout(self, node: _Node, lid: int, undo: Undo) -> None:
        old = node.layout
        self._wcon.execute("UPDATE series_nodes SET layout=? WHERE node_key=?", (lid, node.key))
        self._wcon.execute("INSERT OR IGNORE INTO node_layouts VALUES (?, ?)", (node.key, lid))
        self._apply_layout(node, lid)
        undo.append(lambda: self._apply_layout(node, old))

    def _union(self, a: int, b: int, undo: Undo) -> int:
        """A layout holding every name of layouts ``a`` and ``b`` (one of them when it can)."""
        if a == b:
            return a
        na, nb = self._names(a, self._wcon), self._names(b, self._wcon)
        ia, ib = self._lay_index[a], self._lay_index[b]
        if all(n in ia for n in nb):
            return a
        if all(n in ib for n in na):
            return b
        return self._layout_id(na + tuple(n for n in nb if n not in ia), undo)

    def _positions(self, frm: int, to: int) -> list[int]:
        key = (frm, to)
        pos = self._remaps.get(key)
        if pos is None:
            index = self._lay_index[to]
            pos = [index[n] for n in self._names(frm, self._wcon)]
            self._remaps[key] = pos
        return pos

    def _remap_row(self, blob: bytes, frm: int, to: int) -> bytes:
        m_to = len(self._names(to, self._wcon))
        out = [NAN] * m_to
        values = doubles(len(blob) // 8).unpack(blob)
        for v, k in zip(values, self._positions(frm, to), strict=True):
            out[k] = v
        return doubles(m_to).pack(*out)

    def _agg_to(self, agg: Agg, frm: int, to: int) -> Agg:
        if frm == to:
            return agg
        return agg.remapped(self._positions(frm, to), len(self._names(to, self._wcon)))

    def _merge(self, la: int, a: Agg, lb: int, b: Agg, undo: Undo) -> tuple[int, Agg]:
        if la == lb:
            return la, a.merged(b)
        target = self._union(la, lb, undo)
        return target, self._agg_to(a, la, target).merged(self._agg_to(b, lb, target))

    # -- writing ------------------------------------------------------------------------------

    def _add_node(self, node_id: str, undo: Undo) -> _Node:
        if not isinstance(node_id, str) or not node_id:
            raise ValueError(f"sample node_id must be a non-empty string, got {node_id!r}")
        empty = self._layout_id((), undo)
        cur = self._wcon.execute("INSERT INTO series_nodes(node_id, layout) VALUES (?, ?)", (node_id, empty))
        key = int(cur.lastrowid or 0)
        self._wcon.execute("INSERT OR IGNORE INTO node_layouts VALUES (?, ?)", (key, empty))
        node = _Node(key, node_id, key % self._groups)
        self._apply_layout(node, empty)
        self._nodes[node_id] = node

        def forget() -> None:
            self._nodes.pop(node_id, None)

        undo.append(forget)
        return node

    def _pack_slow(self, node: _Node, sample: Sample, undo: Undo) -> bytes:
        """Pack a sample whose names differ from its node's layout (switching layout if needed)."""
        values = sample.values
        keys = list(values)
        for k in keys:
            if not isinstance(k, str):
                raise _bad_values(sample)
        index = node.index
        new = tuple(dict.fromkeys(k for k in keys if k not in index))
        if new or (len(node.names) >= _RESET_MIN and 2 * len(keys) < len(node.names)):
            names = node.names + new
            if len(names) >= _RESET_MIN and 2 * len(keys) < len(names):
                names = tuple(keys)  # mostly NaN otherwise: start a fresh layout
            self._set_node_layout(node, self._layout_id(names, undo), undo)
        get = values.get
        try:
            return node.packer.pack(*[get(n, NAN) for n in node.names])
        except (struct.error, TypeError, OverflowError):
            raise _bad_values(sample) from None

    def _prepare(
        self, samples: Sequence[Sample], undo: Undo
    ) -> tuple[list[list[Row]], list[tuple[int, Row]], int]:
        """Validate and pack a batch: head rows per table, late rows, newest timestamp."""
        groups = self._groups
        span_ms = self._span_ms
        wm = self._wm
        nodes = self._nodes
        tables: list[list[Row]] = [[] for _ in range(2 * groups)]
        late: list[tuple[int, Row]] = []
        newest = self._max_seen_ms
        # Below the raw tier's retention horizon the original of a resent sample
        # is gone, so a duplicate could no longer be recognised and would be
        # folded into the rollups twice: such samples are skipped and counted.
        raw_horizon_ms = self._horizon_ms.get("raw", 0)
        for s in samples:
            node = nodes.get(s.node_id)
            if node is None:
                node = self._add_node(s.node_id, undo)
            try:
                ts_ms = round(s.ts * 1000)
            except (TypeError, ValueError, OverflowError):
                raise ValueError(
                    f"sample of node {s.node_id!r}: ts must be a finite number of seconds, got {s.ts!r}"
                ) from None
            if ts_ms <= 0:
                raise ValueError(f"sample of node {s.node_id!r}: ts must be > 0 (UNIX seconds), got {s.ts!r}")
            if ts_ms <= raw_horizon_ms:
                self.skipped_expired += 1
                continue
            values = s.values
            if len(values) == len(node.names) and tuple(values) == node.names:
                try:
                    blob = node.packer.pack(*values.values())
                except (struct.error, TypeError, OverflowError):
                    raise _bad_values(s) from None
            else:
                blob = self._pack_slow(node, s, undo)
            row = (ts_ms // 1000, node.key, ts_ms, node.layout, blob)
            g = node.group
            if ts_ms < wm[g]:
                late.append((((ts_ms // span_ms) & 1) * groups + g, row))
            else:
                tables[((ts_ms // span_ms) & 1) * groups + g].append(row)
            if ts_ms > newest:
                newest = ts_ms
        return tables, late, newest

    def _in_blocks(self, key: int, ts_ms: int) -> bool:
        """Whether a compacted block of node ``key`` already holds a sample at ``ts_ms``."""
        lo = ts_ms - ts_ms % self._span_ms  # a block never crosses its span
        for t0, data in self._wcon.execute(
            "SELECT t0_ms, data FROM blocks WHERE node_key=? AND t0_ms BETWEEN ? AND ? AND t1_ms >= ?",
            (key, lo, ts_ms, ts_ms),
        ):
            if ts_ms in BlockView.parse(data).times(int(t0)):
                return True
        return False

    def write_samples(self, samples: Sequence[Sample]) -> None:
        """Store a batch in one transaction (all or nothing), then compact a little.

        A duplicate ``(node, ts)`` (to the millisecond) is ignored.  Raises
        ``ValueError`` for a bad sample (nothing of the batch is stored) and
        :class:`StoreUnavailable` when the file cannot be written.
        """
        if not samples:
            return
        with self._wlock:
            self._check_open()
            con = self._wcon
            with self._writing("writing samples to") as undo:
                tables, late, newest = self._prepare(samples, undo)
                for t, rows in enumerate(tables):
                    if rows:
                        con.executemany(self._insert_sql[t], rows)
                for t, row in late:
                    if not self._in_blocks(row[1], row[2]):
                        con.execute(self._insert_sql[t], row)
            self._max_seen_ms = newest
            try:
                self._compact(budget_s=_COMPACT_BUDGET_S)
            except StoreError as exc:
                # The batch is committed; compaction is retried at the next write, and a
                # file that cannot be written fails the next insert loudly anyway.
                now = time.monotonic()
                if now >= self._compact_warned + 60:
                    self._compact_warned = now
                    log.warning("compaction of %s failed (retried at the next write): %s", self.path, exc)

    def upsert_nodes(self, nodes: Sequence[NodeRecord]) -> None:
        """Insert or update inventory entries: ``first_seen`` of a known node is kept,
        ``last_seen`` never goes back (replayed reports), hostname and info are replaced."""
        rows = []
        for rec in nodes:
            first, last, info = check_node_record(rec)
            rows.append((rec.node_id, rec.hostname, first, last, info))
        if not rows:
            return
        with self._wlock:
            self._check_open()
            with self._writing("writing the node inventory to"):
                self._wcon.executemany(
                    "INSERT INTO inventory VALUES (?,?,?,?,?) ON CONFLICT(node_id) DO UPDATE SET "
                    "hostname=excluded.hostname, last_seen=max(last_seen, excluded.last_seen), info=excluded.info",
                    rows,
                )

    # -- compaction -----------------------------------------------------------------------------

    def _oldest_head_ms(self, g: int) -> int | None:
        oldest: int | None = None
        for p in (0, 1):
            t = self._head(p, g)
            row = self._wcon.execute(
                f"SELECT MIN(ts_ms) FROM {t} WHERE sec = (SELECT MIN(sec) FROM {t})"
            ).fetchone()
            if row[0] is not None and (oldest is None or row[0] < oldest):
                oldest = int(row[0])
        return oldest

    def _chunk_cutoff(self, g: int, limit_ms: int, final: bool) -> int | None:
        """Where the next compaction of group ``g`` should stop, or ``None`` if nothing is due.

        Late samples (older than the watermark) ride along with the group's next
        regular span rather than forcing a transaction of their own: a node whose
        clock lags then still gets one block per span, not one per write.
        """
        wm = self._wm[g]
        if wm >= limit_ms and not final:
            return None
        oldest = self._oldest_head_ms(g)
        if oldest is None or oldest >= limit_ms:
            return None
        base = max(oldest, wm)
        if base >= limit_ms:
            return limit_ms  # only late samples left (flush)
        span = self._span_ms
        return min(limit_ms, (base // span + 1) * span)  # at most one new span per transaction

    def _compact(self, *, budget_s: float | None, final: bool = False) -> None:
        """Compact what is due (everything up to the newest sample when ``final``)."""
        deadline = None if budget_s is None else time.monotonic() + budget_s
        driver = min(self._max_seen_ms, int(time.time() * 1000) + _FUTURE_MS)
        # Final: everything.  Otherwise whole spans that ended grace_ms before the newest sample.
        limit = driver + 1 if final else (driver - self._grace_ms) // self._span_ms * self._span_ms
        while True:
            progressed = False
            for g in range(self._groups):
                cutoff = self._chunk_cutoff(g, limit, final)
                if cutoff is None:
                    continue
                started = time.monotonic()
                self._compact_chunk(g, cutoff)
                progressed = True
                # Stop when another chunk like this one would overrun the budget.
                if deadline is not None and 2 * time.monotonic() - started >= deadline:
                    return
            if not progressed:
                return

    def _slices(self, times: list[int]) -> list[tuple[int, int, int]]:
        """``(bucket_s, a, b)``: the finest rollup's buckets over sorted ``times``."""
        res = self._rollups[0].resolution_s
        res_ms = res * 1000
        n = len(times)
        if res_ms == self._span_ms:
            return [(times[0] // res_ms * res, 0, n)]
        out: list[tuple[int, int, int]] = []
        a = 0
        cur = times[0] // res_ms
        for i in range(1, n):
            b = times[i] // res_ms
            if b != cur:
                out.append((cur * res, a, i))
                a, cur = i, b
        out.append((cur * res, a, n))
        return out

    def _compact_chunk(self, g: int, cutoff_ms: int) -> None:
        """Move group ``g``'s head rows older than ``cutoff_ms`` into blocks and rollups (one transaction)."""
        started = time.monotonic()
        con = self._wcon
        span = self._span_ms
        c_sec = (cutoff_ms - 1) // 1000
        old_wm = self._wm[g]
        new_wm = max(old_wm, cutoff_ms)
        n_rows = 0
        with self._writing("compacting") as undo:
            spans: dict[tuple[int, int], list[tuple[int, int, bytes]]] = {}
            for p in (0, 1):
                for key, ts, lay, blob in con.execute(
                    f"SELECT node_key, ts_ms, layout, vals FROM {self._head(p, g)} WHERE sec <= ? AND ts_ms < ?",
                    (c_sec, cutoff_ms),
                ):
                    bucket = spans.get((key, ts // span))
                    if bucket is None:
                        spans[(key, ts // span)] = [(ts, lay, blob)]
                    else:
                        bucket.append((ts, lay, blob))
                    n_rows += 1
            blocks: list[tuple[int, int, int, int, bytes]] = []
            entries: list[Entry] = []
            for (key, _), rows in spans.items():
                rows.sort(key=_first)
                layout = rows[-1][1]
                for r in rows:
                    if r[1] != layout:
                        layout = self._union(layout, r[1], undo)
                m = len(self._names(layout, con))
                flat = b"".join(
                    blob if lay == layout else self._remap_row(blob, lay, layout) for _, lay, blob in rows
                )
                times = [r[0] for r in rows]
                data, columns, constant = encode_block(times[0], times, flat, m)
                blocks.append((key, times[0], times[-1], layout, data))
                if self._rollups:
                    for bucket_s, a, b in self._slices(times):
                        entries.append((key, bucket_s, layout, aggregate(columns, a, b, constant)))
            con.executemany("INSERT INTO blocks VALUES (?,?,?,?,?)", blocks)
            for i, tier in enumerate(self._rollups):
                if i:
                    entries = self._cascade(entries, tier.resolution_s, undo)
                self._store_rollups(tier, entries, old_wm, undo)
            for p in (0, 1):
                t = self._head(p, g)
                top = con.execute(f"SELECT MAX(sec) FROM {t}").fetchone()[0]
                if top is None:
                    continue
                if top < c_sec:
                    con.execute(f"DELETE FROM {t}")  # SQLite empties the table without visiting rows
                else:
                    con.execute(f"DELETE FROM {t} WHERE sec <= ? AND ts_ms < ?", (c_sec, cutoff_ms))
            con.execute("UPDATE head_state SET wm_ms=? WHERE grp=?", (new_wm, g))
        self._wm[g] = new_wm
        log.debug(
            "compacted group %d below %d: %d samples into %d blocks in %.1f ms",
            g,
            cutoff_ms,
            n_rows,
            len(blocks),
            (time.monotonic() - started) * 1000,
        )

    def _cascade(self, entries: list[Entry], res: int, undo: Undo) -> list[Entry]:
        """Fold finer rollup deltas into buckets of ``res`` seconds."""
        folded: dict[tuple[int, int], tuple[int, Agg]] = {}
        for key, bucket, layout, agg in entries:
            k = (key, bucket - bucket % res)
            cur = folded.get(k)
            folded[k] = (layout, agg) if cur is None else self._merge(cur[0], cur[1], layout, agg, undo)
        return [(key, bucket, layout, agg) for (key, bucket), (layout, agg) in folded.items()]

    def _store_rollups(self, tier: TierSpec, entries: list[Entry], old_wm: int, undo: Undo) -> None:
        """Write rollup deltas, merging into rows that already exist."""
        con = self._wcon
        table = self._tables[tier.name]
        select = f'SELECT layout, data FROM "{table}" WHERE node_key=? AND bucket=?'
        out = []
        for key, bucket, layout, agg in entries:
            # Rows exist only for buckets that started before the watermark: everything
            # compacted earlier is older than it.
            if bucket * 1000 < old_wm:
                row = con.execute(select, (key, bucket)).fetchone()
                if row is not None:
                    layout, agg = self._merge(int(row[0]), AggView.parse(row[1]).full(), layout, agg, undo)
            out.append((key, bucket, layout, encode_agg(agg)))
        con.executemany(f'INSERT OR REPLACE INTO "{table}" VALUES (?,?,?,?)', out)

    # -- durability and retention ----------------------------------------------------------------

    def flush(self) -> None:
        """Compact everything written so far (partial rollup buckets included) and checkpoint."""
        with self._wlock:
            self._check_open()
            self._compact(budget_s=None, final=True)
            try:
                self._wcon.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:
                raise self._error(exc, "checkpointing") from exc

    def enforce_retention(self, now: float) -> int:
        """Drop blocks and rollup buckets older than each tier's retention; returns rows removed.

        Works node by node in short transactions so the write lock is never held long.
        """
        now_s = finite("now", now)
        removed = 0
        with self._wlock:
            self._check_open()
            self._compact(budget_s=None)  # fold what is due into the rollups before raw data goes
            keys = sorted(n.key for n in self._nodes.values())
            for tier in (self._raw, *self._rollups):
                cutoff_ms = int((now_s - tier.retention_s) * 1000)
                if cutoff_ms <= self._horizon_ms.get(tier.name, 0):
                    continue
                if tier is self._raw:
                    sql = "DELETE FROM blocks WHERE node_key=? AND t0_ms < ? AND t1_ms < ?"
                    args: tuple[int, ...] = (cutoff_ms, cutoff_ms)
                else:
                    sql = f'DELETE FROM "{self._tables[tier.name]}" WHERE node_key=? AND bucket <= ?'
                    args = (cutoff_ms // 1000 - tier.resolution_s,)  # buckets that ended by the cutoff
                for i in range(0, max(len(keys), 1), _RETENTION_CHUNK):
                    with self._writing("enforcing retention on"):
                        for key in keys[i : i + _RETENTION_CHUNK]:
                            removed += self._wcon.execute(sql, (key, *args)).rowcount
                with self._writing("enforcing retention on"):
                    self._wcon.execute(
                        "INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"horizon:{tier.name}", cutoff_ms)
                    )
                self._horizon_ms[tier.name] = cutoff_ms
        if removed:
            log.debug("retention removed %d rows from %s", removed, self.path)
        return removed

    def close(self) -> None:
        """Compact what is written, then close every connection.  Idempotent.

        A failure to compact is logged, not raised: the samples stay in the head
        (committed) and are compacted after the next open.
        """
        with self._gate:
            if self._closing or self._closed:
                return
            self._closing = True
            deadline = time.monotonic() + _BUSY_TIMEOUT_S
            while self._active:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("closing %s while %d reads are still running", self.path, self._active)
                    break
                self._gate.wait(left)
        with self._wlock:
            try:
                self._compact(budget_s=None, final=True)
            except StoreError as exc:
                log.warning("could not compact %s on close (kept for the next open): %s", self.path, exc)
            finally:
                with self._gate:
                    connections = [self._wcon, *self._readers]
                    self._readers.clear()
                    self._closed = True
                for con in connections:
                    try:
                        con.close()
                    except sqlite3.Error as exc:
                        log.warning("error closing a connection to %s: %s", self.path, exc)
        log.info("closed embedded store %s", self.path)

    # -- event log and documents ----------------------------------------------------------------

    def append_event(self, event: Mapping[str, object]) -> str:
        """Append one event (JSON-serialisable; ``ts`` defaults to now); returns its id."""
        eid, ts, body = encode_event(event)
        with self._wlock:
            self._check_open()
            with self._writing("appending an event to"):
                self._wcon.execute(
                    "INSERT INTO events(id, ts_ms, body) VALUES (?,?,?)", (eid, round(ts * 1000), body)
                )
        return eid

    def events(self, start: float, end: float, limit: int = 1000) -> list[dict[str, object]]:
        """Events with ``start <= ts < end``, oldest first; the newest ``limit`` if there are more."""
        lo, hi = finite("start", start), finite("end", end)
        if limit < 1:
            raise ValueError(f"limit: must be ≥ 1, got {limit!r}")
        lo_ms, hi_ms = event_key_range(lo, hi)
        with self._reading("reading events from") as con:
            rows = con.execute(
                "SELECT body FROM events WHERE ts_ms >= ? AND ts_ms < ? ORDER BY ts_ms DESC, seq DESC LIMIT ?",
                (lo_ms, hi_ms, limit + EVENT_SLACK),
            ).fetchall()
        return events_in([json.loads(r[0]) for r in reversed(rows)], lo, hi, limit)

    def put_document(self, kind: str, key: str, doc: Mapping[str, object]) -> None:
        """Store (or replace) a configuration/inventory document."""
        body = encode_document(kind, key, doc)
        with self._wlock:
            self._check_open()
            with self._writing("writing a document to"):
                self._wcon.execute("INSERT OR REPLACE INTO documents VALUES (?,?,?)", (kind, key, body))

    def get_document(self, kind: str, key: str) -> dict[str, object] | None:
        """The document, or ``None``."""
        check_kind_key(kind, key)
        with self._reading("reading a document from") as con:
            row = con.execute("SELECT body FROM documents WHERE kind=? AND key=?", (kind, key)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def list_documents(self, kind: str) -> dict[str, dict[str, object]]:
        """Every document of a kind, by key."""
        check_kind_key(kind)
        with self._reading("listing documents of") as con:
            rows = con.execute("SELECT key, body FROM documents WHERE kind=?", (kind,)).fetchall()
        return {k: dict(json.loads(b)) for k, b in rows}

    def delete_document(self, kind: str, key: str) -> bool:
        """Remove a document; ``True`` if it existed."""
        check_kind_key(kind, key)
        with self._wlock:
            self._check_open()
            with self._writing("deleting a document from"):
                cur = self._wcon.execute("DELETE FROM documents WHERE kind=? AND key=?", (kind, key))
        return cur.rowcount > 0

    # -- reading ------------------------------------------------------------------------------

    def nodes(self) -> list[NodeRecord]:
        """Every node of the inventory (``upsert_nodes``), in no particular order."""
        with self._reading("reading the node inventory of") as con:
            rows = con.execute(
                "SELECT node_id, hostname, first_seen, last_seen, info FROM inventory"
            ).fetchall()
        return [
            NodeRecord(node_id=r[0], hostname=r[1], first_seen=r[2], last_seen=r[3], info=json.loads(r[4]))
            for r in rows
        ]

    def metric_names(self, node_id: str) -> list[str]:
        """Every metric name ever stored for the node (first-seen order); ``[]`` if unknown."""
        with self._reading("reading metric names from") as con:
            lids = [
                int(r[0])
                for r in con.execute(
                    "SELECT nl.layout FROM node_layouts nl JOIN series_nodes sn ON sn.node_key = nl.node_key "
                    "WHERE sn.node_id=? ORDER BY nl.layout",
                    (node_id,),
                )
            ]
            names: dict[str, None] = {}
            for lid in lids:
                names.update(dict.fromkeys(self._names(lid, con)))
        return list(names)

    def _node_key(self, con: sqlite3.Connection, node_id: str) -> int | None:
        row = con.execute("SELECT node_key FROM series_nodes WHERE node_id=?", (node_id,)).fetchone()
        return None if row is None else int(row[0])

    def _read_head(
        self, con: sqlite3.Connection, key: int, lo_ms: int, hi_ms: int
    ) -> list[tuple[int, int, bytes]]:
        """Head rows ``(ts_ms, layout, vals)`` of node ``key`` with ``lo_ms <= ts_ms < hi_ms``."""
        out: list[tuple[int, int, bytes]] = []
        if lo_ms >= hi_ms:
            return out
        g = key % self._groups
        for p in (0, 1):
            t = self._head(p, g)
            mn, mx = con.execute(f"SELECT (SELECT MIN(sec) FROM {t}), (SELECT MAX(sec) FROM {t})").fetchone()
            if mn is None:
                continue
            a, b = max(lo_ms // 1000, int(mn)), min((hi_ms - 1) // 1000, int(mx))
            if a > b:
                continue
            if b - a <= _SEEK_LIMIT_S:
                # One primary-key seek per second: the head is ordered by time, not node.
                sql = (
                    "WITH RECURSIVE s(x) AS (SELECT ? UNION ALL SELECT x + 1 FROM s WHERE x < ?) "
                    f"SELECT h.ts_ms, h.layout, h.vals FROM s CROSS JOIN {t} AS h "
                    "ON h.sec = s.x AND h.node_key = ? AND h.ts_ms >= ? AND h.ts_ms < ?"
                )
            else:
                sql = (
                    f"SELECT ts_ms, layout, vals FROM {t} WHERE sec >= ? AND sec <= ? "
                    "AND node_key = ? AND ts_ms >= ? AND ts_ms < ?"
                )
            out.extend(con.execute(sql, (a, b, key, lo_ms, hi_ms)))
        return out

    def latest(self, node_id: str) -> Sample | None:
        """The newest sample of a node (NaN values, i.e. absent metrics, left out), or ``None``."""
        with self._reading("reading the latest sample from") as con:
            key = self._node_key(con, node_id)
            if key is None:
                return None
            # The newest compacted sample first: head rows newer than it are few to scan.
            newest: tuple[int, int, Sequence[float]] | None = None
            last = con.execute(
                "SELECT t0_ms FROM blocks WHERE node_key=? ORDER BY t0_ms DESC LIMIT 1", (key,)
            ).fetchone()
            if last is not None:
                lo = int(last[0]) - int(last[0]) % self._span_ms  # late blocks of that span may end later
                t0, lid, data = con.execute(
                    "SELECT t0_ms, layout, data FROM blocks WHERE node_key=? AND t0_ms >= ? "
                    "ORDER BY t1_ms DESC LIMIT 1",
                    (key, lo),
                ).fetchone()
                view = BlockView.parse(data)
                newest = (view.times(int(t0))[-1], int(lid), view.row(view.n - 1))
            since = newest[0] + 1 if newest is not None else 0
            g = key % self._groups
            for p in (0, 1):
                row = con.execute(
                    f"SELECT ts_ms, layout, vals FROM {self._head(p, g)} WHERE sec >= ? AND node_key = ? "
                    "AND ts_ms >= ? ORDER BY sec DESC, node_key DESC, ts_ms DESC LIMIT 1",
                    (since // 1000, key, since),
                ).fetchone()
                if row is not None and (newest is None or row[0] > newest[0]):
                    newest = (int(row[0]), int(row[1]), doubles(len(row[2]) // 8).unpack(row[2]))
            if newest is None:
                return None
            ts_ms, lid, values = newest
            names = self._names(int(lid), con)
        return Sample(
            node_id=node_id,
            ts=ts_ms / 1000,
            values={n: v for n, v in zip(names, values, strict=True) if v == v},
        )

    def _pick_tier(self, step: float, start_ms: int) -> TierSpec:
        """Coarsest tier with resolution ≤ step still holding ``start``; else a coarser one that does."""
        now_ms = time.time() * 1000
        tiers = [self._raw, *self._rollups]

        def covers(t: TierSpec) -> bool:
            horizon = max(now_ms - t.retention_s * 1000, self._horizon_ms.get(t.name, 0))
            return start_ms >= horizon

        fine = [t for t in reversed(tiers) if t.resolution_s <= step]
        coarse = [t for t in tiers if t.resolution_s > step]
        for t in (*fine, *coarse):
            if covers(t):
                return t
        return max(tiers, key=lambda t: (t.retention_s, t.resolution_s))

    def series(
        self, node_id: str, metrics: Sequence[str], start: float, end: float, step: float
    ) -> SeriesResult:
        """avg/min/max per ``step`` over ``[start, end)``, buckets aligned on multiples of ``step``.

        Unknown nodes or metrics give lists of ``None``.  Raises ``ValueError``
        naming the parameter for a bad range/step or more than 100,000 points.
        """
        q = check_query(metrics, start, end, step)
        names, start_ms, end_ms, step_ms, b0, n = q.names, q.start_ms, q.end_ms, q.step_ms, q.b0, q.n
        tier = self._pick_tier(step_ms / 1000, start_ms)
        acc = _Acc(n, len(names))
        with self._reading("reading a series from") as con:
            key = self._node_key(con, node_id)
            if key is not None:
                positions: dict[int, list[int]] = {}

                def where(lid: int) -> list[int]:
                    pos = positions.get(lid)
                    if pos is None:
                        index = self._index(lid, con)
                        pos = positions[lid] = [index.get(name, -1) for name in names]
                    return pos

                if tier is self._raw:
                    lo = start_ms  # raw samples: exactly [start, end)
                    self._read_blocks(con, key, lo, b0, end_ms, step_ms, where, acc)
                else:
                    # Rollup buckets are indivisible: take those overlapping [start, end), plus
                    # the samples still in the head (compaction moves a sample from the head
                    # into the rollups in one transaction, so each is counted exactly once).
                    res_ms = tier.resolution_s * 1000
                    lo = start_ms // res_ms * res_ms
                    self._read_rollup(con, tier, key, lo, b0, end_ms, step_ms, where, acc)
                for ts, lid, blob in self._read_head(con, key, lo, end_ms):
                    i = max(0, (ts - b0) // step_ms)
                    for k, j in enumerate(where(lid)):
                        if j >= 0:
                            acc.add_values(k, (i,), _F64.unpack_from(blob, 8 * j))
        return SeriesResult(
            node_id=node_id,
            start=start,
            end=end,
            step=step,
            tier=tier.name,
            timestamps=[(b0 + i * step_ms) / 1000 for i in range(n)],
            metrics={name: acc.series(k) for k, name in enumerate(names)},
        )

    def _read_blocks(
        self,
        con: sqlite3.Connection,
        key: int,
        lo: int,
        b0: int,
        end_ms: int,
        step_ms: int,
        where: Callable[[int], list[int]],
        acc: _Acc,
    ) -> None:
        first = lo - lo % self._span_ms  # the first block that can hold lo starts in lo's span
        for t0, lid, data in con.execute(
            "SELECT t0_ms, layout, data FROM blocks WHERE node_key=? AND t0_ms >= ? AND t0_ms < ? ORDER BY t0_ms",
            (key, first, end_ms),
        ):
            pos = where(int(lid))
            if max(pos, default=-1) < 0:
                continue
            view = BlockView.parse(data)
            times = view.times(int(t0))
            if times[0] >= lo:
                idxs = [(t - b0) // step_ms for t in times]
            else:
                idxs = [(t - b0) // step_ms if t >= lo else -1 for t in times]
            for k, j in enumerate(pos):
                if j >= 0:
                    col = view.column(j)
                    if col is not None:
                        acc.add_values(k, idxs, col)

    def _read_rollup(
        self,
        con: sqlite3.Connection,
        tier: TierSpec,
        key: int,
        lo: int,
        b0: int,
        end_ms: int,
        step_ms: int,
        where: Callable[[int], list[int]],
        acc: _Acc,
    ) -> None:
        rows = con.execute(
            f'SELECT bucket, layout, data FROM "{self._tables[tier.name]}" '
            "WHERE node_key=? AND bucket >= ? AND bucket < ?",
            (key, lo // 1000, -(-end_ms // 1000)),
        ).fetchall()
        positions: dict[int, list[int]] = {}
        plans = RollupPlans()
        one, three = _F64.unpack_from, unpack_f64x3
        cnt, sm, mn, mx, n = acc.cnt, acc.sm, acc.mn, acc.mx, acc.n
        for bucket, lid, data in rows:
            pos = positions.get(lid)
            if pos is None:
                pos = positions[lid] = where(lid)
            i = (bucket * 1000 - b0) // step_ms
            if i < 0:
                i = 0
            elif i >= n:
                continue
            for k, c, off, single in plans.plan(lid, data, pos):
                if single:
                    lo = hi = one(data, off)[0]
                    s = lo * c
                else:
                    s, lo, hi = three(data, off)
                counts = cnt[k]
                if counts[i]:
                    sm[k][i] += s
                    if lo < mn[k][i]:
                        mn[k][i] = lo
                    if hi > mx[k][i]:
                        mx[k][i] = hi
                else:
                    sm[k][i] = s
                    mn[k][i] = lo
                    mx[k][i] = hi
                counts[i] += c


__all__ = ["MAX_POINTS", "EmbeddedStore", "parse_url"]
