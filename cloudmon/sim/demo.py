"""The simulated cluster behind ``cloudmon demo``.

:func:`build_demo` assembles three simulated hosts with a few VMs of their own
(one host carries a heavy mix, so rebalancing has something to recommend), a
:class:`~cloudmon.providers.simulated.SimulatedProvider` whose instances become
simulated nodes on those hosts, one auto-scaling group (``demo-web``: min 2,
max 8, target tracking on 50 % CPU) and a workload that rises, falls and spikes
every six minutes.  The caller (the CLI's composition root) puts
:attr:`Demo.group` into the auto-scaling service with :attr:`Demo.provider` as
the provider of its template (``provider = "simulated"``), then
:meth:`Demo.start`.  A new user then sees the group scale out to 6-8 instances
and back to 2 within a few minutes, and the Balance page recommend moving a VM
off ``sim-host-1``; approving the plan live-migrates it (the simulated hosts
execute ``vm.migrate`` and ``vm.state``, see :mod:`cloudmon.sim.simulator`).
Everything is labelled simulated: node ids and hostnames start with ``sim-``
and their OS reads ``simulated (cloudmon demo)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from cloudmon.autoscale.model import GroupSpec, LaunchTemplate, TargetTrackingPolicy
from cloudmon.providers.simulated import SimulatedProvider
from cloudmon.sim.simulator import Simulator
from cloudmon.sim.workload import Workload

DEMO_GROUP: Final = "demo-web"
DEMO_SEED: Final = 7
#: Host name -> (vCPUs, memory MiB, [(VM name, vCPUs, memory MiB, its load)]).
#: ``sim-host-1`` carries the heavy mix (a busy analytics VM beside two databases)
#: while the others are nearly idle, so the Balance page has a move to recommend
#: from the first minute; approving it live-migrates the VM (simulated).
DEMO_HOSTS: Final = {
    "sim-host-1": (
        16,
        65536,
        [
            ("sim-db-1", 4, 8192, Workload(low=25, high=50, spike=65, seed=1)),
            ("sim-analytics-1", 8, 16384, Workload(low=45, high=90, spike=100, period_s=300, seed=4)),
            ("sim-db-2", 4, 8192, Workload(low=20, high=40, spike=55, period_s=420, seed=5)),
        ],
    ),
    "sim-host-2": (16, 65536, [("sim-cache-1", 2, 4096, Workload(low=10, high=25, spike=40, seed=2))]),
    "sim-host-3": (
        16,
        65536,
        [("sim-batch-1", 4, 8192, Workload(low=5, high=90, spike=100, period_s=240, seed=3))],
    ),
}


def demo_group() -> GroupSpec:
    """The demo's group: demo time scale (seconds, not the production defaults' minutes)."""
    return GroupSpec(
        name=DEMO_GROUP,
        template=LaunchTemplate(provider="simulated", image="sim-image", vcpus=2, memory_mib=2048),
        min_size=2,
        max_size=8,
        desired=2,
        health_check_grace_s=30.0,
        health_check_timeout_s=15.0,
        default_warmup_s=10.0,
        default_cooldown_s=20.0,
        drain_timeout_s=5.0,
        policies=[
            TargetTrackingPolicy(
                name="cpu-50",
                metric="cpu.percent",
                target=50.0,
                scale_out_cooldown_s=15.0,
                scale_in_cooldown_s=20.0,
                scale_in_after_s=30.0,
                scale_in_max_percent=50.0,
            )
        ],
    )


def demo_workload() -> Workload:
    """The group's demand: quiet (1 instance's worth), busy (≈6), a spike (≈8), every 6 minutes."""
    return Workload(low=50.0, high=280.0, spike=380.0, period_s=360.0, noise=0.05, seed=DEMO_SEED)


class Demo:
    """The demo's simulator, provider and group; :meth:`start` begins reporting, :meth:`close` ends it."""

    def __init__(self, simulator: Simulator, provider: SimulatedProvider, group: GroupSpec) -> None:
        self.simulator = simulator
        self.provider = provider
        self.group = group
        self._started = False

    def start(self) -> None:
        """Start the workload's clock and the simulated agents' reporting thread."""
        if not self._started:
            self._started = True
            self.simulator.set_workload(self.group.name, demo_workload())
            self.simulator.start()

    def close(self) -> None:
        """Stop every simulated node (idempotent)."""
        self.provider.close()
        self.simulator.close()


def build_demo(collector_url: str, token: str, clock: Callable[[], float] = time.time) -> Demo:
    """The demo cluster reporting to the collector at ``collector_url`` with ``token`` (not started)."""
    sim = Simulator(collector_url, token, clock=clock, seed=DEMO_SEED)
    hosts: dict[str, dict[str, float]] = {}
    for host, (vcpus, memory_mib, vms) in DEMO_HOSTS.items():
        sim.add_host(host, vcpus, memory_mib)
        for name, vm_vcpus, vm_mem, load in vms:
            sim.add_vm(host, name, vm_vcpus, vm_mem, load)
        hosts[host] = {
            "vcpus": vcpus,
            "memory_mib": memory_mib,
            "vcpus_used": sum(v[1] for v in vms),
            "memory_mib_used": sum(v[2] for v in vms),
        }
    provider = SimulatedProvider({"simulator": sim, "hosts": hosts, "boot_delay_s": 5.0}, clock=clock)
    return Demo(sim, provider, demo_group())
