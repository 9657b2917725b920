"""A seeded workload that rises, falls and spikes on the demo's time scale.

:class:`Workload` gives a group's total demand at a moment, in percent of one
instance (100 = one instance's CPUs fully busy).  The simulator spreads it over
the group's in-service instances (each gets ``demand / n``, capped at 100), so a
target-tracking group on ``cpu.percent`` sees its average rise and fall with the
number of instances it runs, exactly as a real stateless service would.

One period (6 minutes by default) is: quiet, a smooth rise, a busy plateau with
a short spike, a smooth fall, quiet again.  Noise and the spike's position are
drawn from the seed: the same seed gives the same curve, so demos and tests
repeat.  It is a pure function of the elapsed time: no clock, no thread.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


def _smooth(x: float) -> float:
    """0 -> 0, 1 -> 1 with zero slope at both ends (smoothstep)."""
    x = min(1.0, max(0.0, x))
    return x * x * (3 - 2 * x)


@dataclass(frozen=True, slots=True)
class Workload:
    """Demand over time (see the module doc); ``demand(elapsed_s)`` is the curve."""

    #: Demand when quiet, busy and at the spike's top (percent of one instance).
    low: float = 60.0
    high: float = 280.0
    spike: float = 380.0
    #: Length of one quiet-rise-busy-spike-fall cycle.
    period_s: float = 360.0
    #: Relative noise (0.05 = ±5 %), drawn per second from the seed.
    noise: float = 0.05
    #: How long the spike lasts (seconds).
    spike_s: float = 20.0
    seed: int = 0

    @classmethod
    def constant(cls, value: float) -> Workload:
        """A flat demand without noise (for tests and load tests)."""
        return cls(low=value, high=value, spike=value, noise=0.0)

    def base(self, elapsed_s: float) -> float:
        """The curve without noise."""
        p = self.period_s
        cycle = math.floor(elapsed_s / p)
        t = (elapsed_s - cycle * p) / p  # position in the cycle, 0..1
        if t < 0.10:
            level = self.low
        elif t < 0.35:
            level = self.low + (self.high - self.low) * _smooth((t - 0.10) / 0.25)
        elif t < 0.60:
            level = self.high
        elif t < 0.85:
            level = self.high + (self.low - self.high) * _smooth((t - 0.60) / 0.25)
        else:
            level = self.low
        # The spike lands somewhere on the plateau, a different place each cycle.
        start = (0.37 + 0.15 * random.Random(self.seed * 7919 + cycle).random()) * p
        into = elapsed_s - cycle * p - start
        if 0 <= into < self.spike_s:
            level = max(level, self.spike)
        return level

    def demand(self, elapsed_s: float) -> float:
        """Total demand ``elapsed_s`` seconds after the workload started (never negative)."""
        level = self.base(elapsed_s)
        if self.noise:
            jitter = random.Random(self.seed * 1_000_003 + math.floor(elapsed_s)).uniform(-1.0, 1.0)
            level *= 1.0 + self.noise * jitter
        return max(0.0, level)
