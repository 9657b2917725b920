"""Agent: reports, the push loop, the collector going away and coming back, lifecycle."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from cloudmon_agent import __version__
from cloudmon_agent.agent import Agent, LinkState, next_cycle
from cloudmon_agent.budget import REPORT_COST, BudgetPolicy, apply_budget
from cloudmon_agent.collectors.host import HostCollector
from cloudmon_agent.config import AgentConfig
from cloudmon_agent.schema import HostMetrics, IngestResponse, Report, decode_report, encode
from cloudmon_agent.spool import Spool, pending_records
from cloudmon_agent.transport import HttpTransport
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


def test_the_budget_counts_encoding_and_posting_each_report(
    tmp_path: Path, sink: Sink, agents: list[Agent]
) -> None:
    policy = BudgetPolicy(50.0)
    agent = Agent(_cfg(tmp_path, sink.url), collectors=apply_budget([HostCollector()], policy))
    agents.append(agent)
    agent.start()
    wait_until(lambda: len(sink.requests) >= 5, what="5 reports")
    agent.close()
    assert REPORT_COST in policy.mean_ms
    assert policy.mean_ms[REPORT_COST] > 0.0
    assert policy.expected_ms() == pytest.approx(policy.mean_ms["host"] + policy.mean_ms[REPORT_COST])


@pytest.mark.parametrize("whole_process", [True, False])
def test_run_as_its_own_process_the_budget_counts_every_thread(
    tmp_path: Path, sink: Sink, agents: list[Agent], whole_process: bool
) -> None:
    # Another thread of this process burns CPU: an agent that is its own process
    # (cloudmon-agent) must count it; one embedded in a program (the console) must not.
    stop = threading.Event()

    def burn() -> None:
        while not stop.is_set():
            sum(range(1000))

    burner = threading.Thread(target=burn)
    burner.start()
    try:
        policy = BudgetPolicy(50.0)
        agent = Agent(
            _cfg(tmp_path, sink.url),
            collectors=apply_budget([HostCollector()], policy),
            whole_process=whole_process,
        )
        agents.append(agent)
        agent.start()
        wait_until(lambda: len(sink.requests) >= 8, what="8 reports")
        agent.close()
    finally:
        stop.set()
        burner.join()
    if whole_process:
        assert policy.mean_ms[REPORT_COST] > 5.0  # most of each 20 ms cycle is the burner's
    else:
        assert policy.mean_ms[REPORT_COST] < 5.0


def test_collector_down_logs_one_warning_and_keeps_sampling(
    tmp_path: Path, agents: list[Agent], caplog: pytest.LogCaptureFixture
) -> None:
    port = closed_port()
    agent = Agent(_cfg(tmp_path, f"http://127.0.0.1:{port}"), retry_min=0.02, retry_max=0.1)
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
    assert c.dropped == 0
    # Every sampled report waits in the on-disk spool, in order.
    assert c.spooled == c.sampled
    kept = [decode_report(b).seq for b in pending_records(tmp_path / "state" / "spool")]
    assert kept == list(range(c.sampled))
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def _posted(sink: Sink) -> list[list[Report]]:
    """Every POST's reports: a fresh one is a list of one, a replay batch a longer list."""
    out: list[list[Report]] = []
    for r in sink.requests:
        if r.body.startswith(b"["):
            out.append([decode_report(raw) for raw in msgspec.json.decode(r.body, type=list[msgspec.Raw])])
        else:
            out.append([decode_report(r.body)])
    return out


def test_collector_back_replays_the_spool_and_logs_one_info(
    tmp_path: Path, agents: list[Agent], caplog: pytest.LogCaptureFixture
) -> None:
    port = closed_port()
    agent = Agent(_cfg(tmp_path, f"http://127.0.0.1:{port}"), retry_min=0.02, retry_max=0.05)
    agents.append(agent)
    with caplog.at_level(logging.INFO, logger=AGENT_LOG):
        agent.start()
        wait_until(lambda: agent.counters().spooled >= 10, what="reports spooled while down")
        sink = Sink(port=port)
        try:
            wait_until(
                lambda: agent.counters().spooled == 0 and agent.counters().sent >= 15,
                what="the spool replayed after the collector came back",
            )
            agent.close()
        finally:
            sink.close()
    assert len(_messages(caplog, logging.WARNING, "unreachable")) == 1
    back = _messages(caplog, logging.INFO, "reachable again")
    assert len(back) == 1
    assert "0 report(s) dropped meanwhile" in back[0]
    assert len(_messages(caplog, logging.INFO, "spool replayed")) >= 1
    posts = _posted(sink)
    seqs = sorted(r.seq for post in posts for r in post)
    c = agent.counters()
    # Nothing lost, nothing twice: every sampled report reached the sink once
    # (the last ones may still wait in memory or on disk at close: none here).
    assert seqs == list(range(len(seqs)))
    assert c.replayed >= 10
    assert any(len(post) > 1 for post in posts)  # the backlog went in batches
    replayed = [r.seq for post in posts if len(post) > 1 for r in post]
    assert replayed == sorted(replayed)  # ... in order
    assert max(r.agent.spooled for post in posts for r in post) >= 5  # the count travels in the reports


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


# -- the spool: replay, interleaving, lost answers, restarts ---------------------


def _old_reports(config: AgentConfig, n: int, first_seq: int = 10_000) -> list[bytes]:
    """``n`` valid encoded reports of an earlier run (seq from ``first_seq``, an hour ago)."""
    with Agent(config) as agent:
        base = agent.sample()
    t0 = time.time() - 3600
    return [encode(msgspec.structs.replace(base, seq=first_seq + i, ts=t0 + i)) for i in range(n)]


def _prefill(config: AgentConfig, bodies: list[bytes]) -> None:
    with Spool(config.state_path / "spool", config.spool_max_bytes) as sp:
        for b in bodies:
            sp.append(b)


def test_replay_is_interleaved_with_fresh_reports(tmp_path: Path, sink: Sink, agents: list[Agent]) -> None:
    cfg = _cfg(tmp_path, sink.url)
    old = _old_reports(cfg, 120)
    _prefill(cfg, old)
    sink.delay_s = 0.01  # each batch takes a while, so fresh reports come due meanwhile
    agent = Agent(cfg, replay_batch=4)
    agents.append(agent)
    agent.start()
    wait_until(lambda: agent.counters().spooled == 0, timeout=30, what="the spool replayed")
    agent.close()
    posts = _posted(sink)
    replayed = [r.seq for post in posts for r in post if r.seq >= 10_000]
    fresh = [r.seq for post in posts for r in post if r.seq < 10_000]
    assert replayed == list(range(10_000, 10_120))  # all, once, in order
    assert all(len(post) <= 4 for post in posts if post[0].seq >= 10_000)
    assert fresh == list(range(len(fresh)))
    # Fresh reports went out while the backlog was still being replayed.
    last_replay = max(i for i, post in enumerate(posts) if post[0].seq >= 10_000)
    first_fresh = min(i for i, post in enumerate(posts) if post[0].seq < 10_000)
    assert first_fresh < last_replay
    assert pending_records(cfg.state_path / "spool") == []


def test_a_lost_answer_resends_the_batch_and_loses_nothing(
    tmp_path: Path, sink: Sink, agents: list[Agent]
) -> None:
    cfg = _cfg(tmp_path, sink.url, interval=0.2)
    _prefill(cfg, _old_reports(cfg, 30))
    sink.drop_responses = 2  # the first two requests are received but never answered
    agent = Agent(cfg, replay_batch=10, retry_min=0.02, retry_max=0.05)
    agents.append(agent)
    agent.start()
    wait_until(lambda: agent.counters().spooled == 0, timeout=30, what="the spool replayed")
    agent.close()
    posts = _posted(sink)
    replayed = [r.seq for post in posts for r in post if r.seq >= 10_000]
    # At least once from the agent (the collector drops the duplicates).
    assert set(replayed) == set(range(10_000, 10_030))
    assert len(replayed) > 30
    assert agent.counters().replayed == 30


def test_a_restarted_agent_replays_what_the_last_one_spooled(tmp_path: Path, agents: list[Agent]) -> None:
    port = closed_port()
    cfg = _cfg(tmp_path, f"http://127.0.0.1:{port}")
    first = Agent(cfg, retry_min=0.02, retry_max=0.05)
    agents.append(first)
    first.start()
    wait_until(lambda: first.counters().spooled >= 8, what="reports spooled")
    first.close()
    kept = first.counters().spooled
    assert kept == first.counters().sampled  # nothing lost at shutdown either
    sink = Sink(port=port)
    try:
        second = Agent(cfg, retry_min=0.02, retry_max=0.05)
        agents.append(second)
        second.start()
        wait_until(lambda: second.counters().replayed >= kept, what="the old spool replayed")
        second.close()
    finally:
        sink.close()
    replayed = [r for post in _posted(sink) if len(post) > 1 or post[0].agent.spooled for r in post]
    node_seqs = sorted(r.seq for r in replayed if r.ts < second_start_ts(replayed, kept))
    assert node_seqs == list(range(kept))


def second_start_ts(reports: list[Report], kept: int) -> float:
    """The first run's reports are the ``kept`` oldest by time."""
    return sorted(r.ts for r in reports)[kept - 1] + 1e-6


def test_a_full_spool_drops_the_oldest_and_says_so_in_reports(tmp_path: Path, agents: list[Agent]) -> None:
    port = closed_port()
    cfg = AgentConfig(
        collector=f"http://127.0.0.1:{port}",
        token="tok",
        interval=0.005,
        state_dir=tmp_path / "state",
        name="n1",
        spool_max_bytes=64 << 10,
    )
    agent = Agent(cfg, retry_min=0.5, retry_max=1.0)
    agents.append(agent)
    agent.start()
    wait_until(lambda: agent.counters().spool_dropped >= 15, timeout=60, what="the spool full")
    agent.close()
    c = agent.counters()
    kept = [decode_report(b) for b in pending_records(cfg.state_path / "spool")]
    assert len(kept) == c.spooled
    assert c.spooled + c.spool_dropped + c.dropped == c.sampled
    assert sum(p.stat().st_size for p in (cfg.state_path / "spool").glob("*.seg")) <= 64 << 10
    seqs = [r.seq for r in kept]
    assert seqs == list(range(c.sampled - len(seqs), c.sampled))  # the newest, in order
    # The count travels in the reports sampled after the first drop.
    assert max(r.agent.spool_dropped for r in kept) > 0
    assert all(r.agent.dropped_reports >= r.agent.spool_dropped for r in kept)


def test_no_spool_file_is_written_while_the_collector_is_up(
    tmp_path: Path, sink: Sink, agents: list[Agent]
) -> None:
    agent = Agent(_cfg(tmp_path, sink.url))
    agents.append(agent)
    agent.start()
    wait_until(lambda: len(sink.requests) >= 20, what="20 reports")
    assert list((tmp_path / "state" / "spool").iterdir()) == []  # the spool path never touched the disk
    agent.close()
    c = agent.counters()
    assert (c.spooled, c.replayed, c.spool_dropped) == (0, 0, 0)


# -- who posts ----------------------------------------------------------------


class _ThreadRecordingTransport(HttpTransport):
    """The real HTTP transport, noting which thread made each post."""

    def __init__(self, url: str) -> None:
        super().__init__(url, "tok", timeout=2.0)
        self.threads: list[str] = []

    def send(self, body: bytes, timeout: float | None = None) -> IngestResponse:
        self.threads.append(threading.current_thread().name)
        return super().send(body, timeout)

    def begin(self, body: bytes, timeout: float | None = None) -> bool:
        self.threads.append(threading.current_thread().name)
        return super().begin(body, timeout)


def test_steady_state_posts_come_from_the_sampling_thread(
    tmp_path: Path, sink: Sink, agents: list[Agent]
) -> None:
    transport = _ThreadRecordingTransport(sink.url)
    agent = Agent(_cfg(tmp_path, sink.url, interval=0.05), collectors=[HostCollector()], transport=transport)
    agents.append(agent)
    agent.start()
    wait_until(lambda: len(sink.requests) >= 6, what="6 reports")
    agent.close()
    # The first post finds the link unknown and goes through the sender; once the
    # collector has answered, the sampling thread posts each report itself.
    assert transport.threads[0] == "cloudmon-agent-send"
    assert "cloudmon-agent" in transport.threads[1:]
    seqs = [decode_report(r.body).seq for r in sink.requests]
    assert seqs == sorted(seqs)
    assert agent.counters().sent == len(set(seqs))


def test_a_collector_that_stops_answering_does_not_stall_sampling(
    tmp_path: Path, sink: Sink, agents: list[Agent]
) -> None:
    cfg = AgentConfig(collector=sink.url, token="tok", interval=0.05, state_dir=tmp_path / "s", timeout=1.0)
    agent = Agent(cfg, collectors=[HostCollector()])
    agents.append(agent)
    agent.start()
    wait_until(lambda: agent.counters().link is LinkState.UP and agent.counters().sent >= 2, what="link up")
    sink.delay_s = 3.0  # every answer now comes after the agent stopped waiting for it
    before = agent.counters().sampled
    # Sampling goes on while the posts hang: the sampling thread gave up on its own
    # post after its short timeout and handed the report to the sender.
    wait_until(
        lambda: agent.counters().sampled >= before + 10, what="10 more samples while the collector hangs"
    )
    wait_until(lambda: agent.counters().link is LinkState.DOWN, what="the sender to mark the link down")
    assert agent.counters().sampled >= before + 10
    sink.delay_s = 0.0
    agent.close()
