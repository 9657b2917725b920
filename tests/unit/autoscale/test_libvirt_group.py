"""An auto-scaling group on two fake libvirt hosts (libvirt's real ``test:///`` driver).

The whole reconciler is real: :class:`AutoscaleService` with the embedded
store, a live :class:`ClusterModel`, the :class:`Arbiter`, and a
:class:`LibvirtProvider` built from the group's launch template through the
provider registry (as the control plane builds it).  Time is a controllable
clock, so the drain hook's timeout passes without waiting.

Each host is a custom test-driver file in ``tmp_path``.  Such a host's state
lives in the libvirt connection that opened it (a second connection to the
same file sees a fresh host), so the test looks at libvirt through the
provider's own per-host connection, which it keeps for its whole life.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from cloudmon.autoscale.model import (
    Alarm,
    GroupSpec,
    LaunchTemplate,
    ScheduledAction,
    Step,
    StepScalingPolicy,
    TargetTrackingPolicy,
)
from cloudmon.autoscale.service import AutoscaleService, vm_values
from cloudmon.collector.commands import CommandQueue
from cloudmon.control.arbiter import Arbiter
from cloudmon.control.plane import ControlPlane
from cloudmon.model.cluster import ClusterModel
from cloudmon.providers import open_provider
from cloudmon.providers.base import InstanceState, Provider
from cloudmon.store import open_store
from cloudmon.store.base import TelemetryStore

libvirt = pytest.importorskip("libvirt")

from cloudmon.providers.libvirt import LibvirtProvider  # noqa: E402

# 21:00 UTC; the group's scheduled action lowers it at 22:00.
T0 = datetime(2024, 1, 1, 21, 0, tzinfo=UTC).timestamp()
DRAIN_S = 30.0

_TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"

TEMPLATE = """<domain type='test'>
  <name>template</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices/>
</domain>
"""


def _host_xml(cpus: int, memory_gib: int, foreign: str | None = None) -> str:
    """A fake host; ``foreign`` names a running 1-vCPU domain that cloudmon did not create."""
    dom = ""
    if foreign is not None:
        dom = f"""
  <domain type='test' xmlns:test='{_TEST_NS}'>
    <name>{foreign}</name>
    <memory unit='MiB'>1024</memory>
    <vcpu>1</vcpu>
    <os><type arch='x86_64'>hvm</type></os>
    <devices/>
    <test:runstate>1</test:runstate>
  </domain>"""
    return f"""<node>
  <cpu><mhz>2000</mhz><model>x86_64</model><active>{cpus}</active><nodes>1</nodes>
    <sockets>1</sockets><cores>{cpus}</cores><threads>1</threads></cpu>
  <memory>{memory_gib * 1024 * 1024}</memory>{dom}
</node>
"""


class Clock:
    """The service's clock; the test moves it."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Rig:
    """The service, its collaborators and the providers it built, for one test."""

    def __init__(self, tmp: Path, store: TelemetryStore) -> None:
        (tmp / "host-a.xml").write_text(_host_xml(8, 16), encoding="utf-8")
        (tmp / "host-b.xml").write_text(_host_xml(4, 8, foreign="busy-1"), encoding="utf-8")
        (tmp / "web.xml").write_text(TEMPLATE, encoding="utf-8")
        self.hosts = {"host-a": f"test://{tmp / 'host-a.xml'}", "host-b": f"test://{tmp / 'host-b.xml'}"}
        self.template_xml = str(tmp / "web.xml")
        self.clock = Clock(T0)
        self.store = store
        self.arbiter = Arbiter(self.clock)
        self.built: dict[str, Provider] = {}
        self.model = ClusterModel()
        self.svc = AutoscaleService(store, self.model, self.provider_for, None, self.arbiter, self.clock)

    def provider_for(self, template: LaunchTemplate) -> Provider:
        # As the control plane does: the registry builds it from the template's
        # params, once, and the same instance serves every later tick (a fresh
        # connection would see a fresh test:/// host).
        key = repr(sorted(template.params.items()))
        if key not in self.built:
            self.built[key] = open_provider(template.provider, dict(template.params))
        return self.built[key]

    def provider(self) -> LibvirtProvider:
        (p,) = self.built.values()
        assert isinstance(p, LibvirtProvider)
        return p

    def spec(self, desired: int) -> GroupSpec:
        return GroupSpec(
            name="web",
            template=LaunchTemplate(
                provider="libvirt",
                vcpus=1,
                memory_mib=512,
                params={"hosts": self.hosts, "template_xml": self.template_xml, "call_timeout_s": 10},
            ),
            min_size=1,
            max_size=4,
            desired=desired,
            health_check_grace_s=60.0,
            default_warmup_s=0.0,
            drain_timeout_s=DRAIN_S,
            scheduled=[ScheduledAction(name="night", cron="0 22 * * *", desired=1)],
        )

    def domains(self) -> dict[str, dict[str, str]]:
        """Every domain on each host as libvirt lists it: ``host -> {name: state}``."""
        states = {
            libvirt.VIR_DOMAIN_RUNNING: "running",
            libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
            libvirt.VIR_DOMAIN_PAUSED: "paused",
        }

        def listing(conn: Any) -> dict[str, str]:
            return {d.name(): states.get(d.state()[0], str(d.state()[0])) for d in conn.listAllDomains(0)}

        p = self.provider()
        # The provider's own connection: the only one that sees its test:/// hosts' state.
        return {h: p._call(h, listing, "the test's listing") for h in sorted(self.hosts)}

    def tick(self, dt: float = 1.0) -> list[dict[str, object]]:
        self.clock.t += dt
        return self.svc.tick()

    def close(self) -> None:
        self.svc.close()
        for p in self.built.values():
            p.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    store = open_store("sqlite:///" + str(tmp_path / "tele.db"))
    r = Rig(tmp_path, store)
    try:
        yield r
    finally:
        r.close()
        store.close()
    # Every host's worker thread (and its connection) ended with the provider.
    assert [t.name for t in threading.enumerate() if t.name.startswith("libvirt-")] == []


def kinds(events: list[dict[str, object]]) -> list[str]:
    return [str(e["kind"]) for e in events]


def of_kind(events: list[dict[str, object]], kind: str) -> list[dict[str, object]]:
    return [e for e in events if e["kind"] == kind]


def test_a_group_scales_out_over_two_hosts_and_in_with_a_drain(rig: Rig) -> None:
    assert rig.svc.put_group(rig.spec(desired=1)) == "created"

    # desired 1: one VM, defined and running, on the host with the most room.
    events = rig.tick()
    assert kinds(events) == ["autoscale.launch"]
    assert events[0]["instance"] == "web-0001"
    assert events[0]["host"] == "host-a"
    assert rig.domains() == {"host-a": {"web-0001": "running"}, "host-b": {"busy-1": "running"}}
    events = rig.tick()
    assert kinds(events) == ["autoscale.in_service"]
    assert "web-0001 is running" in str(events[0]["reason"])

    # desired 3: two more, spread: host-b (none of the group yet), then host-a (more free vCPUs).
    assert rig.svc.put_group(rig.spec(desired=3)) == "updated"
    events = rig.tick()
    assert kinds(events) == ["autoscale.capacity_set", "autoscale.launch", "autoscale.launch"]
    assert "1/4/1 -> 1/4/3" in str(events[0]["reason"])
    assert [(e["instance"], e["host"]) for e in events[1:]] == [
        ("web-0002", "host-b"),
        ("web-0003", "host-a"),
    ]
    assert all("(desired 3)" in str(e["reason"]) for e in events[1:])
    assert rig.domains() == {
        "host-a": {"web-0001": "running", "web-0003": "running"},
        "host-b": {"busy-1": "running", "web-0002": "running"},
    }
    assert kinds(rig.tick()) == ["autoscale.in_service", "autoscale.in_service"]
    assert kinds(rig.tick()) == []  # at desired: nothing to do, nothing to say
    state = rig.svc.group_state("web")
    assert state is not None
    assert {(i.id, i.state, i.host) for i in state.instances} == {
        ("web-0001", "in_service", "host-a"),
        ("web-0002", "in_service", "host-b"),
        ("web-0003", "in_service", "host-a"),
    }

    # 22:00: the scheduled action lowers desired to 1; the two oldest are drained first.
    rig.clock.t = T0 + 3600.0 - 1.0
    assert kinds(rig.tick(0.0)) == []
    events = rig.tick(1.0)
    assert kinds(events) == ["autoscale.scheduled", "autoscale.drain", "autoscale.drain"]
    assert "scheduled action night ('0 22 * * *') set min/max/desired 1/4/3 -> 1/4/1" in str(
        events[0]["reason"]
    )
    assert [e["instance"] for e in events[1:]] == ["web-0001", "web-0002"]
    for e in events[1:]:
        assert f"(scale-in to 1); drain hook waits up to {DRAIN_S:.0f} s" in str(e["reason"])
        assert rig.arbiter.claimed(str(e["instance"])) == "autoscale"
    drain_began = rig.clock.t
    # While they drain, the VMs still run: nothing is terminated before the hook's timeout.
    rig.clock.t = drain_began + DRAIN_S - 1.0
    assert kinds(rig.tick(0.0)) == []
    assert rig.domains()["host-b"] == {"busy-1": "running", "web-0002": "running"}
    assert set(rig.domains()["host-a"]) == {"web-0001", "web-0003"}

    events = rig.tick(1.0)
    assert kinds(events) == ["autoscale.terminate", "autoscale.terminate"]
    assert [e["instance"] for e in events] == ["web-0001", "web-0002"]
    for e in events:
        assert "(scale-in to 1; drain timeout reached)" in str(e["reason"])
        assert rig.arbiter.claimed(str(e["instance"])) is None
    # Gone from libvirt (not only stopped); the VM cloudmon did not create is untouched.
    assert rig.domains() == {"host-a": {"web-0003": "running"}, "host-b": {"busy-1": "running"}}
    described = rig.provider().describe(["web-0001", "web-0002", "web-0003"])
    assert {k: v.state for k, v in described.items()} == {
        "web-0001": InstanceState.MISSING,
        "web-0002": InstanceState.MISSING,
        "web-0003": InstanceState.RUNNING,
    }
    assert kinds(rig.tick()) == []

    # The activity history, oldest first: events of one tick share its time (and no order).
    history = rig.svc.activity("web")
    by_time: dict[float, list[str]] = {}
    for e in history:
        by_time.setdefault(float(e["ts"]) - T0, []).append(str(e["kind"]).removeprefix("autoscale."))  # type: ignore[arg-type]
    t_drain = drain_began - T0
    assert sorted((t, sorted(k)) for t, k in by_time.items()) == [
        (0.0, ["group_put"]),
        (1.0, ["launch"]),
        (2.0, ["group_put", "in_service"]),
        (3.0, ["capacity_set", "launch", "launch"]),
        (4.0, ["in_service", "in_service"]),
        (t_drain, ["drain", "drain", "scheduled"]),
        (t_drain + DRAIN_S, ["terminate", "terminate"]),
    ]
    assert "provider libvirt" in str(history[-1]["reason"])  # the first put


def test_a_forced_delete_removes_every_vm_and_then_the_group(rig: Rig) -> None:
    rig.svc.put_group(rig.spec(desired=2))
    assert kinds(rig.tick()) == ["autoscale.launch", "autoscale.launch"]
    assert rig.domains() == {
        "host-a": {"web-0001": "running"},
        "host-b": {"busy-1": "running", "web-0002": "running"},
    }
    assert rig.svc.delete_group("web", force=True) is False
    events = rig.tick()
    # Forced: no drain wait; the VMs go on the next tick, then the group.
    assert kinds(events) == [
        "autoscale.in_service",
        "autoscale.in_service",
        "autoscale.drain",
        "autoscale.drain",
    ]
    assert all("group deleted with force" in str(e["reason"]) for e in of_kind(events, "autoscale.drain"))
    events = rig.tick()
    assert kinds(events) == ["autoscale.terminate", "autoscale.terminate", "autoscale.group_deleted"]
    assert rig.domains() == {"host-a": {}, "host-b": {"busy-1": "running"}}
    assert rig.svc.group("web") is None
    assert rig.svc.group_state("web") is None


def test_a_step_policy_scales_out_on_the_vm_cpu_that_its_host_agent_reports(rig: Rig) -> None:
    # A libvirt VM has no agent of its own here: the host's agent reports it as
    # vm.<name>.* (cloudmon_agent.collectors.vms), the way a hypervisor measures
    # an EC2 instance's CPUUtilization.  Fed into the model as that agent would.
    def report(host: str, vms: dict[str, float]) -> None:
        values = {"cpu.percent": 20.0}
        for name, cpu in vms.items():
            values |= {f"vm.{name}.cpu_percent": cpu, f"vm.{name}.host_cpu_percent": cpu / 8}
        rig.model.update(host, host, rig.clock.t, 1.0, values, {}, now=rig.clock.t)

    hot = StepScalingPolicy(
        name="hot",
        alarm=Alarm(threshold=80.0, duration_s=60.0),
        steps=[Step(lower=0.0, adjustment=1)],
        cooldown_s=120.0,
    )
    rig.svc.put_group(msgspec.structs.replace(rig.spec(desired=1), policies=[hot], scheduled=[]))
    assert kinds(rig.tick()) == ["autoscale.no_action", "autoscale.launch"]  # no data yet
    assert kinds(rig.tick()) == ["autoscale.in_service"]
    report("host-a", {"web-0001": 95.0})
    events = rig.tick()
    assert [str(e["reason"]) for e in of_kind(events, "autoscale.no_action")] == [
        "average cpu.percent 95.0 > 80.0 for 0 s of the 60 s the alarm needs"
    ]
    for _ in range(120):
        rig.clock.t += 1.0
        report("host-a", {"web-0001": 95.0})
        events = rig.svc.tick()
        if "autoscale.scale_out" in kinds(events):
            break
    assert kinds(events) == ["autoscale.scale_out", "autoscale.launch"]
    assert events[0]["numbers"]["value"] == 95.0  # type: ignore[index]
    assert events[0]["numbers"]["held_s"] == 60.0  # type: ignore[index]
    assert (events[1]["instance"], events[1]["host"]) == ("web-0002", "host-b")
    assert rig.domains()["host-b"] == {"busy-1": "running", "web-0002": "running"}
    # The other host's agent reports the new VM; the average is under the threshold.
    rig.clock.t += 1.0
    report("host-a", {"web-0001": 50.0})
    report("host-b", {"web-0002": 40.0})
    events = rig.svc.tick()
    assert kinds(events) == ["autoscale.in_service", "autoscale.no_action"]
    assert str(events[1]["reason"]) == "alarm hot is OK: average cpu.percent 45.0"


def test_vm_values_prefer_the_named_host_follow_a_migration_and_skip_stale_hosts() -> None:
    model = ClusterModel(node_timeout=5.0)
    model.update(
        "n-a", "host-a", 100.0, 1.0, {"vm.web-1.cpu_percent": 70.0, "vm.web-1.mem_rss": 5.0}, {}, now=100.0
    )
    model.update("n-b", "host-b", 100.0, 1.0, {"vm.web-1.cpu_percent": 30.0}, {}, now=100.0)
    # By hostname or node id; the named host wins over another that also reports it.
    assert vm_values(model, "web-1", "host-b", 101.0) == {"cpu_percent": 30.0, "cpu.percent": 30.0}
    assert vm_values(model, "web-1", "n-a", 101.0) == {
        "cpu_percent": 70.0,
        "mem_rss": 5.0,
        "cpu.percent": 70.0,
    }
    # Moved away from its recorded host: found where it runs now.
    model.update("n-b", "host-b", 102.0, 1.0, {"cpu.percent": 1.0}, {}, now=102.0)
    assert vm_values(model, "web-1", "host-b", 103.0)["cpu.percent"] == 70.0
    # host-a's agent went silent: its last values are stale, not the VM's.
    assert vm_values(model, "web-1", "host-a", 106.0) == {}
    assert vm_values(model, "web-2", None, 101.0) == {}


def test_the_control_plane_builds_the_provider_from_the_template_and_shows_the_vms_cpu(
    rig: Rig, tmp_path: Path
) -> None:
    # The control plane's own provider factory (template.params -> the registry) and
    # its group view; the host agent reports the VM as vm.<name>.* as above.
    store = open_store("sqlite:///" + str(tmp_path / "plane.db"))
    model = ClusterModel()
    plane = ControlPlane(store, model, CommandQueue(rig.clock), clock=rig.clock, balance_every_s=1e9)
    try:
        cpu50 = TargetTrackingPolicy(name="cpu50", target=50.0)
        spec = msgspec.structs.replace(rig.spec(desired=1), policies=[cpu50], scheduled=[])
        plane.autoscale.put_group(spec)
        rig.clock.t += 1.0
        plane.tick()
        rig.clock.t += 1.0
        plane.tick()
        model.update(
            "host-a", "host-a", rig.clock.t, 1.0, {"vm.web-0001.cpu_percent": 90.0}, {}, now=rig.clock.t
        )
        (view,) = plane.groups_view()
        assert [(i["id"], i["state"], i["cpu_percent"]) for i in view["instances"]] == [
            ("web-0001", "in_service", 90.0)
        ]
        assert view["metric"] == {"name": "cpu.percent", "value": 90.0, "target": 50.0}
        rig.clock.t += 1.0
        plane.tick()
        last_tick = {str(e["kind"]): e for e in plane.group_activity("web", 10) if e["ts"] == rig.clock.t}
        assert sorted(last_tick) == ["autoscale.launch", "autoscale.scale_out"]
        assert last_tick["autoscale.scale_out"]["numbers"]["to"] == 2  # type: ignore[index]
        (view,) = plane.groups_view()
        assert view["desired"] == 2  # ceil(1 * 90 / 50)
        assert [(i["id"], i["host"]) for i in view["instances"]] == [
            ("web-0001", "host-a"),
            ("web-0002", "host-b"),
        ]
    finally:
        plane.close()
        store.close()
