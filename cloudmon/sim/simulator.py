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

Simulated hosts also execute the collector's commands, as a real agent's
executor does (:mod:`cloudmon_agent.actions`), so plans approved on the Balance
page run end to end: each host advertises ``NodeInfo.migrate_uri``
``sim+migrate://<node id>`` and runs ``vm.state``, ``vm.start``, ``vm.stop`` and
``vm.migrate`` on its simulated VMs (group instances included); any other
action gets a failed result that says so.  Each command id runs once; its
progress rides every report while it runs, its result every report until the
collector acknowledges it (``IngestResponse.acked``).  A migration takes
``1 s + memory / 4 GiB/s`` of the simulator's clock, reports its percent in
between, then moves the VM and its workload to the destination host.  It is a
state machine advanced on every tick: no sleeps, no thread of its own.

An ingest answer carries the commands of every node in the posted batch
without saying which node each is for.  When a batch of several reports gets
new commands back, their nodes post one report each on the next tick (the
collector sends a command again until a report mentions it), and a node that
got a command keeps posting alone for a while (:data:`SOLO_TICKS`): commands
come in bursts (a migration, then its checks).

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
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from cloudmon.sim.workload import Workload
from cloudmon_agent.schema import (
    ACTIONS,
    AgentStats,
    Command,
    CommandProgress,
    CommandResult,
    HostMetrics,
    IngestResponse,
    MigrateParams,
    NodeInfo,
    Report,
    SchemaError,
    StopParams,
    Vm,
    VmRef,
    command_params,
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
#: The actions simulated hosts carry out (the rest of :data:`~cloudmon_agent.schema.ACTIONS` is refused).
SIM_ACTIONS: Final = ("vm.state", "vm.start", "vm.stop", "vm.migrate")
#: Scheme of the migration URIs simulated hosts advertise (``sim+migrate://<node id>``).
MIGRATE_SCHEME: Final = "sim+migrate://"
#: Memory a simulated host uses for itself (MiB), besides its VMs.
HOST_BASE_MIB: Final = 2048
#: Ticks a node that got a command keeps posting its report alone (see the module doc).
SOLO_TICKS: Final = 30
#: Most results one report carries (as the real agent); the rest follow.
RESULTS_PER_REPORT: Final = 32
#: Command ids remembered so that a command sent again is not run again.
REMEMBER_IDS: Final = 5000


def sim_name(name: str) -> str:
    """``name`` as a simulated node id / hostname: allowed characters only, ``sim-`` in front."""
    clean = _BAD_CHARS.sub("-", name).strip("-") or "node"
    return clean if clean.startswith(SIM_PREFIX) else SIM_PREFIX + clean


def migrate_uri(node_id: str) -> str:
    """The migration URI a simulated host advertises (``NodeInfo.migrate_uri``)."""
    return MIGRATE_SCHEME + node_id


def migration_seconds(memory_mib: int) -> float:
    """How long a simulated live migration of a VM with ``memory_mib`` takes: 1 s + 4 GiB/s."""
    return 1.0 + memory_mib / 4096.0


@dataclass
class SimVm:
    """A VM on a simulated host that is not a group instance (its own steady-ish load)."""

    name: str
    vcpus: int
    memory_mib: int
    workload: Workload
    #: ``running`` or ``shutoff`` (``vm.stop`` / ``vm.start``).
    state: str = "running"


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
    #: Its VM's state: ``running`` or ``shutoff`` (a stopped instance's agent is silent).
    state: str = "running"


@dataclass
class _Migration:
    """A ``vm.migrate`` in progress (times on the simulator's clock)."""

    command_id: str
    vm: str
    source: str
    dest: str
    dest_uri: str
    memory_mib: int
    started: float
    duration: float
    #: Past this the migration is aborted and the VM stays on the source.
    deadline: float


@dataclass
class _Outbox:
    """What a node's next reports say about its commands."""

    progress: dict[str, CommandProgress] = field(default_factory=dict)
    results: OrderedDict[str, CommandResult] = field(default_factory=OrderedDict)


class _Failed(Exception):
    """A simulated action failed; the text is the result's error."""


@dataclass
class SimStats:
    """What the simulator has sent so far."""

    ticks: int = 0
    reports_sent: int = 0
    posts_failed: int = 0
    last_error: str = ""
    #: Commands taken (run or refused) and results acknowledged by the collector.
    commands_taken: int = 0
    results_acked: int = 0


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
        # Commands (see the module doc); all under self._lock, driven by the reporting thread.
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._outbox: dict[str, _Outbox] = {}
        self._migrations: dict[str, _Migration] = {}
        #: node id -> the last round in which it posts its report alone.
        self._solo: dict[str, int] = {}
        self._round = 0

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
            inst = self._instances.pop(name, None)
            if inst is not None:
                self._outbox.pop(inst.node_id, None)
            return inst is not None

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
            i.name
            for i in self._instances.values()
            if i.group == group and i.reporting and i.start_at <= now and i.state == "running"
        )

    def vm_host(self, name: str) -> str | None:
        """The node id of the host the VM (or group instance) ``name`` is on now, or None."""
        with self._lock:
            inst = self._instances.get(name)
            if inst is not None:
                return inst.host
            for node_id, host in self._hosts.items():
                if name in host.vms:
                    return node_id
        return None

    def host_usage(self) -> dict[str, dict[str, float]]:
        """What the VMs (group instances included) on each host take now, where they are now.

        ``{node id: {"vcpus_used": ..., "memory_mib_used": ...}}`` for every host;
        it follows migrations, unlike figures recorded when a VM was placed.
        """
        with self._lock:
            out = {h: {"vcpus_used": 0.0, "memory_mib_used": 0.0} for h in self._hosts}
            for node_id, host in self._hosts.items():
                for vm in host.vms.values():
                    out[node_id]["vcpus_used"] += vm.vcpus
                    out[node_id]["memory_mib_used"] += vm.memory_mib
            for inst in self._instances.values():
                if inst.host in out:
                    out[inst.host]["vcpus_used"] += inst.vcpus
                    out[inst.host]["memory_mib_used"] += inst.memory_mib
            return out

    def vm_state(self, name: str) -> str:
        """The simulated VM's state: ``running``, ``shutoff``, or ``missing`` when no host has it."""
        with self._lock:
            found = self._find_anywhere(name)
            return found.state if found is not None else "missing"

    def _find_anywhere(self, name: str) -> SimVm | SimInstance | None:
        inst = self._instances.get(name)
        if inst is not None:
            return inst
        for host in self._hosts.values():
            if name in host.vms:
                return host.vms[name]
        return None

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

    def _node(self, hostname: str, cores: int, uri: str = "") -> NodeInfo:
        return NodeInfo(
            hostname=hostname, os=SIM_OS, cpu_count=cores, agent_version=SIM_AGENT_VERSION, migrate_uri=uri
        )

    def _commands_of(self, node_id: str) -> tuple[list[CommandProgress], list[CommandResult]]:
        box = self._outbox.get(node_id)
        if box is None:
            return [], []
        return list(box.progress.values()), list(box.results.values())[:RESULTS_PER_REPORT]

    def build_reports(self, now: float | None = None) -> list[Report]:
        """One report per reporting node at ``now`` (default: the clock)."""
        ts = self._clock() if now is None else now
        out: list[Report] = []
        agent = AgentStats(cpu_ms=0.0, rss_bytes=0)
        with self._lock:
            served: dict[str, int] = {}
            cpu_of = {
                name: self._instance_cpu(i, ts, served) if i.state == "running" else 0.0
                for name, i in self._instances.items()
            }
            by_host: dict[str, list[SimInstance]] = {}
            for inst in self._instances.values():
                by_host.setdefault(inst.host, []).append(inst)
            for name, inst in sorted(self._instances.items()):
                if not inst.reporting or inst.start_at > ts or inst.state != "running":
                    continue
                inst.seq += 1
                rng = random.Random(f"{self._seed}:{name}:{inst.seq}")
                cpu = cpu_of[name]
                total = inst.memory_mib * MiB
                used = int(total * (0.25 + 0.004 * cpu))
                metrics = _metrics(cpu, inst.vcpus, total, used, cpu * 40_000.0, rng)
                progress, results = self._commands_of(inst.node_id)
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
                        progress=progress,
                        results=results,
                    )
                )
            for node_id, host in sorted(self._hosts.items()):
                if not host.reporting:
                    continue
                host.seq += 1
                rng = random.Random(f"{self._seed}:{node_id}:{host.seq}")
                vms: list[Vm] = []
                host_cpu = 2.0 + rng.random()
                mem_used = HOST_BASE_MIB * MiB
                for inst in by_host.get(node_id, []):
                    vms.append(
                        self._vm(inst.name, inst.vcpus, inst.memory_mib, cpu_of[inst.name], host, inst.state)
                    )
                for vm in host.vms.values():
                    vcpu = min(100.0, vm.workload.demand(ts - self._t0)) if vm.state == "running" else 0.0
                    vms.append(self._vm(vm.name, vm.vcpus, vm.memory_mib, vcpu, host, vm.state))
                for vm_report in vms:
                    host_cpu += vm_report.host_cpu_percent
                    mem_used += vm_report.mem_current
                total = host.memory_mib * MiB
                metrics = _metrics(host_cpu, host.vcpus, total, mem_used, host_cpu * 200_000.0, rng)
                progress, results = self._commands_of(node_id)
                out.append(
                    Report(
                        v=1,
                        node_id=node_id,
                        ts=ts,
                        seq=host.seq,
                        interval=self.interval_s,
                        node=self._node(node_id, host.vcpus, migrate_uri(node_id)),
                        host=metrics,
                        agent=agent,
                        vms=vms,
                        progress=progress,
                        results=results,
                    )
                )
        return out

    @staticmethod
    def _vm(name: str, vcpus: int, memory_mib: int, cpu: float, host: SimHost, state: str = "running") -> Vm:
        mem = memory_mib * MiB
        running = state == "running"
        cpu = min(100.0, cpu) if running else 0.0
        return Vm(
            uuid=str(uuid.uuid5(_VM_NS, name)),
            name=name,
            state=state,
            vcpus=vcpus,
            cpu_percent=cpu,
            host_cpu_percent=min(100.0, cpu * vcpus / max(1, host.vcpus)),
            mem_max=mem,
            # A shut-off domain holds no host memory.
            mem_current=mem if running else 0,
            mem_rss=int(mem * (0.3 + 0.004 * cpu)) if running else 0,
        )

    # -- commands (see the module doc) ------------------------------------------------------

    def receive(self, node_ids: Sequence[str], answer: IngestResponse, now: float | None = None) -> int:
        """Take the collector's ``answer`` to a POST of the reports of ``node_ids``; commands taken.

        Acknowledged results are dropped.  New commands run (or are refused) at
        once when the POST held one report; after a batch of several reports they
        are left for the next tick, when those nodes post alone and the collector
        sends each node's commands again on its own answer.
        """
        ts = self._clock() if now is None else now
        with self._lock:
            if isinstance(answer.acked, list):
                for cid in answer.acked:
                    for box in self._outbox.values():
                        if box.results.pop(cid, None) is not None:
                            self.stats.results_acked += 1
            new = [c for c in answer.commands if c.id not in self._seen]
            if not new:
                return 0
            if len(node_ids) != 1:
                for node_id in node_ids:
                    self._solo[node_id] = max(self._solo.get(node_id, 0), self._round + 1)
                log.debug(
                    "simulator: %d command(s) for a batch of %d nodes; they post alone",
                    len(new),
                    len(node_ids),
                )
                return 0
            node_id = node_ids[0]
            self._solo[node_id] = self._round + SOLO_TICKS
            for cmd in new:
                self._take(node_id, cmd, ts)
            return len(new)

    def advance(self, now: float | None = None) -> None:
        """Move running migrations on to ``now``: progress, then the move and its result (or the abort)."""
        ts = self._clock() if now is None else now
        with self._lock:
            for m in list(self._migrations.values()):
                elapsed = max(0.0, ts - m.started)
                if elapsed >= m.duration:
                    self._finish_migration(m, ts)
                elif ts >= m.deadline:
                    self._abort_migration(m, ts)
                else:
                    self._outbox[m.source].progress[m.command_id] = CommandProgress(
                        m.command_id, "running", _migration_figures(m, elapsed)
                    )

    def solo_nodes(self) -> set[str]:
        """Nodes whose next report is posted alone, so that their answers carry only their commands."""
        with self._lock:
            return {n for n, until in self._solo.items() if until > self._round}

    def pending_results(self, node_id: str) -> list[CommandResult]:
        """Results of ``node_id`` the collector has not acknowledged yet, oldest first."""
        with self._lock:
            box = self._outbox.get(node_id)
            return list(box.results.values()) if box is not None else []

    def _remember(self, command_id: str) -> None:
        self._seen[command_id] = None
        while len(self._seen) > REMEMBER_IDS:
            self._seen.popitem(last=False)

    def _result(self, node_id: str, result: CommandResult) -> None:
        box = self._outbox.setdefault(node_id, _Outbox())
        box.progress.pop(result.id, None)
        box.results[result.id] = result
        (log.info if result.ok else log.warning)(
            "simulated node %s: command %s %s", node_id, result.id, "done" if result.ok else result.error
        )

    def _take(self, node_id: str, cmd: Command, now: float) -> None:
        self._remember(cmd.id)
        self.stats.commands_taken += 1
        try:
            detail = self._execute(node_id, cmd, now)
        except _Failed as exc:
            self._result(
                node_id, CommandResult(id=cmd.id, ok=False, started=now, finished=now, error=str(exc))
            )
            return
        if detail is not None:
            self._result(node_id, CommandResult(id=cmd.id, ok=True, started=now, finished=now, detail=detail))

    def _execute(self, node_id: str, cmd: Command, now: float) -> dict[str, Any] | None:
        """Carry out ``cmd`` on ``node_id``: its result detail, or None when it goes on (a migration)."""
        if cmd.action not in ACTIONS:
            # The real agent's words: a newer collector may send actions this one does not know.
            raise _Failed(
                f"unknown action {cmd.action!r}: this agent knows {', '.join(ACTIONS)} "
                "(upgrade the agent for newer actions)"
            )
        if cmd.action not in SIM_ACTIONS:
            raise _Failed(
                f"action {cmd.action} is not supported by simulated node {node_id}; simulated hosts run "
                f"{', '.join(SIM_ACTIONS)} (group instances come and go through the simulated provider)"
            )
        try:
            params = command_params(cmd.action, cmd.params)
        except SchemaError as exc:
            raise _Failed(str(exc)) from None
        host = self._hosts.get(node_id)
        if host is None:
            inst = next((i for i in self._instances.values() if i.node_id == node_id), None)
            where = f"; send VM actions to its host {inst.host}" if inst is not None else ""
            raise _Failed(
                f"{node_id} is a simulated group instance (a guest), not a host: it runs no VMs{where}"
            )
        if isinstance(params, MigrateParams):
            self._start_migration(host, cmd, params, now)
            return None
        if isinstance(params, StopParams):
            vm = self._vm_on(host, params.vm, "stop")
            if params.vm in self._migrating():
                raise _Failed(
                    f"cannot stop VM {params.vm!r} on {node_id}: it is being migrated; wait for the migration"
                )
            vm.state = "shutoff"
        elif isinstance(params, VmRef):
            if cmd.action == "vm.state":
                found = self._find_on(host, params.vm)
                return {"vm": params.vm, "state": found.state if found is not None else "missing"}
            vm = self._vm_on(host, params.vm, "start")  # vm.start
            vm.state = "running"
        else:  # pragma: no cover - SIM_ACTIONS lists only these parameter structs
            raise _Failed(f"no handler for {cmd.action} on simulated node {node_id}")
        return {"vm": params.vm, "state": vm.state}

    def _find_on(self, host: SimHost, name: str) -> SimVm | SimInstance | None:
        vm = host.vms.get(name)
        if vm is not None:
            return vm
        inst = self._instances.get(name)
        return inst if inst is not None and inst.host == host.node_id else None

    def _vm_on(self, host: SimHost, name: str, verb: str) -> SimVm | SimInstance:
        found = self._find_on(host, name)
        if found is None:
            raise _Failed(f"cannot {verb} VM {name!r}: it is not defined on {host.node_id}")
        return found

    def _migrating(self) -> set[str]:
        return {m.vm for m in self._migrations.values()}

    def _used_mib(self, node_id: str) -> int:
        host = self._hosts[node_id]
        used = HOST_BASE_MIB + sum(v.memory_mib for v in host.vms.values() if v.state == "running")
        used += sum(
            i.memory_mib for i in self._instances.values() if i.host == node_id and i.state == "running"
        )
        # Memory of VMs on their way here is already taken (as libvirt reserves it on the destination).
        used += sum(m.memory_mib for m in self._migrations.values() if m.dest == node_id)
        return used

    def _start_migration(self, host: SimHost, cmd: Command, p: MigrateParams, now: float) -> None:
        vm = self._vm_on(host, p.vm, "migrate")
        if p.vm in self._migrating():
            raise _Failed(f"a migration of {p.vm!r} is already running; wait for it before sending another")
        if vm.state != "running":
            raise _Failed(
                f"cannot live-migrate VM {p.vm!r}: it is {vm.state} on {host.node_id} (start it first)"
            )
        if not p.dest_uri.startswith(MIGRATE_SCHEME):
            raise _Failed(
                f"cannot migrate {p.vm!r} to {p.dest_uri!r}: simulated hosts take only {MIGRATE_SCHEME}<node id> "
                "URIs (what simulated hosts advertise as migrate_uri)"
            )
        dest_id = p.dest_uri[len(MIGRATE_SCHEME) :].strip("/")
        dest = self._hosts.get(dest_id)
        if dest is None or not dest.reporting:
            raise _Failed(
                f"cannot migrate {p.vm!r} to {p.dest_uri}: no simulated host {dest_id!r} is up; "
                f"known hosts: {', '.join(sorted(h for h, x in self._hosts.items() if x.reporting))}"
            )
        if dest is host:
            raise _Failed(
                f"cannot migrate {p.vm!r} to {p.dest_uri}: it is already on {host.node_id} (same host)"
            )
        if self._find_on(dest, p.vm) is not None:
            raise _Failed(f"cannot migrate {p.vm!r} to {dest_id}: a VM of that name is already defined there")
        free = dest.memory_mib - self._used_mib(dest_id)
        if vm.memory_mib > free:
            raise _Failed(
                f"cannot migrate {p.vm!r} to {dest_id}: it needs {vm.memory_mib} MiB and {dest_id} has "
                f"{max(0, free)} MiB free; free memory there or pick another host"
            )
        limit = cmd.timeout_s if p.timeout_s is None else min(p.timeout_s, cmd.timeout_s)
        m = _Migration(
            cmd.id,
            p.vm,
            host.node_id,
            dest_id,
            p.dest_uri,
            vm.memory_mib,
            now,
            migration_seconds(vm.memory_mib),
            now + limit,
        )
        self._migrations[cmd.id] = m
        # The executor checks the destination next (vm.state): have its answers unambiguous too.
        self._solo[dest_id] = max(self._solo.get(dest_id, 0), self._round + SOLO_TICKS)
        self._outbox.setdefault(host.node_id, _Outbox()).progress[cmd.id] = CommandProgress(
            cmd.id, "running", _migration_figures(m, 0.0)
        )
        log.info("simulated host %s: migrating %s to %s (%.1f s)", host.node_id, p.vm, dest_id, m.duration)

    def _finish_migration(self, m: _Migration, now: float) -> None:
        del self._migrations[m.command_id]
        src, dest = self._hosts.get(m.source), self._hosts.get(m.dest)
        vm = self._find_on(src, m.vm) if src is not None else None
        elapsed = now - m.started
        if src is None or dest is None or vm is None:
            gone = m.vm if vm is None else (m.dest if dest is None else m.source)
            self._result(
                m.source,
                CommandResult(
                    id=m.command_id,
                    ok=False,
                    started=m.started,
                    finished=now,
                    error=f"migration of {m.vm} to {m.dest_uri} failed after {elapsed:.1f} s: {gone} went away "
                    "during the migration; check the VM on both hosts",
                ),
            )
            return
        if isinstance(vm, SimInstance):
            vm.host = dest.node_id
        else:
            dest.vms[m.vm] = src.vms.pop(m.vm)
        figures = {"data_total": float(m.memory_mib * MiB), "elapsed_s": elapsed, "percent": 100.0}
        self._result(
            m.source,
            CommandResult(
                id=m.command_id,
                ok=True,
                started=m.started,
                finished=now,
                detail={"vm": m.vm, "dest_uri": m.dest_uri, **figures},
            ),
        )

    def _abort_migration(self, m: _Migration, now: float) -> None:
        del self._migrations[m.command_id]
        elapsed = now - m.started
        figures = _migration_figures(m, elapsed)
        done = f"{figures['data_processed'] / MiB:.0f} of {m.memory_mib} MiB copied in {elapsed:.1f} s"
        self._result(
            m.source,
            CommandResult(
                id=m.command_id,
                ok=False,
                started=m.started,
                finished=now,
                error=f"migration of {m.vm} to {m.dest_uri} timed out after {m.deadline - m.started:.0f} s "
                f"({done}); it was aborted and the VM keeps running on this host",
            ),
        )

    def tick(self, now: float | None = None) -> int:
        """Advance commands, build and send one round of reports, take the answers; how many were accepted.

        Send failures are counted and logged (once until the next success), not raised.
        """
        ts = self._clock() if now is None else now
        with self._lock:
            self._round += 1
            solo = {n for n, until in self._solo.items() if until >= self._round}
            self._solo = {n: self._solo[n] for n in solo}
        self.advance(ts)
        reports = self.build_reports(ts)
        self.stats.ticks += 1
        if self._transport is None or not reports:
            return 0
        alone = [[r] for r in reports if r.node_id in solo]
        rest = [r for r in reports if r.node_id not in solo]
        posts = alone + [rest[i : i + BATCH] for i in range(0, len(rest), BATCH)]
        accepted = 0
        for batch in posts:
            body = msgspec.json.encode(batch)
            try:
                answer = self._transport.send(body)
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
            accepted += answer.accepted
            self.receive([r.node_id for r in batch], answer, ts)
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


def _migration_figures(m: _Migration, elapsed_s: float) -> dict[str, float]:
    """What a real agent's progress shows (``jobStats``), for a copy at a steady rate."""
    total = float(m.memory_mib * MiB)
    done = total * min(1.0, elapsed_s / m.duration) if m.duration > 0 else total
    return {
        "data_total": total,
        "data_processed": done,
        "data_remaining": total - done,
        "memory_bps": total / m.duration if m.duration > 0 else 0.0,
        "elapsed_ms": elapsed_s * 1000.0,
        "percent": 100.0 * done / total if total else 100.0,
    }
