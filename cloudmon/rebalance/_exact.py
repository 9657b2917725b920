"""The exact solver: the planner's objective as an OR-Tools CP-SAT model.

Imported only when the exact solver runs (OR-Tools is the optional ``planner``
extra).  It returns a target placement; the planner turns it into valid,
ordered single moves, and :func:`verdict` says what the resulting plan may claim.
Capacity is on the *final* placement: a host may receive VMs once its final load
is within headroom, even when it starts above it (the planner moves its VMs out
first); a host above its headroom that receives nothing may stay there.

The objective is the heuristic's, scaled to integers: ``K·(n·σ²)`` plus ``K·λ`` per non-mandatory move, ``K·should_penalty`` per soft-rule
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
    #: CP-SAT proved ``target`` optimal for the model (see :func:`verdict` for the plan's claim).
    optimal: bool = False
    budget_s: float = 0.0
    #: Placements cut off because the planner found no detour to them, though one might exist.
    unsound_cuts: int = 0


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
                    if any(d[r] > st.limit[r][h] + 1e-9 for r in (CPU, MEM)) or d[GPU] > st.cap[GPU][h]:
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
    # Capacity within headroom on the *final* placement (demands rounded up, capacity down:
    # integer-feasible is float-feasible).  A host that starts above its headroom may stay there
    # while it only loses VMs (the planner never adds to an overloaded host), but once it receives
    # a VM its final load must fit, as for any other host: the planner orders the moves so that
    # its departures run first (``_Planner.apply_assignment``).  Leaving such hosts out of the
    # model entirely made "proved optimal" a proof over a smaller problem than the heuristic's.
    for h in range(nh):
        if not by_host[h]:
            continue
        enforce: list[Any] = []
        if over[h]:
            incoming = [x[v, h] for v in by_host[h] if init[v] != h]
            if not incoming:
                continue
            receives = model.new_bool_var(f"recv{h}")
            model.add_max_equality(receives, incoming)
            enforce = [receives]
        for r in (CPU, MEM):
            other = st.snap.hosts[h].cpu_used_other if r == CPU else st.snap.hosts[h].memory_used_other_mib
            cap = math.floor((st.limit[r][h] - other) * _S + 1e-6)
            model.add(
                sum(x[v, h] * math.ceil(st.vdemand[v][r] * _S - 1e-6) for v in by_host[h]) <= cap
            ).only_enforce_if(enforce)
        if any(st.vdemand[v][GPU] for v in by_host[h]):
            model.add(
                sum(x[v, h] * int(st.vdemand[v][GPU]) for v in by_host[h]) <= int(st.cap[GPU][h])
            ).only_enforce_if(enforce)
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
    moved_lits: list[Any] = []
    for v in range(nv):
        stay = x.get((v, init[v]))
        moved_lits.append(1 if stay is None else 1 - stay)
    model.add(sum(moved_lits) <= s.max_moves)

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
            if isinstance(moved_lits[v], int):
                continue
            per_move = s.cost_weight * st.vcost[v] + (0.0 if v in mandatory else lam)
            terms.append(round(per_move * k) * moved_lits[v])
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
            if not isinstance(moved_lits[v], int):
                terms.append((10**5 + min(10**4, round(st.vcost[v]))) * moved_lits[v])
    model.minimize(sum(terms))
    for (v, h), lit in x.items():
        model.add_hint(lit, 1 if st.vhost[v] == h else 0)
    left_s = max(0.05, deadline_s)
    cuts = unsound = 0
    while True:
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = left_s
        solver.parameters.num_workers = workers
        solver.parameters.random_seed = 1
        status = solver.solve(model)
        left_s -= solver.wall_time
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return Result(
                None,
                [f"exact: CP-SAT found no placement ({solver.status_name(status)}); heuristic plan kept"],
            )
        target = [init[v] for v in range(nv)]
        for (v, h), lit in x.items():
            if solver.value(lit):
                target[v] = h
        # The model bounds only the final placement, and some placements no valid sequence
        # reaches (a cycle of moves between full hosts).  When the move budget leaves no
        # room for a detour through a third host, such a placement is no plan at all: cut
        # it off (and its kin, see _cut) and solve again, so that a proof stays a proof
        # over what the planner can do.  With moves to spare, the planner may still reach
        # it by parking a VM; when even that fails it is cut too, but then the cut may
        # have removed a placement some cleverer detour reaches: no proof is claimed.
        moved = [v for v in range(nv) if target[v] != init[v]]
        if left_s < 0.05:
            break
        order, complete = fresh._order(set(moved), target)
        if order is not None or not complete:
            break
        spare = len(moved) < s.max_moves
        if spare:
            trial = type(p)(st.snap, s)
            if trial.apply_assignment(target, mandatory):
                break
            unsound += 1
        _cut(model, x, fresh, init, target, moved, moved_lits, None if spare else s.max_moves)
        cuts += 1
    notes = [f"exact: cut off {cuts} placement(s) that no order of moves reaches"] if cuts else []
    return Result(target, notes, status == cp_model.OPTIMAL, s.time_budget_s, unsound)


def _cut(
    model: Any,
    x: dict[tuple[int, int], Any],
    fresh: _Planner,
    init: list[int],
    target: list[int],
    moved: list[int],
    moved_lits: list[Any],
    max_moves: int | None,
) -> None:
    """Exclude ``target`` (no order reaches it and it spends every move) and, where sound, its kin.

    A *locked* set is a set of the placement's moves that each do not fit their
    target host in the initial state, while no VM outside the set leaves those
    hosts.  None of its moves can go first in any order (its hosts only fill up until
    one of them runs), so every placement that makes these moves, keeps the other
    VMs of those hosts where they are, and has no move to spare for a detour through
    a third host is unreachable too: a swap between two full hosts, say, whatever
    else moves.  The smallest locked set gives the widest cut.  Without one, only
    ``target`` itself is cut (all ``max_moves`` moves are in it, so a placement with
    all of them *is* it).  ``max_moves`` None: the placement had moves to spare and
    the planner found no detour; cut it and its kin whatever the move count (a
    heuristic cut, which the caller reports).
    """
    st = fresh.st
    blocked = set()
    for v in moved:
        b = st.blocked(st.vunit[v], target[v], st.vdemand[v])
        if b is not None and b[0] == "capacity":
            blocked.add(v)
    best: set[int] | None = None
    for seed in sorted(blocked):
        lock = {seed}
        while True:
            hosts = {target[v] for v in lock}
            leaving = {v for v in moved if init[v] in hosts} - lock
            if not leaving or not leaving <= blocked:
                break
            lock |= leaving
        if not leaving and (best is None or len(lock) < len(best)):
            best = lock
    if best is not None:
        hosts = {target[v] for v in best}
        others = [v for v in range(len(init)) if init[v] in hosts and v not in best]
        if all((v, init[v]) in x for v in others):
            when = [x[v, target[v]] for v in sorted(best)] + [x[v, init[v]] for v in others]
            if max_moves is None:
                model.add_bool_or([w.negated() for w in when])
            else:
                model.add(sum(moved_lits) <= max_moves - 1).only_enforce_if(when)
            return
    # Only this placement: with moves to spare, a placement with all its moves and more is another one.
    lits = moved if max_moves is not None else range(len(init))
    model.add_bool_or([x[v, target[v]].negated() for v in lits])


def verdict(result: Result, *, reached: bool, detours: int) -> str:
    """What the plan built from ``result.target`` may claim, once the planner has ordered it.

    The model is a relaxation of the real problem (sequences of valid single moves):
    every final placement a valid sequence reaches satisfies it, and its objective
    charges each moved VM once.  So its optimum is the real optimum exactly when the
    planner reaches that placement with one move per moved VM; an extra intermediate
    move (a swap cycle that needs temporary room) costs more than the model counted.
    """
    if not result.optimal:
        return (
            f"exact: CP-SAT stopped at the time budget ({result.budget_s:g} s) with a feasible, "
            "unproven placement"
        )
    if result.unsound_cuts:
        return (
            f"exact: the best placement CP-SAT found after leaving out {result.unsound_cuts} it could not "
            "order into valid moves; not proven optimal (a longer detour might reach one of those)"
        )
    if not reached:
        return (
            "exact: CP-SAT's optimal placement cannot be reached by valid moves within max_moves "
            "(a cycle of moves that needs temporary room), so no optimality is claimed"
        )
    if detours:
        return (
            f"exact: CP-SAT's optimal placement needs {detours} intermediate move(s) to stay within "
            "headroom on the way, so this plan is not proven optimal"
        )
    return "exact: CP-SAT proved the placement optimal"


def _grid(lo: int, hi: int) -> list[int]:
    """Tangent points for u² on [lo, hi]: every 4 units (0.4 %) up to 110 %, every 50 beyond."""
    pts = list(range(lo, min(hi, 1100) + 1, 4))
    pts += list(range(max(lo, 1100), hi + 1, 50))
    pts.append(hi)
    return sorted(set(pts))
