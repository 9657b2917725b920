"""The one thread that owns every store write.

The asyncio loop hands accepted samples to :meth:`StoreWriter.offer`, which
either takes a whole request's samples or none (the queue is bounded by samples
waiting *plus* a batch being retried, so an unavailable store turns into 503s
for agents, which spool, instead of unbounded memory).  The thread writes in
batches, upserts node inventory every few seconds (at once for a new node),
enforces retention every minute and flushes on close.

A ``StoreUnavailable`` keeps the batch and retries it with capped exponential
backoff, logging once per outage.  Any other failure (a sample the store
refuses, a store bug) makes the writer retry the batch sample by sample, so a
bad sample is dropped, counted and logged alone instead of wedging ingest or
taking a whole batch of other nodes' samples with it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cloudmon.store.base import NodeRecord, Sample, StoreUnavailable, TelemetryStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WriterStats:
    """A snapshot of the writer's counters (for ``/api/v1/status``)."""

    queued: int
    queue_max: int
    written: int
    dropped: int
    store_errors: int
    last_store_error: str | None
    degraded: bool


class StoreWriter:
    """Batches samples and inventory into one store from one dedicated thread."""

    def __init__(
        self,
        store: TelemetryStore,
        max_queue: int,
        clock: Callable[[], float] = time.time,
        *,
        batch_max: int = 5000,
        flush_interval: float = 0.5,
        inventory_interval: float = 5.0,
        retention_interval: float = 60.0,
        max_backoff: float = 10.0,
    ) -> None:
        if max_queue < 1:
            raise ValueError("write_queue_max must be at least 1")
        self._store = store
        self._max_queue = max_queue
        self._clock = clock
        self._batch_max = batch_max
        self._flush_interval = flush_interval
        self._inventory_interval = inventory_interval
        self._retention_interval = retention_interval
        self._max_backoff = max_backoff
        self._cond = threading.Condition(threading.Lock())
        # Guarded by _cond: samples not yet taken, their count plus the batch in
        # hand (what bounds memory), and inventory entries changed since the last upsert.
        self._pending: list[Sample] = []
        self._depth = 0
        self._dirty: dict[str, NodeRecord] = {}
        self._new_nodes = False
        self._closing = False
        self._close_deadline = 0.0
        self._thread: threading.Thread | None = None
        # Counters: written only by the writer thread, read anywhere.
        self._written = 0
        self._dropped = 0
        self._store_errors = 0
        self._last_error: str | None = None
        self._degraded_since: float | None = None

    # -- producer side (the asyncio loop) ----------------------------------------

    def start(self) -> None:
        """Start the writer thread."""
        if self._thread is not None:
            raise RuntimeError("StoreWriter already started")
        self._thread = threading.Thread(target=self._run, name="cloudmon-store-writer", daemon=True)
        self._thread.start()

    def offer(self, samples: Sequence[Sample], nodes: Sequence[NodeRecord], new_node: bool = False) -> bool:
        """Queue all ``samples`` and note ``nodes``' inventory, or take nothing and return False."""
        n = len(samples)
        with self._cond:
            if self._closing or self._depth + n > self._max_queue:
                return False
            self._pending.extend(samples)
            self._depth += n
            dirty = self._dirty
            for rec in nodes:
                dirty[rec.node_id] = rec
            if new_node:
                self._new_nodes = True
            if len(self._pending) >= self._batch_max:
                self._cond.notify()
        return True

    def note_error(self, exc: BaseException) -> None:
        """Count a store failure for the status (also ones seen outside the writer)."""
        self._store_errors += 1
        self._last_error = f"{type(exc).__name__}: {exc}"

    def stats(self) -> WriterStats:
        """Current counters (cheap; no lock: each value is read atomically)."""
        return WriterStats(
            queued=self._depth,
            queue_max=self._max_queue,
            written=self._written,
            dropped=self._dropped,
            store_errors=self._store_errors,
            last_store_error=self._last_error,
            degraded=self._degraded_since is not None,
        )

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (retrying an unavailable store until ``timeout``), then stop.

        Samples still unwritten at the deadline are counted as dropped and logged.
        Idempotent.
        """
        with self._cond:
            if not self._closing:
                self._closing = True
                self._close_deadline = time.monotonic() + timeout
            self._cond.notify_all()
        thread = self._thread
        if thread is not None:
            thread.join(timeout + 5.0)
            if thread.is_alive():
                log.error("store writer did not stop within %.0f s (store call hanging?)", timeout + 5.0)

    # -- the writer thread -------------------------------------------------------

    def _run(self) -> None:
        batch: list[Sample] = []
        attempts = 0
        next_inventory = time.monotonic()
        next_retention = time.monotonic() + self._retention_interval
        while True:
            with self._cond:
                if not batch:
                    self._wait_for_work()
                    batch = self._pending[: self._batch_max]
                    del self._pending[: self._batch_max]
                closing = self._closing
                now = time.monotonic()
                nodes: list[NodeRecord] = []
                if self._dirty and (self._new_nodes or closing or now >= next_inventory):
                    nodes = list(self._dirty.values())
                    self._dirty.clear()
                    self._new_nodes = False
                    next_inventory = now + self._inventory_interval
            if batch:
                remaining = self._write(batch)
                with self._cond:
                    self._depth -= len(batch) - len(remaining)
                batch = remaining
                attempts = attempts + 1 if batch else 0
            upsert_failed = bool(nodes) and not self._upsert(nodes)
            if upsert_failed:
                with self._cond:
                    for rec in nodes:  # newer entries that arrived meanwhile win
                        self._dirty.setdefault(rec.node_id, rec)
            if not closing and time.monotonic() >= next_retention:
                next_retention = time.monotonic() + self._retention_interval
                self._enforce_retention()
            if batch or upsert_failed:
                if closing and time.monotonic() >= self._close_deadline:
                    self._give_up(batch)
                    return
                self._backoff(attempts)
                continue
            if closing:
                with self._cond:
                    done = not self._pending and not self._dirty
                if done:
                    self._final_flush()
                    return

    def _wait_for_work(self) -> None:
        # Called with _cond held: wait until a batch is full, the flush interval
        # passed or close() was called.
        deadline = time.monotonic() + self._flush_interval
        while not self._closing and len(self._pending) < self._batch_max:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _write(self, batch: list[Sample]) -> list[Sample]:
        """Write one batch; returns what is still to be written (kept for a retry)."""
        try:
            self._store.write_samples(batch)
        except StoreUnavailable as exc:
            self._failed(exc)
            return batch
        except Exception as exc:  # noqa: BLE001 - worker loop: must survive any store failure
            # A bad sample or a store bug: the store took nothing of the batch.
            # Write sample by sample so one bad sample costs only itself.
            self.note_error(exc)
            log.warning("store refused a batch of %d samples (%s); writing them one by one", len(batch), exc)
            return self._write_each(batch)
        self._written += len(batch)
        self._recovered()
        return batch[:0]

    def _write_each(self, batch: list[Sample]) -> list[Sample]:
        lost = 0
        first_error: Exception | None = None
        for i, sample in enumerate(batch):
            try:
                self._store.write_samples([sample])
            except StoreUnavailable as exc:
                self._failed(exc)
                rest = batch[i:]
                break
            except Exception as exc:  # noqa: BLE001 - counted, logged below
                lost += 1
                first_error = first_error or exc
                self.note_error(exc)
            else:
                self._written += 1
        else:
            rest = batch[:0]
        if lost:
            self._dropped += lost
            log.error("store refused %d samples, dropped them (first error: %s)", lost, first_error)
        return rest

    def _upsert(self, nodes: list[NodeRecord]) -> bool:
        try:
            self._store.upsert_nodes(nodes)
        except StoreUnavailable as exc:
            self._failed(exc)
            return False
        except Exception as exc:
            self.note_error(exc)
            log.exception("store refused the inventory of %d nodes; dropping it", len(nodes))
            return True
        return True

    def _enforce_retention(self) -> None:
        try:
            removed = self._store.enforce_retention(self._clock())
        except StoreUnavailable as exc:
            self._failed(exc)
        except Exception as exc:
            self.note_error(exc)
            log.exception("retention enforcement failed")
        else:
            if removed:
                log.debug("retention removed %d rows", removed)

    def _failed(self, exc: StoreUnavailable) -> None:
        self.note_error(exc)
        if self._degraded_since is None:
            self._degraded_since = time.monotonic()
            # Once per outage: the queue keeps the data and agents get 503 when it fills.
            log.warning("store unavailable (%s); keeping %d queued samples and retrying", exc, self._depth)
        else:
            log.debug("store still unavailable: %s", exc)

    def _recovered(self) -> None:
        if self._degraded_since is not None:
            log.warning("store available again after %.1f s", time.monotonic() - self._degraded_since)
            self._degraded_since = None

    def _backoff(self, attempts: int) -> None:
        delay = min(self._max_backoff, 0.25 * 2 ** min(attempts, 10))
        with self._cond:
            end = time.monotonic() + delay
            if self._closing:
                end = min(end, self._close_deadline)
            while True:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return
                # close() notifies, so a shutdown retries at once instead of sleeping on.
                if self._cond.wait(remaining) and self._closing:
                    return

    def _give_up(self, batch: list[Sample]) -> None:
        with self._cond:
            lost = len(batch) + len(self._pending)
            self._pending.clear()
            self._depth = 0
        self._dropped += lost
        log.error("store still unavailable at shutdown; %d queued samples were not written", lost)

    def _final_flush(self) -> None:
        try:
            self._store.flush()
        except Exception as exc:
            self.note_error(exc)
            log.exception("final store flush failed")
