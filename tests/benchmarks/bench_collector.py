"""Benchmark of the collector process: ingest throughput under wrk, and series latency.

    .venv/bin/python -m tests.benchmarks.bench_collector [--duration 20] [--connections 16,64]

Starts ``python -m cloudmon.collector`` (embedded store in a tmp dir), drives
``POST /api/v1/ingest`` with wrk (``tests/benchmarks/ingest.lua``) using one
real report from ``cloudmon-agent --once`` cycled over 5,000 node ids, and
prints: accepted reports/s (from the collector's own counters; the number of
1 Hz agents it sustains), collector CPU % (all its threads, from /proc) beside
wrk's, wrk's latency percentiles, and whether the store writer kept up (peak
queue depth, drops, drain time).  Then loads one hour of 1 s data for one node
and times the 1 h / 1 s series query through the API.  Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from tests.integration.conftest import agent_command, healthy, private_env

TOKEN = "bench-token"
HERE = Path(__file__).resolve().parent
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all threads) from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Api:
    """Minimal keep-alive JSON client for the benchmark's own calls."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)
        self.headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: bytes | None = None) -> Any:
        self.conn.request(method, path, body=body, headers=self.headers)
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {resp.status} {data[:300]!r}")
        return msgspec.json.decode(data)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", "/api/v1/status")
        return result


def real_report(tmp: Path) -> dict[str, Any]:
    out = subprocess.run(
        [*agent_command(), "--once", "--state-dir", str(tmp / "agent")],
        capture_output=True,
        env=private_env(tmp / "home"),
        check=True,
        timeout=60,
    )
    report: dict[str, Any] = msgspec.json.decode(out.stdout)
    return report


def write_template(report: dict[str, Any], path: Path) -> int:
    """The report as a Lua format string: node id -> %s, ts -> %.3f.  Returns its size."""
    doc = dict(report, node_id="@@NODE@@", ts=0.0)
    text = msgspec.json.encode(doc).decode().replace("%", "%%")
    text = text.replace('"@@NODE@@"', '"%s"').replace('"ts":0.0', '"ts":%.3f')
    path.write_text(text)
    return len(text)


def start_collector(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    args = [sys.executable, "-m", "cloudmon.collector", "--listen", "127.0.0.1:0"]
    args += ["--data-dir", str(tmp / "data"), "--token", TOKEN, "--node-timeout", "30"]
    log = (tmp / "collector.log").open("wb")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, env=private_env(tmp / "home"))
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    match = re.search(r"listening on (http://\S+)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"collector did not start: {line!r}; see {tmp / 'collector.log'}")
    url = match.group(1)
    deadline = time.monotonic() + 30
    while not healthy(url):
        if time.monotonic() > deadline:
            raise RuntimeError("collector /healthz never answered")
        time.sleep(0.05)
    return proc, url


def parse_wrk(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pct in ("50%", "75%", "90%", "99%"):
        m = re.search(rf"^\s+{re.escape(pct)}\s+(\S+)", text, re.M)
        if m:
            out[pct] = m.group(1)
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non2xx"] = m.group(1) if m else "0"
    m = re.search(r"Socket errors: (.*)", text)
    out["socket_errors"] = m.group(1).strip() if m else "none"
    m = re.search(r"Requests/sec:\s+(\S+)", text)
    out["rps"] = m.group(1) if m else "?"
    return out


def run_wrk(
    url: str,
    template: Path,
    connections: int,
    duration: int,
    nodes: int,
    base_ts: float,
    pid: int,
    threads: int,
) -> None:
    api = Api(url)
    before = api.status()
    peak = {"queue": 0}
    stop = threading.Event()

    def watch() -> None:
        watcher = Api(url)
        while not stop.wait(0.5):
            peak["queue"] = max(peak["queue"], watcher.status()["write_queue"])

    watcher = threading.Thread(target=watch, daemon=True)
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        "--latency",
        "-s",
        str(HERE / "ingest.lua"),
    ]
    cmd += [url, "--", str(template), TOKEN, str(nodes), f"{base_ts:.0f}", str(threads)]
    wrk = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    watcher.start()
    try:
        assert wrk.stdout is not None
        text = wrk.stdout.read().decode()
        _, _, usage = os.wait4(wrk.pid, 0)
        wrk.returncode = 0
    finally:
        stop.set()
        watcher.join()
    elapsed = time.monotonic() - t0
    cpu = cpu_seconds(pid) - cpu0
    after = api.status()
    accepted = after["reports_accepted"] - before["reports_accepted"]
    drain0 = time.monotonic()
    while (s := api.status())["write_queue"] > 0 and time.monotonic() - drain0 < 120:
        time.sleep(0.2)
    drain = time.monotonic() - drain0
    w = parse_wrk(text)
    rejected = {
        k: v - before["reports_rejected"].get(k, 0)
        for k, v in after["reports_rejected"].items()
        if v != before["reports_rejected"].get(k, 0)
    }
    print(
        f"  c={connections:<3} accepted {accepted / elapsed:8.0f} reports/s "
        f"(wrk {w['rps']} req/s, non-2xx {w['non2xx']}, rejected {rejected or 'none'}, socket errors {w['socket_errors']})"
    )
    print(
        f"        CPU: collector {100 * cpu / elapsed:5.1f} %   wrk {100 * (usage.ru_utime + usage.ru_stime) / elapsed:5.1f} %"
        f"   (of one core; {os.cpu_count()} cores)   RSS {rss_mib(pid):.0f} MiB"
    )
    print(f"        latency p50 {w.get('50%')}  p75 {w.get('75%')}  p90 {w.get('90%')}  p99 {w.get('99%')}")
    print(
        f"        store writer: peak queue {peak['queue']} (max {after['write_queue_max']}), "
        f"queue at end {after['write_queue']}, drained in {drain:.1f} s, dropped {s['dropped']}, "
        f"store errors {s['store_errors']}, written {s['samples_written']}"
    )


def _report(node: str, ts: float, seq: int) -> dict[str, Any]:
    return {
        **REPORT,
        "node_id": node,
        "ts": ts,
        "seq": seq,
        "host": {**REPORT["host"], "cpu_percent": float(seq % 100)},
    }


def _time_series(api: Api, node: str, start: float, end: float, queries: int, label: str) -> None:
    for metrics in (["cpu.percent"], ["cpu.percent", "mem.percent", "load.1", "net.rx_bps", "net.tx_bps"]):
        q = "&".join(f"metric={m}" for m in metrics)
        path = f"/api/v1/series?node={node}&{q}&start={start}&end={end}&step=1"
        times = []
        for _ in range(queries):
            t = time.perf_counter()
            doc = api.call("GET", path)
            times.append((time.perf_counter() - t) * 1000)
        points = sum(1 for v in doc["metrics"]["cpu.percent"]["avg"] if v is not None)
        times.sort()
        p95 = times[int(0.95 * (len(times) - 1))]
        print(
            f"  1 h / 1 s series, {len(metrics)} metric(s), {label}: median {statistics.median(times):.1f} ms, "
            f"p95 {p95:.1f} ms ({points} points with data, tier {doc['tier']})"
        )


def series_latency(url: str, queries: int) -> None:
    api = Api(url)
    end = float(int(time.time()))
    start = end - 3600
    node = "series-node"
    # As many reports per request as fit the collector's default body limit.
    per_request = max(1, min(1000, (1 << 20) * 9 // 10 // len(msgspec.json.encode(_report(node, start, 0)))))
    for first in range(0, 3600, per_request):
        batch = [_report(node, start + i, i) for i in range(first, min(first + per_request, 3600))]
        api.call("POST", "/api/v1/ingest", msgspec.json.encode(batch))
    while api.status()["write_queue"] > 0:
        time.sleep(0.1)
    # Just written, the hour still sits in the store's write-optimised head.
    _time_series(api, node, start, end, queries, "just written")
    # The embedded store compacts a little on every write: keep a trickle of
    # other reports flowing for a while, as live agents would, then query again.
    t_end = time.monotonic() + 15
    seq = 0
    while time.monotonic() < t_end:
        api.call("POST", "/api/v1/ingest", msgspec.json.encode(_report("trickle", time.time(), seq)))
        seq += 1
        time.sleep(0.02)
    _time_series(api, node, start, end, queries, "after 15 s of live writes")


REPORT: dict[str, Any] = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=20, help="seconds per wrk run")
    parser.add_argument("--connections", default="16,64", help="comma-separated connection counts")
    parser.add_argument("--nodes", type=int, default=5000, help="distinct node ids")
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--queries", type=int, default=30, help="series queries to time")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")
    tmp = Path(tempfile.mkdtemp(prefix="cloudmon-bench-"))
    proc = None
    try:
        REPORT.update(real_report(tmp))
        size = write_template(REPORT, tmp / "report.tmpl")
        proc, url = start_collector(tmp)
        print(
            f"collector {url} (pid {proc.pid}); report {size} bytes, {args.nodes} node ids, wrk -t{args.wrk_threads}"
        )
        # Each run starts 1,000 s after the previous one (a run covers far fewer
        # cycles), so no sample repeats; all within the raw tier's 24 h.
        base_ts = float(int(time.time())) - 6 * 3600
        for i, c in enumerate(int(x) for x in args.connections.split(",")):
            ts = base_ts + i * 1000
            run_wrk(url, tmp / "report.tmpl", c, args.duration, args.nodes, ts, proc.pid, args.wrk_threads)
        series_latency(url, args.queries)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
