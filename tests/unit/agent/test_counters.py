"""Counter owners: priming, per-key deltas, wraps, clock steps."""

from __future__ import annotations

import pytest

from cloudmon_agent.collectors.counters import CpuPercent, RateCounter


def test_rate_counter_primes_then_sums_per_key_rates() -> None:
    rc = RateCounter(2)
    assert rc.update({"a": (0, 0), "b": (10, 10)}, 1.0) is None
    assert rc.primed
    assert rc.update({"a": (4, 8), "b": (14, 10)}, 3.0) == [4.0, 4.0]


def test_rate_counter_clamps_backwards_counters_per_field() -> None:
    rc = RateCounter(2)
    rc.update({"a": (100, 100)}, 0.0)
    assert rc.update({"a": (50, 110)}, 1.0) == [0.0, 10.0]


def test_rate_counter_zero_interval_gives_zeros_not_a_division_error() -> None:
    rc = RateCounter(1)
    rc.update({"a": (1,)}, 5.0)
    assert rc.update({"a": (9,)}, 5.0) == [0.0]
    rc.reset()
    assert not rc.primed
    assert rc.update({"a": (9,)}, 6.0) is None


def test_cpu_percent_offline_core_reports_zero_and_keeps_its_index() -> None:
    cpu = CpuPercent()
    assert cpu.update({0: (0, 0), 1: (0, 0), 2: (0, 0)}) is None
    result = cpu.update({0: (50, 50), 2: (25, 75)})  # cpu1 went offline
    assert result is not None
    total, per_core = result
    assert per_core == [50.0, 0.0, 25.0]
    assert total == pytest.approx(37.5)
