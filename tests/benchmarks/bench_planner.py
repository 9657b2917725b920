"""Planner benchmark: a 1,000-host / 20,000-VM cluster, and heuristic vs exact on small clusters.

Run: ``python -m tests.benchmarks.bench_planner [--small N] [--budget S] [--seeds 116,119] [--no-big]``.  Prints figures only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import msgspec

from cloudmon.rebalance.planner import PlanSettings, plan
from cloudmon.rebalance.synthetic import random_snapshot


def big(max_moves: int) -> None:
    t = time.perf_counter()
    snap = random_snapshot(1, 1000, 20_000)
    gen = time.perf_counter() - t
    p = plan(snap, PlanSettings(threshold=5, max_moves=max_moves, max_concurrent=8))
    print(
        f"1000 hosts / 20000 VMs (max_moves={max_moves}): planned in {p.elapsed_s:.3f} s "
        f"(solver {p.solver}; snapshot generated in {gen:.2f} s); imbalance {p.imbalance_before:.4f} -> "
        f"{p.imbalance_after:.4f}; {len(p.moves)} moves in {p.waves} waves; {len(p.rejected)} rejected listed"
    )


def small(seeds: list[int], budget: float, max_moves: int) -> None:
    n = len(seeds)
    print(
        f"{n} random clusters of 8 hosts / 30 VMs, max_moves={max_moves}, threshold 5, CP-SAT budget {budget:g} s "
        "(the exact plan starts from the heuristic's and keeps it when CP-SAT finds nothing better):"
    )
    print("  seed  heuristic reduction (moves)   exact reduction (moves)   ratio  heuristic ms  exact")
    ratios: list[float] = []
    more_moves = 0
    proven = 0
    heur_t: list[float] = []
    for seed in seeds:
        snap = random_snapshot(seed, 8, 30)
        base = PlanSettings(threshold=5, max_moves=max_moves)
        h = plan(snap, msgspec.structs.replace(base, solver="heuristic"))
        e = plan(snap, msgspec.structs.replace(base, solver="exact", time_budget_s=budget))
        proved = any("proved" in note for note in e.notes)
        kept = any("kept the heuristic" in note for note in e.notes)
        proven += proved
        dh = h.imbalance_before - h.imbalance_after
        de = e.imbalance_before - e.imbalance_after
        ratio = dh / de if de > 0 else 1.0
        ratios.append(ratio)
        more_moves += len(h.moves) > len(e.moves)
        heur_t.append(h.elapsed_s)
        how = "proved optimal" if proved else "time budget"
        if kept:
            how += ", CP-SAT no better than the heuristic"
        print(
            f"  {seed:4d}  {dh:.4f} ({len(h.moves)}){'':17s}{de:.4f} ({len(e.moves)}){'':13s}"
            f"{ratio:.3f}  {h.elapsed_s * 1000:8.0f}      {how}"
        )
    print(
        f"  heuristic reduction / exact reduction: mean {statistics.mean(ratios):.4f}, worst {min(ratios):.4f}; "
        f"heuristic used more moves than exact in {more_moves} of {n}; CP-SAT proved optimal in {proven} of {n}; "
        f"heuristic time mean {statistics.mean(heur_t) * 1000:.0f} ms, max {max(heur_t) * 1000:.0f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--small", type=int, default=10, help="number of small clusters (default 10)")
    ap.add_argument("--budget", type=float, default=10.0, help="CP-SAT seconds per small cluster")
    ap.add_argument("--max-moves", type=int, default=6)
    ap.add_argument("--seeds", help="comma-separated seeds of the small clusters (default 100, 101, …)")
    ap.add_argument("--no-big", action="store_true", help="skip the 1,000-host cluster")
    args = ap.parse_args()
    if not args.no_big:
        big(32)
        big(200)
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else list(range(100, 100 + args.small))
    small(seeds, args.budget, args.max_moves)


if __name__ == "__main__":
    main()
