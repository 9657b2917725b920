"""Property tests of the controller over random specs and workloads (hypothesis)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from cloudmon.autoscale.model import (
    Alarm,
    GroupSpec,
    ScheduledAction,
    Step,
    StepScalingPolicy,
    TargetTrackingPolicy,
)
from tests.unit.autoscale.helpers import World, make_spec

sizes = st.tuples(st.integers(0, 6), st.integers(0, 10), st.integers(0, 10)).map(
    lambda t: (t[0], t[0] + t[1], t[0] + min(t[1], t[2]))
)


@st.composite
def specs(draw: st.DrawFn) -> GroupSpec:
    lo, hi, desired = draw(sizes)
    policies: list[TargetTrackingPolicy | StepScalingPolicy] = []
    if draw(st.booleans()):
        policies.append(
            TargetTrackingPolicy(
                name="tt",
                target=draw(st.floats(20, 80)),
                scale_out_cooldown_s=draw(st.sampled_from([0.0, 60.0, 300.0])),
                scale_in_cooldown_s=draw(st.sampled_from([0.0, 120.0, 300.0])),
                scale_in_after_s=draw(st.sampled_from([0.0, 60.0, 300.0])),
            )
        )
    if draw(st.booleans()):
        adj = draw(st.sampled_from(["change_in_capacity", "exact_capacity", "percent_change_in_capacity"]))
        amount = {
            "change_in_capacity": 2.0,
            "exact_capacity": float(draw(st.integers(0, 20))),
            "percent_change_in_capacity": 50.0,
        }[adj]
        policies.append(
            StepScalingPolicy(
                name="high",
                alarm=Alarm(threshold=80.0, duration_s=draw(st.sampled_from([0.0, 60.0]))),
                adjustment_type=adj,  # type: ignore[arg-type]
                steps=[Step(lower=0.0, adjustment=amount)],
                cooldown_s=draw(st.sampled_from([0.0, 60.0])),
            )
        )
        policies.append(
            StepScalingPolicy(
                name="low",
                alarm=Alarm(threshold=20.0, comparison="<", duration_s=60.0),
                steps=[Step(upper=0.0, adjustment=-1)],
                cooldown_s=draw(st.sampled_from([0.0, 120.0])),
            )
        )
    scheduled = []
    if draw(st.booleans()):
        a = draw(st.integers(0, 8))
        scheduled.append(
            ScheduledAction(name="s", cron="*/20 * * * *", min_size=a, max_size=a + draw(st.integers(0, 5)))
        )
    return make_spec(
        min_size=lo,
        max_size=hi,
        desired=desired,
        policies=policies,
        scheduled=scheduled,
        default_warmup_s=draw(st.sampled_from([0.0, 60.0, 300.0])),
        default_cooldown_s=draw(st.sampled_from([0.0, 300.0])),
    )


@settings(max_examples=80, deadline=None)
@given(
    spec=specs(),
    demand=st.lists(st.floats(0, 2000), min_size=5, max_size=60),
    dt=st.sampled_from([5.0, 15.0, 60.0]),
)
def test_capacity_never_leaves_min_max(spec: GroupSpec, demand: list[float], dt: float) -> None:
    w = World(spec, boot_s=20.0)
    for d in demand:
        w.step(dt, d)
        s = w.state
        assert s.min_size <= s.desired <= s.max_size
        assert len(s.live()) == s.desired  # the world grants every action at once


@settings(max_examples=80, deadline=None)
@given(
    cooldown=st.sampled_from([60.0, 300.0, 900.0]),
    demand=st.lists(st.floats(0, 1000), min_size=10, max_size=80),
    dt=st.sampled_from([15.0, 60.0]),
)
def test_no_scale_in_during_a_cooldown(cooldown: float, demand: list[float], dt: float) -> None:
    spec = make_spec(
        min_size=1,
        max_size=20,
        desired=5,
        policies=[
            TargetTrackingPolicy(name="tt", target=50.0, scale_in_cooldown_s=cooldown, scale_in_after_s=0.0)
        ],
    )
    w = World(spec)
    last_activity: float | None = None
    for d in demand:
        dec = w.step(dt, d)
        for e in dec.events:
            if e["kind"] == "autoscale.scale_in":
                assert last_activity is None or w.now - last_activity >= cooldown
            if e["kind"] in ("autoscale.scale_in", "autoscale.scale_out"):
                last_activity = w.now


@settings(max_examples=40, deadline=None)
@given(
    period_s=st.floats(60, 7200),
    base=st.floats(50, 400),
    amplitude=st.floats(0, 1.0),
    noise=st.lists(st.floats(-0.2, 0.2), min_size=16, max_size=16),
)
def test_actions_per_hour_stay_bounded_under_oscillation(
    period_s: float, base: float, amplitude: float, noise: list[float]
) -> None:
    spec = make_spec(
        min_size=1,
        max_size=30,
        desired=2,
        default_warmup_s=120.0,
        policies=[TargetTrackingPolicy(name="tt", target=50.0)],
    )
    p = spec.policies[0]
    assert isinstance(p, TargetTrackingPolicy)
    w = World(spec, boot_s=30.0)
    hours = 3
    dt = 15.0
    for k in range(int(hours * 3600 / dt)):
        t = k * dt
        demand = base * (1 + amplitude * math.sin(2 * math.pi * t / period_s)) * (1 + noise[k % len(noise)])
        w.step(dt, demand)
    outs = sum(1 for e in w.events if e["kind"] == "autoscale.scale_out")
    ins = sum(1 for e in w.events if e["kind"] == "autoscale.scale_in")
    # Scale-in: at most one per scale-in cooldown.  Scale-out: each adds capacity, so net of
    # the scale-ins it is bounded by the size range.
    max_ins = hours * 3600 / p.scale_in_cooldown_s + 1
    assert ins <= max_ins
    assert outs <= ins + (spec.max_size - spec.min_size)
