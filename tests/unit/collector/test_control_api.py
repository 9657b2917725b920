"""The control loops behind the collector's HTTP API: groups, activity, balance, plans, events.

A real collector (in-process, real HTTP on a free port, real embedded store)
with its control plane ticking fast; instances come from the simulated
provider (the same one ``cloudmon demo`` uses), hosts with VMs from the
simulator, which posts real reports over HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from cloudmon.client import ApiClient, ApiError
from cloudmon.collector import CollectorThread
from cloudmon.config import Config
from cloudmon.providers.simulated import SimulatedProvider
from cloudmon.sim.simulator import Simulator
from cloudmon.sim.workload import Workload
from cloudmon.store import TelemetryStore
from tests.unit.collector.helpers import TOKEN, wait_for

GROUP: dict[str, Any] = {
    "template": {"provider": "simulated", "vcpus": 2, "memory_mib": 1024},
    "min_size": 2,
    "max_size": 4,
    "desired": 2,
    "health_check_grace_s": 60,
    "default_warmup_s": 1,
    "drain_timeout_s": 0,
    "policies": [{"type": "target_tracking", "name": "cpu50", "metric": "cpu.percent", "target": 50}],
}


@pytest.fixture
def collector(store: TelemetryStore, no_thread_leaks: None) -> Iterator[CollectorThread]:
    provider = SimulatedProvider({"hosts": 2, "boot_delay_s": 0})
    ct = CollectorThread(
        Config(listen_port=0, control_tick_s=0.1), store, TOKEN, providers={"simulated": provider}
    )
    ct.start()
    try:
        yield ct
    finally:
        ct.close()
        provider.close()


@pytest.fixture
def api(collector: CollectorThread) -> Iterator[ApiClient]:
    client = ApiClient(collector.url, TOKEN)
    try:
        yield client
    finally:
        client.close()


def test_a_group_is_created_scaled_to_its_desired_size_and_its_activity_explains_it(api: ApiClient) -> None:
    view = api.put_group("web", GROUP)["group"]
    assert view["name"] == "web"
    assert view["simulated"] is True
    assert view["metric"]["name"] == "cpu.percent"
    assert view["metric"]["target"] == 50

    def two_in_service() -> list[dict[str, Any]]:
        (g,) = api.groups()["groups"]
        live = [i for i in g["instances"] if i["state"] in ("pending", "in_service")]
        return live if len(live) == 2 else []

    instances = wait_for(two_in_service, what="two instances")
    assert {i["group"] for i in instances} == {"web"}
    events = api.group_activity("web", limit=50)["events"]
    kinds = [e["kind"] for e in events]
    assert "autoscale.group_put" in kinds
    assert kinds.count("autoscale.launch") >= 2
    assert all(isinstance(e["reason"], str) and e["reason"] for e in events)
    # Newest first.
    assert [e["ts"] for e in events] == sorted((e["ts"] for e in events), reverse=True)
    # The same decisions are in the event log, filterable by kind.
    logged = api._json("GET", "/api/v1/events?kind=autoscale.launch")["events"]
    assert len(logged) >= 2


def test_invalid_groups_are_refused_naming_the_field(api: ApiClient) -> None:
    bad = dict(GROUP, min_size=5)
    with pytest.raises(ApiError) as err:
        api.put_group("web", bad)
    assert err.value.status == 400
    assert "min_size" in err.value.message
    with pytest.raises(ApiError) as err:
        api.put_group("web", dict(GROUP, name="other"))
    assert err.value.status == 400
    assert "URL names 'web'" in err.value.message
    with pytest.raises(ApiError) as err:
        api.group_activity("nope")
    assert err.value.status == 404
    assert api.groups() == {"groups": []}


def test_deleting_a_group_with_instances_needs_force_then_terminates_them(api: ApiClient) -> None:
    api.put_group("web", GROUP)
    wait_for(lambda: any(g["instances"] for g in api.groups()["groups"]), what="an instance")
    with pytest.raises(ApiError) as err:
        api.delete_group("web")
    assert err.value.status == 400
    assert "force" in err.value.message
    assert api.delete_group("web", force=True) == {"deleted": False}
    wait_for(lambda: api.groups()["groups"] == [], timeout=20, what="the group to be gone")
    with pytest.raises(ApiError) as err:
        api.delete_group("web")
    assert err.value.status == 404


def test_balance_without_hosts_says_what_to_do(api: ApiClient) -> None:
    state = api.balance()
    assert state["plan"] is None
    assert state["settings"]["threshold"] == 3
    with pytest.raises(ApiError) as err:
        api.compute_plan({})
    assert err.value.status == 400
    assert "--libvirt-uri" in err.value.message
    with pytest.raises(ApiError) as err:
        api.put_balance_settings({"threshold": 9})
    assert err.value.status == 400
    assert "threshold" in err.value.message


def test_a_plan_for_an_unbalanced_cluster_is_proposed_explained_and_can_be_rejected(
    collector: CollectorThread, api: ApiClient
) -> None:
    sim = Simulator(collector.url, TOKEN, seed=1)
    try:
        busy = sim.add_host("busy", vcpus=8, memory_mib=32768)
        idle = sim.add_host("idle", vcpus=8, memory_mib=32768)
        for i in range(4):
            sim.add_vm("busy", f"vm{i}", vcpus=2, memory_mib=2048, workload=Workload.constant(90.0))
        sim.start()
        wait_for(lambda: len(api.nodes().nodes) == 2, what="two simulated hosts")
        wait_for(lambda: api.balance()["hosts"], timeout=20, what="host loads")
        plan = api.compute_plan({"threshold": 5})["plan"]
        snapshot = api._json("GET", "/api/v1/balance/snapshot")
    finally:
        sim.close()
    # The saved snapshot is what 'cloudmon plan --snapshot' reads, and gives the same moves.
    from cloudmon.rebalance.planner import plan as offline_plan
    from cloudmon.rebalance.snapshot import loads

    offline = offline_plan(loads(msgspec.json.encode(snapshot)))
    assert snapshot["settings"]["threshold"] == 5
    assert {v["name"] for v in snapshot["vms"]} == {"vm0", "vm1", "vm2", "vm3"}
    assert [(m.vm, m.target) for m in offline.moves] == [(m["vm"], m["target"]) for m in plan["moves"]]
    assert plan["status"] == "proposed"
    assert plan["moves"], plan
    for move in plan["moves"]:
        assert (move["source"], move["target"]) == (busy, idle)
        assert move["reason"]
        assert move["target_after"]["cpu"] > move["target_before"]["cpu"]
    assert plan["imbalance_after"] < plan["imbalance_before"]
    assert plan["hosts_before"][busy]["cpu"] > plan["hosts_after"][busy]["cpu"]
    assert api.balance()["settings"]["threshold"] == 5
    rejected = api.reject_plan(plan["id"])["plan"]
    assert rejected["status"] == "rejected"
    with pytest.raises(ApiError) as err:
        api.approve_plan(plan["id"])
    assert err.value.status == 400
    assert "rejected" in err.value.message
    kinds = [e["kind"] for e in api._json("GET", "/api/v1/events?kind=rebalance.")["events"]]
    assert kinds[-2:] == ["rebalance.plan", "rebalance.plan_rejected"]


def test_a_collector_without_control_loops_says_so(store: TelemetryStore, tmp_path: Path) -> None:
    ct = CollectorThread(Config(listen_port=0, control=False), store, TOKEN)
    ct.start()
    client = ApiClient(ct.url, TOKEN)
    try:
        with pytest.raises(ApiError) as err:
            client.groups()
        assert err.value.status == 404
        assert "control = false" in err.value.message
    finally:
        client.close()
        ct.close()


def test_rules_and_maintenance_are_checked_stored_and_logged(
    collector: CollectorThread, api: ApiClient
) -> None:
    rule = {"kind": "anti_affinity", "vms": ["web-1", "web-2"]}
    stored = api._json("PUT", "/api/v1/rules/web-spread", rule)["rule"]
    assert stored == {"name": "web-spread", "kind": "anti_affinity", "vms": ["web-1", "web-2"], "hosts": []}
    assert api._json("GET", "/api/v1/rules")["rules"] == [stored]
    with pytest.raises(ApiError) as err:
        api._json("PUT", "/api/v1/rules/bad", {"kind": "sometimes", "vms": ["a"]})
    assert err.value.status == 400
    assert "kind" in err.value.message
    assert api._json("DELETE", "/api/v1/rules/web-spread") == {"deleted": True}
    with pytest.raises(ApiError) as err:
        api._json("DELETE", "/api/v1/rules/web-spread")
    assert err.value.status == 404

    with pytest.raises(ApiError) as err:
        api._json("PUT", "/api/v1/hosts/nobody/maintenance", {"maintenance": True})
    assert err.value.status == 404
    sim = Simulator(collector.url, TOKEN, seed=2)
    try:
        host = sim.add_host("h1", vcpus=4, memory_mib=8192)
        sim.start()
        wait_for(lambda: len(api.nodes().nodes) == 1, what="the simulated host")
    finally:
        sim.close()
    with pytest.raises(ApiError) as err:
        api._json("PUT", f"/api/v1/hosts/{host}/maintenance", {"maintenance": "yes"})
    assert err.value.status == 400
    assert api._json("PUT", f"/api/v1/hosts/{host}/maintenance", {"maintenance": True}) == {
        "host": host,
        "maintenance": True,
    }
    events = api._json("GET", "/api/v1/events?kind=rebalance.")["events"]
    kinds = [e["kind"] for e in events if e["kind"] != "rebalance.plan"]
    assert kinds == ["rebalance.rule", "rebalance.rule_deleted", "rebalance.maintenance"], events


def test_terminated_instances_leave_the_node_list_and_do_not_come_back_after_a_restart(
    store: TelemetryStore,
) -> None:
    config = Config(listen_port=0, control_tick_s=0.1)
    ct = CollectorThread(config, store, TOKEN)
    ct.start()
    # Instances are simulated nodes whose agents report to this collector over HTTP.
    provider = SimulatedProvider({"collector_url": ct.url, "token": TOKEN, "hosts": 1, "boot_delay_s": 0})
    client = ApiClient(ct.url, TOKEN)
    try:
        assert ct.collector.control is not None
        ct.collector.control.add_provider("simulated", provider)
        client.put_group("web", dict(GROUP, drain_timeout_s=0))
        wait_for(lambda: len(client.nodes().nodes) == 3, timeout=20, what="the host and two instances listed")
        client.delete_group("web", force=True)
        wait_for(lambda: client.groups()["groups"] == [], timeout=20, what="the group gone")
        wait_for(lambda: len(client.nodes().nodes) == 1, what="the terminated instances' nodes dropped")
        (host,) = [n.node_id for n in client.nodes().nodes]
    finally:
        provider.close()
        client.close()
        ct.close()
    ct = CollectorThread(config, store, TOKEN)
    ct.start()
    client = ApiClient(ct.url, TOKEN)
    try:
        assert [n.node_id for n in client.nodes().nodes] == [host]
        events = client._json("GET", "/api/v1/events?kind=autoscale.terminate")["events"]
        assert len(events) == 2
        assert all(e["node"].startswith("sim-web-") for e in events)
    finally:
        client.close()
        ct.close()
