"""Agent: reports, the push loop, the collector going away and coming back, lifecycle."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudmon_agent import __version__
from cloudmon_agent.agent import Agent, LinkState, next_cycle
from cloudmon_agent.collectors.host import HostCollector
from cloudmon_agent.config import AgentConfig
from cloudmon_agent.schema import HostMetrics, Report, decode_report, encode
from tests.unit.agent.sink import Sink, closed_port, wait_until

AGENT_LOG = "cloudmon_agent.agent"


def _cfg(
    tmp_path: Path, url: str | None = None, interval: float = 0.02, token: str | None = "tok"
) -> AgentConfig:
    return AgentConfig(collector=url, token=token, interval=interval, state_dir=tmp_path / "state", name="n1")


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    """Agents made by a test; closed even if it fails."""
    made: list[Agent] = []
    try:
        yield made
    finally:
        for a in made:
            a.close()


def _messages(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and text in r.getMessage()]


# -- sampling -----------------------------------------------------------------


def test_sample_is_a_valid_report(config: AgentConfig) -> None:
    with Agent(config) as agent:
        agent.prime()
        t0 = time.time()
        r1 = agent.sample()
        r2 = agent.sample()
    decoded = decode_report(encode(r1))
    assert decoded == r1
    assert (r1.seq, r2.seq) == (0, 1)
    assert t0 <= r1.ts <= r2.ts <= time.time()
    assert r1.node_id == (config.state_path / "node-id").read_text().strip()
    assert r1.node.hostname == "test-node"
    assert r1.node.cpu_count == os.cpu_count()
    assert r1.node.agent_version == __version__
    assert r1.node.os.startswith(os.uname().sysname)
    assert r1.interval == 1.0
    statm_rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert abs(r1.agent.rss_bytes - statm_rss) < 16 * 1024 * 1024
    assert r1.agent.cpu_ms >= 0
    assert r1.agent.dropped_reports == 0


class BusyHost:
    """A pluggable host collector that burns a known amount of CPU per sample."""

    field = "host"

    def __init__(self, burn_s: float) -> None:
        self.inner = HostCollector()
        self.burn_s = burn_s

    def prime(self) -> None:
        self.inner.prime()

    def collect(self) -> HostMetrics:
        end = time.thread_time() + self.burn_s
        while time.thread_time() < end:
            pass
        return self.inner.collect()

    def close(self) -> None:
        self.inner.close()


def test_cpu_ms_is_the_sampling_threads_cpu_per_cycle(config: AgentConfig) -> None:
    with Agent(config, collectors=[BusyHost(0.03)]) as agent:
        agent.prime()
        reports = [agent.sample() for _ in range(4)]
    # each cycle (from one sample to the next) burned >= 30 ms in this thread
    assert all(r.agent.cpu_ms >= 30 for r in reports[1:])
    assert all(r.agent.cpu_ms < 1000 for r in reports)


def test_cpu_ms_ignores_other_threads_of_an_embedding_process(
    tmp_path: Path, sink: Sink, agents: list[Agent]
) -> None:
    # The desktop app embeds the agent: its GUI thread's work is not the agent's.
    agent = Agent(_cfg(tmp_path, sink.url, interval=0.1))
    agents.append(agent)
    stop = threading.Event()
    burned = [0.0]

    def burn() -> None:
        t0 = time.thread_time()
        while not stop.is_set():
            sum(i for i in range(10_000))
        burned[0] = time.thread_time() - t0

    burner = threading.Thread(target=burn, name="test-burner")
    burner.start()
    try:
        agent.start()
        wait_until(lambda: len(sink.requests) >= 8, what="8 reports")
    finally:
        stop.set()
        burner.join()
    agent.close()
    burner_ms_per_cycle = burned[0] * 1000 / agent.counters().sampled
    cpu = sorted(decode_report(r.body).agent.cpu_ms for r in sink.requests[1:])
    median = cpu[len(cpu) // 2]
    assert burner_ms_per_cycle > 10  # another thread of the process was busy...
    assert median < burner_ms_per_cycle / 2  # ...and that is not charged to the agent


def test_agent_needs_a_host_collector_and_unique_fields(config: AgentConfig) -> None:
    with pytest.raises(ValueError, match="'host'"):
        Agent(config, collectors=[])
    with pytest.raises(ValueError, match="same report field"):
        Agent(config, collectors=[HostCollector(), HostCollector()])


# -- the schedule ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "now", "expected"),
    [
        (1, 1.5, (2, 0)),  # on time: the next cycle
        (1, 2.0, (2, 0)),  # exactly due: still the next one
        (1, 4.2, (5, 3)),  # cycle 1 overran past 2, 3 and 4: skip them, no burst
        (7, 7.9, (8, 0)),
    ],
)
def test_next_cycle_skips_ahead_after_an_overrun(k: int, now: float, expected: tuple[int, int]) -> None:
    assert next_cycle(k, 0.0, now, 1.0) == expected


# -- pushing ------------------------------------------------------------------


def test_run_pushes_reports_in_order(tmp_path: Path, sink: Sink, agents: list[Agent]) -> None:
    agent = Agent(_cfg(tmp_path, sink.url))
    agents.append(agent)
    agent.start()
    running_while_started = agent.running
    wait_until(lambda: len(sink.requests) >= 5, what="5 reports")
    agent.close()
    assert (running_while_started, agent.running) == (True, False)
    reports = [decode_report(r.body) for r in sink.requests]
    seqs = [r.seq for r in reports]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    assert {r.node_id for r in reports} == {agent.node_id}
    assert all(r.headers["Authorization"] == "Bearer tok" for r in sink.requests)
    assert len({r.client_port for r in sink.requests}) == 1  # one kept-alive connection
    assert reports[0].host.cpu_percent >= 0
    c = agent.counters()
    assert c.sent == len(sink.requests)
    assert c.link is LinkState.UP


def test_collector_down_logs_one_warning_and_keeps_sampling(
    tmp_path: Path, agents: list[Agent], caplog: pytest.LogCaptureFixture
) -> None:
    port = closed_port()
    agent = Agent(_cfg(tmp_path, f"http://127.0.0.1:{port}"), queue_max=3, retry_min=0.02, retry_max=0.1)
    agents.append(agent)
    with caplog.at_level(logging.INFO, logger=AGENT_LOG):
        agent.start()
        wait_until(lambda: agent.counters().sampled >= 25, what="25 cycles")
        agent.close()
    warnings = _messages(caplog, logging.WARNING, "unreachable")
    assert warnings == [
        f"collector http://127.0.0.1:{port} unreachable (connection refused); will keep sampling and retry"
    ]
    c = agent.counters()
    assert c.link is LinkState.DOWN
    assert c.sent == 0
    assert c.dropped >= c.sampled - 3 - 1  # all but the queued (and one in flight) were dropped
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_collector_back_logs_one_info_and_reports_dropped_count(
    tmp_path: Path, agents: list[Agent], caplog: pytest.LogCaptureFixture
) -> None:
    port = closed_port()
    agent = Agent(_cfg(tmp_path, f"http://127.0.0.1:{port}"), queue_max=3, retry_min=0.02, retry_max=0.05)
    agents.append(agent)
    with caplog.at_level(logging.INFO, logger=AGENT_LOG):
        agent.start()
        wait_until(lambda: agent.counters().dropped >= 5, what="reports dropped while down")
        sink = Sink(port=port)
        try:
            wait_until(lambda: len(sink.requests) >= 8, what="reports after the collector came back")
            agent.close()
        finally:
            sink.close()
    assert len(_messages(caplog, logging.WARNING, "unreachable")) == 1
    back = _messages(caplog, logging.INFO, "reachable again")
    assert len(back) == 1
    assert "report(s) dropped meanwhile" in back[0]
    reports = [decode_report(r.body) for r in sink.requests]
    assert reports[-1].agent.dropped_reports >= 5  # the count travels in the reports
    seqs = [r.seq for r in reports]
    assert seqs == sorted(seqs)  # the queued backlog went first, in order


def test_retries_back_off_instead_of_once_per_cycle(tmp_path: Path, agents: list[Agent]) -> None:
    # A listener that accepts and hangs up counts the agent's connection attempts.
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    attempts = 0
    stop = threading.Event()

    def accept() -> None:
        nonlocal attempts
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            attempts += 1
            conn.close()

    acceptor = threading.Thread(target=accept, name="test-acceptor")
    acceptor.start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        agent = Agent(_cfg(tmp_path, url, interval=0.02), retry_min=0.05, retry_max=0.4)
        agents.append(agent)
        agent.start()
        wait_until(lambda: agent.counters().sampled >= 60, what="60 cycles")
        agent.close()
    finally:
        stop.set()
        acceptor.join()
        listener.close()
    sampled = agent.counters().sampled
    assert 1 <= attempts <= sampled // 3


def test_rejected_token_logs_one_error_naming_the_fix(
    tmp_path: Path, sink: Sink, agents: list[Agent], caplog: pytest.LogCaptureFixture
) -> None:
    sink.answer = (401, b'{"error": "missing or wrong bearer token"}')
    agent = Agent(_cfg(tmp_path, sink.url, token="tok-W7x9Q"), retry_min=0.01, retry_max=0.02)
    agents.append(agent)
    with caplog.at_level(logging.INFO, logger=AGENT_LOG):
        agent.start()
        wait_until(lambda: len(sink.requests) >= 5, what="5 rejected posts")
        agent.close()
    errors = _messages(caplog, logging.ERROR, "token rejected by collector")
    assert len(errors) == 1
    assert "pass the collector's token with --token or CLOUDMON_TOKEN" in errors[0]
    assert all("tok-W7x9Q" not in r.getMessage() for r in caplog.records)  # never log the token
    assert agent.counters().link is LinkState.AUTH_REJECTED


def test_rejected_reports_are_dropped_counted_and_logged_once(
    tmp_path: Path, sink: Sink, agents: list[Agent], caplog: pytest.LogCaptureFixture
) -> None:
    sink.answer = (400, b'{"error": "invalid report: bad field"}')
    agent = Agent(_cfg(tmp_path, sink.url))
    agents.append(agent)
    with caplog.at_level(logging.INFO, logger=AGENT_LOG):
        agent.start()
        wait_until(lambda: agent.counters().rejected >= 5, what="5 rejections")
        agent.close()
    c = agent.counters()
    assert c.dropped >= c.rejected >= 5
    warned = _messages(caplog, logging.WARNING, "rejected the report")
    assert len(warned) == 1
    assert "invalid report: bad field" in warned[0]


def test_a_failing_collector_does_not_stop_the_loop(
    tmp_path: Path, sink: Sink, agents: list[Agent], caplog: pytest.LogCaptureFixture
) -> None:
    class Flaky(HostCollector):
        calls = 0

        def collect(self) -> HostMetrics:
            Flaky.calls += 1
            if Flaky.calls % 2 == 0:
                raise RuntimeError("sensor glitch")
            return super().collect()

    agent = Agent(_cfg(tmp_path, sink.url), collectors=[Flaky()])
    agents.append(agent)
    with caplog.at_level(logging.ERROR, logger=AGENT_LOG):
        agent.start()
        wait_until(lambda: len(sink.requests) >= 4, what="reports despite failures")
        agent.close()
    assert len(_messages(caplog, logging.ERROR, "sensor glitch")) == 1


# -- lifecycle ----------------------------------------------------------------


def test_close_is_idempotent_and_start_is_once(tmp_path: Path, sink: Sink) -> None:
    agent = Agent(_cfg(tmp_path, sink.url))
    agent.close()  # never started
    agent.close()
    agent2 = Agent(_cfg(tmp_path, sink.url))
    try:
        agent2.start()
        with pytest.raises(RuntimeError, match="already running"):
            agent2.start()
    finally:
        agent2.close()
        agent2.close()
    assert not agent2.running


def test_run_without_collector_says_how_to_configure_it(config: AgentConfig) -> None:
    with Agent(config) as agent, pytest.raises(RuntimeError, match="--collector URL or CLOUDMON_COLLECTOR"):
        agent.run()


def test_run_in_callers_thread_stops_on_close_from_another(tmp_path: Path, sink: Sink) -> None:
    agent = Agent(_cfg(tmp_path, sink.url))
    runner = threading.Thread(target=agent.run, name="test-runner")
    runner.start()
    try:
        wait_until(lambda: len(sink.requests) >= 2, what="2 reports")
    finally:
        agent.close()
        runner.join(timeout=10)
    assert not runner.is_alive()


def test_report_type_is_the_schema_report(config: AgentConfig) -> None:
    with Agent(config) as agent:
        assert isinstance(agent.sample(), Report)
