"""Telemetry stores, chosen by URL scheme through one explicit registry.

The registry maps a scheme to a lazy ``"module:Class"`` string so that a
backend's client library is imported only when it is used (and so that
packaging can list hidden imports from the same table).  Each backend class
takes ``(url: str, tiers: Sequence[TierSpec])`` in its constructor.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Final
from urllib.parse import urlsplit

from cloudmon.store._common import redact_url
from cloudmon.store.base import (
    DEFAULT_TIERS,
    MetricSeries,
    NodeRecord,
    Sample,
    SeriesResult,
    StoreError,
    StoreUnavailable,
    TelemetryStore,
    TierSpec,
)

BACKENDS: Final[dict[str, str]] = {
    "sqlite": "cloudmon.store.embedded:EmbeddedStore",
    "redis": "cloudmon.store.redis:RedisStore",
    "rediss": "cloudmon.store.redis:RedisStore",
    "mongodb": "cloudmon.store.mongodb:MongoStore",
    "mongodb+srv": "cloudmon.store.mongodb:MongoStore",
}

__all__ = [
    "BACKENDS",
    "DEFAULT_TIERS",
    "MetricSeries",
    "NodeRecord",
    "Sample",
    "SeriesResult",
    "StoreError",
    "StoreUnavailable",
    "TelemetryStore",
    "TierSpec",
    "open_store",
    "redact_url",
]


def open_store(url: str, tiers: Sequence[TierSpec] = DEFAULT_TIERS) -> TelemetryStore:
    """Open the backend that ``url``'s scheme names (``sqlite:///path/file.db``, ...)."""
    scheme = urlsplit(url).scheme
    target = BACKENDS.get(scheme)
    if target is None:
        known = ", ".join(f"{s}://" for s in sorted(BACKENDS))
        raise StoreError(f"unknown store URL scheme {scheme!r} in {url!r}; use one of: {known}")
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    store: TelemetryStore = cls(url, tiers)
    return store
