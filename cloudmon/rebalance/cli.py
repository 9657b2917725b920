"""``cloudmon plan``: plan from a saved cluster snapshot (what-if; touches nothing).

``add_parser(subparsers)`` adds the sub-command, ``run(args)`` runs it;
``main(argv)`` runs it standalone (``python -m cloudmon.rebalance.cli``).
"""

from __future__ import annotations

import argparse
import sys

import msgspec

from cloudmon.rebalance.planner import Plan, PlanSettings, plan
from cloudmon.rebalance.snapshot import SnapshotError, load


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``plan`` to a parser's sub-commands."""
    p = subparsers.add_parser(
        "plan",
        help="compute a rebalancing plan from a saved cluster snapshot (what-if, touches nothing)",
        description="Compute a DRS-style rebalancing plan from a cluster snapshot file.",
    )
    _add_arguments(p)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--snapshot", required=True, help="snapshot JSON file (format: README, Cluster snapshots)")
    p.add_argument("--threshold", type=int, choices=range(1, 6), help="migration threshold 1..5")
    p.add_argument("--mode", choices=("balance", "consolidate"))
    p.add_argument("--solver", choices=("auto", "exact", "heuristic"))
    p.add_argument("--max-moves", type=int, help="at most this many moves")
    p.add_argument("--max-concurrent", type=int, help="at most this many migrations at once")
    p.add_argument("--headroom", type=float, help="share of CPU and memory VMs may fill (0..1]")
    p.add_argument("--time-budget", type=float, help="seconds the exact solver may take")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    """Run ``cloudmon plan``; 0 on success, 2 for a bad snapshot or option."""
    try:
        snap = load(args.snapshot)
        base = snap.settings or PlanSettings()
        changes = {
            k: v
            for k, v in (
                ("threshold", args.threshold),
                ("mode", args.mode),
                ("solver", args.solver),
                ("max_moves", args.max_moves),
                ("max_concurrent", args.max_concurrent),
                ("headroom", args.headroom),
                ("time_budget_s", args.time_budget),
            )
            if v is not None
        }
        settings = msgspec.convert({**msgspec.to_builtins(base), **changes}, PlanSettings)
    except SnapshotError as exc:
        print(f"cloudmon plan: {exc}", file=sys.stderr)
        return 2
    except msgspec.ValidationError as exc:
        print(f"cloudmon plan: bad option: {exc}", file=sys.stderr)
        return 2
    result = plan(snap, settings)
    if args.json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(result), indent=2).decode() + "\n")
    else:
        sys.stdout.write(render(result))
    return 0


def render(p: Plan) -> str:
    """The plan as readable text."""
    out = [
        f"Plan ({p.mode}, threshold {p.threshold}, automation {p.automation}, solver {p.solver}, "
        f"{p.elapsed_s:.2f} s): {len(p.moves)} moves in {p.waves} waves",
        f"Imbalance {p.imbalance_before:.4f} -> {p.imbalance_after:.4f}",
    ]
    out += [f"  note: {n}" for n in p.notes]
    if p.moves:
        out.append("\nMoves:")
        for i, m in enumerate(p.moves, 1):
            tag = "mandatory" if m.mandatory else "optional"
            out.append(
                f"  {i:>3}. [wave {m.wave}, {tag}] {m.vm}: {m.source} -> {m.target}  (~{m.cost_s:.1f} s)"
            )
            out.append(f"       {m.reason}")
    out.append("\nHosts (CPU / memory, before -> after):")
    for h in p.hosts:
        flag = "" if h.active else "  [inactive]"
        out.append(
            f"  {h.host:<20} CPU {h.before.cpu:6.1%} -> {h.after.cpu:6.1%}   "
            f"memory {h.before.mem:6.1%} -> {h.after.mem:6.1%}   VMs {h.vms_before} -> {h.vms_after}{flag}"
        )
    if p.power_off:
        out.append("\nCan be powered off: " + ", ".join(p.power_off))
    if p.unresolved:
        out.append("\nUnresolved:")
        out += [f"  - {u}" for u in p.unresolved]
    if p.rejected:
        out.append("\nConsidered and rejected:")
        out += [f"  - {r.vm} -> {r.target or '(any host)'}: {r.why}: {r.detail}" for r in p.rejected]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m cloudmon.rebalance.cli --snapshot FILE``."""
    parser = argparse.ArgumentParser(
        prog="cloudmon plan", description="Compute a rebalancing plan (what-if)."
    )
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
