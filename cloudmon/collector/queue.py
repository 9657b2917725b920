"""A shared ingest queue in Redis, so that several collectors share one store.

Off unless ``queue`` is set (``--queue redis://HOST:PORT/DB``, ``CLOUDMON_QUEUE``).
With it, each collector:

* **produces**: an accepted report is appended to the Redis Stream
  :data:`STREAM_KEY` (``XADD``) instead of the local store writer; the agent
  gets 200 only once Redis acknowledged the append, and 503 (so it spools and
  retries) when Redis cannot be reached.  Appends are pipelined from the
  asyncio loop by one flusher task: requests arriving while a pipeline is in
  flight go together in the next one, so the loop never waits on Redis and a
  busy collector sends few round trips.
* **consumes**: a thread reads the stream as a member of the consumer group
  :data:`GROUP` (``XREADGROUP``; its consumer name is unique per process),
  writes the samples to the store, and ``XACK``\\ s them only after the store
  write succeeded.  Every ``claim_timeout`` seconds it takes over entries that
  another consumer read but did not acknowledge for that long (``XAUTOCLAIM``:
  that collector died or hangs), and it trims acknowledged entries
  (``XTRIM MINID``) so the stream holds only what is not yet stored.
* **shares live state**: the same pipeline publishes the reports' node state
  on the pub/sub channel :data:`LIVE_CHANNEL`; every collector merges the
  reports of other collectors into its cluster model and live streams, so any
  collector's ``/api/v1/nodes`` and SSE stream show every node.

Exactly once: a claimed entry may already have been written by the consumer
that died before its ``XACK``.  That write is repeated; the store must (and
the embedded store does) ignore a sample whose ``(node, ts)`` it already has,
including in its rollups.  While the store is unavailable the consumer keeps
its one batch and retries it with capped backoff (entries stay pending in
Redis, not in memory), and reports ``degraded``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Final

import msgspec
import redis
import redis.asyncio as aioredis

from cloudmon.collector.api import SampleEvent
from cloudmon.collector.stream import StreamHub, sse_event
from cloudmon.model.cluster import ClusterModel
from cloudmon.store import redact_url
from cloudmon.store.base import Sample, StoreUnavailable, TelemetryStore

log = logging.getLogger(__name__)

#: The stream of queued reports and the consumer group every collector joins.
STREAM_KEY: Final = "cloudmon:queue:ingest"
GROUP: Final = "cloudmon-collectors"
#: Pub/sub channel carrying every accepted report's node state to all collectors
#: (its own name: pub/sub channels are shared by all databases of a server, and
#: the Redis store publishes on ``cloudmon:live``).
LIVE_CHANNEL: Final = "cloudmon:queue:live"
#: Field of a stream entry holding the encoded report.
_FIELD: Final = b"r"
#: Entries read per ``XREADGROUP`` / ``XAUTOCLAIM`` call (one store batch).
READ_COUNT: Final = 1000
#: How long one ``XREADGROUP`` blocks (ms); bounds how long ``close()`` waits.
READ_BLOCK_MS: Final = 500
#: Seconds ``start()`` waits for the live subscription to be confirmed.
SUBSCRIBE_WAIT_S: Final = 3.0
#: A consumer name idle this long (ms) with nothing pending is removed from the group.
FORGET_CONSUMER_MS: Final = 3_600_000
#: Seconds between trims of acknowledged entries.
TRIM_INTERVAL: Final = 5.0


class QueueError(Exception):
    """The shared queue is misconfigured (the text says which setting to fix)."""


class QueuedSample(msgspec.Struct, array_like=True, frozen=True):
    """One report as it travels through the stream: what the store needs."""

    node_id: str
    ts: float
    values: dict[str, float]


class LiveReport(msgspec.Struct, array_like=True, frozen=True):
    """One report's node state, published to every collector."""

    node_id: str
    hostname: str
    ts: float
    interval: float
    values: dict[str, float]
    info: dict[str, Any]


class LiveBatch(msgspec.Struct, array_like=True, frozen=True):
    """What one publish carries: the reports one collector accepted in one pipeline."""

    origin: str
    reports: list[LiveReport]


_sample_encoder: Final = msgspec.msgpack.Encoder()
_sample_decoder: Final = msgspec.msgpack.Decoder(QueuedSample)
_live_decoder: Final = msgspec.msgpack.Decoder(LiveBatch)
_json_encoder: Final = msgspec.json.Encoder()


def consumer_name() -> str:
    """A consumer name unique to this process (host, pid and a random part)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class QueueStats(msgspec.Struct, frozen=True):
    """Counters of the shared queue (folded into ``/api/v1/status``)."""

    #: Reports waiting for the next pipeline in this collector.
    queued: int
    #: Entries in the shared stream (not yet stored and acknowledged, roughly) at the last append.
    stream_len: int
    appended: int
    written: int
    claimed: int
    errors: int
    last_error: str | None
    #: The queue's Redis or the store is failing (data waits in Redis or the agents' spools).
    degraded: bool


class SharedQueue:
    """Producer, consumer and live fan-out of one collector on the shared Redis queue.

    ``await start()`` on the collector's loop, ``await close()`` there too; the
    store stays the caller's.  ``model`` and ``hub`` are the collector's: the
    live subscriber updates them on the loop.
    """

    def __init__(
        self,
        url: str,
        store: TelemetryStore,
        model: ClusterModel,
        hub: StreamHub,
        *,
        claim_timeout: float = 30.0,
        max_pending: int = 50_000,
        max_entries: int = 1_000_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise QueueError(f"queue URL {url!r} must start with redis://, rediss:// or unix://")
        if claim_timeout <= 0:
            raise QueueError("queue_claim_timeout must be > 0 seconds")
        self._url = url
        self._store = store
        self._model = model
        self._hub = hub
        self._claim_ms = int(claim_timeout * 1000)
        self._max_pending = max_pending
        self._max_entries = max_entries
        #: Stream length seen by the last pipeline (what bounds the queue in Redis).
        self._stream_len = 0
        self._clock = clock
        self.name = consumer_name()
        # Producer state (loop only).
        self._aio: aioredis.Redis | None = None
        self._pending: list[tuple[list[bytes], list[LiveReport], asyncio.Future[bool]]] = []
        self._pending_n = 0
        self._wake: asyncio.Event | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._subscriber: asyncio.Task[None] | None = None
        self._subscribed: asyncio.Event | None = None
        # Consumer thread state.
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        # Counters (each written by one thread).
        self._appended = 0
        self._written = 0
        self._claimed = 0
        self._errors = 0
        self._last_error: str | None = None
        self._produce_down = False
        self._consume_down = False

    # -- lifecycle ---------------------------------------------------------------

    def _client_kwargs(self) -> dict[str, Any]:
        # Short timeouts: a Redis that went away must turn into 503s (agents spool)
        # within a couple of seconds, not hang requests.
        return {"socket_connect_timeout": 2.0, "socket_timeout": 5.0, "health_check_interval": 10}

    async def start(self) -> None:
        """Create the consumer group if needed and start producer, consumer and subscriber."""
        self._aio = aioredis.Redis.from_url(self._url, **self._client_kwargs())
        self._wake = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._flusher = asyncio.create_task(self._flush_loop(), name="cloudmon-queue-flusher")
        self._subscriber = asyncio.create_task(self._live_loop(), name="cloudmon-queue-live")
        self._thread = threading.Thread(target=self._consume, name="cloudmon-queue-consumer", daemon=True)
        self._thread.start()
        # A report published before this collector subscribed would not reach its
        # model: wait (briefly: Redis may be down) until the subscription is confirmed.
        try:
            await asyncio.wait_for(self._subscribed.wait(), SUBSCRIBE_WAIT_S)
        except TimeoutError:
            log.warning("not yet subscribed to live updates of other collectors (queue unreachable?)")
        log.info("shared queue %s, consumer %s", redact_url(self._url), self.name)

    async def close(self) -> None:
        """Stop the tasks and the consumer thread (what it holds stays pending in Redis).  Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._flusher is not None:
            # Let appends already waiting get their answer before the flusher goes.
            if self._wake is not None:
                self._wake.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drain(), 5.0)
        for task in (self._flusher, self._subscriber):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for _, _, fut in self._pending:
            if not fut.done():
                fut.set_result(False)
        self._pending.clear()
        self._stop.set()
        thread = self._thread
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 15.0)
            if thread.is_alive():
                log.error("queue consumer did not stop within 15 s (store call hanging?)")
        if self._aio is not None:
            await self._aio.aclose()

    async def _drain(self) -> None:
        while self._pending:
            await asyncio.sleep(0.01)

    def stats(self) -> QueueStats:
        """Current counters (cheap)."""
        return QueueStats(
            queued=self._pending_n,
            stream_len=self._stream_len,
            appended=self._appended,
            written=self._written,
            claimed=self._claimed,
            errors=self._errors,
            last_error=self._last_error,
            degraded=self._produce_down or self._consume_down,
        )

    def _error(self, where: str, exc: BaseException) -> None:
        self._errors += 1
        self._last_error = f"{where}: {type(exc).__name__}: {exc}"

    # -- producer (asyncio loop) -------------------------------------------------------

    async def append(self, samples: Sequence[Sample], live: Sequence[LiveReport]) -> bool:
        """Append a request's samples to the stream; True once Redis acknowledged all of them.

        False (the caller answers 503 and the agent retries) when Redis cannot be
        reached or too many reports already wait for the next pipeline.
        """
        if self._closed or self._wake is None or self._pending_n + len(samples) > self._max_pending:
            return False
        if self._stream_len + self._pending_n + len(samples) > self._max_entries:
            return False  # the store is not keeping up (or down): agents keep reports in their spools
        payloads = [_sample_encoder.encode(QueuedSample(s.node_id, s.ts, dict(s.values))) for s in samples]
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((payloads, list(live), fut))
        self._pending_n += len(payloads)
        self._wake.set()
        return await fut

    async def _flush_loop(self) -> None:
        assert self._wake is not None
        assert self._aio is not None
        wake, client = self._wake, self._aio
        while True:
            await wake.wait()
            wake.clear()
            batch, self._pending, n = self._pending, [], self._pending_n
            self._pending_n = 0
            if not batch:
                continue
            live = LiveBatch(self.name, [r for _, reports, _ in batch for r in reports])
            try:
                async with client.pipeline(transaction=False) as pipe:
                    for payloads, _, _ in batch:
                        for p in payloads:
                            pipe.xadd(STREAM_KEY, {_FIELD: p})
                    if live.reports:
                        pipe.publish(LIVE_CHANNEL, _sample_encoder.encode(live))
                    pipe.xlen(STREAM_KEY)
                    results = await pipe.execute()
            except (redis.RedisError, OSError) as exc:
                self._error("appending to the queue", exc)
                if not self._produce_down:
                    log.warning("cannot append to the shared queue (%s); answering 503 until it is back", exc)
                self._produce_down = True
                ok = False
            else:
                if self._produce_down:
                    log.warning("shared queue reachable again")
                self._produce_down = False
                self._appended += n
                self._stream_len = int(results[-1])
                ok = True
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_result(ok)

    # -- live fan-out (asyncio loop) ----------------------------------------------------

    async def _live_loop(self) -> None:
        assert self._aio is not None
        assert self._subscribed is not None
        delay = 0.25
        while True:
            pubsub = self._aio.pubsub()
            try:
                await pubsub.subscribe(LIVE_CHANNEL)
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is None:
                        continue
                    if msg.get("type") == "message":
                        self._merge(msg["data"])
                    elif msg.get("type") == "subscribe":
                        self._subscribed.set()  # the server confirmed: nothing published from now is missed
                        delay = 0.25
            except (redis.RedisError, OSError) as exc:
                self._subscribed.clear()
                log.debug("live channel lost (%s); resubscribing in %.2f s", exc, delay)
            finally:
                with contextlib.suppress(redis.RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(5.0, delay * 2)

    def _merge(self, data: bytes) -> None:
        """Fold another collector's reports into this collector's model and streams."""
        try:
            batch = _live_decoder.decode(data)
        except msgspec.DecodeError as exc:
            log.warning("ignoring an undecodable message on %s: %s", LIVE_CHANNEL, exc)
            return
        if batch.origin == self.name:
            return  # our own reports: the ingest handler already applied them
        now = self._clock()
        model, hub = self._model, self._hub
        for r in batch.reports:
            known = model.get(r.node_id)
            live = known is None or r.ts > known.last_ts
            model.update(r.node_id, r.hostname, r.ts, r.interval, r.values, dict(r.info), now)
            if live and hub.watched(r.node_id):
                event = SampleEvent(r.node_id, r.ts, dict(r.values))
                hub.publish_sample(r.node_id, sse_event("sample", _json_encoder.encode(event)))

    # -- consumer thread ---------------------------------------------------------------

    def _consume(self) -> None:
        client = redis.Redis.from_url(self._url, **self._client_kwargs())
        try:
            self._consume_with(client)
        finally:
            client.close()

    def _consume_with(self, client: redis.Redis) -> None:
        group_ready = False
        held: tuple[list[bytes], list[Sample]] | None = None
        attempts = 0
        next_claim = time.monotonic() + self._claim_ms / 1000.0
        next_trim = time.monotonic() + TRIM_INTERVAL
        while not self._stop.is_set():
            try:
                if not group_ready:
                    self._create_group(client)
                    group_ready = True
                if time.monotonic() >= next_trim:
                    # Also while a batch is held (store down): the length is what lets
                    # the producer refuse reports beyond queue_max_entries, and notice room again.
                    next_trim = time.monotonic() + TRIM_INTERVAL
                    self._trim(client)
                    self._stream_len = int(client.xlen(STREAM_KEY))
                if held is None:
                    entries: list[tuple[bytes, dict[bytes, bytes]]]
                    if time.monotonic() >= next_claim:
                        entries = self._claim(client)
                        next_claim = time.monotonic() + self._claim_ms / 2000.0
                    else:
                        entries = self._read(client)
                    if not entries:
                        continue
                    held = self._decode(client, entries)
                ids, samples = held
                if samples:
                    self._store.write_samples(samples)
                if ids:
                    client.xack(STREAM_KEY, GROUP, *ids)
                self._written += len(samples)
                held = None
                attempts = 0
                if self._consume_down:
                    log.warning("queue consumer: store and queue reachable again")
                self._consume_down = False
            except StoreUnavailable as exc:
                attempts = self._consume_failed("store unavailable", exc, attempts)
            except (redis.RedisError, OSError) as exc:
                # A failed XACK leaves the entries pending: written again on
                # retry (the store ignores the duplicates) or claimed by another.
                attempts = self._consume_failed("queue unavailable", exc, attempts)
                if isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc):
                    group_ready = False
            except Exception as exc:  # worker loop: a bad batch must not stop consuming
                self._error("queue consumer", exc)
                log.exception("queue consumer: store refused a batch; writing it sample by sample")
                if held is not None:
                    held = self._write_each(client, held)

    def _consume_failed(self, what: str, exc: Exception, attempts: int) -> int:
        self._error(what, exc)
        if not self._consume_down:
            log.warning("queue consumer: %s (%s); keeping the batch pending and retrying", what, exc)
        self._consume_down = True
        self._stop.wait(min(5.0, 0.25 * 2 ** min(attempts, 8)))
        return attempts + 1

    def _write_each(
        self, client: redis.Redis, held: tuple[list[bytes], list[Sample]]
    ) -> tuple[list[bytes], list[Sample]] | None:
        # Samples and ids pair up one to one here (undecodable entries were acked apart).
        ids, samples = held
        for i, (entry_id, sample) in enumerate(zip(ids, samples, strict=True)):
            try:
                self._store.write_samples([sample])
            except StoreUnavailable:
                return ids[i:], samples[i:]
            except Exception as exc:
                self._error("store refused a sample", exc)
                log.exception(
                    "queue consumer: store refused the sample of %s at %s", sample.node_id, sample.ts
                )
            else:
                self._written += 1
            client.xack(STREAM_KEY, GROUP, entry_id)
        return None

    @staticmethod
    def _create_group(client: redis.Redis) -> None:
        try:
            # "0": a group created after reports were queued still gets them.
            client.xgroup_create(STREAM_KEY, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _read(self, client: redis.Redis) -> list[tuple[bytes, dict[bytes, bytes]]]:
        resp: Any = client.xreadgroup(
            GROUP, self.name, {STREAM_KEY: ">"}, count=READ_COUNT, block=READ_BLOCK_MS
        )
        if not resp:
            return []
        if isinstance(resp, dict):  # RESP3 answers {stream: [entries]}
            return list(next(iter(resp.values()))[0] if resp else [])
        return list(resp[0][1])

    def _claim(self, client: redis.Redis) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Entries idle longer than the claim timeout in any consumer's pending list (ours too)."""
        resp = client.xautoclaim(
            STREAM_KEY, GROUP, self.name, self._claim_ms, start_id="0-0", count=READ_COUNT
        )
        entries: list[tuple[bytes, dict[bytes, bytes] | None]] = resp[1]
        found = [(eid, fields) for eid, fields in entries if fields is not None]
        if found:
            self._claimed += len(found)
            log.warning("queue consumer: claimed %d entries left pending by a stopped collector", len(found))
        return found

    def _trim(self, client: redis.Redis) -> None:
        """Drop stream entries every consumer has acknowledged (older than any pending one)."""
        groups = client.xinfo_groups(STREAM_KEY)
        if len(groups) != 1:
            return  # another group reads this stream too: its progress is not ours to judge
        summary = client.xpending(STREAM_KEY, GROUP)
        minid = summary["min"] if summary.get("pending") else groups[0]["last-delivered-id"]
        client.xtrim(STREAM_KEY, minid=minid)
        # Every collector process joins under a new name: forget the names of those
        # gone for an hour with nothing pending (a live one that was only idle is
        # re-created by its next XREADGROUP; nothing pending means nothing is lost).
        for consumer in client.xinfo_consumers(STREAM_KEY, GROUP):
            name = consumer["name"]
            name = name.decode() if isinstance(name, bytes) else str(name)
            if (
                name != self.name
                and int(consumer["pending"]) == 0
                and int(consumer["idle"]) > FORGET_CONSUMER_MS
            ):
                client.xgroup_delconsumer(STREAM_KEY, GROUP, name)

    def _decode(
        self, client: redis.Redis, entries: list[tuple[bytes, dict[bytes, bytes]]]
    ) -> tuple[list[bytes], list[Sample]]:
        ids: list[bytes] = []
        samples: list[Sample] = []
        bad: list[bytes] = []
        for entry_id, fields in entries:
            try:
                q = _sample_decoder.decode(fields[_FIELD])
            except (KeyError, msgspec.DecodeError) as exc:
                log.error("queue consumer: dropping undecodable entry %s: %s", entry_id, exc)  # noqa: TRY400 - expected bad input, no traceback
                bad.append(entry_id)
                continue
            ids.append(entry_id)
            samples.append(Sample(q.node_id, q.ts, q.values))
        if bad:
            self._error("undecodable queue entry", ValueError(f"{len(bad)} entries"))
            client.xack(STREAM_KEY, GROUP, *bad)
        return ids, samples


def live_report(
    node_id: str, hostname: str, ts: float, interval: float, values: dict[str, float], info: dict[str, object]
) -> LiveReport:
    """The live-state message of one accepted report."""
    return LiveReport(node_id, hostname, ts, interval, values, dict(info))


__all__ = [
    "GROUP",
    "LIVE_CHANNEL",
    "STREAM_KEY",
    "LiveReport",
    "QueueError",
    "QueueStats",
    "SharedQueue",
    "consumer_name",
    "live_report",
]
