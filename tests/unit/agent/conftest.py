"""Fixtures for the agent's unit tests: real HTTP sinks, isolated environment, leak check."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudmon_agent.config import AgentConfig
from tests.unit.agent.sink import Sink


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Every test must leave no thread of its own running."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    while extra and time.monotonic() < deadline:
        time.sleep(0.01)
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert extra == [], f"threads left running: {[t.name for t in extra]}"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Never read the user's real config or CLOUDMON_* settings."""
    import os

    for name in list(os.environ):
        if name.startswith("CLOUDMON_") or name == "STATE_DIRECTORY":
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def config(tmp_path: Path) -> AgentConfig:
    return AgentConfig(state_dir=tmp_path / "state", name="test-node", interval=1.0)
