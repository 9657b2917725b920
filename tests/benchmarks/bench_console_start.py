"""Benchmark: how long until the console shows its first node.

    .venv/bin/python -m tests.benchmarks.bench_console_start [--runs 5] [--importtime]

Launches ``python -m cloudmon --data-dir TMP --listen 127.0.0.1:0 --screenshot
TMP/x.png`` (offscreen) repeatedly and reports, from launch to the ``first
overview drawn`` log line: median, min and max, for

* cold: a fresh data directory each run (new store, token and agent id);
* warm: the same data directory again (store and token exist).

The wall time is measured here (launch to the line on stderr); the app's own
figure (seconds since its process started) is printed beside it.  With
``--importtime`` it also prints the slowest imports of one launch
(``python -X importtime``).  Prints; asserts nothing.  Target: ≤ 1.5 s.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LINE = re.compile(r"first overview drawn after ([0-9.]+) s")
TARGET_S = 1.5


def launch(data_dir: Path, shot: Path, extra: list[str] | None = None) -> tuple[float, float, str]:
    """One launch; returns (wall seconds to the line, the app's own figure, stderr)."""
    env = dict(os.environ)
    env.update(
        QT_QPA_PLATFORM="offscreen",
        XDG_CONFIG_HOME=str(data_dir.parent / "config"),
        XDG_STATE_HOME=str(data_dir.parent / "state"),
        CLOUDMON_LOG_LEVEL="INFO",
    )
    cmd = [sys.executable, *(extra or []), "-m", "cloudmon"]
    cmd += ["--data-dir", str(data_dir), "--listen", "127.0.0.1:0", "--screenshot", str(shot)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = app = float("nan")
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            m = LINE.search(line)
            if m and wall != wall:  # first match only (NaN check)
                wall = time.perf_counter() - t0
                app = float(m.group(1))
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return wall, app, "".join(lines)


def summary(name: str, walls: list[float], apps: list[float]) -> None:
    ok = [w for w in walls if w == w]
    if not ok:
        print(f"{name:6s} no run reached the first overview")
        return
    print(
        f"{name:6s} n={len(ok)}  wall median {statistics.median(ok):.3f} s  min {min(ok):.3f}  max {max(ok):.3f}"
        f"   | app-reported median {statistics.median(a for a in apps if a == a):.3f} s"
        f"   {'OK' if statistics.median(ok) <= TARGET_S else 'OVER'} (target {TARGET_S} s)"
    )


def importtime(tmp: Path) -> None:
    data = tmp / "imports"
    _, _, err = launch(data, tmp / "imports.png", ["-X", "importtime"])
    rows = []
    for line in err.splitlines():
        if line.startswith("import time:") and "|" in line:
            parts = line.split("|")
            try:
                rows.append((int(parts[1]), parts[2].rstrip()))
            except ValueError:
                continue
    print("\nslowest imports (cumulative µs):")
    for us, name in sorted(rows, reverse=True)[:25]:
        print(f"  {us / 1e6:7.3f} s  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--importtime", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cloudmon-bench-start-") as d:
        tmp = Path(d)
        # One throwaway launch so that .pyc files exist (an installed package has them).
        launch(tmp / "prime", tmp / "prime.png")
        cold_w, cold_a, warm_w, warm_a = [], [], [], []
        for i in range(args.runs):
            w, a, err = launch(tmp / f"cold{i}", tmp / f"cold{i}.png")
            if w != w:
                print(f"cold run {i} never drew the overview:\n{err[-2000:]}")
            cold_w.append(w)
            cold_a.append(a)
        warm_dir = tmp / "warm"
        launch(warm_dir, tmp / "warm0.png")  # creates the store, token and agent id
        for i in range(args.runs):
            w, a, _ = launch(warm_dir, tmp / f"warm{i + 1}.png")
            warm_w.append(w)
            warm_a.append(a)
        print(
            f"console start to first overview row ({args.runs} runs each, {sys.platform}, {os.cpu_count()} CPUs)"
        )
        summary("cold", cold_w, cold_a)
        summary("warm", warm_w, warm_a)
        if args.importtime:
            importtime(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
