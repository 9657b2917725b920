"""Scaling policies evaluated on plain data: each returns a :class:`Proposal`.

No I/O and no clock: the controller passes ``now``, the measured metric values
(warmed-up, in-service instances only) and the group state, whose
``breach_since`` / ``below_since`` maps these functions update (the caller
works on its own copy of the state).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from cloudmon.autoscale.model import (
    GroupSpec,
    GroupState,
    StepScalingPolicy,
    TargetTrackingPolicy,
)


@dataclass(frozen=True, slots=True)
class Proposal:
    """What one policy wants: a new desired capacity, or why not (``code``, ``reason``)."""

    policy: str
    #: Proposed desired capacity; ``None`` when the policy does not ask for a change.
    desired: int | None
    #: One of: scale_out, scale_in, within_tolerance, cooldown, no_data, warming_up,
    #: stabilizing, scale_in_disabled, at_max, at_min, alarm_ok, alarm_pending, no_step.
    code: str
    reason: str
    numbers: dict[str, float] = field(default_factory=dict)
    #: A target-tracking policy whose metric is not below its band vetoes scale-in
    #: by other policies (AWS scales in only when every target-tracking policy agrees).
    veto_scale_in: bool = False


def aggregate(values: Sequence[float], statistic: str = "average") -> float:
    """The group statistic over instances' values (non-empty)."""
    if statistic == "maximum":
        return max(values)
    if statistic == "minimum":
        return min(values)
    return sum(values) / len(values)


def _fmt(v: float) -> str:
    return f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"


def _last_activity(state: GroupState) -> float | None:
    times = [t for t in (state.last_scale_out_at, state.last_scale_in_at) if t is not None]
    return max(times) if times else None


def target_tracking(
    p: TargetTrackingPolicy,
    state: GroupState,
    now: float,
    values: Sequence[float],
    warming: int,
) -> Proposal:
    """Evaluate a target-tracking policy against the group's measured values."""
    d = state.desired
    if not values:
        state.below_since.pop(p.name, None)
        if warming:
            return Proposal(
                p.name,
                None,
                "warming_up",
                f"no {p.metric} to act on: all {warming} in-service instance(s) are still warming up",
                {"warming": warming, "desired": d},
                veto_scale_in=True,
            )
        return Proposal(
            p.name,
            None,
            "no_data",
            f"no {p.metric} reported by any in-service instance; nothing to act on",
            {"desired": d},
            veto_scale_in=True,
        )
    n = len(values)
    value = aggregate(values)
    hi = p.target * (1 + p.tolerance)
    lo = p.target * (1 - p.tolerance)
    nums: dict[str, float] = {
        "value": value,
        "target": p.target,
        "band_low": lo,
        "band_high": hi,
        "measured": n,
        "warming": warming,
        "desired": d,
        "min_size": state.min_size,
        "max_size": state.max_size,
    }
    m = f"{p.metric} {_fmt(value)} (average of {n})"
    if value > hi:
        state.below_since.pop(p.name, None)
        # AWS's proportional rule: the capacity at which the measured load sits at target.
        needed = math.ceil(n * value / p.target)
        nums["needed"] = needed
        if needed <= d:
            code = "warming_up" if warming else "within_tolerance"
            why = (
                f"{warming} instance(s) still warming up already cover it"
                if warming
                else "capacity already launched covers it"
            )
            return Proposal(
                p.name,
                None,
                code,
                f"{m} is above target {_fmt(p.target)}, but {why} ({d} desired, {needed} needed)",
                nums,
                True,
            )
        if d >= state.max_size:
            return Proposal(
                p.name,
                None,
                "at_max",
                f"{m} is above target {_fmt(p.target)} and {needed} instances are needed, "
                f"but the group is at its maximum of {state.max_size}",
                nums,
                True,
            )
        if state.last_scale_out_at is not None and now - state.last_scale_out_at < p.scale_out_cooldown_s:
            left = p.scale_out_cooldown_s - (now - state.last_scale_out_at)
            nums["cooldown_left_s"] = left
            return Proposal(
                p.name,
                None,
                "cooldown",
                f"{m} is above target {_fmt(p.target)}; scale-out cooldown has {left:.0f} s left",
                nums,
                True,
            )
        new = min(needed, state.max_size)
        return Proposal(
            p.name,
            new,
            "scale_out",
            f"{m} is above target {_fmt(p.target)} (+{p.tolerance:.0%} band): desired {d} -> {new}",
            nums,
            True,
        )
    if value >= lo:
        state.below_since.pop(p.name, None)
        return Proposal(
            p.name,
            None,
            "within_tolerance",
            f"{m} is within {_fmt(lo)}..{_fmt(hi)} of target {_fmt(p.target)}; no change",
            nums,
            True,
        )
    since = state.below_since.setdefault(p.name, now)
    below_for = now - since
    nums["below_for_s"] = below_for
    if not p.scale_in_enabled:
        return Proposal(
            p.name, None, "scale_in_disabled", f"{m} is below target, but scale-in is disabled", nums
        )
    if below_for < p.scale_in_after_s:
        return Proposal(
            p.name,
            None,
            "stabilizing",
            f"{m} is below {_fmt(lo)} for {below_for:.0f} s; scale-in waits until {p.scale_in_after_s:.0f} s",
            nums,
        )
    if warming:
        return Proposal(
            p.name,
            None,
            "warming_up",
            f"{m} is below target, but {warming} instance(s) are still warming up",
            nums,
        )
    last = _last_activity(state)
    if last is not None and now - last < p.scale_in_cooldown_s:
        left = p.scale_in_cooldown_s - (now - last)
        nums["cooldown_left_s"] = left
        return Proposal(
            p.name, None, "cooldown", f"{m} is below target; scale-in cooldown has {left:.0f} s left", nums
        )
    if d <= state.min_size:
        return Proposal(
            p.name,
            None,
            "at_min",
            f"{m} is below target, but the group is at its minimum of {state.min_size}",
            nums,
        )
    needed = max(1, math.ceil(n * value / p.target))
    surplus = n - needed
    if surplus <= 0:
        return Proposal(
            p.name,
            None,
            "within_tolerance",
            f"{m} is below target, but removing an instance would push it above {_fmt(p.target)}",
            nums,
        )
    # Scale in slowly: a bounded share of the capacity per step.
    step = max(1, math.floor(d * p.scale_in_max_percent / 100))
    new = max(state.min_size, d - min(surplus, step))
    nums["needed"] = needed
    return Proposal(
        p.name,
        new,
        "scale_in",
        f"{m} has stayed below {_fmt(lo)} for {below_for:.0f} s: desired {d} -> {new}",
        nums,
    )


def percent_change(capacity: int, percent: float, min_magnitude: int | None) -> int:
    """AWS PercentChangeInCapacity: round toward zero, but never to 0 for a non-zero change,
    then apply the minimum magnitude."""
    raw = capacity * percent / 100
    if raw == 0:
        change = 0
    elif 0 < raw < 1:
        change = 1
    elif -1 < raw < 0:
        change = -1
    else:
        change = int(raw)  # toward zero
    if min_magnitude is not None and change != 0 and abs(change) < min_magnitude:
        change = min_magnitude if change > 0 else -min_magnitude
    return change


def step_scaling(
    p: StepScalingPolicy,
    spec: GroupSpec,
    state: GroupState,
    now: float,
    values: Sequence[float],
    warming: int,
) -> Proposal:
    """Evaluate a step-scaling policy: alarm held for its duration, then the matching step."""
    d = state.desired
    if not values:
        state.breach_since.pop(p.name, None)
        code = "warming_up" if warming else "no_data"
        return Proposal(
            p.name,
            None,
            code,
            f"alarm {p.name}: no {p.metric} from warmed-up instances",
            {"warming": warming},
        )
    value = aggregate(values, p.statistic)
    a = p.alarm
    nums: dict[str, float] = {
        "value": value,
        "threshold": a.threshold,
        "duration_s": a.duration_s,
        "measured": len(values),
        "desired": d,
        "min_size": state.min_size,
        "max_size": state.max_size,
    }
    cond = f"{p.statistic} {p.metric} {_fmt(value)} {a.comparison} {_fmt(a.threshold)}"
    if not a.breached(value):
        state.breach_since.pop(p.name, None)
        return Proposal(
            p.name, None, "alarm_ok", f"alarm {p.name} is OK: {p.statistic} {p.metric} {_fmt(value)}", nums
        )
    since = state.breach_since.setdefault(p.name, now)
    held = now - since
    nums["held_s"] = held
    if held < a.duration_s:
        return Proposal(
            p.name,
            None,
            "alarm_pending",
            f"{cond} for {held:.0f} s of the {a.duration_s:.0f} s the alarm needs",
            nums,
        )
    offset = value - a.threshold
    step = next((s for s in p.steps if s.contains(offset)), None)
    if step is None:
        return Proposal(
            p.name, None, "no_step", f"{cond}, but no step covers an offset of {_fmt(offset)}", nums
        )
    if p.adjustment_type == "exact_capacity":
        new = int(step.adjustment)
    elif p.adjustment_type == "change_in_capacity":
        new = d + int(step.adjustment)
    else:
        new = d + percent_change(d, step.adjustment, p.min_adjustment_magnitude)
    nums["adjustment"] = step.adjustment
    clamped = max(state.min_size, min(state.max_size, new))
    nums["proposed"] = new
    if clamped == d:
        if new > d:
            return Proposal(
                p.name, None, "at_max", f"{cond}; the group is at its maximum of {state.max_size}", nums
            )
        if new < d:
            return Proposal(
                p.name, None, "at_min", f"{cond}; the group is at its minimum of {state.min_size}", nums
            )
        return Proposal(p.name, None, "within_tolerance", f"{cond}; the step leaves capacity at {d}", nums)
    cooldown = spec.default_cooldown_s if p.cooldown_s is None else p.cooldown_s
    # Scale-out waits only for this policy's own last action; scale-in waits for the
    # group's last scaling activity, so no scale-in lands inside any cooldown.
    last = state.policy_acted_at.get(p.name) if clamped > d else _last_activity(state)
    if last is not None and now - last < cooldown:
        left = cooldown - (now - last)
        nums["cooldown_left_s"] = left
        return Proposal(p.name, None, "cooldown", f"{cond}; cooldown has {left:.0f} s left", nums)
    code = "scale_out" if clamped > d else "scale_in"
    return Proposal(
        p.name,
        clamped,
        code,
        f"{cond} for {held:.0f} s (alarm {p.name}, step {p.adjustment_type} {step.adjustment:g}): desired {d} -> {clamped}",
        nums,
    )
