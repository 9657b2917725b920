"""The planner: valid ordered steps, rules, thresholds, maintenance, waves, consolidation."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudmon.rebalance.planner import MIN_GAIN, PlanSettings, imbalance, plan
from cloudmon.rebalance.snapshot import VM, ClusterSnapshot, Host, Rule
from cloudmon.rebalance.synthetic import random_snapshot
from tests.unit.rebalance.checks import check_rules, replay

H = PlanSettings(solver="heuristic", threshold=5)


def _hosts(n: int, cores: float = 16, mem: float = 65536, **kw: object) -> list[Host]:
    return [
        msgspec.structs.replace(Host(name=f"h{i}", cpu_cores=cores, memory_mib=mem), **kw) for i in range(n)
    ]


def _vm(name: str, host: str, cpu: float = 2.0, mem: float = 4096, **kw: object) -> VM:
    return msgspec.structs.replace(VM(name=name, host=host, cpu_demand_cores=cpu, memory_mib=mem), **kw)


def _skewed() -> ClusterSnapshot:
    # Everything on h0, two empty hosts: a clear case for balancing.
    vms = [_vm(f"v{i}", "h0", cpu=1.5, mem=6000) for i in range(8)]
    return ClusterSnapshot(ts=1.0, hosts=_hosts(3), vms=vms)


def test_balancing_lowers_imbalance_and_every_step_is_valid() -> None:
    snap = _skewed()
    p = plan(snap, H)
    replay(snap, p, H)
    assert p.moves
    assert p.imbalance_after < p.imbalance_before
    assert p.imbalance_before == pytest.approx(imbalance(snap))
    assert all(not m.mandatory for m in p.moves)
    assert "imbalance" in p.moves[0].reason
    assert "MiB" in p.moves[0].reason
    assert all(m.cost_s == pytest.approx(6000 / H.link_rate_mibps) for m in p.moves)
    before = {h.host: h.before.cpu for h in p.hosts}
    assert before["h0"] == pytest.approx(12 / 16)


def test_threshold_1_makes_only_mandatory_moves() -> None:
    p = plan(_skewed(), msgspec.structs.replace(H, threshold=1))
    assert p.moves == []
    hosts = _hosts(3)
    hosts[0] = msgspec.structs.replace(hosts[0], maintenance=True)
    snap = ClusterSnapshot(ts=1.0, hosts=hosts, vms=[_vm(f"v{i}", "h0") for i in range(4)] + [_vm("w", "h1")])
    p = plan(snap, msgspec.structs.replace(H, threshold=1))
    assert {m.vm for m in p.moves} == {"v0", "v1", "v2", "v3"}
    assert all(m.mandatory and "maintenance" in m.reason for m in p.moves)


@pytest.mark.parametrize("solver", ["heuristic", "exact"])
def test_maintenance_host_is_fully_evacuated(solver: str) -> None:
    hosts = _hosts(4)
    hosts[1] = msgspec.structs.replace(hosts[1], maintenance=True)
    vms = [_vm(f"v{i}", f"h{i % 4}", cpu=2, mem=8000) for i in range(12)]
    snap = ClusterSnapshot(ts=1.0, hosts=hosts, vms=vms)
    s = msgspec.structs.replace(H, threshold=1, solver=solver)
    p = plan(snap, s)
    where = replay(snap, p, s)
    assert not [v for v, h in where.items() if h == "h1"]
    assert p.unresolved == []
    assert all(m.mandatory for m in p.moves)


def test_evacuation_that_does_not_fit_is_reported_not_forced() -> None:
    hosts = _hosts(2)
    hosts[1] = msgspec.structs.replace(hosts[1], maintenance=True)
    snap = ClusterSnapshot(ts=1.0, hosts=hosts, vms=[_vm("big", "h1", cpu=14), _vm("a", "h0", cpu=2)])
    p = plan(snap, H)
    assert [m.vm for m in p.moves] == []
    assert p.unresolved
    assert "maintenance" in p.unresolved[0]
    assert any(r.vm == "big" and r.why == "capacity" for r in p.rejected)


def test_pinned_vms_never_move() -> None:
    vms = [_vm(f"v{i}", "h0", cpu=1.5, mem=6000, pinned=True) for i in range(8)]
    snap = ClusterSnapshot(ts=1.0, hosts=_hosts(3), vms=vms)
    p = plan(snap, H)
    assert p.moves == []
    assert any(r.why == "pinned" for r in p.rejected)


@pytest.mark.parametrize("solver", ["heuristic", "exact"])
def test_rules_are_respected_and_violations_fixed(solver: str) -> None:
    vms = [_vm(f"v{i}", "h0", cpu=1.5, mem=6000) for i in range(8)]
    rules = [
        Rule(name="apart", kind="anti_affinity", vms=["v0", "v1"]),  # violated now: both on h0
        Rule(name="together", kind="affinity", vms=["v2", "v3"]),
        Rule(name="stay", kind="must_run_on", vms=["v4"], hosts=["h0"]),
        Rule(name="not-h2", kind="must_not_run_on", vms=["v5", "v6"], hosts=["h2"]),
    ]
    snap = ClusterSnapshot(ts=1.0, hosts=_hosts(3), vms=vms, rules=rules)
    s = msgspec.structs.replace(H, solver=solver)
    p = plan(snap, s)
    where = replay(snap, p, s)
    check_rules(snap, where)
    assert p.imbalance_after < p.imbalance_before


def test_must_rule_violation_is_mandatory() -> None:
    vms = [_vm("v0", "h0"), _vm("v1", "h1")]
    rules = [Rule(name="gpu-hosts", kind="must_run_on", vms=["v0"], hosts=["h2"])]
    snap = ClusterSnapshot(ts=1.0, hosts=_hosts(3), vms=vms, rules=rules)
    p = plan(snap, msgspec.structs.replace(H, threshold=1))
    assert [(m.vm, m.target, m.mandatory) for m in p.moves] == [("v0", "h2", True)]
    assert "gpu-hosts" in p.moves[0].reason


def test_waves_hold_at_most_k_moves() -> None:
    snap = random_snapshot(3, 10, 60, skew=6.0)
    s = msgspec.structs.replace(H, max_concurrent=2, max_moves=12)
    p = plan(snap, s)
    replay(snap, p, s)
    assert len(p.moves) >= 4
    assert p.waves >= len(p.moves) / 2


def test_swap_of_two_full_hosts_is_ordered_to_fit() -> None:
    # h0 holds one big VM, h1 holds many small ones; the exact solver's placement must be reached in order.
    hosts = _hosts(2, cores=10, mem=10000)
    vms = [_vm("big", "h0", cpu=7, mem=7000)] + [_vm(f"s{i}", "h1", cpu=1, mem=1000) for i in range(4)]
    snap = ClusterSnapshot(ts=1.0, hosts=hosts, vms=vms)
    s = msgspec.structs.replace(H, headroom=1.0)
    p = plan(snap, s)
    replay(snap, p, s)
    assert p.imbalance_after <= p.imbalance_before


def test_consolidation_empties_hosts_within_headroom() -> None:
    vms = [_vm(f"v{i}", f"h{i % 4}", cpu=1, mem=4000) for i in range(8)]
    snap = ClusterSnapshot(ts=1.0, hosts=_hosts(4), vms=vms)
    s = msgspec.structs.replace(H, mode="consolidate")
    p = plan(snap, s)
    where = replay(snap, p, s)
    assert len(p.power_off) >= 2
    assert not {h for h in where.values()} & set(p.power_off)
    assert all("consolidate" in m.reason for m in p.moves)


def test_consolidation_keeps_hosts_with_pinned_vms() -> None:
    vms = [_vm("p", "h0", pinned=True), _vm("a", "h1"), _vm("b", "h2")]
    snap = ClusterSnapshot(ts=1.0, hosts=_hosts(3), vms=vms)
    p = plan(snap, msgspec.structs.replace(H, mode="consolidate"))
    assert "h0" not in p.power_off
    assert len(p.power_off) == 2


def test_too_small_gain_is_rejected_with_the_numbers() -> None:
    vms = [_vm("a", "h0", cpu=2.2), _vm("b", "h1", cpu=2.0)]
    snap = ClusterSnapshot(ts=1.0, hosts=_hosts(2), vms=vms)
    p = plan(snap, msgspec.structs.replace(H, threshold=2))
    assert p.moves == []
    assert any(r.why == "too_small_gain" and str(MIN_GAIN[2]) in r.detail for r in p.rejected)


def test_migration_that_cannot_converge_is_not_made() -> None:
    vms = [_vm(f"v{i}", "h0", cpu=3, dirty_rate_mibps=5000.0) for i in range(4)]
    snap = ClusterSnapshot(ts=1.0, hosts=_hosts(2), vms=vms)
    assert plan(snap, H).moves == []


def test_without_ortools_auto_falls_back_and_says_so() -> None:
    import importlib.util

    p = plan(_skewed(), msgspec.structs.replace(H, solver="auto"))
    if importlib.util.find_spec("ortools") is None:
        assert p.solver == "heuristic"
        assert any("OR-Tools" in n for n in p.notes)
    else:
        assert any("exact" in n for n in p.notes)


# Seeds where CP-SAT proves the optimum in 1-3 s here (on seeds 4, 6 and 7 the best
# placement cannot be reached in 3 moves and no proof is claimed).
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 5])
def test_heuristic_matches_the_proven_optimum_on_tiny_clusters(seed: int) -> None:
    pytest.importorskip("ortools")
    snap = random_snapshot(seed, 4, 10)
    s = PlanSettings(threshold=5, max_moves=3, time_budget_s=20.0)
    h = plan(snap, msgspec.structs.replace(s, solver="heuristic"))
    e = plan(snap, msgspec.structs.replace(s, solver="exact"))
    replay(snap, e, s)
    assert any("proved" in n for n in e.notes), e.notes
    # The exact plan starts from the heuristic's answer, so it is never worse.
    assert e.imbalance_after <= h.imbalance_after + 1e-9
    dh = h.imbalance_before - h.imbalance_after
    de = e.imbalance_before - e.imbalance_after
    assert dh >= 0.95 * de
    assert len(h.moves) <= s.max_moves


@st.composite
def clusters(draw: st.DrawFn) -> tuple[ClusterSnapshot, PlanSettings]:
    n = draw(st.integers(2, 5))
    hosts = [
        Host(
            name=f"h{i}",
            cpu_cores=draw(st.sampled_from([4.0, 8.0, 16.0])),
            memory_mib=draw(st.sampled_from([8192.0, 16384.0])),
            maintenance=draw(st.booleans()) if i else False,
        )
        for i in range(n)
    ]
    k = draw(st.integers(0, 10))
    vms = [
        VM(
            name=f"v{j}",
            host=f"h{draw(st.integers(0, n - 1))}",
            cpu_demand_cores=draw(st.floats(0, 3)),
            memory_mib=draw(st.sampled_from([512.0, 1024.0, 2048.0])),
            pinned=draw(st.booleans()) and draw(st.booleans()),
        )
        for j in range(k)
    ]
    rules: list[Rule] = []
    if k >= 2 and draw(st.booleans()):
        rules.append(Rule(name="apart", kind="anti_affinity", vms=["v0", "v1"]))
    if k >= 4 and draw(st.booleans()):
        rules.append(Rule(name="must", kind="must_run_on", vms=["v3"], hosts=["h0"]))
    s = PlanSettings(
        threshold=draw(st.integers(1, 5)),
        max_concurrent=draw(st.integers(1, 3)),
        max_moves=draw(st.integers(0, 8)),
        mode=draw(st.sampled_from(["balance", "consolidate"])),
        solver="heuristic",
        search_restarts=5,
    )
    return ClusterSnapshot(ts=1.0, hosts=hosts, vms=vms, rules=rules), s


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_random_small_clusters_get_valid_plans(case: tuple[ClusterSnapshot, PlanSettings]) -> None:
    snap, s = case
    p = plan(snap, s)
    where = replay(snap, p, s)
    if not p.unresolved:
        check_rules(snap, where)
    if s.mode == "balance" and not any(m.mandatory for m in p.moves):
        assert p.imbalance_after <= p.imbalance_before + 1e-9
    if s.threshold == 1:
        assert all(m.mandatory for m in p.moves)
