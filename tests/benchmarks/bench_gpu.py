"""The GPU collector against a real NVIDIA card: what it reports and what it costs.

    python tests/benchmarks/bench_gpu.py [--out DIR]

Times ``GpuCollector.collect()`` (one NVML round per GPU: memory, utilization,
temperature, power, compute and graphics processes) idle, then while a child
process does matrix products with PyTorch (when importable), and writes the
agent's own ``cloudmon-agent --once`` report taken under that load to
``DIR/report-load.json``.  Prints figures; asserts nothing.  Without NVML or a
GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import msgspec

from cloudmon_agent.collectors.gpus import GpuCollector, open_nvml
from cloudmon_agent.schema import decode_report

#: A child process that keeps the GPU busy with matrix products; prints "ready" once it runs.
GPU_LOAD = """
import sys, time
import torch
x = torch.randn(8192, 8192, device="cuda")
y = x @ x
torch.cuda.synchronize()
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    y = x @ x
    torch.cuda.synchronize()
"""


def _time(c: GpuCollector, n: int) -> tuple[float, float]:
    cpu: list[float] = []
    for _ in range(n):
        t0 = time.process_time_ns()
        c.collect()
        cpu.append((time.process_time_ns() - t0) / 1e6)
    return statistics.mean(cpu), max(cpu)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".", help="where report-load.json goes")
    args = ap.parse_args()
    nvml = open_nvml()
    if nvml is None:
        print("no NVML or no NVIDIA GPU here: the agent reports no GPU section")
        return 0
    c = GpuCollector(nvml)
    try:
        mean, worst = _time(c, 200)
        print(f"idle: collect() CPU {mean:.3f} ms mean, {worst:.3f} ms max over 200 calls")
        print("idle gpus:", msgspec.json.encode(c.collect()).decode())
        try:
            import torch  # noqa: F401
        except ImportError:
            print("no PyTorch here: no load run")
            return 0
        load = subprocess.Popen([sys.executable, "-c", GPU_LOAD, "30"], stdout=subprocess.PIPE, text=True)
        try:
            assert load.stdout is not None
            load.stdout.readline()
            time.sleep(3)  # NVML's utilization is an average over the last sample period
            mean, worst = _time(c, 200)
            print(
                f"loaded (pid {load.pid}): collect() CPU {mean:.3f} ms mean, {worst:.3f} ms max over 200 calls"
            )
            print("loaded gpus:", msgspec.json.encode(c.collect()).decode())
            rep = subprocess.run(
                [sys.executable, "-m", "cloudmon_agent", "--once", "--libvirt-uri", ""],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            path = os.path.join(args.out, "report-load.json")
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(rep.stdout)
            if rep.returncode != 0:
                print("cloudmon-agent --once failed:", rep.stderr[-2000:])
            else:
                doc = json.loads(rep.stdout)
                # The agent command encodes with its own (lite) wire; the collector's msgspec checks it.
                checked = decode_report(rep.stdout)
                print(f"the collector's schema accepts the report: {len(checked.gpus)} GPU(s)")
                print("cloudmon-agent --once gpus:", json.dumps(doc.get("gpus"), indent=1))
                print("agent section:", json.dumps(doc.get("agent")))
        finally:
            load.kill()
            load.wait(timeout=30)
    finally:
        c.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
