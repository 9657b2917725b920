"""An auto-scaling group scales out by one real QEMU VM under a real libvirtd, and back.

Nothing is faked: one libvirtd "host" in its own namespaces
(:mod:`tests.integration.vmhost`), the group's :class:`LibvirtProvider` built
from its launch template through the provider registry, the real
:class:`AutoscaleService` with the embedded store, a live cluster model and the
arbiter.  The VM is a copy-on-write qcow2 overlay on the test guest's disk,
defined from a template domain XML (the lab's own bootable TCG guest), and the
test waits until its init answers on the serial console: a VM that boots, not
only a QEMU process.  The host's agent's own VM collector measures the
guest burning CPU, and the group's step policy sees that figure.  The service's clock is controlled by the test, so the drain
hook's timeout passes without waiting; libvirt, QEMU and the guest run in real time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from cloudmon.autoscale.model import Alarm, GroupSpec, LaunchTemplate, Step, StepScalingPolicy
from cloudmon.autoscale.service import AutoscaleService
from cloudmon.control.arbiter import Arbiter
from cloudmon.model.cluster import ClusterModel
from cloudmon.providers import open_provider
from cloudmon.providers.base import InstanceState, Provider
from cloudmon.store import open_store
from cloudmon_agent.schema import flatten
from tests.integration import vmhost
from tests.integration.poster import make_report

pytestmark = [pytest.mark.qemu, pytest.mark.integration]

libvirt = pytest.importorskip("libvirt")

from cloudmon_agent.collectors.vms import VmCollector  # noqa: E402

T0 = datetime(2024, 1, 1, 12, 0, tzinfo=UTC).timestamp()
DRAIN_S = 5.0
#: A guest burning its one vCPU is above this even on a busy 2-core machine (TCG).
BUSY = 20.0
#: The group's first instance (instance names are ``<group>-<seq>``).
VM = "web-0001"


class Clock:
    """The service's clock; the test moves it."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _template(host: vmhost.VmHost, image: vmhost.GuestImage) -> str:
    """The lab's bootable TCG guest as a template; its console socket is named after ``VM``.

    A template has one console path, so every clone would bind the same socket:
    fine for the one instance this group launches.
    """
    guest = vmhost.Guest(VM, host, image, address="10.213.0.2", peer="10.213.0.1", tap="cmtap0")
    return host.guest_xml(guest).replace(f"<name>{VM}</name>", "<name>template</name>", 1)


def _guest_pid(host: vmhost.VmHost, name: str) -> int | None:
    """The pid of the guest's QEMU process (from libvirt's pid file, checked to be QEMU)."""
    try:
        pid = int(host.run_path("libvirt", "qemu", f"{name}.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"qemu-system" in cmdline else None


def _alive(pid: int) -> bool:
    try:
        return b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _domains(host: vmhost.VmHost) -> dict[str, bool]:
    """Every domain libvirtd has, defined or running: ``name -> active``."""
    return {d.name(): bool(d.isActive()) for d in host.conn().listAllDomains(0)}


def test_a_group_scales_out_by_one_real_vm_and_back(tmp_path: Path) -> None:
    missing = vmhost.missing_prerequisites()
    if missing:
        pytest.skip("real QEMU guests need: " + ", ".join(missing))
    image = vmhost.ensure_guest_image()
    overlays = tmp_path / "overlays"
    clock = Clock(T0)
    store = open_store("sqlite:///" + str(tmp_path / "tele.db"))
    built: list[Provider] = []
    lab = vmhost.VmLab()
    svc: AutoscaleService | None = None
    try:
        host = lab.add_host("h0")
        lab.start()
        template = tmp_path / "guest.xml"
        template.write_text(_template(host, image), encoding="utf-8")
        host.run_path("cloudmon-guest").mkdir(parents=True, exist_ok=True)

        def provider_for(t: LaunchTemplate) -> Provider:
            # Built once from the template, as the control plane does, and kept.
            if not built:
                built.append(open_provider(t.provider, dict(t.params)))
            return built[0]

        model = ClusterModel()
        svc = AutoscaleService(store, model, provider_for, None, Arbiter(clock), clock)
        events: list[dict[str, object]] = []

        def tick_until(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
            assert svc is not None
            deadline = time.monotonic() + timeout
            while True:
                clock.t += 1.0
                events.extend(svc.tick())
                # So that the lab kills it by pid even if the test fails from here on.
                lab.pids.update(host.qemu_pids())
                if cond():
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}; events: {events}")
                time.sleep(0.05)

        def spec(desired: int) -> GroupSpec:
            return GroupSpec(
                name="web",
                template=LaunchTemplate(
                    provider="libvirt",
                    vcpus=1,
                    memory_mib=128,
                    params={
                        "hosts": {"h0": host.uri},
                        "template_xml": str(template),
                        "base_image": str(image.disk),
                        "base_format": "raw",
                        "overlay_dir": str(overlays),
                        "stop_timeout_s": 2,
                    },
                ),
                min_size=0,
                max_size=2,
                desired=desired,
                health_check_grace_s=120.0,
                default_warmup_s=0.0,
                drain_timeout_s=DRAIN_S,
                # Never held long enough to act: it shows what the policy measures.
                policies=[
                    StepScalingPolicy(
                        name="busy",
                        alarm=Alarm(threshold=BUSY, duration_s=3600.0),
                        steps=[Step(lower=0.0, adjustment=1)],
                    )
                ],
            )

        def instance_state() -> str | None:
            assert svc is not None
            st = svc.group_state("web")
            return next((i.state for i in st.instances if i.id == VM), None) if st is not None else None

        svc.put_group(spec(desired=0))
        clock.t += 1.0
        assert [e["kind"] for e in svc.tick()] == ["autoscale.no_action"]  # the policy: no data
        assert _domains(host) == {}

        # Scale out by one: a real VM, running in QEMU, booted far enough to answer.
        svc.put_group(spec(desired=1))
        tick_until(lambda: instance_state() == "in_service", "the instance in service")
        assert _domains(host) == {VM: True}
        pid = _guest_pid(host, VM)
        assert pid is not None, "libvirt says running but there is no QEMU process"
        assert (overlays / f"{VM}.qcow2").is_file()
        guest = vmhost.Guest(VM, host, image, address="10.213.0.2", peer="10.213.0.1", tap="cmtap0")
        try:
            guest.wait_ready(timeout=60.0)
            assert guest.console.boot_id
            guest.console.command("cpu", "on")
        finally:
            guest.console.close()
        # The host's agent measures it (its VM collector on the real libvirtd, its
        # report flattened as the collector stores it) and the policy sees the figure.
        collector = VmCollector(host.uri)
        try:
            cpu = 0.0
            deadline = time.monotonic() + 20.0
            while cpu <= BUSY:
                assert time.monotonic() < deadline, f"the guest's CPU never went above {BUSY} %"
                time.sleep(0.2)  # CPU time accumulates between two samples
                vms = collector.collect()
                cpu = next((v.cpu_percent for v in vms if v.name == VM), 0.0)
        finally:
            collector.close()
        report = msgspec.structs.replace(make_report("h0", clock.t, 0), vms=vms)
        model.update(report.node_id, report.node.hostname, clock.t, 1.0, flatten(report), {}, now=clock.t)
        clock.t += 1.0
        pending = [e for e in svc.tick() if e.get("code") == "alarm_pending"]
        assert len(pending) == 1, pending
        assert pending[0]["numbers"]["value"] == cpu  # type: ignore[index]
        assert f"average cpu.percent {cpu:.1f} > {BUSY:.1f} for 0 s" in str(pending[0]["reason"])
        events = [e for e in events if e["kind"] != "autoscale.no_action"]
        assert [str(e["kind"]) for e in events] == [
            "autoscale.capacity_set",
            "autoscale.launch",
            "autoscale.in_service",
        ]
        assert (events[1]["instance"], events[1]["host"]) == (VM, "h0")
        assert "(desired 1)" in str(events[1]["reason"])
        (provider,) = built
        assert provider.describe([VM])[VM].state is InstanceState.RUNNING

        # And back: drained (the hook's timeout on the service's clock), then deleted.
        svc.put_group(spec(desired=0))
        events.clear()
        tick_until(lambda: instance_state() is None, "the instance terminated", timeout=60.0)
        events = [e for e in events if e["kind"] != "autoscale.no_action"]
        assert [str(e["kind"]) for e in events] == [
            "autoscale.capacity_set",
            "autoscale.drain",
            "autoscale.terminate",
        ]
        assert f"(scale-in to 0); drain hook waits up to {DRAIN_S:.0f} s" in str(events[1]["reason"])
        assert "(scale-in to 0; drain timeout reached)" in str(events[2]["reason"])
        assert float(events[2]["ts"]) - float(events[1]["ts"]) == DRAIN_S  # type: ignore[arg-type]
        assert _domains(host) == {}
        assert provider.describe([VM])[VM].state is InstanceState.MISSING
        assert not (overlays / f"{VM}.qcow2").exists()
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), f"QEMU process {pid} outlived the deletion of its VM"
        # The activity history, oldest first; events of one tick share its time (and no order).
        by_time: dict[float, list[str]] = {}
        for e in svc.activity("web"):
            if e["kind"] == "autoscale.no_action":
                continue
            by_time.setdefault(float(e["ts"]), []).append(str(e["kind"]).removeprefix("autoscale."))  # type: ignore[arg-type]
        assert [sorted(by_time[t]) for t in sorted(by_time)] == [
            ["group_put"],
            ["group_put"],
            ["capacity_set", "launch"],
            ["in_service"],
            ["group_put"],
            ["capacity_set", "drain"],
            ["terminate"],
        ]
    finally:
        if svc is not None:
            svc.close()
        for p in built:
            p.close()
        store.close()
        lab.close()
    left = list(vmhost.iter_leftovers(lab))
    assert not left, f"the lab left things behind: {left}"
    assert list(overlays.glob("*")) == []
