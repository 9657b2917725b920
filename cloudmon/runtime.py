"""Embedded mode: the collector, the embedded store and a local agent in one process.

This is where ``cloudmon`` (no arguments) builds its object graph: one place
that opens the store, starts the collector on loopback and samples this
machine with an in-process agent.  The console then talks to that collector
over HTTP exactly as it would to a remote one.

A lock file in the data directory keeps two consoles from writing the same
embedded store; the second one is told how to connect to the first instead.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import IO, TYPE_CHECKING

import msgspec

from cloudmon.config import Config, ensure_token
from cloudmon.store import StoreError, TelemetryStore, open_store, redact_url

if TYPE_CHECKING:
    from cloudmon.collector import CollectorThread
    from cloudmon.control.plane import ControlPlane
    from cloudmon_agent.agent import Agent

log = logging.getLogger(__name__)


def _lock_fields(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key and value:
            fields[key] = value
    return fields


def running_collector_url(config: Config) -> str | None:
    """URL of the embedded collector a console on this machine runs with ``config``'s
    data directory, or ``None`` when no console holds it."""
    path = config.data_path / "cloudmon.lock"
    try:
        fh = path.open("r", encoding="utf-8")
    except OSError:
        return None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _lock_fields(fh.read()).get("url")
        # We got the lock: nobody runs; whatever the file says is stale.
        fcntl.flock(fh, fcntl.LOCK_UN)
        return None


class RuntimeStartError(RuntimeError):
    """Embedded mode could not start; the text says why and what to do."""


class EmbeddedRuntime:
    """Owns the embedded collector, its store and the local agent.  Call ``close()``."""

    def __init__(self, config: Config, *, local_agent: bool = True) -> None:
        self.config = config
        self._want_agent = local_agent
        self.token = ensure_token(config)
        self.url = ""
        self._lock: IO[str] | None = None
        self._store: TelemetryStore | None = None
        self._collector: CollectorThread | None = None
        self._agent: Agent | None = None
        self._closed = False

    def _take_lock(self) -> None:
        path = self.config.data_path / "cloudmon.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            other = _lock_fields(fh.read())
            fh.close()
            who = f"cloudmon pid {other['pid']}" if "pid" in other else "another cloudmon"
            url = other.get("url", "URL")
            raise RuntimeStartError(
                f"{self.config.data_path} is in use by {who}. Open that console, connect to it with "
                f"'cloudmon --connect {url}', or start this one with --data-dir DIR."
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        self._lock = fh

    def start(self) -> None:
        """Open the store, start the collector on loopback and the local agent."""
        from cloudmon.collector import CollectorThread

        self._take_lock()
        try:
            self._store = open_store(self.config.store_url, self.config.tiers())
        except StoreError as exc:
            raise RuntimeStartError(f"cannot open the telemetry store: {exc}") from exc
        collector = CollectorThread(self.config, self._store, self.token)
        try:
            collector.start()
        except OSError as exc:
            if self.config.listen_port == 0:
                raise RuntimeStartError(f"cannot start the collector: {exc}") from exc
            # The default port is taken (another program): a free port serves a
            # console just as well; remote agents need the shown URL anyway.
            log.warning(
                "port %s is in use (%s); the embedded collector takes a free port instead",
                self.config.listen_port,
                exc,
            )
            collector.close()
            collector = CollectorThread(
                msgspec.structs.replace(self.config, listen_port=0), self._store, self.token
            )
            collector.start()
        self._collector = collector
        self.url = collector.url
        # Other commands on this machine (``cloudmon apply``) find the running
        # embedded collector here; the lock file is the one place that is true
        # exactly while this process holds it.
        if self._lock is not None:
            self._lock.seek(0)
            self._lock.truncate()
            self._lock.write(f"pid {os.getpid()}\nurl {self.url}\n")
            self._lock.flush()
        log.info("embedded collector at %s, store %s", self.url, redact_url(self.config.store_url))
        if self._want_agent:
            self._start_agent()

    @property
    def control(self) -> ControlPlane:
        """The embedded collector's control plane (after ``start()``)."""
        plane = self._collector.collector.control if self._collector is not None else None
        if plane is None:
            raise RuntimeStartError("the embedded collector runs without control loops (control = false)")
        return plane

    def _start_agent(self) -> None:
        from cloudmon_agent.agent import Agent
        from cloudmon_agent.config import AgentConfig

        state_dir = Path(self.config.data_path) / "local-agent"
        agent = Agent(AgentConfig(collector=self.url, token=self.token, state_dir=str(state_dir)))
        agent.start()
        self._agent = agent

    def close(self) -> None:
        """Stop the agent, then the collector (which flushes), then the store."""
        if self._closed:
            return
        self._closed = True
        if self._agent is not None:
            self._agent.close()
        if self._collector is not None:
            self._collector.close()
        if self._store is not None:
            self._store.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
