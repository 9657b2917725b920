"""Run a rebalancing plan: one live migration at a time, each verified before the next.

For every move, in wave order:

1. ask the :class:`~cloudmon.control.arbiter.Arbiter` (loop ``"rebalance"``):
   a refusal (budget spent, held, claimed by auto-scaling) stops the plan;
2. drain the VM's backends first when a :class:`~cloudmon.lb.base.Drainer` is
   given (a drain that times out is noted, not fatal: a live migration keeps
   connections), and put them back in service afterwards, whatever happened;
3. send ``vm.migrate`` to the source host's agent with the target host's
   advertised ``migrate_uri`` and wait, turning the agent's progress into
   ``rebalance.move_progress`` events;
4. verify through the agents: ``vm.state`` on the target says running and on
   the source says the VM is gone.

A failed step stops the plan (``rebalance.move_failed`` with the reason, then
``rebalance.plan_done``); nothing is retried.  :meth:`PlanExecutor.cancel`
stops after the move in progress.  ``run`` blocks: call it in a worker thread.

Events are plain dicts handed to ``on_progress`` with ``kind``, ``ts``, the
move (``vm``, ``source``, ``target``, ``wave``, ``mandatory``), a ``reason``
and figures (``seconds``, ``percent``, ``data_processed`` ...).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from cloudmon.collector.commands import CommandError, CommandHandle, CommandQueue
from cloudmon.control.arbiter import Arbiter
from cloudmon.lb.base import Drainer

log = logging.getLogger(__name__)

LOOP: Final = "rebalance"
#: Default limit of one migration (seconds).
MIGRATE_TIMEOUT_S: Final = 600.0
#: Time the agent gets on top of the migration's own limit to report its result.
COMMAND_MARGIN_S: Final = 30.0
VERIFY_TIMEOUT_S: Final = 60.0
DRAIN_TIMEOUT_S: Final = 30.0
#: States of a VM that count as running on the target.
RUNNING_STATES: Final = frozenset({"running", "blocked"})

EventSink = Callable[[dict[str, Any]], None]


class MoveLike(Protocol):
    """What the executor needs of a move (``cloudmon.rebalance.planner.Move`` has it)."""

    @property
    def vm(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def mandatory(self) -> bool: ...
    @property
    def wave(self) -> int: ...


@dataclass(frozen=True, slots=True)
class MoveOutcome:
    """How one move ended."""

    vm: str
    source: str
    target: str
    ok: bool
    reason: str
    seconds: float
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ExecutionReport:
    """How a plan run ended: the moves done, the one that failed, those not attempted."""

    ok: bool
    reason: str
    done: list[MoveOutcome]
    failed: MoveOutcome | None
    #: VMs of the moves not attempted (after a failure or a cancel).
    skipped: list[str]
    cancelled: bool
    started: float
    finished: float


class _StepFailed(Exception):
    def __init__(self, reason: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail or {}


class PlanExecutor:
    """Executes plans through the agents; see the module docs.

    ``node_for_host`` maps a host name (the planner's) to the node id of its
    agent, ``uri_for_host`` to the libvirt URI its agent advertises
    (``NodeInfo.migrate_uri``); either returns None when unknown.
    ``data_uri_for_host`` optionally gives the migration data address
    (``tcp://ADDR``) when the destination's libvirt does not choose one itself.
    """

    def __init__(
        self,
        commands: CommandQueue,
        node_for_host: Callable[[str], str | None],
        uri_for_host: Callable[[str], str | None],
        arbiter: Arbiter,
        drainer: Drainer | None = None,
        clock: Callable[[], float] = time.time,
        on_progress: EventSink | None = None,
        *,
        migrate_timeout_s: float = MIGRATE_TIMEOUT_S,
        verify_timeout_s: float = VERIFY_TIMEOUT_S,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        poll_s: float = 0.5,
        data_uri_for_host: Callable[[str], str | None] | None = None,
    ) -> None:
        self._commands = commands
        self._node_for_host = node_for_host
        self._uri_for_host = uri_for_host
        self._data_uri_for_host = data_uri_for_host
        self._arbiter = arbiter
        self._drainer = drainer
        self._clock = clock
        self._on_progress = on_progress
        self.migrate_timeout_s = migrate_timeout_s
        self.verify_timeout_s = verify_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self._poll_s = poll_s
        self._cancel = threading.Event()
        self._abandon = threading.Event()

    def abandon(self) -> None:
        """Stop waiting now (the collector is shutting down): the move in flight fails here,
        and the agent carrying it out finishes it, or aborts it at its deadline, by itself."""
        self._abandon.set()
        self._cancel.set()

    def cancel(self) -> None:
        """Stop after the move in progress (it is finished and verified, not interrupted)."""
        self._cancel.set()

    # -- events ----------------------------------------------------------------------------

    def _emit(self, kind: str, move: MoveLike | None, reason: str, **numbers: Any) -> None:
        event: dict[str, Any] = {"kind": kind, "ts": self._clock(), "loop": LOOP, "reason": reason}
        if move is not None:
            event.update(
                vm=move.vm, source=move.source, target=move.target, wave=move.wave, mandatory=move.mandatory
            )
        event.update(numbers)
        if self._on_progress is not None:
            try:
                self._on_progress(event)
            except Exception:  # a broken listener (UI gone) must not break a migration half-way
                log.exception("progress listener failed on %s", kind)

    # -- the run ------------------------------------------------------------------------------

    def run(self, moves: Sequence[MoveLike]) -> ExecutionReport:
        """Run the moves in wave order, one at a time; blocks until done, failed or cancelled."""
        started = self._clock()
        ordered = sorted(moves, key=lambda m: m.wave)  # stable: the plan's order within a wave
        done: list[MoveOutcome] = []
        failed: MoveOutcome | None = None
        cancelled = False
        waiting = list(ordered)
        while waiting:
            if self._cancel.is_set():
                cancelled = True
                break
            outcome = self._one(waiting.pop(0), len(done) + 1, len(ordered))
            if not outcome.ok:
                failed = outcome
                break
            done.append(outcome)
        skipped = [m.vm for m in waiting]
        finished = self._clock()
        if failed is not None:
            reason = f"stopped at move {len(done) + 1} of {len(ordered)} ({failed.vm}): {failed.reason}"
        elif cancelled:
            reason = f"cancelled after {len(done)} of {len(ordered)} moves"
        else:
            reason = f"all {len(done)} moves done"
        ok = failed is None and not cancelled
        self._emit(
            "rebalance.plan_done",
            None,
            reason,
            ok=ok,
            moves=len(ordered),
            done=len(done),
            skipped=len(skipped),
            cancelled=cancelled,
            seconds=finished - started,
        )
        (log.info if ok else log.warning)("plan execution: %s", reason)
        return ExecutionReport(ok, reason, done, failed, skipped, cancelled, started, finished)

    def _one(self, move: MoveLike, index: int, total: int) -> MoveOutcome:
        t0 = self._clock()
        self._emit(
            "rebalance.move_started",
            move,
            f"move {index} of {total}: {move.vm} from {move.source} to {move.target}"
            + (" (mandatory)" if move.mandatory else ""),
            index=index,
            moves=total,
        )
        granted = False
        drained = False
        try:
            src_node, dst_node, dest_uri = self._endpoints(move)
            self._ask_arbiter(move)
            granted = True
            drain_detail = self._drain(move)
            drained = self._drainer is not None
            figures = self._migrate(move, src_node, dest_uri)
            self._verify(move, src_node, dst_node)
        except _StepFailed as exc:
            seconds = self._clock() - t0
            self._emit("rebalance.move_failed", move, exc.reason, seconds=seconds, **exc.detail)
            return MoveOutcome(move.vm, move.source, move.target, False, exc.reason, seconds, exc.detail)
        finally:
            if drained and self._drainer is not None:
                try:
                    self._drainer.undrain(move.vm)
                except Exception:  # any drainer error: reported, the move's outcome stands
                    log.exception("could not put %s back in service after its move", move.vm)
            if granted:
                self._arbiter.release(LOOP, move.vm)
        seconds = self._clock() - t0
        detail = {**figures, **drain_detail}
        reason = f"{move.vm} runs on {move.target} (verified); {move.source} no longer has it"
        self._emit("rebalance.move_done", move, reason, seconds=seconds, **detail)
        return MoveOutcome(move.vm, move.source, move.target, True, reason, seconds, detail)

    def _endpoints(self, move: MoveLike) -> tuple[str, str, str]:
        src = self._node_for_host(move.source)
        if src is None:
            raise _StepFailed(f"host {move.source} has no agent reporting to this collector")
        dst = self._node_for_host(move.target)
        if dst is None:
            raise _StepFailed(f"host {move.target} has no agent reporting to this collector")
        uri = self._uri_for_host(move.target)
        if not uri:
            raise _StepFailed(
                f"host {move.target}'s agent advertises no migrate_uri; set migrate_uri in its agent.toml "
                "(or CLOUDMON_MIGRATE_URI) to the libvirt URI other hosts reach it at"
            )
        return src, dst, uri

    def _ask_arbiter(self, move: MoveLike) -> None:
        grant = self._arbiter.request(
            LOOP, move.vm, source=move.source, target=move.target, mandatory=move.mandatory
        )
        if not grant:
            raise _StepFailed(f"the arbiter refused: {grant.reason}", dict(grant.numbers))

    def _drain(self, move: MoveLike) -> dict[str, Any]:
        if self._drainer is None:
            return {}
        try:
            outcome = self._drainer.drain(move.vm, self.drain_timeout_s)
        except Exception as exc:  # noqa: BLE001 - any drainer error stops the plan, with its text
            raise _StepFailed(f"draining {move.vm} failed: {exc}") from None
        self._emit(
            "rebalance.move_progress",
            move,
            outcome.reason,
            phase="drained" if outcome.drained else "drain-timeout",
            drain_s=outcome.waited_s,
            **outcome.numbers,
        )
        return {"drained": outcome.drained, "drain_s": outcome.waited_s}

    def _submit(self, node: str, action: str, params: dict[str, Any], timeout_s: float) -> CommandHandle:
        try:
            return self._commands.submit(node, action, params, timeout_s)
        except CommandError as exc:
            raise _StepFailed(f"{action} could not be sent to node {node}: {exc}") from None

    def _migrate(self, move: MoveLike, src_node: str, dest_uri: str) -> dict[str, Any]:
        params: dict[str, Any] = {
            "vm": move.vm,
            "dest_uri": dest_uri,
            "live": True,
            "timeout_s": self.migrate_timeout_s,
        }
        if self._data_uri_for_host is not None:
            data_uri = self._data_uri_for_host(move.target)
            if data_uri:
                params["data_uri"] = data_uri
        handle = self._submit(src_node, "vm.migrate", params, self.migrate_timeout_s + COMMAND_MARGIN_S)
        seen = handle.version
        while not handle.finished:
            if self._abandon.is_set():
                raise _StepFailed(
                    f"the collector stopped while {move.vm} was migrating; the agent on {move.source} "
                    "finishes the migration or aborts it at its deadline: look where it runs",
                    {"command_id": handle.id},
                )
            handle.wait(self._poll_s, since_version=seen)
            if handle.version != seen:
                seen = handle.version
                view = handle.view()
                if view.progress:
                    self._emit(
                        "rebalance.move_progress",
                        move,
                        f"migrating {move.vm}: {view.progress.get('percent', 0.0):.0f} %",
                        phase="migrating",
                        **_numbers(view.progress),
                    )
        result = handle.result
        if result is None or not result.ok:
            error = result.error if result is not None and result.error else "no result"
            raise _StepFailed(f"migration failed: {error}", {"command_id": handle.id})
        return {"command_id": handle.id, **_numbers(result.detail)}

    def _state(self, node: str, vm: str) -> str:
        handle = self._submit(node, "vm.state", {"vm": vm}, self.verify_timeout_s)
        result = handle.wait(self.verify_timeout_s + 1.0)
        if result is None:
            raise _StepFailed(
                f"vm.state of {vm} on node {node} gave no result within {self.verify_timeout_s:g} s"
            )
        if not result.ok:
            raise _StepFailed(f"vm.state of {vm} on node {node} failed: {result.error}")
        return str(result.detail.get("state", ""))

    def _verify(self, move: MoveLike, src_node: str, dst_node: str) -> None:
        on_target = self._state(dst_node, move.vm)
        if on_target not in RUNNING_STATES:
            raise _StepFailed(
                f"after the migration {move.vm} is {on_target or 'unknown'} on {move.target}, not running; "
                "check the VM there before going on"
            )
        on_source = self._state(src_node, move.vm)
        if on_source != "missing":
            raise _StepFailed(
                f"after the migration {move.source} still has {move.vm} ({on_source}); check both hosts "
                "before going on"
            )


#: Event fields an agent's figures must not overwrite (or collide with as keyword arguments).
_RESERVED: Final = frozenset(
    {"kind", "ts", "loop", "reason", "vm", "source", "target", "wave", "mandatory", "phase", "plan_id", "id"}
)


def _numbers(detail: dict[str, Any]) -> dict[str, float]:
    """The numeric figures of an agent's progress or result, minus names the event itself uses."""
    return {
        k: float(v)
        for k, v in detail.items()
        if k not in _RESERVED and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


__all__ = ["ExecutionReport", "MoveLike", "MoveOutcome", "PlanExecutor"]
