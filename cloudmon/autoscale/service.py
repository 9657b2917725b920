"""The auto-scaling reconciler: reads groups from the store, observes, decides, acts.

:class:`AutoscaleService` is synchronous; the collector calls :meth:`tick`
from a worker thread every few seconds.  Each tick, for every group document:

1. load the group's state (a ``group_state`` document; a restart continues);
2. observe: the provider's view of each instance (``describe``) and the
   instance's telemetry from the live :class:`ClusterModel` (matched on the
   instance's ``node_id``; a VM without an agent of its own, as the libvirt and
   agent providers create, is measured by its host's agent: :func:`vm_values`);
3. :func:`cloudmon.autoscale.controller.decide` (pure);
4. ask the :class:`Arbiter` (loop ``"autoscale"``; replacing unhealthy
   instances is mandatory) and act through the provider: launch, drain, delete;
5. save the state and append every event to the store.

Draining never blocks a tick: with a :class:`Drainer` the drain runs in a small
thread pool and the instance is deleted on the first tick after it finished;
without one, the drain hook is a deadline ``drain_timeout_s`` after the drain
began, checked against the injected clock.  A failing provider becomes an
event with its error text and does not stop the other groups.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final

import msgspec

from cloudmon.autoscale.controller import (
    Decision,
    Observation,
    decide,
    mark_deleted,
    mark_draining,
    mark_launch_failed,
    mark_launched,
    new_instance_name,
    place,
)
from cloudmon.autoscale.model import (
    EV_DRAIN,
    EV_ERROR,
    EV_GROUP_DELETED,
    EV_GROUP_DELETING,
    EV_GROUP_PUT,
    EV_LAUNCH,
    EV_LAUNCH_FAILED,
    EV_NO_ACTION,
    EV_TERMINATE,
    EV_TERMINATE_FAILED,
    GROUP_DOC,
    STATE_DOC,
    GroupSpec,
    GroupState,
    Instance,
    LaunchTemplate,
    SpecError,
    event,
    initial_state,
    spec_from_doc,
    state_from_doc,
)
from cloudmon.control.arbiter import Arbiter
from cloudmon.lb.base import Drainer, DrainOutcome
from cloudmon.model.cluster import ClusterModel, NodeStatus
from cloudmon.providers.base import InstanceInfo, LaunchRequest, Provider
from cloudmon.store.base import StoreError, TelemetryStore

logger = logging.getLogger(__name__)

LOOP: Final = "autoscale"
#: With a load balancer, a drain whose result was lost (restart) ends this long after its timeout.
DRAIN_SLACK_S: Final = 60.0
_EVENT_BATCH: Final = 5000


#: Figures a host's agent reports for each of its VMs, as ``vm.<name>.<field>``
#: (see ``cloudmon_agent.schema``'s flattening).
VM_FIELDS: Final = (
    "cpu_percent",
    "host_cpu_percent",
    "vcpus",
    "mem_max",
    "mem_current",
    "mem_rss",
    "mem_unused",
    "disk_read_bps",
    "disk_write_bps",
    "net_rx_bps",
    "net_tx_bps",
)


def vm_values(model: ClusterModel, vm: str, host: str | None, now: float) -> dict[str, float]:
    """A VM's latest figures as its host's agent reports them, or ``{}`` when no online agent does.

    Keys are the :data:`VM_FIELDS` (``cpu_percent``, ``mem_rss``, ...), and
    ``cpu.percent`` is the VM's ``cpu_percent`` (of its own vCPUs, as a
    hypervisor measures an EC2 instance's CPUUtilization), so a policy on the
    default metric works for VMs without an agent inside.  The node named
    ``host`` (node id or hostname) is looked at first; any online node that
    reports the VM (it may have been migrated) will do.  Offline nodes are
    skipped: their last values are stale.
    """
    key = f"vm.{vm}.cpu_percent"
    found: Mapping[str, float] | None = None
    # One pass, no sorting: this runs per instance per tick over every node.
    for node in model.nodes():
        latest = node.latest
        if key not in latest or node.status(now, model.node_timeout) is not NodeStatus.ONLINE:
            continue
        found = latest
        if host is not None and host in (node.node_id, node.hostname):
            break
    if found is None:
        return {}
    prefix = f"vm.{vm}."
    out = {f: found[prefix + f] for f in VM_FIELDS if prefix + f in found}
    out["cpu.percent"] = out["cpu_percent"]
    return out


class GroupError(Exception):
    """A group operation that cannot be done; the text says why and what to do."""


class GroupNotFound(GroupError):
    """No group of that name."""


class AutoscaleService:
    """Reconciles every auto-scaling group in the store with its providers.

    ``providers`` maps a launch template to its provider; it is called once per
    group per tick and should return a cached instance (the service does not
    close providers).
    """

    def __init__(
        self,
        store: TelemetryStore,
        model: ClusterModel,
        providers: Callable[[LaunchTemplate], Provider],
        drainer: Drainer | None,
        arbiter: Arbiter,
        clock: Callable[[], float],
        *,
        drain_workers: int = 4,
    ) -> None:
        self._store = store
        self._model = model
        self._providers = providers
        self._drainer = drainer
        self._arbiter = arbiter
        self._clock = clock
        self._lock = threading.RLock()
        self._pool: ThreadPoolExecutor | None = None
        if drainer is not None:
            self._pool = ThreadPoolExecutor(max_workers=drain_workers, thread_name_prefix="autoscale-drain")
        self._drains: dict[tuple[str, str], Future[DrainOutcome]] = {}
        self._bad_docs: dict[str, str] = {}
        self._closed = False

    # ----- group CRUD -----

    def put_group(self, spec: GroupSpec) -> str:
        """Create or replace a group; returns ``"created"``, ``"updated"`` or ``"unchanged"``.

        A changed min/max/desired is adopted on the next tick (even if scheduled
        actions or policies had moved them since).
        """
        # Constructing a GroupSpec validates it; this also catches one built with
        # msgspec.structs.replace, which skips __post_init__.
        doc = msgspec.to_builtins(spec)
        spec_from_doc(doc)
        with self._lock:
            old = self._store.get_document(GROUP_DOC, spec.name)
            state = self._load_state(spec.name)
            if state is not None and state.deleting:
                raise GroupError(
                    f"group {spec.name!r} is being deleted ({len(state.instances)} instance(s) left); "
                    "put it again once it is gone"
                )
            if old == doc:
                return "unchanged"
            self._store.put_document(GROUP_DOC, spec.name, doc)
            what = "created" if old is None else "updated"
            self._store.append_event(
                event(
                    EV_GROUP_PUT,
                    spec.name,
                    f"group {spec.name} {what}: min/max/desired {spec.min_size}/{spec.max_size}/{spec.desired}, "
                    f"{len(spec.policies)} policies, {len(spec.scheduled)} scheduled actions, "
                    f"provider {spec.template.provider}",
                    self._clock(),
                    {"min_size": spec.min_size, "max_size": spec.max_size, "desired": spec.desired},
                )
            )
            return what

    def delete_group(self, name: str, *, force: bool = False) -> bool:
        """Delete a group, as AWS's DeleteAutoScalingGroup does.

        A group without instances is removed at once (returns ``True``).  With
        instances, it is refused unless ``force``; with ``force`` the group's
        capacity goes to 0, its instances are terminated by the following ticks,
        and the group disappears when the last one is gone (returns ``False``).
        """
        with self._lock:
            if self._store.get_document(GROUP_DOC, name) is None:
                raise GroupNotFound(f"no auto-scaling group named {name!r}; list them with groups()")
            state = self._load_state(name)
            now = self._clock()
            if state is None or not state.instances:
                self._remove(name)
                self._store.append_event(
                    event(EV_GROUP_DELETED, name, f"group {name} deleted (it had no instances)", now)
                )
                return True
            n = len(state.instances)
            if not force:
                raise GroupError(
                    f"group {name!r} still has {n} instance(s); set its min_size and desired to 0 and wait "
                    "until they are terminated, or delete it with force, which terminates them"
                )
            if not state.deleting:
                state.deleting = True
                state.min_size = state.max_size = state.desired = 0
                self._save_state(state)
                self._store.append_event(
                    event(
                        EV_GROUP_DELETING,
                        name,
                        f"group {name} is being deleted: terminating its {n} instance(s)",
                        now,
                        {"instances": n},
                    )
                )
            return False

    def groups(self) -> list[GroupSpec]:
        """Every valid group in the store, by name."""
        specs, _ = self._load_specs()
        return [specs[k] for k in sorted(specs)]

    def group(self, name: str) -> GroupSpec | None:
        """One group's spec, or ``None``."""
        doc = self._store.get_document(GROUP_DOC, name)
        return None if doc is None else spec_from_doc(doc)

    def group_state(self, name: str) -> GroupState | None:
        """A group's state (desired, instances, cooldown marks), or ``None`` before its first tick."""
        return self._load_state(name)

    def activity(self, name: str, limit: int = 100) -> list[dict[str, object]]:
        """The group's events (``autoscale.*``), newest first, at most ``limit``."""
        if limit < 1:
            raise ValueError(f"limit: must be >= 1, got {limit!r}")
        now = self._clock()
        horizon = now - 400 * 86400.0
        found: dict[str, dict[str, object]] = {}
        end = now + 1.0
        span = 3600.0
        while end > horizon and len(found) < limit:
            start = max(horizon, end - span)
            batch = self._store.events(start, end, limit=_EVENT_BATCH)
            for e in batch:
                if e.get("group") == name and str(e.get("kind", "")).startswith("autoscale."):
                    found[str(e.get("id"))] = e
            if len(batch) >= _EVENT_BATCH:
                # A full batch: continue just above its oldest event (ids de-duplicate).
                oldest = float(batch[0]["ts"])  # type: ignore[arg-type]
                end = oldest + 0.001 if oldest + 0.001 < end else oldest
            else:
                end = start
                span *= 4
        out = sorted(found.values(), key=lambda e: float(e["ts"]), reverse=True)  # type: ignore[arg-type]
        return out[:limit]

    # ----- the loop -----

    def tick(self) -> list[dict[str, object]]:
        """Reconcile every group once; returns the events recorded (also in the store)."""
        if self._closed:
            raise GroupError("the auto-scaling service is closed")
        specs, errors = self._load_specs()
        out: list[dict[str, object]] = list(errors)
        for name in sorted(specs):
            with self._lock:
                try:
                    events = self._tick_group(specs[name])
                except StoreError as exc:
                    logger.warning("autoscale: group %s skipped this tick: store error: %s", name, exc)
                    continue
                except Exception as exc:
                    logger.exception("autoscale: group %s failed this tick", name)
                    events = [event(EV_ERROR, name, f"tick failed: {exc!r}", self._clock())]
            out.extend(events)
            self._append(events)
        self._append(errors)
        return out

    def close(self) -> None:
        """Stop the drain workers (waiting for running drains, which are time-limited).  Idempotent."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    # ----- internals -----

    def _append(self, events: list[dict[str, object]]) -> None:
        for ev in events:
            try:
                self._store.append_event(ev)
            except (StoreError, ValueError) as exc:
                logger.warning("autoscale: event %s not stored: %s", ev.get("kind"), exc)

    def _load_specs(self) -> tuple[dict[str, GroupSpec], list[dict[str, object]]]:
        specs: dict[str, GroupSpec] = {}
        errors: list[dict[str, object]] = []
        for key, doc in self._store.list_documents(GROUP_DOC).items():
            try:
                specs[key] = spec_from_doc(doc)
            except SpecError as exc:
                # Report a broken document once, not every tick.
                if self._bad_docs.get(key) != str(exc):
                    self._bad_docs[key] = str(exc)
                    errors.append(
                        event(
                            EV_ERROR, key, f"group document is invalid and is skipped: {exc}", self._clock()
                        )
                    )
        return specs, errors

    def _load_state(self, name: str) -> GroupState | None:
        doc = self._store.get_document(STATE_DOC, name)
        return None if doc is None else state_from_doc(doc)

    def _save_state(self, state: GroupState) -> None:
        self._store.put_document(STATE_DOC, state.group, msgspec.to_builtins(state))

    def _remove(self, name: str) -> None:
        self._store.delete_document(GROUP_DOC, name)
        self._store.delete_document(STATE_DOC, name)
        self._drains = {k: f for k, f in self._drains.items() if k[0] != name}

    def _quiet(
        self,
        state: GroupState,
        events: list[dict[str, object]],
        code: str,
        reason: str,
        nums: dict[str, float],
    ) -> None:
        if state.quiet.get("reconcile") == code:
            return
        state.quiet["reconcile"] = code
        events.append(event(EV_NO_ACTION, state.group, reason, self._clock(), nums, code=code))

    def _observe(
        self, spec: GroupSpec, state: GroupState, provider: Provider
    ) -> tuple[dict[str, Observation], dict[str, InstanceInfo]]:
        now = self._clock()
        ids = [i.id for i in state.instances]
        described = provider.describe(ids) if ids else {}
        obs: dict[str, Observation] = {}
        updated: list[Instance] = []
        for inst in state.instances:
            info = described.get(inst.id)
            if info is not None and (
                (inst.node_id is None and info.node_id) or (inst.host is None and info.host)
            ):
                # The provider learnt where it runs / which agent reports it after launch.
                inst = msgspec.structs.replace(
                    inst, node_id=inst.node_id or info.node_id, host=inst.host or info.host
                )
            updated.append(inst)
            node = self._model.get(inst.node_id) if inst.node_id else None
            if node is not None:
                values = dict(node.latest)
            elif inst.node_id is None:
                values = vm_values(self._model, inst.id, inst.host, now)
            else:
                values = {}
            obs[inst.id] = Observation(
                state=info.state if info is not None else None,
                values=values,
                # Only an instance's own agent counts for health; a host reporting it is not its agent.
                last_report=node.last_seen if node is not None else None,
            )
        state.instances = updated
        return obs, described

    def _host_figures(self, provider: Provider) -> Mapping[str, Mapping[str, float]]:
        try:
            return provider.hosts()
        except Exception as exc:  # noqa: BLE001 - placement falls back to the provider's own choice
            logger.warning("autoscale: provider %s could not list hosts: %s", provider.name, exc)
            return {}

    def _drained(self, group: str) -> set[str]:
        return {iid for (g, iid), fut in self._drains.items() if g == group and fut.done()}

    def _tick_group(self, spec: GroupSpec) -> list[dict[str, object]]:
        now = self._clock()
        name = spec.name
        state = self._load_state(name) or initial_state(spec)
        try:
            provider = self._providers(spec.template)
            obs, _ = self._observe(spec, state, provider)
        except Exception as exc:  # noqa: BLE001 - a provider failure is an event, not a crash
            return [
                event(
                    EV_ERROR,
                    name,
                    f"cannot observe the group's instances through provider {spec.template.provider!r}: {exc}; "
                    "nothing is changed until it answers",
                    now,
                    provider=spec.template.provider,
                )
            ]
        host_load: dict[str, float] = {}
        if spec.termination_policy == "most_loaded_host":
            for h, f in self._host_figures(provider).items():
                if f.get("vcpus"):
                    host_load[h] = f.get("vcpus_used", 0.0) / f["vcpus"]
        dec = decide(spec, state, now, obs, host_load=host_load, drained=self._drained(name))
        events = list(dec.events)
        st = dec.state
        self._delete(spec, st, dec, provider, now, events)
        self._drain(spec, st, dec, now, events)
        self._launch(spec, st, dec, provider, now, events)
        if st.deleting and not st.instances:
            self._remove(name)
            events.append(
                event(EV_GROUP_DELETED, name, f"group {name} deleted: its last instance is gone", now)
            )
            return events
        self._save_state(st)
        return events

    def _delete(
        self,
        spec: GroupSpec,
        st: GroupState,
        dec: Decision,
        provider: Provider,
        now: float,
        events: list[dict[str, object]],
    ) -> None:
        by_id = {i.id: i for i in st.instances}
        for iid in dec.delete:
            inst = by_id[iid]
            if inst.state == "unhealthy":
                grant = self._arbiter.request(LOOP, iid, source=inst.host, mandatory=True)
                if not grant:
                    self._quiet(
                        st,
                        events,
                        "arbiter_refused",
                        f"instance {iid} not replaced yet: {grant.reason}",
                        grant.numbers,
                    )
                    continue
            try:
                provider.delete(iid)
            except Exception as exc:  # noqa: BLE001 - retried next tick; the error goes to the activity history
                events.append(
                    event(
                        EV_TERMINATE_FAILED,
                        spec.name,
                        f"could not terminate instance {iid} through {provider.name}: {exc}; retrying next tick",
                        now,
                        instance=iid,
                        error=str(exc),
                    )
                )
                continue
            mark_deleted(st, iid)
            self._arbiter.release(LOOP, iid)
            outcome = None
            fut = self._drains.pop((spec.name, iid), None)
            if fut is not None and fut.done() and fut.exception() is None:
                outcome = fut.result()
            nums: dict[str, float] = {"age_s": now - inst.launched_at}
            if outcome is not None:
                nums.update(outcome.numbers)
                nums["drain_waited_s"] = outcome.waited_s
            why = inst.reason + (f"; load balancer: {outcome.reason}" if outcome is not None else "")
            events.append(
                event(
                    EV_TERMINATE,
                    spec.name,
                    f"instance {iid} terminated ({why})",
                    now,
                    nums,
                    instance=iid,
                    host=inst.host,
                    node=inst.node_id,
                )
            )

    def _drain(
        self, spec: GroupSpec, st: GroupState, dec: Decision, now: float, events: list[dict[str, object]]
    ) -> None:
        for iid in dec.drain:
            grant = self._arbiter.request(
                LOOP, iid, source=next((i.host for i in st.instances if i.id == iid), None)
            )
            if not grant:
                self._quiet(
                    st,
                    events,
                    "arbiter_refused",
                    f"scale-in of instance {iid} refused by the arbiter: {grant.reason}; retrying next tick",
                    {**grant.numbers, "desired": st.desired, "live": len(st.live())},
                )
                continue
            st.quiet.pop("reconcile", None)
            if st.deleting:
                timeout, why = 0.0, "group deleted with force"
            else:
                timeout, why = spec.drain_timeout_s, f"scale-in to {st.desired}"
            if self._drainer is not None and self._pool is not None and not st.deleting:
                self._drains[(spec.name, iid)] = self._pool.submit(self._drainer.drain, iid, timeout)
                how = "load balancer drains it"
                deadline = now + timeout + DRAIN_SLACK_S
            else:
                how = "drain hook waits"
                deadline = now + timeout
            mark_draining(st, iid, now, deadline, why)
            events.append(
                event(
                    EV_DRAIN,
                    spec.name,
                    f"instance {iid} taken out of service ({why}); {how} up to {timeout:.0f} s before it is terminated",
                    now,
                    {"drain_timeout_s": timeout, "desired": st.desired, "live": len(st.live())},
                    instance=iid,
                )
            )

    def _launch(
        self,
        spec: GroupSpec,
        st: GroupState,
        dec: Decision,
        provider: Provider,
        now: float,
        events: list[dict[str, object]],
    ) -> None:
        if dec.launch <= 0:
            return
        figures = self._host_figures(provider)
        t = spec.template
        for k in range(dec.launch):
            mandatory = k < dec.mandatory_launches
            name = new_instance_name(st)
            grant = self._arbiter.request(LOOP, name, mandatory=mandatory)
            if not grant:
                st.seq -= 1
                self._quiet(
                    st,
                    events,
                    "arbiter_refused",
                    f"launch refused by the arbiter: {grant.reason}; {dec.launch - k} instance(s) still to launch",
                    {**grant.numbers, "desired": st.desired, "live": len(st.live())},
                )
                return
            host = place(t.vcpus, t.memory_mib, t.hosts, figures, st.instances)
            req = LaunchRequest(
                group=spec.name,
                name=name,
                vcpus=t.vcpus,
                memory_mib=t.memory_mib,
                image=t.image,
                host=host,
                params=dict(t.params),
            )
            try:
                info = provider.create(req)
            except Exception as exc:  # noqa: BLE001 - a failed launch is an event; the loop goes on
                backoff = mark_launch_failed(st, now)
                self._arbiter.release(LOOP, name)
                events.append(
                    event(
                        EV_LAUNCH_FAILED,
                        spec.name,
                        f"could not launch {name} on {host or 'a host of the provider’s choice'} through "
                        f"{provider.name}: {exc}; next attempt in {backoff:.0f} s",
                        now,
                        {"failures": st.launch_failures, "backoff_s": backoff},
                        instance=name,
                        error=str(exc),
                    )
                )
                return
            self._arbiter.release(LOOP, name)
            inst = Instance(
                id=info.id,
                group=spec.name,
                state="pending",
                host=info.host or host,
                node_id=info.node_id,
                launched_at=now,
            )
            mark_launched(st, inst, mandatory=mandatory)
            why = "replacing an unhealthy instance" if mandatory else f"desired {st.desired}"
            events.append(
                event(
                    EV_LAUNCH,
                    spec.name,
                    f"launched {info.id} on {inst.host or 'the provider’s choice'} ({why})",
                    now,
                    {
                        "desired": st.desired,
                        "live": len(st.live()),
                        "vcpus": t.vcpus,
                        "memory_mib": t.memory_mib,
                    },
                    instance=info.id,
                    host=inst.host,
                )
            )
