"""Actions: plans become changes to the world, carried out through the agents.

:class:`~cloudmon.actions.migration.PlanExecutor` runs a rebalancing plan move
by move as live migrations through the source hosts' agents, verifying each
step before the next.
"""

from cloudmon.actions.migration import ExecutionReport, MoveLike, MoveOutcome, PlanExecutor

__all__ = ["ExecutionReport", "MoveLike", "MoveOutcome", "PlanExecutor"]
