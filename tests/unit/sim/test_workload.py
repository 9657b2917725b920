"""The demo workload: seeded, bounded, and shaped so a target-tracking group scales out and back."""

from __future__ import annotations

import math

from cloudmon.sim.demo import demo_group, demo_workload
from cloudmon.sim.workload import Workload


def test_same_seed_same_curve_other_seed_other_noise() -> None:
    a, b, c = Workload(seed=1), Workload(seed=1), Workload(seed=2)
    ts = [t * 0.5 for t in range(2000)]
    assert [a.demand(t) for t in ts] == [b.demand(t) for t in ts]
    assert [a.demand(t) for t in ts] != [c.demand(t) for t in ts]


def test_stays_within_its_levels_and_noise() -> None:
    w = Workload(low=60, high=280, spike=380, noise=0.05, seed=3)
    values = [w.demand(t * 0.25) for t in range(4 * 720)]
    assert min(values) >= 60 * 0.95
    assert max(values) <= 380 * 1.05
    assert Workload.constant(42).demand(123.4) == 42


def test_each_cycle_rises_spikes_and_falls() -> None:
    w = Workload(low=60, high=280, spike=380, noise=0.0, period_s=360, seed=5)
    for cycle in range(3):
        t0 = cycle * 360
        assert w.demand(t0 + 10) == 60
        assert w.demand(t0 + 200) in (280, 380)
        assert max(w.demand(t0 + s) for s in range(360)) == 380
        assert w.demand(t0 + 340) == 60


def test_an_ideal_target_tracker_goes_from_min_to_near_max_and_back_within_six_minutes() -> None:
    spec = demo_group()
    target = spec.policies[0].target  # type: ignore[union-attr]
    w = demo_workload()
    needed = [min(spec.max_size, max(spec.min_size, math.ceil(w.demand(t) / target))) for t in range(360)]
    assert needed[0] == spec.min_size
    assert max(needed) >= spec.max_size - 1
    assert needed[-1] == spec.min_size
