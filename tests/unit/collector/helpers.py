"""Helpers for the collector's unit tests: report builders and a raw HTTP poster."""

from __future__ import annotations

import http.client
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import msgspec

from cloudmon_agent.schema import AgentStats, HostMetrics, NodeInfo, Report, encode

TOKEN = "unit-test-token"


def make_report(node_id: str = "node-a", ts: float = 1_000_000.0, cpu: float = 12.5, seq: int = 1) -> Report:
    """A valid report with distinctive values."""
    return Report(
        v=1,
        node_id=node_id,
        ts=ts,
        seq=seq,
        interval=1.0,
        node=NodeInfo(hostname=f"host-{node_id}", os="Linux", cpu_count=2, agent_version="0.1.0"),
        host=HostMetrics(
            cpu_percent=cpu,
            cpu_per_core=[cpu, cpu / 2],
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


def report_json(**kw: Any) -> bytes:
    return encode(make_report(**kw))


def report_dict(**kw: Any) -> dict[str, Any]:
    """A report as a mutable dict, to break on purpose."""
    doc: dict[str, Any] = msgspec.json.decode(report_json(**kw))
    return doc


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: Any


def post(
    url: str,
    body: bytes,
    token: str | None = TOKEN,
    content_type: str = "application/json",
    chunked: bool = False,
    path: str = "/api/v1/ingest",
) -> Answer:
    """POST raw bytes (own connection) and decode the JSON answer."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        if chunked:
            conn.request("POST", path, body=iter([body]), headers=headers, encode_chunked=True)
        else:
            conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    return Answer(resp.status, resp.headers, msgspec.json.decode(data) if data else None)


def get(url: str, path: str, token: str | None = TOKEN) -> Answer:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    return Answer(resp.status, resp.headers, msgspec.json.decode(data) if data else None)


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something truthy (returned) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


class FakeClock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
