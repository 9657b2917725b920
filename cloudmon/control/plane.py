"""The collector's control plane: auto-scaling, load-balancer weights and rebalancing.

One :class:`ControlPlane` per collector owns the control loops and their
shared :class:`~cloudmon.control.arbiter.Arbiter`:

* a loop thread that every ``tick_s`` runs the auto-scaling reconciler
  (:class:`~cloudmon.autoscale.service.AutoscaleService`) and the load-balancer
  weight controller (:class:`~cloudmon.lb.service.LoadBalancerService`), and
  every ``balance_every_s`` measures the cluster's imbalance from the live
  model and, every ``plan_every_s``, computes a rebalancing recommendation;
* an execution thread per approved plan
  (:class:`~cloudmon.actions.migration.PlanExecutor`: live migration move by
  move through the agents, each step verified).

Automation levels follow vSphere DRS: ``manual`` only recommends; ``partial``
runs the mandatory moves (maintenance evacuation, rule violations) by itself
and recommends the rest; ``full`` runs whole plans by itself.

Every method the HTTP API calls blocks (store, provider and planner work):
the collector calls them from its reader threads, never on the event loop.
Nothing here imports Qt, and the loops never raise: a failing provider, load
balancer or store becomes an event or a log line and the next tick tries again.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import msgspec

from cloudmon.actions.migration import LOOP as LOOP_REBALANCE
from cloudmon.autoscale.model import GroupSpec, LaunchTemplate, SpecError, TargetTrackingPolicy, spec_from_doc
from cloudmon.autoscale.service import AutoscaleService, vm_values
from cloudmon.collector.commands import CommandQueue
from cloudmon.control.arbiter import Arbiter
from cloudmon.lb.base import DrainOutcome
from cloudmon.lb.drain import TimeoutDrainer
from cloudmon.lb.haproxy import LbError
from cloudmon.lb.service import DOCUMENT_KIND as SERVICE_GROUP_DOC
from cloudmon.lb.service import LoadBalancerService, ServiceGroup, load_groups, open_runtime, save_group
from cloudmon.model.cluster import RETIRED_DOC, ClusterModel
from cloudmon.providers import open_provider
from cloudmon.providers.base import Provider, ProviderError
from cloudmon.rebalance.planner import Plan, PlanSettings, Rejected, imbalance, plan
from cloudmon.rebalance.snapshot import ClusterSnapshot, Rule, SnapshotError
from cloudmon.store.base import StoreError, TelemetryStore

log = logging.getLogger(__name__)

SETTINGS_DOC: Final = "balance_settings"
RULE_DOC: Final = "rule"
MAINTENANCE_DOC: Final = "host_maintenance"
SETTINGS_KEY: Final = "cluster"
#: How much imbalance history the Balance page gets (seconds).
HISTORY_S: Final = 3600.0
AUTOMATION_LEVELS: Final = ("manual", "partial", "full")


class ControlError(ValueError):
    """A request to the control plane was invalid; the text says why and what to do."""


class NotFound(ControlError):
    """The named group or plan does not exist."""


class BalanceSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The operator's rebalancing settings (a store document)."""

    #: vSphere DRS migration threshold: 1 = mandatory moves only ... 5 = take even small gains.
    threshold: int = 3
    automation: Literal["manual", "partial", "full"] = "manual"
    mode: Literal["balance", "consolidate"] = "balance"
    #: Seconds of telemetry whose high percentile is a VM's CPU demand.
    window_s: float = 600.0

    def __post_init__(self) -> None:
        if not 1 <= self.threshold <= 5:
            raise ControlError(
                f"threshold: must be 1 (mandatory moves only) to 5 (aggressive), got {self.threshold}"
            )
        if self.automation not in AUTOMATION_LEVELS:
            raise ControlError(
                f"automation: must be one of {', '.join(AUTOMATION_LEVELS)}, got {self.automation!r}"
            )
        if self.mode not in ("balance", "consolidate"):
            raise ControlError(f"mode: must be 'balance' or 'consolidate', got {self.mode!r}")
        if not 60 <= self.window_s <= 86400:
            raise ControlError(f"window_s: must be 60..86400 seconds, got {self.window_s}")


@dataclass(slots=True)
class PlanRecord:
    """A computed plan and what became of it."""

    id: str
    created: float
    plan: Plan
    settings: BalanceSettings
    #: proposed, approved, running, done, failed, rejected, superseded.
    status: str = "proposed"
    message: str = ""


@dataclass(slots=True)
class Execution:
    """Progress of the plan being executed (what the Balance page shows)."""

    plan_id: str = ""
    state: str = "idle"
    moves_done: int = 0
    moves_total: int = 0
    current: dict[str, Any] | None = None
    message: str = ""
    log: list[dict[str, Any]] = field(default_factory=list)


#: ``(model, store, now, window_s)``; ``window_s`` ``None``: the latest values only.
SnapshotSource = Callable[[ClusterModel, TelemetryStore, float, float | None], ClusterSnapshot]


def _live_snapshot(
    model: ClusterModel, store: TelemetryStore, now: float, window_s: float | None
) -> ClusterSnapshot:
    from cloudmon.rebalance.live import snapshot_from_live

    return snapshot_from_live(model, store, now=now, window_s=window_s)


class _PlaneDrainer:
    """Drains through the load balancer when the instance is behind one, else waits the drain hook."""

    def __init__(self, plane: ControlPlane) -> None:
        self._plane = plane
        self._hook = TimeoutDrainer()

    def drain(self, instance_id: str, timeout_s: float) -> DrainOutcome:
        lb = self._plane.lb
        if lb is not None and any(instance_id in g.members for g in lb.groups):
            return lb.drainer.drain(instance_id, timeout_s)
        return self._hook.drain(instance_id, timeout_s)

    def undrain(self, instance_id: str) -> None:
        lb = self._plane.lb
        if lb is not None:
            lb.drainer.undrain(instance_id)

    def close(self) -> None:
        self._hook.close()


class ControlPlane:
    """Owns the control loops of one collector.  ``start()`` once, ``close()`` always."""

    def __init__(
        self,
        store: TelemetryStore,
        model: ClusterModel,
        commands: CommandQueue,
        *,
        clock: Callable[[], float] = time.time,
        tick_s: float = 2.0,
        balance_every_s: float = 10.0,
        plan_every_s: float = 60.0,
        providers: Mapping[str, Provider] | None = None,
        arbiter: Arbiter | None = None,
        snapshot_source: SnapshotSource = _live_snapshot,
        forget_node: Callable[[str], None] | None = None,
        command_allow: tuple[str, ...] = (),
    ) -> None:
        self._store = store
        self._model = model
        self._commands = commands
        self._clock = clock
        self.tick_s = tick_s
        self.balance_every_s = balance_every_s
        self.plan_every_s = plan_every_s
        self.arbiter = arbiter if arbiter is not None else Arbiter(clock)
        self._snapshot_source = snapshot_source
        #: Drops a node from the live model, on the model's own thread (the collector's loop).
        self._forget_node = forget_node
        #: Programs the command provider may run (the collector's ``command_allow``).
        self._command_allow = frozenset(command_allow)
        self._fixed_providers: dict[str, Provider] = dict(providers or {})
        self._providers: dict[str, Provider] = {}
        self._lock = threading.RLock()
        #: One plan computation at a time (the loop's recommendation or an operator's request).
        self._plan_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._exec_thread: threading.Thread | None = None
        self._executor: Any = None
        self.lb: LoadBalancerService | None = None
        self._lb_key: list[dict[str, object]] | None = None
        self._drainer = _PlaneDrainer(self)
        self.autoscale = AutoscaleService(
            store, model, self._provider_for, self._drainer, self.arbiter, clock
        )
        self._history: collections.deque[tuple[float, float]] = collections.deque()
        self._hosts_now: list[dict[str, Any]] = []
        self._plans: dict[str, PlanRecord] = {}
        self._current: PlanRecord | None = None
        self._execution = Execution()
        self._last_balance = -1e18
        self._last_plan = -1e18
        self._closed = False
        #: Events raised on other threads (the command queue's, on the event loop) wait
        #: here for the loop thread to write them: no store I/O on the event loop.
        self._inbox: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        if commands.on_event is None:
            commands.on_event = self.post_event

    def post_event(self, event: Mapping[str, Any]) -> None:
        """Queue an event for the event log (thread-safe, never blocks)."""
        self._inbox.put(dict(event))

    def _drain_inbox(self) -> None:
        while True:
            try:
                event = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._append_event(event)

    def add_provider(self, name: str, provider: Provider) -> None:
        """Serve launch templates naming ``name`` with ``provider`` (``cloudmon demo``'s simulated one).

        The plane does not close it: its owner does.
        """
        with self._lock:
            self._fixed_providers[name] = provider

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop thread."""
        if self._thread is not None:
            raise RuntimeError("ControlPlane.start() may be called once")
        self._thread = threading.Thread(target=self._loop, name="cloudmon-control", daemon=False)
        self._thread.start()

    def close(self) -> None:
        """Stop the loops (a running plan stops after its current move), join threads, release providers."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        executor = self._executor
        if executor is not None:
            # Never hold a shutdown for a migration: the agents finish what they started.
            executor.abandon()
        self._drainer.close()
        if self._thread is not None:
            self._thread.join()
        if self._exec_thread is not None:
            self._exec_thread.join()
        self._drain_inbox()
        # The load balancer first: closing it cancels drains that the auto-scaler's
        # drain workers would otherwise wait out (up to the deregistration delay).
        if self.lb is not None:
            self.lb.close()
        self.autoscale.close()
        for p in self._providers.values():
            try:
                p.close()
            except Exception:  # closing must go on for the others
                log.exception("closing provider %s failed", p.name)

    def _loop(self) -> None:
        while not self._stop.wait(self.tick_s):
            self.tick()

    def tick(self) -> None:
        """One round of every loop (the loop thread calls it; tests may too).  Never raises."""
        now = self._clock()
        self._drain_inbox()
        for name, step in (("autoscale", self._tick_autoscale), ("lb", self._tick_lb)):
            try:
                step()
            except Exception:  # worker loop: one failing loop must not stop the others
                log.exception("control loop %s failed this tick", name)
        if now - self._last_balance >= self.balance_every_s:
            self._last_balance = now
            try:
                self._tick_balance(now)
            except Exception:
                log.exception("rebalancing failed this tick")

    # -- auto-scaling ----------------------------------------------------------------------

    def _tick_autoscale(self) -> None:
        self._commands.expire()
        for ev in self.autoscale.tick():
            node = ev.get("node")
            if ev.get("kind") == "autoscale.terminate" and isinstance(node, str) and node:
                self._retire_node(
                    node, f"instance {ev.get('instance')} of group {ev.get('group')} terminated"
                )

    def _retire_node(self, node_id: str, why: str) -> None:
        """A terminated instance's own agent is gone for good: stop listing its node (its
        history stays) and do not bring it back on a restart (unless it reports again)."""
        self._store.put_document(RETIRED_DOC, node_id, {"ts": self._clock(), "reason": why})
        if self._forget_node is not None:
            self._forget_node(node_id)

    def _provider_for(self, template: LaunchTemplate) -> Provider:
        name = template.provider
        with self._lock:
            fixed = self._fixed_providers.get(name)
        if fixed is not None:
            return fixed
        options: dict[str, Any] = dict(template.params)
        key = (
            name
            + msgspec.json.encode(
                {"params": options, "hosts": template.hosts}, order="deterministic"
            ).decode()
        )
        with self._lock:
            provider = self._providers.get(key)
            if provider is None:
                provider = self._build_provider(name, template, options)
                self._providers[key] = provider
            return provider

    def _build_provider(self, name: str, template: LaunchTemplate, options: dict[str, Any]) -> Provider:
        if name == "agent":
            from cloudmon.providers.agent import AgentProvider

            hosts = {h: self._node_for_host(h) or h for h in template.hosts}
            return AgentProvider(self._commands, hosts, options, clock=self._clock)
        if name == "simulated":
            raise ProviderError(
                "provider 'simulated' exists only inside 'cloudmon demo'; use libvirt, agent or command here"
            )
        if name == "command":
            self._check_commands(options)
        if name == "libvirt":
            from cloudmon_agent.vmops import VmOpError, check_uri

            uris = options.get("hosts")
            for uri in uris.values() if isinstance(uris, dict) else ():
                try:
                    check_uri(str(uri))
                except VmOpError as exc:
                    raise ProviderError(str(exc)) from None
        return open_provider(name, options)

    def _check_commands(self, options: Mapping[str, Any]) -> None:
        """A group may run only the programs the collector's operator allowed: anyone with
        the API token can write a group, and must not be able to run anything on this host."""
        import shlex

        for key in ("env", "cwd"):
            if key in options:
                # BASH_ENV, LD_PRELOAD, PATH... would run anything under an allowed program.
                raise ProviderError(
                    f"the command provider's {key!r} cannot come from a group document: set it in "
                    "the allowed program itself (a wrapper script)"
                )
        for key in ("create", "delete", "describe"):
            argv = options.get(key)
            if argv is None:
                continue
            words = shlex.split(argv) if isinstance(argv, str) else list(argv)
            program = str(words[0]) if words else ""
            if not program.startswith("/") or program not in self._command_allow:
                raise ProviderError(
                    f"the command provider may not run {program!r} ({key}): add its absolute path to "
                    "command_allow in the collector's cloudmon.toml (or CLOUDMON_COMMAND_ALLOW) to allow it"
                )

    def _node_for_host(self, host: str) -> str | None:
        """The node id of the agent on ``host`` (matched on node id, then hostname)."""
        if self._model.get(host) is not None:
            return host
        for node in self._model.nodes():
            if node.hostname == host:
                return node.node_id
        return None

    def _uri_for_host(self, host: str) -> str | None:
        node_id = self._node_for_host(host)
        node = self._model.get(node_id) if node_id else None
        uri = node.info.get("migrate_uri") if node is not None else None
        return uri if isinstance(uri, str) else None

    def groups_view(self) -> list[dict[str, Any]]:
        """Every group with its state, instances and metric (``GET /groups``)."""
        out = []
        for spec in self.autoscale.groups():
            out.append(self._group_view(spec))
        return out

    def _group_view(self, spec: GroupSpec) -> dict[str, Any]:
        state = self.autoscale.group_state(spec.name)
        instances: list[dict[str, Any]] = []
        desired = spec.desired
        metric: dict[str, Any] | None = None
        latest: dict[str, Mapping[str, float]] = {}
        if state is not None:
            desired = state.desired
            now = self._clock()
            for inst in state.instances:
                d = msgspec.to_builtins(inst)
                node = self._model.get(inst.node_id) if inst.node_id else None
                # As the auto-scaler sees it: a VM without an agent of its own through its host's agent.
                seen = node.latest if node is not None else {}
                if inst.node_id is None:
                    seen = vm_values(self._model, inst.id, inst.host, now)
                if node is not None or seen:
                    d["cpu_percent"] = seen.get("cpu.percent")
                latest[inst.id] = seen
                instances.append(d)
        target = next((p for p in spec.policies if isinstance(p, TargetTrackingPolicy)), None)
        name = target.metric if target is not None else next((p.metric for p in spec.policies), None)
        if name:
            values = [
                latest[inst.id][name]
                for inst in (state.instances if state is not None else [])
                if inst.state == "in_service" and name in latest[inst.id]
            ]
            metric = {
                "name": name,
                "value": sum(values) / len(values) if values else None,
                "target": target.target if target is not None else None,
            }
        return {
            "name": spec.name,
            "spec": msgspec.to_builtins(spec),
            "desired": desired,
            "instances": instances,
            "metric": metric,
            "simulated": spec.template.provider == "simulated",
        }

    def put_group(self, name: str, doc: object) -> dict[str, Any]:
        """Create or replace a group from its JSON document (``PUT /groups/{name}``)."""
        body = _named(name, doc, "the group (see 'cloudmon apply --help' for the fields)")
        try:
            spec = spec_from_doc(body)
        except (SpecError, msgspec.ValidationError) as exc:
            raise ControlError(str(exc)) from None
        self.autoscale.put_group(spec)
        return self._group_view(spec)

    def delete_group(self, name: str, *, force: bool) -> bool:
        """Delete a group (``force`` terminates its instances first); ``True`` once it is gone."""
        from cloudmon.autoscale.service import GroupError, GroupNotFound

        try:
            return self.autoscale.delete_group(name, force=force)
        except GroupNotFound as exc:
            raise NotFound(str(exc)) from None
        except GroupError as exc:
            raise ControlError(str(exc)) from None

    def group_activity(self, name: str, limit: int) -> list[dict[str, object]]:
        """The group's activity history, newest first."""
        if self.autoscale.group(name) is None:
            raise NotFound(f"no auto-scaling group named {name!r}")
        return self.autoscale.activity(name, limit)

    # -- load balancers --------------------------------------------------------------------

    def _tick_lb(self) -> None:
        docs = self._store.list_documents(SERVICE_GROUP_DOC)
        key = [docs[k] for k in sorted(docs)]
        if key != self._lb_key:
            # Service groups changed (or first tick): rebuild the weight loop.
            old, self.lb = self.lb, None
            if old is not None:
                old.close()
            groups = []
            for g in load_groups(self._store):
                try:
                    open_runtime(g)
                except LbError as exc:
                    log.warning("service group %s left out: %s", g.name, exc)
                    continue
                groups.append(g)
            self.lb = LoadBalancerService(groups, on_event=self._append_event) if groups else None
            self._lb_key = key
        if self.lb is not None:
            # step() returns its decisions (lb.weights, lb.error); only drains log by themselves.
            for event in self.lb.step(self._cpu_by_instance()):
                self._append_event(event)

    def _cpu_by_instance(self) -> dict[str, float | None]:
        """CPU % per instance id: a node's own ``cpu.percent`` and each VM's ``vm.<name>.cpu_percent``."""
        out: dict[str, float | None] = {}
        now = self._clock()
        for node in self._model.nodes():
            if node.status(now, self._model.node_timeout).value != "online":
                continue
            latest = node.latest
            if "cpu.percent" in latest:
                out[node.node_id] = latest["cpu.percent"]
                out.setdefault(node.hostname, latest["cpu.percent"])
            for k, v in latest.items():
                if k.startswith("vm.") and k.endswith(".cpu_percent"):
                    out[k[3 : -len(".cpu_percent")]] = v
        return out

    def put_service_group(self, name: str, doc: object) -> dict[str, Any]:
        """Create or replace a service group (load-balancer backends and draining)."""
        body = _named(name, doc, "the service group")
        try:
            group = ServiceGroup.from_document(body)
            # The runtime address must at least parse (it is dialled on every tick).
            open_runtime(group)
        except ValueError as exc:
            raise ControlError(str(exc)) from None
        except LbError as exc:
            raise ControlError(f"runtime: {exc}") from None
        save_group(self._store, group)
        return group.to_document()

    def service_groups_view(self) -> list[dict[str, Any]]:
        """Every service group with the weights last set."""
        lb = self.lb
        out = []
        for g in load_groups(self._store):
            d: dict[str, Any] = dict(g.to_document())
            if lb is not None and g.name in lb.controllers:
                d["weights"] = dict(lb.controllers[g.name].last_targets)
            out.append(d)
        return out

    # -- rebalancing -----------------------------------------------------------------------

    def settings(self) -> BalanceSettings:
        """The stored rebalancing settings (defaults until an operator changes them)."""
        doc = self._store.get_document(SETTINGS_DOC, SETTINGS_KEY)
        if doc is None:
            return BalanceSettings()
        try:
            return msgspec.convert(doc, BalanceSettings)
        except (msgspec.ValidationError, ControlError) as exc:
            log.warning("stored balance settings are invalid (%s); using the defaults", exc)
            return BalanceSettings()

    def put_settings(self, doc: object) -> BalanceSettings:
        """Change some settings (``threshold``, ``automation``, ``mode``, ``window_s``)."""
        if not isinstance(doc, dict):
            raise ControlError("settings must be a JSON object")
        merged = msgspec.to_builtins(self.settings())
        merged.update(doc)
        try:
            new = msgspec.convert(merged, BalanceSettings)
        except msgspec.ValidationError as exc:
            raise ControlError(str(exc)) from None
        self._store.put_document(SETTINGS_DOC, SETTINGS_KEY, msgspec.to_builtins(new))
        return new

    def rules_view(self) -> list[dict[str, Any]]:
        """Placement rules (affinity, anti-affinity, VM-host must/should), by name."""
        docs = self._store.list_documents(RULE_DOC)
        return [{"name": k, **docs[k]} for k in sorted(docs)]

    def put_rule(self, name: str, doc: object) -> dict[str, Any]:
        """Create or replace a placement rule (checked against the snapshot format)."""
        body = _named(name, doc, "the rule ({kind, vms, hosts})")
        try:
            rule = msgspec.convert(body, Rule)
        except msgspec.ValidationError as exc:
            raise ControlError(f"invalid rule {name!r}: {exc}") from None
        stored = msgspec.to_builtins(rule)
        stored.pop("name")
        self._store.put_document(RULE_DOC, name, stored)
        self._append_event(
            {
                "kind": "rebalance.rule",
                "reason": f"rule {name} ({rule.kind}) set for VMs {', '.join(rule.vms)}"
                + (f" and hosts {', '.join(rule.hosts)}" if rule.hosts else ""),
            }
        )
        self._replan_soon()
        return {"name": name, **stored}

    def delete_rule(self, name: str) -> bool:
        """Remove a placement rule; ``False`` if there was none."""
        gone = self._store.delete_document(RULE_DOC, name)
        if not gone:
            raise NotFound(f"no rule named {name!r}")
        self._append_event({"kind": "rebalance.rule_deleted", "reason": f"rule {name} deleted"})
        self._replan_soon()
        return gone

    def set_maintenance(self, host: str, doc: object) -> dict[str, Any]:
        """Put a host into maintenance (its VMs must move: mandatory moves) or take it out."""
        if not isinstance(doc, dict) or not isinstance(doc.get("maintenance"), bool):
            raise ControlError('send {"maintenance": true} or {"maintenance": false}')
        on = bool(doc["maintenance"])
        if self._model.get(host) is None:
            raise NotFound(f"unknown host {host!r}: use a node id from /api/v1/nodes")
        if on:
            self._store.put_document(MAINTENANCE_DOC, host, {"maintenance": True})
        else:
            self._store.delete_document(MAINTENANCE_DOC, host)
        self._append_event(
            {
                "kind": "rebalance.maintenance",
                "host": host,
                "reason": f"host {host} "
                + ("enters maintenance: its VMs must move (mandatory moves)" if on else "leaves maintenance"),
            }
        )
        self._replan_soon()
        return {"host": host, "maintenance": on}

    def _replan_soon(self) -> None:
        # Rules and maintenance change what is mandatory: recommend again at the next round.
        with self._plan_lock:
            self._last_plan = -1e18
            self._last_balance = -1e18

    def _planner_settings(self, s: BalanceSettings) -> PlanSettings:
        return PlanSettings(threshold=s.threshold, automation=s.automation, mode=s.mode)

    def _snapshot(self, settings: BalanceSettings, *, latest: bool = False) -> ClusterSnapshot:
        """The live cluster; each VM's demand is its p95 over ``window_s`` from the store, or
        with ``latest`` its last value (no store reads: the chart's every-10-s point)."""
        window = None if latest else settings.window_s
        try:
            return self._snapshot_source(self._model, self._store, self._clock(), window)
        except SnapshotError as exc:
            raise ControlError(str(exc)) from None

    def _tick_balance(self, now: float) -> None:
        settings = self.settings()
        now_snap = self._snapshot(settings, latest=True)
        if not now_snap.hosts:
            # Nothing reports VMs yet (a collector just started): look again next round.
            self._last_balance = -1e18
            return
        sigma = imbalance(now_snap, self._planner_settings(settings))
        with self._lock:
            self._history.append((now, sigma))
            while self._history and now - self._history[0][0] > HISTORY_S:
                self._history.popleft()
            self._hosts_now = _host_loads(now_snap)
            busy = self._execution.state == "running"
            current = self._current
        if busy or (current is not None and current.status in ("approved", "running")):
            return
        with self._plan_lock:
            # Checked under the lock: an operator's "compute now" may have just made one.
            if now - self._last_plan < self.plan_every_s:
                return
            self._last_plan = now
            # Plans use each VM's demand over the window (store reads: only here, once a minute).
            snap = self._snapshot(settings)
            record: PlanRecord | None = None
            auto = settings.automation == "full"
            if settings.automation == "partial":
                # Partial automation runs mandatory moves (maintenance, rule violations) by
                # itself: a threshold-1 plan has exactly those.
                mandatory = msgspec.structs.replace(settings, threshold=1)
                result = self._plan_around_holds(snap, self._planner_settings(mandatory))
                if result.moves:
                    record, auto = self._record_plan(result, mandatory, now), True
            if record is None:
                record = self._new_plan(snap, settings, now)
        if record.plan.moves and auto:
            self._start_execution(record, by=f"automation {settings.automation}")

    def _plan_around_holds(self, snap: ClusterSnapshot, settings: PlanSettings) -> Plan:
        """Plan, leaving out balancing moves the arbiter would refuse: a VM another loop is
        changing or just changed (a new auto-scaling instance), or one that would move back
        where it just came from.  Those VMs stay put and are listed as rejected, with why.

        Mandatory moves are never left out: a rule or maintenance overrides a hold.
        """
        held: dict[str, str] = {}
        for v in snap.vms:
            # Whatever the target: another loop's claim or recent change holds the VM.
            grant = self.arbiter.check(LOOP_REBALANCE, v.name)
            if grant.code in ("hold", "claimed"):
                held[v.name] = grant.reason
        if held:
            # A pinned VM never moves, not even when it must: keep those free.
            evacuating = {h.name for h in snap.hosts if h.maintenance}
            # Threshold 1 plans only the mandatory moves (and fast: no balancing search).
            mandatory_only = msgspec.structs.replace(settings, threshold=1)
            must = {m.vm for m in plan(snap, mandatory_only).moves if m.mandatory}
            must |= {v.name for v in snap.vms if v.host in evacuating}
            held = {vm: why for vm, why in held.items() if vm not in must}
        for _ in range(4):
            pinned = [msgspec.structs.replace(v, pinned=True) if v.name in held else v for v in snap.vms]
            result = plan(msgspec.structs.replace(snap, vms=pinned), settings)
            # Moving back to where it came from is held only for that target: plan again.
            more = {}
            for m in result.moves:
                if m.mandatory or m.vm in held:
                    continue
                grant = self.arbiter.check(LOOP_REBALANCE, m.vm, source=m.source, target=m.target)
                if grant.code in ("hold", "claimed"):
                    more[m.vm] = grant.reason
            if not more:
                break
            held.update(more)
        if not held:
            return result
        rejected = [Rejected(vm=vm, target=None, why="hold", detail=why) for vm, why in sorted(held.items())]
        # The planner lists the held VMs as "pinned": the hold says why.
        rest = [r for r in result.rejected if not (r.vm in held and r.why == "pinned")]
        return msgspec.structs.replace(result, rejected=rejected + rest)

    def _new_plan(self, snap: ClusterSnapshot, settings: BalanceSettings, now: float) -> PlanRecord:
        return self._record_plan(
            self._plan_around_holds(snap, self._planner_settings(settings)), settings, now
        )

    def _record_plan(self, result: Plan, settings: BalanceSettings, now: float) -> PlanRecord:
        """Make ``result`` the current plan (superseding a proposed one) and log it."""
        record = PlanRecord(id=uuid.uuid4().hex[:12], created=now, plan=result, settings=settings)
        with self._lock:
            old = self._current
            if old is not None and old.status == "proposed":
                old.status = "superseded"
            self._current = record
            self._plans[record.id] = record
            # Keep the last few plans for GET by id; older ones are in the event log.
            for pid in list(self._plans)[:-20]:
                del self._plans[pid]
        mandatory = sum(1 for m in result.moves if m.mandatory)
        self._append_event(
            {
                "kind": "rebalance.plan",
                "plan_id": record.id,
                "reason": (
                    f"{len(result.moves)} move(s) ({mandatory} mandatory) would take the imbalance from "
                    f"{result.imbalance_before:.3f} to {result.imbalance_after:.3f} "
                    f"(threshold {settings.threshold}, {settings.mode}, {result.solver})"
                    if result.moves
                    else f"no move improves the cluster at threshold {settings.threshold} "
                    f"(imbalance {result.imbalance_before:.3f}; {len(result.rejected)} candidates rejected)"
                ),
                "numbers": {
                    "moves": len(result.moves),
                    "mandatory": mandatory,
                    "rejected": len(result.rejected),
                    "imbalance_before": result.imbalance_before,
                    "imbalance_after": result.imbalance_after,
                },
            }
        )
        return record

    def snapshot(self) -> dict[str, Any]:
        """The live cluster as a snapshot (save it for ``cloudmon plan --snapshot FILE``)."""
        settings = self.settings()
        snap = self._snapshot(settings)
        snap = msgspec.structs.replace(snap, settings=self._planner_settings(settings))
        out: dict[str, Any] = msgspec.to_builtins(snap)
        return out

    def compute_plan(self, overrides: object) -> dict[str, Any]:
        """Compute a plan now (``POST /balance/plan``); ``overrides`` may change settings first."""
        settings = self.put_settings(overrides) if overrides else self.settings()
        with self._lock:
            if self._execution.state == "running":
                raise ControlError("a plan is being executed; wait for it to finish before computing another")
        snap = self._snapshot(settings)
        if not snap.hosts:
            raise ControlError(
                "no host reports VMs yet: start cloudmon-agent with --libvirt-uri on your hosts "
                "(or try 'cloudmon demo')"
            )
        with self._plan_lock:
            now = self._clock()
            self._last_plan = now
            return self._plan_view(self._new_plan(snap, settings, now))

    def approve(self, plan_id: str) -> dict[str, Any]:
        """Approve a proposed plan: it starts executing at once."""
        record = self._record(plan_id)
        with self._lock:
            if record.status != "proposed":
                raise ControlError(f"plan {plan_id} is {record.status}; only a proposed plan can be approved")
            if self._execution.state == "running":
                raise ControlError("another plan is being executed; approve this one when it has finished")
        if not record.plan.moves:
            raise ControlError(f"plan {plan_id} has no moves to run")
        self._start_execution(record, by="operator")
        return self._plan_view(record)

    def reject(self, plan_id: str) -> dict[str, Any]:
        """Reject a proposed plan (nothing runs; the next recommendation comes later)."""
        record = self._record(plan_id)
        with self._lock:
            if record.status != "proposed":
                raise ControlError(f"plan {plan_id} is {record.status}; only a proposed plan can be rejected")
            record.status = "rejected"
        self._append_event(
            {
                "kind": "rebalance.plan_rejected",
                "plan_id": plan_id,
                "reason": f"plan {plan_id} rejected by the operator ({len(record.plan.moves)} move(s) not run)",
                "numbers": {"moves": len(record.plan.moves)},
            }
        )
        return self._plan_view(record)

    def _record(self, plan_id: str) -> PlanRecord:
        with self._lock:
            record = self._plans.get(plan_id)
        if record is None:
            raise NotFound(f"no plan {plan_id!r} (plans are kept until 20 newer ones exist)")
        return record

    def _start_execution(self, record: PlanRecord, by: str) -> None:
        from cloudmon.actions.migration import PlanExecutor

        moves = list(record.plan.moves)
        with self._lock:
            if self._closed:
                raise ControlError("the collector is shutting down")
            # Checked again under the lock that starts it: two approvals at once (a
            # double click, or the operator and automation) must not run two executors.
            if record.status != "proposed" or self._execution.state == "running":
                raise ControlError(
                    f"plan {record.id} is {record.status} and plan {self._execution.plan_id} is "
                    f"{self._execution.state}; approve a proposed plan when no other one runs"
                )
            record.status = "running"
            record.message = f"approved by {by}"
            self._execution = Execution(plan_id=record.id, state="running", moves_total=len(moves))
            executor = PlanExecutor(
                self._commands,
                self._node_for_host,
                self._uri_for_host,
                self.arbiter,
                self._drainer if self.lb is not None else None,
                self._clock,
                self._on_progress,
            )
            self._executor = executor

        def run() -> None:
            try:
                report = executor.run(moves)
                state = "done" if report.ok else ("cancelled" if report.cancelled else "failed")
                message = report.reason
            except Exception as exc:  # the thread must record the failure, not die silently
                log.exception("plan %s failed", record.id)
                state, message = "failed", f"{type(exc).__name__}: {exc}"
            with self._lock:
                record.status = "done" if state == "done" else "failed"
                record.message = message
                self._execution.state = state
                self._execution.message = message
                self._execution.current = None
                self._executor = None

        # Who decided to run it is a decision of its own in the event log.
        self._append_event(
            {
                "kind": "rebalance.plan_approved",
                "plan_id": record.id,
                "reason": f"plan {record.id} approved by {by}: {len(moves)} move(s) start now",
                "numbers": {"moves": len(moves)},
            }
        )
        self._exec_thread = threading.Thread(target=run, name=f"cloudmon-plan-{record.id}")
        self._exec_thread.start()

    def _on_progress(self, event: dict[str, Any]) -> None:
        kind = str(event.get("kind", ""))
        with self._lock:
            ex = self._execution
            # The executor knows moves, not plans: tie its events to the plan in the log.
            event.setdefault("plan_id", ex.plan_id)
            if kind == "rebalance.move_started":
                ex.current = {
                    "vm": event.get("vm"),
                    "source": event.get("source"),
                    "target": event.get("target"),
                    "percent": 0.0,
                }
            elif kind == "rebalance.move_progress" and ex.current is not None:
                pct = event.get("percent")
                if isinstance(pct, (int, float)):
                    ex.current["percent"] = float(pct)
            elif kind == "rebalance.move_done":
                ex.moves_done += 1
                ex.current = None
            if "reason" in event:
                ex.message = str(event["reason"])
            ex.log.append(event)
            del ex.log[:-50]
        if kind != "rebalance.move_progress":
            self._append_event(event)

    def balance_view(self) -> dict[str, Any]:
        """What the Balance page shows (``GET /balance``)."""
        settings = self.settings()
        with self._lock:
            history = list(self._history)
            hosts = list(self._hosts_now)
            current = self._current
            ex = self._execution
            execution = {
                "plan_id": ex.plan_id,
                "state": ex.state,
                "moves_done": ex.moves_done,
                "moves_total": ex.moves_total,
                "current": dict(ex.current) if ex.current else None,
                "message": ex.message,
            }
        return {
            "settings": msgspec.to_builtins(settings),
            "imbalance": {"ts": [t for t, _ in history], "value": [v for _, v in history]},
            "hosts": hosts,
            "plan": self._plan_view(current) if current is not None else None,
            "execution": execution,
        }

    def _plan_view(self, record: PlanRecord) -> dict[str, Any]:
        p = record.plan
        view: dict[str, Any] = msgspec.to_builtins(p)
        view.update(
            id=record.id,
            status=record.status,
            created=record.created,
            message=record.message,
            hosts_before={h.host: {"cpu": h.before.cpu, "mem": h.before.mem} for h in p.hosts},
            hosts_after={h.host: {"cpu": h.after.cpu, "mem": h.after.mem} for h in p.hosts},
        )
        return view

    def _append_event(self, event: Mapping[str, object]) -> None:
        try:
            self._store.append_event(dict(event))
        except (StoreError, ValueError) as exc:
            log.warning("cannot record event %s: %s", event.get("kind"), exc)


def _named(name: str, doc: object, what: str) -> dict[str, Any]:
    """A document PUT under ``name``: a JSON object whose ``name`` (if any) is that one."""
    if not isinstance(doc, dict):
        raise ControlError(f"{what} must be a JSON object")
    body = dict(doc)
    body.setdefault("name", name)
    if body["name"] != name:
        raise ControlError(f"name: the document names {body['name']!r} but the URL names {name!r}")
    return body


def _host_loads(snap: ClusterSnapshot) -> list[dict[str, Any]]:
    demand: dict[str, float] = collections.defaultdict(float)
    mem: dict[str, float] = collections.defaultdict(float)
    for vm in snap.vms:
        demand[vm.host] += vm.cpu_demand_cores
        mem[vm.host] += vm.memory_mib
    out = []
    for h in snap.hosts:
        cpu = (h.cpu_used_other + demand[h.name]) / h.cpu_cores if h.cpu_cores else 0.0
        m = mem[h.name] / h.memory_mib if h.memory_mib else 0.0
        out.append({"name": h.name, "cpu": cpu, "mem": m, "maintenance": h.maintenance})
    return out
