"""Auto-scaling groups as plain data: specs, policies, instances, state and events.

Everything here is a msgspec Struct that round-trips through JSON, because
groups and their state live in the store as documents
(``store.put_document(GROUP_DOC, name, msgspec.to_builtins(spec))``).  The
semantics follow AWS EC2 Auto Scaling: min/max/desired capacity, target
tracking, step scaling with ChangeInCapacity / ExactCapacity /
PercentChangeInCapacity and a minimum magnitude, scheduled actions, health-check
grace period, instance warm-up, cooldowns and termination policies.

Specs validate themselves on construction and on decoding
(``msgspec.convert(doc, GroupSpec)``); errors name the field and the fix.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any, Final, Literal

import msgspec

from cloudmon.autoscale import cron

#: Document kinds in the store.
GROUP_DOC: Final = "group"
STATE_DOC: Final = "group_state"

#: Event kinds (every event also carries ``group``, ``reason``, ``numbers`` and ``ts``).
EV_SCALE_OUT: Final = "autoscale.scale_out"
EV_SCALE_IN: Final = "autoscale.scale_in"
EV_NO_ACTION: Final = "autoscale.no_action"
EV_SCHEDULED: Final = "autoscale.scheduled"
EV_CAPACITY: Final = "autoscale.capacity_set"
EV_LAUNCH: Final = "autoscale.launch"
EV_LAUNCH_FAILED: Final = "autoscale.launch_failed"
EV_IN_SERVICE: Final = "autoscale.in_service"
EV_UNHEALTHY: Final = "autoscale.replace_unhealthy"
EV_DRAIN: Final = "autoscale.drain"
EV_TERMINATE: Final = "autoscale.terminate"
EV_TERMINATE_FAILED: Final = "autoscale.terminate_failed"
EV_GROUP_PUT: Final = "autoscale.group_put"
EV_GROUP_DELETING: Final = "autoscale.group_deleting"
EV_GROUP_DELETED: Final = "autoscale.group_deleted"
EV_ERROR: Final = "autoscale.error"

EVENT_KINDS: Final = (
    EV_SCALE_OUT,
    EV_SCALE_IN,
    EV_NO_ACTION,
    EV_SCHEDULED,
    EV_CAPACITY,
    EV_LAUNCH,
    EV_LAUNCH_FAILED,
    EV_IN_SERVICE,
    EV_UNHEALTHY,
    EV_DRAIN,
    EV_TERMINATE,
    EV_TERMINATE_FAILED,
    EV_GROUP_PUT,
    EV_GROUP_DELETING,
    EV_GROUP_DELETED,
    EV_ERROR,
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

TerminationPolicy = Literal["oldest", "newest", "most_loaded_host"]
AdjustmentType = Literal["change_in_capacity", "exact_capacity", "percent_change_in_capacity"]
Comparison = Literal[">", ">=", "<", "<="]
Statistic = Literal["average", "maximum", "minimum"]
Lifecycle = Literal["pending", "in_service", "unhealthy", "draining", "terminating"]


class SpecError(ValueError):
    """A group spec that cannot be used; the text names the field and the fix."""


def _check_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise SpecError(
            f"{what} name {name!r}: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )


def _nonneg(field: str, value: float | None) -> None:
    if value is not None and (not math.isfinite(value) or value < 0):
        raise SpecError(f"{field}: must be a number of seconds >= 0, got {value!r}")


class LaunchTemplate(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What each instance of a group is built from."""

    #: Provider name from :data:`cloudmon.providers.PROVIDERS`.
    provider: str = "simulated"
    #: Base image, template domain XML or an image id (provider-specific).
    image: str = ""
    vcpus: int = 1
    memory_mib: int = 512
    #: Hosts the group may place on; empty means any host the provider offers.
    hosts: list[str] = []
    #: Free-form provider parameters, passed through in the LaunchRequest.
    params: dict[str, Any] = {}

    def __post_init__(self) -> None:
        if not self.provider:
            raise SpecError("template.provider: name a provider, e.g. 'libvirt', 'command' or 'simulated'")
        if self.vcpus < 1:
            raise SpecError(f"template.vcpus: must be >= 1, got {self.vcpus}")
        if self.memory_mib < 16:
            raise SpecError(f"template.memory_mib: must be >= 16 MiB, got {self.memory_mib}")


class TargetTrackingPolicy(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag="target_tracking",
    tag_field="type",
):
    """Keep a metric's group average at ``target``: scale out fast, scale in slowly.

    Scale-out sets capacity to ``ceil(measured * value / target)`` (AWS's
    proportional rule) as soon as the value is above ``target * (1 + tolerance)``.
    Scale-in needs the value below ``target * (1 - tolerance)`` for
    ``scale_in_after_s`` without a break, no instance warming up, the scale-in
    cooldown over, and removes at most ``scale_in_max_percent`` % of the capacity
    (at least one instance) per step.
    """

    name: str
    #: Any reported metric name (``cpu.percent``, ``mem.percent``, ...);
    #: averaged over in-service, warmed-up instances.
    metric: str = "cpu.percent"
    target: float
    scale_in_enabled: bool = True
    #: Instance warm-up; ``None`` uses the group's ``default_warmup_s``.
    warmup_s: float | None = None
    scale_out_cooldown_s: float = 60.0
    scale_in_cooldown_s: float = 300.0
    #: Relative dead band around the target in which nothing happens.
    tolerance: float = 0.1
    #: How long the metric must stay below the band before scale-in.
    scale_in_after_s: float = 300.0
    scale_in_max_percent: float = 10.0

    def __post_init__(self) -> None:
        _check_name("policy", self.name)
        where = f"policy {self.name!r}"
        if not math.isfinite(self.target) or self.target <= 0:
            raise SpecError(f"{where}: target must be > 0 (e.g. 50 for 50 % CPU), got {self.target!r}")
        if not 0 <= self.tolerance < 1:
            raise SpecError(
                f"{where}: tolerance is a fraction in [0, 1), e.g. 0.1 for ±10 %; got {self.tolerance!r}"
            )
        if not 0 < self.scale_in_max_percent <= 100:
            raise SpecError(
                f"{where}: scale_in_max_percent must be in (0, 100], got {self.scale_in_max_percent!r}"
            )
        for f in ("warmup_s", "scale_out_cooldown_s", "scale_in_cooldown_s", "scale_in_after_s"):
            _nonneg(f"{where}: {f}", getattr(self, f))


class Alarm(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``metric <comparison> threshold`` held for ``duration_s`` ("CPU > 80 % for 3 min")."""

    threshold: float
    comparison: Comparison = ">"
    duration_s: float = 180.0

    def breached(self, value: float) -> bool:
        """Whether ``value`` is on the alarm side of the threshold."""
        c = self.comparison
        t = self.threshold
        return value > t if c == ">" else value >= t if c == ">=" else value < t if c == "<" else value <= t


class Step(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One step adjustment; bounds are offsets from the alarm threshold (as in AWS).

    ``lower`` is inclusive and ``upper`` exclusive; ``None`` is unbounded.
    """

    lower: float | None = None
    upper: float | None = None
    adjustment: float

    def contains(self, offset: float) -> bool:
        return (self.lower is None or offset >= self.lower) and (self.upper is None or offset < self.upper)


class StepScalingPolicy(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="step", tag_field="type"
):
    """An alarm mapped to step adjustments of the desired capacity."""

    name: str
    metric: str = "cpu.percent"
    statistic: Statistic = "average"
    alarm: Alarm
    adjustment_type: AdjustmentType = "change_in_capacity"
    steps: list[Step]
    #: For percent_change_in_capacity: change at least this many instances.
    min_adjustment_magnitude: int | None = None
    #: Time after this policy acted before it acts again; ``None`` uses the group's default.
    cooldown_s: float | None = None
    warmup_s: float | None = None

    def __post_init__(self) -> None:
        _check_name("policy", self.name)
        where = f"policy {self.name!r}"
        if not self.steps:
            raise SpecError(f"{where}: steps is empty; add at least one, e.g. {{lower = 0, adjustment = 1}}")
        _nonneg(f"{where}: alarm.duration_s", self.alarm.duration_s)
        _nonneg(f"{where}: cooldown_s", self.cooldown_s)
        _nonneg(f"{where}: warmup_s", self.warmup_s)
        for i, s in enumerate(self.steps):
            if s.lower is not None and s.upper is not None and s.lower >= s.upper:
                raise SpecError(f"{where}: steps[{i}]: lower ({s.lower}) must be below upper ({s.upper})")
            if self.adjustment_type != "percent_change_in_capacity" and s.adjustment != int(s.adjustment):
                raise SpecError(
                    f"{where}: steps[{i}].adjustment must be a whole number of instances for "
                    f"{self.adjustment_type}, got {s.adjustment}"
                )
            if self.adjustment_type == "exact_capacity" and s.adjustment < 0:
                raise SpecError(f"{where}: steps[{i}].adjustment is a capacity for exact_capacity; use >= 0")
        ordered = sorted(self.steps, key=lambda s: -math.inf if s.lower is None else s.lower)
        for a, b in itertools.pairwise(ordered):
            a_up = math.inf if a.upper is None else a.upper
            b_lo = -math.inf if b.lower is None else b.lower
            if b_lo < a_up:
                raise SpecError(
                    f"{where}: steps overlap ({a.lower}..{a.upper} and {b.lower}..{b.upper}); make them disjoint"
                )
        if self.min_adjustment_magnitude is not None:
            if self.adjustment_type != "percent_change_in_capacity":
                raise SpecError(
                    f"{where}: min_adjustment_magnitude applies only to percent_change_in_capacity"
                )
            if self.min_adjustment_magnitude < 1:
                raise SpecError(f"{where}: min_adjustment_magnitude must be >= 1")


Policy = TargetTrackingPolicy | StepScalingPolicy


class ScheduledAction(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """At each time ``cron`` matches (UTC), set the group's min, max and/or desired."""

    name: str
    cron: str
    min_size: int | None = None
    max_size: int | None = None
    desired: int | None = None

    def __post_init__(self) -> None:
        _check_name("scheduled action", self.name)
        where = f"scheduled action {self.name!r}"
        try:
            cron.parse(self.cron)
        except cron.CronError as exc:
            raise SpecError(f"{where}: {exc}") from None
        if self.min_size is None and self.max_size is None and self.desired is None:
            raise SpecError(f"{where}: sets nothing; give at least one of min_size, max_size, desired")
        for f in ("min_size", "max_size", "desired"):
            v = getattr(self, f)
            if v is not None and v < 0:
                raise SpecError(f"{where}: {f} must be >= 0, got {v}")
        if self.min_size is not None and self.max_size is not None and self.min_size > self.max_size:
            raise SpecError(f"{where}: min_size ({self.min_size}) is above max_size ({self.max_size})")


class GroupSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An auto-scaling group as the operator declares it."""

    name: str
    template: LaunchTemplate = LaunchTemplate()
    min_size: int
    max_size: int
    desired: int
    #: After launch, health checks (agent silence) wait this long.
    health_check_grace_s: float = 300.0
    #: After the grace period, an agent silent for this long makes the instance unhealthy.
    health_check_timeout_s: float = 60.0
    default_warmup_s: float = 300.0
    termination_policy: TerminationPolicy = "oldest"
    default_cooldown_s: float = 300.0
    drain_timeout_s: float = 30.0
    policies: list[Policy] = []
    scheduled: list[ScheduledAction] = []

    def __post_init__(self) -> None:
        _check_name("group", self.name)
        where = f"group {self.name!r}"
        if self.min_size < 0:
            raise SpecError(f"{where}: min_size must be >= 0, got {self.min_size}")
        if self.max_size < self.min_size:
            raise SpecError(
                f"{where}: max_size ({self.max_size}) is below min_size ({self.min_size}); raise max_size"
            )
        if not self.min_size <= self.desired <= self.max_size:
            raise SpecError(
                f"{where}: desired ({self.desired}) must be within min_size..max_size "
                f"({self.min_size}..{self.max_size})"
            )
        for f in (
            "health_check_grace_s",
            "health_check_timeout_s",
            "default_warmup_s",
            "default_cooldown_s",
            "drain_timeout_s",
        ):
            _nonneg(f"{where}: {f}", getattr(self, f))
        for what, names in (
            ("policy", [p.name for p in self.policies]),
            ("scheduled action", [s.name for s in self.scheduled]),
        ):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise SpecError(f"{where}: {what} names must be unique; {', '.join(dup)} appears twice")


class Instance(msgspec.Struct, frozen=True, kw_only=True):
    """One member of a group, as the controller tracks it."""

    id: str
    group: str
    state: Lifecycle = "pending"
    host: str | None = None
    node_id: str | None = None
    launched_at: float
    #: When the provider first reported it running (warm-up counts from here).
    in_service_at: float | None = None
    drain_started_at: float | None = None
    #: Without a load balancer, draining ends at this time (the drain hook's timeout).
    drain_deadline: float | None = None
    #: Why it is unhealthy / draining / terminating.
    reason: str = ""


class GroupState(msgspec.Struct, kw_only=True):
    """What the controller remembers between ticks; stored as a ``group_state`` document."""

    group: str
    desired: int
    #: Effective min/max (scheduled actions change them, as in AWS).
    min_size: int
    max_size: int
    #: The spec's (min, max, desired) last adopted: a changed spec is adopted once.
    spec_sizes: list[int] = []
    instances: list[Instance] = []
    last_scale_out_at: float | None = None
    last_scale_in_at: float | None = None
    #: Last time each policy changed the desired capacity.
    policy_acted_at: dict[str, float] = {}
    #: When each step policy's alarm condition started to hold (absent: not breached).
    breach_since: dict[str, float] = {}
    #: When each target-tracking policy's metric went below its band (absent: not below).
    below_since: dict[str, float] = {}
    #: Last tick time the scheduled actions were checked up to.
    scheduled_checked_at: float | None = None
    scheduled_fired: dict[str, float] = {}
    #: Last no-action code per source (policy name or "reconcile"): repeats are not re-logged.
    quiet: dict[str, str] = {}
    #: When each ``source/code`` decision not to act was last logged (repeats are rate-limited).
    quiet_at: dict[str, float] = {}
    #: Launches owed to replace unhealthy instances (the arbiter grants them as mandatory).
    replacements_owed: int = 0
    launch_failures: int = 0
    launch_backoff_until: float | None = None
    seq: int = 0
    deleting: bool = False
    updated_at: float = 0.0

    def live(self) -> list[Instance]:
        """Instances that count toward capacity (pending or in service)."""
        return [i for i in self.instances if i.state in ("pending", "in_service")]


def initial_state(spec: GroupSpec) -> GroupState:
    """The state of a group that has never been reconciled."""
    return GroupState(
        group=spec.name,
        desired=spec.desired,
        min_size=spec.min_size,
        max_size=spec.max_size,
        spec_sizes=[spec.min_size, spec.max_size, spec.desired],
    )


def spec_from_doc(doc: object) -> GroupSpec:
    """Decode a stored/declared group (``SpecError`` with the field path when invalid)."""
    try:
        return msgspec.convert(doc, GroupSpec)
    except msgspec.ValidationError as exc:
        raise SpecError(str(exc)) from None


def state_from_doc(doc: object) -> GroupState:
    """Decode a stored group state."""
    return msgspec.convert(doc, GroupState)


def event(
    kind: str, group: str, reason: str, ts: float, numbers: dict[str, float] | None = None, **extra: object
) -> dict[str, object]:
    """One event dict as it goes to ``store.append_event``."""
    ev: dict[str, object] = {
        "kind": kind,
        "group": group,
        "reason": reason,
        "numbers": numbers or {},
        "ts": ts,
    }
    ev.update(extra)
    return ev
