"""Beam search with greedy rollouts over move sequences (the heuristic on small clusters).

Greedy best-improvement spends a small move budget on the moves that look best
one step ahead.  The optimum often spends some of it on *chains*: a move that
gains little or even loses (it takes a VM off a host whose free CPU is what a
memory-heavy VM needs) followed by moves that this one made possible.  Neither
greedy nor a local search over single moves takes the losing first step.

This search looks further:

* **States** are sequences of unit moves from the placement the mandatory moves
  left, each valid when it is made (rules, headroom, at most once per unit), grouped
  in layers by the number of VM moves they use.
* **Children** of a state are its best single moves that pass the threshold, and
  *make-room chains*: a wanted move blocked by capacity on host ``t``, preceded by
  moving a unit off ``t`` (to a host with room, or to one that a third move makes
  room on first).
* **Value** of a child is the objective after a greedy rollout spends the moves
  left: a chain whose first steps lose ranks by what they make possible.  Each
  layer keeps its ``width`` best distinct placements.
* **Answer**: the best complete sequence (state + rollout) any rollout reached,
  so the result is never worse than greedy (the root's rollout *is* greedy).

**Threshold.**  Every single move improves the objective by at least
``MIN_GAIN`` (the objective charges ``MIN_GAIN`` per VM moved).  A chain is taken
as one step: its make-room moves alone may not improve it (vSphere DRS judges
each move on its own; this planner lets a make-room move borrow from the move it
enables).  A chain that frees a host may even lose as a whole: it is judged
with the moves its rollout makes after it, and the answer (a whole sequence)
improves the objective by ``MIN_GAIN`` per move.  Steps whose removal leaves a
valid, better sequence are dropped from the answer (:func:`_pruned`).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cloudmon.rebalance.planner import _Planner

_EPS = 1e-12

Step = tuple[int, int]  # (unit, target host)


@dataclass(slots=True)
class Result:
    """The best sequence found and its objective change (negative = better)."""

    steps: list[Step]
    delta: float
    rollouts: int = 0
    #: Moves scored.
    work: int = 0


class _Search:
    def __init__(self, p: _Planner, singles: int, chains: int, losing: int = 6) -> None:
        st = p.st
        self.p = p
        self.st = st
        self.lam = p.min_gain
        self.singles = singles
        self.chains = chains
        # Blocked moves tried with an eviction: the ranking (the move, its best eviction and the best
        # move into the host it leaves, interactions ignored) is rough, so well beyond ``chains``.
        self.wanted = 6 * chains
        # Chains that lose on their own, kept for the move into the host they free (see make_room).
        self.losing = losing
        self.hosts = [h for h in range(len(st.hnames)) if st.active[h]]
        self.home: dict[int, int] = {}
        for ui, u in enumerate(st.units):
            h = st.unit_host(ui)
            if u.pinned or u.moved or math.isinf(u.cost_s) or h < 0 or not st.active[h]:
                continue
            self.home[ui] = h
        self.size = {ui: len(st.units[ui].members) for ui in self.home}
        # Per unit: what a move costs whatever its target (λ per VM, migration seconds).
        self.fixed = {
            ui: self.lam * self.size[ui] + p.s.cost_weight * st.units[ui].cost_s for ui in self.home
        }
        # Units with should rules: (members, soft-rule misses at home).
        self.soft_units: dict[int, tuple[list[int], int]] = {}
        if p.s.should_penalty:
            for ui, h in self.home.items():
                members = st.units[ui].members
                if any(st.vsoft[v] != (None, None) for v in members):
                    self.soft_units[ui] = (members, sum(st.soft_viol(v, h) for v in members))
        self.rollouts = 0
        # Moves scored so far: the search stops expanding states once this passes its allowance.
        self.work = 0

    # -- primitives ----------------------------------------------------------
    def delta(self, ui: int, t: int) -> float:
        """Objective change of moving unit ``ui`` from its home to ``t`` now (λ per VM moved included)."""
        return -self.p.unit_gain(ui, self.home[ui], t) + self.lam * self.size[ui]

    def scan(self, done: set[int], budget: int) -> list[tuple[float, int, int]]:
        """``(delta, unit, target)`` for every move of a unit not in ``done`` that fits ``budget``.

        The same numbers as :meth:`delta`, with the source's share and the per-move
        terms worked out once per unit: this loop is where the search spends its time.
        """
        st = self.st
        out: list[tuple[float, int, int]] = []
        res = st.res
        hosts = self.hosts
        u_now = [
            [st.load[r][h] / st.cap[r][h] if st.counted[r][h] else 0.0 for h in range(len(st.hnames))]
            for r in (0, 1, 2)
        ]
        for ui, s in self.home.items():
            if ui in done or self.size[ui] > budget:
                continue
            dem = st.units[ui].demand
            src: list[tuple[float, float, float, float, list[float], list[float], list[bool]]] = []
            for r in res:
                dr = dem[r]
                if dr == 0.0:
                    continue
                a = dr / st.cap[r][s] if st.counted[r][s] else 0.0
                src.append((dr, a * (a - 2 * u_now[r][s]), -a, st.w[r], u_now[r], st.cap[r], st.counted[r]))
                # (demand, source's Δs2, source's Δs1, weight, loads, capacities, counted)
            fixed = self.fixed[ui]
            soft = self.soft_units.get(ui)
            nrs = [(st.s1[r], st.nr[r]) for r in res if dem[r] != 0.0]
            for t in hosts:
                if t == s:
                    continue
                total = fixed
                for (dr, ds2s, ds1s, w, ur, cr, cnt), (s1, nr) in zip(src, nrs, strict=True):
                    if cnt[t]:
                        b = dr / cr[t]
                        ds1 = ds1s + b
                        ds2 = ds2s + b * (b + 2 * ur[t])
                    else:
                        ds1 = ds1s
                        ds2 = ds2s
                    total += w * (ds2 - (2 * s1 * ds1 + ds1 * ds1) / nr)
                if soft is not None:
                    total += self.p.s.should_penalty * (sum(st.soft_viol(v, t) for v in soft[0]) - soft[1])
                out.append((total, ui, t))
        self.work += len(out)
        return out

    def apply(self, steps: list[Step]) -> None:
        st = self.st
        for ui, t in steps:
            for v in st.units[ui].members:
                st.move_vm(v, t)

    def undo(self, steps: list[Step]) -> None:
        st = self.st
        for ui, _t in reversed(steps):
            h = self.home[ui]
            for v in st.units[ui].members:
                st.move_vm(v, h)

    def moves_of(self, steps: list[Step]) -> int:
        return sum(self.size[ui] for ui, _ in steps)

    # -- neighbourhood ---------------------------------------------------------
    def best_singles(self, done: set[int], budget: int, k: int) -> list[tuple[float, int, int]]:
        """The ``k`` best feasible single moves that improve the objective."""
        return self._feasible(sorted(x for x in self.scan(done, budget) if x[0] < -_EPS), k)

    def _feasible(self, ranked: list[tuple[float, int, int]], k: int) -> list[tuple[float, int, int]]:
        out: list[tuple[float, int, int]] = []
        for d, ui, t in ranked:
            if self.st.blocked(ui, t) is None:
                out.append((d, ui, t))
                if len(out) >= k:
                    break
        return out

    def rollout(self, done: set[int], budget: int) -> tuple[float, list[Step]]:
        """Greedy from the current placement: best improving single move until none or no budget."""
        self.rollouts += 1
        steps: list[Step] = []
        total = 0.0
        used: set[int] = set(done)
        while budget > 0:
            best = self.best_singles(used, budget, 1)
            if not best:
                break
            d, ui, t = best[0]
            self.apply([(ui, t)])
            steps.append((ui, t))
            used.add(ui)
            budget -= self.size[ui]
            total += d
        self.undo(steps)
        return total, steps

    def make_room(
        self, table: list[tuple[float, int, int]], done: set[int], budget: int
    ) -> list[tuple[float, list[Step]]]:
        """Chains that improve the objective: evict a unit (maybe two) so a wanted move fits.

        ``table`` is :meth:`scan` of the current placement (the first step of each chain).
        """
        st = self.st
        first = {(ui, t): d for d, ui, t in table}
        wanted: list[tuple[float, int, int]] = []
        # Per unit: the best move into its home once it left (what its leaving makes possible).
        fill: dict[int, float] = {}
        # The best way out for each unit, whether it fits there now or not (for ranking only).
        out_best: dict[int, float] = {}
        for d, ui, _t in table:
            if d < out_best.get(ui, math.inf):
                out_best[ui] = d
        for d, ui, t in table:
            # Not only improving moves: a move that loses on its own may win with the eviction
            # (the evicted unit leaves a host that was too full of the other resource).
            if self.size[ui] < budget:
                b = st.blocked(ui, t)
                if b is not None and b[0] == "capacity":
                    # Ranked by the move plus its best possible eviction (interactions ignored).
                    ev = min(
                        (
                            out_best[uj]
                            for uj in st.units_on[t]
                            if uj != ui and uj in out_best and self._fits(t, uj, ui)
                        ),
                        default=math.inf,
                    )
                    if ev < math.inf:
                        wanted.append((d + ev + self._refill(ui, out_best, table, done, budget, fill), ui, t))
        # Where each unit could go now, best first (the last eviction of a chain).
        dest: dict[int, list[tuple[float, int]]] = {}
        out: list[tuple[float, list[Step]]] = []
        for _d, ui, t in heapq.nsmallest(self.wanted, wanted):
            left = budget - self.size[ui]
            for uj in list(st.units_on[t]):
                if uj == ui or uj in done or uj not in self.home or self.size[uj] > left:
                    continue
                if not self._fits(t, uj, ui):
                    continue
                # t2 == home of ui is a swap (uj goes where ui comes from, while ui is still there).
                for t2 in self.hosts:
                    if t2 == t or t2 == self.home[uj]:
                        continue
                    b = st.blocked(uj, t2)
                    if b is None:
                        self.apply([(uj, t2)])
                        if st.blocked(ui, t) is None:
                            total = first[uj, t2] + self.delta(ui, t)
                            out.append((total, [(uj, t2), (ui, t)]))
                        self.undo([(uj, t2)])
                    elif b[0] == "capacity" and self.size[uj] < left:
                        for uk in list(st.units_on[t2]):
                            if uk in (ui, uj) or uk in done or uk not in self.home:
                                continue
                            if self.size[uk] > left - self.size[uj]:
                                continue
                            if uk not in dest:
                                dest[uk] = sorted(
                                    (first[uk, h], h)
                                    for h in self.hosts
                                    if (uk, h) in first and st.blocked(uk, h) is None
                                )
                            t3 = next((h for _, h in dest[uk] if h not in (t2, t)), None)
                            if t3 is None:
                                continue
                            if not self._fits(t2, uk, uj):
                                continue
                            steps = [(uk, t3), (uj, t2), (ui, t)]
                            total3 = self._sequence(steps)
                            if total3 is not None:
                                out.append((total3, steps))
        # Distinct chains, best first.
        out.sort(key=lambda x: x[0])
        seen: set[frozenset[Step]] = set()
        best: list[tuple[float, list[Step]]] = []
        losing = 0
        for total, steps in out:
            key = frozenset(steps)
            if key in seen or total >= -_EPS:
                continue
            seen.add(key)
            best.append((total, steps))
            if len(best) >= self.chains:
                break
        # Chains that lose on their own but free a host the next move fills, ranked with that move.
        hopeful = sorted(
            ((total + fill.get(steps[-1][0], 0.0), total, steps) for total, steps in out if total >= -_EPS),
            key=lambda x: x[0],
        )
        for est, total, steps in hopeful:
            if losing >= self.losing or est >= -_EPS:
                break
            key = frozenset(steps)
            if key in seen:
                continue
            seen.add(key)
            best.append((total, steps))
            losing += 1
        return best

    def _refill(
        self,
        ui: int,
        out_best: dict[int, float],
        table: list[tuple[float, int, int]],
        done: set[int],
        budget: int,
        cache: dict[int, float],
    ) -> float:
        """The best objective change (at most 0) of a move into ``ui``'s home once ``ui`` left it."""
        if ui in cache:
            return cache[ui]
        st = self.st
        s = self.home[ui]
        # Where ui would go does not matter much to the moves into s: its best target.
        away = min((d, t) for d, u, t in table if u == ui)[1]
        self.apply([(ui, away)])
        best = 0.0
        left = budget - self.size[ui]
        for uk, h in self.home.items():
            if uk == ui or uk in done or h == s or self.size[uk] > left:
                continue
            d = self.delta(uk, s)
            if d < best and st.blocked(uk, s) is None:
                best = d
        self.undo([(ui, away)])
        cache[ui] = best
        return best

    def _fits(self, h: int, leaving: int, coming: int) -> bool:
        """Whether ``coming`` fits on ``h`` (CPU, memory, GPUs) once ``leaving`` has left it."""
        st = self.st
        out = st.units[leaving].demand
        inn = st.units[coming].demand
        for r in (0, 1):
            if inn[r] > 0 and st.load[r][h] - out[r] + inn[r] > st.limit[r][h] + 1e-9:
                return False
        return inn[2] == 0 or st.load[2][h] - out[2] + inn[2] <= st.cap[2][h] + 1e-9

    def _sequence(self, steps: list[Step]) -> float | None:
        """Objective change of ``steps`` made in order, or None if one of them is blocked when its turn comes."""
        total = 0.0
        made: list[Step] = []
        for ui, t in steps:
            if self.st.blocked(ui, t) is not None:
                self.undo(made)
                return None
            total += self.delta(ui, t)
            self.apply([(ui, t)])
            made.append((ui, t))
        self.undo(made)
        return total


def search(
    p: _Planner,
    width: int = 8,
    singles: int = 8,
    chains: int = 6,
    max_work: int = 1_000_000,
    losing: int = 6,
) -> Result:
    """Best move sequence from ``p``'s current placement within its move budget (see the module doc).

    ``max_work`` bounds the moves scored (about a microsecond each): once passed, no
    more states are expanded and the best sequence so far is the answer.  ``losing``:
    make-room chains kept per state that lose on their own (see :meth:`_Search.make_room`).
    """
    s = _Search(p, singles, chains, losing)
    budget = p.budget_left()
    root_total, root_roll = s.rollout(set(), budget)
    best = Result(root_roll, root_total)
    if budget <= 0 or not s.home:
        best.rollouts = s.rollouts
        best.work = s.work
        return best
    # layers[k]: placement key -> (value after rollout, objective change so far, steps)
    layers: list[dict[frozenset[Step], tuple[float, float, list[Step]]]] = [{} for _ in range(budget + 1)]
    layers[0][frozenset()] = (root_total, 0.0, [])
    for k in range(budget):
        if not layers[k]:
            continue
        states = sorted(layers[k].values(), key=lambda x: x[0])[:width]
        layers[k] = {}
        for _value, so_far, steps in states:
            if s.work > max_work:
                break
            s.apply(steps)
            done = {ui for ui, _ in steps}
            left = budget - k
            table = s.scan(done, left)
            children: list[tuple[float, list[Step]]] = [
                (d, [(ui, t)]) for d, ui, t in s._feasible(sorted(x for x in table if x[0] < -_EPS), singles)
            ]
            children += s.make_room(table, done, left)
            for d, extra in children:
                n = k + s.moves_of(extra)
                if n > budget:
                    continue
                path = steps + extra
                key = frozenset(path)
                if key in layers[n]:
                    continue
                s.apply(extra)
                r_total, r_steps = s.rollout(done | {ui for ui, _ in extra}, budget - n)
                s.undo(extra)
                value = so_far + d + r_total
                layers[n][key] = (value, so_far + d, path)
                if value < best.delta - _EPS:
                    best = Result(path + r_steps, value)
            s.undo(steps)
    best.steps, best.delta = _pruned(s, best.steps, best.delta)
    best.rollouts = s.rollouts
    best.work = s.work
    return best


def _pruned(s: _Search, steps: list[Step], delta: float) -> tuple[list[Step], float]:
    """``steps`` less any step whose removal leaves a valid sequence with a better objective.

    A chain kept for what it frees may end up in the answer without the moves it
    freed room for; it then only costs moves.
    """
    improved = True
    while improved:
        improved = False
        for i in range(len(steps)):
            rest = steps[:i] + steps[i + 1 :]
            d = s._sequence(rest)
            if d is not None and d < delta - _EPS:
                steps, delta, improved = rest, d, True
                break
    return steps, delta
