"""A scripted agent for exactly-once tests: reports with known ``(node, ts)`` pairs.

Each report of node ``n`` at time ``t`` carries ``cpu.percent = value(i)`` where
``i`` is its index in the run, so the store can be checked for every sample
(raw tier) and for double counting (a rollup bucket's average shifts if one
sample is folded in twice).  Like a real agent, the poster keeps a report it
could not deliver (no answer, 503) and sends it again later: delivery is
at-least-once, the store must make it exactly-once.
"""

from __future__ import annotations

import http.client
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import msgspec

from cloudmon.store import SeriesResult, TelemetryStore
from cloudmon_agent.schema import AgentStats, HostMetrics, NodeInfo, Report

METRIC = "cpu.percent"


def value(i: int) -> float:
    """The metric value of the report at index ``i`` of a node's run (distinct per index)."""
    return float(i % 97)


def make_report(node_id: str, ts: float, i: int) -> Report:
    """A valid report of ``node_id`` at ``ts`` whose ``cpu.percent`` is ``value(i)``."""
    v = value(i)
    return Report(
        v=1,
        node_id=node_id,
        ts=ts,
        seq=i + 1,
        interval=1.0,
        node=NodeInfo(hostname=f"host-{node_id}", os="Linux", cpu_count=2, agent_version="0.1.0"),
        host=HostMetrics(
            cpu_percent=v,
            cpu_per_core=[v, v],
            mem_total=8_000,
            mem_used=2_000,
            mem_available=6_000,
            mem_percent=25.0,
            swap_total=0,
            swap_used=0,
            swap_percent=0.0,
            disk_read_bps=1.0,
            disk_write_bps=2.0,
            disk_read_iops=3.0,
            disk_write_iops=4.0,
            net_rx_bps=100.0,
            net_tx_bps=200.0,
            net_rx_pps=5.0,
            net_tx_pps=6.0,
            load1=0.5,
            load5=0.25,
            load15=0.125,
        ),
        agent=AgentStats(cpu_ms=1.5, rss_bytes=10_000),
    )


def post_batch(url: str, token: str, reports: Sequence[Report], timeout: float = 10.0) -> int:
    """POST a batch; the HTTP status, or 0 when there was no answer (refused, reset, timeout)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    body = msgspec.json.encode(list(reports))
    try:
        conn.request(
            "POST",
            "/api/v1/ingest",
            body=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        )
        resp = conn.getresponse()
        resp.read()
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        conn.close()
    return resp.status


@dataclass
class Poster:
    """Posts one batch (every node at one ``ts``) per step; undelivered batches are kept and resent."""

    nodes: list[str]
    t0: float
    token: str
    #: Index of the next new batch.
    next_index: int = 0
    backlog: list[tuple[int, list[Report]]] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    #: Indices of batches the collector accepted (200).
    accepted: set[int] = field(default_factory=set)

    def batch(self, i: int) -> list[Report]:
        return [make_report(n, self.t0 + i, i) for n in self.nodes]

    def step(self, url: str) -> int:
        """Send the next new batch to ``url`` (after retrying the backlog there); its status."""
        self.resend(url)
        i = self.next_index
        self.next_index += 1
        return self._send(url, i, self.batch(i))

    def resend(self, url: str) -> None:
        """Send the kept batches again, oldest first, until one is refused."""
        while self.backlog:
            i, reports = self.backlog.pop(0)
            if self._send(url, i, reports) != 200:
                return

    def _send(self, url: str, i: int, reports: list[Report]) -> int:
        status = post_batch(url, self.token, reports)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == 200:
            self.accepted.add(i)
        else:
            self.backlog.append((i, reports))
            self.backlog.sort(key=lambda b: b[0])  # resent oldest first, like an agent's spool
        return status


def stored_values(store: TelemetryStore, node: str, start: float, end: float) -> dict[float, float]:
    """``ts -> cpu.percent`` of every raw sample of ``node`` in ``[start, end)``."""
    res = store.series(node, [METRIC], start, end, 1.0)
    assert res.tier == "raw", res.tier
    m = res.metrics[METRIC]
    return {t: v for t, v in zip(res.timestamps, m.avg, strict=True) if v is not None}


def check_rollups(store: TelemetryStore, node: str, t0: float, count: int) -> None:
    """Every 1 min / 1 h bucket averages exactly the samples ``0..count-1`` it covers (once each)."""
    for step, tier in ((60.0, "1m"), (3600.0, "1h")):
        lo = math.floor(t0 / step) * step
        hi = math.ceil((t0 + count) / step) * step
        res: SeriesResult = store.series(node, [METRIC], lo, hi, step)
        assert res.tier == tier, (res.tier, tier)
        expected: dict[float, list[float]] = {}
        for i in range(count):
            bucket = lo + step * math.floor((t0 + i - lo) / step)
            expected.setdefault(bucket, []).append(value(i))
        got = {t: v for t, v in zip(res.timestamps, res.metrics[METRIC].avg, strict=True) if v is not None}
        want = {t: sum(vs) / len(vs) for t, vs in expected.items()}
        assert got.keys() == want.keys(), (tier, sorted(got), sorted(want))
        for t, v in want.items():
            assert math.isclose(got[t], v, rel_tol=1e-9), f"{node} {tier} bucket {t}: {got[t]} != {v}"
