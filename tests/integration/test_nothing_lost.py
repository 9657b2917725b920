"""Nothing lost: a real agent, a real collector that goes away and comes back.

The agent's ``seq`` is stored as the metric ``agent.seq``, so "every sample
exactly once" is checkable from the store: the raw tier must hold every seq
of the run once, and the 1 min / 1 h rollups must average exactly those
samples (a sample counted twice would shift an average).

These tests take about 40 s each: the 30 s outage is the point.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from cloudmon.client import ApiClient, ApiError
from cloudmon_agent.schema import decode_report
from cloudmon_agent.spool import pending_records
from tests.integration.conftest import (
    CollectorProcess,
    ManagedProcess,
    StartAgentProcess,
    StartCollectorProcess,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.outage]

INTERVAL = 1.0
OUTAGE_S = 30
#: The agent retries at most this often while the collector is away (notices it back sooner).
AGENT_ARGS = ("--retry-max", "1")


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _seq_samples(client: ApiClient, node: str, start: float, end: float) -> list[int]:
    """Every ``agent.seq`` stored in the raw tier in ``[start, end)``, one entry per sample.

    With a 1 s interval a 1 s bucket holds one or two samples; two consecutive
    seqs show as min and max (and their mean as avg).
    """
    res = client.series(node, ["agent.seq"], start, end, step=1)
    assert res.tier == "raw"
    m = res.metrics["agent.seq"]
    out: list[int] = []
    for lo, hi, avg in zip(m.min, m.max, m.avg, strict=True):
        if lo is None or hi is None or avg is None:
            continue
        if lo == hi:
            # One sample, or a stored duplicate: told apart by the rollup check.
            out.append(int(lo))
        else:
            assert avg == pytest.approx((lo + hi) / 2), f"more than two samples in one second: {lo}..{hi}"
            out += [int(lo), int(hi)]
    return out


def _stored_seqs(client: ApiClient, node: str, since: float) -> list[int]:
    try:
        return _seq_samples(client, node, since, time.time() + 2)
    except (ApiError, OSError):
        return []


def _check_rollups(client: ApiClient, node: str, start: float, end: float) -> None:
    """Every 1 min and 1 h rollup bucket averages exactly the raw samples it covers."""
    for step, tier in ((60, "1m"), (3600, "1h")):
        a = math.floor(start / step) * step
        b = math.ceil(end / step) * step
        if b <= a:
            b = a + step
        rolled = client.series(node, ["agent.seq"], a, b, step=step)
        assert rolled.tier == tier
        for i, avg in enumerate(rolled.metrics["agent.seq"].avg):
            lo = a + i * step
            seqs = _seq_samples(client, node, lo, lo + step)
            if not seqs:
                assert avg is None
                continue
            assert avg == pytest.approx(sum(seqs) / len(seqs)), f"{tier} bucket at {lo} counts a sample twice"


def _drained(client: ApiClient, spool: Path) -> bool:
    if pending_records(spool):
        return False
    st = client.status()
    return bool(st["write_queue"] == 0)


def _stop_agent_and_settle(agent: ManagedProcess, client: ApiClient, spool: Path) -> None:
    assert agent.stop() == 0, agent.log_text()  # SIGTERM: it delivers what it holds
    wait_until(lambda: _drained(client, spool), 60, "the agent's last reports written")
    assert pending_records(spool) == []


def _restart(start_collector_process: StartCollectorProcess, first: CollectorProcess) -> CollectorProcess:
    return start_collector_process(data_dir=first.data_dir, listen=f"127.0.0.1:{_port(first.url)}")


def test_a_30s_collector_outage_loses_nothing_and_stores_each_sample_once(
    tmp_path: Path, start_collector_process: StartCollectorProcess, start_agent_process: StartAgentProcess
) -> None:
    node = "outage-node"
    spool = tmp_path / f"agent-{node}" / "spool"
    first = start_collector_process()
    t_start = time.time()
    agent = start_agent_process(first.url, first.token, node, interval=INTERVAL, extra=AGENT_ARGS)
    client = ApiClient(first.url, first.token)
    try:
        wait_until(lambda: len(_stored_seqs(client, node, t_start)) >= 3, 60, "first reports stored", agent)
        assert first.stop() == 0, first.log_text()  # SIGTERM: a clean collector shutdown
        t_down = time.time()
        # The outage: the agent keeps sampling into its spool.
        wait_until(
            lambda: len(pending_records(spool)) >= OUTAGE_S, OUTAGE_S * 3, "30 s of spooled reports", agent
        )
        spooled = [decode_report(b).seq for b in pending_records(spool)]
        assert spooled == list(range(spooled[0], spooled[0] + len(spooled)))  # in order, none skipped
        second = _restart(start_collector_process, first)
        t_up = time.time()
        wait_until(lambda: not pending_records(spool), 120, "the spool replayed", agent)
        _stop_agent_and_settle(agent, client, spool)
        t_end = time.time()

        seqs = _seq_samples(client, node, t_start - 1, t_end + 1)
        # Every sample of the run, the gap included, once.
        assert sorted(seqs) == list(range(len(seqs))), f"missing or doubled: {sorted(seqs)}"
        assert set(spooled) <= set(seqs)
        gap = _seq_samples(client, node, t_down, t_up)
        assert len(gap) >= OUTAGE_S - 1
        _check_rollups(client, node, t_start - 1, t_end + 1)
        status = client.status()
        assert status["reports_rejected"] == {}
        assert status["dropped"] == 0
        log = agent.log_text()
        assert "unreachable" in log
        assert "reachable again; 0 report(s) dropped meanwhile" in log
        assert second.alive()
    finally:
        client.close()


def test_sigkill_of_the_agent_during_an_outage_loses_at_most_the_sample_in_flight(
    tmp_path: Path, start_collector_process: StartCollectorProcess, start_agent_process: StartAgentProcess
) -> None:
    node = "killed-node"
    spool = tmp_path / f"agent-{node}" / "spool"
    first = start_collector_process()
    t_start = time.time()
    agent = start_agent_process(first.url, first.token, node, interval=INTERVAL, extra=AGENT_ARGS)
    client = ApiClient(first.url, first.token)
    try:
        wait_until(lambda: len(_stored_seqs(client, node, t_start)) >= 2, 60, "first reports stored", agent)
        assert first.stop() == 0, first.log_text()
        wait_until(lambda: len(pending_records(spool)) >= 5, 60, "reports spooled", agent)
        agent.kill()  # SIGKILL: no cleanup at all
        t_kill = time.time()
        on_disk = [decode_report(b) for b in pending_records(spool)]
        assert [r.seq for r in on_disk] == list(range(on_disk[0].seq, on_disk[0].seq + len(on_disk)))

        t_restart = time.time()
        again = start_agent_process(first.url, first.token, node, interval=INTERVAL, extra=AGENT_ARGS)
        # The new agent keeps the old spool and adds to it while the collector is still away.
        wait_until(
            lambda: len(pending_records(spool)) >= len(on_disk) + 3, 60, "the new agent spooling", again
        )
        second = _restart(start_collector_process, first)
        wait_until(lambda: not pending_records(spool), 120, "the spool replayed", again)
        _stop_agent_and_settle(again, client, spool)
        t_end = time.time()

        run1 = _seq_samples(client, node, t_start - 1, t_restart)
        run2 = _seq_samples(client, node, t_restart, t_end + 1)
        assert sorted(run1) == list(range(len(run1))), f"first run missing or doubled: {sorted(run1)}"
        assert sorted(run2) == list(range(len(run2))), f"second run missing or doubled: {sorted(run2)}"
        # Everything the killed agent had spooled was replayed ...
        assert {r.seq for r in on_disk} <= set(run1)
        # ... and at most the sample being taken at the kill is missing: the last stored
        # sample of the first run is at most one interval (plus scheduling) before the kill.
        last_ts = max(r.ts for r in on_disk)
        assert t_kill - last_ts <= 2 * INTERVAL + 0.5
        _check_rollups(client, node, t_start - 1, t_end + 1)
        assert second.alive()
    finally:
        client.close()
