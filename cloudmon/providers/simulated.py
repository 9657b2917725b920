"""Simulated instances for the demo and load tests: clearly labelled, never real.

Options (provider ``simulated``)::

    hosts = {"sim-host-1" = {vcpus = 16, memory_mib = 65536}, ...}   # or a count: hosts = 3
    boot_delay_s = 5           # PENDING this long after create, then RUNNING
    collector_url = "http://127.0.0.1:8470"   # with token: instances report as simulated agents
    token = "..."

or, in code, ``simulator = <cloudmon.sim.Simulator>`` to share one simulator
(the demo does this).  With a simulator, each instance becomes a simulated node
(node id ``sim-<name>``, :attr:`InstanceInfo.node_id`) whose agent starts
reporting when its boot delay is over, and its VM appears on its host's report.
Without one, instances are only recorded.  Host names always start with
``sim-``.  A host entry may carry ``vcpus_used``/``memory_mib_used``: what other
(non-group) VMs already take there.

Boot is computed from the clock, not timed by a thread: the provider owns no
thread unless it built its own simulator from ``collector_url``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cloudmon.providers.base import InstanceInfo, InstanceState, LaunchRequest, ProviderError
from cloudmon.providers.placement import HostCapacity, place
from cloudmon.sim.simulator import Simulator, sim_name

DEFAULT_HOST = {"vcpus": 16.0, "memory_mib": 65536.0, "vcpus_used": 0.0, "memory_mib_used": 0.0}


@dataclass
class _Record:
    info: InstanceInfo
    ready_at: float
    vcpus: int
    memory_mib: int


def _hosts(value: Any) -> dict[str, dict[str, float]]:
    if value is None:
        value = 3
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ProviderError(f"simulated provider: hosts must be >= 1, got {value}")
        return {f"sim-host-{i}": dict(DEFAULT_HOST) for i in range(1, value + 1)}
    if not isinstance(value, Mapping) or not value:
        raise ProviderError(
            "simulated provider: hosts must be a count or a table {NAME = {vcpus = N, memory_mib = M}}"
        )
    out: dict[str, dict[str, float]] = {}
    for name, spec in value.items():
        spec = spec if isinstance(spec, Mapping) else {}
        try:
            out[sim_name(str(name))] = {
                "vcpus": float(spec.get("vcpus", DEFAULT_HOST["vcpus"])),
                "memory_mib": float(spec.get("memory_mib", DEFAULT_HOST["memory_mib"])),
                "vcpus_used": float(spec.get("vcpus_used", 0.0)),
                "memory_mib_used": float(spec.get("memory_mib_used", 0.0)),
            }
        except (TypeError, ValueError):
            raise ProviderError(
                f"simulated provider: host {name!r} has non-numeric figures: {spec!r}"
            ) from None
    return out


class SimulatedProvider:
    """Instances that are simulated nodes (see the module doc)."""

    name = "simulated"

    def __init__(self, options: Mapping[str, Any], clock: Callable[[], float] | None = None) -> None:
        self._hosts = _hosts(options.get("hosts"))
        try:
            self.boot_delay_s = float(options.get("boot_delay_s", 5.0))
        except (TypeError, ValueError):
            raise ProviderError(
                f"simulated provider: boot_delay_s must be a number, got {options['boot_delay_s']!r}"
            ) from None
        sim = options.get("simulator")
        self._own_sim = False
        if sim is None and options.get("collector_url"):
            sim = Simulator(str(options["collector_url"]), options.get("token"), clock=clock or time.time)
            self._own_sim = True
        if sim is not None and not isinstance(sim, Simulator):
            raise ProviderError(
                f"simulated provider: simulator must be a cloudmon.sim.Simulator, got {sim!r}"
            )
        self.simulator: Simulator | None = sim
        self._clock = clock or (sim.clock if sim is not None else time.time)
        if sim is not None:
            for host, figures in self._hosts.items():
                sim.add_host(host, int(figures["vcpus"]), int(figures["memory_mib"]))
            if self._own_sim:
                sim.start()
        self._lock = threading.Lock()
        self._records: dict[str, _Record] = {}
        self._closed = False

    def _state(self, rec: _Record, now: float) -> InstanceState:
        return InstanceState.RUNNING if now >= rec.ready_at else InstanceState.PENDING

    def hosts(self) -> Mapping[str, Mapping[str, float]]:
        """Each simulated host's size and what its instances (and other VMs) take."""
        if self.simulator is not None:
            # The simulator knows where every VM and instance is now (they migrate).
            usage = self.simulator.host_usage()
            with self._lock:
                return {h: {**f, **usage.get(h, {})} for h, f in self._hosts.items()}
        with self._lock:
            out = {h: dict(f) for h, f in self._hosts.items()}
            for rec in self._records.values():
                host = out[rec.info.host or ""]
                host["vcpus_used"] += rec.vcpus
                host["memory_mib_used"] += rec.memory_mib
        return out

    def create(self, request: LaunchRequest) -> InstanceInfo:
        """Record a simulated instance (and start its simulated agent when there is a simulator)."""
        with self._lock:
            if self._closed:
                raise ProviderError("the simulated provider is closed")
            existing = self._records.get(request.name)
        if existing is not None:
            return self.describe([request.name])[request.name]  # a retried create
        figures = self.hosts()
        if request.host is not None:
            host = sim_name(request.host)
            if host not in figures:
                raise ProviderError(f"no simulated host {request.host!r}; known: {sorted(figures)}")
        else:
            with self._lock:
                per_host: dict[str, int] = {}
                for rec in self._records.values():
                    if rec.info.group == request.group and rec.info.host:
                        per_host[rec.info.host] = per_host.get(rec.info.host, 0) + 1
            host = place(
                [HostCapacity.from_figures(h, f, per_host.get(h, 0)) for h, f in figures.items()],
                request.vcpus,
                request.memory_mib,
                what=f"simulated instance {request.name} of group {request.group}",
            )
        now = self._clock()
        node_id = sim_name(request.name)
        if self.simulator is not None:
            self.simulator.add_instance(
                request.name, request.group, host, request.vcpus, request.memory_mib, now + self.boot_delay_s
            )
        info = InstanceInfo(
            id=request.name,
            group=request.group,
            state=InstanceState.PENDING if self.boot_delay_s > 0 else InstanceState.RUNNING,
            host=host,
            node_id=node_id,
            created=now,
        )
        with self._lock:
            self._records[request.name] = _Record(
                info, now + self.boot_delay_s, request.vcpus, request.memory_mib
            )
        return info

    def delete(self, instance_id: str) -> None:
        """Forget the instance and stop its simulated agent; a missing one is fine."""
        with self._lock:
            self._records.pop(instance_id, None)
        if self.simulator is not None:
            self.simulator.remove_instance(instance_id)

    def describe(self, instance_ids: list[str]) -> dict[str, InstanceInfo]:
        """PENDING until the boot delay is over, then RUNNING; unknown ids are MISSING."""
        now = self._clock()
        out: dict[str, InstanceInfo] = {}
        with self._lock:
            for iid in instance_ids:
                rec = self._records.get(iid)
                if rec is None:
                    out[iid] = InstanceInfo(id=iid, group="", state=InstanceState.MISSING)
                else:
                    i = rec.info
                    # A rebalanced instance is where the simulator has it now.
                    host = (self.simulator.vm_host(iid) if self.simulator is not None else None) or i.host
                    out[iid] = InstanceInfo(
                        id=i.id,
                        group=i.group,
                        state=self._state(rec, now),
                        host=host,
                        node_id=i.node_id,
                        created=i.created,
                    )
        return out

    def fail(self, instance_id: str) -> None:
        """Make an instance's agent fall silent (its VM still "runs"): a health-check failure."""
        if self.simulator is None:
            raise ProviderError("simulated provider: fail() needs a simulator (instances have no agents)")
        self.simulator.set_reporting(instance_id, False)

    def close(self) -> None:
        """Stop the simulator if this provider built it (idempotent)."""
        with self._lock:
            self._closed = True
        if self._own_sim and self.simulator is not None:
            self.simulator.close()
