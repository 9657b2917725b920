"""Simulated nodes against a real collector process: they appear through the API with their values."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from cloudmon.client import ApiClient
from cloudmon.providers import LaunchRequest
from cloudmon.sim import SIM_OS, Simulator, Workload
from cloudmon.sim.demo import build_demo
from tests.integration.conftest import StartCollectorProcess, wait_until

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
