"""The exact solver: the planner's objective as an OR-Tools CP-SAT model.

Imported only when the exact solver runs (OR-Tools is the optional ``planner``
extra).  It returns a target placement; the planner turns it into valid,
ordered single moves.  The objective is the heuristic's, scaled to integers:
``K·(n·σ²)`` plus ``K·λ`` per non-mandatory move, ``K·should_penalty`` per soft-rule
miss and ``K·cost_weight`` per second of migration, where ``σ²`` uses loads
rounded to 1/1000 of a host's capacity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cloudmon.rebalance.planner import _Planner

_S = 1000  # load resolution: 0.1 % of a host's capacity
_NOT_MANDATORY_ONLY = 1e3  # threshold 1: moves cost more than any balance gain


@dataclass(slots=True)
class Result:
    """A placement (host index per VM), or None, and what the solver said."""

    target: list[int] | None
    notes: list[str] = field(default_factory=list)
    optimal: bool = False


def solve(p: _Planner, deadline_s: float, workers: int = 2) -> Result:
    """Solve the placement exactly within ``deadline_s`` seconds, seeded with the heuristic's answer."""
    from ortools.sat.python import cp_model

    from cloudmon.rebalance.planner import CPU, GPU, MEM, _mandatory_vms

    st = p.st
    s = p.s
    nv, nh = len(st.vnames), len(st.hnames)
    init = st.initial_vhost
    # Facts about the initial state (the heuristic planner has already moved things in ``st``).
    init_load = st.initial_load
    over = [
        any(init_load[r][h] > st.limit[r][h] + 1e-9 for r in (CPU, MEM))
        or init_load[GPU][h] > st.cap[GPU][h] + 1e-9
        for h in range(nh)
    ]
    fresh = type(p)(st.snap, s)
    mandatory = _mandatory_vms(fresh)
    model = cp_model.CpModel()
    x: dict[tuple[int, int], Any] = {}
    for v in range(nv):
        vm = st.snap.vms[v]
        allowed = st.vallowed[v]
        if vm.pinned or math.isinf(st.vcost[v]):
            cands = [init[v]]
        else:
            cands = []
            for h in range(nh):
                if not st.active[h] or (allowed is not None and h not in allowed):
                    continue
                if h != init[v]:
                    d = st.vdemand[v]
                    if (
                        over[h]
                        or any(d[r] > st.limit[r][h] + 1e-9 for r in (CPU, MEM))
                        or d[GPU] > st.cap[GPU][h]
                    ):
                        continue
                cands.append(h)
        if not cands:
            return Result(None, [f"exact: VM {st.vnames[v]!r} has no possible host; heuristic plan kept"])
        for h in cands:
            x[v, h] = model.new_bool_var(f"x{v}_{h}")
        model.add_exactly_one(x[v, h] for h in cands)
    by_host: list[list[int]] = [[] for _ in range(nh)]
    for v, h in x:
        by_host[h].append(v)
    # Capacity within headroom (demands rounded up, capacity down: integer-feasible is float-feasible).
    for h in range(nh):
        if over[h] or not by_host[h]:
            continue
        for r in (CPU, MEM):
            other = st.snap.hosts[h].cpu_used_other if r == CPU else st.snap.hosts[h].memory_used_other_mib
            cap = math.floor((st.limit[r][h] - other) * _S + 1e-6)
            model.add(sum(x[v, h] * math.ceil(st.vdemand[v][r] * _S - 1e-6) for v in by_host[h]) <= cap)
        if any(st.vdemand[v][GPU] for v in by_host[h]):
            model.add(sum(x[v, h] * int(st.vdemand[v][GPU]) for v in by_host[h]) <= int(st.cap[GPU][h]))
    for rule in st.snap.rules:
        vs = [st.vidx[n] for n in rule.vms]
        if rule.kind == "anti_affinity":
            for h in range(nh):
                lits = [x[v, h] for v in vs if (v, h) in x]
                if len(lits) > 1:
                    model.add_at_most_one(lits)
        elif rule.kind == "affinity":
            for h in range(nh):
                a = x.get((vs[0], h))
                for v in vs[1:]:
                    b = x.get((v, h))
                    if a is None and b is None:
                        continue
                    if a is None or b is None:
                        model.add((b if a is None else a) == 0)
                    else:
                        model.add(a == b)
    moved: list[Any] = []
    for v in range(nv):
        stay = x.get((v, init[v]))
        moved.append(1 if stay is None else 1 - stay)
    model.add(sum(moved) <= s.max_moves)

    res = st.res
    nr = {r: st.nr[r] for r in res}
    n_max = max(nr.values())
    b_scale = 1 if len(set(nr.values())) == 1 else 16
    k = b_scale * _S * _S * n_max * n_max * len(res) / st.n
    terms: list[Any] = []
    if s.mode == "balance":
        for r in res:
            a_r = round(b_scale * n_max * n_max / (nr[r] * nr[r]))
            us = []
            for h in range(nh):
                if not st.counted[r][h]:
                    continue
                other = (
                    st.snap.hosts[h].cpu_used_other
                    if r == CPU
                    else st.snap.hosts[h].memory_used_other_mib
                    if r == MEM
                    else 0.0
                )
                base = round(other / st.cap[r][h] * _S)
                q = {v: round(st.vdemand[v][r] / st.cap[r][h] * _S) for v in by_host[h]}
                ub = base + sum(q.values())
                u = model.new_int_var(base, max(base, ub), f"u{r}_{h}")
                model.add(u == base + sum(x[v, h] * q[v] for v in by_host[h]))
                sq = model.new_int_var(0, max(base, ub) ** 2, f"sq{r}_{h}")
                # u² as the maximum of its tangents (exact at the grid points, within (step/2)² between):
                # a linear relaxation CP-SAT's LP handles far better than a product constraint.
                for g in _grid(base, max(base, ub)):
                    model.add(sq >= 2 * g * u - g * g)
                model.add_multiplication_equality(sq, [u, u])
                us.append((u, sq, max(base, ub)))
            tot_ub = sum(ub for _, _, ub in us)
            t = model.new_int_var(0, tot_ub, f"t{r}")
            model.add(t == sum(u for u, _, _ in us))
            tsq = model.new_int_var(0, tot_ub * tot_ub, f"tsq{r}")
            model.add_multiplication_equality(tsq, [t, t])
            terms.append(a_r * (nr[r] * sum(sq for _, sq, _ in us) - tsq))
        lam = _NOT_MANDATORY_ONLY if math.isinf(p.min_gain) else p.min_gain
        for v in range(nv):
            if isinstance(moved[v], int):
                continue
            per_move = s.cost_weight * st.vcost[v] + (0.0 if v in mandatory else lam)
            terms.append(round(per_move * k) * moved[v])
        if s.should_penalty:
            for (v, h), lit in x.items():
                bad = st.soft_viol(v, h)
                if bad:
                    terms.append(round(s.should_penalty * k) * bad * lit)
    else:
        if p.s.threshold > 1:
            for h in range(nh):
                if not by_host[h]:
                    continue
                y = model.new_bool_var(f"y{h}")
                for v in by_host[h]:
                    model.add_implication(x[v, h], y)
                terms.append(10**9 * y)
        for v in range(nv):
            if not isinstance(moved[v], int):
                terms.append((10**5 + min(10**4, round(st.vcost[v]))) * moved[v])
    model.minimize(sum(terms))
    for (v, h), lit in x.items():
        model.add_hint(lit, 1 if st.vhost[v] == h else 0)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.05, deadline_s)
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = 1
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return Result(
            None, [f"exact: CP-SAT found no placement ({solver.status_name(status)}); heuristic plan kept"]
        )
    target = [init[v] for v in range(nv)]
    for (v, h), lit in x.items():
        if solver.value(lit):
            target[v] = h
    optimal = status == cp_model.OPTIMAL
    note = (
        "exact: CP-SAT proved the placement optimal"
        if optimal
        else (
            f"exact: CP-SAT stopped at the time budget ({s.time_budget_s:g} s) with a feasible, unproven placement"
        )
    )
    return Result(target, [note], optimal)


def _grid(lo: int, hi: int) -> list[int]:
    """Tangent points for u² on [lo, hi]: every 4 units (0.4 %) up to 110 %, every 50 beyond."""
    pts = list(range(lo, min(hi, 1100) + 1, 4))
    pts += list(range(max(lo, 1100), hi + 1, 50))
    pts.append(hi)
    return sorted(set(pts))
