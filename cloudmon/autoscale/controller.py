"""The pure group controller: observations in, new state and decisions out.

:func:`decide` takes a group's spec, its state, ``now`` and what was observed
(each instance's provider state, latest metric values and last agent report)
and returns a :class:`Decision`: the new state (desired capacity, instance
lifecycle changes), the events that explain it, and what to do — launch N,
start draining some instances, delete others.  The service asks the arbiter and
carries the actions out, then records their outcome with the ``mark_*``
helpers below, which the benchmark and tests share.

Order of one tick (as in AWS): adopt a changed spec, update instance lifecycle
and health, fire due scheduled actions, evaluate the scaling policies, clamp
desired to [min, max], then reconcile the live instances with desired.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import msgspec

from cloudmon.autoscale import cron
from cloudmon.autoscale.model import (
    EV_CAPACITY,
    EV_IN_SERVICE,
    EV_NO_ACTION,
    EV_SCALE_IN,
    EV_SCALE_OUT,
    EV_SCHEDULED,
    EV_UNHEALTHY,
    GroupSpec,
    GroupState,
    Instance,
    StepScalingPolicy,
    TargetTrackingPolicy,
    TerminationPolicy,
    event,
)
from cloudmon.autoscale.policy import Proposal, step_scaling, target_tracking
from cloudmon.providers.base import InstanceState

#: Longest pause between launch attempts after repeated launch failures.
MAX_LAUNCH_BACKOFF_S = 300.0


@dataclass(frozen=True, slots=True)
class Observation:
    """What was seen of one instance this tick."""

    #: The provider's view; ``None`` when the provider was not asked or did not say.
    state: InstanceState | None = None
    #: Latest metric values from the instance's agent (empty when none).
    values: Mapping[str, float] = field(default_factory=dict)
    #: When its agent last reported (collector time), or ``None`` if never.
    last_report: float | None = None


@dataclass(slots=True)
class Decision:
    """The controller's answer for one group and tick."""

    state: GroupState
    events: list[dict[str, object]]
    #: Instances to launch now; the first ``mandatory_launches`` replace unhealthy ones.
    launch: int = 0
    mandatory_launches: int = 0
    #: Live instances to take out of service (scale-in): drain, then delete.
    drain: list[str] = field(default_factory=list)
    #: Unhealthy or drained instances to delete now.
    delete: list[str] = field(default_factory=list)


def copy_state(state: GroupState) -> GroupState:
    """A deep copy, so that :func:`decide` never changes its caller's state."""
    return msgspec.convert(msgspec.to_builtins(state), GroupState)


def _warmup(spec: GroupSpec, policy: TargetTrackingPolicy | StepScalingPolicy) -> float:
    return spec.default_warmup_s if policy.warmup_s is None else policy.warmup_s


def _measure(
    instances: Sequence[Instance], obs: Mapping[str, Observation], metric: str, warmup: float, now: float
) -> tuple[list[float], int]:
    """Values of ``metric`` from warmed-up in-service instances, and how many are still warming."""
    values: list[float] = []
    warming = 0
    for inst in instances:
        if inst.state == "pending":
            warming += 1
            continue
        if inst.state != "in_service":
            continue
        if inst.in_service_at is None or now - inst.in_service_at < warmup:
            warming += 1
            continue
        o = obs.get(inst.id)
        if o is not None and metric in o.values and math.isfinite(o.values[metric]):
            values.append(o.values[metric])
    return values, warming


def choose_victims(
    instances: Sequence[Instance],
    n: int,
    policy: TerminationPolicy,
    host_load: Mapping[str, float] | None = None,
) -> list[Instance]:
    """Pick ``n`` live instances to remove under the termination policy.

    ``most_loaded_host`` takes instances from the host with the highest load
    (``host_load``, a fraction), then the host with most of the group's
    instances, oldest first within a host.
    """
    if n <= 0:
        return []
    if policy == "oldest":
        ordered = sorted(instances, key=lambda i: (i.launched_at, i.id))
    elif policy == "newest":
        ordered = sorted(instances, key=lambda i: (-i.launched_at, i.id))
    else:
        loads = host_load or {}
        per_host = Counter(i.host for i in instances)
        picked: list[Instance] = []
        left = list(instances)
        for _ in range(min(n, len(left))):
            best = min(
                left,
                key=lambda i: (-loads.get(i.host or "", 0.0), -per_host[i.host], i.launched_at, i.id),
            )
            picked.append(best)
            left.remove(best)
            per_host[best.host] -= 1
        return picked
    return ordered[:n]


#: A source logs a routine decision not to act at most this often (seconds).
QUIET_MIN_S: Final = 60.0
#: Decisions not to act that are always logged when they start.
ALWAYS_LOGGED: Final = frozenset(
    {"at_max", "arbiter_refused", "no_data", "launch_backoff", "scale_in_disabled"}
)


class _Events:
    def __init__(self, group: str, now: float, state: GroupState) -> None:
        self.group = group
        self.now = now
        self.state = state
        self.out: list[dict[str, object]] = []

    def add(self, kind: str, reason: str, numbers: dict[str, float] | None = None, **extra: object) -> None:
        self.out.append(event(kind, self.group, reason, self.now, numbers, **extra))

    def quiet(
        self, source: str, p: Proposal | None, code: str, reason: str, numbers: dict[str, float]
    ) -> None:
        """A decision not to act, logged when its reason differs from the last one of ``source``
        and the same reason was not logged for it in the last :data:`QUIET_MIN_S` seconds
        (a metric hovering at a band's edge must not flood the activity history).
        """
        if self.state.quiet.get(source) == code:
            return
        self.state.quiet[source] = code
        key = f"{source}/{code}"
        last = self.state.quiet_at.get(key)
        if last is not None and self.now - last < QUIET_MIN_S:
            return
        self.state.quiet_at[key] = self.now
        extra: dict[str, object] = {"code": code}
        if p is not None:
            extra["policy"] = p.policy
        self.add(EV_NO_ACTION, reason, numbers, **extra)


def _adopt_spec(spec: GroupSpec, st: GroupState, ev: _Events) -> None:
    sizes = [spec.min_size, spec.max_size, spec.desired]
    if st.deleting or st.spec_sizes == sizes:
        return
    old = (st.min_size, st.max_size, st.desired)
    st.min_size, st.max_size, st.desired = spec.min_size, spec.max_size, spec.desired
    st.spec_sizes = sizes
    ev.add(
        EV_CAPACITY,
        f"group spec changed: min/max/desired {old[0]}/{old[1]}/{old[2]} -> {spec.min_size}/{spec.max_size}/{spec.desired}",
        {"min_size": spec.min_size, "max_size": spec.max_size, "desired": spec.desired},
    )


def _update_instances(
    spec: GroupSpec,
    st: GroupState,
    now: float,
    obs: Mapping[str, Observation],
    drained: Collection[str],
    ev: _Events,
) -> None:
    out: list[Instance] = []
    for inst in st.instances:
        o = obs.get(inst.id)
        pstate = o.state if o is not None else None
        age = now - inst.launched_at
        if inst.state == "pending" and pstate == InstanceState.RUNNING:
            inst = msgspec.structs.replace(inst, state="in_service", in_service_at=now)
            ev.add(
                EV_IN_SERVICE,
                f"instance {inst.id} is running after {age:.0f} s; it counts in metrics after its warm-up",
                {"boot_s": age},
                instance=inst.id,
            )
        if inst.state in ("pending", "in_service"):
            why = ""
            nums: dict[str, float] = {"age_s": age, "grace_s": spec.health_check_grace_s}
            if pstate in (InstanceState.STOPPED, InstanceState.MISSING):
                why = f"its VM is {pstate.value} according to the provider"
            elif inst.state == "pending" and age >= spec.health_check_grace_s and pstate is not None:
                why = f"it is still not running {age:.0f} s after launch (grace period {spec.health_check_grace_s:.0f} s)"
            elif inst.state == "in_service" and inst.node_id is not None and age >= spec.health_check_grace_s:
                last = o.last_report if o is not None else None
                if last is None:
                    why = (
                        f"its agent ({inst.node_id}) has not reported within the "
                        f"{spec.health_check_grace_s:.0f} s grace period"
                    )
                elif now - last > spec.health_check_timeout_s:
                    nums["silent_s"] = now - last
                    nums["timeout_s"] = spec.health_check_timeout_s
                    why = (
                        f"its agent ({inst.node_id}) has been silent for {now - last:.0f} s "
                        f"(limit {spec.health_check_timeout_s:.0f} s)"
                    )
            if why:
                inst = msgspec.structs.replace(inst, state="unhealthy", reason=why)
                st.replacements_owed += 1
                ev.add(
                    EV_UNHEALTHY,
                    f"instance {inst.id} is unhealthy: {why}; replacing it",
                    nums,
                    instance=inst.id,
                )
        elif inst.state == "draining":
            done = inst.id in drained
            timed_out = inst.drain_deadline is not None and now >= inst.drain_deadline
            gone = pstate == InstanceState.MISSING
            if done or timed_out or gone:
                how = "drained" if done else "gone" if gone else "drain timeout reached"
                inst = msgspec.structs.replace(inst, state="terminating", reason=f"{inst.reason}; {how}")
        out.append(inst)
    st.instances = out


def _scheduled(spec: GroupSpec, st: GroupState, now: float, ev: _Events) -> None:
    checked = st.scheduled_checked_at
    st.scheduled_checked_at = now
    # The first tick of a group does not replay actions from before it existed.
    if checked is None or st.deleting:
        return
    for action in spec.scheduled:
        fire = cron.next_fire(action.cron, checked)
        if fire is None or fire > now:
            continue
        old = (st.min_size, st.max_size, st.desired)
        if action.min_size is not None:
            st.min_size = action.min_size
        if action.max_size is not None:
            st.max_size = action.max_size
        if st.min_size > st.max_size:
            # The action set one bound past the other: the bound it set wins, as AWS rejects neither.
            if action.min_size is not None:
                st.max_size = st.min_size
            else:
                st.min_size = st.max_size
        if action.desired is not None:
            st.desired = action.desired
        st.desired = max(st.min_size, min(st.max_size, st.desired))
        st.scheduled_fired[action.name] = fire
        ev.add(
            EV_SCHEDULED,
            f"scheduled action {action.name} ({action.cron!r}) set min/max/desired "
            f"{old[0]}/{old[1]}/{old[2]} -> {st.min_size}/{st.max_size}/{st.desired}",
            {"min_size": st.min_size, "max_size": st.max_size, "desired": st.desired, "fire_time": fire},
            action=action.name,
        )


def _policies(
    spec: GroupSpec, st: GroupState, now: float, obs: Mapping[str, Observation], ev: _Events
) -> None:
    live = st.live()
    proposals: list[Proposal] = []
    for p in spec.policies:
        values, warming = _measure(live, obs, p.metric, _warmup(spec, p), now)
        if isinstance(p, TargetTrackingPolicy):
            proposals.append(target_tracking(p, st, now, values, warming))
        else:
            proposals.append(step_scaling(p, spec, st, now, values, warming))
    d = st.desired
    outs = [p for p in proposals if p.desired is not None and p.desired > d]
    ins = [p for p in proposals if p.desired is not None and p.desired < d]
    vetoes = [p for p in proposals if p.veto_scale_in]
    winner: Proposal | None = None
    if outs:
        # The policy asking for the most capacity wins (AWS).
        winner = max(outs, key=lambda p: p.desired or 0)
    elif ins and not vetoes:
        # Of several scale-ins, the most conservative one.
        winner = max(ins, key=lambda p: p.desired or 0)
    for q in proposals:
        if q is winner:
            continue
        if q.desired is None:
            ev.quiet(q.policy, q, q.code, q.reason, q.numbers)
        elif winner is None:
            ev.quiet(
                q.policy,
                q,
                "held_by_policy",
                f"{q.reason}; not applied: target-tracking policy {vetoes[0].policy} is not below its target",
                q.numbers,
            )
        else:
            ev.quiet(
                q.policy,
                q,
                "superseded",
                f"{q.reason}; not applied: policy {winner.policy} asked for {winner.desired}",
                q.numbers,
            )
    if winner is None or winner.desired is None:
        return
    st.quiet.pop(winner.policy, None)
    st.desired = winner.desired
    st.policy_acted_at[winner.policy] = now
    if winner.desired > d:
        st.last_scale_out_at = now
        kind = EV_SCALE_OUT
    else:
        st.last_scale_in_at = now
        kind = EV_SCALE_IN
        # The next scale-in needs another full period below the band.
        if winner.policy in st.below_since:
            st.below_since[winner.policy] = now
    ev.add(kind, winner.reason, {**winner.numbers, "from": d, "to": winner.desired}, policy=winner.policy)


def decide(
    spec: GroupSpec,
    state: GroupState,
    now: float,
    observations: Mapping[str, Observation],
    *,
    host_load: Mapping[str, float] | None = None,
    drained: Collection[str] = (),
) -> Decision:
    """One reconciliation step for one group; ``state`` is not modified.

    ``observations`` is keyed by instance id; ``drained`` holds ids of draining
    instances whose load-balancer drain has finished; ``host_load`` (fraction
    0..1 per host) serves the ``most_loaded_host`` termination policy.
    """
    st = copy_state(state)
    ev = _Events(spec.name, now, st)
    _adopt_spec(spec, st, ev)
    _update_instances(spec, st, now, observations, drained, ev)
    _scheduled(spec, st, now, ev)
    if not st.deleting:
        _policies(spec, st, now, observations, ev)
    st.desired = max(st.min_size, min(st.max_size, st.desired))
    st.updated_at = now

    dec = Decision(state=st, events=ev.out)
    dec.delete = [i.id for i in st.instances if i.state in ("unhealthy", "terminating")]
    live = st.live()
    if len(live) < st.desired:
        want = st.desired - len(live)
        if st.launch_backoff_until is not None and now < st.launch_backoff_until:
            left = st.launch_backoff_until - now
            ev.quiet(
                "reconcile",
                None,
                "launch_backoff",
                f"{want} instance(s) to launch, but the last {st.launch_failures} launch(es) failed; "
                f"next attempt in {left:.0f} s",
                {"to_launch": want, "backoff_left_s": left, "failures": st.launch_failures},
            )
        else:
            dec.launch = want
            dec.mandatory_launches = min(want, st.replacements_owed)
    elif len(live) > st.desired:
        victims = choose_victims(live, len(live) - st.desired, spec.termination_policy, host_load)
        dec.drain = [v.id for v in victims]
    return dec


# ----- recording what the service did (shared with tests and the benchmark) -----


def new_instance_name(state: GroupState) -> str:
    """A unique name for the next instance of the group (advances ``state.seq``)."""
    state.seq += 1
    return f"{state.group}-{state.seq:04d}"


def mark_launched(state: GroupState, instance: Instance, *, mandatory: bool) -> None:
    """Record a successful launch."""
    state.instances.append(instance)
    state.launch_failures = 0
    state.launch_backoff_until = None
    state.quiet.pop("reconcile", None)
    if mandatory and state.replacements_owed > 0:
        state.replacements_owed -= 1


def mark_launch_failed(state: GroupState, now: float) -> float:
    """Record a failed launch; returns the back-off (s) before the next attempt."""
    state.launch_failures += 1
    backoff = min(MAX_LAUNCH_BACKOFF_S, 10.0 * 2.0 ** (state.launch_failures - 1))
    state.launch_backoff_until = now + backoff
    return backoff


def mark_draining(state: GroupState, instance_id: str, now: float, deadline: float, reason: str) -> None:
    """Take a live instance out of service: it no longer counts toward capacity."""
    state.instances = [
        msgspec.structs.replace(
            i, state="draining", drain_started_at=now, drain_deadline=deadline, reason=reason
        )
        if i.id == instance_id
        else i
        for i in state.instances
    ]


def mark_deleted(state: GroupState, instance_id: str) -> None:
    """Forget an instance the provider has deleted."""
    state.instances = [i for i in state.instances if i.id != instance_id]


def place(
    vcpus: int,
    memory_mib: int,
    allowed: Sequence[str],
    hosts: Mapping[str, Mapping[str, float]],
    instances: Sequence[Instance],
) -> str | None:
    """Pick a host for a new instance: spread the group's instances, then most free vCPUs.

    ``hosts`` holds the provider's figures (``vcpus``, ``vcpus_used``,
    ``memory_mib``, ``memory_mib_used``); ``allowed`` the template's hosts
    (empty: any).  Hosts without room for ``vcpus``/``memory_mib`` are skipped
    when their figures are known; ``None`` lets the provider choose.
    """
    names = list(allowed) if allowed else sorted(hosts)
    if not names:
        return None
    per_host = Counter(i.host for i in instances if i.state in ("pending", "in_service", "draining"))

    def free(h: str, what: str) -> float:
        f = hosts.get(h, {})
        return f.get(what, math.inf) - f.get(f"{what}_used", 0.0)

    fitting = [h for h in names if free(h, "vcpus") >= vcpus and free(h, "memory_mib") >= memory_mib]
    # Nothing fits: still pick among the allowed hosts, so the provider's error says why.
    candidates = fitting or names
    return min(candidates, key=lambda h: (per_host[h], -free(h, "vcpus"), h))
