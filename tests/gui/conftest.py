"""Fixtures for the console's tests: real collector, real store, real agents.

Qt must run headless here: the platform is forced to ``offscreen`` before any
QApplication exists (pytest-qt creates it lazily in the ``qapp`` fixture).
The screenshot test starts its own process under a real X server instead.
"""

from __future__ import annotations

import importlib.util
import os

os.environ["QT_QPA_PLATFORM"] = "offscreen"

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from cloudmon.collector import CollectorThread
from cloudmon.config import Config
from cloudmon.store import TelemetryStore, open_store
from cloudmon_agent.agent import Agent
from cloudmon_agent.config import AgentConfig

if TYPE_CHECKING:
    from cloudmon.ui.window import MainWindow

if importlib.util.find_spec("PySide6") is None:
    # The core runs without Qt (pip install cloudmon without [desktop]); so must the suite.
    collect_ignore_glob = ["test_*.py"]

TOKEN = "gui-test-token-7d1e"
AGENT_INTERVAL = 0.25
NODE_IDS = ("alpha-00000001", "beta-00000002")


@pytest.fixture(autouse=True)
def no_leftover_threads() -> Iterator[None]:
    """Fail a test that leaves any thread it started running (after all teardown)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 10.0
    while True:
        left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"threads still running after the test: {[t.name for t in left]}"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TelemetryStore]:
    """A real embedded (SQLite) store in the test's temp dir."""
    s = open_store(f"sqlite:///{tmp_path / 'telemetry.db'}")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def collector(store: TelemetryStore, tmp_path: Path) -> Iterator[CollectorThread]:
    """A real collector on a free loopback port."""
    config = Config(listen_host="127.0.0.1", listen_port=0, data_dir=str(tmp_path), node_timeout=3.0)
    c = CollectorThread(config, store, TOKEN)
    c.start()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def agents(collector: CollectorThread, tmp_path: Path) -> Iterator[list[Agent]]:
    """Two real agents (threads, own state dirs, short interval) reporting to ``collector``."""
    started: list[Agent] = []
    try:
        for node_id in NODE_IDS:
            name = node_id.split("-")[0]
            cfg = AgentConfig(
                collector=collector.url,
                token=TOKEN,
                interval=AGENT_INTERVAL,
                node_id=node_id,
                name=name,
                state_dir=tmp_path / f"agent-{name}",
            )
            agent = Agent(cfg)
            agent.start()
            started.append(agent)
        yield started
    finally:
        for agent in started:
            agent.close()


WindowFactory = Callable[..., "MainWindow"]


@pytest.fixture
def make_window(qtbot: Any) -> Iterator[WindowFactory]:
    """Build, show and start main windows; every one is shut down at the end."""
    from cloudmon.ui.window import MainWindow

    windows: list[MainWindow] = []

    def make(url: str, token: str | None = TOKEN, embedded: bool = True) -> MainWindow:
        w = MainWindow(url, token, embedded=embedded)
        qtbot.addWidget(w)
        w.resize(1200, 760)
        w.show()
        w.start()
        windows.append(w)
        return w

    try:
        yield make
    finally:
        for w in windows:
            w.shutdown()
            w.close()
