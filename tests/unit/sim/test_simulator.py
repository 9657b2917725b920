"""Simulator reports (built without a collector) and the simulated provider."""

from __future__ import annotations

import threading

import pytest

from cloudmon.providers import InstanceState, LaunchRequest, ProviderError, open_provider
from cloudmon.providers.placement import PlacementError
from cloudmon.providers.simulated import SimulatedProvider
from cloudmon.sim import SIM_OS, Simulator, Workload, sim_name
from cloudmon.sim.demo import DEMO_GROUP, build_demo
from cloudmon_agent.schema import Report, decode_report, encode, flatten


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _valid(reports: list[Report]) -> dict[str, Report]:
    """Every report through the real wire decoder: what the collector would accept."""
    return {r.node_id: decode_report(encode(r)) for r in reports}


def test_names_are_labelled_simulated_and_valid() -> None:
    assert sim_name("web 1/a") == "sim-web-1-a"
    assert sim_name("sim-host-1") == "sim-host-1"


def test_group_demand_is_shared_by_in_service_instances() -> None:
    clock = Clock()
    sim = Simulator(None, None, clock=clock)
    sim.add_host("h1", vcpus=8, memory_mib=16384)
    sim.add_vm("h1", "db", 2, 2048, Workload.constant(30))
    sim.set_workload("web", Workload.constant(120))
    sim.add_instance("web-1", "web", "h1", vcpus=2, memory_mib=1024)
    sim.add_instance("web-2", "web", "h1", vcpus=2, memory_mib=1024, start_at=clock.now + 10)
    reports = _valid(sim.build_reports())
    assert set(reports) == {"sim-h1", "sim-web-1"}  # web-2 still boots: no agent yet
    assert reports["sim-web-1"].host.cpu_percent == 100.0  # 120 % of demand on one instance: saturated
    clock.now += 10
    reports = _valid(sim.build_reports())
    assert reports["sim-web-1"].host.cpu_percent == pytest.approx(60.0)
    assert reports["sim-web-2"].host.cpu_percent == pytest.approx(60.0)
    host = reports["sim-h1"]
    assert host.node.hostname == "sim-h1"
    assert host.node.os == SIM_OS
    vms = {v.name: v for v in host.vms}
    assert set(vms) == {"db", "web-1", "web-2"}
    assert vms["web-1"].host_cpu_percent == pytest.approx(60.0 * 2 / 8)
    assert vms["db"].cpu_percent == pytest.approx(30.0)
    values = flatten(host)
    assert values["vm.web-2.cpu_percent"] == pytest.approx(60.0)
    # host CPU = its own bit plus what the VMs take of it
    assert host.host.cpu_percent == pytest.approx(15 + 15 + 7.5, abs=3.5)
    assert reports["sim-web-1"].seq == 2

    sim.set_reporting("web-2", False)  # a silent agent is out of service: web-1 takes it all
    reports = _valid(sim.build_reports())
    assert "sim-web-2" not in reports
    assert reports["sim-web-1"].host.cpu_percent == 100.0
    assert sim.remove_instance("web-2")
    assert not sim.remove_instance("web-2")
    assert sim.node_ids() == ["sim-h1", "sim-web-1"]
    with pytest.raises(KeyError, match="no simulated host 'nope'"):
        sim.add_instance("x", "web", "nope")


def test_sending_to_nowhere_counts_failures_and_close_leaves_no_thread() -> None:
    sim = Simulator("http://127.0.0.1:9", "t", interval_s=0.05, timeout_s=1)
    sim.add_host("h1")
    assert sim.tick() == 0
    assert sim.stats.posts_failed == 1
    assert "unreachable" in sim.stats.last_error
    sim.start()
    sim.close()
    sim.close()
    assert [t for t in threading.enumerate() if t.name == "cloudmon-sim"] == []


def test_simulated_provider_boots_places_and_deletes() -> None:
    clock = Clock()
    sim = Simulator(None, None, clock=clock)
    p = open_provider("simulated", {"hosts": 2, "boot_delay_s": 5, "simulator": sim})
    assert isinstance(p, SimulatedProvider)
    a = p.create(LaunchRequest(group="web", name="web-1", vcpus=4, memory_mib=4096))
    b = p.create(LaunchRequest(group="web", name="web-2", vcpus=4, memory_mib=4096))
    assert (a.state, a.node_id, a.created) == (InstanceState.PENDING, "sim-web-1", clock.now)
    assert {a.host, b.host} == {"sim-host-1", "sim-host-2"}  # spread
    assert p.create(LaunchRequest(group="web", name="web-1")).host == a.host  # a retried create
    assert p.hosts()[a.host or ""]["vcpus_used"] == 4
    assert "sim-web-1" not in _valid(sim.build_reports())
    clock.now += 5
    assert p.describe(["web-1"])["web-1"].state is InstanceState.RUNNING
    assert "sim-web-1" in _valid(sim.build_reports())
    p.fail("web-1")
    assert "sim-web-1" not in _valid(sim.build_reports())
    p.delete("web-1")
    p.delete("web-1")
    assert p.describe(["web-1"])["web-1"].state is InstanceState.MISSING
    assert sim.node_ids() == ["sim-host-1", "sim-host-2", "sim-web-2"]
    with pytest.raises(PlacementError, match="no host can take simulated instance big-1"):
        p.create(LaunchRequest(group="web", name="big-1", vcpus=64))
    with pytest.raises(ProviderError, match="no simulated host 'elsewhere'"):
        p.create(LaunchRequest(group="web", name="x-1", host="elsewhere"))
    p.close()
    with pytest.raises(ProviderError, match="closed"):
        p.create(LaunchRequest(group="web", name="late"))


def test_simulated_provider_without_simulator_only_records() -> None:
    p = SimulatedProvider(
        {"hosts": {"big": {"vcpus": 4, "memory_mib": 8192, "vcpus_used": 3}}, "boot_delay_s": 0}
    )
    info = p.create(LaunchRequest(group="g", name="g-1"))
    assert (info.state, info.host) == (InstanceState.RUNNING, "sim-big")
    assert p.hosts()["sim-big"]["vcpus_used"] == 4
    with pytest.raises(ProviderError, match="needs a simulator"):
        p.fail("g-1")
    with pytest.raises(ProviderError, match="hosts must be"):
        SimulatedProvider({"hosts": "many"})


def test_demo_builds_a_labelled_cluster_and_group() -> None:
    clock = Clock()
    demo = build_demo("http://127.0.0.1:9", "t", clock=clock)
    try:
        assert demo.group.name == DEMO_GROUP
        assert (demo.group.min_size, demo.group.max_size, demo.group.desired) == (2, 8, 2)
        assert demo.group.template.provider == "simulated"
        assert sorted(demo.provider.hosts()) == ["sim-host-1", "sim-host-2", "sim-host-3"]
        reports = _valid(demo.simulator.build_reports())
        assert all(r.node.hostname.startswith("sim-") and r.node.os == SIM_OS for r in reports.values())
        assert sum(len(r.vms) for r in reports.values()) == 5
        assert {r.node_id: r.node.migrate_uri for r in reports.values()} == {
            h: f"sim+migrate://{h}" for h in ("sim-host-1", "sim-host-2", "sim-host-3")
        }
        # One host carries the heavy mix all along, so the Balance page has a move to recommend.
        for _ in range(0, 600, 30):
            clock.now += 30
            cpu = {r.node_id: r.host.cpu_percent for r in demo.simulator.build_reports()}
            assert cpu["sim-host-1"] > 30, cpu
            assert max(cpu, key=cpu.__getitem__) == "sim-host-1", cpu
            assert cpu["sim-host-1"] > 3 * cpu["sim-host-2"], cpu
    finally:
        demo.close()
