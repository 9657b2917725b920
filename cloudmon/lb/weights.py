"""Backend weights from measured load: pure functions, no I/O, no clock.

Two algorithms, named after AWS ALB's:

``weighted`` (weighted routing by spare capacity)
    Each member's weight is proportional to its CPU headroom plus a small floor::

        headroom_i = clamp(100 - cpu_percent_i, 0, 100) + HEADROOM_FLOOR
        weight_i   = clamp(round(max_weight * headroom_i / max_j headroom_j), min_weight, max_weight)

    The least loaded member gets ``max_weight``; a member at 90 % CPU next to
    one at 10 % gets 15/95 of its share (≈ 16 %).  ``HEADROOM_FLOOR`` (5
    percentage points) keeps two saturated members (99 % vs 98 %) from being
    split 1:2 on noise, and ``min_weight`` (default 1) keeps a trickle flowing
    to a busy member so that its load stays measured, like ALB's automatic
    target weights never take a target fully out.  A member with no CPU
    figure yet gets the mean headroom of the measured ones (neutral).

``least_outstanding`` (least outstanding requests)
    Weights inversely proportional to in-flight plus queued requests::

        weight_i = clamp(round(max_weight * (1 + min_j o_j) / (1 + o_i)), min_weight, max_weight)

    HAProxy's ``balance leastconn`` does this per request; this periodic
    version is for backends configured with ``roundrobin`` or where the
    weights must also show up in the console.

:func:`settle_weights` adds hysteresis so that weights do not churn: a new
weight is applied only when it differs from the current one by at least
``min_change`` and by at least ``min_ratio`` of the current weight (or when
the current weight is outside ``[min_weight, max_weight]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

Algorithm = Literal["weighted", "least_outstanding"]
ALGORITHMS: Final[tuple[Algorithm, ...]] = ("weighted", "least_outstanding")

#: Percentage points of CPU headroom every member gets on top of its measured headroom.
HEADROOM_FLOOR: Final = 5.0


@dataclass(frozen=True, slots=True)
class MemberLoad:
    """What is known of one member's load: CPU percent (``None`` = no figure), sessions, queue."""

    cpu_percent: float | None = None
    sessions: int = 0
    queue: int = 0

    @property
    def outstanding(self) -> int:
        """In-flight plus queued requests."""
        return max(0, self.sessions) + max(0, self.queue)


def _clamp(value: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, round(value)))


def _check_bounds(min_weight: int, max_weight: int) -> None:
    if not 0 <= min_weight <= max_weight <= 256 or max_weight < 1:
        raise ValueError(
            f"weights must satisfy 0 <= min_weight <= max_weight <= 256 and max_weight >= 1; "
            f"got min_weight={min_weight}, max_weight={max_weight}"
        )


def compute_weights(
    loads: Mapping[str, MemberLoad],
    algorithm: Algorithm = "weighted",
    *,
    min_weight: int = 1,
    max_weight: int = 100,
) -> dict[str, int]:
    """Target weight of every member (keyed like ``loads``); see the module doc for the formulas."""
    _check_bounds(min_weight, max_weight)
    if not loads:
        return {}
    if algorithm == "weighted":
        headroom: dict[str, float | None] = {
            key: None if load.cpu_percent is None else min(100.0, max(0.0, 100.0 - load.cpu_percent))
            for key, load in loads.items()
        }
        known = [h for h in headroom.values() if h is not None]
        neutral = sum(known) / len(known) if known else 100.0
        score = {key: (neutral if h is None else h) + HEADROOM_FLOOR for key, h in headroom.items()}
        best = max(score.values())
        return {key: _clamp(max_weight * s / best, min_weight, max_weight) for key, s in score.items()}
    if algorithm == "least_outstanding":
        fewest = min(load.outstanding for load in loads.values())
        return {
            key: _clamp(max_weight * (1 + fewest) / (1 + load.outstanding), min_weight, max_weight)
            for key, load in loads.items()
        }
    raise ValueError(f"unknown algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")


def settle_weights(
    current: Mapping[str, int],
    target: Mapping[str, int],
    *,
    min_change: int = 5,
    min_ratio: float = 0.1,
    min_weight: int = 0,
    max_weight: int = 256,
) -> dict[str, int]:
    """The members whose weight should change now, with their new weight (hysteresis).

    A member changes when ``|target - current| >= max(min_change, min_ratio * current)``,
    or when its current weight lies outside ``[min_weight, max_weight]`` (a
    weight set by hand or by the configuration).  Members missing from
    ``current`` always get their target.
    """
    changes = {}
    for key, new in target.items():
        old = current.get(key)
        if old is None or not min_weight <= old <= max_weight:
            if old != new:
                changes[key] = new
            continue
        if new != old and abs(new - old) >= max(min_change, min_ratio * old):
            changes[key] = new
    return changes


def slow_start_cap(target: int, since_ready_s: float, slow_start_s: float, min_weight: int) -> int:
    """``target`` scaled by how far a member is into its slow-start ramp (ALB's slow start)."""
    if slow_start_s <= 0 or since_ready_s >= slow_start_s:
        return target
    return min(target, max(min_weight, round(target * max(0.0, since_ready_s) / slow_start_s)))
