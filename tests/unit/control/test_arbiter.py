"""The arbiter keeps the control loops from undoing each other."""

from __future__ import annotations

import threading

import pytest

from cloudmon.control.arbiter import Arbiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_budget_is_shared_by_every_loop_and_refills_after_the_window() -> None:
    clock = Clock()
    arb = Arbiter(clock, budget=3, window_s=60, hold_s=0)
    assert arb.request("autoscale", "i-1")
    assert arb.request("rebalance", "vm-1", source="a", target="b")
    assert arb.request("autoscale", "i-2")
    refused = arb.request("rebalance", "vm-2", source="a", target="b")
    assert not refused
    assert "budget spent: 3 of 3" in refused.reason
    assert refused.numbers["used"] == 3
    # Mandatory changes (rule violation, maintenance) pass but are counted.
    assert arb.request("rebalance", "vm-3", source="a", target="c", mandatory=True)
    assert arb.used() == 4
    clock.now += 60
    assert arb.used() == 0
    assert arb.request("rebalance", "vm-2", source="a", target="b")


def test_a_vm_does_not_move_back_within_the_hold_period_unless_a_rule_demands_it() -> None:
    clock = Clock()
    arb = Arbiter(clock, budget=100, window_s=10, hold_s=600)
    assert arb.request("rebalance", "vm-1", source="a", target="b")
    arb.release("rebalance", "vm-1")
    clock.now += 300
    back = arb.request("rebalance", "vm-1", source="b", target="a")
    assert not back
    assert "moving it back is held" in back.reason
    # Onwards to a third host is allowed for the same loop.
    assert arb.request("rebalance", "vm-1", source="b", target="c")
    arb.release("rebalance", "vm-1")
    assert arb.request("rebalance", "vm-1", source="c", target="b", mandatory=True)
    arb.release("rebalance", "vm-1")
    clock.now += 601
    assert arb.request("rebalance", "vm-1", source="b", target="c")


def test_another_loop_may_not_touch_a_subject_being_changed_or_just_changed() -> None:
    clock = Clock()
    arb = Arbiter(clock, budget=100, window_s=10, hold_s=120)
    assert arb.request("rebalance", "vm-1", source="a", target="b")
    assert arb.claimed("vm-1") == "rebalance"
    busy = arb.request("autoscale", "vm-1")
    assert not busy
    assert "being changed by rebalance" in busy.reason
    arb.release("autoscale", "vm-1")  # not the owner: no effect
    assert arb.claimed("vm-1") == "rebalance"
    arb.release("rebalance", "vm-1")
    assert arb.claimed("vm-1") is None
    held = arb.request("autoscale", "vm-1")
    assert not held
    assert "changed by rebalance" in held.reason
    # A health replacement is mandatory and goes through.
    assert arb.request("autoscale", "vm-1", mandatory=True)
    clock.now += 121
    arb.release("autoscale", "vm-1")
    assert arb.request("rebalance", "vm-1", source="b", target="c")


def test_refused_requests_change_nothing() -> None:
    clock = Clock()
    arb = Arbiter(clock, budget=1, window_s=60, hold_s=0)
    assert arb.request("autoscale", "i-1")
    for _ in range(5):
        assert not arb.request("autoscale", "i-2")
    assert arb.used() == 1
    assert arb.claimed("i-2") is None


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="budget"):
        Arbiter(Clock(), budget=0)
    with pytest.raises(ValueError, match="window_s"):
        Arbiter(Clock(), window_s=0)


def test_concurrent_requests_never_exceed_the_budget() -> None:
    clock = Clock()
    arb = Arbiter(clock, budget=7, window_s=60, hold_s=0)
    granted: list[bool] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(50):
            ok = bool(arb.request(f"loop{n}", f"s{n}-{i}"))
            with lock:
                granted.append(ok)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 7


def test_check_answers_like_request_but_changes_nothing() -> None:
    clock = Clock()
    arb = Arbiter(clock, budget=2, window_s=60, hold_s=600)
    assert arb.request("rebalance", "vm-1", source="a", target="b")
    arb.release("rebalance", "vm-1")
    back = arb.check("rebalance", "vm-1", source="b", target="a")
    assert (back.ok, back.code) == (False, "hold")
    assert arb.check("rebalance", "vm-1", source="b", target="a", mandatory=True).ok
    assert arb.check("rebalance", "vm-2").ok
    assert arb.used() == 1
    assert arb.claimed("vm-2") is None
    assert arb.request("autoscale", "i-1")
    assert arb.check("rebalance", "vm-2").code == "budget"
    assert arb.check("autoscale", "i-1").code == "budget"  # the owner too: the budget is shared
    assert arb.check("rebalance", "i-1").code == "claimed"


def test_a_retried_change_under_the_same_claim_is_counted_once() -> None:
    clock = Clock()
    arb = Arbiter(clock, budget=3, window_s=300, hold_s=0)
    for _ in range(10):  # an unhealthy instance whose delete keeps failing
        assert arb.request("autoscale", "i-bad", mandatory=True)
    assert arb.used() == 1
    assert arb.request("rebalance", "vm-1")
    arb.release("autoscale", "i-bad")
    assert arb.request("autoscale", "i-bad", mandatory=True)
    assert arb.used() == 3
