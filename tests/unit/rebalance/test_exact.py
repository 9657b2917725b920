"""The exact solver's model and the ordering of its placement into valid single moves.

The model bounds capacity on the *final* placement: a host above its headroom may
receive VMs once others leave it.  The planner then has to find an order in which
every step fits, or say that it could not (and keep a valid plan).
"""

from __future__ import annotations

import msgspec
import pytest

from cloudmon.rebalance.planner import HostLoad, Move, Plan, PlanSettings, _Planner, plan
from cloudmon.rebalance.snapshot import VM, ClusterSnapshot, Host
from tests.unit.rebalance.checks import replay

S = PlanSettings(threshold=5, max_moves=4, time_budget_s=20.0)


def _host(name: str, cores: float = 10.0, mem: float = 10000.0) -> Host:
    return Host(name=name, cpu_cores=cores, memory_mib=mem)


def _vm(name: str, host: str, cpu: float, mem: float = 100.0) -> VM:
    return VM(name=name, host=host, cpu_demand_cores=cpu, memory_mib=mem)


def _overloaded() -> ClusterSnapshot:
    """h0 starts above its CPU headroom (9 of 8 cores) with little memory; h1 is memory-heavy.

    Balancing both resources needs traffic both ways: a CPU-heavy VM leaves h0, then
    a memory-heavy VM from h1 moves *into* h0, which fits only after the first move.
    Moving VMs out of h0 alone cannot balance memory.
    """
    vms = [
        _vm("a", "h0", cpu=5, mem=500),
        _vm("b", "h0", cpu=4, mem=500),
        _vm("c", "h1", cpu=1, mem=4000),
        _vm("d", "h1", cpu=1, mem=3400),
    ]
    return ClusterSnapshot(ts=1.0, hosts=[_host("h0"), _host("h1")], vms=vms)


def _as_plan(p: _Planner) -> Plan:
    """The planner's recorded steps as a plan, for :func:`replay` (which checks every step)."""
    st = p.st
    zero = HostLoad(0.0, 0.0)
    moves = [
        Move(
            vm=st.vnames[r.vm],
            source=st.hnames[r.source],
            target=st.hnames[r.target],
            wave=w,
            mandatory=r.mandatory,
            reason=r.reason,
            gain=r.gain,
            cost_s=r.cost_s,
            source_before=zero,
            source_after=zero,
            target_before=zero,
            target_after=zero,
        )
        for r, w in zip(p.recs, p.waves(), strict=True)
    ]
    return Plan(
        mode=p.s.mode,
        threshold=p.s.threshold,
        automation=p.s.automation,
        solver="exact",
        moves=moves,
        rejected=p.rejected,
        imbalance_before=0.0,
        imbalance_after=0.0,
        hosts=[],
        power_off=[],
        unresolved=[],
        notes=[],
        elapsed_s=0.0,
    )


def _target(p: _Planner, where: dict[str, str]) -> list[int]:
    st = p.st
    return [st.hidx[where.get(n, st.hnames[st.vhost[i]])] for i, n in enumerate(st.vnames)]


# -- the model ---------------------------------------------------------------------


def test_model_lets_a_host_above_headroom_receive_once_its_final_load_fits() -> None:
    pytest.importorskip("ortools")
    from cloudmon.rebalance import _exact

    snap = _overloaded()
    p = _Planner(snap, S)
    # Solved from the snapshot's own placement (no heuristic moves to start from).
    result = _exact.solve(p, deadline_s=S.time_budget_s)
    assert result.optimal
    assert result.target is not None
    where = {p.st.vnames[v]: p.st.hnames[h] for v, h in enumerate(result.target)}
    assert where["a"] != "h0" or where["b"] != "h0", where
    assert "h0" in (where["c"], where["d"]), f"a memory-heavy VM should move into h0: {where}"
    # Its final load fits the headroom (8 cores, 8000 MiB) on every host.
    for h in ("h0", "h1"):
        cpu = sum(v.cpu_demand_cores for v in snap.vms if where[v.name] == h)
        mem = sum(v.memory_mib for v in snap.vms if where[v.name] == h)
        assert cpu <= 8, (h, cpu)
        assert mem <= 8000, (h, mem)


def test_model_keeps_a_host_above_headroom_closed_when_its_final_load_would_not_fit() -> None:
    pytest.importorskip("ortools")
    from cloudmon.rebalance import _exact

    # h0 is far above headroom and only the pinned VM could leave it: nothing may move in.
    vms = [
        VM(name="p", host="h0", cpu_demand_cores=9.5, memory_mib=500, pinned=True),
        _vm("q", "h1", cpu=0.5, mem=6000),
        _vm("r", "h1", cpu=0.5, mem=1000),
    ]
    snap = ClusterSnapshot(ts=1.0, hosts=[_host("h0"), _host("h1")], vms=vms)
    p = _Planner(snap, S)
    result = _exact.solve(p, deadline_s=S.time_budget_s)
    assert result.target is not None
    assert result.target == p.st.initial_vhost


def test_exact_plan_moves_into_the_overloaded_host_after_it_was_relieved() -> None:
    pytest.importorskip("ortools")
    snap = _overloaded()
    e = plan(snap, msgspec.structs.replace(S, solver="exact"))
    h = plan(snap, msgspec.structs.replace(S, solver="heuristic"))
    replay(snap, e, S)
    assert e.solver == "exact", e.notes
    assert any("proved the placement optimal" in n for n in e.notes), e.notes
    into_h0 = [i for i, m in enumerate(e.moves) if m.target == "h0"]
    out_of_h0 = [i for i, m in enumerate(e.moves) if m.source == "h0"]
    assert into_h0
    assert out_of_h0
    assert max(out_of_h0) < min(into_h0)
    # A proof over the real problem: no valid plan (the heuristic's included) does better.
    assert e.imbalance_after <= h.imbalance_after + 1e-9


# -- ordering a placement ------------------------------------------------------------


def _cross() -> ClusterSnapshot:
    """A placement the greedy order deadlocks on, and that one other order reaches.

    Target: m u→t, o t→u, a k→t (headroom 1.0).  a and m both fit t at first, but
    only one of them; a looks better (it relieves k, the fullest host), and after it
    m waits for o to leave t while o waits for m to leave u.  m first, then o, then a
    works.
    """
    hosts = [_host("t"), _host("u", cores=12), _host("k")]
    vms = [
        _vm("o", "t", cpu=4),
        _vm("f", "t", cpu=2),
        _vm("m", "u", cpu=4),
        _vm("g", "u", cpu=6),
        _vm("a", "k", cpu=4),
        _vm("w", "k", cpu=6),
    ]
    return ClusterSnapshot(ts=1.0, hosts=hosts, vms=vms)


def test_ordering_backtracks_out_of_a_greedy_dead_end() -> None:
    snap = _cross()
    s = PlanSettings(headroom=1.0, max_moves=3)
    p = _Planner(snap, s)
    target = _target(p, {"m": "t", "o": "u", "a": "t"})
    st = p.st
    # The greedy first choice is a (what the search tries first), and it leads nowhere.
    a, m = st.vidx["a"], st.vidx["m"]
    assert st.var_delta(st.vdemand[a], st.vhost[a], target[a]) < st.var_delta(
        st.vdemand[m], st.vhost[m], target[m]
    )
    assert p.apply_assignment(target, set())
    assert p.detours == 0
    assert [st.vnames[r.vm] for r in p.recs] == ["m", "o", "a"]
    where = replay(snap, _as_plan(p), s)
    assert where == {"o": "u", "f": "t", "m": "t", "g": "u", "a": "t", "w": "k"}


def _swap(third_host: bool) -> ClusterSnapshot:
    """Two full hosts whose final loads fit after a swap that no direct order reaches."""
    hosts = [_host("h0"), _host("h1")] + ([_host("spare")] if third_host else [])
    vms = [_vm("x", "h0", cpu=6), _vm("y", "h0", cpu=4), _vm("z", "h1", cpu=6), _vm("q", "h1", cpu=4)]
    return ClusterSnapshot(ts=1.0, hosts=hosts, vms=vms)


def test_a_swap_cycle_is_broken_through_a_host_with_room_and_counted() -> None:
    snap = _swap(third_host=True)
    s = PlanSettings(headroom=1.0, max_moves=3)
    p = _Planner(snap, s)
    assert p.apply_assignment(_target(p, {"x": "h1", "z": "h0"}), set())
    assert p.detours == 1
    assert len(p.recs) == 3
    assert any("intermediate step" in r.reason for r in p.recs)
    where = replay(snap, _as_plan(p), s)
    assert where["x"] == "h1"
    assert where["z"] == "h0"


def test_a_cycle_that_cannot_be_ordered_stops_at_valid_moves_and_says_why() -> None:
    snap = _swap(third_host=False)
    s = PlanSettings(headroom=1.0, max_moves=3)
    p = _Planner(snap, s)
    assert not p.apply_assignment(_target(p, {"x": "h1", "z": "h0"}), set())
    assert p.recs == []
    assert {(r.vm, r.why) for r in p.rejected} == {("x", "capacity"), ("z", "capacity")}
    assert all("no order of moves" in r.detail for r in p.rejected)


def test_verdict_claims_optimality_only_for_a_placement_reached_move_for_move() -> None:
    pytest.importorskip("ortools")
    from cloudmon.rebalance import _exact

    proved = _exact.Result([0], optimal=True, budget_s=2.0)
    assert "proved" in _exact.verdict(proved, reached=True, detours=0)
    assert "proved" not in _exact.verdict(proved, reached=True, detours=1)
    assert "proved" not in _exact.verdict(proved, reached=False, detours=0)
    unproven = _exact.Result([0], optimal=False, budget_s=2.0)
    assert "proved" not in _exact.verdict(unproven, reached=True, detours=0)


def _locked_swap() -> ClusterSnapshot:
    """Two hosts full in opposite resources: swapping a CPU-heavy and a memory-heavy VM
    balances them perfectly, and fits at the end, but neither VM fits first (headroom 1.0)."""
    vms = [
        _vm("a0", "h0", cpu=5, mem=500),
        _vm("a1", "h0", cpu=5, mem=500),
        _vm("b0", "h1", cpu=0.5, mem=5000),
        _vm("b1", "h1", cpu=0.5, mem=5000),
    ]
    return ClusterSnapshot(ts=1.0, hosts=[_host("h0"), _host("h1")], vms=vms)


def test_unreachable_placements_are_cut_off_and_the_proof_covers_only_reachable_ones() -> None:
    pytest.importorskip("ortools")
    snap = _locked_swap()
    s = PlanSettings(threshold=5, max_moves=2, headroom=1.0, solver="exact", time_budget_s=20.0)
    p = plan(snap, s)
    replay(snap, p, s)
    # Every swap is a cycle with no move to spare for a detour: the best plan is no plan.
    assert p.moves == []
    assert any("cut off" in n for n in p.notes), p.notes
    assert any("proved the placement optimal" in n for n in p.notes), p.notes


def test_a_cut_the_planner_cannot_justify_withdraws_the_proof() -> None:
    pytest.importorskip("ortools")
    snap = _locked_swap()
    # A third move to spare: a detour might exist in principle, but there is no third host to park on.
    s = PlanSettings(threshold=5, max_moves=3, headroom=1.0, solver="exact", time_budget_s=20.0)
    p = plan(snap, s)
    replay(snap, p, s)
    assert p.moves == []
    assert not any("proved" in n for n in p.notes), p.notes
    assert any("not proven optimal" in n for n in p.notes), p.notes
