"""Telemetry in Redis (``redis://[:password@]host:port/db`` or ``rediss://`` for TLS), via redis-py.

Key layout (prefix ``cloudmon:`` by default; ``?prefix=other:`` in the URL changes it)
======================================================================================

* ``raw:<node>`` **stream**, one per node: entry id ``<ts_ms>-0`` (the sample's
  time), one field ``v`` = msgpack ``{metric: value}``.  Because the id is the
  timestamp, Redis itself refuses a duplicate ``(node, ts)`` (XADD answers
  "equal or smaller than the top item").  ``enforce_retention`` trims it with
  ``XTRIM MINID`` (exact) and ``XTRIM MAXLEN ~`` (4 entries per second of raw
  retention, a cap against a flood of future timestamps).
* ``late:<node>`` **sorted set** (score ``ts_ms``, member msgpack ``[ts_ms,
  values]``): samples older than their stream's newest entry (a replayed
  buffer, an agent whose clock jumped back), which XADD cannot take.  A Lua
  script adds one only if neither the stream nor the set already holds that
  timestamp, so out-of-order samples are kept and still exactly once.  Raw reads
  merge the stream with this set.
* ``ru:<tier>:<node>:<metric>`` **sorted set** per rollup tier and metric
  (score = bucket start in ms, member = 40 bytes ``<qdddd``: bucket_ms, count,
  sum, min, max): one member per bucket, *replaced* when the bucket is recomputed (a
  stream entry cannot be amended, so rollups are not streams).  Per metric so
  that a 30-day query reads ≈ 45 bytes per bucket of the metric it shows, not
  every metric of the node (measured: 880 ms -> see the benchmark).
* ``dirty`` sorted set (score = when the bucket is due, in data time; member
  ``<tier index>|<bucket_ms>|<node>``): buckets to recompute.  It is marked in
  the same MULTI/EXEC as the XADDs, so no accepted sample is ever without its
  mark.  See :mod:`cloudmon.store._common` for the recomputation scheme.
* ``claimed`` sorted set (score = lease expiry in wall-clock ms, member as in
  ``dirty``): marks a writer is recomputing.  One Lua call moves due marks (and
  marks whose lease expired: their writer died) from ``dirty`` to ``claimed``;
  the mark is removed from ``claimed`` in the same MULTI/EXEC that writes the
  bucket, and only if the lease is still the writer's.  A writer killed between
  claim and write therefore leaves the mark in ``claimed``, and any writer
  reclaims it once the lease (``lease_s``) has expired.
* ``claimed_by`` hash (member -> writer token), ``claims:<token>`` set per
  writer, ``claim_owners`` set of tokens: who holds which claim.  Each writer
  keeps one connection named ``cloudmon-w-<token>`` open while it lives; the
  kernel closes it when the process dies (SIGKILL included), so a writer that
  finds a claim owner without its connection in ``CLIENT LIST`` expires that
  owner's claims at once instead of waiting for the lease (where ACLs forbid
  ``CLIENT LIST``, the lease alone applies).
* ``latest`` hash (node -> JSON ``{"node_id", "ts", "values"}``) and
  ``latest_ts`` hash (node -> ts_ms): updated by a Lua script only when the
  sample is newer, which also ``PUBLISH``-es the JSON on the ``cloudmon:live``
  channel (the live feed of other collectors' consoles).
* ``names:<node>`` set of metric names; ``series_nodes`` set of nodes with data.
* ``inv`` hash (node -> JSON hostname/info), ``inv_first`` / ``inv_last`` hashes.
* ``horizon`` hash (tier -> cutoff ms of the last retention run).
* ``events`` sorted set (score ``ts_ms``, member JSON with a unique ``id``);
  ``doc:<kind>`` hash per document kind (key -> JSON).

Everything lives in memory: size Redis for it (≈ 45 metrics x 5,000 nodes x
86,400 s of raw samples is tens of GB; shorten the raw retention for big fleets).
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec

from cloudmon.store._common import (
    EVENT_SLACK,
    StepAcc,
    aggregate,
    check_kind_key,
    check_node_record,
    check_query,
    encode_document,
    encode_event,
    event_key_range,
    events_in,
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

LIVE_CHANNEL: Final = "cloudmon:live"
_DIRTY_BATCH: Final = 2000  # buckets recomputed per write_samples call (bounds its latency)
_CHUNK: Final = 500  # nodes per pipeline in retention runs

_enc = msgspec.msgpack.Encoder()
_json = msgspec.json.Encoder().encode
_dec_values = msgspec.msgpack.Decoder(dict[str, float])
_dec_late = msgspec.msgpack.Decoder(tuple[int, dict[str, float]])
# A rollup member: bucket start (ms), count, sum, min, max.  Fixed size, so a whole range
# comes back as one string (see _ZCAT_LUA) that struct.iter_unpack reads in C.
_BUCKET = struct.Struct("<qdddd")
_LEN = struct.Struct("<qI")  # a raw entry in _XCAT_LUA's reply: ts_ms, blob length

# KEYS: latest, latest_ts.  ARGV: channel, then (node, ts_ms, json) triples.
_LATEST_LUA = """
local n = 0
for i = 2, #ARGV, 3 do
  local cur = redis.call('HGET', KEYS[2], ARGV[i])
  if (not cur) or tonumber(cur) < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
    redis.call('PUBLISH', ARGV[1], ARGV[i + 2])
    n = n + 1
  end
end
return n
"""

# KEYS: raw stream, late zset, dirty zset.  ARGV: ts_ms, member, dirty score, dirty member.
_LATE_LUA = """
local id = ARGV[1] .. '-0'
if #redis.call('XRANGE', KEYS[1], id, id) > 0 then return 0 end
if #redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[1], ARGV[1], 'LIMIT', 0, 1) > 0 then return 0 end
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
if ARGV[4] ~= '' then redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4]) end
return 1
"""

# Replace one bucket of every metric of a node in a rollup tier.  KEYS: none (a bucket has as
# many keys as metrics; built here from the node's key base, so this backend assumes one Redis,
# not a Redis Cluster).  ARGV: key base "<prefix>ru:<tier>:<node>:", bucket_ms, then
# (metric, member) pairs.
_BUCKET_LUA = """
for i = 3, #ARGV, 2 do
  local key = ARGV[1] .. ARGV[i]
  redis.call('ZREMRANGEBYSCORE', key, ARGV[2], ARGV[2])
  redis.call('ZADD', key, ARGV[2], ARGV[i + 1])
end
return (#ARGV - 2) / 2
"""

# Fast range reads: one bulk string instead of a nested reply per entry (redis-py's pure-Python
# RESP parser spends ≈ 20 µs per nested entry; a 1 h raw read is 3,600 entries).
# KEYS: stream.  ARGV: start id, end id.  Reply: (ts_ms int64, blob length uint32, blob)*
_XCAT_LUA = """
local r = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2])
local out = {}
for i, e in ipairs(r) do
  local ms = tonumber(string.match(e[1], '^(%d+)'))
  local blob = e[2][2]
  out[i] = struct.pack('<i8I4', ms, #blob) .. blob
end
return table.concat(out)
"""

# KEYS: zset.  ARGV: min, max score.  Reply: the members joined (fixed-size rollup members).
_ZCAT_LUA = """
return table.concat(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], ARGV[2]))
"""

# Claim rollup marks with a lease.  KEYS: dirty, claimed, claimed_by, claim_owners.  ARGV: due by
# (score), limit, now_ms, lease expiry ms, owner token, claims-set key prefix.  Takes marks due in
# dirty and marks in claimed whose lease expired (their writer died or hung), puts them in
# claimed scored by the new expiry and owned by the token, returns the members.
_CLAIM_LUA = """
local limit = tonumber(ARGV[2])
local out = {}
local seen = {}
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[3], 'LIMIT', 0, limit)
for _, m in ipairs(expired) do
  seen[m] = true
  out[#out + 1] = m
end
if #out < limit then
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, limit - #out)
  for _, m in ipairs(due) do
    if not seen[m] then out[#out + 1] = m end
  end
end
for _, m in ipairs(out) do
  local old = redis.call('HGET', KEYS[3], m)
  if old and old ~= ARGV[5] then redis.call('SREM', ARGV[6] .. old, m) end
  redis.call('ZREM', KEYS[1], m)
  redis.call('ZADD', KEYS[2], ARGV[4], m)
  redis.call('HSET', KEYS[3], m, ARGV[5])
  redis.call('SADD', ARGV[6] .. ARGV[5], m)
end
if #out > 0 then redis.call('SADD', KEYS[4], ARGV[5]) end
return out
"""

# Release claimed marks whose lease is still ours (a writer whose lease expired and was taken
# over must not drop the new owner's claim).  KEYS: claimed, claimed_by, claim_owners.
# ARGV: lease expiry ms, owner token, claims-set key prefix, members.
_RELEASE_LUA = """
local mine = ARGV[3] .. ARGV[2]
local n = 0
for i = 4, #ARGV do
  local m = ARGV[i]
  local cur = redis.call('ZSCORE', KEYS[1], m)
  if cur and tonumber(cur) == tonumber(ARGV[1]) and redis.call('HGET', KEYS[2], m) == ARGV[2] then
    redis.call('ZREM', KEYS[1], m)
    redis.call('HDEL', KEYS[2], m)
    n = n + 1
  end
  redis.call('SREM', mine, m)
end
if redis.call('SCARD', mine) == 0 then redis.call('SREM', KEYS[3], ARGV[2]) end
return n
"""

# Give claimed marks back after a failed recomputation (the writer is alive: no need to wait
# for the lease).  KEYS: dirty, claimed, claimed_by.  ARGV: lease expiry ms, owner token, then
# (member, due) pairs.
_UNCLAIM_LUA = """
for i = 3, #ARGV, 2 do
  local m = ARGV[i]
  local cur = redis.call('ZSCORE', KEYS[2], m)
  if cur and tonumber(cur) == tonumber(ARGV[1]) and redis.call('HGET', KEYS[3], m) == ARGV[2] then
    redis.call('ZREM', KEYS[2], m)
    redis.call('HDEL', KEYS[3], m)
    redis.call('ZADD', KEYS[1], ARGV[i + 1], m)
  end
end
return 1
"""

# Expire every claim of writers that are gone.  KEYS: claimed, claimed_by, claim_owners.
# ARGV: claims-set key prefix, dead tokens.
_REAP_LUA = """
local n = 0
for i = 2, #ARGV do
  local key = ARGV[1] .. ARGV[i]
  for _, m in ipairs(redis.call('SMEMBERS', key)) do
    if redis.call('HGET', KEYS[2], m) == ARGV[i] and redis.call('ZSCORE', KEYS[1], m) then
      redis.call('ZADD', KEYS[1], 0, m)
      n = n + 1
    end
  end
  redis.call('DEL', key)
  redis.call('SREM', KEYS[3], ARGV[i])
end
return n
"""

# KEYS: inv_last.  ARGV: (node, last_seen) pairs; keeps the maximum.
_LAST_LUA = """
for i = 1, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if (not cur) or tonumber(cur) < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
"""


def _split_url(url: str) -> tuple[str, str]:
    """The URL for redis-py (our own ``prefix`` option removed) and the key prefix."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise StoreError(f"not a Redis store URL: {redact_url(url)!r}; use redis://host:6379/0 or rediss://…")
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = "cloudmon:"
    rest = []
    for k, v in query:
        if k == "prefix":
            prefix = v
        else:
            rest.append((k, v))
    return urlunsplit(parts._replace(query=urlencode(rest))), prefix


class RedisStore:
    """A :class:`~cloudmon.store.base.TelemetryStore` in Redis (see the module docstring).

    The constructor does not contact the server (the collector may start while
    Redis is down); every call that cannot reach it raises
    :class:`StoreUnavailable`, and the next call after the server is back works.
    ``grace_s``: how far (in data time) the newest sample must be past a
    rollup bucket's end before the bucket is recomputed.  ``lease_s``: how long
    (wall clock, read from ``clock``) a writer holds the rollup marks it claimed;
    marks of a writer that died are recomputed by any writer once it expires.
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
        import redis  # optional dependency: imported only when this backend is used

        self.url = url
        self._shown = redact_url(url)
        self.tiers = tuple(tiers)
        self._raw, self._rollups = plan_tiers(self.tiers)
        self._grace_ms = int(finite("grace_s", grace_s) * 1000)
        self._lease_ms = int(finite("lease_s", lease_s) * 1000)
        if self._lease_ms <= 0:
            raise ValueError(f"lease_s: must be > 0 seconds, got {lease_s!r}")
        self._clock = clock
        client_url, self._p = _split_url(url)
        self._redis_errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        self._redis_error = redis.exceptions.RedisError
        self._response_error = redis.exceptions.ResponseError
        try:
            self._r: Any = redis.Redis.from_url(
                client_url,
                socket_connect_timeout=3,
                socket_timeout=15,
                health_check_interval=10,
                decode_responses=False,
            )
        except ValueError as exc:
            raise StoreError(f"bad Redis store URL {self._shown!r}: {exc}") from None
        self._latest_script = self._r.register_script(_LATEST_LUA)
        self._late_script = self._r.register_script(_LATE_LUA)
        self._last_script = self._r.register_script(_LAST_LUA)
        self._bucket_script = self._r.register_script(_BUCKET_LUA)
        self._claim_script = self._r.register_script(_CLAIM_LUA)
        self._release_script = self._r.register_script(_RELEASE_LUA)
        self._unclaim_script = self._r.register_script(_UNCLAIM_LUA)
        self._reap_script = self._r.register_script(_REAP_LUA)
        self._token = uuid.uuid4().hex
        self._presence: Any = None  # the connection that shows this writer is alive (see module doc)
        self._presence_checked = 0.0
        self._next_reap = 0.0
        self._xcat = self._r.register_script(_XCAT_LUA)
        self._zcat = self._r.register_script(_ZCAT_LUA)
        self._cap = max(1000, 4 * self._raw.retention_s)
        self._lock = threading.RLock()
        self._closed = False
        self._newest_ms = 0
        self._known_names: dict[str, set[str]] = {}

    def __repr__(self) -> str:
        return f"RedisStore({self._shown!r})"

    # -- plumbing -----------------------------------------------------------------------------

    def _k(self, *parts: str) -> str:
        return self._p + ":".join(parts)

    @contextmanager
    def _op(self, doing: str) -> Iterator[None]:
        if self._closed:
            raise StoreError(f"Redis store {self._shown} is closed")
        try:
            yield
        except self._redis_errors as exc:
            # The server may come back empty (restarted without persistence): re-send what
            # this process believes is already stored (metric-name sets, rollup marks).
            self._known_names.clear()
            raise StoreUnavailable(
                f"cannot reach the Redis store at {self._shown} while {doing}: {exc}; "
                "start redis-server there (or fix the --store URL) — the collector retries"
            ) from exc
        except self._redis_error as exc:
            raise StoreError(f"Redis store {self._shown} failed while {doing}: {exc}") from exc

    def _dirty_member(self, tier_idx: int, bucket_ms: int, node: str) -> tuple[int, str]:
        res_ms = self._rollups[tier_idx].resolution_s * 1000
        return bucket_ms + res_ms + self._grace_ms, f"{tier_idx}|{bucket_ms}|{node}"

    # -- writing ------------------------------------------------------------------------------

    def write_samples(self, samples: Sequence[Sample]) -> None:
        """Store a batch (one MULTI/EXEC of XADDs and rollup marks), keep late ones, update latest.

        A duplicate ``(node, ts)`` (to the millisecond) is ignored.  Raises
        ``ValueError`` for a bad sample (nothing of the batch is stored) and
        :class:`StoreUnavailable` when Redis cannot be reached (retrying the
        batch later is safe: duplicates are refused by id).
        """
        prepared = prepare(samples)
        if not prepared:
            return
        with self._lock, self._op("writing samples"):
            r = self._r
            first_res = self._rollups[0].resolution_s * 1000 if self._rollups else 0
            pipe = r.pipeline(transaction=True)
            blobs: list[bytes] = []
            marks: dict[str, int] = {}
            newest: dict[str, tuple[int, dict[str, float]]] = {}
            fresh: dict[str, set[str]] = {}
            for node, ts_ms, values in prepared:
                blob = _enc.encode(values)
                blobs.append(blob)
                # No MAXLEN here (3 more arguments per entry, ≈ 10 % of the ingest time):
                # enforce_retention applies the cap along with MINID.
                pipe.xadd(self._k("raw", node), {"v": blob}, id=f"{ts_ms}-0")
                if first_res:
                    due, member = self._dirty_member(0, ts_ms - ts_ms % first_res, node)
                    marks[member] = due
                cur = newest.get(node)
                if cur is None or ts_ms >= cur[0]:
                    newest[node] = (ts_ms, values)
                names = self._known_names.get(node)
                if names is None or not names.issuperset(values):
                    fresh.setdefault(node, set()).update(values)
            if marks:
                pipe.zadd(self._k("dirty"), marks)
            for node, got in fresh.items():
                if got:
                    pipe.sadd(self._k("names", node), *got)
                pipe.sadd(self._k("series_nodes"), node)
            results = pipe.execute(raise_on_error=False)
            late = []
            for i, res in enumerate(results[: len(prepared)]):
                if isinstance(res, self._response_error) and "equal or smaller" in str(res):
                    late.append(i)
                elif isinstance(res, Exception):
                    raise res
            for res in results[len(prepared) :]:
                if isinstance(res, Exception):
                    raise res
            for node, got in fresh.items():
                self._known_names.setdefault(node, set()).update(got)
            if late:
                lp = r.pipeline(transaction=False)
                for i in late:
                    node, ts_ms, values = prepared[i]
                    due, member = (
                        self._dirty_member(0, ts_ms - ts_ms % first_res, node) if first_res else (0, "")
                    )
                    self._late_script(
                        keys=[self._k("raw", node), self._k("late", node), self._k("dirty")],
                        args=[ts_ms, _enc.encode((ts_ms, values)), due, member],
                        client=lp,
                    )
                accepted = lp.execute()
                log.debug("%d late samples, %d of them new", len(late), sum(accepted))
            args: list[str | int | bytes] = [LIVE_CHANNEL]
            for node, (ts_ms, values) in newest.items():
                doc = {"node_id": node, "ts": ts_ms / 1000, "values": values}
                args += [node, ts_ms, _json(doc)]
            self._latest_script(keys=[self._k("latest"), self._k("latest_ts")], args=args)
            self._newest_ms = max(self._newest_ms, prepared[-1][1])
            self._recompute(self._newest_ms, _DIRTY_BATCH)

    def _ensure_presence(self, now: float) -> None:
        """Keep this writer's named connection open (checked at most once a second)."""
        conn = self._presence
        if conn is not None and now - self._presence_checked < 1.0:
            return
        pool = self._r.connection_pool
        if conn is not None:
            try:
                conn.send_command("PING")
                conn.read_response()
            except self._redis_error:
                self._drop_presence()  # Redis restarted or the link broke: open a new one
            else:
                self._presence_checked = now
                return
        conn = pool.get_connection()
        try:
            conn.send_command("CLIENT", "SETNAME", f"cloudmon-w-{self._token}")
            conn.read_response()
        except BaseException:
            conn.disconnect()
            pool.release(conn)
            raise
        self._presence = conn
        self._presence_checked = now

    def _drop_presence(self) -> None:
        conn, self._presence = self._presence, None
        if conn is not None:
            conn.disconnect()
            self._r.connection_pool.release(conn)

    def _reap_dead(self, now: float, force: bool) -> None:
        """Expire the claims of writers whose named connection is gone (they died)."""
        if not force and now < self._next_reap:
            return
        self._next_reap = now + 1.0
        owners = {o.decode() for o in self._r.smembers(self._k("claim_owners"))} - {self._token}
        if not owners:
            return
        try:
            alive = {str(c.get("name", "")) for c in self._r.client_list()}
        except self._response_error as exc:  # CLIENT LIST not allowed (ACL): leases alone apply
            log.debug("cannot list Redis clients (%s); dead writers' claims wait for their lease", exc)
            return
        dead = sorted(o for o in owners if f"cloudmon-w-{o}" not in alive)
        if dead:
            n = self._reap_script(
                keys=[self._k("claimed"), self._k("claimed_by"), self._k("claim_owners")],
                args=[self._k("claims", ""), *dead],
            )
            log.info("took over %d rollup claims of %d collector(s) that are gone", n, len(dead))

    def _recompute(self, upto_ms: float, limit: int | None) -> int:
        """Recompute due rollup buckets (marks due by ``upto_ms``, and marks whose lease expired);
        returns how many."""
        if not self._rollups:
            return 0
        done = 0
        upto = "+inf" if upto_ms == float("inf") else int(upto_ms)
        now = self._clock()
        self._ensure_presence(now)
        self._reap_dead(now, force=limit is None)
        claim_keys = [self._k("dirty"), self._k("claimed"), self._k("claimed_by"), self._k("claim_owners")]
        for _ in range(len(self._rollups) + 1 if limit else 1000):
            now_ms = int(self._clock() * 1000)
            lease = now_ms + self._lease_ms
            # Claim with a lease in one call: the mark moves to ``claimed`` and leaves it only
            # in the MULTI that writes the bucket, so a writer killed in between loses nothing.
            # A sample arriving meanwhile marks ``dirty`` again, so its bucket is redone.
            members: list[bytes] = self._claim_script(
                keys=claim_keys,
                args=[upto, limit or 10_000, now_ms, lease, self._token, self._k("claims", "")],
            )
            if not members:
                break
            jobs = sorted(
                ((int(t), int(b), node) for t, b, node in (m.decode().split("|", 2) for m in members)),
                key=lambda j: j[0],
            )
            try:
                self._recompute_jobs(jobs, lease)
            except Exception:
                # Give the marks back now so another writer (or the next call) redoes them; if
                # Redis is gone, they stay claimed and are reclaimed when the lease expires.
                args: list[str | int] = [lease, self._token]
                for t, b, n in jobs:
                    args += [f"{t}|{b}|{n}", self._dirty_member(t, b, n)[0]]
                try:
                    self._unclaim_script(
                        keys=[self._k("dirty"), self._k("claimed"), self._k("claimed_by")], args=args
                    )
                except self._redis_error:
                    log.debug("could not give back %d rollup marks; their lease will expire", len(jobs))
                raise
            done += len(jobs)
            if limit:
                limit -= len(jobs)
                if limit <= 0:
                    break
        return done

    def _recompute_jobs(self, jobs: list[tuple[int, int, str]], lease: int) -> None:
        """Recompute the claimed buckets ``jobs`` and release their marks (held until ``lease``)."""
        r = self._r
        horizons = self._horizons()
        # A bucket whose source was already trimmed (enforce_retention is the only thing that
        # trims, and it records the horizon) is left alone: recomputing it would undercount.
        todo = [
            (t, b, node)
            for t, b, node in jobs
            if b >= horizons.get((self._raw if t == 0 else self._rollups[t - 1]).name, 0)
        ]
        coarse_nodes = sorted({node for t, _, node in todo if t > 0})
        names: dict[str, list[str]] = {}
        if coarse_nodes:
            pipe = r.pipeline(transaction=False)
            for node in coarse_nodes:
                pipe.smembers(self._k("names", node))
            for node, got in zip(coarse_nodes, pipe.execute(), strict=True):
                names[node] = sorted(m.decode() for m in got)
        read = r.pipeline(transaction=False)
        for t, b, node in todo:
            res_ms = self._rollups[t].resolution_s * 1000
            if t == 0:
                read.xrange(self._k("raw", node), f"{b}-0", f"{b + res_ms - 1}")
                read.zrangebyscore(self._k("late", node), b, b + res_ms - 1)
            else:
                finer = self._rollups[t - 1].name
                for m in names[node]:
                    read.zrangebyscore(self._k("ru", finer, node, m), b, b + res_ms - 1)
        got = read.execute()
        write = r.pipeline(transaction=True)
        pos = 0
        for t, b, node in todo:
            if t == 0:
                rows = [_dec_values.decode(f[b"v"]) for _, f in got[pos]]
                rows += [_dec_late.decode(m)[1] for m in got[pos + 1]]
                pos += 2
                agg = aggregate(rows)
            else:
                parts: list[dict[str, list[float]]] = []
                for m in names[node]:
                    parts += [{m: list(_BUCKET.unpack(x)[1:])} for x in got[pos]]
                    pos += 1
                agg = merge(parts)
            tier = self._rollups[t].name
            if agg:
                args: list[str | int | bytes] = [self._k("ru", tier, node, ""), b]
                for m, (c, sm, lo, hi) in agg.items():
                    args += [m, _BUCKET.pack(b, c, sm, lo, hi)]
                self._bucket_script(keys=[], args=args, client=write)
            if t + 1 < len(self._rollups):
                res = self._rollups[t + 1].resolution_s * 1000
                due, member = self._dirty_member(t + 1, b - b % res, node)
                write.zadd(self._k("dirty"), {member: due})
        # Released in the same MULTI as the buckets: a mark leaves ``claimed`` only with its
        # bucket written (skipped buckets too: their source is gone, nothing to redo).
        release: list[str | int] = [lease, self._token, self._k("claims", "")]
        release += [f"{t}|{b}|{n}" for t, b, n in jobs]
        self._release_script(
            keys=[self._k("claimed"), self._k("claimed_by"), self._k("claim_owners")],
            args=release,
            client=write,
        )
        write.execute()

    def upsert_nodes(self, nodes: Sequence[NodeRecord]) -> None:
        """Insert or update inventory entries (``first_seen`` kept, ``last_seen`` never goes back)."""
        rows = []
        for rec in nodes:
            first, last, info = check_node_record(rec)
            # info is already JSON: splice it in rather than encode it twice.
            body = f'{{"hostname": {json.dumps(rec.hostname)}, "info": {info}}}'
            rows.append((rec.node_id, body, first, last))
        if not rows:
            return
        with self._lock, self._op("writing the node inventory"):
            pipe = self._r.pipeline(transaction=True)
            for node, body, first, _ in rows:
                pipe.hset(self._k("inv"), node, body)
                pipe.hsetnx(self._k("inv_first"), node, repr(first))
            args: list[str | int] = []
            for node, _, _, last in rows:
                args += [node, repr(last)]
            self._last_script(keys=[self._k("inv_last")], args=args, client=pipe)
            pipe.execute()

    def flush(self) -> None:
        """Recompute every marked rollup bucket (open ones included) so the rollups are current."""
        with self._lock, self._op("flushing rollups"):
            self._recompute(float("inf"), None)

    def enforce_retention(self, now: float) -> int:
        """XTRIM MINID the raw streams, drop late samples and rollup buckets past each tier's
        retention; returns entries removed.  A tier whose cutoff did not move is skipped."""
        now_s = finite("now", now)
        removed = 0
        with self._lock, self._op("enforcing retention"):
            r = self._r
            horizons = self._horizons()
            nodes = sorted(m.decode() for m in r.smembers(self._k("series_nodes")))
            names: dict[str, list[str]] = {}
            if self._rollups:
                pipe = r.pipeline(transaction=False)
                for node in nodes:
                    pipe.smembers(self._k("names", node))
                for node, got in zip(nodes, pipe.execute(), strict=True):
                    names[node] = [m.decode() for m in got]
            for tier in (self._raw, *self._rollups):
                cutoff = int((now_s - tier.retention_s) * 1000)
                if cutoff <= horizons.get(tier.name, 0):
                    continue
                for i in range(0, len(nodes), _CHUNK):
                    pipe = r.pipeline(transaction=False)
                    for node in nodes[i : i + _CHUNK]:
                        if tier is self._raw:
                            pipe.xtrim(self._k("raw", node), minid=cutoff, approximate=False)
                            pipe.xtrim(self._k("raw", node), maxlen=self._cap, approximate=True)
                            pipe.zremrangebyscore(self._k("late", node), "-inf", f"({cutoff}")
                        else:
                            res_ms = tier.resolution_s * 1000
                            for m in names[node]:
                                key = self._k("ru", tier.name, node, m)
                                pipe.zremrangebyscore(key, "-inf", cutoff - res_ms)
                    removed += sum(int(x) for x in pipe.execute())
                r.hset(self._k("horizon"), tier.name, cutoff)
        if removed:
            log.debug("retention removed %d entries from %s", removed, self._shown)
        return removed

    def close(self) -> None:
        """Recompute marked rollups (logged, not raised, if Redis is gone) and disconnect.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                self.flush()
            except StoreError as exc:
                log.warning("could not flush %s on close (its marks stay in Redis): %s", self._shown, exc)
            self._closed = True
            self._drop_presence()
            self._r.close()
        log.info("closed Redis store %s", self._shown)

    # -- reading ------------------------------------------------------------------------------

    def _horizons(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self._r.hgetall(self._k("horizon")).items()}

    def nodes(self) -> list[NodeRecord]:
        """Every node of the inventory, in no particular order."""
        with self._op("reading the node inventory"):
            pipe = self._r.pipeline(transaction=False)
            for h in ("inv", "inv_first", "inv_last"):
                pipe.hgetall(self._k(h))
            inv, first, last = pipe.execute()
        out = []
        for node, body in inv.items():
            doc = json.loads(body)
            out.append(
                NodeRecord(
                    node_id=node.decode(),
                    hostname=doc["hostname"],
                    first_seen=float(first.get(node, 0.0)),
                    last_seen=float(last.get(node, 0.0)),
                    info=doc["info"],
                )
            )
        return out

    def latest(self, node_id: str) -> Sample | None:
        """The newest sample of a node, or ``None``."""
        with self._op("reading the latest sample"):
            body = self._r.hget(self._k("latest"), node_id)
        if body is None:
            return None
        doc = json.loads(body)
        return Sample(node_id=node_id, ts=doc["ts"], values=doc["values"])

    def metric_names(self, node_id: str) -> list[str]:
        """Every metric name ever stored for the node (sorted); ``[]`` if unknown."""
        with self._op("reading metric names"):
            return sorted(m.decode() for m in self._r.smembers(self._k("names", node_id)))

    def series(
        self, node_id: str, metrics: Sequence[str], start: float, end: float, step: float
    ) -> SeriesResult:
        """avg/min/max per ``step`` over ``[start, end)`` from the best tier (see the module docstring)."""
        q = check_query(metrics, start, end, step)
        acc = StepAcc(q)
        with self._op("reading a series"):
            tier = pick_tier(self._raw, self._rollups, q.step_ms / 1000, q.start_ms, self._horizons())
            if tier is self._raw:
                self._read_raw(node_id, q.start_ms, q.end_ms, acc)
            else:
                res_ms = tier.resolution_s * 1000
                self._read_tier(
                    self._rollups.index(tier), node_id, q.start_ms // res_ms * res_ms, q.end_ms, acc
                )
        return SeriesResult(
            node_id=node_id,
            start=start,
            end=end,
            step=step,
            tier=tier.name,
            timestamps=acc.timestamps(),
            metrics=acc.result(),
        )

    def _read_raw(self, node: str, lo: int, hi: int, acc: StepAcc) -> None:
        pipe = self._r.pipeline(transaction=False)
        self._xcat(keys=[self._k("raw", node)], args=[f"{lo}-0", f"{hi - 1}"], client=pipe)
        pipe.zrangebyscore(self._k("late", node), lo, hi - 1)
        packed, late = pipe.execute()
        view = memoryview(packed)
        pos, end, head = 0, len(packed), _LEN.size
        while pos < end:
            ts_ms, n = _LEN.unpack_from(view, pos)
            pos += head
            acc.add_raw(ts_ms, _dec_values.decode(view[pos : pos + n]))
            pos += n
        for m in late:
            ts_ms, values = _dec_late.decode(m)
            acc.add_raw(ts_ms, values)

    def _read_tier(self, t: int, node: str, lo: int, hi: int, acc: StepAcc) -> None:
        """Rollup buckets of tier ``t`` in ``[lo, hi)``; after the last one, the finer tier.

        A recomputation writes every metric of a bucket in one MULTI, so the newest
        bucket of any requested metric marks where the tier's data ends.
        """
        tier = self._rollups[t]
        pipe = self._r.pipeline(transaction=False)
        for m in acc.q.names:
            self._zcat(keys=[self._k("ru", tier.name, node, m)], args=[lo, hi - 1], client=pipe)
        tail = lo
        for k, packed in enumerate(pipe.execute()):
            last = -1
            for b, c, sm, mn, mx in _BUCKET.iter_unpack(packed):
                acc.add_metric(k, b, int(c), sm, mn, mx)
                last = b
            if last >= 0:
                tail = max(tail, last + tier.resolution_s * 1000)
        if tail < hi:
            if t == 0:
                self._read_raw(node, tail, hi, acc)
            else:
                self._read_tier(t - 1, node, tail, hi, acc)

    # -- event log and documents (proposed protocol additions) --------------------------------

    def append_event(self, event: Mapping[str, object]) -> str:
        """Append one event (JSON-serialisable; ``ts`` defaults to now); returns its id."""
        eid, ts, body = encode_event(event)
        with self._op("appending an event"):
            self._r.zadd(self._k("events"), {body: round(ts * 1000)})
        return eid

    def events(self, start: float, end: float, limit: int = 1000) -> list[dict[str, object]]:
        """Events with ``start <= ts < end``, oldest first; the newest ``limit`` if there are more."""
        lo, hi = finite("start", start), finite("end", end)
        if limit < 1:
            raise ValueError(f"limit: must be ≥ 1, got {limit!r}")
        lo_ms, hi_ms = event_key_range(lo, hi)
        with self._op("reading events"):
            rows = self._r.zrevrangebyscore(
                self._k("events"), f"({hi_ms}", lo_ms, start=0, num=limit + EVENT_SLACK
            )
        return events_in([json.loads(b) for b in reversed(rows)], lo, hi, limit)

    def put_document(self, kind: str, key: str, doc: Mapping[str, object]) -> None:
        """Store (or replace) a configuration/inventory document."""
        body = encode_document(kind, key, doc)
        with self._op("writing a document"):
            self._r.hset(self._k("doc", kind), key, body)

    def get_document(self, kind: str, key: str) -> dict[str, object] | None:
        """The document, or ``None``."""
        check_kind_key(kind, key)
        with self._op("reading a document"):
            body = self._r.hget(self._k("doc", kind), key)
        return None if body is None else dict(json.loads(body))

    def list_documents(self, kind: str) -> dict[str, dict[str, object]]:
        """Every document of a kind, by key."""
        check_kind_key(kind)
        with self._op("reading documents"):
            rows = self._r.hgetall(self._k("doc", kind))
        return {k.decode(): json.loads(v) for k, v in rows.items()}

    def delete_document(self, kind: str, key: str) -> bool:
        """Delete a document; whether it existed."""
        check_kind_key(kind, key)
        with self._op("deleting a document"):
            return bool(self._r.hdel(self._k("doc", kind), key))
