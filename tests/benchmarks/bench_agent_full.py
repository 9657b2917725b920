"""What the full agent (host + processes + containers + 10 VMs) costs, beside two reference monitors.

    .venv/bin/python tests/benchmarks/bench_agent_full.py [--seconds 60] [--interval 1]

Runs side by side, in one run:

- ``cloudmon-agent (host only)``: the agent with just the host collector;
- ``cloudmon-agent (no-vms)``: host + top processes + containers + GPUs,
  without libvirt (what a node without VMs pays);
- ``cloudmon-agent (full)``: host + top processes + containers (cgroups) +
  VMs from libvirt's test driver with a custom host of 10 running domains
  (``tests/unit/agent/data/libvirt-test-10vms.xml``) + GPUs where NVML works,
  under the default 1 ms CPU budget; both post every report to a minimal HTTP
  sink in this process;
- the naive psutil loop of ``bench_agent.py`` (with ``process_iter``);
- ``prometheus-node-exporter`` (Debian package, default collectors) on a free
  loopback port, scraped once a second from this process (the scraper's CPU
  is not counted, the exporter's is).

CPU per cycle comes from ``/proc/PID/stat`` (utime + stime) after a warm-up;
RSS, PSS and USS (``/proc/PID/smaps_rollup``) are sampled once a second.  Then one in-process breakdown of where the
full agent's cycle goes, per collector (``time.thread_time``).  Prints
figures; asserts nothing.  Linux only.
"""

from __future__ import annotations

import argparse
import http.server
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgspec

from cloudmon_agent.schema import Report, decode_report

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make ``tests.benchmarks`` importable
    sys.path.insert(0, str(ROOT))

from tests.benchmarks.bench_agent import CLK_TCK, NAIVE_LOOP, cpu_ticks, rss_bytes, uss_bytes  # noqa: E402

TEN_VMS = ROOT / "tests" / "unit" / "agent" / "data" / "libvirt-test-10vms.xml"
NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"

#: The agent process: the real command line (``cloudmon_agent.cli.main``), so the
#: benchmark measures what a node runs, start-up choices (lazy imports, gc.freeze) included.
AGENT = r"""
import sys
from cloudmon_agent.cli import main

url, interval, state, mode, uri = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
args = ["--collector", url, "--token", "bench", "--interval", interval, "--state-dir", state,
        "--node-id", "bench-" + mode, "--log-level", "WARNING"]
if mode == "full":
    args += ["--libvirt-uri", uri]
elif mode == "no-vms":
    args += ["--libvirt-uri", ""]
else:
    args += ["--libvirt-uri", "", "--top-n", "0", "--no-containers", "--no-gpus", "--budget-ms", "0"]
sys.exit(main(args))
"""
#: Agent rows: host collector only; everything but VMs (no libvirt loaded); everything.
MODES = ("host", "no-vms", "full")


class _Sink(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.last: dict[str, Report] = {}
        self.count: dict[str, int] = {}
        self.self_cpu: dict[str, list[float]] = {}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Sink

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        raws = msgspec.json.decode(body, type=list[msgspec.Raw]) if body[:1] == b"[" else [body]
        with self.server.lock:
            for raw in raws:
                r = decode_report(bytes(raw))
                self.server.last[r.node_id] = r
                self.server.count[r.node_id] = self.server.count.get(r.node_id, 0) + 1
                self.server.self_cpu.setdefault(r.node_id, []).append(r.agent.cpu_ms)
        payload = b'{"accepted": %d}' % len(raws)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages divided among the processes that map them."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                resp.read()
                return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


def in_process_breakdown(cycles: int = 200) -> list[tuple[str, float, int]]:
    """Mean CPU ms per cycle of each collector of the full agent, measured in this process."""
    from cloudmon_agent.budget import BudgetPolicy, apply_budget
    from cloudmon_agent.collectors import CollectorOptions, default_collectors

    # Budget off here so every collector runs every cycle (or on its own schedule).
    # processes_every_s=0: the process scan runs every cycle here, so its row is the cost of one scan.
    cols = default_collectors(
        CollectorOptions(libvirt_uri=f"test://{TEN_VMS}", budget_ms=0, processes_every_s=0.0)
    )
    policy = BudgetPolicy(1e9)  # measuring only: never throttles
    wrapped = apply_budget(cols, policy)
    try:
        for c in wrapped:
            c.prime()
        spent: dict[str, float] = {}
        for _ in range(cycles):
            for c in wrapped:
                t0 = time.thread_time()
                c.collect()
                spent[c.field] = spent.get(c.field, 0.0) + time.thread_time() - t0
        return [(field, s * 1000 / cycles, cycles) for field, s in spent.items()]
    finally:
        for c in wrapped:
            c.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="measured duration (default 60)")
    ap.add_argument("--interval", type=float, default=1.0, help="sampling interval (default 1)")
    ap.add_argument("--warmup", type=float, default=4.0, help="seconds excluded at the start (default 4)")
    args = ap.parse_args()

    sink = _Sink()
    sink_thread = threading.Thread(target=sink.serve_forever, args=(0.2,), name="bench-sink")
    sink_thread.start()
    url = f"http://127.0.0.1:{sink.server_address[1]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDMON_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    procs: dict[str, subprocess.Popen[bytes]] = {}
    scrapes = 0
    stop_scraper = threading.Event()
    with tempfile.TemporaryDirectory() as tmp:
        env["XDG_CONFIG_HOME"] = tmp
        try:
            total = args.warmup + args.seconds + 5
            for mode in MODES:
                state = os.path.join(tmp, mode)
                procs[f"cloudmon-agent ({mode})"] = subprocess.Popen(
                    [sys.executable, "-c", AGENT, url, str(args.interval), state, mode, f"test://{TEN_VMS}"],
                    env=env,
                )
            procs["naive psutil loop"] = subprocess.Popen(
                [sys.executable, "-c", NAIVE_LOOP, str(total), str(args.interval)], env=env
            )
            scraper: threading.Thread | None = None
            if shutil.which(NODE_EXPORTER):
                port = free_port()
                procs["node_exporter"] = subprocess.Popen(
                    [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{port}"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    cwd=tmp,
                )
                metrics = f"http://127.0.0.1:{port}/metrics"
                wait_http(metrics, 15)

                def scrape() -> None:
                    nonlocal scrapes
                    due = time.monotonic()
                    while not stop_scraper.is_set():
                        try:
                            with urllib.request.urlopen(metrics, timeout=5) as resp:
                                resp.read()
                            scrapes += 1
                        except OSError:
                            pass
                        due += args.interval
                        stop_scraper.wait(max(0.0, due - time.monotonic()))

                scraper = threading.Thread(target=scrape, name="bench-scraper")
                scraper.start()
            else:
                print(f"{NODE_EXPORTER} not found: node_exporter row skipped")
            time.sleep(args.warmup)  # startup is not steady-state cost
            start_ticks = {name: cpu_ticks(p.pid) for name, p in procs.items()}
            rss: dict[str, list[int]] = {name: [] for name in procs}
            uss: dict[str, list[int]] = {name: [] for name in procs}
            pss: dict[str, list[int]] = {name: [] for name in procs}
            t0 = time.monotonic()
            while (elapsed := time.monotonic() - t0) < args.seconds:
                for name, p in procs.items():
                    rss[name].append(rss_bytes(p.pid))
                    uss[name].append(uss_bytes(p.pid))
                    pss[name].append(pss_bytes(p.pid))
                time.sleep(min(1.0, args.seconds - elapsed))
            elapsed = time.monotonic() - t0
            end_ticks = {name: cpu_ticks(p.pid) for name, p in procs.items()}
        finally:
            stop_scraper.set()
            if scraper is not None:
                scraper.join()
            for p in procs.values():
                p.terminate()
            for p in procs.values():
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            sink.shutdown()
            sink.server_close()
            sink_thread.join()

    cycles = elapsed / args.interval
    nprocs = sum(1 for e in os.listdir("/proc") if e.isdigit())
    print(
        f"\n{args.seconds:g} s measured after {args.warmup:g} s warm-up, interval {args.interval:g} s, "
        f"{os.cpu_count()} CPUs, {nprocs} processes, load average {os.getloadavg()[0]:.2f}, "
        f"node_exporter scraped {scrapes} times\n"
    )
    header = (
        f"{'process':<26} {'CPU ms/cycle':>12} {'% of a core':>11} {'RSS mean MiB':>12} {'RSS max MiB':>11} "
        f"{'PSS mean MiB':>12} {'USS mean MiB':>12}"
    )
    print(header)
    print("-" * len(header))
    for name in procs:
        ms = (end_ticks[name] - start_ticks[name]) * 1000 / CLK_TCK / cycles
        pct = ms / (args.interval * 1000) * 100
        print(
            f"{name:<26} {ms:>12.2f} {pct:>10.3f}% {statistics.fmean(rss[name]) / 2**20:>12.1f} "
            f"{max(rss[name]) / 2**20:>11.1f} {statistics.fmean(pss[name]) / 2**20:>12.1f} "
            f"{statistics.fmean(uss[name]) / 2**20:>12.1f}"
        )
    print("\n(/proc CPU ticks are 10 ms each: over 30 s, ±0.3 ms/cycle of resolution per row)")
    with sink.lock:
        for node, r in sorted(sink.last.items()):
            cpu = sink.self_cpu[node][2:] or [0.0]
            line = (
                f"\n{node}: {sink.count[node]} reports; self-reported cpu_ms mean {statistics.fmean(cpu):.2f}, "
                f"max {max(cpu):.2f}; last report: {len(r.vms)} VMs, {len(r.containers)} containers, "
                f"{len(r.gpus)} GPUs, processes "
                f"{'-' if r.processes is None else f'{r.processes.count} (age {r.processes.age_s:.1f} s)'}"
            )
            print(line)
            if r.budget is not None:
                thr = ", ".join(
                    f"{t.collector} every {t.period} ({t.cost_ms:.2f} ms/run)" for t in r.budget.throttled
                )
                print(
                    f"  budget {r.budget.budget_ms:g} ms, expected {r.budget.expected_ms:.2f} ms/cycle; "
                    f"throttled: {thr or 'none'}"
                )
    print("\nwhere the full agent's cycle goes (in-process, CPU ms per cycle, mean of 200 cycles):")
    for field, ms, _ in in_process_breakdown():
        note = "  (one scan; runs every 5 s by default: /5 per cycle)" if field == "processes" else ""
        print(f"  {field:<12} {ms:>8.3f} ms{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
