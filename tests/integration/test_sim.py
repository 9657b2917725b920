"""Simulated nodes against a real collector: they appear through the API with their values, and
they carry out the collector's commands, so planned live migrations run end to end."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cloudmon.actions.migration import PlanExecutor
from cloudmon.client import ApiClient, ApiError
from cloudmon.collector import CollectorThread
from cloudmon.config import Config
from cloudmon.control.arbiter import Arbiter
from cloudmon.providers import LaunchRequest
from cloudmon.sim import SIM_OS, Simulator, Workload
from cloudmon.sim.demo import build_demo
from cloudmon.store import open_store
from tests.integration.conftest import INTEGRATION_TOKEN, StartCollectorProcess, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def api_for() -> Iterator[list[ApiClient]]:
    clients: list[ApiClient] = []
    yield clients
    for c in clients:
        c.close()


def _sim_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "cloudmon-sim"]


def test_simulated_nodes_report_their_values_to_a_real_collector(
    start_collector_process: StartCollectorProcess, api_for: list[ApiClient]
) -> None:
    collector = start_collector_process()
    api = ApiClient(collector.url, collector.token)
    api_for.append(api)
    sim = Simulator(collector.url, collector.token, interval_s=0.2)
    try:
        sim.add_host("rack-1", vcpus=8, memory_mib=16384)
        sim.add_host("rack-2", vcpus=8, memory_mib=16384)
        sim.set_workload("web", Workload.constant(90))
        sim.add_instance("web-1", "web", "rack-1", vcpus=2, memory_mib=1024)
        sim.add_instance("web-2", "web", "rack-2", vcpus=2, memory_mib=1024)
        sim.start()
        want = {"sim-rack-1", "sim-rack-2", "sim-web-1", "sim-web-2"}
        wait_until(lambda: want <= {n.node_id for n in api.nodes().nodes}, 20, "simulated nodes", collector)
        web = api.node("sim-web-1")
        assert web.node.hostname == "sim-web-1"
        assert web.latest["cpu.percent"] == pytest.approx(45.0)  # 90 % of demand over two instances
        wait_until(
            lambda: "vm.web-2.cpu_percent" in api.node("sim-rack-2").latest, 20, "VM figures", collector
        )
        rack = api.node("sim-rack-2")
        assert rack.latest["vm.web-2.cpu_percent"] == pytest.approx(45.0)
        assert rack.latest["vm.web-2.vcpus"] == 2
        assert rack.node.info.get("os") == SIM_OS
        assert sim.stats.posts_failed == 0
    finally:
        sim.close()
    assert _sim_threads() == []


def test_demo_instances_become_simulated_nodes(
    start_collector_process: StartCollectorProcess, api_for: list[ApiClient]
) -> None:
    collector = start_collector_process()
    api = ApiClient(collector.url, collector.token)
    api_for.append(api)
    demo = build_demo(collector.url, collector.token)
    try:
        demo.start()
        info = demo.provider.create(
            LaunchRequest(group=demo.group.name, name="demo-web-1", vcpus=2, memory_mib=2048)
        )
        assert info.node_id == "sim-demo-web-1"
        wait_until(
            lambda: info.node_id in {n.node_id for n in api.nodes().nodes},
            30,
            "the instance's agent",
            collector,
        )
        nodes = api.nodes().nodes
        assert {n.node_id for n in nodes} >= {"sim-host-1", "sim-host-2", "sim-host-3", "sim-demo-web-1"}
        assert all(n.hostname.startswith("sim-") for n in nodes)
        # alone in its group, the instance carries the whole (quiet) demand
        assert api.node("sim-demo-web-1").latest["cpu.percent"] > 30
    finally:
        demo.close()
    assert _sim_threads() == []


@dataclass(frozen=True)
class OneMove:
    """A plan's move as the executor reads it (``cloudmon.rebalance.planner.Move`` has the same fields)."""

    vm: str
    source: str
    target: str
    mandatory: bool = False
    wave: int = 0


@pytest.fixture
def live_collector(tmp_path: Path) -> Iterator[CollectorThread]:
    """A real collector (HTTP, embedded store, control loops) in this process: its command queue is at hand."""
    store = open_store(f"sqlite:///{tmp_path / 'telemetry.db'}")
    ct = CollectorThread(
        Config(listen_port=0, data_dir=str(tmp_path / "data"), control_tick_s=0.1), store, INTEGRATION_TOKEN
    )
    try:
        ct.start()
        yield ct
    finally:
        ct.close()
        store.close()


def _latest(api: ApiClient, node_id: str) -> dict[str, float]:
    """The node's latest values through the API ({} until its first report is in)."""
    try:
        return dict(api.node(node_id).latest)
    except ApiError as exc:
        if exc.status == 404:
            return {}
        raise


def _has_vm(api: ApiClient, node_id: str, vm: str) -> bool:
    return f"vm.{vm}.mem_max" in _latest(api, node_id)


def test_a_planned_move_live_migrates_a_simulated_vm(
    live_collector: CollectorThread, api_for: list[ApiClient]
) -> None:
    api = ApiClient(live_collector.url, INTEGRATION_TOKEN)
    api_for.append(api)
    model = live_collector.collector.model
    sim = Simulator(live_collector.url, INTEGRATION_TOKEN, interval_s=0.2)
    try:
        sim.add_host("host-a", vcpus=8, memory_mib=16384)
        sim.add_host("host-b", vcpus=8, memory_mib=16384)
        sim.add_vm("host-a", "app-1", 2, 4096, Workload.constant(70))
        sim.start()
        wait_until(lambda: _has_vm(api, "sim-host-a", "app-1"), 20, "app-1 in sim-host-a's report")
        wait_until(lambda: model.get("sim-host-b") is not None, 20, "sim-host-b's first report")

        def uri_for_host(host: str) -> str | None:
            node = model.get(host)
            return None if node is None else str(node.info.get("migrate_uri") or "") or None

        events: list[dict[str, Any]] = []
        executor = PlanExecutor(
            live_collector.collector.commands,
            lambda h: h if model.get(h) is not None else None,
            uri_for_host,
            Arbiter(time.time),
            None,
            time.time,
            events.append,
            migrate_timeout_s=60,
            verify_timeout_s=30,
            poll_s=0.1,
        )
        report = executor.run([OneMove("app-1", "sim-host-a", "sim-host-b")])
        assert report.ok, f"{report.reason}\nevents: {events}"
        assert [o.vm for o in report.done] == ["app-1"]
        assert report.done[0].detail["percent"] == 100.0
        kinds = [e["kind"] for e in events]
        assert kinds[0] == "rebalance.move_started"
        assert "rebalance.move_progress" in kinds
        assert kinds[-2:] == ["rebalance.move_done", "rebalance.plan_done"]

        # The reports follow the VM: on host-b with its load, gone from host-a.
        wait_until(
            lambda: _has_vm(api, "sim-host-b", "app-1") and not _has_vm(api, "sim-host-a", "app-1"),
            20,
            "app-1 reported by sim-host-b only",
        )
        assert api.node("sim-host-b").latest["vm.app-1.cpu_percent"] == pytest.approx(70.0)
        assert sim.vm_host("app-1") == "sim-host-b"
    finally:
        sim.close()
    assert _sim_threads() == []


def test_an_approved_balance_plan_runs_on_simulated_hosts(
    live_collector: CollectorThread, api_for: list[ApiClient]
) -> None:
    """What the Balance page does: compute a plan over the live cluster, approve it, watch it run."""
    api = ApiClient(live_collector.url, INTEGRATION_TOKEN)
    api_for.append(api)
    sim = Simulator(live_collector.url, INTEGRATION_TOKEN, interval_s=0.2)
    busy = ["busy-1", "busy-2", "busy-3", "busy-4"]
    try:
        sim.add_host("hot", vcpus=8, memory_mib=32768)
        sim.add_host("cold", vcpus=8, memory_mib=32768)
        for name in busy:
            sim.add_vm("hot", name, 2, 2048, Workload.constant(90))
        sim.start()
        wait_until(
            lambda: (
                all(_has_vm(api, "sim-hot", v) for v in busy) and "cpu.percent" in api.node("sim-cold").latest
            ),
            20,
            "both hosts' reports",
        )
        proposed = api.compute_plan({})["plan"]
        moves = proposed["moves"]
        assert moves, f"no move recommended for an unbalanced cluster: {proposed}"
        assert all((m["source"], m["target"]) == ("sim-hot", "sim-cold") for m in moves)
        api.approve_plan(proposed["id"])

        def finished() -> bool:
            return api.balance()["execution"]["state"] in ("done", "failed", "cancelled")

        wait_until(finished, 60, "the plan's execution")
        execution = api.balance()["execution"]
        assert execution["state"] == "done", execution
        assert execution["moves_done"] == len(moves)
        moved = [m["vm"] for m in moves]
        wait_until(
            lambda: all(_has_vm(api, "sim-cold", v) and not _has_vm(api, "sim-hot", v) for v in moved),
            20,
            "the moved VMs in sim-cold's reports",
        )
        assert {v for v in busy if sim.vm_host(v) == "sim-cold"} == set(moved)
    finally:
        sim.close()
    assert _sim_threads() == []
