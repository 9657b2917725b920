"""Plain-data helpers for the auto-scaling tests: specs and a tiny world that grants every action."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cloudmon.autoscale.controller import (
    Decision,
    Observation,
    decide,
    mark_deleted,
    mark_draining,
    mark_launched,
    new_instance_name,
)
from cloudmon.autoscale.model import GroupSpec, GroupState, Instance, initial_state
from cloudmon.providers.base import InstanceState

# 2023-11-14 22:13:20 UTC; tests that need wall-clock alignment compute their own.
T0 = 1_700_000_000.0


def make_spec(**kw: Any) -> GroupSpec:
    """A group spec with test-friendly defaults (no warm-up, no grace)."""
    base: dict[str, Any] = {
        "name": "web",
        "min_size": 1,
        "max_size": 10,
        "desired": 2,
        "default_warmup_s": 0.0,
        "health_check_grace_s": 300.0,
        "drain_timeout_s": 30.0,
    }
    base.update(kw)
    return GroupSpec(**base)


def running(
    state: GroupState, now: float, values: dict[str, dict[str, float]] | None = None
) -> dict[str, Observation]:
    """Every instance running and reporting now, with optional per-instance values."""
    return {
        i.id: Observation(state=InstanceState.RUNNING, values=(values or {}).get(i.id, {}), last_report=now)
        for i in state.instances
    }


def in_service(state: GroupState, n: int, since: float) -> None:
    """Put ``n`` in-service instances into ``state`` (launched and in service at ``since``)."""
    for _ in range(n):
        name = new_instance_name(state)
        state.instances.append(
            Instance(
                id=name,
                group=state.group,
                state="in_service",
                node_id=name,
                launched_at=since,
                in_service_at=since,
            )
        )


@dataclass
class World:
    """Runs the pure controller against a simulated workload, granting every action at once.

    Per-instance ``cpu.percent`` = demand / in-service instances (warming ones
    included: they take traffic, they just do not report into the aggregate yet).
    """

    spec: GroupSpec
    now: float = T0
    boot_s: float = 0.0
    state: GroupState = field(init=False)
    events: list[dict[str, object]] = field(default_factory=list)
    actions: int = 0
    capacity_log: list[tuple[float, int, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state = initial_state(self.spec)

    def cpu(self, demand: float) -> float:
        n = sum(1 for i in self.state.instances if i.state == "in_service")
        return 100.0 if n == 0 else min(100.0, demand / n)

    def step(self, dt: float, demand: float, metric: Callable[[float], float] | None = None) -> Decision:
        self.now += dt
        cpu = self.cpu(demand) if metric is None else metric(demand)
        obs = {
            i.id: Observation(
                state=InstanceState.RUNNING
                if self.now - i.launched_at >= self.boot_s
                else InstanceState.PENDING,
                values={"cpu.percent": cpu},
                last_report=self.now,
            )
            for i in self.state.instances
        }
        dec = decide(self.spec, self.state, self.now, obs)
        st = dec.state
        for iid in dec.delete:
            mark_deleted(st, iid)
        for iid in dec.drain:
            mark_draining(st, iid, self.now, self.now + self.spec.drain_timeout_s, "scale-in")
        for k in range(dec.launch):
            name = new_instance_name(st)
            mark_launched(
                st,
                Instance(id=name, group=st.group, node_id=name, launched_at=self.now),
                mandatory=k < dec.mandatory_launches,
            )
        self.actions += sum(
            1 for e in dec.events if e["kind"] in ("autoscale.scale_out", "autoscale.scale_in")
        )
        self.events.extend(dec.events)
        self.state = st
        self.capacity_log.append((self.now, st.min_size, st.desired, st.max_size))
        return dec
