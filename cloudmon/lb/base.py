"""What the control loops need from a load balancer.

Auto-scaling drains an instance before it terminates it; rebalancing drains a
VM's backends before it migrates it.  Both talk to a :class:`Drainer`; the
HAProxy runtime API is the first implementation, and a plain timeout hook
stands in where no load balancer is configured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class DrainOutcome:
    """How a drain ended: ``drained`` (no connections left) or timed out, with the figures."""

    instance_id: str
    drained: bool
    reason: str
    waited_s: float
    numbers: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Drainer(Protocol):
    """Takes an instance out of service gracefully.  Blocking: run it in a worker thread."""

    def drain(self, instance_id: str, timeout_s: float) -> DrainOutcome:
        """Stop new connections to ``instance_id`` and wait (at most ``timeout_s``)
        for existing ones to finish (the deregistration delay)."""

    def undrain(self, instance_id: str) -> None:
        """Put a drained instance back in service (a cancelled scale-in or migration)."""
