"""Weight computation and hysteresis: pure functions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloudmon.lb.weights import MemberLoad, compute_weights, settle_weights, slow_start_cap


def test_weighted_favours_spare_capacity() -> None:
    w = compute_weights({"a": MemberLoad(10.0), "b": MemberLoad(90.0)}, "weighted")
    # headroom + 5: 95 vs 15 -> 100 vs 15.8
    assert w == {"a": 100, "b": 16}


def test_weighted_saturated_member_keeps_a_trickle() -> None:
    w = compute_weights({"a": MemberLoad(0.0), "b": MemberLoad(100.0)}, "weighted", max_weight=256)
    assert w == {"a": 256, "b": 12}
    w = compute_weights({"a": MemberLoad(0.0), "b": MemberLoad(100.0)}, "weighted", min_weight=20)
    assert w["b"] == 20


def test_weighted_near_equal_saturated_members_stay_near_equal() -> None:
    w = compute_weights({"a": MemberLoad(98.0), "b": MemberLoad(99.0)}, "weighted")
    assert w["a"] == 100
    assert w["b"] >= 85


def test_weighted_unknown_cpu_is_neutral() -> None:
    w = compute_weights({"a": MemberLoad(20.0), "b": MemberLoad(60.0), "c": MemberLoad(None)}, "weighted")
    # c gets the mean headroom (60 + 5) of a (85) and b (45)
    assert w == {"a": 100, "b": 53, "c": 76}
    assert compute_weights({"a": MemberLoad(None), "b": MemberLoad(None)}) == {"a": 100, "b": 100}


def test_weighted_out_of_range_cpu_is_clamped() -> None:
    w = compute_weights({"a": MemberLoad(-5.0), "b": MemberLoad(250.0)}, "weighted")
    assert w == {"a": 100, "b": 5}


def test_least_outstanding_favours_fewer_in_flight_requests() -> None:
    loads = {"a": MemberLoad(sessions=0), "b": MemberLoad(sessions=1), "c": MemberLoad(sessions=8, queue=1)}
    assert compute_weights(loads, "least_outstanding") == {"a": 100, "b": 50, "c": 10}
    # Scale-free: the least busy member always gets max_weight.
    loads2 = {"a": MemberLoad(sessions=4), "b": MemberLoad(sessions=9)}
    assert compute_weights(loads2, "least_outstanding") == {"a": 100, "b": 50}


def test_bad_arguments_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="unknown algorithm"):
        compute_weights({"a": MemberLoad()}, "random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_weight <= max_weight"):
        compute_weights({"a": MemberLoad()}, min_weight=10, max_weight=5)
    with pytest.raises(ValueError, match="<= 256"):
        compute_weights({"a": MemberLoad()}, max_weight=300)
    assert compute_weights({}) == {}


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=3),
        st.builds(
            MemberLoad,
            st.one_of(st.none(), st.floats(-50, 150)),
            st.integers(0, 1000),
            st.integers(0, 100),
        ),
        min_size=1,
        max_size=20,
    ),
    st.sampled_from(["weighted", "least_outstanding"]),
    st.integers(0, 50),
    st.integers(1, 256),
)
def test_weights_stay_in_bounds_and_order_follows_load(
    loads: dict[str, MemberLoad], algorithm: str, lo: int, hi: int
) -> None:
    lo = min(lo, hi)
    w = compute_weights(loads, algorithm, min_weight=lo, max_weight=hi)  # type: ignore[arg-type]
    assert set(w) == set(loads)
    assert all(lo <= v <= hi for v in w.values())
    assert max(w.values()) == hi  # the least loaded member gets the full weight
    if algorithm == "least_outstanding":
        for a in loads:
            for b in loads:
                if loads[a].outstanding < loads[b].outstanding:
                    assert w[a] >= w[b]
    else:
        known = {k: v.cpu_percent for k, v in loads.items() if v.cpu_percent is not None}
        for a, ca in known.items():
            for b, cb in known.items():
                if ca < cb:
                    assert w[a] >= w[b]


def test_settle_ignores_small_changes() -> None:
    current = {"a": 100, "b": 50, "c": 10}
    target = {"a": 97, "b": 56, "c": 12}
    # a: 3 < 5; b: 6 >= max(5, 5.0); c: 2 < 5
    assert settle_weights(current, target) == {"b": 56}
    assert settle_weights(current, target, min_change=10) == {}
    assert settle_weights(current, current) == {}


def test_settle_ratio_scales_with_the_weight() -> None:
    assert settle_weights({"a": 200}, {"a": 185}, min_ratio=0.1) == {}
    assert settle_weights({"a": 200}, {"a": 179}, min_ratio=0.1) == {"a": 179}


def test_settle_always_fixes_weights_outside_the_bounds_and_new_members() -> None:
    changes = settle_weights({"a": 256, "b": 0}, {"a": 254, "b": 1, "c": 40}, min_weight=1, max_weight=255)
    assert changes == {"a": 254, "b": 1, "c": 40}


def test_slow_start_ramps_linearly() -> None:
    assert slow_start_cap(100, 0.0, 60.0, 1) == 1
    assert slow_start_cap(100, 15.0, 60.0, 1) == 25
    assert slow_start_cap(100, 60.0, 60.0, 1) == 100
    assert slow_start_cap(100, 5.0, 0.0, 1) == 100
    assert slow_start_cap(3, 1.0, 60.0, 5) == 3  # never above the target
