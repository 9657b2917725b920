"""Shared fixtures for integration tests: real collector and agent processes.

``start_collector_process(...)`` runs ``python -m cloudmon.collector`` on a free
port (``--listen 127.0.0.1:0``; the port is read from its ``listening on`` line)
in a tmp data dir and waits for ``/healthz``; ``start_agent_process(...)`` runs
``cloudmon-agent``.  Every process runs with a private HOME/XDG environment
(never the user's config) and is stopped by pid when the test ends, pass or fail.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

INTEGRATION_TOKEN = "integration-token"
_LISTENING = re.compile(rb"cloudmon collector listening on (http://\S+)")


def private_env(home: Path) -> dict[str, str]:
    """The current environment minus CLOUDMON_* settings, with HOME and XDG dirs under ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDMON_")}
    env.pop("STATE_DIRECTORY", None)
    for var, sub in (
        ("HOME", ""),
        ("XDG_CONFIG_HOME", ".config"),
        ("XDG_DATA_HOME", ".local/share"),
        ("XDG_STATE_HOME", ".local/state"),
        ("XDG_CACHE_HOME", ".cache"),
    ):
        path = home / sub if sub else home
        path.mkdir(parents=True, exist_ok=True)
        env[var] = str(path)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class ManagedProcess:
    """A child process with its log file; ``stop()`` ends it by pid (idempotent)."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig`` to the pid and wait; SIGKILL if it does not end in ``timeout``."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """Kill it hard (no cleanup in the child), as a crashed node would."""
        self.stop(signal.SIGKILL)


@dataclass
class CollectorProcess(ManagedProcess):
    url: str = ""
    data_dir: Path = Path()
    token: str = INTEGRATION_TOKEN
    stdout_lines: list[str] = field(default_factory=list)


def healthy(url: str) -> bool:
    """Whether ``GET /healthz`` answers 200 right now."""
    host, _, port = url.removeprefix("http://").rpartition(":")
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=2)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def wait_until(
    cond: Callable[[], object], timeout: float, what: str, proc: ManagedProcess | None = None
) -> None:
    """Poll ``cond`` until truthy; fail after ``timeout`` (or if ``proc`` died) with its log."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and not proc.alive():
            raise AssertionError(
                f"{proc.name} exited ({proc.proc.returncode}) while waiting for {what}:\n{proc.log_text()}"
            )
        if time.monotonic() > deadline:
            log = proc.log_text() if proc is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{log}")
        time.sleep(0.05)


def _read_stdout_lines(proc: subprocess.Popen[bytes], want: int, timeout: float) -> list[bytes]:
    """Up to ``want`` lines of the child's stdout, waiting at most ``timeout`` in total."""
    assert proc.stdout is not None
    lines: list[bytes] = []
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while len(lines) < want:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                break
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            *done, buf = buf.split(b"\n")
            lines.extend(done)
    return lines


StartCollectorProcess = Callable[..., CollectorProcess]
StartAgentProcess = Callable[..., ManagedProcess]


@pytest.fixture
def start_collector_process(tmp_path: Path) -> Iterator[StartCollectorProcess]:
    """Start ``python -m cloudmon.collector`` processes; every one is stopped by pid afterwards."""
    started: list[ManagedProcess] = []

    def start(
        data_dir: Path | None = None,
        node_timeout: float = 5.0,
        token: str | None = INTEGRATION_TOKEN,
        listen: str = "127.0.0.1:0",
        extra: tuple[str, ...] = (),
    ) -> CollectorProcess:
        data_dir = data_dir or tmp_path / "collector-data"
        n = len(started)
        log_path = tmp_path / f"collector-{n}.log"
        args = [sys.executable, "-m", "cloudmon.collector", "--listen", listen, "--data-dir", str(data_dir)]
        args += ["--node-timeout", str(node_timeout), *extra]
        if token is not None:
            args += ["--token", token]
        log = log_path.open("wb")
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=log, env=private_env(tmp_path / "home"), cwd=tmp_path
        )
        cp = CollectorProcess(f"collector-{n}", proc, log_path, log, data_dir=data_dir)
        cp.token = token or ""
        started.append(cp)
        lines = _read_stdout_lines(proc, 2, timeout=30)
        cp.stdout_lines = [ln.decode("utf-8", "replace") for ln in lines]
        match = _LISTENING.search(lines[0]) if lines else None
        if match is None:
            cp.stop()
            raise AssertionError(f"collector did not report listening; stdout {lines!r}\n{cp.log_text()}")
        cp.url = match.group(1).decode()
        wait_until(lambda: healthy(cp.url), 30, "collector /healthz", cp)
        return cp

    try:
        yield start
    finally:
        for p in started:
            p.stop()


def agent_command() -> list[str]:
    """The installed ``cloudmon-agent`` script next to this interpreter (else the module)."""
    script = Path(sys.executable).with_name("cloudmon-agent")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cloudmon_agent"]


@pytest.fixture
def start_agent_process(tmp_path: Path) -> Iterator[StartAgentProcess]:
    """Start ``cloudmon-agent`` processes (own state dir each); every one is stopped by pid afterwards."""
    started: list[ManagedProcess] = []

    def start(
        collector_url: str, token: str, node_id: str, interval: float = 0.2, extra: tuple[str, ...] = ()
    ) -> ManagedProcess:
        # The state dir (node id, spool) follows the node id: a restart with the same id reuses it.
        state_dir = tmp_path / f"agent-{node_id}"
        log_path = tmp_path / f"agent-{node_id}-{len(started)}.log"
        args = [*agent_command(), "--collector", collector_url, "--token", token]
        args += ["--state-dir", str(state_dir), "--interval", str(interval), "--node-id", node_id, *extra]
        log = log_path.open("wb")
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=private_env(tmp_path / "home"),
            cwd=tmp_path,
        )
        agent = ManagedProcess(f"agent {node_id}", proc, log_path, log)
        started.append(agent)
        return agent

    try:
        yield start
    finally:
        for p in started:
            p.stop()
