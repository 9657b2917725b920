"""Connection draining: the :class:`~cloudmon.lb.base.Drainer` implementations.

:class:`HaproxyDrainer` drains an instance the way an ELB deregisters a target:
its server goes to ``drain`` in every service group it belongs to (no new
connections; existing ones continue), the drainer polls the server's current
sessions and queue until they reach 0 or the deregistration delay (or the
caller's timeout, whichever is shorter) runs out, then puts the server in
``maint`` so that nothing reaches it while it is migrated or terminated.
``undrain`` puts it back to ``ready``.

:class:`TimeoutDrainer` is the drain hook when no load balancer is configured:
it just waits the drain timeout, giving clients time to finish.

Both are blocking (run them in a worker thread) and take an injected clock and
sleep; ``close()`` cancels a wait in progress.

Events passed to ``on_event``: ``lb.drain`` (started), ``lb.drained`` (no
sessions left), ``lb.drain_timeout`` (sessions left when the delay ran out),
``lb.drain_error`` (the load balancer failed), ``lb.undrain``; each with
``instance``, ``group``, ``backend``, ``server``, ``reason`` and ``numbers``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cloudmon.lb.base import DrainOutcome
from cloudmon.lb.haproxy import LbError
from cloudmon.lb.service import EventSink, LbRuntime, ServiceGroup

log = logging.getLogger(__name__)

Sleep = Callable[[float], object]


@dataclass(slots=True)
class _Target:
    group: ServiceGroup
    runtime: LbRuntime
    server: str
    deadline: float = 0.0
    sessions: int = -1
    queue: int = 0
    done: bool = False


class HaproxyDrainer:
    """Drains an instance's servers in every service group it belongs to (connection draining).

    ``groups`` pairs each :class:`ServiceGroup` with its runtime client.
    ``sleep`` defaults to a wait that :meth:`close` interrupts; tests inject a
    fake clock and sleep.
    """

    def __init__(
        self,
        groups: Sequence[tuple[ServiceGroup, LbRuntime]],
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep | None = None,
        on_event: EventSink | None = None,
        poll_interval_s: float = 0.2,
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s}")
        self._groups = list(groups)
        self._clock = clock
        self._closed = threading.Event()
        self._sleep: Sleep = sleep if sleep is not None else self._closed.wait
        self._on_event = on_event
        self.poll_interval_s = poll_interval_s

    def close(self) -> None:
        """Cancel drains in progress (they end with ``drained=False``).  Idempotent."""
        self._closed.set()

    def _targets(self, instance_id: str) -> list[_Target]:
        return [
            _Target(group, runtime, server)
            for group, runtime in self._groups
            if (server := group.server_of(instance_id)) is not None
        ]

    def _emit(self, kind: str, instance_id: str, t: _Target, reason: str, **numbers: float) -> None:
        if self._on_event is None:
            return
        event: dict[str, object] = {
            "kind": kind,
            "instance": instance_id,
            "group": t.group.name,
            "backend": t.group.backend,
            "server": t.server,
            "reason": reason,
            "numbers": dict(numbers),
        }
        try:
            self._on_event(event)
        except Exception:  # the event sink must not break a drain half-way
            log.exception("lb event sink failed on %s", kind)

    def drain(self, instance_id: str, timeout_s: float) -> DrainOutcome:
        """Drain ``instance_id``: ``drain`` state, wait for 0 sessions (at most
        ``min(timeout_s, deregistration_delay_s)``), then ``maint``.

        ``drained`` is ``True`` only when no session or queued request was left.
        A load-balancer failure ends the drain with ``drained=False`` and the
        reason; servers already set to ``drain`` stay so (call :meth:`undrain`
        to put them back if the migration or scale-in is abandoned).
        """
        start = self._clock()
        targets = self._targets(instance_id)
        if not targets:
            return DrainOutcome(instance_id, True, "not behind a load balancer: nothing to drain", 0.0)
        for t in targets:
            limit = max(0.0, min(timeout_s, t.group.deregistration_delay_s))
            t.deadline = start + limit
            try:
                t.runtime.set_state(t.group.backend, t.server, "drain")
            except LbError as exc:
                return self._failed(instance_id, t, start, f"could not start draining: {exc}")
            self._emit(
                "lb.drain",
                instance_id,
                t,
                f"draining {t.group.backend}/{t.server}: no new connections, "
                f"waiting up to {limit:g} s for current ones",
                delay_s=limit,
            )
            log.info("draining %s (%s/%s) for up to %.1f s", instance_id, t.group.backend, t.server, limit)
        cancelled = False
        while True:
            now = self._clock()
            for t in targets:
                if t.done:
                    continue
                try:
                    state = next(
                        (s for s in t.runtime.show_servers(t.group.backend) if s.name == t.server), None
                    )
                except LbError as exc:
                    return self._failed(
                        instance_id, t, start, f"lost the load balancer while draining: {exc}"
                    )
                if state is None:
                    return self._failed(
                        instance_id, t, start, f"server {t.server} vanished from backend {t.group.backend}"
                    )
                t.sessions, t.queue = state.sessions, state.queue
                t.done = state.outstanding == 0 or now >= t.deadline
            if all(t.done for t in targets):
                break
            if self._closed.is_set():
                cancelled = True
                break
            wake = min(t.deadline for t in targets if not t.done)
            self._sleep(max(0.0, min(self.poll_interval_s, wake - self._clock())))
        waited = self._clock() - start
        left = sum(t.sessions + t.queue for t in targets)
        for t in targets:
            try:
                t.runtime.set_state(t.group.backend, t.server, "maint")
            except LbError as exc:
                return self._failed(instance_id, t, start, f"drained but could not set maint: {exc}")
            left_one = t.sessions + t.queue
            if left_one == 0:
                kind = "lb.drained"
                reason = f"no connections left after {waited:.1f} s; now in maint"
            else:
                kind = "lb.drain_timeout"
                why = "drain cancelled" if cancelled else "deregistration delay ran out"
                reason = (
                    f"{why} after {waited:.1f} s with {t.sessions} sessions and {t.queue} queued; "
                    "now in maint"
                )
            self._emit(
                kind,
                instance_id,
                t,
                f"{t.group.backend}/{t.server}: {reason}",
                waited_s=waited,
                sessions=t.sessions,
                queue=t.queue,
            )
        numbers = {"waited_s": waited, "sessions_left": float(left), "servers": float(len(targets))}
        if left == 0:
            return DrainOutcome(
                instance_id, True, f"no connections left after {waited:.1f} s", waited, numbers
            )
        why = "drain cancelled" if cancelled else "deregistration delay ran out"
        return DrainOutcome(
            instance_id, False, f"{why} after {waited:.1f} s with {left} connections left", waited, numbers
        )

    def _failed(self, instance_id: str, t: _Target, start: float, reason: str) -> DrainOutcome:
        waited = self._clock() - start
        log.warning("drain of %s failed: %s", instance_id, reason)
        self._emit("lb.drain_error", instance_id, t, reason, waited_s=waited)
        return DrainOutcome(instance_id, False, reason, waited, {"waited_s": waited})

    def undrain(self, instance_id: str) -> None:
        """Put every server of ``instance_id`` back to ``ready``; :class:`LbError` if one fails."""
        for t in self._targets(instance_id):
            t.runtime.set_state(t.group.backend, t.server, "ready")
            self._emit("lb.undrain", instance_id, t, f"{t.group.backend}/{t.server} back in service")


class TimeoutDrainer:
    """The drain hook without a load balancer: waits the drain timeout, then reports done.

    It cannot see connections, so ``drained`` is ``True`` once the wait is over
    and the reason says that it only waited.  ``delay_s`` caps the wait (like a
    deregistration delay); ``sleep`` is injectable (``close()`` interrupts the
    default one, and a cancelled wait reports ``drained=False``).
    """

    def __init__(
        self,
        delay_s: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep | None = None,
    ) -> None:
        self.delay_s = delay_s
        self._clock = clock
        self._closed = threading.Event()
        self._sleep: Sleep = sleep if sleep is not None else self._closed.wait

    def close(self) -> None:
        """Cancel waits in progress.  Idempotent."""
        self._closed.set()

    def drain(self, instance_id: str, timeout_s: float) -> DrainOutcome:
        """Wait ``min(timeout_s, delay_s)`` seconds (no load balancer to ask)."""
        wait = max(0.0, timeout_s if self.delay_s is None else min(timeout_s, self.delay_s))
        start = self._clock()
        deadline = start + wait
        while not self._closed.is_set():
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            self._sleep(remaining)
        waited = self._clock() - start
        if self._closed.is_set() and waited < wait:
            return DrainOutcome(instance_id, False, f"drain wait cancelled after {waited:.1f} s", waited)
        return DrainOutcome(
            instance_id,
            True,
            f"no load balancer configured: waited {waited:.1f} s for connections to finish",
            waited,
            {"waited_s": waited},
        )

    def undrain(self, instance_id: str) -> None:
        """Nothing to undo without a load balancer."""
