"""What the full agent (host + processes + containers + 10 VMs) costs, beside two reference monitors.

    .venv/bin/python -m tests.benchmarks.bench_agent_full [--seconds 60] [--interval 1]

The agent rows run the agent as a node runs it: the ``cloudmon-agent`` command
line in a virtual environment holding only what the agent package installs
(``psutil``, ``msgspec`` and the agent), on the system's ``python3`` (Debian's,
what the package's venv uses; this environment's interpreter where the system one
has another version).  Side by side, in one run:

- ``cloudmon-agent (host)``: just the host collector;
- ``cloudmon-agent (no-vms)``: host + top processes + containers + GPUs,
  without VMs (what a node without VMs pays);
- ``cloudmon-agent (full)``: host + top processes + containers (cgroups) +
  10 VMs + GPUs where NVML works, under the default 1 ms CPU budget.  The VMs
  are libvirt's test driver with a custom host of 10 running domains
  (``tests/unit/agent/data/libvirt-test-10vms.xml``) served by a real
  ``libvirtd`` that the benchmark starts (tests/integration/vmhost.py, needs
  root), read as on a VM host: over the daemon's Unix socket with the agent's
  own RPC client (:mod:`cloudmon_agent.collectors.virtrpc`).  The test driver
  has no bulk statistics beyond the state, so each VM run also asks 4
  per-domain questions of each domain (a real QEMU host answers one bulk call);
- ``cloudmon-agent (libvirt-python)``: the full agent of this repository's
  ``.venv`` with the same 10 domains through libvirt-python and the in-process
  ``test:///`` driver (what ``import libvirt`` costs);
- ``libvirtd (serving the full agent)``: the daemon's CPU, for the record;
- the naive psutil loop of ``bench_agent.py`` (with ``process_iter``), on the
  same interpreter as the agent rows;
- ``prometheus-node-exporter`` (Debian package, default collectors) on a free
  loopback port, scraped once a second from this process (the scraper's CPU
  is not counted, the exporter's is).

CPU per cycle is the sum over a process's threads of ``/proc/PID/task/*/schedstat``
(nanoseconds on the CPU) over the measured window, after a warm-up that lets the
budget settle; RSS, PSS and USS (``/proc/PID/smaps_rollup``) are sampled once a
second.  Then one in-process breakdown of where the full agent's cycle goes, per
collector (``time.thread_time``).  Prints figures; asserts nothing.  Linux only.
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

from tests.benchmarks.bench_agent import NAIVE_LOOP, rss_bytes, uss_bytes  # noqa: E402

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
if mode in ("full", "libvirt-python"):
    args += ["--libvirt-uri", uri]
elif mode == "no-vms":
    args += ["--libvirt-uri", ""]
else:
    args += ["--libvirt-uri", "", "--top-n", "0", "--no-containers", "--no-gpus", "--budget-ms", "0"]
sys.exit(main(args))
"""


def deployed_python(where: Path) -> tuple[str, str]:
    """A venv like the agent package's: system python3 (same minor version) + psutil + the agent.

    msgspec is copied in too, as on a node that has it: the agent command does
    not load it (:mod:`cloudmon_agent.wire`).

    Returns (interpreter, description).  Falls back to this interpreter when a venv cannot be made.
    """
    import importlib.util

    want = f"{sys.version_info.major}.{sys.version_info.minor}"
    base = shutil.which("python3", path="/usr/bin") or ""
    try:
        ver = (
            subprocess.run(
                [base, "-c", "import sys; print(f'{sys.version_info.major}.{sys.version_info.minor}')"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.strip()
            if base
            else ""
        )
    except (OSError, subprocess.SubprocessError):
        ver = ""
    if ver != want:
        base = getattr(sys, "_base_executable", sys.executable)
    venv = where / "agent-venv"
    try:
        subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120,
                       capture_output=True)  # fmt: skip
        py = str(venv / "bin" / "python")
        site = subprocess.run(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        return sys.executable, f"{sys.executable} (no separate venv: {exc})"
    for mod in ("psutil", "msgspec"):
        spec = importlib.util.find_spec(mod)
        assert spec is not None
        assert spec.submodule_search_locations
        shutil.copytree(next(iter(spec.submodule_search_locations)), Path(site) / mod)
    # Installed as pip installs it: the package in site-packages, compiled to bytecode.
    # (Run from source without __pycache__, as PYTHONDONTWRITEBYTECODE=1 does, every
    # start compiles all its modules, and the compiler's leftovers cost ≈2 MiB of RSS
    # that no installed agent has.)
    shutil.copytree(ROOT / "agents" / "cloudmon_agent", Path(site) / "cloudmon_agent",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    subprocess.run(
        [py, "-m", "compileall", "-q", str(Path(site))], check=True, timeout=300, capture_output=True
    )
    full = subprocess.run([py, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True,
                          text=True, timeout=30, check=False).stdout.strip()  # fmt: skip
    return py, f"{base} {full} + psutil + msgspec + cloudmon_agent (installed, compiled)"


def start_libvirtd() -> tuple[Any, str, int] | str:
    """A real libvirtd serving the 10 test-driver domains: (lab, URI, daemon pid), or why not."""
    from tests.integration import vmhost

    missing = [m for m in vmhost.missing_prerequisites() if "qemu" not in m.lower()]
    if missing:
        return f"cannot start libvirtd here ({', '.join(missing)})"
    lab = vmhost.VmLab(cgroups=False)
    try:
        host = lab.add_host("bench")
        lab.start()
    except Exception as exc:
        lab.close()
        return f"libvirtd did not start: {exc}"
    assert host.pid is not None
    return lab, f"test+unix://{TEN_VMS}?socket={host.socket_path}", host.pid


def tids(pid: int) -> frozenset[str]:
    try:
        return frozenset(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return frozenset()


def cpu_ns(pid: int) -> int:
    """Nanoseconds on the CPU of every live thread of ``pid`` (``/proc/PID/task/*/schedstat``)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as fh:
                total += int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


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
    ap.add_argument(
        "--warmup",
        type=float,
        default=30.0,
        help="seconds excluded at the start, for the budget to settle (default 30)",
    )
    args = ap.parse_args()

    sink = _Sink()
    sink_thread = threading.Thread(target=sink.serve_forever, args=(0.2,), name="bench-sink")
    sink_thread.start()
    url = f"http://127.0.0.1:{sink.server_address[1]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDMON_")}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    scrapes = 0
    window_from: dict[str, int] = {}
    stop_scraper = threading.Event()
    scraper: threading.Thread | None = None
    lab: Any = None
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        env["XDG_CONFIG_HOME"] = tmp_s
        dev_env = dict(env, PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
        # The libvirt-python row runs this checkout's agent: compiled first, like the others.
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "agents" / "cloudmon_agent")],
                       check=True, timeout=300, capture_output=True)  # fmt: skip
        try:
            py, py_text = deployed_python(tmp)
            print(f"agent rows: {py_text}")
            daemon = start_libvirtd()
            if isinstance(daemon, str):
                notes.append(f"full row skipped: {daemon}")
                daemon_uri = ""
            else:
                lab, daemon_uri, daemon_pid = daemon
            total = args.warmup + args.seconds + 5
            for mode in ("host", "no-vms", "full"):
                if mode == "full" and not daemon_uri:
                    continue
                procs[f"cloudmon-agent ({mode})"] = subprocess.Popen(
                    [py, "-c", AGENT, url, str(args.interval), str(tmp / mode), mode, daemon_uri], env=env
                )
            procs["cloudmon-agent (libvirt-python)"] = subprocess.Popen(
                [sys.executable, "-c", AGENT, url, str(args.interval), str(tmp / "lp"), "libvirt-python",
                 f"test://{TEN_VMS}"],
                env=dev_env,
            )  # fmt: skip
            procs["naive psutil loop"] = subprocess.Popen(
                [py, "-c", NAIVE_LOOP, str(total), str(args.interval)], env=env
            )
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
                notes.append(f"{NODE_EXPORTER} not found: node_exporter row skipped")
            watched = {name: p.pid for name, p in procs.items()}
            if daemon_uri:
                watched["libvirtd (serving the full agent)"] = daemon_pid
            time.sleep(args.warmup)  # startup and the budget's settling are not steady-state cost
            start_cpu = {name: cpu_ns(pid) for name, pid in watched.items()}
            with sink.lock:  # the agents' own figures over the same window
                window_from = {node: len(v) for node, v in sink.self_cpu.items()}
            start_tids = {name: tids(pid) for name, pid in watched.items()}
            rss: dict[str, list[int]] = {name: [] for name in watched}
            uss: dict[str, list[int]] = {name: [] for name in watched}
            pss: dict[str, list[int]] = {name: [] for name in watched}
            t0 = time.monotonic()
            while (elapsed := time.monotonic() - t0) < args.seconds:
                for name, pid in watched.items():
                    rss[name].append(rss_bytes(pid))
                    uss[name].append(uss_bytes(pid))
                    pss[name].append(pss_bytes(pid))
                time.sleep(min(1.0, args.seconds - elapsed))
            elapsed = time.monotonic() - t0
            end_cpu = {name: cpu_ns(pid) for name, pid in watched.items()}
            for name, pid in watched.items():
                if tids(pid) != start_tids[name]:
                    # schedstat sums live threads only: one that came or went skews the row.
                    notes.append(f"{name}: its threads changed during the window; its CPU row is approximate")
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
            if lab is not None:
                lab.close()
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
        f"{'process':<36} {'CPU ms/cycle':>12} {'% of a core':>11} {'RSS mean MiB':>12} {'RSS max MiB':>11} "
        f"{'PSS mean MiB':>12} {'USS mean MiB':>12}"
    )
    print(header)
    print("-" * len(header))
    for name in watched:
        ms = (end_cpu[name] - start_cpu[name]) / 1e6 / cycles
        pct = ms / (args.interval * 1000) * 100
        print(
            f"{name:<36} {ms:>12.3f} {pct:>10.3f}% {statistics.fmean(rss[name]) / 2**20:>12.1f} "
            f"{max(rss[name]) / 2**20:>11.1f} {statistics.fmean(pss[name]) / 2**20:>12.1f} "
            f"{statistics.fmean(uss[name]) / 2**20:>12.1f}"
        )
    for note in notes:
        print(note)
    with sink.lock:
        for node, r in sorted(sink.last.items()):
            cpu = sink.self_cpu[node][window_from.get(node, 2) :] or [0.0]
            line = (
                f"\n{node}: {sink.count[node]} reports; self-reported cpu_ms over the window: "
                f"mean {statistics.fmean(cpu):.2f}, "
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
    print(
        "\nwhere the full agent's cycle goes (in-process, CPU ms per cycle, mean of 200 cycles, libvirt-python):"
    )
    for field, ms, _ in in_process_breakdown():
        note = "  (one scan; runs every 5 s by default: /5 per cycle)" if field == "processes" else ""
        print(f"  {field:<12} {ms:>8.3f} ms{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
