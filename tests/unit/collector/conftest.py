"""Fixtures: a real embedded store on a tmp file and real collectors on free ports."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudmon.collector import CollectorThread
from cloudmon.config import Config
from cloudmon.store import TelemetryStore, open_store
from cloudmon.store.embedded import EmbeddedStore
from tests.unit.collector.helpers import TOKEN, FakeClock

StartCollector = Callable[..., CollectorThread]


@pytest.fixture
def no_thread_leaks() -> Iterator[None]:
    """Fail if the test leaves a thread running that was not there before."""
    before = set(threading.enumerate())
    yield
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not left, f"threads left running: {[t.name for t in left]}"


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "telemetry.db"


@pytest.fixture
def store(store_path: Path) -> Iterator[TelemetryStore]:
    s = open_store(f"sqlite:///{store_path}")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def full_store(tmp_path: Path) -> Iterator[EmbeddedStore]:
    """A real store whose file may not grow: writes fail as on a full disk."""
    url = f"sqlite:///{tmp_path / 'full.db'}"
    EmbeddedStore(url).close()
    store = EmbeddedStore(url, max_size_bytes=(tmp_path / "full.db").stat().st_size + 8192)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def clock() -> FakeClock:
    # A realistic "now" (whole seconds) so the store's tiers and retention behave as in life.
    return FakeClock(float(int(time.time())))


@pytest.fixture
def start_collector(
    tmp_path: Path, store: TelemetryStore, clock: FakeClock, no_thread_leaks: None
) -> Iterator[StartCollector]:
    """Start collectors (port 0, tmp data dir, the fixture's store and fake clock); all closed after."""
    started: list[CollectorThread] = []

    def start(store_: TelemetryStore | None = None, **config: Any) -> CollectorThread:
        config.setdefault("listen_port", 0)
        config.setdefault("data_dir", str(tmp_path / "data"))
        ct = CollectorThread(Config(**config), store_ or store, TOKEN, clock=clock)
        started.append(ct)
        ct.start()
        return ct

    try:
        yield start
    finally:
        for ct in started:
            ct.close()


@pytest.fixture
def collector(start_collector: StartCollector) -> CollectorThread:
    return start_collector()
