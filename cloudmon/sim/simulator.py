"""Simulated nodes that speak the real protocol to the real collector.

A :class:`Simulator` holds simulated hosts (with VMs on them) and simulated
group instances (each a node with its own "agent").  Once per interval it builds
one real :class:`cloudmon_agent.schema.Report` per reporting node (hosts carry
a ``vms`` section) and POSTs them, as JSON arrays of up to 1,000 reports, over
the agent's own :class:`~cloudmon_agent.transport.HttpTransport` with the bearer
token.  One thread drives every node, however many there are.

A group's demand comes from its :class:`~cloudmon.sim.workload.Workload` and
is spread over its in-service instances (booted, reporting): each one's
``cpu.percent`` is ``demand / n`` (capped at 100), so adding instances lowers
each one's load as it would for a real stateless service.

Everything simulated says so: node ids and hostnames start with ``sim-`` and
the node's OS reads ``simulated (cloudmon demo)``.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import msgspec

from cloudmon.sim.workload import Workload
from cloudmon_agent.schema import (
    AgentStats,
    HostMetrics,
    NodeInfo,
    Report,
    Vm,
)
from cloudmon_agent.transport import HttpTransport, TransportError

log = logging.getLogger(__name__)

SIM_PREFIX: Final = "sim-"
SIM_OS: Final = "simulated (cloudmon demo)"
SIM_AGENT_VERSION: Final = "sim"
MiB: Final = 1024 * 1024
#: Reports per POST (the collector takes up to 1,000 per batch).
BATCH: Final = 500
_BAD_CHARS = re.compile(r"[^A-Za-z0-9._:@-]+")
_VM_NS: Final = uuid.UUID("6f1c7a8e-3b0d-4c55-9a57-1e0c5d2b9f01")


def sim_name(name: str) -> str:
    """``name`` as a simulated node id / hostname: allowed characters only, ``sim-`` in front."""
    clean = _BAD_CHARS.sub("-", name).strip("-") or "node"
    return clean if clean.startswith(SIM_PREFIX) else SIM_PREFIX + clean


@dataclass
class SimVm:
    """A VM on a simulated host that is not a group instance (its own steady-ish load)."""

    name: str
    vcpus: int
    memory_mib: int
    workload: Workload


@dataclass
class SimHost:
    """A simulated physical host; its report lists the VMs on it."""

    node_id: str
    vcpus: int
    memory_mib: int
    vms: dict[str, SimVm] = field(default_factory=dict)
    reporting: bool = True
    seq: int = 0


@dataclass
class SimInstance:
    """A group instance: a VM on a simulated host, with its own simulated agent."""

    name: str
    node_id: str
    group: str
    host: str
    vcpus: int
    memory_mib: int
    #: When its agent starts reporting (the end of its boot).
    start_at: float
    reporting: bool = True
    seq: int = 0


@dataclass
class SimStats:
    """What the simulator has sent so far."""

    ticks: int = 0
    reports_sent: int = 0
    posts_failed: int = 0
    last_error: str = ""


def _metrics(
    cpu: float, cores: int, mem_total: int, mem_used: int, net_bps: float, rng: random.Random
) -> HostMetrics:
    cpu = min(100.0, max(0.0, cpu))
    mem_used = min(mem_total, max(0, mem_used))
    per_core = [min(100.0, max(0.0, cpu * (0.8 + 0.4 * rng.random()))) for _ in range(min(cores, 64))]
    load = cpu / 100.0 * cores
    return HostMetrics(
        cpu_percent=cpu,
        cpu_per_core=per_core,
        mem_total=mem_total,
        mem_used=mem_used,
        mem_available=mem_total - mem_used,
        mem_percent=100.0 * mem_used / mem_total if mem_total else 0.0,
        swap_total=0,
        swap_used=0,
        swap_percent=0.0,
        disk_read_bps=cpu * 2_000.0,
        disk_write_bps=cpu * 5_000.0,
        disk_read_iops=cpu * 0.5,
        disk_write_iops=cpu * 1.2,
        net_rx_bps=net_bps,
        net_tx_bps=net_bps * 1.6,
        net_rx_pps=net_bps / 800.0,
        net_tx_pps=net_bps / 600.0,
        load1=load,
        load5=load * 0.9,
        load15=load * 0.8,
    )


class Simulator:
    """Simulated hosts, VMs and group instances reporting to one collector (see the module doc).

    ``collector_url=None`` builds reports without sending them (for tests and
    planners).  ``start()`` runs the reporting thread; ``close()`` stops it and
    drops the connection.  Adding and removing nodes is thread-safe.
    """

    def __init__(
        self,
        collector_url: str | None,
        token: str | None,
        *,
        clock: Callable[[], float] = time.time,
        interval_s: float = 1.0,
        seed: int = 0,
        timeout_s: float = 5.0,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self._clock = clock
        #: The clock report timestamps come from (the provider's boot delays use it too).
        self.clock = clock
        self._seed = seed
        self._transport = HttpTransport(collector_url, token, timeout=timeout_s) if collector_url else None
        self._lock = threading.Lock()
        self._hosts: dict[str, SimHost] = {}
        self._instances: dict[str, SimInstance] = {}
        self._workloads: dict[str, tuple[Workload, float]] = {}
        self._t0 = clock()  # time 0 of the other VMs' workloads
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self.stats = SimStats()

    # -- the simulated world --------------------------------------------------------

    def add_host(self, name: str, vcpus: int = 16, memory_mib: int = 65536) -> str:
        """Add a simulated host (idempotent by name); returns its node id."""
        node_id = sim_name(name)
        with self._lock:
            self._hosts.setdefault(node_id, SimHost(node_id, vcpus, memory_mib))
        return node_id

    def add_vm(self, host: str, name: str, vcpus: int, memory_mib: int, workload: Workload) -> None:
        """Put a VM that is not a group instance on ``host`` (it shows in the host's ``vms``)."""
        with self._lock:
            self._host(host).vms[name] = SimVm(name, vcpus, memory_mib, workload)

    def _host(self, host: str) -> SimHost:
        h = self._hosts.get(sim_name(host))
        if h is None:
            raise KeyError(f"no simulated host {host!r}; add it with add_host() first")
        return h

    def add_instance(
        self,
        name: str,
        group: str,
        host: str,
        vcpus: int = 1,
        memory_mib: int = 512,
        start_at: float | None = None,
    ) -> str:
        """Add a group instance on ``host``; its agent reports from ``start_at`` (default now).

        Returns the instance's node id.
        """
        node_id = sim_name(name)
        with self._lock:
            h = self._host(host)
            self._instances[name] = SimInstance(
                name,
                node_id,
                group,
                h.node_id,
                vcpus,
                memory_mib,
                self._clock() if start_at is None else start_at,
            )
        return node_id

    def remove_instance(self, name: str) -> bool:
        """Remove an instance (its VM leaves its host); whether it existed."""
        with self._lock:
            return self._instances.pop(name, None) is not None

    def set_reporting(self, name: str, on: bool) -> None:
        """Silence (or revive) an instance's agent or a host's, as a crashed node would be."""
        with self._lock:
            inst = self._instances.get(name)
            if inst is not None:
                inst.reporting = on
                return
            self._host(name).reporting = on

    def set_workload(self, group: str, workload: Workload, started: float | None = None) -> None:
        """The demand of ``group`` from now on (the curve's time 0 is ``started``, default now)."""
        with self._lock:
            self._workloads[group] = (workload, self._clock() if started is None else started)

    def node_ids(self) -> list[str]:
        """Node ids of every simulated host and instance."""
        with self._lock:
            return sorted([*self._hosts, *(i.node_id for i in self._instances.values())])

    def in_service(self, group: str, now: float) -> list[str]:
        """Names of the group's instances that have booted and report."""
        with self._lock:
            return self._in_service(group, now)

    def _in_service(self, group: str, now: float) -> list[str]:
        return sorted(
            i.name for i in self._instances.values() if i.group == group and i.reporting and i.start_at <= now
        )

    def instance_cpu(self, name: str, now: float) -> float:
        """CPU percent of one instance at ``now``: its group's demand over its in-service instances."""
        with self._lock:
            return self._instance_cpu(self._instances[name], now, {})

    def _instance_cpu(self, inst: SimInstance, now: float, served: dict[str, int]) -> float:
        if inst.start_at > now:
            return 5.0  # booting
        wl = self._workloads.get(inst.group)
        if wl is None:
            return 2.0
        workload, started = wl
        n = served.get(inst.group)
        if n is None:
            n = served[inst.group] = len(self._in_service(inst.group, now))
        share = workload.demand(now - started) / max(1, n)
        return min(100.0, share)

    # -- reports ----------------------------------------------------------------------

    def _node(self, hostname: str, cores: int) -> NodeInfo:
        return NodeInfo(hostname=hostname, os=SIM_OS, cpu_count=cores, agent_version=SIM_AGENT_VERSION)

    def build_reports(self, now: float | None = None) -> list[Report]:
        """One report per reporting node at ``now`` (default: the clock)."""
        ts = self._clock() if now is None else now
        out: list[Report] = []
        agent = AgentStats(cpu_ms=0.0, rss_bytes=0)
        with self._lock:
            served: dict[str, int] = {}
            cpu_of = {name: self._instance_cpu(i, ts, served) for name, i in self._instances.items()}
            by_host: dict[str, list[SimInstance]] = {}
            for inst in self._instances.values():
                by_host.setdefault(inst.host, []).append(inst)
            for name, inst in sorted(self._instances.items()):
                if not inst.reporting or inst.start_at > ts:
                    continue
                inst.seq += 1
                rng = random.Random(f"{self._seed}:{name}:{inst.seq}")
                cpu = cpu_of[name]
                total = inst.memory_mib * MiB
                used = int(total * (0.25 + 0.004 * cpu))
                metrics = _metrics(cpu, inst.vcpus, total, used, cpu * 40_000.0, rng)
                out.append(
                    Report(
                        v=1,
                        node_id=inst.node_id,
                        ts=ts,
                        seq=inst.seq,
                        interval=self.interval_s,
                        node=self._node(inst.node_id, inst.vcpus),
                        host=metrics,
                        agent=agent,
                    )
                )
            for node_id, host in sorted(self._hosts.items()):
                if not host.reporting:
                    continue
                host.seq += 1
                rng = random.Random(f"{self._seed}:{node_id}:{host.seq}")
                vms: list[Vm] = []
                host_cpu = 2.0 + rng.random()
                mem_used = 2048 * MiB
                for inst in by_host.get(node_id, []):
                    vms.append(self._vm(inst.name, inst.vcpus, inst.memory_mib, cpu_of[inst.name], host))
                for vm in host.vms.values():
                    vcpu = min(100.0, vm.workload.demand(ts - self._t0))
                    vms.append(self._vm(vm.name, vm.vcpus, vm.memory_mib, vcpu, host))
                for vm_report in vms:
                    host_cpu += vm_report.host_cpu_percent
                    mem_used += vm_report.mem_current
                total = host.memory_mib * MiB
                metrics = _metrics(host_cpu, host.vcpus, total, mem_used, host_cpu * 200_000.0, rng)
                out.append(
                    Report(
                        v=1,
                        node_id=node_id,
                        ts=ts,
                        seq=host.seq,
                        interval=self.interval_s,
                        node=self._node(node_id, host.vcpus),
                        host=metrics,
                        agent=agent,
                        vms=vms,
                    )
                )
        return out

    @staticmethod
    def _vm(name: str, vcpus: int, memory_mib: int, cpu: float, host: SimHost) -> Vm:
        mem = memory_mib * MiB
        return Vm(
            uuid=str(uuid.uuid5(_VM_NS, name)),
            name=name,
            state="running",
            vcpus=vcpus,
            cpu_percent=min(100.0, cpu),
            host_cpu_percent=min(100.0, cpu * vcpus / max(1, host.vcpus)),
            mem_max=mem,
            mem_current=mem,
            mem_rss=int(mem * (0.3 + 0.004 * min(100.0, cpu))),
        )

    def tick(self, now: float | None = None) -> int:
        """Build and send one round of reports; how many the collector accepted.

        Send failures are counted and logged (once until the next success), not raised.
        """
        reports = self.build_reports(now)
        self.stats.ticks += 1
        if self._transport is None or not reports:
            return 0
        accepted = 0
        for i in range(0, len(reports), BATCH):
            body = msgspec.json.encode(reports[i : i + BATCH])
            try:
                accepted += self._transport.send(body).accepted
            except TransportError as exc:
                self.stats.posts_failed += 1
                self.stats.last_error = str(exc)
                if not self._failing:
                    log.warning("simulator: reports not delivered: %s", exc)
                    self._failing = True
                continue
            if self._failing:
                log.info("simulator: delivering reports again")
                self._failing = False
        self.stats.reports_sent += accepted
        return accepted

    # -- thread ----------------------------------------------------------------------

    def start(self) -> None:
        """Report once per interval from one thread until :meth:`close`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cloudmon-sim", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the loop must survive one bad round
                log.exception("simulator: a reporting round failed")
            due += self.interval_s
            now = time.monotonic()
            if due < now:  # fell behind (a slow collector): skip, do not burst
                due = now
            self._stop.wait(due - now)

    def close(self) -> None:
        """Stop reporting and drop the connection (idempotent)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(10.0)
        if self._transport is not None:
            self._transport.close()
