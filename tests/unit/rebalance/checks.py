"""Replay a plan on its snapshot and check every step (shared by the planner tests)."""

from __future__ import annotations

from cloudmon.rebalance.planner import Plan, PlanSettings
from cloudmon.rebalance.snapshot import ClusterSnapshot


def replay(snap: ClusterSnapshot, plan: Plan, s: PlanSettings) -> dict[str, str]:
    """Apply the moves in order; assert capacity at every step, waves ≤ K, pinned VMs still.

    Returns the final placement (VM -> host).
    """
    hosts = {h.name: h for h in snap.hosts}
    vms = {v.name: v for v in snap.vms}
    where = {v.name: v.host for v in snap.vms}
    load = {h.name: [h.cpu_used_other, h.memory_used_other_mib, 0.0] for h in snap.hosts}
    for v in snap.vms:
        ld = load[v.host]
        ld[0] += v.cpu_demand_cores
        ld[1] += v.memory_mib
        ld[2] += v.gpus
    waves: dict[int, int] = {}
    last_wave = 0
    for m in plan.moves:
        vm = vms[m.vm]
        assert not vm.pinned, f"pinned VM {m.vm} moved"
        assert where[m.vm] == m.source, f"{m.vm} is on {where[m.vm]}, not {m.source}"
        assert m.wave >= last_wave, "waves are listed in order"
        last_wave = m.wave
        waves[m.wave] = waves.get(m.wave, 0) + 1
        assert waves[m.wave] <= s.max_concurrent
        t = hosts[m.target]
        assert t.powered_on, f"{m.vm} moved to powered-off {m.target}"
        assert not t.maintenance, f"{m.vm} moved to {m.target} in maintenance"
        tl = load[m.target]
        tl[0] += vm.cpu_demand_cores
        tl[1] += vm.memory_mib
        tl[2] += vm.gpus
        assert tl[0] <= t.cpu_cores * s.headroom + 1e-6, f"CPU over headroom on {m.target} at {m}"
        assert tl[1] <= t.memory_mib * s.headroom + 1e-6, f"memory over headroom on {m.target}"
        assert tl[2] <= t.gpus, f"GPUs over capacity on {m.target}"
        sl = load[m.source]
        sl[0] -= vm.cpu_demand_cores
        sl[1] -= vm.memory_mib
        sl[2] -= vm.gpus
        where[m.vm] = m.target
    assert len(plan.moves) <= s.max_moves
    # A move into a host freed by an earlier move runs in a later wave.
    for i, m in enumerate(plan.moves):
        for earlier in plan.moves[:i]:
            if earlier.source == m.target or earlier.vm == m.vm:
                assert earlier.wave < m.wave, f"{m.vm} needs room freed by {earlier.vm} in an earlier wave"
    return where


def check_rules(snap: ClusterSnapshot, where: dict[str, str]) -> None:
    """Hard rules hold in the final placement."""
    for r in snap.rules:
        hs = [where[v] for v in r.vms]
        if r.kind == "affinity":
            assert len(set(hs)) == 1, f"affinity {r.name} split: {hs}"
        elif r.kind == "anti_affinity":
            assert len(set(hs)) == len(hs), f"anti-affinity {r.name} violated: {hs}"
        elif r.kind == "must_run_on":
            assert all(h in r.hosts for h in hs), f"must rule {r.name} violated: {hs}"
        elif r.kind == "must_not_run_on":
            assert not any(h in r.hosts for h in hs), f"must-not rule {r.name} violated: {hs}"
