"""DRS-style rebalancing planner: an ordered, explained plan of live migrations.

``plan(snapshot, settings)`` is pure: plain data in, a :class:`Plan` out, no I/O.

**Host load.**  For each host ``h`` and resource ``r`` (CPU, memory, and GPU when
some VM asks for GPUs), ``u[h, r] = (used by others + Σ demand of its VMs) /
capacity``.  CPU demand is a high percentile over a window (see
:mod:`cloudmon.rebalance.live`), memory is each VM's configured size.

**Imbalance.**  Over the *active* hosts (powered on, not in maintenance; for GPU
only those with GPUs), ``σ_r`` is the population standard deviation of
``u[·, r]`` and the cluster's imbalance is ``σ = sqrt(mean_r σ_r²)`` (the
quadratic mean of the per-resource standard deviations, 0 when every host is
equally loaded).

**Threshold.**  A balancing move is taken only when its improvement of
``n · σ²`` (``n`` active hosts: the host-load variance summed over hosts, which
does not shrink as the cluster grows) minus its score cost reaches
``MIN_GAIN[threshold]``; level 1 takes only mandatory moves (maintenance
evacuation, hard-rule violations).  Soft (``should``) rules add
``should_penalty`` per VM off its preferred hosts, and each second of migration
costs ``cost_weight``, in the same units.  ``Move.gain`` is the plain imbalance
delta ``σ_before − σ_after`` of that step.

**Migration cost.**  ``cost_s = memory / (link_rate − dirty_rate)`` (the
pre-copy rounds' geometric series); ``memory / link_rate`` when the dirty rate
is unknown; a VM dirtying memory faster than the link cannot converge and is
not moved.

**Solvers.**  ``exact`` is OR-Tools CP-SAT (``pip install cloudmon[planner]``) on
the same objective, seeded with the heuristic's answer; ``heuristic`` is
greedy best-improvement (every unit × every host on small clusters, only the
most/least loaded hosts on big ones) followed by a pairwise-swap pass; on
small clusters also an iterated local search and a beam search with greedy
rollouts over move sequences (:mod:`cloudmon.rebalance._beam`, up to
``_BEAM_MAX_PAIRS`` (unit, host) pairs), the best of them by the objective.
The beam search finds *chains*: a move that frees room (and may lose on its
own) followed by the moves it makes possible.  Such a chain is judged as one
step: together its moves must improve ``n·σ²`` by ``MIN_GAIN`` per move, or,
when it frees a host (a big VM leaving a host above its headroom), together
with the moves into that host after it.
``auto`` takes ``exact`` when OR-Tools is installed and the cluster has at most
``exact_max_pairs`` (VM, host) pairs, and says in ``Plan.notes`` when it fell back.

**Order and waves.**  Moves are listed in an order in which each is valid
after the ones before it: every target stays within its headroom at every step
(a host that starts above its headroom receives a VM only once enough of its own
VMs left it).  The exact solver bounds only the final placement; the planner
searches for such an order, parks a VM on a third host to break a cycle that has
none, and keeps the heuristic's plan when neither works.  ``wave`` groups moves
that may run at once (at most ``max_concurrent`` per wave); a move that needs
room freed by an earlier move is in a later wave.
"""

from __future__ import annotations

import copy
import heapq
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final, Literal

import msgspec

from cloudmon.rebalance.snapshot import ClusterSnapshot, PlanSettings, validate

__all__ = [
    "MIN_GAIN",
    "HostLoad",
    "HostUsage",
    "Move",
    "Plan",
    "PlanSettings",
    "Rejected",
    "imbalance",
    "plan",
]

#: Minimum improvement of ``n·σ²`` per balancing move, by migration threshold (1 = mandatory only).
MIN_GAIN: Final[dict[int, float]] = {1: math.inf, 2: 0.02, 3: 0.005, 4: 0.001, 5: 0.0001}

CPU: Final = 0
MEM: Final = 1
GPU: Final = 2
_RES_NAMES: Final = ("CPU", "memory", "GPU")
_EPS: Final = 1e-9
# Above this many (unit, host) pairs the heuristic looks only at the most/least loaded hosts.
_EXHAUSTIVE_PAIRS: Final = 20_000
_FAST_SOURCES: Final = 8
_FAST_TARGETS: Final = 24
_FAST_FEASIBLE: Final = 3
# The swap pass is quadratic in units: only on clusters this small.
_SWAP_MAX_UNITS: Final = 400
# The beam search (greedy rollouts from every state it keeps) only on clusters this small.
_BEAM_MAX_PAIRS: Final = 2_000
_BEAM_WIDTH: Final = 8
# Moves the beam search may score (≈ 1-2 µs each): bounds its time on long move budgets.
_BEAM_WORK: Final = 300_000
# States the ordering search of an exact placement may expand before it parks VMs instead.
_ORDER_NODES: Final = 2_000

Why = Literal["capacity", "rule", "too_small_gain", "pinned", "budget", "cost", "maintenance"]


class HostLoad(msgspec.Struct, frozen=True):
    """A host's load as shares of its capacity (``gpu`` is 0 on hosts without GPUs)."""

    cpu: float
    mem: float
    gpu: float = 0.0


class HostUsage(msgspec.Struct, frozen=True):
    """One host before and after the plan."""

    host: str
    before: HostLoad
    after: HostLoad
    active: bool
    vms_before: int
    vms_after: int


class Move(msgspec.Struct, frozen=True):
    """One live migration.  The executor needs only ``vm``, ``source``, ``target``, ``wave``, ``mandatory``."""

    vm: str
    source: str
    target: str
    #: Moves of one wave may run at once; wave ``i+1`` starts after wave ``i`` completed.
    wave: int
    #: Demanded by a rule or a host entering maintenance (not a balancing choice).
    mandatory: bool
    #: Why, with the numbers.
    reason: str
    #: Imbalance before minus after this step (positive = better balanced).
    gain: float
    #: Estimated live-migration time in seconds.
    cost_s: float
    source_before: HostLoad
    source_after: HostLoad
    target_before: HostLoad
    target_after: HostLoad


class Rejected(msgspec.Struct, frozen=True):
    """A move that was considered and not made, and why."""

    vm: str
    target: str | None
    why: str
    detail: str


class Plan(msgspec.Struct, frozen=True):
    """An ordered plan of moves with its predicted effect and what was rejected."""

    mode: str
    threshold: int
    automation: str
    #: ``exact`` or ``heuristic`` (what actually produced the moves).
    solver: str
    moves: list[Move]
    rejected: list[Rejected]
    imbalance_before: float
    imbalance_after: float
    hosts: list[HostUsage]
    #: Consolidation: hosts left empty that can be powered off.
    power_off: list[str]
    #: Hard-rule violations or evacuations the plan could not fix.
    unresolved: list[str]
    notes: list[str]
    elapsed_s: float

    @property
    def waves(self) -> int:
        """Number of waves."""
        return max((m.wave for m in self.moves), default=-1) + 1


@dataclass(slots=True)
class _Unit:
    """VMs that move together (an affinity group, or one VM)."""

    members: list[int]
    demand: list[float]
    pinned: bool
    cost_s: float
    # Hosts its members may run on (must / must-not rules); None = any.
    allowed: set[int] | None = None
    # Per member: (preferred hosts or None, avoided hosts or None) from should rules.
    soft: list[tuple[set[int] | None, set[int] | None]] = field(default_factory=list)
    conflicts: set[int] = field(default_factory=set)
    conflict_rules: dict[int, str] = field(default_factory=dict)
    moved: bool = False


@dataclass(slots=True)
class _Rec:
    vm: int
    source: int
    target: int
    mandatory: bool
    reason: str
    gain: float
    cost_s: float
    sb: HostLoad
    sa: HostLoad
    tb: HostLoad
    ta: HostLoad


class _State:
    """Mutable placement with O(1) score deltas (sums of u and u² per resource)."""

    def __init__(self, snap: ClusterSnapshot, s: PlanSettings) -> None:
        self.snap = snap
        self.settings = s
        self.hnames = [h.name for h in snap.hosts]
        hidx = {n: i for i, n in enumerate(self.hnames)}
        self.hidx = hidx
        nh = len(self.hnames)
        self.active = [h.powered_on and not h.maintenance for h in snap.hosts]
        self.cap = [
            [h.cpu_cores for h in snap.hosts],
            [h.memory_mib for h in snap.hosts],
            [float(h.gpus) for h in snap.hosts],
        ]
        self.limit = [
            [h.cpu_cores * s.headroom for h in snap.hosts],
            [h.memory_mib * s.headroom for h in snap.hosts],
            [float(h.gpus) for h in snap.hosts],
        ]
        self.load = [
            [h.cpu_used_other for h in snap.hosts],
            [h.memory_used_other_mib for h in snap.hosts],
            [0.0] * nh,
        ]
        self.vnames = [v.name for v in snap.vms]
        self.vidx = {n: i for i, n in enumerate(self.vnames)}
        self.vdemand = [[v.cpu_demand_cores, v.memory_mib, float(v.gpus)] for v in snap.vms]
        self.vhost = [hidx[v.host] for v in snap.vms]
        self.vcost = [_cost_s(v.memory_mib, v.dirty_rate_mibps, s.link_rate_mibps) for v in snap.vms]
        for i, h in enumerate(self.vhost):
            for r in (CPU, MEM, GPU):
                self.load[r][h] += self.vdemand[i][r]
        self.vms_on: list[set[int]] = [set() for _ in range(nh)]
        for i, h in enumerate(self.vhost):
            self.vms_on[h].add(i)
        self.initial_vhost = list(self.vhost)
        self.initial_load = [list(x) for x in self.load]
        # Resources in the score: GPU only when some VM asks for one and some active host has one.
        want_gpu = any(v.gpus for v in snap.vms) and any(
            self.cap[GPU][h] > 0 and self.active[h] for h in range(nh)
        )
        self.res = [CPU, MEM, GPU] if want_gpu else [CPU, MEM]
        self.counted = [[self.active[h] and self.cap[r][h] > 0 for h in range(nh)] for r in (CPU, MEM, GPU)]
        self.n = sum(self.active)
        self.nr = [sum(c) for c in self.counted]
        self.w = [0.0, 0.0, 0.0]
        for r in self.res:
            if self.nr[r]:
                self.w[r] = self.n / (self.nr[r] * len(self.res))
        self._resum()
        self._build_units()

    # -- score -------------------------------------------------------------
    def _resum(self) -> None:
        self.s1 = [0.0, 0.0, 0.0]
        self.s2 = [0.0, 0.0, 0.0]
        for r in self.res:
            for h in range(len(self.hnames)):
                if self.counted[r][h]:
                    u = self.load[r][h] / self.cap[r][h]
                    self.s1[r] += u
                    self.s2[r] += u * u

    def variance_score(self) -> float:
        """``n·σ²`` of the current placement."""
        total = 0.0
        for r in self.res:
            if self.nr[r]:
                total += self.w[r] * (self.s2[r] - self.s1[r] ** 2 / self.nr[r])
        return max(total, 0.0)

    def imbalance(self) -> float:
        return math.sqrt(self.variance_score() / self.n) if self.n else 0.0

    def hostload(self, h: int) -> HostLoad:
        c = self.cap
        ld = self.load
        return HostLoad(
            cpu=ld[CPU][h] / c[CPU][h],
            mem=ld[MEM][h] / c[MEM][h],
            gpu=ld[GPU][h] / c[GPU][h] if c[GPU][h] > 0 else 0.0,
        )

    def pressure(self, h: int) -> float:
        """How far above the mean a host is (weighted over resources)."""
        p = 0.0
        for r in self.res:
            if self.counted[r][h]:
                p += self.w[r] * (self.load[r][h] / self.cap[r][h] - self.s1[r] / self.nr[r])
        return p

    def var_delta(self, d: list[float], s: int, t: int) -> float:
        """Change of ``n·σ²`` when demand ``d`` moves from host ``s`` to host ``t``."""
        total = 0.0
        for r in self.res:
            dr = d[r]
            if dr == 0.0:
                continue
            ds1 = 0.0
            ds2 = 0.0
            if self.counted[r][s]:
                c = self.cap[r][s]
                u = self.load[r][s] / c
                a = dr / c
                ds1 -= a
                ds2 += a * (a - 2 * u)
            if self.counted[r][t]:
                c = self.cap[r][t]
                u = self.load[r][t] / c
                b = dr / c
                ds1 += b
                ds2 += b * (b + 2 * u)
            s1 = self.s1[r]
            total += self.w[r] * (ds2 - ((s1 + ds1) ** 2 - s1 * s1) / self.nr[r])
        return total

    def soft_viol(self, v: int, h: int) -> int:
        pref, avoid = self.vsoft[v]
        bad = 0
        if pref is not None and h not in pref:
            bad += 1
        if avoid is not None and h in avoid:
            bad += 1
        return bad

    # -- units and rules ---------------------------------------------------
    def _build_units(self) -> None:
        snap = self.snap
        nv = len(self.vnames)
        parent = list(range(nv))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        self.vallowed: list[set[int] | None] = [None] * nv
        self.vallowed_rule: list[str] = [""] * nv
        self.vsoft: list[tuple[set[int] | None, set[int] | None]] = [(None, None)] * nv
        anti: list[tuple[str, list[int]]] = []
        self.affinity_rules: list[tuple[str, list[int]]] = []
        for rule in snap.rules:
            vs = [self.vidx[n] for n in rule.vms]
            hs = {self.hidx[n] for n in rule.hosts}
            if rule.kind == "affinity":
                self.affinity_rules.append((rule.name, vs))
                for v in vs[1:]:
                    parent[find(v)] = find(vs[0])
            elif rule.kind == "anti_affinity":
                anti.append((rule.name, vs))
            elif rule.kind in ("must_run_on", "must_not_run_on"):
                ok = hs if rule.kind == "must_run_on" else set(range(len(self.hnames))) - hs
                for v in vs:
                    cur = self.vallowed[v]
                    self.vallowed[v] = ok if cur is None else cur & ok
                    self.vallowed_rule[v] = (
                        self.vallowed_rule[v] + ", " if self.vallowed_rule[v] else ""
                    ) + (f"{rule.name!r} ({rule.kind})")
            else:
                for v in vs:
                    pref, avoid = self.vsoft[v]
                    if rule.kind == "should_run_on":
                        pref = hs if pref is None else pref & hs
                    else:
                        avoid = hs if avoid is None else avoid | hs
                    self.vsoft[v] = (pref, avoid)
        groups: dict[int, list[int]] = {}
        for v in range(nv):
            groups.setdefault(find(v), []).append(v)
        self.units: list[_Unit] = []
        self.vunit = [0] * nv
        for members in groups.values():
            allowed: set[int] | None = None
            for v in members:
                a = self.vallowed[v]
                if a is not None:
                    allowed = set(a) if allowed is None else allowed & a
            ui = len(self.units)
            self.units.append(
                _Unit(
                    members=members,
                    demand=[sum(self.vdemand[v][r] for v in members) for r in (CPU, MEM, GPU)],
                    pinned=any(snap.vms[v].pinned for v in members),
                    cost_s=sum(self.vcost[v] for v in members),
                    allowed=allowed,
                    soft=[self.vsoft[v] for v in members],
                )
            )
            for v in members:
                self.vunit[v] = ui
        for name, vs in anti:
            us = [self.vunit[v] for v in vs]
            for ua in us:
                for ub in us:
                    if ua != ub:
                        self.units[ua].conflicts.add(ub)
                        self.units[ua].conflict_rules.setdefault(ub, name)
        self.units_on: list[set[int]] = [set() for _ in self.hnames]
        for ui, u in enumerate(self.units):
            for v in u.members:
                self.units_on[self.vhost[v]].add(ui)

    def unit_host(self, ui: int) -> int:
        """The unit's host, or -1 when its members are split over several hosts."""
        hs = {self.vhost[v] for v in self.units[ui].members}
        return hs.pop() if len(hs) == 1 else -1

    def blocked(self, ui: int, t: int, d: list[float] | None = None) -> tuple[Why, str] | None:
        """Why unit ``ui`` (or its part with demand ``d``) cannot go to host ``t`` now; None if it can."""
        u = self.units[ui]
        name = self.hnames[t]
        if not self.active[t]:
            why: Why = "maintenance"
            state = "is in maintenance" if self.snap.hosts[t].maintenance else "is powered off"
            return why, f"host {name!r} {state}"
        if u.allowed is not None and t not in u.allowed:
            v = next(v for v in u.members if (self.vallowed[v] is not None and t not in self.vallowed[v]))  # type: ignore[operator]
            return "rule", f"host {name!r} is not allowed by rule {self.vallowed_rule[v]}"
        clash = u.conflicts & self.units_on[t]
        if clash:
            other = min(clash)
            ov = self.units[other].members[0]
            return "rule", (
                f"anti-affinity rule {u.conflict_rules[other]!r}: VM {self.vnames[ov]!r} runs on {name!r}"
            )
        dd = u.demand if d is None else d
        for r in (CPU, MEM):
            if dd[r] > 0 and self.load[r][t] + dd[r] > self.limit[r][t] + _EPS:
                return "capacity", (
                    f"{_RES_NAMES[r]} on {name!r} would reach "
                    f"{(self.load[r][t] + dd[r]) / self.cap[r][t]:.0%} > headroom {self.settings.headroom:.0%}"
                )
        if dd[GPU] > 0 and self.load[GPU][t] + dd[GPU] > self.cap[GPU][t] + _EPS:
            free = self.cap[GPU][t] - self.load[GPU][t]
            return "capacity", f"{name!r} has {free:.0f} free GPUs, {dd[GPU]:.0f} needed"
        return None

    # -- moving ------------------------------------------------------------
    def move_vm(self, v: int, t: int) -> None:
        s = self.vhost[v]
        d = self.vdemand[v]
        for r in (CPU, MEM, GPU):
            dr = d[r]
            if dr == 0.0:
                continue
            if r in self.res:
                for h, sign in ((s, -1.0), (t, 1.0)):
                    if self.counted[r][h]:
                        c = self.cap[r][h]
                        u0 = self.load[r][h] / c
                        u1 = (self.load[r][h] + sign * dr) / c
                        self.s1[r] += u1 - u0
                        self.s2[r] += u1 * u1 - u0 * u0
            self.load[r][s] -= dr
            self.load[r][t] += dr
        self.vhost[v] = t
        self.vms_on[s].discard(v)
        self.vms_on[t].add(v)
        ui = self.vunit[v]
        if not any(self.vhost[m] == s for m in self.units[ui].members):
            self.units_on[s].discard(ui)
        self.units_on[t].add(ui)


def _cost_s(mem_mib: float, dirty: float | None, link: float) -> float:
    if dirty is None:
        return mem_mib / link
    if dirty >= link:
        return math.inf
    return mem_mib / (link - dirty)


def _pct(x: HostLoad) -> str:
    return f"CPU {x.cpu:.0%}, memory {x.mem:.0%}" + (f", GPU {x.gpu:.0%}" if x.gpu else "")


class _Planner:
    def __init__(self, snap: ClusterSnapshot, settings: PlanSettings) -> None:
        self.st = _State(snap, settings)
        self.s = settings
        self.recs: list[_Rec] = []
        self.rejected: list[Rejected] = []
        self.unresolved: list[str] = []
        self.notes: list[str] = []
        self.power_off: list[str] = []
        self.min_gain = MIN_GAIN[settings.threshold]
        #: Intermediate moves :meth:`apply_assignment` made (VMs parked to break a cycle).
        self.detours = 0

    # -- recording ---------------------------------------------------------
    def reject(self, v: int, t: int | None, why: str, detail: str) -> None:
        if len(self.rejected) < self.s.max_rejected:
            self.rejected.append(
                Rejected(self.st.vnames[v], None if t is None else self.st.hnames[t], why, detail)
            )

    def budget_left(self) -> int:
        return self.s.max_moves - len(self.recs)

    def do_unit(self, ui: int, t: int, mandatory: bool, why: str) -> None:
        """Move every member of unit ``ui`` that is not on ``t`` there, recording each step."""
        st = self.st
        for v in st.units[ui].members:
            if st.vhost[v] != t:
                self.do_vm(v, t, mandatory, why)
        st.units[ui].moved = True

    def do_vm(self, v: int, t: int, mandatory: bool, why: str) -> None:
        st = self.st
        s = st.vhost[v]
        sb, tb = st.hostload(s), st.hostload(t)
        before = st.imbalance()
        st.move_vm(v, t)
        after = st.imbalance()
        sa, ta = st.hostload(s), st.hostload(t)
        d = st.vdemand[v]
        what = f"{st.vnames[v]!r} ({d[CPU]:.2f} cores, {d[MEM]:.0f} MiB" + (
            f", {d[GPU]:.0f} GPU)" if d[GPU] else ")"
        )
        reason = (
            f"{why}: move {what} from {st.hnames[s]!r} ({_pct(sb)} → {_pct(sa)}) to "
            f"{st.hnames[t]!r} ({_pct(tb)} → {_pct(ta)}); cluster imbalance {before:.4f} → {after:.4f}, "
            f"about {st.vcost[v]:.1f} s to migrate"
        )
        self.recs.append(_Rec(v, s, t, mandatory, reason, before - after, st.vcost[v], sb, sa, tb, ta))

    def undo_to(self, n: int) -> None:
        """Take back the recorded moves after the first ``n`` (tentative consolidation)."""
        st = self.st
        while len(self.recs) > n:
            rec = self.recs.pop()
            st.move_vm(rec.vm, rec.source)

    # -- scoring -----------------------------------------------------------
    def unit_gain(self, ui: int, s: int, t: int) -> float:
        """Score improvement (``n·σ²`` units, positive = better) of moving whole unit ``ui`` s→t."""
        st = self.st
        u = st.units[ui]
        g = -st.var_delta(u.demand, s, t)
        if self.s.should_penalty:
            dv = 0
            for v in u.members:
                dv += st.soft_viol(v, t) - st.soft_viol(v, s)
            g -= self.s.should_penalty * dv
        return g - self.s.cost_weight * u.cost_s

    # -- mandatory ---------------------------------------------------------
    def mandatory(self) -> None:
        st = self.st
        for ui, u in enumerate(st.units):
            h = st.unit_host(ui)
            problem = self._placement_problem(ui, h)
            if problem is None:
                continue
            if u.pinned:
                self.unresolved.append(f"{problem}, but it is pinned; unpin it or fix the rule")
                for v in u.members:
                    self.reject(v, None, "pinned", problem)
                continue
            self._fix(ui, problem)
        # Anti-affinity: units sharing a host with a conflicting unit (checked after the moves above).
        for ui, u in enumerate(st.units):
            h = st.unit_host(ui)
            if h < 0:
                continue
            clash = sorted(c for c in u.conflicts & st.units_on[h] if c != ui)
            if not clash:
                continue
            # Move the cheaper of the two (the other stays); skip pinned units.
            other = clash[0]
            mover = ui
            if u.pinned or (not st.units[other].pinned and st.units[other].cost_s < u.cost_s):
                mover = other
            if st.units[mover].pinned:
                self.unresolved.append(
                    f"anti-affinity rule {u.conflict_rules[other]!r}: VMs "
                    f"{st.vnames[u.members[0]]!r} and {st.vnames[st.units[other].members[0]]!r} share "
                    f"{st.hnames[h]!r} and both are pinned"
                )
                continue
            rule = st.units[mover].conflict_rules.get(ui if mover == other else other, "")
            self._fix(mover, f"anti-affinity rule {rule!r} is violated on {st.hnames[h]!r}")

    def _placement_problem(self, ui: int, h: int) -> str | None:
        st = self.st
        u = st.units[ui]
        first = st.vnames[u.members[0]]
        if h < 0:
            rule = next(n for n, vs in st.affinity_rules if any(st.vunit[v] == ui for v in vs))
            return f"affinity rule {rule!r} is violated: its VMs run on several hosts"
        if not st.active[h]:
            state = "entering maintenance" if st.snap.hosts[h].maintenance else "powered off"
            return f"host {st.hnames[h]!r} is {state}"
        if u.allowed is not None and h not in u.allowed:
            v = next(v for v in u.members if st.vallowed[v] is not None and h not in st.vallowed[v])  # type: ignore[operator]
            return f"VM {first!r} runs on {st.hnames[h]!r}, against rule {st.vallowed_rule[v]}"
        return None

    def _fix(self, ui: int, problem: str) -> None:
        st = self.st
        u = st.units[ui]
        h = st.unit_host(ui)
        best: tuple[float, int] | None = None
        reasons: list[tuple[Why, str]] = []
        for t in range(len(st.hnames)):
            if t == h:
                continue
            moving = [v for v in u.members if st.vhost[v] != t]
            d = [sum(st.vdemand[v][r] for v in moving) for r in (CPU, MEM, GPU)]
            b = st.blocked(ui, t, d)
            if b is not None:
                reasons.append(b)
                continue
            if len(moving) > self.budget_left():
                reasons.append(("budget", f"{len(moving)} moves needed, {self.budget_left()} left"))
                continue
            score = 0.0
            # Score as sequential member moves (split affinity groups have several sources).
            for v in moving:
                score += st.var_delta(st.vdemand[v], st.vhost[v], t)
            score += self.s.cost_weight * sum(st.vcost[v] for v in moving)
            if best is None or score < best[0]:
                best = (score, t)
        if best is None:
            why, detail = _summarise(reasons)
            self.unresolved.append(f"{problem}: no host can take VM {st.vnames[u.members[0]]!r} ({detail})")
            for v in u.members:
                self.reject(v, None, why, f"{problem}; {detail}")
            return
        self.do_unit(ui, best[1], True, problem)

    # -- balance -----------------------------------------------------------
    def balance(self) -> None:
        st = self.st
        if self.s.threshold == 1 or st.n < 2:
            return
        exhaustive = len(st.units) * st.n <= _EXHAUSTIVE_PAIRS
        stop = "gain"
        while True:
            best = self._best_single(exhaustive)
            swap = None
            if best is None or best[0] < self.min_gain:
                if exhaustive and len(st.units) <= _SWAP_MAX_UNITS and self.budget_left() >= 2:
                    swap = self._best_swap()
                if swap is None:
                    stop = "gain"
                    break
                if best is not None and best[0] * 2 >= swap[0]:
                    swap = None
            if swap is not None:
                _g, ua, ub, first = swap
                a_host, b_host = st.unit_host(ua), st.unit_host(ub)
                order = [(ua, b_host), (ub, a_host)] if first == ua else [(ub, a_host), (ua, b_host)]
                for ui, t in order:
                    self.do_unit(ui, t, False, self._why_balance())
                continue
            assert best is not None
            g, ui, _s, t = best
            if len(st.units[ui].members) > self.budget_left():
                stop = "budget"
                for v in st.units[ui].members:
                    self.reject(
                        v,
                        t,
                        "budget",
                        f"max_moves={self.s.max_moves} reached (gain {g:.4f} left on the table)",
                    )
                break
            self.do_unit(ui, t, False, self._why_balance())
        self._explain(stop)

    def _why_balance(self) -> str:
        return f"balance (threshold {self.s.threshold}: each move improves n·σ² by ≥ {self.min_gain:g})"

    def _candidates(self, exhaustive: bool) -> Iterator[tuple[int, int, list[int]]]:
        """(unit, its host, targets to try) for movable whole units."""
        st = self.st
        hosts = [h for h in range(len(st.hnames)) if st.active[h]]
        if exhaustive:
            for ui, u in enumerate(st.units):
                if u.pinned or u.moved or math.isinf(u.cost_s):
                    continue
                s = st.unit_host(ui)
                if s >= 0:
                    yield ui, s, hosts
            return
        pressure = {h: st.pressure(h) for h in hosts}
        sources = heapq.nlargest(_FAST_SOURCES, hosts, key=pressure.__getitem__)
        targets = heapq.nsmallest(_FAST_TARGETS, hosts, key=pressure.__getitem__)
        for s in sources:
            for ui in st.units_on[s]:
                u = st.units[ui]
                if u.pinned or u.moved or math.isinf(u.cost_s) or st.unit_host(ui) != s:
                    continue
                yield ui, s, targets

    def _best_single(self, exhaustive: bool) -> tuple[float, int, int, int] | None:
        st = self.st
        best: tuple[float, int, int, int] | None = None
        budget = self.budget_left()
        for ui, s, targets in self._candidates(exhaustive):
            if len(st.units[ui].members) > budget and budget > 0:
                continue
            feasible = 0
            for t in targets:
                if t == s:
                    continue
                g = self.unit_gain(ui, s, t)
                if best is not None and g <= best[0]:
                    # Cheaper than a feasibility check; on the fast path still count it as a try.
                    if not exhaustive and st.blocked(ui, t) is None:
                        feasible += 1
                        if feasible >= _FAST_FEASIBLE:
                            break
                    continue
                if st.blocked(ui, t) is not None:
                    continue
                best = (g, ui, s, t)
                feasible += 1
                if not exhaustive and feasible >= _FAST_FEASIBLE:
                    break
        return best

    def _best_swap(self) -> tuple[float, int, int, int] | None:
        """Best exchange of two unmoved units between two hosts (two moves), with a valid order."""
        st = self.st
        movable = []
        for ui, u in enumerate(st.units):
            h = st.unit_host(ui)
            if h >= 0 and st.active[h] and not (u.pinned or u.moved or math.isinf(u.cost_s)):
                movable.append((ui, h))
        best: tuple[float, int, int, int] | None = None
        for i, (ua, ha) in enumerate(movable):
            for ub, hb in movable[i + 1 :]:
                if ha == hb or len(st.units[ua].members) + len(st.units[ub].members) > self.budget_left():
                    continue
                ga = self.unit_gain(ua, ha, hb)
                # Try "a first" then "b first"; the second step is scored in the state after the first.
                for first, fh, second, sh in ((ua, ha, ub, hb), (ub, hb, ua, ha)):
                    g1 = ga if first == ua else self.unit_gain(ub, hb, ha)
                    if st.blocked(first, sh) is not None:
                        continue
                    mark = len(self.recs)
                    for v in st.units[first].members:
                        st.move_vm(v, sh)
                    ok = st.blocked(second, fh) is None
                    g2 = self.unit_gain(second, sh, fh) if ok else -math.inf
                    for v in st.units[first].members:
                        st.move_vm(v, fh)
                    assert len(self.recs) == mark
                    if not ok:
                        continue
                    g = g1 + g2
                    if g >= 2 * self.min_gain and g1 >= -self.min_gain and (best is None or g > best[0]):
                        best = (g, ua, ub, first)
                    break
        return best

    def _explain(self, stop: str) -> None:
        """List the best moves not made around the most loaded hosts, and why not."""
        st = self.st
        hosts = [h for h in range(len(st.hnames)) if st.active[h]]
        if not hosts:
            return
        sources = heapq.nlargest(3, hosts, key=st.pressure)
        seen = 0
        for s in sources:
            for ui in sorted(st.units_on[s], key=lambda x: -sum(st.units[x].demand[:2])):
                if seen >= 10 or len(self.rejected) >= self.s.max_rejected:
                    return
                u = st.units[ui]
                v = u.members[0]
                if u.pinned:
                    self.reject(v, None, "pinned", f"pinned on {st.hnames[s]!r}, the most loaded hosts")
                    seen += 1
                    continue
                if u.moved or st.unit_host(ui) != s:
                    continue
                if math.isinf(u.cost_s):
                    self.reject(
                        v, None, "cost", "dirties memory faster than the link: migration would not converge"
                    )
                    seen += 1
                    continue
                ranked = sorted((t for t in hosts if t != s), key=lambda t: -self.unit_gain(ui, s, t))[:1]
                for t in ranked:
                    g = self.unit_gain(ui, s, t)
                    b = st.blocked(ui, t)
                    if b is not None:
                        self.reject(v, t, b[0], b[1])
                    elif stop == "budget":
                        continue
                    else:
                        self.reject(
                            v,
                            t,
                            "too_small_gain",
                            f"improvement {g:.5f} < {self.min_gain:g} (threshold {self.s.threshold})",
                        )
                    seen += 1

    # -- local search --------------------------------------------------------
    def _origin(self, ui: int) -> int:
        hs = {self.st.initial_vhost[v] for v in self.st.units[ui].members}
        return hs.pop() if len(hs) == 1 else -1

    def _move_term(self, ui: int, moved: bool, mandatory: bool) -> float:
        if not moved:
            return 0.0
        lam = 0.0 if mandatory else self.min_gain
        return lam + self.s.cost_weight * self.st.units[ui].cost_s

    def _delta_obj(self, ui: int, s: int, t: int, origin: int, mandatory: bool) -> float:
        """Change of the placement objective when unit ``ui`` goes from ``s`` to ``t``."""
        st = self.st
        u = st.units[ui]
        d = st.var_delta(u.demand, s, t)
        if self.s.should_penalty:
            d += self.s.should_penalty * sum(st.soft_viol(v, t) - st.soft_viol(v, s) for v in u.members)
        return d + self._move_term(ui, t != origin, mandatory) - self._move_term(ui, s != origin, mandatory)

    def improve(self, max_rounds: int = 200) -> bool:
        """Local search on the placement the greedy pass reached (same objective, same move budget).

        Greedy best-improvement commits to its first moves; with a move budget the
        optimum often spends them differently.  Neighbourhood: send a unit to another
        host (or back home, which returns a move to the budget), and "exchange":
        send a moved unit home and move another unit instead.  Only improving steps
        are taken, so this ends; the planner then orders the resulting placement.
        """
        st = self.st
        hosts = [h for h in range(len(st.hnames)) if st.active[h]]
        mandatory = _mandatory_vms(type(self)(st.snap, self.s))
        info: list[tuple[int, int, bool]] = []  # (unit, origin, mandatory) of movable units
        for ui, u in enumerate(st.units):
            o = self._origin(ui)
            if u.pinned or math.isinf(u.cost_s) or o < 0:
                continue
            info.append((ui, o, any(v in mandatory for v in u.members)))

        def used() -> int:
            return sum(1 for v in range(len(st.vnames)) if st.vhost[v] != st.initial_vhost[v])

        def best_single(budget: int) -> tuple[float, int, int] | None:
            best: tuple[float, int, int] | None = None
            for ui, o, mand in info:
                s = st.unit_host(ui)
                size = len(st.units[ui].members)
                for t in hosts:
                    if t == s:
                        continue
                    extra = (size if s == o else 0) - (size if t == o else 0)
                    if extra > budget:
                        continue
                    d = self._delta_obj(ui, s, t, o, mand)
                    if (best is None or d < best[0]) and st.blocked(ui, t) is None:
                        best = (d, ui, t)
            return best

        movable_units = {ui: (o, mand) for ui, o, mand in info}

        def extra(ui: int, s: int, t: int) -> int:
            o = movable_units[ui][0]
            size = len(st.units[ui].members)
            return (size if s == o else 0) - (size if t == o else 0)

        def best_chain(budget: int) -> tuple[float, list[tuple[int, int]]] | None:
            """Make room, then move: a unit blocked by capacity on ``t`` after another unit leaves ``t``."""
            wanted: list[tuple[float, int, int, int]] = []
            for ui, o, mand in info:
                s = st.unit_host(ui)
                for t in hosts:
                    if t == s or extra(ui, s, t) > budget:
                        continue
                    d = self._delta_obj(ui, s, t, o, mand)
                    if d < 0:
                        b = st.blocked(ui, t)
                        if b is not None and b[0] == "capacity":
                            wanted.append((d, ui, s, t))
            best: tuple[float, list[tuple[int, int]]] | None = None
            for _d, ui, s, t in heapq.nsmallest(8, wanted):
                o, mand = movable_units[ui]
                for uj in list(st.units_on[t]):
                    if uj == ui or uj not in movable_units or st.unit_host(uj) != t:
                        continue
                    oj, mj = movable_units[uj]
                    for t2 in hosts:
                        if t2 in (t, s) or extra(uj, t, t2) + extra(ui, s, t) > budget:
                            continue
                        if st.blocked(uj, t2) is not None:
                            continue
                        d1 = self._delta_obj(uj, t, t2, oj, mj)
                        for v in st.units[uj].members:
                            st.move_vm(v, t2)
                        if st.blocked(ui, t) is None:
                            total = d1 + self._delta_obj(ui, s, t, o, mand)
                            if best is None or total < best[0]:
                                best = (total, [(uj, t2), (ui, t)])
                        for v in st.units[uj].members:
                            st.move_vm(v, t)
            return best

        changed = False
        for _ in range(max_rounds):
            budget = self.s.max_moves - used()
            step = best_single(budget)
            best: tuple[float, list[tuple[int, int]]] | None = None
            if step is not None and step[0] < -1e-12:
                best = (step[0], [(step[1], step[2])])
            # Exchange: undo one balancing move, then the best single step from there.
            for ui, o, mand in info:
                s = st.unit_host(ui)
                if s == o or mand or st.blocked(ui, o) is not None:
                    continue
                d0 = self._delta_obj(ui, s, o, o, mand)
                for v in st.units[ui].members:
                    st.move_vm(v, o)
                nxt = best_single(budget + len(st.units[ui].members))
                for v in st.units[ui].members:
                    st.move_vm(v, s)
                if nxt is not None and d0 + nxt[0] < -1e-12 and (best is None or d0 + nxt[0] < best[0]):
                    best = (d0 + nxt[0], [(ui, o), (nxt[1], nxt[2])])
            chain = best_chain(budget)
            if chain is not None and chain[0] < -1e-12 and (best is None or chain[0] < best[0]):
                best = chain
            if best is None:
                break
            for uj, t in best[1]:
                for v in st.units[uj].members:
                    st.move_vm(v, t)
            changed = True
        return changed

    def placement_obj(self, mandatory: set[int]) -> float:
        """The objective of the current placement (what :meth:`improve` lowers)."""
        st = self.st
        total = st.variance_score()
        if self.s.should_penalty:
            total += self.s.should_penalty * sum(st.soft_viol(v, st.vhost[v]) for v in range(len(st.vnames)))
        for ui, u in enumerate(st.units):
            if any(st.vhost[v] != st.initial_vhost[v] for v in u.members):
                total += self._move_term(ui, True, any(v in mandatory for v in u.members))
        return total

    def search(self, restarts: int, seed: int = 0) -> bool:
        """Iterated local search: perturb the best placement, descend again, keep the best.

        Deterministic (a seeded generator), bounded by ``restarts``.
        """
        st = self.st
        rng = random.Random(seed)
        mandatory = _mandatory_vms(type(self)(st.snap, self.s))
        changed = self.improve()
        best_obj = self.placement_obj(mandatory)
        best = list(st.vhost)
        hosts = [h for h in range(len(st.hnames)) if st.active[h]]
        movable = [
            ui
            for ui, u in enumerate(st.units)
            if not (u.pinned or math.isinf(u.cost_s) or self._origin(ui) < 0)
            and not any(v in mandatory for v in u.members)
        ]
        if not movable or len(hosts) < 2:
            return changed
        for i in range(restarts):
            if i % 3 == 0:
                # Every third round starts over from the snapshot's placement (greedy's first
                # choices may be the wrong ones to spend a small move budget on).
                # Mandatory moves stay made.
                for v in range(len(st.vnames)):
                    if st.vhost[v] != st.initial_vhost[v] and v not in mandatory:
                        st.move_vm(v, st.initial_vhost[v])
            for k in rng.sample(movable, min(len(movable), 3)):
                o = self._origin(k)
                s = st.unit_host(k)
                t = o if s != o else rng.choice(hosts)
                used = sum(1 for v in range(len(st.vnames)) if st.vhost[v] != st.initial_vhost[v])
                grow = len(st.units[k].members) if (s == o and t != o) else 0
                if t != s and used + grow <= self.s.max_moves and st.blocked(k, t) is None:
                    for v in st.units[k].members:
                        st.move_vm(v, t)
            self.improve()
            obj = self.placement_obj(mandatory)
            if obj < best_obj - 1e-12:
                best_obj, best, changed = obj, list(st.vhost), True
            else:
                for v in range(len(st.vnames)):
                    if st.vhost[v] != best[v]:
                        st.move_vm(v, best[v])
        return changed

    # -- consolidation -----------------------------------------------------
    def consolidate(self) -> None:
        st = self.st
        if self.s.threshold == 1:
            self.notes.append("threshold 1: consolidation moves are not mandatory, none made")
            return
        on = {h for h in range(len(st.hnames)) if st.active[h]}

        def fill(h: int) -> float:
            return sum(st.load[r][h] / st.cap[r][h] for r in (CPU, MEM))

        order = sorted(on, key=lambda h: (len(st.units_on[h]), fill(h)))
        for h in order:
            if len(on) <= 1:
                break
            units = sorted(st.units_on[h], key=lambda x: -sum(st.units[x].demand[:2]))
            if not units:
                on.discard(h)
                self.power_off.append(st.hnames[h])
                continue
            pinned = [ui for ui in units if st.units[ui].pinned]
            if pinned:
                self.reject(
                    st.units[pinned[0]].members[0], None, "pinned", f"keeps {st.hnames[h]!r} powered on"
                )
                continue
            need = sum(len(st.units[ui].members) for ui in units)
            if need > self.budget_left():
                self.reject(
                    st.units[units[0]].members[0],
                    None,
                    "budget",
                    f"emptying {st.hnames[h]!r} needs {need} moves, {self.budget_left()} left",
                )
                continue
            mark = len(self.recs)
            failed: tuple[int, tuple[Why, str]] | None = None
            for ui in units:
                best: tuple[float, int] | None = None
                last: tuple[Why, str] = ("capacity", "no other host is on")
                for t in on:
                    if t == h:
                        continue
                    b = st.blocked(ui, t)
                    if b is not None:
                        last = b
                        continue
                    # Best fit: the fullest host that still takes it packs tightest.
                    key = -max((st.load[r][t] + st.units[ui].demand[r]) / st.limit[r][t] for r in (CPU, MEM))
                    if best is None or key < best[0]:
                        best = (key, t)
                if best is None:
                    failed = (ui, last)
                    break
                self.do_unit(
                    ui, best[1], False, f"consolidate: empty {st.hnames[h]!r} so it can be powered off"
                )
            if failed is not None:
                self.undo_to(mark)
                for ui in units:
                    st.units[ui].moved = False
                fu, (why, detail) = failed
                self.reject(
                    st.units[fu].members[0], None, why, f"{st.hnames[h]!r} cannot be emptied: {detail}"
                )
                continue
            on.discard(h)
            self.power_off.append(st.hnames[h])

    # -- exact ---------------------------------------------------------------
    def apply_assignment(self, target: list[int], mandatory_vms: set[int]) -> bool:
        """Reach a placement (from the exact solver) through valid single steps.

        The target only promises that every host's *final* load fits; the steps are
        ordered so that each one fits when it is made (a host above its headroom
        receives only after enough of its VMs left).  Returns True when the placement
        was reached; ``self.detours`` counts the intermediate moves it took (a VM
        parked on a third host to break a cycle of moves that needs temporary room).  False: some moves could not be
        made (listed as rejected) and the plan stops short of the target.
        """
        st = self.st
        pending = {v for v, t in enumerate(target) if st.vhost[v] != t}
        order, _complete = self._order(pending, target)
        if order is not None and len(order) <= self.budget_left():
            for v in order:
                why = self._violation_now(v) if v in mandatory_vms else None
                self.do_vm(v, target[v], why is not None, why or self._why_balance())
            pending.clear()
        while pending:
            best: tuple[tuple[int, float], int] | None = None
            for v in pending:
                t = target[v]
                d = st.vdemand[v]
                b = st.blocked(st.vunit[v], t, d)
                if b is not None and b[0] != "rule":
                    continue
                # Prefer steps that keep rules (transient anti-affinity), then the best gain.
                key = (1 if b is not None else 0, st.var_delta(d, st.vhost[v], t))
                if best is None or key < best[0]:
                    best = (key, v)
            if best is None:
                # A cycle that only an intermediate state breaks: park one VM on a host with room.
                if self._park(pending, target):
                    continue
                for v in sorted(pending):
                    self.reject(
                        v, target[v], "capacity", "no order of moves reaches this placement within headroom"
                    )
                break
            v = best[1]
            if self.budget_left() < 1:
                for p in sorted(pending):
                    self.reject(p, target[p], "budget", f"max_moves={self.s.max_moves} reached")
                break
            why = self._violation_now(v) if v in mandatory_vms else None
            self.do_vm(v, target[v], why is not None, why or self._why_balance())
            pending.discard(v)
        for u in st.units:
            u.moved = any(st.vhost[v] != st.initial_vhost[v] for v in u.members)
        return not pending

    def _order(self, pending: set[int], target: list[int]) -> tuple[list[int] | None, bool]:
        """An order of the moves ``v → target[v]`` in which each fits when it is made, or None;
        and whether the search was complete (None and complete: no such order exists).

        Depth-first over "which move next", best-looking first (rules kept, then the
        best gain), so it returns the greedy order whenever that one works.  Greedy
        alone can deadlock where an order exists: it may fill a host with one arrival
        that another arrival needed, whose own departure would have freed the room
        a third move was waiting for.  The placement after a set of moves does not
        depend on their order, so dead ends are remembered by that set; the search
        gives up (None) after ``_ORDER_NODES`` states.  Leaves ``st`` as it found it.
        """
        st = self.st
        src = {v: st.vhost[v] for v in pending}
        dead: set[frozenset[int]] = set()
        seq: list[int] = []
        # One frame per step taken: (moves left before it, candidates not yet tried, best last).
        stack: list[tuple[frozenset[int], list[int]]] = []
        left = frozenset(pending)
        nodes = 0
        while left and nodes < _ORDER_NODES:
            opts: list[int] = []
            if left not in dead:
                nodes += 1
                ranked: list[tuple[tuple[int, float], int]] = []
                for v in left:
                    b = st.blocked(st.vunit[v], target[v], st.vdemand[v])
                    if b is not None and b[0] != "rule":
                        continue
                    # Prefer steps that keep rules (transient anti-affinity), then the best gain.
                    delta = st.var_delta(st.vdemand[v], st.vhost[v], target[v])
                    ranked.append(((1 if b is not None else 0, delta), v))
                opts = [v for _, v in sorted(ranked, reverse=True)]
            # A dead end: step back until a frame has an untried candidate.
            while not opts and stack:
                dead.add(left)
                left, opts = stack.pop()
                u = seq.pop()
                st.move_vm(u, src[u])
            if not opts:
                break
            v = opts.pop()
            stack.append((left, opts))
            seq.append(v)
            st.move_vm(v, target[v])
            left = left - {v}
        found = not left
        for v in reversed(seq):
            st.move_vm(v, src[v])
        return (seq if found else None), nodes < _ORDER_NODES

    def _park(self, pending: set[int], target: list[int]) -> bool:
        st = self.st
        if self.budget_left() < len(pending) + 1:
            return False
        for v in sorted(pending, key=lambda x: st.vdemand[x][MEM]):
            for b in range(len(st.hnames)):
                if b in (st.vhost[v], target[v]) or st.blocked(st.vunit[v], b, st.vdemand[v]) is not None:
                    continue
                self.do_vm(v, b, False, f"intermediate step (room for a swap on {st.hnames[st.vhost[v]]!r})")
                self.detours += 1
                return True
        return False

    def _violation_now(self, v: int) -> str | None:
        """The hard rule VM ``v``'s current placement breaks (None once an earlier move fixed it)."""
        st = self.st
        ui = st.vunit[v]
        h = st.vhost[v]
        problem = self._placement_problem(ui, st.unit_host(ui))
        if problem is not None:
            return problem
        clash = sorted(c for c in st.units[ui].conflicts & st.units_on[h] if c != ui)
        if clash:
            return f"anti-affinity rule {st.units[ui].conflict_rules[clash[0]]!r} is violated on {st.hnames[h]!r}"
        return None

    # -- output --------------------------------------------------------------
    def waves(self) -> list[int]:
        k = self.s.max_concurrent
        out: list[int] = []
        count: dict[int, int] = {}
        last_wave_of_source: dict[int, int] = {}
        last_wave_of_vm: dict[int, int] = {}
        cur = 0
        for rec in self.recs:
            w = cur
            # A move into a host that an earlier move frees must wait for it.
            if rec.target in last_wave_of_source:
                w = max(w, last_wave_of_source[rec.target] + 1)
            if rec.vm in last_wave_of_vm:
                w = max(w, last_wave_of_vm[rec.vm] + 1)
            while count.get(w, 0) >= k:
                w += 1
            count[w] = count.get(w, 0) + 1
            cur = w
            out.append(w)
            last_wave_of_source[rec.source] = max(last_wave_of_source.get(rec.source, -1), w)
            last_wave_of_vm[rec.vm] = w
        return out


def _summarise(reasons: list[tuple[Why, str]]) -> tuple[Why, str]:
    if not reasons:
        return "capacity", "there is no other host"
    for why in ("rule", "capacity", "budget", "maintenance"):
        hit = [d for w, d in reasons if w == why]
        if hit and why != "maintenance":
            return why, hit[0] + (f" (and {len(hit) - 1} more hosts)" if len(hit) > 1 else "")
    return reasons[0]


def imbalance(snapshot: ClusterSnapshot, settings: PlanSettings | None = None) -> float:
    """The snapshot's imbalance σ (see the module doc)."""
    return _State(snapshot, settings or PlanSettings()).imbalance()


def plan(
    snapshot: ClusterSnapshot,
    settings: PlanSettings | None = None,
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> Plan:
    """Compute a plan for ``snapshot`` (see the module doc).  Touches nothing."""
    s = settings or snapshot.settings or PlanSettings()
    t0 = clock()
    validate(snapshot)
    p = _Planner(snapshot, s)
    st = p.st
    before_loads = [st.hostload(h) for h in range(len(st.hnames))]
    before_counts = [len(x) for x in st.vms_on]
    before_sigma = st.imbalance()
    solver = _choose_solver(snapshot, s, p.notes)
    # Heuristic first: its answer is the plan, or the exact solver's starting point.
    p.mandatory()
    if s.mode == "balance":
        p.balance()
        if s.threshold > 1 and len(st.units) * st.n <= _EXHAUSTIVE_PAIRS:
            p = _improved(p, snapshot, s)
        if s.threshold > 1 and len(st.units) * st.n <= _BEAM_MAX_PAIRS:
            b = _beam_planned(snapshot, s)
            if _objective(b) < _objective(p) - 1e-12:
                p = b
    else:
        p.consolidate()
    if solver == "exact":
        from cloudmon.rebalance import _exact

        result = _exact.solve(p, deadline_s=max(0.05, s.time_budget_s - (clock() - t0)))
        p.notes.extend(result.notes)
        if result.target is not None:
            heur_score = _objective(p)
            q = _Planner(snapshot, s)
            q.notes = p.notes
            mandatory_vms = _mandatory_vms(q)
            reached = q.apply_assignment(result.target, mandatory_vms)
            p.notes.append(_exact.verdict(result, reached=reached, detours=q.detours))
            if s.mode == "consolidate":
                q.power_off = [
                    st.hnames[h] for h in range(len(st.hnames)) if q.st.active[h] and not q.st.vms_on[h]
                ]
            if not reached:
                # A partial path may leave a transient rule violation behind: never keep it.
                p.notes.append(
                    "the exact placement could not be reached by valid moves; kept the heuristic's plan"
                )
                solver = "heuristic"
            elif _objective(q) <= heur_score + 1e-12 and not q.unresolved:
                q.unresolved = p.unresolved
                p = q
            else:
                p.notes.append("the exact solution was no better than the heuristic's; kept the heuristic's")
                solver = "heuristic"
        else:
            solver = "heuristic"
    st = p.st
    # Emptied hosts are reported as "can be powered off"; σ after is over hosts that stay on.
    off = {st.hidx[n] for n in p.power_off}
    after_sigma = _sigma_without(p.st, off) if off else st.imbalance()
    waves = p.waves()
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
            source_before=r.sb,
            source_after=r.sa,
            target_before=r.tb,
            target_after=r.ta,
        )
        for r, w in zip(p.recs, waves, strict=True)
    ]
    hosts = [
        HostUsage(
            host=st.hnames[h],
            before=before_loads[h],
            after=st.hostload(h),
            active=st.active[h] and h not in off,
            vms_before=before_counts[h],
            vms_after=len(st.vms_on[h]),
        )
        for h in range(len(st.hnames))
    ]
    return Plan(
        mode=s.mode,
        threshold=s.threshold,
        automation=s.automation,
        solver=solver,
        moves=moves,
        rejected=p.rejected,
        imbalance_before=before_sigma,
        imbalance_after=after_sigma,
        hosts=hosts,
        power_off=p.power_off,
        unresolved=p.unresolved,
        notes=p.notes,
        elapsed_s=clock() - t0,
    )


def _improved(p: _Planner, snapshot: ClusterSnapshot, s: PlanSettings) -> _Planner:
    """The greedy plan, or the local search's better placement reached by valid ordered moves."""
    greedy = copy.deepcopy(p)
    if not p.search(s.search_restarts):
        return greedy
    q = _Planner(snapshot, s)
    q.notes = greedy.notes
    reached = q.apply_assignment(list(p.st.vhost), _mandatory_vms(q))
    q.rejected = greedy.rejected + q.rejected
    q.unresolved = greedy.unresolved
    if reached and len(q.recs) <= s.max_moves and _objective(q) < _objective(greedy) - 1e-12:
        return q
    return greedy


def _beam_planned(snapshot: ClusterSnapshot, s: PlanSettings) -> _Planner:
    """Mandatory moves, then the best sequence the beam search finds (see :mod:`._beam`)."""
    from cloudmon.rebalance import _beam

    q = _Planner(snapshot, s)
    q.mandatory()
    if q.st.n < 2:
        return q
    result = _beam.search(q, width=_BEAM_WIDTH, max_work=_BEAM_WORK)
    for ui, t in result.steps:
        q.do_unit(ui, t, False, q._why_balance())
    q._explain("budget" if q.budget_left() <= 0 else "gain")
    return q


def _objective(p: _Planner) -> float:
    """What both solvers minimise (balance: score; consolidation: hosts on, then moves)."""
    st = p.st
    if p.s.mode == "consolidate":
        used = sum(1 for h in range(len(st.hnames)) if st.active[h] and st.vms_on[h])
        return used * 1e6 + len(p.recs)
    moves = [r for r in p.recs if not r.mandatory]
    soft = sum(st.soft_viol(v, st.vhost[v]) for v in range(len(st.vnames)))
    lam = 0.0 if math.isinf(p.min_gain) else p.min_gain
    penalty = 1e3 if math.isinf(p.min_gain) else lam
    return (
        st.variance_score()
        + p.s.should_penalty * soft
        + penalty * len(moves)
        + p.s.cost_weight * sum(r.cost_s for r in p.recs)
    )


def _sigma_without(st: _State, off: set[int]) -> float:
    total = 0.0
    n = st.n - len(off & {h for h in range(len(st.hnames)) if st.active[h]})
    if n <= 0:
        return 0.0
    for r in st.res:
        us = [
            st.load[r][h] / st.cap[r][h] for h in range(len(st.hnames)) if st.counted[r][h] and h not in off
        ]
        if us:
            m = sum(us) / len(us)
            total += sum((x - m) ** 2 for x in us) / len(us)
    return math.sqrt(total / len(st.res))


def _mandatory_vms(p: _Planner) -> set[int]:
    """VMs whose current placement breaks a hard constraint (any move of them is mandatory)."""
    st = p.st
    out: set[int] = set()
    for ui, u in enumerate(st.units):
        h = st.unit_host(ui)
        if p._placement_problem(ui, h) is not None or (h >= 0 and (u.conflicts & st.units_on[h])):
            out.update(u.members)
    return out


def _choose_solver(snap: ClusterSnapshot, s: PlanSettings, notes: list[str]) -> str:
    if s.solver == "heuristic":
        return "heuristic"
    pairs = len(snap.vms) * len(snap.hosts)
    if s.solver == "auto" and pairs > s.exact_max_pairs:
        notes.append(f"{pairs} (VM, host) pairs > exact_max_pairs={s.exact_max_pairs}: heuristic")
        return "heuristic"
    try:
        import ortools  # noqa: F401
    except ImportError:
        notes.append(
            "OR-Tools is not installed (pip install 'cloudmon[planner]'): heuristic instead of exact"
        )
        return "heuristic"
    return "exact"
