"""The store's Redis server goes away for 20 s and comes back: nothing is lost.

A collector process writes to ``--store redis://…`` on a private redis-server
(append-only file on, so the restarted server has what was written before).
A scripted poster keeps reporting (known ``(node, ts)`` pairs; what is refused
is kept and resent, like an agent's spool).  While the server is down the
collector keeps accepting reports into its bounded write queue, answers 503
once the bound is reached, and reports ``degraded``; once the server is back
it writes everything, exactly once, and is no longer degraded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudmon.client import ApiClient
from cloudmon.store import BACKENDS, TelemetryStore, open_store
from tests.integration.conftest import StartCollectorProcess, wait_until
from tests.integration.poster import Poster, check_rollups, stored_values, value
from tests.servers import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.outage]

NODES = [f"node-{i:02d}" for i in range(8)]
OUTAGE_S = 20.0
#: Batches (every node at one ts) posted per second: 80 reports/s.
RATE = 10.0
#: Small enough that the outage fills it: the bound must turn into 503s, not memory.
WRITE_QUEUE_MAX = 400


@pytest.fixture
def redis_srv(tmp_path: Path) -> Iterator[RedisServer]:
    if "redis" not in BACKENDS:
        pytest.skip("needs the redis:// store backend (cloudmon.store.redis)")
    server = RedisServer.start(tmp_path / "redis", appendonly=True)
    try:
        yield server
    finally:
        server.close()


def _post_for(poster: Poster, url: str, seconds: float, on_step: object = None) -> None:
    """Post new batches at ``RATE`` per second for ``seconds`` (the test's clock, not a readiness wait)."""
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < seconds:
        poster.step(url)
        n += 1
        if callable(on_step):
            on_step()
        ahead = start + n / RATE - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


def test_store_outage_loses_nothing(
    tmp_path: Path, redis_srv: RedisServer, start_collector_process: StartCollectorProcess
) -> None:
    store_url = redis_srv.url
    cfg = tmp_path / "cloudmon.toml"
    cfg.write_text(f"write_queue_max = {WRITE_QUEUE_MAX}\n")
    c = start_collector_process(data_dir=tmp_path / "c", extra=("--store", store_url, "--config", str(cfg)))
    api = ApiClient(c.url, c.token)
    t0 = float(int(time.time())) - 3600
    poster = Poster(NODES, t0, c.token)
    store: TelemetryStore | None = None
    try:
        _post_for(poster, c.url, 2.0)
        assert poster.statuses == {200: poster.next_index}
        wait_until(lambda: api.status()["write_queue"] == 0, 15, "first reports written", c)
        assert api.status()["degraded"] is False

        redis_srv.stop()
        before = set(poster.accepted)
        seen_degraded: list[bool] = []
        _post_for(poster, c.url, OUTAGE_S, lambda: seen_degraded.append(bool(api.status()["degraded"])))
        during = poster.accepted - before
        status = api.status()
        assert any(seen_degraded), "status never showed degraded while the store was down"
        assert status["degraded"] is True
        assert status["store_errors"] > 0
        # The bounded buffer took reports while the store was down, then refused (503) the rest.
        assert during, "nothing was accepted during the outage"
        assert poster.statuses.get(503, 0) > 0, "the write queue bound was never reached"
        assert status["write_queue"] <= WRITE_QUEUE_MAX
        assert status["reports_rejected"].get("queue_full", 0) > 0

        redis_srv.restart()
        wait_until(lambda: api.status()["degraded"] is False, 60, "the collector to recover", c)
        # The poster's backlog (what was refused) goes in now, plus a little more.
        while poster.backlog:
            poster.resend(c.url)
            if poster.backlog:
                wait_until(lambda: api.status()["write_queue"] < WRITE_QUEUE_MAX // 2, 30, "queue room", c)
        _post_for(poster, c.url, 1.0)
        assert not poster.backlog
        total = poster.next_index
        assert poster.accepted == set(range(total))
        wait_until(lambda: api.status()["write_queue"] == 0, 30, "everything written", c)

        store = open_store(store_url)
        want = {t0 + i: value(i) for i in range(total)}
        for n in NODES:
            assert stored_values(store, n, t0, t0 + total) == want
            check_rollups(store, n, t0, total)
        final = api.status()
        assert final["degraded"] is False
        assert final["dropped"] == 0
        assert final["samples_written"] == total * len(NODES)
    finally:
        api.close()
        if store is not None:
            store.close()
