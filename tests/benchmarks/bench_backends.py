"""Telemetry backends side by side: ingest rate and query latency (prints figures, asserts nothing).

    .venv/bin/python tests/benchmarks/bench_backends.py [--nodes 5000] [--seconds 72]
        [--batch 2500] [--backends redis,sqlite,mongodb]

Per backend, in one run:

(a) ingest: ``--nodes`` agents × ``--seconds`` of 1 Hz reports (45 metrics each) in
    time order, in batches of ``--batch`` (the collector's writer batches 1,000-5,000);
    only the time inside ``write_samples`` counts (it includes the rollup work: the run
    crosses a minute boundary plus the grace, so every node's first minute is rolled up
    inside it).  Reported as reports/s and values/s against the 5,000 reports/s target.
(b) 1 h of 1 s data of one node ending now (loaded for 10 nodes), queried at step 1 s:
    one metric and four metrics, median / p95 of 20 queries.
(c) 30 days of one node downsampled to ~1,000 points (step 2,592 s; served by the 1 min
    tier: ≈ 43,000 buckets read): the rollup tiers are seeded through ``write_samples``
    with one report (4 metrics) per minute over 30 days for 2 nodes, then ``flush()``.

Redis: a private redis-server started here (Debian's 7.0).  sqlite: the embedded
store in a temp dir.  MongoDB: only against a genuine server given by
``CLOUDMON_TEST_MONGO_URI`` (never through the pure-Python test server, whose figures
would mean nothing); skipped with a note otherwise.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from cloudmon.store import Sample, TelemetryStore, open_store
from tests.servers import RedisServer

NAMES = (
    ["cpu.percent", *(f"cpu.core.{i}" for i in range(16))]
    + ["mem.total", "mem.used", "mem.available", "mem.percent", "swap.total", "swap.used", "swap.percent"]
    + ["disk.read_bps", "disk.write_bps", "disk.read_iops", "disk.write_iops"]
    + ["net.rx_bps", "net.tx_bps", "net.rx_pps", "net.tx_pps", "load.1", "load.5", "load.15"]
    + ["agent.cpu_ms", "agent.rss_bytes", "agent.dropped_reports"]
    + [f"fs.{m}.{k}" for m in ("/", "/home") for k in ("used", "total", "percent")]
)
TARGET = 5000
# The 30-day seed carries 4 metrics (the query reads one): seeding 86,000 reports of 45 metrics
# through the rollup recomputation would take minutes and measure nothing the query depends on.
SEED_METRICS = ("cpu.percent", "mem.used", "net.rx_bps", "load.1")


def pool(rng: random.Random, size: int = 64) -> list[dict[str, float]]:
    return [{n: round(rng.uniform(0, 100), 2) for n in NAMES} for _ in range(size)]


def reports(nodes: int, start: int, seconds: int, values: list[dict[str, float]]) -> list[Sample]:
    return [
        Sample(f"node-{i:05d}", float(start + s), values[(i * 7 + s) % len(values)])
        for s in range(seconds)
        for i in range(nodes)
    ]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def bench(name: str, store: TelemetryStore, args: argparse.Namespace) -> None:
    rng = random.Random(1)
    values = pool(rng)
    now = int(time.time())
    # (a) ingest, starting on a minute boundary a while ago so the minute closes inside the run.
    start = (now - 3 * 3600) // 60 * 60
    data = reports(args.nodes, start, args.seconds, values)
    spent = 0.0
    for i in range(0, len(data), args.batch):
        batch = data[i : i + args.batch]
        t0 = time.perf_counter()
        store.write_samples(batch)
        spent += time.perf_counter() - t0
    rate = len(data) / spent
    verdict = "meets" if rate >= TARGET else f"{TARGET / rate:.1f}x short of"
    print(
        f"[{name}] ingest: {len(data):,} reports in batches of {args.batch}: {rate:,.0f} reports/s, "
        f"{rate * len(NAMES):,.0f} values/s ({verdict} the {TARGET:,} reports/s target)"
    )
    # (b) 1 h of 1 s data ending now.
    hstart = now - 3600
    for s in range(0, 3600, 60):
        store.write_samples(reports(10, hstart + s, 60, values))
    for metrics in (["cpu.percent"], ["cpu.percent", "mem.used", "net.rx_bps", "load.1"]):
        times = []
        for q in range(20):
            t0 = time.perf_counter()
            res = store.series(f"node-{q % 10:05d}", metrics, hstart, hstart + 3600, 1)
            times.append(time.perf_counter() - t0)
        got = sum(v is not None for v in res.metrics["cpu.percent"].avg)
        print(
            f"[{name}] 1 h at 1 s, {len(metrics)} metric(s) ({got} points, tier {res.tier}): "
            f"median {statistics.median(times) * 1000:.1f} ms, p95 {pct(times, 0.95) * 1000:.1f} ms"
        )
    # (c) 30 days, seeded with one report per minute (the 1 min and 1 h tiers get them all).
    t0 = time.perf_counter()
    month = 30 * 86400
    mstart = (now - month) // 3600 * 3600 + 3600
    seed = [
        Sample(f"month-{n}", float(t), {k: values[(t // 60) % len(values)][k] for k in SEED_METRICS})
        for t in range(mstart, now - 300, 60)
        for n in range(2)
    ]
    for i in range(0, len(seed), args.batch):
        store.write_samples(seed[i : i + args.batch])
    store.flush()
    print(f"[{name}] seeded 30 days x 2 nodes ({len(seed):,} reports) in {time.perf_counter() - t0:.1f} s")
    step = month / 1000
    times = []
    for q in range(10):
        t0 = time.perf_counter()
        res = store.series(f"month-{q % 2}", ["cpu.percent"], mstart, now, step)
        times.append(time.perf_counter() - t0)
    got = sum(v is not None for v in res.metrics["cpu.percent"].avg)
    print(
        f"[{name}] 30 days at {step:.0f} s ({len(res.timestamps)} points, {got} with data, tier {res.tier}): "
        f"median {statistics.median(times) * 1000:.1f} ms, p95 {pct(times, 0.95) * 1000:.1f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=5000)
    ap.add_argument("--seconds", type=int, default=72)
    ap.add_argument("--batch", type=int, default=2500)
    ap.add_argument("--backends", default="redis,sqlite,mongodb")
    args = ap.parse_args()
    wanted = args.backends.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as tmp:
        if "redis" in wanted:
            server = RedisServer.start(Path(tmp) / "redis")
            try:
                store = open_store(server.url)
                try:
                    bench("redis", store, args)
                finally:
                    store.close()
            finally:
                server.close()
        if "sqlite" in wanted:
            store = open_store(f"sqlite://{Path(tmp) / 'telemetry.db'}")
            try:
                bench("sqlite", store, args)
            finally:
                store.close()
        if "mongodb" in wanted:
            uri = os.environ.get("CLOUDMON_TEST_MONGO_URI")
            if not uri:
                print(
                    "[mongodb] skipped: set CLOUDMON_TEST_MONGO_URI to a genuine MongoDB (never benchmarked "
                    "through the pure-Python test server)"
                )
                return
            parts = urlsplit(uri)
            db = f"cloudmon_bench_{uuid.uuid4().hex[:8]}"
            store = open_store(urlunsplit(parts._replace(path=f"/{db}")))
            try:
                bench("mongodb", store, args)
            finally:
                store.close()
                import pymongo

                client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(uri)
                client.drop_database(db)
                client.close()


if __name__ == "__main__":
    main()
