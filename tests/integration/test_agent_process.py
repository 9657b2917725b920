"""The real ``cloudmon-agent`` process: --once output, pushing to a real server, the collector down, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudmon_agent.schema import decode_report
from tests.unit.agent.sink import Sink, closed_port, wait_until

pytestmark = pytest.mark.integration

AGENT = Path(sys.executable).with_name("cloudmon-agent")


def _cmd() -> list[str]:
    # The installed console script; fall back to -m where it is not installed.
    return [str(AGENT)] if AGENT.exists() else [sys.executable, "-m", "cloudmon_agent"]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A clean environment: no CLOUDMON_* from the outside, no user config."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDMON_") and k != "STATE_DIRECTORY"}
    out["XDG_CONFIG_HOME"] = str(tmp_path / "xdg-config")
    out["XDG_STATE_HOME"] = str(tmp_path / "xdg-state")
    return out


@pytest.fixture
def spawn(tmp_path: Path, env: dict[str, str]) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Started agent processes, killed by pid at the end even if the test fails."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)


def _start(
    procs: list[subprocess.Popen[bytes]], args: list[str], env: dict[str, str], stderr_path: Path
) -> subprocess.Popen[bytes]:
    with stderr_path.open("wb") as err:
        p = subprocess.Popen([*_cmd(), *args], env=env, stdout=subprocess.DEVNULL, stderr=err)
    procs.append(p)
    return p


def test_once_prints_a_report_the_schema_accepts(tmp_path: Path, env: dict[str, str]) -> None:
    result = subprocess.run(
        [*_cmd(), "--once", "--state-dir", str(tmp_path / "s")],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    report = decode_report(result.stdout)
    assert report.node_id == (tmp_path / "s" / "node-id").read_text().strip()
    assert report.host.mem_total > 0
    assert len(report.host.cpu_per_core) == os.cpu_count()
    assert report.agent.rss_bytes > 0


def test_pushes_reports_to_a_real_server_and_stops_on_sigterm(
    tmp_path: Path, env: dict[str, str], spawn: list[subprocess.Popen[bytes]]
) -> None:
    sink = Sink()
    try:
        stderr = tmp_path / "agent.err"
        env = dict(env, CLOUDMON_TOKEN="proc-token")
        p = _start(
            spawn, ["--collector", sink.url, "--interval", "0.1", "--state-dir", str(tmp_path)], env, stderr
        )
        wait_until(lambda: len(sink.requests) >= 3, timeout=30, what="3 reports from the agent process")
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=10) == 0
    finally:
        sink.close()
    reports = [decode_report(r.body) for r in sink.requests]
    assert [r.seq for r in reports] == sorted(r.seq for r in reports)
    assert all(r.headers["Authorization"] == "Bearer proc-token" for r in sink.requests)
    assert "proc-token" not in stderr.read_text()


def test_collector_down_one_line_then_clean_exit(
    tmp_path: Path, env: dict[str, str], spawn: list[subprocess.Popen[bytes]]
) -> None:
    port = closed_port()
    stderr = tmp_path / "agent.err"
    args = ["--collector", f"http://127.0.0.1:{port}", "--interval", "0.1", "--state-dir", str(tmp_path)]
    p = _start(spawn, args, env, stderr)
    wait_until(lambda: "unreachable" in stderr.read_text(), timeout=30, what="the unreachable warning")
    # Observe a window of ~15 cycles and a couple of retries: the agent must
    # stay up and stay quiet.
    window_end = time.monotonic() + 1.5
    while time.monotonic() < window_end:
        assert p.poll() is None, stderr.read_text()
        time.sleep(0.1)
    p.send_signal(signal.SIGINT if os.name == "posix" else signal.SIGTERM)
    assert p.wait(timeout=10) == 0
    text = stderr.read_text()
    lines = [ln for ln in text.splitlines() if "unreachable" in ln]
    assert len(lines) == 1, text
    assert (
        f"collector http://127.0.0.1:{port} unreachable (connection refused); will keep sampling and retry"
        in lines[0]
    )
    assert lines[0][:4].isdigit()  # timestamped
    assert "Traceback" not in text


def test_sigterm_exits_zero(
    tmp_path: Path, env: dict[str, str], spawn: list[subprocess.Popen[bytes]]
) -> None:
    stderr = tmp_path / "agent.err"
    args = ["--collector", f"http://127.0.0.1:{closed_port()}", "--state-dir", str(tmp_path)]
    p = _start(spawn, args, env, stderr)
    wait_until(lambda: "reporting to" in stderr.read_text(), timeout=30, what="the agent to start")
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=10) == 0, stderr.read_text()
    assert "stopping" in stderr.read_text()
