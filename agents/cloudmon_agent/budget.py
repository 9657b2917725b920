"""Keep the agent's collector CPU per cycle under a budget by running costly collectors less often.

How it plugs in without changing the agent loop: :func:`apply_budget` wraps
each collector in a :class:`Budgeted` (same ``field``) that measures its
``time.thread_time()`` cost and, on cycles where the policy skips it, hands
back its last value (so the report still carries the latest figures), and
appends a :class:`BudgetCollector` (field ``budget``) that closes the cycle:
it feeds the costs to :class:`BudgetPolicy` and reports the budget, the
expected cost and every throttled collector with its period
(:class:`~cloudmon_agent.schema.BudgetStats`).  The agent calls collectors in
list order, so the budget collector, last, sees every collector of the cycle.
The budget covers the whole cycle: each cycle the agent also records, as
:data:`REPORT_COST`, what it cost beyond its collectors.  Run as its own process
(``cloudmon-agent``) that is the process's CPU of the cycle minus what its
collectors took (:attr:`BudgetPolicy.last_cycle_ms`): encoding and sending the
report, the sender and command threads, garbage collection; embedded in another
program (the console's local agent) only encoding and posting on its own thread.  That cost is never throttled
but counts against the budget, so the collectors are throttled harder when the
rest of the agent costs more.

The policy (pure logic, tested with fake costs): each collector's mean cost
per run is the mean of its last ``window`` runs (a plain window, not an
exponential average: the process collector costs ~1 ms on one call in five
and ~0 on the others, and a window gives its true mean instead of whichever
call came last); the expected cost per cycle is
``sum(mean_i / period_i)``.  Over budget: the collector contributing most
(cost / period), once it has 5 runs behind it, gets its period doubled (up
to ``max_period``).  Under
``recover_below`` x budget: the throttled collector whose halved period still
fits under 0.8 x budget gets it halved.  After each change the policy waits
``cooldown`` cycles for the means to settle, so it never flaps.  Collectors
named in ``exempt`` (the host collector) always run.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from cloudmon_agent.schema import BudgetStats, Throttle

if TYPE_CHECKING:
    from cloudmon_agent.collectors import Collector

log = logging.getLogger(__name__)

#: Name under which the agent records the cost of encoding and sending a report.
REPORT_COST = "report"


class BudgetPolicy:
    """Decides each collector's period (run every N cycles) from measured costs."""

    def __init__(
        self,
        budget_ms: float = 1.0,
        *,
        max_period: int = 16,
        recover_below: float = 0.5,
        cooldown: int = 5,
        window: int = 10,
        exempt: Iterable[str] = ("host", REPORT_COST),
    ) -> None:
        if budget_ms <= 0:
            raise ValueError("budget_ms must be > 0")
        self.budget_ms = budget_ms
        self.max_period = max_period
        self.recover_below = recover_below
        self.cooldown = cooldown
        self.window = window
        self._runs: dict[str, collections.deque[float]] = {}
        self.exempt = frozenset(exempt)
        self.periods: dict[str, int] = {}
        self.mean_ms: dict[str, float] = {}
        self._wait = 0
        self._cycle = 0
        #: Collector CPU recorded in the cycle being closed, and in the last closed one.
        self._cycle_ms = 0.0
        self.last_cycle_ms = 0.0

    def due(self, name: str) -> bool:
        """Whether ``name`` runs in the current cycle."""
        p = self.periods.get(name, 1)
        return p <= 1 or self._cycle % p == 0

    def record(self, name: str, cost_ms: float) -> None:
        """Record the cost of one run of ``name``."""
        if name != REPORT_COST:
            self._cycle_ms += cost_ms
        runs = self._runs.get(name)
        if runs is None:
            runs = self._runs[name] = collections.deque(maxlen=self.window)
        runs.append(cost_ms)
        self.mean_ms[name] = sum(runs) / len(runs)
        self.periods.setdefault(name, 1)

    def expected_ms(self) -> float:
        """Expected collector CPU per cycle at the current periods."""
        return sum(m / self.periods.get(n, 1) for n, m in self.mean_ms.items())

    def end_cycle(self) -> str | None:
        """Close the cycle: maybe change one period.  Returns a description of the change, if any."""
        self._cycle += 1
        self.last_cycle_ms, self._cycle_ms = self._cycle_ms, 0.0
        if self._wait > 0:
            self._wait -= 1
            return None
        expected = self.expected_ms()
        change: str | None = None
        if expected > self.budget_ms:
            # A collector is judged once it has a few runs: one costly first
            # call (imports, a first scan) is not its steady cost.
            warm = min(self.window, 5)
            candidates = [
                (m / self.periods[n], n)
                for n, m in self.mean_ms.items()
                if n not in self.exempt and self.periods[n] < self.max_period and len(self._runs[n]) >= warm
            ]
            if candidates:
                _, name = max(candidates)
                self.periods[name] *= 2
                change = f"{name} now every {self.periods[name]} cycles"
        elif expected < self.recover_below * self.budget_ms:
            throttled = sorted((p, n) for n, p in self.periods.items() if p > 1)
            for p, name in throttled:
                m = self.mean_ms[name]
                after = expected - m / p + m / (p // 2)
                if after <= 0.8 * self.budget_ms:
                    self.periods[name] = p // 2
                    change = f"{name} now every {self.periods[name]} cycle(s)"
                    break
        if change is not None:
            self._wait = self.cooldown
        return change

    def throttled(self) -> list[Throttle]:
        """Every collector running less often than every cycle."""
        return [
            Throttle(collector=n, period=p, cost_ms=max(0.0, self.mean_ms.get(n, 0.0)))
            for n, p in sorted(self.periods.items())
            if p > 1
        ]


class Budgeted:
    """A collector run under a :class:`BudgetPolicy`: measured, and skipped when not due."""

    def __init__(
        self,
        inner: Collector,
        policy: BudgetPolicy,
        *,
        name: str | None = None,
        thread_time: Callable[[], float] = time.thread_time,
    ) -> None:
        self.inner = inner
        self.field = inner.field
        self.name = name or inner.field
        self._policy = policy
        self._tt = thread_time
        self._last: Any = None
        self._have_last = False

    def prime(self) -> None:
        """Prime the inner collector."""
        self.inner.prime()

    def collect(self) -> object:
        """The inner collector's sample when due, else its last one."""
        if self._have_last and not self._policy.due(self.name):
            return self._last
        t0 = self._tt()
        value = self.inner.collect()
        self._policy.record(self.name, max(0.0, (self._tt() - t0) * 1000.0))
        self._last, self._have_last = value, True
        return value

    def close(self) -> None:
        """Close the inner collector."""
        self.inner.close()


class BudgetCollector:
    """Fills ``Report.budget`` and closes each cycle of the policy (put it last)."""

    field: str = "budget"

    def __init__(self, policy: BudgetPolicy) -> None:
        self.policy = policy

    def prime(self) -> None:
        """Nothing to prime."""

    def collect(self) -> BudgetStats:
        """Adjust the periods for the next cycle and report them."""
        change = self.policy.end_cycle()
        if change is not None:
            log.info(
                "collector CPU budget %.2f ms/cycle: %s (expected %.2f ms/cycle)",
                self.policy.budget_ms,
                change,
                self.policy.expected_ms(),
            )
        return BudgetStats(
            budget_ms=self.policy.budget_ms,
            expected_ms=max(0.0, self.policy.expected_ms()),
            throttled=self.policy.throttled(),
        )

    def close(self) -> None:
        """Nothing to release."""


def apply_budget(collectors: Sequence[Collector], policy: BudgetPolicy) -> list[Collector]:
    """``collectors`` wrapped in :class:`Budgeted`, plus a :class:`BudgetCollector` at the end."""
    out: list[Collector] = [Budgeted(c, policy) for c in collectors]
    out.append(BudgetCollector(policy))
    return out


def find_policy(collectors: Iterable[object]) -> BudgetPolicy | None:
    """The budget policy among an agent's collectors (``None`` when no budget is set)."""
    for c in collectors:
        if isinstance(c, BudgetCollector):
            return c.policy
    return None
