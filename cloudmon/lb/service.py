"""Service groups behind a load balancer, and the loop that sets their weights.

A :class:`ServiceGroup` is a set of instances (VMs, hosts) behind one backend
of one load balancer, stored as a ``service_group`` document.  The
:class:`WeightController` reads each member's sessions from the load balancer,
takes CPU figures from the caller (telemetry), computes weights with
:mod:`cloudmon.lb.weights` and applies only meaningful changes, returning event
dicts for the event log.  :class:`LoadBalancerService` holds every group's
controller and one :class:`~cloudmon.lb.drain.HaproxyDrainer` for all of them.

Events (plain JSON-able dicts; the caller appends them to the event log):

* ``lb.weights``: ``group``, ``backend``, ``algorithm``, ``reason``,
  ``changes`` ({server: {"from": w, "to": w}}), ``numbers`` ({server: {"cpu_percent",
  "sessions", "queue", "target"}});
* ``lb.error``: ``group``, ``reason`` (once per distinct error, not every tick);
* ``lb.drain`` / ``lb.drained`` / ``lb.drain_timeout`` / ``lb.undrain``: see
  :mod:`cloudmon.lb.drain`.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import msgspec

from cloudmon.lb.haproxy import MAX_WEIGHT, LbError, ServerAdminState, ServerState, check_name
from cloudmon.lb.weights import Algorithm, MemberLoad, compute_weights, settle_weights, slow_start_cap

if TYPE_CHECKING:
    from cloudmon.lb.drain import HaproxyDrainer
    from cloudmon.store.base import TelemetryStore

log = logging.getLogger(__name__)

#: Document kind of service groups in the store.
DOCUMENT_KIND: Final = "service_group"
#: ELB's default deregistration delay (connection draining), in seconds.
DEFAULT_DEREGISTRATION_DELAY_S: Final = 300.0

Event = dict[str, object]
EventSink = Callable[[Event], None]


class ServiceGroup(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Instances behind one load-balancer backend, and how to weight and drain them.

    ``members`` maps an instance/VM id to its server name in the backend.
    ``runtime`` is the load balancer's control address (for HAProxy its admin
    socket: a path or ``host:port``).  Weights stay within ``[min_weight,
    max_weight]`` (HAProxy allows 0..256); ``min_change``/``min_ratio`` are the
    hysteresis of :func:`~cloudmon.lb.weights.settle_weights`.  A member put
    back in service ramps its weight up over ``slow_start_s`` (0 = off).
    ``deregistration_delay_s`` is the longest a drain waits (ELB default 300 s).
    """

    name: str
    backend: str
    runtime: str
    members: dict[str, str] = msgspec.field(default_factory=dict)
    provider: Literal["haproxy"] = "haproxy"
    algorithm: Algorithm = "weighted"
    deregistration_delay_s: float = DEFAULT_DEREGISTRATION_DELAY_S
    min_weight: int = 1
    max_weight: int = 100
    min_change: int = 5
    min_ratio: float = 0.1
    slow_start_s: float = 0.0
    timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("service group: name must not be empty")
        check_name("backend", self.backend)
        for instance, server in self.members.items():
            if not instance:
                raise ValueError(f"service group {self.name!r}: empty instance id for server {server!r}")
            check_name("server", server)
        if len(set(self.members.values())) != len(self.members):
            raise ValueError(f"service group {self.name!r}: two instances map to the same server")
        if not 0 <= self.min_weight <= self.max_weight <= MAX_WEIGHT or self.max_weight < 1:
            raise ValueError(
                f"service group {self.name!r}: need 0 <= min_weight <= max_weight <= {MAX_WEIGHT} and "
                f"max_weight >= 1, got {self.min_weight}..{self.max_weight}"
            )
        for field in ("deregistration_delay_s", "slow_start_s", "min_ratio"):
            if getattr(self, field) < 0:
                raise ValueError(f"service group {self.name!r}: {field} must be >= 0")
        if self.min_change < 0:
            raise ValueError(f"service group {self.name!r}: min_change must be >= 0")
        if self.timeout_s <= 0:
            raise ValueError(f"service group {self.name!r}: timeout_s must be > 0")

    def server_of(self, instance_id: str) -> str | None:
        """The backend server name of ``instance_id``, or ``None`` if it is not a member."""
        return self.members.get(instance_id)

    def to_document(self) -> dict[str, object]:
        """The group as a store document (plain JSON types)."""
        doc: dict[str, object] = msgspec.to_builtins(self)
        return doc

    @classmethod
    def from_document(cls, doc: Mapping[str, object]) -> ServiceGroup:
        """A group from a store document; ``ValueError`` saying which field is wrong."""
        try:
            return msgspec.convert(dict(doc), cls)
        except msgspec.ValidationError as exc:
            raise ValueError(f"invalid service_group document: {exc}") from exc


def save_group(store: TelemetryStore, group: ServiceGroup) -> None:
    """Store (or replace) ``group`` as a ``service_group`` document keyed by its name."""
    store.put_document(DOCUMENT_KIND, group.name, group.to_document())


def load_groups(store: TelemetryStore) -> list[ServiceGroup]:
    """Every stored service group, by name; an invalid document is logged and skipped."""
    groups = []
    for key, doc in sorted(store.list_documents(DOCUMENT_KIND).items()):
        try:
            groups.append(ServiceGroup.from_document(doc))
        except ValueError as exc:
            log.warning("skipping service group %s: %s", key, exc)
    return groups


class LbRuntime(Protocol):
    """What the controllers need from a load balancer's control API (HAProxy's runtime API)."""

    def show_servers(self, backend: str) -> list[ServerState]:
        """Every server of ``backend`` with state, weight, sessions and queue."""

    def set_weight(self, backend: str, server: str, weight: int) -> None:
        """Set one server's weight."""

    def set_state(self, backend: str, server: str, state: ServerAdminState) -> None:
        """Set one server's admin state (ready, drain, maint)."""


#: Load-balancer providers by name: lazy "module:Class" strings, built with (address, timeout).
PROVIDERS: Final[dict[str, str]] = {"haproxy": "cloudmon.lb.haproxy:HaproxyRuntime"}


def open_runtime(group: ServiceGroup) -> LbRuntime:
    """The control API client of ``group``'s load balancer, from :data:`PROVIDERS`."""
    target = PROVIDERS.get(group.provider)
    if target is None:
        raise LbError(
            f"service group {group.name!r}: unknown load-balancer provider {group.provider!r}",
            fix=f"use one of {', '.join(sorted(PROVIDERS))}",
        )
    module, _, cls_name = target.partition(":")
    cls: Any = getattr(importlib.import_module(module), cls_name)
    runtime: LbRuntime = cls(group.runtime, group.timeout_s)
    return runtime


class WeightController:
    """Sets one group's backend weights from measured load, only when they change meaningfully.

    Plain logic over an injected runtime and clock (``clock`` is monotonic
    seconds, used only for slow start); one :meth:`step` per control tick.
    Members that are not ``ready`` (draining, in maintenance) are left alone.
    Not thread-safe: one loop owns it.
    """

    def __init__(
        self, group: ServiceGroup, runtime: LbRuntime, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.group = group
        self.runtime = runtime
        self._clock = clock
        self._last_state: dict[str, ServerAdminState] = {}
        self._ready_since: dict[str, float] = {}
        self._last_error: str | None = None
        self._warned_missing: set[str] = set()
        #: The targets of the last step (before hysteresis), for the console.
        self.last_targets: dict[str, int] = {}

    def _track_states(self, servers: Sequence[ServerState], now: float) -> None:
        for s in servers:
            previous = self._last_state.get(s.name)
            # A member coming back into service starts its slow-start ramp; one
            # that was already serving when we first looked does not.
            if s.state == "ready" and previous is not None and previous != "ready":
                self._ready_since[s.name] = now
            elif s.state != "ready":
                self._ready_since.pop(s.name, None)
            self._last_state[s.name] = s.state

    def step(self, cpu_by_instance: Mapping[str, float | None]) -> list[Event]:
        """Read the backend, compute weights from ``cpu_by_instance`` and sessions, apply changes.

        Returns the events to log: one ``lb.weights`` when weights changed, one
        ``lb.error`` when the load balancer fails (once per distinct error).
        """
        group = self.group
        try:
            servers = self.runtime.show_servers(group.backend)
        except LbError as exc:
            return self._error(str(exc))
        now = self._clock()
        self._track_states(servers, now)
        by_name = {s.name: s for s in servers}
        loads: dict[str, MemberLoad] = {}
        current: dict[str, int] = {}
        for instance, server in group.members.items():
            state = by_name.get(server)
            if state is None:
                if server not in self._warned_missing:
                    self._warned_missing.add(server)
                    log.warning(
                        "service group %s: backend %s has no server %s (instance %s)",
                        group.name,
                        group.backend,
                        server,
                        instance,
                    )
                continue
            if state.state != "ready":
                continue
            loads[server] = MemberLoad(cpu_by_instance.get(instance), state.sessions, state.queue)
            current[server] = state.weight
        targets = compute_weights(
            loads, group.algorithm, min_weight=group.min_weight, max_weight=group.max_weight
        )
        ramping = set()
        for server, since in list(self._ready_since.items()):
            if now - since >= group.slow_start_s:
                del self._ready_since[server]  # ramp over
            elif server in targets:
                ramping.add(server)
                targets[server] = slow_start_cap(
                    targets[server], now - since, group.slow_start_s, group.min_weight
                )
        self.last_targets = dict(targets)
        changes = settle_weights(
            current,
            targets,
            min_change=group.min_change,
            min_ratio=group.min_ratio,
            min_weight=group.min_weight,
            max_weight=group.max_weight,
        )
        # A slow-start ramp moves in small steps that hysteresis would swallow.
        for server in ramping:
            if targets[server] != current.get(server):
                changes[server] = targets[server]
        if not changes:
            self._last_error = None
            return []
        applied: dict[str, dict[str, int]] = {}
        try:
            for server, weight in sorted(changes.items()):
                self.runtime.set_weight(group.backend, server, weight)
                applied[server] = {"from": current.get(server, 0), "to": weight}
        except LbError as exc:
            events = self._error(str(exc))
            if applied:
                events.insert(0, self._weights_event(applied, loads, targets, ramping))
            return events
        self._last_error = None
        return [self._weights_event(applied, loads, targets, ramping)]

    def _weights_event(
        self,
        applied: Mapping[str, Mapping[str, int]],
        loads: Mapping[str, MemberLoad],
        targets: Mapping[str, int],
        ramping: set[str],
    ) -> Event:
        group = self.group
        if group.algorithm == "weighted":
            basis = "CPU headroom (weight proportional to 100 - cpu% + 5)"
        else:
            basis = "outstanding requests (weight inversely proportional to 1 + sessions + queue)"
        parts = [f"{s} {c['from']}->{c['to']}" for s, c in applied.items()]
        reason = f"{group.algorithm}: weights from {basis}: " + ", ".join(parts)
        if ramping & set(applied):
            reason += (
                f"; slow start over {group.slow_start_s:g} s for {', '.join(sorted(ramping & set(applied)))}"
            )
        numbers = {
            server: {
                "cpu_percent": load.cpu_percent,
                "sessions": load.sessions,
                "queue": load.queue,
                "target": targets.get(server),
            }
            for server, load in loads.items()
        }
        return {
            "kind": "lb.weights",
            "group": group.name,
            "backend": group.backend,
            "algorithm": group.algorithm,
            "reason": reason,
            "changes": {s: dict(c) for s, c in applied.items()},
            "numbers": numbers,
        }

    def _error(self, message: str) -> list[Event]:
        if message == self._last_error:
            return []
        self._last_error = message
        log.warning("service group %s: %s", self.group.name, message)
        return [
            {"kind": "lb.error", "group": self.group.name, "backend": self.group.backend, "reason": message}
        ]


class LoadBalancerService:
    """Every service group's weight controller, and one drainer for all of them.

    The composition root builds it from the stored groups
    (``LoadBalancerService(load_groups(store))``); the collector's control loop
    calls :meth:`step` each tick from a worker thread, the auto-scaler and the
    rebalancer get :attr:`drainer`.  ``on_event`` receives the drainer's events
    (drains happen outside :meth:`step`).
    """

    def __init__(
        self,
        groups: Sequence[ServiceGroup],
        *,
        open_runtime: Callable[[ServiceGroup], LbRuntime] = open_runtime,
        clock: Callable[[], float] = time.monotonic,
        on_event: EventSink | None = None,
        poll_interval_s: float = 0.2,
    ) -> None:
        from cloudmon.lb.drain import HaproxyDrainer  # drain imports this module

        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise ValueError(f"service group names must be unique: {names}")
        self._lock = threading.Lock()
        self.groups: tuple[ServiceGroup, ...] = tuple(groups)
        self.runtimes: dict[str, LbRuntime] = {g.name: open_runtime(g) for g in self.groups}
        self.controllers: dict[str, WeightController] = {
            g.name: WeightController(g, self.runtimes[g.name], clock=clock) for g in self.groups
        }
        self.drainer: HaproxyDrainer = HaproxyDrainer(
            [(g, self.runtimes[g.name]) for g in self.groups],
            clock=clock,
            on_event=on_event,
            poll_interval_s=poll_interval_s,
        )

    def step(self, cpu_by_instance: Mapping[str, float | None]) -> list[Event]:
        """One weight-control tick for every group; the events to log."""
        events: list[Event] = []
        with self._lock:
            for controller in self.controllers.values():
                events.extend(controller.step(cpu_by_instance))
        return events

    def close(self) -> None:
        """Cancel drains in progress and release the runtimes.  Idempotent."""
        self.drainer.close()
        for runtime in self.runtimes.values():
            close = getattr(runtime, "close", None)
            if callable(close):
                close()
