"""Throughput of the shared Redis ingest queue (``cloudmon.collector.queue``), in-process.

    .venv/bin/python -m tests.benchmarks.bench_queue [REPORTS] [CONCURRENCY]

Starts a private redis-server, one ``SharedQueue`` on an asyncio loop with a real
embedded store in a tmp dir, and appends REPORTS one-report requests from
CONCURRENCY concurrent tasks (as concurrent agent requests would), 45 metrics
each.  Prints appends per second (XADD acknowledged: what bounds the HTTP
answer) and reports per second until all are stored and acknowledged.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from cloudmon.collector.queue import LiveReport, SharedQueue
from cloudmon.collector.stream import StreamHub
from cloudmon.model.cluster import ClusterModel
from cloudmon.store import Sample, open_store
from tests.servers import RedisServer


async def _run(url: str, store_url: str, n: int, concurrency: int) -> None:
    store = open_store(store_url)
    queue = SharedQueue(url, store, ClusterModel(), StreamHub(), max_pending=10 * n, max_entries=10 * n)
    await queue.start()
    t0 = float(int(time.time())) - 3600
    nodes = 1000
    values = {f"m.{k}": float(k) for k in range(45)}

    async def worker(w: int) -> None:
        for i in range(w, n, concurrency):
            node = f"node-{i % nodes}"
            ts = t0 + i // nodes
            ok = await queue.append([Sample(node, ts, values)], [LiveReport(node, node, ts, 1.0, values, {})])
            assert ok

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    appended = time.perf_counter() - start
    while queue.stats().written < n:
        await asyncio.sleep(0.05)
    stored = time.perf_counter() - start
    await queue.close()
    store.close()
    print(f"{n} reports x 45 metrics, {concurrency} concurrent appends")
    print(f"  appended (XADD acknowledged): {n / appended:,.0f} reports/s")
    print(f"  stored and acknowledged:      {n / stored:,.0f} reports/s ({n * 45 / stored:,.0f} values/s)")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    concurrency = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer.start(Path(tmp) / "redis")
        try:
            asyncio.run(_run(server.url, f"sqlite:///{Path(tmp) / 'bench.db'}", n, concurrency))
        finally:
            server.close()


if __name__ == "__main__":
    main()
