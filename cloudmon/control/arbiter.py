"""One arbiter shares a change budget among every control loop.

Auto-scaling, rebalancing and load-balancer weighting all change the cluster.
Left alone they undo each other (Proxmox CRS vs an external DRS ping-ponging
VMs; an HPA fighting a GitOps replica count).  Every loop asks the arbiter
before it acts:

* **Change budget** - at most ``budget`` disruptive changes (launches,
  terminations, migrations) in any rolling ``window_s`` seconds, shared by all
  loops.  Mandatory changes (a rule violation, a host entering maintenance, an
  unhealthy instance being replaced) are always granted but still counted.
* **Claims** - while one loop acts on a subject (a VM being migrated, an
  instance being drained), no other loop may touch it; the claim ends with
  :meth:`Arbiter.release`.
* **Hold period** - a VM that was moved may not move back to the host it came
  from within ``hold_s`` seconds, and a subject just changed by one loop may not
  be changed by *another* loop within ``hold_s``, unless the change is
  mandatory.

Plain data and an injected clock: no threads of its own, no I/O.  Thread-safe,
because the collector's loops run in worker threads.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

DEFAULT_BUDGET: Final = 20
DEFAULT_WINDOW_S: Final = 300.0
DEFAULT_HOLD_S: Final = 1800.0


@dataclass(frozen=True, slots=True)
class Grant:
    """The arbiter's answer: ``ok`` and, when refused, why (with the numbers)."""

    ok: bool
    reason: str
    numbers: dict[str, float] = field(default_factory=dict)
    #: Why it was refused: ``claimed`` (another loop is changing it), ``hold`` (it changed
    #: too recently), ``budget`` (the shared budget is spent); empty when granted.
    code: str = ""

    def __bool__(self) -> bool:
        return self.ok


@dataclass(slots=True)
class _Change:
    ts: float
    loop: str
    subject: str
    source: str | None
    target: str | None


class Arbiter:
    """Grants or refuses changes so that control loops never undo each other."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        budget: int = DEFAULT_BUDGET,
        window_s: float = DEFAULT_WINDOW_S,
        hold_s: float = DEFAULT_HOLD_S,
    ) -> None:
        if budget < 1:
            raise ValueError("budget must allow at least one change per window")
        if window_s <= 0 or hold_s < 0:
            raise ValueError("window_s must be > 0 and hold_s >= 0")
        self._clock = clock
        self.budget = budget
        self.window_s = window_s
        self.hold_s = hold_s
        self._lock = threading.Lock()
        self._recent: deque[_Change] = deque()
        self._last: dict[str, _Change] = {}
        self._claims: dict[str, str] = {}

    def _prune(self, now: float) -> None:
        while self._recent and now - self._recent[0].ts >= self.window_s:
            self._recent.popleft()
        horizon = now - max(self.hold_s, self.window_s)
        for subject in [s for s, c in self._last.items() if c.ts < horizon]:
            del self._last[subject]

    def used(self) -> int:
        """Changes counted in the current window."""
        with self._lock:
            self._prune(self._clock())
            return len(self._recent)

    def request(
        self,
        loop: str,
        subject: str,
        *,
        source: str | None = None,
        target: str | None = None,
        mandatory: bool = False,
    ) -> Grant:
        """Ask to change ``subject`` (a VM or instance id), e.g. move it ``source`` -> ``target``.

        A granted change is counted and ``subject`` is claimed by ``loop`` until
        :meth:`release`.  A refused one changes nothing.
        """
        with self._lock:
            now = self._clock()
            if self._claims.get(subject) == loop:
                # The same change asked for again (a retried delete): counted once only,
                # or a failing retry would spend the budget every other loop shares.
                return Grant(True, f"{subject} is already being changed by {loop}")
            refused = self._refusal(now, loop, subject, target, mandatory)
            if refused is not None:
                return refused
            used = len(self._recent)
            change = _Change(now, loop, subject, source, target)
            self._recent.append(change)
            self._last[subject] = change
            self._claims[subject] = loop
            return Grant(
                True,
                "mandatory" if mandatory else "within budget",
                {"used": used + 1, "budget": self.budget},
            )

    def check(
        self,
        loop: str,
        subject: str,
        *,
        source: str | None = None,
        target: str | None = None,
        mandatory: bool = False,
    ) -> Grant:
        """What :meth:`request` would answer now, without counting or claiming anything.

        Planners use it to leave out changes that would be refused (and say why)."""
        with self._lock:
            now = self._clock()
            refused = self._refusal(now, loop, subject, target, mandatory)
            return refused if refused is not None else Grant(True, "would be granted")

    def _refusal(
        self, now: float, loop: str, subject: str, target: str | None, mandatory: bool
    ) -> Grant | None:
        self._prune(now)
        owner = self._claims.get(subject)
        if owner is not None and owner != loop:
            return Grant(False, f"{subject} is being changed by {owner}", code="claimed")
        last = self._last.get(subject)
        if not mandatory and last is not None:
            age = now - last.ts
            if age < self.hold_s and target is not None and target == last.source:
                return Grant(
                    False,
                    f"{subject} moved from {last.source} {age:.0f} s ago; moving it back is held "
                    f"for {self.hold_s:.0f} s",
                    {"age_s": age, "hold_s": self.hold_s},
                    code="hold",
                )
            if age < self.hold_s and last.loop != loop:
                return Grant(
                    False,
                    f"{subject} was changed by {last.loop} {age:.0f} s ago; held for {self.hold_s:.0f} s",
                    {"age_s": age, "hold_s": self.hold_s},
                    code="hold",
                )
        used = len(self._recent)
        if not mandatory and used >= self.budget:
            return Grant(
                False,
                f"change budget spent: {used} of {self.budget} changes in the last {self.window_s:.0f} s",
                {"used": used, "budget": self.budget, "window_s": self.window_s},
                code="budget",
            )
        return None

    def release(self, loop: str, subject: str) -> None:
        """End ``loop``'s claim on ``subject`` (the change finished or failed)."""
        with self._lock:
            if self._claims.get(subject) == loop:
                del self._claims[subject]

    def claimed(self, subject: str) -> str | None:
        """Which loop is changing ``subject`` now, if any."""
        with self._lock:
            return self._claims.get(subject)
