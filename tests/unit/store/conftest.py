"""Store fixtures: a ``store`` per backend (real files / real servers), closed after each test.

Later backends add a param to ``BACKENDS`` and a branch to :func:`make_store`;
``test_contract.py`` then runs against them unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from cloudmon.store import DEFAULT_TIERS, TelemetryStore, TierSpec, open_store
from tests.servers import fresh_store_url, mongo_session_server, redis_session_server

__all__ = ["mongo_session_server", "redis_session_server"]  # session fixtures fresh_store_url uses

BACKENDS = ["sqlite", "redis", "mongodb"]

MakeStore = Callable[..., TelemetryStore]


@pytest.fixture
def hour() -> float:
    """Start of an hour three hours ago: recent enough for every tier's retention, in whole buckets."""
    return float(int(time.time()) // 3600 * 3600 - 3 * 3600)


@pytest.fixture(params=BACKENDS)
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeStore]:
    """Open stores of the parametrized backend (``make_store(tiers=...)``); every one is closed after."""
    opened: list[TelemetryStore] = []
    backend: str = request.param
    server_url = "" if backend == "sqlite" else fresh_store_url(request, backend)

    def make(tiers: Sequence[TierSpec] = DEFAULT_TIERS) -> TelemetryStore:
        if backend == "sqlite":
            store = open_store(f"sqlite://{tmp_path / 'telemetry.db'}", tiers)
        else:  # redis / mongodb: a key prefix / database of its own on a session-wide private server
            store = open_store(server_url, tiers)
        opened.append(store)
        return store

    try:
        yield make
    finally:
        for store in opened:
            store.close()


@pytest.fixture
def store(make_store: MakeStore) -> TelemetryStore:
    """A fresh store of the parametrized backend with the default tiers."""
    return make_store()
