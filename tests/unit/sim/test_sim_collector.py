"""Simulated hosts take commands from a real collector over real HTTP, and report their results.

The collector runs in-process (:class:`CollectorThread`, real aiohttp server,
real embedded store); commands go in through its real :class:`CommandQueue`,
exactly as the plan executor and the API submit them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloudmon.collector import CollectorThread
from cloudmon.config import Config
from cloudmon.sim import Simulator, Workload
from cloudmon.sim.simulator import migrate_uri
from cloudmon.store import open_store

TOKEN = "sim-unit-token"


def wait_until(cond: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[CollectorThread]:
    before = set(threading.enumerate())
    store = open_store(f"sqlite:///{tmp_path / 'telemetry.db'}")
    ct = CollectorThread(Config(listen_port=0, data_dir=str(tmp_path / "data"), control=False), store, TOKEN)
    try:
        ct.start()
        yield ct
    finally:
        ct.close()
        store.close()
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not left, f"threads left running: {[t.name for t in left]}"


@pytest.fixture
def sim(collector: CollectorThread) -> Iterator[Simulator]:
    s = Simulator(collector.url, TOKEN, interval_s=0.1)
    s.add_host("a", vcpus=8, memory_mib=16384)
    s.add_host("b", vcpus=8, memory_mib=16384)
    s.add_vm("a", "db", 2, 2048, Workload.constant(50))
    # A group instance too: its report shares the hosts' batch, as in the demo.
    s.set_workload("web", Workload.constant(30))
    s.add_instance("web-1", "web", "b", vcpus=1, memory_mib=1024)
    try:
        s.start()
        model = collector.collector.model
        wait_until(
            lambda: {"sim-a", "sim-b", "sim-web-1"} <= {n.node_id for n in model.nodes()}, 20, "first reports"
        )
        yield s
    finally:
        s.close()


def test_a_vm_migrates_through_the_collector_and_the_reports_follow(
    collector: CollectorThread, sim: Simulator
) -> None:
    queue = collector.collector.commands
    model = collector.collector.model
    assert model.get("sim-b") is not None
    assert model.get("sim-b").info["migrate_uri"] == migrate_uri("sim-b")  # type: ignore[union-attr]

    before = queue.submit("sim-b", "vm.state", {"vm": "db"}, timeout_s=30)
    result = before.wait(30)
    assert result is not None, before
    assert result.ok, result.error
    assert result.detail == {"vm": "db", "state": "missing"}

    handle = queue.submit("sim-a", "vm.migrate", {"vm": "db", "dest_uri": migrate_uri("sim-b")}, timeout_s=60)
    percents: list[float] = []
    seen = handle.version
    while not handle.finished:
        handle.wait(30, since_version=seen)
        seen = handle.version
        if "percent" in handle.progress:
            percents.append(float(handle.progress["percent"]))
    assert handle.ok, handle.result
    assert handle.result is not None
    assert handle.result.detail["dest_uri"] == "sim+migrate://sim-b"
    assert percents, "no progress was reported while it migrated"
    assert percents == sorted(percents)

    def on(node: str) -> bool:
        n = model.get(node)
        return n is not None and "vm.db.mem_max" in n.latest

    wait_until(lambda: on("sim-b") and not on("sim-a"), 20, "db in sim-b's report and not in sim-a's")
    after = queue.submit("sim-b", "vm.state", {"vm": "db"}, timeout_s=30).wait(30)
    assert after is not None
    assert after.detail == {"vm": "db", "state": "running"}
    # The collector acknowledged every result: the simulator stops repeating them.
    wait_until(lambda: not sim.pending_results("sim-a") and not sim.pending_results("sim-b"), 20, "acks")
    assert sim.stats.commands_taken == 3


def test_an_action_the_simulator_cannot_run_fails_with_the_reason(
    collector: CollectorThread, sim: Simulator
) -> None:
    queue = collector.collector.commands
    create = queue.submit("sim-a", "vm.create", {"name": "new"}, timeout_s=30)
    on_guest = queue.submit("sim-web-1", "vm.state", {"vm": "db"}, timeout_s=30)
    for handle in (create, on_guest):
        result = handle.wait(30)
        assert result is not None, handle
        assert not result.ok
    assert "not supported by simulated node sim-a" in (create.result.error or "")  # type: ignore[union-attr]
    assert "send VM actions to its host sim-b" in (on_guest.result.error or "")  # type: ignore[union-attr]
