"""What the agent costs a node, next to a typical psutil monitor loop.

    .venv/bin/python tests/benchmarks/bench_agent.py [--seconds 60] [--interval 1]

Starts, in the same run and side by side:

- the real ``cloudmon-agent`` process posting one report per interval to a
  minimal HTTP sink in this process (on a free port);
- a "naive psutil loop" process doing what a typical psutil monitor does each
  interval: ``cpu_percent(percpu=True)``, ``virtual_memory``, ``swap_memory``,
  ``disk_io_counters``, ``net_io_counters``, ``disk_partitions`` +
  ``disk_usage``, ``getloadavg`` and ``process_iter(['cpu_percent',
  'memory_info'])`` (it posts nothing, so the comparison flatters it).

For each it measures CPU per cycle from ``/proc/PID/stat`` (utime + stime)
after a warm-up, and RSS (mean and max, sampled once a second), then prints a
table.  It also times one sampling cycle in this process (no process or HTTP
overhead).  Prints figures; asserts nothing.  Linux only.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cloudmon_agent.schema import decode_report

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

NAIVE_LOOP = r"""
import sys, time
import psutil

seconds, interval = float(sys.argv[1]), float(sys.argv[2])
psutil.cpu_percent(percpu=True)
end = time.monotonic() + seconds
due = time.monotonic()
while time.monotonic() < end:
    psutil.cpu_percent(percpu=True)
    psutil.virtual_memory()
    psutil.swap_memory()
    psutil.disk_io_counters()
    psutil.net_io_counters()
    for part in psutil.disk_partitions():
        try:
            psutil.disk_usage(part.mountpoint)
        except OSError:
            pass
    psutil.getloadavg()
    procs = [p.info for p in psutil.process_iter(["cpu_percent", "memory_info"])]
    due += interval
    time.sleep(max(0.0, due - time.monotonic()))
"""


class _Sink(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.cpu_ms: list[float] = []
        self.rss: list[int] = []
        self.dropped = 0
        self.count = 0
        self.lock = threading.Lock()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Sink

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        report = decode_report(body)
        with self.server.lock:
            self.server.count += 1
            self.server.cpu_ms.append(report.agent.cpu_ms)
            self.server.rss.append(report.agent.rss_bytes)
            self.server.dropped = report.agent.dropped_reports
        payload = b'{"accepted": 1}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def uss_bytes(pid: int) -> int:
    """Private (unshared) memory: what ending the process would give back."""
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1]) * 1024
    return total


def in_process_cycle_us(n: int = 2000) -> dict[str, float]:
    """Mean wall time of one sampling cycle, measured in this process."""
    import psutil

    from cloudmon_agent.agent import Agent
    from cloudmon_agent.collectors.host import HostCollector
    from cloudmon_agent.config import AgentConfig
    from cloudmon_agent.schema import encode

    out: dict[str, float] = {}
    host = HostCollector()
    host.prime()
    t = time.perf_counter()
    for _ in range(n):
        host.collect()
    out["HostCollector.collect()"] = (time.perf_counter() - t) / n * 1e6
    host.close()

    with tempfile.TemporaryDirectory() as tmp, Agent(AgentConfig(state_dir=tmp, node_id="bench")) as agent:
        agent.prime()
        t = time.perf_counter()
        for _ in range(n):
            encode(agent.sample())
        out["Agent.sample() + encode"] = (time.perf_counter() - t) / n * 1e6

    psutil.cpu_percent(percpu=True)
    m = max(1, n // 20)
    t = time.perf_counter()
    for _ in range(m):
        psutil.cpu_percent(percpu=True)
        psutil.virtual_memory()
        psutil.swap_memory()
        psutil.disk_io_counters()
        psutil.net_io_counters()
        for part in psutil.disk_partitions():
            with contextlib.suppress(OSError):
                psutil.disk_usage(part.mountpoint)
        psutil.getloadavg()
        [p.info for p in psutil.process_iter(["cpu_percent", "memory_info"])]
    out["naive psutil cycle"] = (time.perf_counter() - t) / m * 1e6
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="measured duration (default 60)")
    ap.add_argument("--interval", type=float, default=1.0, help="sampling interval (default 1)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds excluded at the start (default 3)")
    args = ap.parse_args()

    sink = _Sink()
    sink_thread = threading.Thread(target=sink.serve_forever, args=(0.2,), name="bench-sink")
    sink_thread.start()
    url = f"http://127.0.0.1:{sink.server_address[1]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDMON_")}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        env["XDG_CONFIG_HOME"] = tmp
        try:
            total = args.warmup + args.seconds + 2
            procs["cloudmon-agent"] = subprocess.Popen(
                [sys.executable, "-m", "cloudmon_agent", "--collector", url, "--token", "bench",
                 "--interval", str(args.interval), "--state-dir", tmp, "--log-level", "WARNING"],
                env=env,
            )  # fmt: skip
            procs["naive psutil loop"] = subprocess.Popen(
                [sys.executable, "-c", NAIVE_LOOP, str(total), str(args.interval)], env=env
            )
            time.sleep(args.warmup)  # let both import and prime: startup is not steady-state cost
            start_ticks = {name: cpu_ticks(p.pid) for name, p in procs.items()}
            rss: dict[str, list[int]] = {name: [] for name in procs}
            uss: dict[str, list[int]] = {name: [] for name in procs}
            with sink.lock:
                first_report = sink.count
            t0 = time.monotonic()
            while (elapsed := time.monotonic() - t0) < args.seconds:
                for name, p in procs.items():
                    rss[name].append(rss_bytes(p.pid))
                    uss[name].append(uss_bytes(p.pid))
                time.sleep(min(1.0, args.seconds - elapsed))
            elapsed = time.monotonic() - t0
            end_ticks = {name: cpu_ticks(p.pid) for name, p in procs.items()}
        finally:
            for p in procs.values():
                p.terminate()
            for p in procs.values():
                p.wait(timeout=15)
            sink.shutdown()
            sink.server_close()
            sink_thread.join()

    cycles = elapsed / args.interval
    print(f"\n{args.seconds:g} s measured after {args.warmup:g} s warm-up, interval {args.interval:g} s, "
          f"{os.cpu_count()} CPUs, {len(os.listdir('/proc'))} /proc entries\n")  # fmt: skip
    header = (
        f"{'process':<20} {'CPU ms/cycle':>12} {'% of a core':>11} {'RSS mean MiB':>12} {'RSS max MiB':>11} "
        f"{'USS mean MiB':>12}"
    )
    print(header)
    print("-" * len(header))
    for name in procs:
        ms = (end_ticks[name] - start_ticks[name]) * 1000 / CLK_TCK / cycles
        pct = ms / (args.interval * 1000) * 100
        mean_mib = statistics.fmean(rss[name]) / 2**20
        max_mib = max(rss[name]) / 2**20
        uss_mib = statistics.fmean(uss[name]) / 2**20
        print(f"{name:<20} {ms:>12.2f} {pct:>10.3f}% {mean_mib:>12.1f} {max_mib:>11.1f} {uss_mib:>12.1f}")
    with sink.lock:
        reported = sink.cpu_ms[first_report:]
        print(
            f"\nagent self-report (AgentStats): {sink.count} reports received, cpu_ms mean "
            f"{statistics.fmean(reported) if reported else float('nan'):.2f}, "
            f"max {max(reported) if reported else float('nan'):.2f}; dropped_reports {sink.dropped}"
        )
    print("\none cycle in-process (mean wall time):")
    for what, us in in_process_cycle_us().items():
        print(f"  {what:<26} {us:>9.1f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
