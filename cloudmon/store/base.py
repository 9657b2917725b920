"""The ``TelemetryStore`` interface that every backend implements.

Stores are synchronous and thread-safe: the collector calls them from its own
writer/reader threads, never from the asyncio loop or the GUI thread.  Times are
UNIX epoch seconds (floats) everywhere in this interface.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class StoreError(Exception):
    """Base class of store failures."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached or written (server down, disk full)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One node's flattened metrics at one instant (what a report becomes)."""

    node_id: str
    ts: float
    values: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """Inventory entry of a node the store has seen."""

    node_id: str
    hostname: str
    first_seen: float
    last_seen: float
    info: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TierSpec:
    """One storage tier: its resolution and how long it is kept."""

    name: str
    resolution_s: int
    retention_s: int


DEFAULT_TIERS: tuple[TierSpec, ...] = (
    TierSpec("raw", 1, 24 * 3600),
    TierSpec("1m", 60, 30 * 24 * 3600),
    TierSpec("1h", 3600, 365 * 24 * 3600),
)


@dataclass(frozen=True, slots=True)
class MetricSeries:
    """Per-step aggregates of one metric; ``None`` where a step has no data."""

    avg: list[float | None]
    min: list[float | None]
    max: list[float | None]


@dataclass(frozen=True, slots=True)
class SeriesResult:
    """A time range of one node, aligned on ``step``-second buckets.

    ``timestamps[i]`` is the start of bucket ``i``; every metric's lists have
    the same length.  ``tier`` names the tier the data was read from.
    """

    node_id: str
    start: float
    end: float
    step: float
    tier: str
    timestamps: list[float]
    metrics: dict[str, MetricSeries]


@runtime_checkable
class TelemetryStore(Protocol):
    """What the collector needs from a telemetry backend."""

    tiers: Sequence[TierSpec]

    def write_samples(self, samples: Sequence[Sample]) -> None:
        """Store a batch of samples (raw tier) and fold them into the rollups."""

    def upsert_nodes(self, nodes: Sequence[NodeRecord]) -> None:
        """Insert or update inventory entries (``first_seen`` is kept)."""

    def nodes(self) -> list[NodeRecord]:
        """Every node the store knows, in no particular order."""

    def latest(self, node_id: str) -> Sample | None:
        """The newest raw sample of a node, or ``None``."""

    def metric_names(self, node_id: str) -> list[str]:
        """Names of the metrics stored for a node."""

    def series(
        self, node_id: str, metrics: Sequence[str], start: float, end: float, step: float
    ) -> SeriesResult:
        """Aggregates (avg/min/max) per ``step`` over ``[start, end)`` from the best tier."""

    def append_event(self, event: Mapping[str, object]) -> str:
        """Append one event to the event log (``ts`` defaults to now); returns its id.

        Every decision and action goes here with its reason and result.  A
        non-JSON-serialisable event or a bad ``ts`` raises ``ValueError``.
        """

    def events(self, start: float, end: float, limit: int = 1000) -> list[dict[str, object]]:
        """Events with ``start <= ts < end``, oldest first; the newest ``limit`` if there are more."""

    def put_document(self, kind: str, key: str, doc: Mapping[str, object]) -> None:
        """Store or replace an inventory/configuration document (nodes, groups, rules)."""

    def get_document(self, kind: str, key: str) -> dict[str, object] | None:
        """The document, or ``None``."""

    def list_documents(self, kind: str) -> dict[str, dict[str, object]]:
        """Every document of ``kind``, by key."""

    def delete_document(self, kind: str, key: str) -> bool:
        """Remove a document; ``True`` if it existed."""

    def enforce_retention(self, now: float) -> int:
        """Drop what is older than each tier's retention; returns rows removed."""

    def flush(self) -> None:
        """Make everything written so far durable (closes open rollup buckets)."""

    def close(self) -> None:
        """Flush and release files/connections.  Idempotent."""
