"""The reconciler with the real embedded store, a real ClusterModel and arbiter, and a fake provider.

``FakeProvider`` stands in for a cloud or hypervisor (outside this machine);
``FakeDrainer`` for a load balancer.  Time is a controllable clock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from cloudmon.autoscale.model import (
    GROUP_DOC,
    GroupSpec,
    LaunchTemplate,
    TargetTrackingPolicy,
)
from cloudmon.autoscale.service import AutoscaleService, GroupError, GroupNotFound
from cloudmon.control.arbiter import Arbiter
from cloudmon.lb.base import DrainOutcome
from cloudmon.model.cluster import ClusterModel
from cloudmon.providers.base import InstanceInfo, InstanceState, LaunchRequest, Provider, ProviderError
from cloudmon.store import open_store
from cloudmon.store.base import TelemetryStore
from tests.unit.autoscale.helpers import T0, make_spec


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeProvider:
    """An in-memory provider: instances are running at once and report as node ``id``."""

    def __init__(self, name: str = "fake") -> None:
        self.name = name
        self.instances: dict[str, InstanceInfo] = {}
        self.requests: list[LaunchRequest] = []
        self.deleted: list[str] = []
        self.fail_create: str | None = None
        self.fail_delete: str | None = None
        self.fail_describe: str | None = None

    def create(self, request: LaunchRequest) -> InstanceInfo:
        if self.fail_create:
            raise ProviderError(self.fail_create)
        self.requests.append(request)
        info = InstanceInfo(
            id=request.name,
            group=request.group,
            state=InstanceState.RUNNING,
            host=request.host,
            node_id=request.name,
        )
        self.instances[info.id] = info
        return info

    def delete(self, instance_id: str) -> None:
        if self.fail_delete:
            raise ProviderError(self.fail_delete)
        self.instances.pop(instance_id, None)
        self.deleted.append(instance_id)

    def describe(self, instance_ids: list[str]) -> dict[str, InstanceInfo]:
        if self.fail_describe:
            raise ProviderError(self.fail_describe)
        return {
            i: self.instances.get(i, InstanceInfo(id=i, group="?", state=InstanceState.MISSING))
            for i in instance_ids
        }

    def hosts(self) -> Mapping[str, Mapping[str, float]]:
        return {"h1": {"vcpus": 16, "vcpus_used": 0}, "h2": {"vcpus": 16, "vcpus_used": 4}}

    def close(self) -> None:
        pass


class FakeDrainer:
    """A load balancer whose drains finish when the test says so."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.drained: list[str] = []

    def drain(self, instance_id: str, timeout_s: float) -> DrainOutcome:
        self.release.wait(timeout_s)
        self.drained.append(instance_id)
        return DrainOutcome(instance_id, True, "no connections left", 0.5, {"connections": 0.0})

    def undrain(self, instance_id: str) -> None:
        pass


class Env:
    def __init__(self, store: TelemetryStore, drainer: FakeDrainer | None = None, budget: int = 100) -> None:
        self.store = store
        self.clock = Clock()
        self.model = ClusterModel(node_timeout=5.0)
        self.providers: dict[str, FakeProvider] = {
            "fake": FakeProvider("fake"),
            "other": FakeProvider("other"),
        }
        self.arbiter = Arbiter(self.clock, budget=budget, window_s=300.0, hold_s=0.0)
        self.drainer = drainer
        self.svc = self.new_service()

    def provider_for(self, t: LaunchTemplate) -> Provider:
        if t.provider not in self.providers:
            raise ProviderError(f"unknown provider {t.provider!r}")
        return self.providers[t.provider]

    def new_service(self) -> AutoscaleService:
        return AutoscaleService(
            self.store, self.model, self.provider_for, self.drainer, self.arbiter, self.clock
        )

    def report(self, cpu: float, *, provider: str = "fake") -> None:
        for iid in self.providers[provider].instances:
            self.model.update(iid, iid, self.clock.t, 1.0, {"cpu.percent": cpu}, {}, now=self.clock.t)

    def advance(self, dt: float) -> None:
        self.clock.t += dt


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TelemetryStore]:
    s = open_store("sqlite:///" + str(tmp_path / "tele.db"))
    yield s
    s.close()


@pytest.fixture
def env(store: TelemetryStore) -> Iterator[Env]:
    e = Env(store)
    yield e
    e.svc.close()


def group(**kw: object) -> GroupSpec:
    base: dict[str, object] = {"template": LaunchTemplate(provider="fake"), "health_check_timeout_s": 30.0}
    base.update(kw)
    return make_spec(**base)


def kinds(events: list[dict[str, object]]) -> list[str]:
    return [str(e["kind"]) for e in events]


def test_group_launches_to_desired_and_scales_out_on_load_with_history(env: Env) -> None:
    assert env.svc.put_group(group(policies=[TargetTrackingPolicy(name="cpu50", target=50.0)])) == "created"
    events = env.svc.tick()
    assert kinds(events).count("autoscale.launch") == 2
    prov = env.providers["fake"]
    assert len(prov.instances) == 2
    # Spread across hosts: h1 has more room, then h2 gets the second.
    assert sorted(r.host or "" for r in prov.requests) == ["h1", "h2"]
    env.advance(10)
    env.report(90.0)
    events = env.svc.tick()  # pending -> in service (no warm-up in this group) -> measured
    assert kinds(events).count("autoscale.in_service") == 2
    assert "autoscale.scale_out" in kinds(events)
    assert len(prov.instances) == 4
    state = env.svc.group_state("web")
    assert state is not None
    assert state.desired == 4
    history = env.svc.activity("web", limit=50)
    assert history[0]["ts"] >= history[-1]["ts"]  # type: ignore[operator]
    assert {"autoscale.group_put", "autoscale.launch", "autoscale.scale_out"} <= set(kinds(history))
    assert len(env.svc.activity("web", limit=3)) == 3
    assert env.svc.activity("nope") == []


def test_a_restarted_service_continues_from_the_stored_state(env: Env) -> None:
    env.svc.put_group(group(desired=3))
    env.svc.tick()
    env.svc.close()
    env.svc = env.new_service()
    env.advance(5)
    env.report(40.0)
    events = env.svc.tick()
    assert "autoscale.launch" not in kinds(events)
    assert len(env.providers["fake"].instances) == 3
    assert [g.name for g in env.svc.groups()] == ["web"]


def test_provider_failures_are_events_and_do_not_block_other_groups(env: Env) -> None:
    env.svc.put_group(group(name="a"))
    env.svc.put_group(group(name="b", template=LaunchTemplate(provider="other")))
    env.svc.put_group(group(name="c", template=LaunchTemplate(provider="nowhere")))
    env.providers[
        "fake"
    ].fail_create = "host h1 is out of disk space; free some or remove it from template.hosts"
    events = env.svc.tick()
    failed = [e for e in events if e["kind"] == "autoscale.launch_failed"]
    assert len(failed) == 1
    assert failed[0]["group"] == "a"
    assert "out of disk space" in str(failed[0]["reason"])
    assert "next attempt in 10 s" in str(failed[0]["reason"])
    assert len(env.providers["other"].instances) == 2  # group b unaffected
    errors = [e for e in events if e["kind"] == "autoscale.error"]
    assert [e["group"] for e in errors] == ["c"]
    assert "unknown provider 'nowhere'" in str(errors[0]["reason"])
    # Back-off, then success once the provider recovers.
    env.providers["fake"].fail_create = None
    env.advance(5)
    assert "autoscale.launch" not in kinds(env.svc.tick())
    env.advance(6)
    assert kinds(env.svc.tick()).count("autoscale.launch") == 2


def test_describe_failure_changes_nothing(env: Env) -> None:
    env.svc.put_group(group())
    env.svc.tick()
    env.providers["fake"].fail_describe = "connection refused"
    env.advance(400)  # past grace: without observations, nothing may be judged unhealthy
    events = env.svc.tick()
    assert kinds(events) == ["autoscale.error"]
    assert "connection refused" in str(events[0]["reason"])
    assert env.providers["fake"].deleted == []


def test_scale_in_drains_with_the_hook_then_terminates(env: Env) -> None:
    env.svc.put_group(group(desired=3, drain_timeout_s=30.0))
    env.svc.tick()
    env.advance(1)
    env.svc.tick()
    env.svc.put_group(group(desired=2, drain_timeout_s=30.0))
    env.advance(1)
    events = env.svc.tick()
    assert kinds(events) == ["autoscale.capacity_set", "autoscale.drain"]
    victim = str(events[1]["instance"])
    assert victim == "web-0001"  # oldest first
    assert env.arbiter.claimed(victim) == "autoscale"
    env.advance(29)
    env.svc.tick()
    assert env.providers["fake"].deleted == []
    env.advance(1)
    events = env.svc.tick()
    assert kinds(events) == ["autoscale.terminate"]
    assert env.providers["fake"].deleted == [victim]
    assert env.arbiter.claimed(victim) is None
    assert "drain timeout reached" in str(events[0]["reason"])


def test_scale_in_through_a_load_balancer_drainer(store: TelemetryStore) -> None:
    drainer = FakeDrainer()
    env = Env(store, drainer=drainer)
    try:
        env.svc.put_group(group(desired=2, drain_timeout_s=600.0))
        env.svc.tick()
        env.svc.put_group(group(desired=1, drain_timeout_s=600.0))
        env.advance(1)
        assert "autoscale.drain" in kinds(env.svc.tick())
        env.advance(1)
        env.svc.tick()
        assert env.providers["fake"].deleted == []  # the load balancer has not finished
        drainer.release.set()
        terminated: list[dict[str, object]] = []
        for _ in range(500):  # polls the drain worker's result, no sleeping
            env.advance(0.01)
            terminated = [e for e in env.svc.tick() if e["kind"] == "autoscale.terminate"]
            if terminated:
                break
            drainer.release.wait(0.01)
        assert terminated, "the drained instance was never terminated"
        assert "no connections left" in str(terminated[0]["reason"])
        assert drainer.drained == ["web-0001"]
    finally:
        env.svc.close()


def test_terminate_failure_is_retried(env: Env) -> None:
    env.svc.put_group(group(desired=1, drain_timeout_s=0.0))
    env.svc.tick()
    env.svc.put_group(group(desired=0, min_size=0, drain_timeout_s=0.0))
    env.providers["fake"].fail_delete = "libvirt: domain is locked"
    env.advance(1)
    env.svc.tick()  # drain starts, ends immediately
    env.advance(1)
    events = env.svc.tick()
    assert kinds(events) == ["autoscale.terminate_failed"]
    assert "domain is locked" in str(events[0]["reason"])
    env.providers["fake"].fail_delete = None
    env.advance(1)
    assert kinds(env.svc.tick()) == ["autoscale.terminate"]


def test_arbiter_refusal_is_a_no_action_event(store: TelemetryStore) -> None:
    env = Env(store, budget=1)
    try:
        env.svc.put_group(group(desired=3))
        events = env.svc.tick()
        assert kinds(events) == ["autoscale.launch", "autoscale.no_action"]
        assert events[1]["code"] == "arbiter_refused"
        assert "change budget spent" in str(events[1]["reason"])
        env.advance(10)
        assert "autoscale.no_action" not in kinds(env.svc.tick())  # the same refusal is not logged again
        env.advance(300)
        assert kinds(env.svc.tick()).count("autoscale.launch") == 1
    finally:
        env.svc.close()


def test_unhealthy_instance_is_replaced_even_when_the_budget_is_spent(store: TelemetryStore) -> None:
    env = Env(store, budget=1)
    try:
        env.svc.put_group(group(desired=1, health_check_grace_s=60.0, health_check_timeout_s=30.0))
        env.svc.tick()
        env.advance(1)
        env.report(30.0)
        env.svc.tick()
        env.advance(100)  # agent silent for 100 s, past the 60 s grace
        events = env.svc.tick()
        assert kinds(events) == ["autoscale.replace_unhealthy", "autoscale.terminate", "autoscale.launch"]
        assert "silent for 100 s" in str(events[0]["reason"])
        assert env.providers["fake"].deleted == ["web-0001"]
        assert list(env.providers["fake"].instances) == ["web-0002"]
        assert "replacing an unhealthy instance" in str(events[2]["reason"])
    finally:
        env.svc.close()


def test_delete_group_refuses_with_instances_and_force_terminates_them(env: Env) -> None:
    env.svc.put_group(group(desired=2))
    env.svc.tick()
    with pytest.raises(GroupError, match="still has 2 instance"):
        env.svc.delete_group("web")
    assert env.svc.delete_group("web", force=True) is False
    with pytest.raises(GroupError, match="being deleted"):
        env.svc.put_group(group(desired=2))
    for _ in range(3):
        env.advance(1)
        env.svc.tick()
    assert sorted(env.providers["fake"].deleted) == ["web-0001", "web-0002"]
    assert env.svc.groups() == []
    assert env.svc.group_state("web") is None
    assert "autoscale.group_deleted" in kinds(env.svc.activity("web"))
    with pytest.raises(GroupNotFound):
        env.svc.delete_group("web")


def test_delete_empty_group_at_once_and_put_is_idempotent(env: Env) -> None:
    spec = group(desired=0, min_size=0)
    assert env.svc.put_group(spec) == "created"
    assert env.svc.put_group(spec) == "unchanged"
    assert env.svc.delete_group("web") is True
    assert env.svc.groups() == []


def test_an_invalid_group_document_is_reported_once(env: Env) -> None:
    env.store.put_document(GROUP_DOC, "bad", {"name": "bad", "min_size": 3, "max_size": 1, "desired": 2})
    events = env.svc.tick()
    assert kinds(events) == ["autoscale.error"]
    assert "max_size (1) is below min_size (3)" in str(events[0]["reason"])
    assert env.svc.tick() == []
