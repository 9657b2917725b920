"""A real collector process with real ``cloudmon-agent`` processes over real sockets."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloudmon.client import ApiClient
from tests.integration.conftest import (
    StartAgentProcess,
    StartCollectorProcess,
    private_env,
    wait_until,
)

pytestmark = pytest.mark.integration

NODE_TIMEOUT = 1.5


def _statuses(api: ApiClient) -> dict[str, str]:
    return {n.node_id: n.status for n in api.nodes().nodes}


def _filled(api: ApiClient, node_id: str, start: float, end: float) -> set[float]:
    """Timestamps of the 1 s buckets of ``cpu.percent`` that hold data."""
    series = api.series(node_id, ["cpu.percent"], start=start, end=end, step=1)
    avg = series.metrics["cpu.percent"].avg
    return {ts for ts, v in zip(series.timestamps, avg, strict=True) if v is not None}


def _wait_for_series(api: ApiClient, node_id: str, since: float, points: int = 3) -> None:
    def filled() -> bool:
        return len(_filled(api, node_id, since - 1, time.time() + 1)) >= points

    wait_until(filled, 30, f"{points} points of {node_id}'s series")


def test_two_agents_report_and_a_killed_one_turns_unreachable(
    start_collector_process: StartCollectorProcess, start_agent_process: StartAgentProcess
) -> None:
    collector = start_collector_process(node_timeout=NODE_TIMEOUT)
    t0 = time.time()
    alpha = start_agent_process(collector.url, collector.token, "alpha")
    start_agent_process(collector.url, collector.token, "beta")
    api = ApiClient(collector.url, collector.token)

    wait_until(
        lambda: _statuses(api) == {"alpha": "online", "beta": "online"}, 30, "both nodes online", collector
    )
    for node_id in ("alpha", "beta"):
        _wait_for_series(api, node_id, t0)
        detail = api.node(node_id)
        assert 0 <= detail.latest["cpu.percent"] <= 100
        assert detail.latest["mem.total"] > 0

    alpha.kill()
    wait_until(lambda: _statuses(api).get("alpha") == "unreachable", 30, "alpha unreachable", collector)
    assert _statuses(api) == {"alpha": "unreachable", "beta": "online"}
    status = api.status()
    assert status["nodes"] == 2
    assert status["online"] == 1
    assert status["reports_accepted"] > 0
    assert status["reports_rejected"] == {}
    assert status["degraded"] is False


def test_restarted_collector_keeps_nodes_and_history(
    start_collector_process: StartCollectorProcess,
    start_agent_process: StartAgentProcess,
) -> None:
    first = start_collector_process(node_timeout=NODE_TIMEOUT)
    t0 = time.time()
    agents = [start_agent_process(first.url, first.token, n) for n in ("alpha", "beta")]
    api = ApiClient(first.url, first.token)
    wait_until(lambda: len(_statuses(api)) == 2, 30, "both nodes listed", first)
    for node_id in ("alpha", "beta"):
        _wait_for_series(api, node_id, t0)
    for agent in agents:
        assert agent.stop() == 0
    # Everything accepted is written before we look (the writer batches every ~0.5 s).
    wait_until(
        lambda: (s := api.status())["write_queue"] == 0 and s["samples_written"] == s["reports_accepted"],
        30,
        "the store writer to catch up",
    )
    t1 = time.time() + 1
    before = {n: _filled(api, n, t0 - 1, t1) for n in ("alpha", "beta")}
    api.close()
    assert first.stop() == 0, first.log_text()

    second = start_collector_process(data_dir=first.data_dir, node_timeout=NODE_TIMEOUT)
    api = ApiClient(second.url, second.token)
    assert {n.node_id for n in api.nodes().nodes} == {"alpha", "beta"}
    wait_until(lambda: set(_statuses(api).values()) == {"unreachable"}, 30, "restored nodes unreachable")
    for node_id in ("alpha", "beta"):
        assert len(before[node_id]) >= 3
        assert _filled(api, node_id, t0 - 1, t1) == before[node_id]
        assert api.node(node_id).latest["mem.total"] > 0  # from the store: nothing reported since


def test_headless_collector_prints_url_and_token_place_and_stops_on_sigterm(
    start_collector_process: StartCollectorProcess,
) -> None:
    collector = start_collector_process(token=None)  # generated and kept in the data dir
    token_file = collector.data_dir / "token"
    token = token_file.read_text(encoding="utf-8").strip()
    assert collector.stdout_lines[0] == f"cloudmon collector listening on {collector.url}"
    assert str(token_file) in collector.stdout_lines[1]
    assert token not in "\n".join(collector.stdout_lines)
    assert ApiClient(collector.url, token).status()["loopback"] is True
    assert collector.stop() == 0
    assert token not in collector.log_text()


def test_port_in_use_exits_with_a_clear_error(
    start_collector_process: StartCollectorProcess, tmp_path: Path
) -> None:
    first = start_collector_process()
    port = first.url.rsplit(":", 1)[1]
    args = [sys.executable, "-m", "cloudmon.collector", "--listen", f"127.0.0.1:{port}"]
    args += ["--data-dir", str(tmp_path / "other"), "--token", "t"]
    # It exits by itself; the timeout kills it (by pid) if it does not.
    done = subprocess.run(
        args, capture_output=True, env=private_env(tmp_path / "home"), timeout=60, check=False
    )
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr.decode()
    assert "in use" in done.stderr.decode()
    assert b"listening on" not in done.stdout
    assert first.alive()
