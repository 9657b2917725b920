"""DRS-style rebalancing: cluster snapshots, the planner (exact and heuristic) and ``cloudmon plan``.

Core only: no Qt, no I/O in the planner; OR-Tools is imported lazily by the exact solver.
"""

from cloudmon.rebalance.planner import (
    MIN_GAIN,
    HostLoad,
    HostUsage,
    Move,
    Plan,
    PlanSettings,
    Rejected,
    imbalance,
    plan,
)
from cloudmon.rebalance.snapshot import VM, ClusterSnapshot, Host, Rule, SnapshotError

__all__ = [
    "MIN_GAIN",
    "VM",
    "ClusterSnapshot",
    "Host",
    "HostLoad",
    "HostUsage",
    "Move",
    "Plan",
    "PlanSettings",
    "Rejected",
    "Rule",
    "SnapshotError",
    "imbalance",
    "plan",
]
