"""The CPU budget policy (pure logic with fake costs) and its wrappers with a fake thread clock."""

from __future__ import annotations

from typing import Any

import pytest

from cloudmon_agent.budget import (
    REPORT_COST,
    BudgetCollector,
    Budgeted,
    BudgetPolicy,
    apply_budget,
    find_policy,
)


def _run(policy: BudgetPolicy, costs: dict[str, float], cycles: int) -> list[str]:
    changes = []
    for _ in range(cycles):
        for name, ms in costs.items():
            if policy.due(name):
                policy.record(name, ms)
        change = policy.end_cycle()
        if change:
            changes.append(change)
    return changes


def test_under_budget_nothing_is_throttled() -> None:
    p = BudgetPolicy(1.0)
    assert _run(p, {"host": 0.2, "vms": 0.3}, 50) == []
    assert p.throttled() == []
    assert p.expected_ms() == pytest.approx(0.5)


def test_most_expensive_collector_is_slowed_until_under_budget() -> None:
    p = BudgetPolicy(1.0, cooldown=2)
    changes = _run(p, {"host": 0.3, "vms": 0.2, "processes": 2.0}, 60)
    # processes alone is throttled: 2.0 -> every 2 (1.0/cycle) -> every 4 (0.5/cycle)
    assert changes == ["processes now every 2 cycles", "processes now every 4 cycles"]
    assert p.periods == {"host": 1, "vms": 1, "processes": 4}
    assert p.expected_ms() <= 1.0
    (t,) = p.throttled()
    assert (t.collector, t.period) == ("processes", 4)
    assert t.cost_ms == pytest.approx(2.0)


def test_host_is_exempt_and_period_is_capped() -> None:
    p = BudgetPolicy(0.1, max_period=8, cooldown=0)
    _run(p, {"host": 5.0, "gpus": 4.0}, 40)
    assert p.periods == {"host": 1, "gpus": 8}  # over budget for good, but host always runs


def test_recovers_when_the_cost_drops() -> None:
    p = BudgetPolicy(1.0, cooldown=2)
    _run(p, {"host": 0.2, "vms": 3.0}, 40)
    assert p.periods["vms"] == 4
    # the VMs got cheap (fewer guests): periods come back down to every cycle
    changes = _run(p, {"host": 0.2, "vms": 0.1}, 80)
    assert p.periods["vms"] == 1
    assert changes[-1] == "vms now every 1 cycle(s)"
    assert p.throttled() == []


def test_no_flapping_around_the_budget() -> None:
    p = BudgetPolicy(1.0, cooldown=3)
    changes = _run(p, {"host": 0.1, "vms": 1.2}, 200)
    # every 2 cycles costs 0.7/cycle: above recover_below * budget (0.5), so it stays there
    assert changes == ["vms now every 2 cycles"]


class FakeCollector:
    def __init__(self, field: str, cost_s: float, clock: list[float]) -> None:
        self.field = field
        self.cost_s = cost_s
        self.clock = clock
        self.calls = 0
        self.closed = False

    def prime(self) -> None:
        pass

    def collect(self) -> object:
        self.calls += 1
        self.clock[0] += self.cost_s  # "spends" CPU on the fake thread clock
        return f"{self.field}#{self.calls}"

    def close(self) -> None:
        self.closed = True


def test_wrappers_skip_when_not_due_and_repeat_the_last_value() -> None:
    clock = [0.0]
    policy = BudgetPolicy(1.0, cooldown=0)
    host = FakeCollector("host", 0.0002, clock)
    procs = FakeCollector("processes", 0.004, clock)
    wrapped: list[Budgeted | BudgetCollector] = [
        Budgeted(host, policy, thread_time=lambda: clock[0]),
        Budgeted(procs, policy, thread_time=lambda: clock[0]),
    ]
    budget = BudgetCollector(policy)
    cols: list[Budgeted | BudgetCollector] = [*wrapped, budget]
    reports: list[dict[str, Any]] = []
    for _ in range(40):
        reports.append({c.field: c.collect() for c in cols})
    assert host.calls == 40
    assert procs.calls < 40
    last = reports[-1]["budget"]
    assert last.budget_ms == 1.0
    assert [(t.collector, t.period) for t in last.throttled] == [("processes", 8)]
    # a skipped cycle carries the previous value, not nothing
    values = [r["processes"] for r in reports]
    assert all(v is not None for v in values)
    assert len(set(values)) == procs.calls
    assert reports[-1]["host"] == "host#40"


def test_apply_budget_keeps_fields_and_closes_inner() -> None:
    clock = [0.0]
    inner = FakeCollector("host", 0.0, clock)
    cols = apply_budget([inner], BudgetPolicy(2.0))
    assert [c.field for c in cols] == ["host", "budget"]
    for c in cols:
        c.close()
    assert inner.closed


def test_a_collector_with_periodic_spikes_is_judged_by_its_mean() -> None:
    # The process collector scans one cycle in five (2 ms) and returns cached lists otherwise.
    p = BudgetPolicy(1.0, cooldown=0)
    changes = []
    for cycle in range(100):
        p.record("host", 0.3)
        p.record("processes", 2.0 if cycle % 5 == 0 else 0.0)
        if change := p.end_cycle():
            changes.append(change)
    assert changes == []  # 0.3 + 2.0 / 5 = 0.7 ms per cycle: within budget
    assert p.expected_ms() == pytest.approx(0.7)


def test_the_report_cost_counts_against_the_budget_but_is_never_throttled() -> None:
    p = BudgetPolicy(1.0, cooldown=0)
    # Collectors alone (0.2 + 0.5) fit; with 0.6 ms to encode and post, the cycle does not.
    _run(p, {"host": 0.2, "processes": 0.5, REPORT_COST: 0.6}, 30)
    assert p.periods[REPORT_COST] == 1
    assert p.periods["processes"] >= 2
    assert p.expected_ms() == pytest.approx(0.2 + 0.6 + 0.5 / p.periods["processes"])
    assert [t.collector for t in p.throttled()] == ["processes"]


def test_find_policy_finds_the_budget_among_collectors() -> None:
    policy = BudgetPolicy(1.0)
    assert find_policy(apply_budget([], policy)) is policy
    assert find_policy([object()]) is None
