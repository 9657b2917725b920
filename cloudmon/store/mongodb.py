"""Telemetry in MongoDB (``mongodb://[user:pass@]host[:port][/db][?options]``, ``mongodb+srv://…``), via pymongo.

Collections (database from the URL path, ``cloudmon`` by default)
==================================================================

* ``samples_<tier>``: one **time-series collection per tier** (timeField
  ``ts``, metaField ``meta`` = ``{node, tier}``, granularity ``seconds`` for raw,
  ``minutes`` for rollups finer than 1 h, ``hours`` otherwise,
  ``expireAfterSeconds`` = the tier's retention, so the server expires old
  buckets itself).  One collection per tier because granularity and expiry
  are collection options.  Raw measurements: ``{ts, meta, v: {metric: value}}``
  (metric names escaped: ``.``, ``$`` and ``%`` as ``%2E``, ``%24``, ``%25``,
  since dotted field names cannot be queried).  Rollups: ``{ts: bucket start,
  meta, gen, a: {metric: [count, sum, min, max]}}``.  Index ``(meta.node, ts)``
  on each (what every query filters on; MongoDB ≥ 7 creates it by default).
* ``sample_keys`` (regular): ``_id = "<ts_ms>|<node>"``, ``pending``, TTL
  index on ``at`` (raw retention).  **Dedupe**: a time-series collection
  cannot have a unique index, so a batch first goes into this collection with
  an unordered ``insert_many`` of *pending* keys; the samples whose key was new
  (no E11000) or is still pending are inserted into ``samples_raw``, and only
  then are their keys confirmed (``pending: false``).  Only a confirmed key
  makes a sample a duplicate, so a writer dying (or failing) between the two
  inserts loses nothing: the replay stores the sample again.  A sample may so
  be stored twice (a replay racing the first write, or a crash after the raw
  insert): every read keeps one measurement per ``(node, ts)``.
* Rollups are **recomputed** from the tier below (see
  :mod:`cloudmon.store._common`) and written as a new *version* (``gen``, the
  write time in µs) rather than updated: time-series collections are built for
  inserts (updates/deletes of measurements are restricted or slow, and not
  allowed in transactions), and a query keeps the newest version of each
  bucket.  Marks of buckets to recompute: ``rollup_dirty`` (regular, ``_id =
  "<tier>|<bucket_ms>|<node>"``, ``due``); claimed with a **lease** (``lease``
  = expiry in wall-clock ms, ``owner`` = a token per claim) and deleted only
  after the bucket is written, and only if still owned: marking a bucket again
  removes the claim, so a sample arriving during the recomputation gets its
  bucket redone.  A claim whose lease expired (its writer died) is taken by
  any writer.  Computed
  client-side rather than with ``$group``: it is the same code as the Redis
  backend, a bucket is ≈ 60 small documents, and per-metric ``$group`` needs
  ``$objectToArray``/``$unwind`` over every field, costlier on the server.
* ``latest`` (``_id`` node, ``ts``, ``v``), updated with a ``ts < new`` filter
  and upsert (a newer stored sample makes that an ignored E11000);
  ``metric_names`` (``_id`` node, ``names``); ``nodes`` (inventory:
  ``$setOnInsert`` first_seen, ``$max`` last_seen); ``events`` (``ts``,
  ``body`` JSON; index on ``ts``); ``documents`` (``_id`` kind/key, ``kind``,
  ``body``); ``store_meta`` (retention horizons).

Retention: TTL does it on the server; ``enforce_retention(now)`` also deletes by
time (MongoDB ≥ 7.0 allows time filters in deletes on time-series collections;
on 5.x/6.x that delete is refused and is logged once, TTL remains) and records
a horizon that queries respect either way.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final
from urllib.parse import urlsplit

from cloudmon.store._common import (
    Agg,
    StepAcc,
    aggregate,
    check_kind_key,
    check_node_record,
    check_query,
    encode_document,
    encode_event,
    finite,
    merge,
    pick_tier,
    plan_tiers,
    prepare,
    redact_url,
)
from cloudmon.store.base import (
    DEFAULT_TIERS,
    NodeRecord,
    Sample,
    SeriesResult,
    StoreError,
    StoreUnavailable,
    TierSpec,
)

log = logging.getLogger(__name__)

_DUPLICATE: Final = 11000
_DIRTY_BATCH: Final = 2000
_UTC = dt.UTC


def _esc(name: str) -> str:
    return name.replace("%", "%25").replace(".", "%2E").replace("$", "%24")


def _unesc(name: str) -> str:
    return name.replace("%2E", ".").replace("%24", "$").replace("%25", "%")


def _date(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, _UTC)


def _ms(d: dt.datetime) -> int:
    if d.tzinfo is None:
        d = d.replace(tzinfo=_UTC)
    return round(d.timestamp() * 1000)


class MongoStore:
    """A :class:`~cloudmon.store.base.TelemetryStore` in MongoDB (see the module docstring).

    The constructor does not contact the server; collections and indexes are
    created on first use.  Every call that cannot reach the server raises
    :class:`StoreUnavailable`.  ``grace_s``: how far (in data time) the newest
    sample must be past a rollup bucket's end before it is recomputed.
    ``lease_s``: how long (wall clock, read from ``clock``) a writer holds the
    rollup marks it claimed; a dead writer's marks are reclaimed after it.
    """

    tiers: Sequence[TierSpec]

    def __init__(
        self,
        url: str,
        tiers: Sequence[TierSpec] = DEFAULT_TIERS,
        *,
        grace_s: float = 10.0,
        lease_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        import pymongo  # optional dependency: imported only when this backend is used
        from pymongo import errors

        self.url = url
        self._shown = redact_url(url)
        parts = urlsplit(url)
        if parts.scheme not in ("mongodb", "mongodb+srv"):
            raise StoreError(f"not a MongoDB store URL: {self._shown!r}; use mongodb://host:27017/cloudmon")
        self.tiers = tuple(tiers)
        self._raw, self._rollups = plan_tiers(self.tiers)
        self._grace_ms = int(finite("grace_s", grace_s) * 1000)
        self._lease_ms = int(finite("lease_s", lease_s) * 1000)
        if self._lease_ms <= 0:
            raise ValueError(f"lease_s: must be > 0 seconds, got {lease_s!r}")
        self._clock = clock
        self._pymongo = pymongo
        self._errors = errors
        try:
            options: dict[str, Any] = {"tz_aware": True, "connect": False}
            if "serverselectiontimeoutms" not in url.lower():
                options["serverSelectionTimeoutMS"] = 5000  # fail fast (StoreUnavailable) when down
            self._client: Any = pymongo.MongoClient(url, **options)
        except errors.ConfigurationError as exc:
            raise StoreError(f"bad MongoDB store URL {self._shown!r}: {exc}") from None
        except errors.InvalidURI as exc:
            raise StoreError(f"bad MongoDB store URL {self._shown!r}: {exc}") from None
        name = parts.path.lstrip("/") or "cloudmon"
        self._db: Any = self._client[name]
        self._lock = threading.RLock()
        self._schema_ready = False
        self._closed = False
        self._newest_ms = 0
        self._known_names: dict[str, set[str]] = {}
        self._delete_warned = False
        self._gen = 0
        self._marked: dict[tuple[int, str], int] = {}  # (bucket_ms, node) -> due ms, marked by us

    def __repr__(self) -> str:
        return f"MongoStore({self._shown!r})"

    # -- plumbing -----------------------------------------------------------------------------

    @contextmanager
    def _op(self, doing: str) -> Iterator[None]:
        if self._closed:
            raise StoreError(f"MongoDB store {self._shown} is closed")
        e = self._errors
        try:
            self._ensure_schema()
            yield
        except (e.ServerSelectionTimeoutError, e.AutoReconnect, e.NetworkTimeout, e.ConnectionFailure) as exc:
            # The server may come back empty (restarted without persistence): re-send what
            # this process believes is already stored (metric-name sets, rollup marks).
            self._known_names.clear()
            self._marked.clear()
            raise StoreUnavailable(
                f"cannot reach the MongoDB store at {self._shown} while {doing}: {str(exc)[:300]}; "
                "start mongod there (or fix the --store URL) — the collector retries"
            ) from exc
        except e.PyMongoError as exc:
            raise StoreError(f"MongoDB store {self._shown} failed while {doing}: {str(exc)[:500]}") from exc

    def _coll(self, tier: TierSpec) -> Any:
        return self._db[f"samples_{tier.name}"]

    def _ensure_schema(self) -> None:
        if self._schema_ready:
            return
        with self._lock:  # creating collections/indexes twice (two threads) is harmless
            db = self._db
            existing = set(db.list_collection_names())
            for tier in (self._raw, *self._rollups):
                name = f"samples_{tier.name}"
                if name not in existing:
                    gran = (
                        "seconds"
                        if tier.resolution_s < 60
                        else "minutes"
                        if tier.resolution_s < 3600
                        else "hours"
                    )
                    with contextlib.suppress(self._errors.CollectionInvalid):  # another collector was first
                        db.create_collection(
                            name,
                            timeseries={"timeField": "ts", "metaField": "meta", "granularity": gran},
                            expireAfterSeconds=tier.retention_s,
                        )
                db[name].create_index([("meta.node", 1), ("ts", 1)])
            keys = db["sample_keys"]
            keys.create_index("at", expireAfterSeconds=self._raw.retention_s)
            db["rollup_dirty"].create_index("due")
            db["rollup_dirty"].create_index("lease", sparse=True)
            db["events"].create_index("ts")
            db["documents"].create_index("kind")
            self._schema_ready = True

    def _dirty(self, t: int, bucket_ms: int, node: str) -> Any:
        res_ms = self._rollups[t].resolution_s * 1000
        due = bucket_ms + res_ms + self._grace_ms
        # Marking drops any claim: the claimer then does not delete the mark when it is done,
        # so the bucket is recomputed again with the sample that marked it.
        return self._pymongo.UpdateOne(
            {"_id": f"{t}|{bucket_ms}|{node}"},
            {"$set": {"due": due}, "$unset": {"lease": "", "owner": ""}},
            upsert=True,
        )

    def _next_gen(self) -> int:
        g = max(self._gen + 1, time.time_ns() // 1000)
        self._gen = g
        return g

    # -- writing ------------------------------------------------------------------------------

    def write_samples(self, samples: Sequence[Sample]) -> None:
        """Store a batch with unordered bulk inserts, deduplicated by ``(node, ts)``.

        Raises ``ValueError`` for a bad sample (nothing stored) and
        :class:`StoreUnavailable` when the server cannot be reached (retrying
        the batch is safe).
        """
        prepared = prepare(samples)
        if not prepared:
            return
        pm = self._pymongo
        with self._lock, self._op("writing samples"):
            db = self._db
            now = dt.datetime.now(_UTC)
            keys = [f"{ts_ms}|{node}" for node, ts_ms, _ in prepared]
            fresh = [True] * len(prepared)
            try:
                db["sample_keys"].insert_many(
                    [{"_id": k, "at": now, "pending": True} for k in keys], ordered=False
                )
            except self._errors.BulkWriteError as exc:
                dup: dict[str, int] = {}
                for err in exc.details.get("writeErrors", []):
                    if err.get("code") != _DUPLICATE:
                        raise
                    dup[keys[err["index"]]] = err["index"]
                # Only a confirmed key is a duplicate: a pending one may belong to a writer that
                # died before storing its sample (storing it twice is harmless, reads dedupe).
                confirmed = db["sample_keys"].find(
                    {"_id": {"$in": list(dup)}, "pending": {"$ne": True}}, {"_id": 1}
                )
                for d in confirmed:
                    fresh[dup[d["_id"]]] = False
            accepted = [p for p, f in zip(prepared, fresh, strict=True) if f]
            if not accepted:
                return
            accepted_keys = [k for k, f in zip(keys, fresh, strict=True) if f]
            docs = [
                {
                    "ts": _date(ts_ms),
                    "meta": {"node": node, "tier": self._raw.name},
                    "v": {_esc(k): v for k, v in values.items()},
                }
                for node, ts_ms, values in accepted
            ]
            # If this insert fails (or the process dies) the keys stay pending, so a retry of the
            # batch stores it (again, for what did get stored: reads keep one per (node, ts)).
            self._insert_raw(docs)
            ops: list[Any] = []
            marks: set[tuple[int, str]] = set()
            newest: dict[str, tuple[int, dict[str, float]]] = {}
            names: dict[str, set[str]] = {}
            res = self._rollups[0].resolution_s * 1000 if self._rollups else 0
            for node, ts_ms, values in accepted:
                if res:
                    marks.add((ts_ms - ts_ms % res, node))
                cur = newest.get(node)
                if cur is None or ts_ms >= cur[0]:
                    newest[node] = (ts_ms, values)
                known = self._known_names.get(node)
                if known is None or not known.issuperset(values):
                    names.setdefault(node, set()).update(values)
            # A bucket this process marked is not marked again until it is due: until then no
            # writer claims it (claims happen once data time passes the due time), so the mark stands.
            fresh_marks = [(b, n) for b, n in marks if self._marked.get((b, n), 0) <= self._newest_ms]
            ops = [self._dirty(0, b, node) for b, node in fresh_marks]
            for b, n in fresh_marks:
                self._marked[(b, n)] = b + res + self._grace_ms
            if len(self._marked) > 100_000:
                self._marked = {k: v for k, v in self._marked.items() if v > self._newest_ms}
            if ops:
                db["rollup_dirty"].bulk_write(ops, ordered=False)
            latest_ops = [
                pm.UpdateOne(
                    {"_id": node, "ts": {"$lt": ts_ms}},
                    {"$set": {"ts": ts_ms, "v": {_esc(k): v for k, v in values.items()}}},
                    upsert=True,
                )
                for node, (ts_ms, values) in newest.items()
            ]
            try:
                db["latest"].bulk_write(latest_ops, ordered=False)
            except self._errors.BulkWriteError as exc:
                if any(e.get("code") != _DUPLICATE for e in exc.details.get("writeErrors", [])):
                    raise
            if names:
                db["metric_names"].bulk_write(
                    [
                        pm.UpdateOne({"_id": n}, {"$addToSet": {"names": {"$each": sorted(s)}}}, upsert=True)
                        for n, s in names.items()
                    ],
                    ordered=False,
                )
                for n, s in names.items():
                    self._known_names.setdefault(n, set()).update(s)
            # Confirmed last: until then a replay of the batch is stored (and marked) again.
            db["sample_keys"].update_many({"_id": {"$in": accepted_keys}}, {"$set": {"pending": False}})
            self._newest_ms = max(self._newest_ms, prepared[-1][1])
            self._recompute(self._newest_ms, _DIRTY_BATCH)

    def _insert_raw(self, docs: list[dict[str, Any]]) -> None:
        """Insert raw measurements (a seam of its own so that tests can inject a crash here)."""
        self._coll(self._raw).insert_many(docs, ordered=False)

    def _recompute(self, upto_ms: float, limit: int | None) -> int:
        """Recompute due rollup buckets (and those whose claim's lease expired); returns how many."""
        if not self._rollups:
            return 0
        dirty = self._db["rollup_dirty"]
        done = 0
        for _ in range(len(self._rollups) + 1 if limit else 1000):
            now_ms = int(self._clock() * 1000)
            unclaimed: dict[str, Any] = {"lease": {"$exists": False}}
            if upto_ms != float("inf"):
                unclaimed["due"] = {"$lte": upto_ms}
            query = {"$or": [unclaimed, {"lease": {"$lte": now_ms}}]}
            ids = [d["_id"] for d in dirty.find(query, {"_id": 1}).limit(limit or 10_000)]
            if not ids:
                break
            # Claim with a lease (each document atomically; the filter repeats the query so two
            # writers cannot both win one), then read back which ones are ours.
            owner = uuid.uuid4().hex
            lease = now_ms + self._lease_ms
            dirty.update_many({"_id": {"$in": ids}, **query}, {"$set": {"lease": lease, "owner": owner}})
            ids = [d["_id"] for d in dirty.find({"owner": owner}, {"_id": 1})]
            if not ids:
                continue
            jobs = sorted(
                ((int(t), int(b), node) for t, b, node in (i.split("|", 2) for i in ids)), key=lambda j: j[0]
            )
            for t, b, node in jobs:
                if t == 0:
                    self._marked.pop((b, node), None)  # a new sample of this bucket must mark it again
            try:
                self._recompute_jobs(jobs)
            except Exception:
                # Give the claims back now; if the server is gone they are reclaimed when the
                # lease expires (a writer killed here leaves them the same way).
                try:
                    dirty.update_many({"owner": owner}, {"$unset": {"lease": "", "owner": ""}})
                except self._errors.PyMongoError:
                    log.debug("could not give back %d rollup marks; their lease will expire", len(jobs))
                raise
            # Done: delete the marks still ours (one marked again meanwhile lost its owner: redone).
            dirty.delete_many({"owner": owner})
            done += len(jobs)
            if limit:
                limit -= len(jobs)
                if limit <= 0:
                    break
        return done

    def _recompute_jobs(self, jobs: list[tuple[int, int, str]]) -> None:
        horizons = self._horizons()
        groups: dict[tuple[int, int], list[str]] = {}
        for t, b, node in jobs:
            source = self._raw if t == 0 else self._rollups[t - 1]
            # A bucket whose source is (partly) past its retention (deleted or TTL-expired) is left
            # alone: recomputing it from what is left would undercount.
            if b < max(horizons.get(source.name, 0), time.time() * 1000 - source.retention_s * 1000):
                continue
            groups.setdefault((t, b), []).append(node)
        for (t, b), nodes in sorted(groups.items()):
            tier = self._rollups[t]
            res_ms = tier.resolution_s * 1000
            where = {"meta.node": {"$in": nodes}, "ts": {"$gte": _date(b), "$lt": _date(b + res_ms)}}
            per_node: dict[str, Agg] = {}
            if t == 0:
                # Keyed by time: a measurement stored twice (see write_samples) still counts once.
                rows: dict[str, dict[dt.datetime, dict[str, float]]] = {n: {} for n in nodes}
                for d in self._coll(self._raw).find(where, {"_id": 0, "meta.node": 1, "ts": 1, "v": 1}):
                    rows[d["meta"]["node"]].setdefault(d["ts"], {_unesc(k): v for k, v in d["v"].items()})
                per_node = {n: aggregate(list(r.values())) for n, r in rows.items()}
            else:
                best: dict[str, dict[int, tuple[int, Agg]]] = {n: {} for n in nodes}
                for d in self._coll(self._rollups[t - 1]).find(
                    where, {"_id": 0, "meta.node": 1, "ts": 1, "gen": 1, "a": 1}
                ):
                    bb = best[d["meta"]["node"]]
                    k = _ms(d["ts"])
                    if k not in bb or d["gen"] > bb[k][0]:
                        bb[k] = (d["gen"], {_unesc(x): y for x, y in d["a"].items()})
                per_node = {n: merge([a for _, a in bb.values()]) for n, bb in best.items()}
            docs = [
                {
                    "ts": _date(b),
                    "meta": {"node": n, "tier": tier.name},
                    "gen": self._next_gen(),
                    "a": {_esc(k): v for k, v in agg.items()},
                }
                for n, agg in per_node.items()
            ]
            if docs:
                self._coll(tier).insert_many(docs, ordered=False)
            if t + 1 < len(self._rollups):
                res = self._rollups[t + 1].resolution_s * 1000
                self._db["rollup_dirty"].bulk_write(
                    [self._dirty(t + 1, b - b % res, n) for n in nodes], ordered=False
                )

    def upsert_nodes(self, nodes: Sequence[NodeRecord]) -> None:
        """Insert or update inventory entries (``first_seen`` kept, ``last_seen`` never goes back)."""
        ops = []
        for rec in nodes:
            first, last, info = check_node_record(rec)
            ops.append(
                self._pymongo.UpdateOne(
                    {"_id": rec.node_id},
                    {
                        "$setOnInsert": {"first_seen": first},
                        "$set": {"hostname": rec.hostname, "info": info},
                        "$max": {"last_seen": last},
                    },
                    upsert=True,
                )
            )
        if not ops:
            return
        with self._lock, self._op("writing the node inventory"):
            self._db["nodes"].bulk_write(ops, ordered=False)

    def flush(self) -> None:
        """Recompute every marked rollup bucket (open ones included) so the rollups are current."""
        with self._lock, self._op("flushing rollups"):
            self._recompute(float("inf"), None)

    def enforce_retention(self, now: float) -> int:
        """Delete what is older than each tier's retention (TTL does it too); returns documents removed."""
        now_s = finite("now", now)
        removed = 0
        with self._lock, self._op("enforcing retention"):
            horizons = self._horizons()
            for tier in (self._raw, *self._rollups):
                cutoff = int((now_s - tier.retention_s) * 1000)
                if cutoff <= horizons.get(tier.name, 0):
                    continue
                limit = cutoff if tier is self._raw else cutoff - tier.resolution_s * 1000 + 1
                try:
                    removed += self._coll(tier).delete_many({"ts": {"$lt": _date(limit)}}).deleted_count
                except self._errors.OperationFailure as exc:
                    # MongoDB 5.x/6.x: deletes on a time-series collection may filter on metaField only.
                    if not self._delete_warned:
                        self._delete_warned = True
                        log.warning(
                            "time-based delete refused by %s (TTL still expires data): %s", self._shown, exc
                        )
                self._db["store_meta"].update_one(
                    {"_id": f"horizon:{tier.name}"}, {"$max": {"ms": cutoff}}, upsert=True
                )
        return removed

    def close(self) -> None:
        """Recompute marked rollups (logged, not raised, if the server is gone) and disconnect.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                self.flush()
            except StoreError as exc:
                log.warning(
                    "could not flush %s on close (its marks stay in the database): %s", self._shown, exc
                )
            self._closed = True
            self._client.close()
        log.info("closed MongoDB store %s", self._shown)

    # -- reading ------------------------------------------------------------------------------

    def _horizons(self) -> dict[str, int]:
        return {
            d["_id"].split(":", 1)[1]: int(d["ms"])
            for d in self._db["store_meta"].find({"_id": {"$regex": "^horizon:"}})
        }

    def nodes(self) -> list[NodeRecord]:
        """Every node of the inventory, in no particular order."""
        with self._op("reading the node inventory"):
            docs = list(self._db["nodes"].find({}))
        return [
            NodeRecord(
                node_id=d["_id"],
                hostname=d["hostname"],
                first_seen=float(d["first_seen"]),
                last_seen=float(d["last_seen"]),
                info=json.loads(d["info"]),
            )
            for d in docs
        ]

    def latest(self, node_id: str) -> Sample | None:
        """The newest sample of a node, or ``None``."""
        with self._op("reading the latest sample"):
            d = self._db["latest"].find_one({"_id": node_id})
        if d is None:
            return None
        return Sample(node_id=node_id, ts=d["ts"] / 1000, values={_unesc(k): v for k, v in d["v"].items()})

    def metric_names(self, node_id: str) -> list[str]:
        """Every metric name ever stored for the node (sorted); ``[]`` if unknown."""
        with self._op("reading metric names"):
            d = self._db["metric_names"].find_one({"_id": node_id})
        return sorted(d["names"]) if d else []

    def series(
        self, node_id: str, metrics: Sequence[str], start: float, end: float, step: float
    ) -> SeriesResult:
        """avg/min/max per ``step`` over ``[start, end)`` from the best tier."""
        q = check_query(metrics, start, end, step)
        acc = StepAcc(q)
        with self._op("reading a series"):
            horizons = self._horizons()
            tier = pick_tier(self._raw, self._rollups, q.step_ms / 1000, q.start_ms, horizons)
            if tier is self._raw:
                self._read_raw(node_id, q.start_ms, q.end_ms, q.names, acc, horizons)
            else:
                res_ms = tier.resolution_s * 1000
                t = self._rollups.index(tier)
                self._read_tier(t, node_id, q.start_ms // res_ms * res_ms, q.end_ms, q.names, acc, horizons)
        return SeriesResult(
            node_id=node_id,
            start=start,
            end=end,
            step=step,
            tier=tier.name,
            timestamps=acc.timestamps(),
            metrics=acc.result(),
        )

    def _read_raw(
        self, node: str, lo: int, hi: int, names: list[str], acc: StepAcc, horizons: Mapping[str, int]
    ) -> None:
        lo = max(lo, horizons.get(self._raw.name, 0))
        if lo >= hi:
            return
        proj = {"_id": 0, "ts": 1, **{f"v.{_esc(n)}": 1 for n in names}}
        where = {"meta.node": node, "ts": {"$gte": _date(lo), "$lt": _date(hi)}}
        seen: set[int] = set()
        for d in self._coll(self._raw).find(where, proj):
            t = _ms(d["ts"])
            if t not in seen:  # a measurement stored twice (see write_samples) counts once
                seen.add(t)
                acc.add_raw(t, {_unesc(k): v for k, v in d.get("v", {}).items()})

    def _read_tier(
        self, t: int, node: str, lo: int, hi: int, names: list[str], acc: StepAcc, horizons: Mapping[str, int]
    ) -> None:
        """Rollup buckets of tier ``t`` (newest version each) in ``[lo, hi)``; after the last, the finer tier."""
        tier = self._rollups[t]
        res_ms = tier.resolution_s * 1000
        floor = horizons.get(tier.name, 0)
        floor = floor - floor % res_ms + res_ms if floor else 0  # buckets that ended by the horizon are gone
        where = {"meta.node": node, "ts": {"$gte": _date(max(lo, floor)), "$lt": _date(hi)}}
        proj = {"_id": 0, "ts": 1, "gen": 1, **{f"a.{_esc(n)}": 1 for n in names}}
        best: dict[int, tuple[int, Mapping[str, list[float]]]] = {}
        for d in self._coll(tier).find(where, proj):
            b = _ms(d["ts"])
            if b not in best or d["gen"] > best[b][0]:
                best[b] = (d["gen"], d.get("a", {}))
        tail = lo
        for b, (_, agg) in best.items():
            acc.add_agg(b, {_unesc(k): v for k, v in agg.items()})
            tail = max(tail, b + res_ms)
        if tail < hi:
            if t == 0:
                self._read_raw(node, tail, hi, names, acc, horizons)
            else:
                self._read_tier(t - 1, node, tail, hi, names, acc, horizons)

    # -- event log and documents (proposed protocol additions) --------------------------------

    def append_event(self, event: Mapping[str, object]) -> str:
        """Append one event (JSON-serialisable; ``ts`` defaults to now); returns its id."""
        eid, ts, body = encode_event(event)
        with self._op("appending an event"):
            self._db["events"].insert_one({"_id": eid, "ts": ts, "body": body})
        return eid

    def events(self, start: float, end: float, limit: int = 1000) -> list[dict[str, object]]:
        """Events with ``start <= ts < end``, oldest first; the newest ``limit`` if there are more."""
        lo, hi = finite("start", start), finite("end", end)
        if limit < 1:
            raise ValueError(f"limit: must be ≥ 1, got {limit!r}")
        with self._op("reading events"):
            docs = list(
                self._db["events"]
                .find({"ts": {"$gte": lo, "$lt": hi}})
                .sort([("ts", -1), ("_id", -1)])
                .limit(limit)
            )
        return [json.loads(d["body"]) for d in reversed(docs)]

    def put_document(self, kind: str, key: str, doc: Mapping[str, object]) -> None:
        """Store (or replace) a configuration/inventory document."""
        body = encode_document(kind, key, doc)
        with self._op("writing a document"):
            self._db["documents"].replace_one(
                {"_id": f"{kind}/{key}"}, {"kind": kind, "key": key, "body": body}, upsert=True
            )

    def get_document(self, kind: str, key: str) -> dict[str, object] | None:
        """The document, or ``None``."""
        check_kind_key(kind, key)
        with self._op("reading a document"):
            d = self._db["documents"].find_one({"_id": f"{kind}/{key}"})
        return None if d is None else dict(json.loads(d["body"]))

    def list_documents(self, kind: str) -> dict[str, dict[str, object]]:
        """Every document of a kind, by key."""
        check_kind_key(kind)
        with self._op("reading documents"):
            docs = list(self._db["documents"].find({"kind": kind}))
        return {d["key"]: json.loads(d["body"]) for d in docs}

    def delete_document(self, kind: str, key: str) -> bool:
        """Delete a document; whether it existed."""
        check_kind_key(kind, key)
        with self._op("deleting a document"):
            return bool(self._db["documents"].delete_one({"_id": f"{kind}/{key}"}).deleted_count)
