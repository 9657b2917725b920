"""Commands for agents: queued here, sent back on ingest answers, results from later reports.

DESIGN.md: "commands ride back on the report responses".  Nothing connects to
an agent; an agent that reports once a second picks its commands up within a
second.  The flow of one command:

1. :meth:`CommandQueue.submit` (a control loop, a provider, or
   ``POST /api/v1/nodes/{node_id}/commands``) validates the action and its
   parameters (:func:`cloudmon_agent.schema.command_params`) and queues it for
   the node: state ``queued``.
2. The node's next report: :meth:`CommandQueue.take` hands it to the ingest
   answer: state ``sent``.  It is sent again with every answer until a report
   mentions it (a lost answer loses nothing; the agent runs each id once).
3. The agent's reports carry ``progress`` while it runs, then its ``result``:
   :meth:`CommandQueue.report` records the first result (state ``done``),
   ignores copies, and returns the ids the answer acknowledges.
4. A command not picked up by its deadline, or without a result
   ``result_grace_s`` after it, is ``expired`` with a result that says so.
   Nothing is retried: whoever submitted it decides (the command may still
   have run; check with ``vm.state``).

Commands live in this process: with several collectors behind a shared queue
(``--queue``), a command reaches its node only if the node reports to the
collector it was submitted to.

Thread-safe (one lock); :meth:`CommandHandle.wait` blocks the calling thread,
never call it on the asyncio loop.  No threads of its own: expiry is checked
on every call and while waiting.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Final

import msgspec

from cloudmon_agent.schema import Command, CommandProgress, CommandResult, SchemaError, command_params

log = logging.getLogger(__name__)

#: Default time a command may take, from submission to result (seconds).
DEFAULT_TIMEOUT_S: Final = 300.0
MAX_TIMEOUT_S: Final = 86400.0
#: Seconds a sent command's result may arrive after its deadline (the agent
#: finishes by the deadline; the result then rides its next report).
RESULT_GRACE_S: Final = 15.0
#: Finished commands stay visible (``GET /api/v1/commands/{id}``) this long.
KEEP_S: Final = 3600.0
#: Most commands kept in all (finished ones are forgotten first, oldest first).
MAX_COMMANDS: Final = 10_000
#: Most commands one node may have waiting (queued or sent).
MAX_PENDING_PER_NODE: Final = 64
#: Most seconds one wait() slice blocks before expiry is checked again.
_WAIT_SLICE: Final = 0.2


class CommandError(ValueError):
    """A command was refused before it was queued (bad action or parameters, too many pending)."""


class CommandState(enum.StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    DONE = "done"
    EXPIRED = "expired"


class SubmitCommand(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of ``POST /api/v1/nodes/{node_id}/commands``."""

    action: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    params: dict[str, Any] = {}
    #: Seconds from now by which it must be done (default 300).
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=MAX_TIMEOUT_S)] = DEFAULT_TIMEOUT_S


class CommandView(msgspec.Struct, frozen=True):
    """A command as the API shows it."""

    id: str
    node_id: str
    action: str
    params: dict[str, Any]
    #: queued, sent, done or expired.
    state: str
    submitted: float
    deadline: float
    #: When it was first sent to the node (null while queued).
    sent_at: float | None
    #: The agent's latest progress figures (e.g. a migration's bytes copied).
    progress: dict[str, Any]
    #: How it ended (null until done or expired).
    result: CommandResult | None


class CommandHandle:
    """One submitted command; its fields change as reports come in (read them any time)."""

    def __init__(
        self,
        queue: CommandQueue,
        id: str,
        node_id: str,
        action: str,
        params: dict[str, Any],
        submitted: float,
        deadline: float,
    ) -> None:
        self._queue = queue
        self.id = id
        self.node_id = node_id
        self.action = action
        self.params = params
        self.submitted = submitted
        self.deadline = deadline
        self.state = CommandState.QUEUED
        self.sent_at: float | None = None
        #: True once a report mentioned it (progress or result): no more resends.
        self.received = False
        self.progress: dict[str, Any] = {}
        #: Bumped on every change (state, progress): lets a waiter notice progress.
        self.version = 0
        self.result: CommandResult | None = None
        self.finished_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.state in (CommandState.DONE, CommandState.EXPIRED)

    @property
    def ok(self) -> bool:
        """True when it finished and the agent said it worked."""
        return self.result is not None and self.result.ok

    def wait(self, timeout: float | None = None, since_version: int | None = None) -> CommandResult | None:
        """Block until it is done or expired (or ``timeout`` seconds pass); the result, if any.

        With ``since_version`` it also returns as soon as :attr:`version` differs
        from that (new progress), so a caller can show progress as it comes.
        """
        return self._queue._wait(self, timeout, since_version)

    def view(self) -> CommandView:
        """A consistent snapshot for the API."""
        return self._queue._view(self)

    def __repr__(self) -> str:
        return f"CommandHandle({self.id!r}, {self.action} on {self.node_id}, {self.state})"


EventSink = Callable[[dict[str, object]], None]


class CommandQueue:
    """Commands per node, from submission to result; see the module docs.

    ``clock`` is wall time (epoch seconds; injectable for tests).  ``on_event``
    gets one dict per submission and per outcome (``kind`` ``command.submitted``,
    ``command.done``, ``command.failed``, ``command.expired``), outside the lock,
    for the event log.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        *,
        result_grace_s: float = RESULT_GRACE_S,
        keep_s: float = KEEP_S,
        max_commands: int = MAX_COMMANDS,
        max_pending_per_node: int = MAX_PENDING_PER_NODE,
        on_event: EventSink | None = None,
    ) -> None:
        self._clock = clock
        self._grace = result_grace_s
        self._keep_s = keep_s
        self._max = max_commands
        self._max_pending = max_pending_per_node
        self.on_event = on_event
        self._cond = threading.Condition()
        self._all: dict[str, CommandHandle] = {}
        #: node -> its unfinished commands, oldest first (what take() looks at).
        self._pending: dict[str, dict[str, CommandHandle]] = {}

    # -- submit / look up ----------------------------------------------------------

    def submit(
        self, node_id: str, action: str, params: Mapping[str, Any], timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> CommandHandle:
        """Queue ``action`` for ``node_id``; raises :class:`CommandError` if it is invalid."""
        if not 0 < timeout_s <= MAX_TIMEOUT_S:
            raise CommandError(f"timeout_s must be > 0 and <= {MAX_TIMEOUT_S:g} seconds, got {timeout_s:g}")
        try:
            checked = command_params(action, dict(params))
        except SchemaError as exc:
            raise CommandError(str(exc)) from None
        plain: dict[str, Any] = msgspec.to_builtins(checked)
        events: list[dict[str, object]] = []
        with self._cond:
            now = self._clock()
            events += self._expire_locked(now)
            pending = self._pending.setdefault(node_id, {})
            if len(pending) >= self._max_pending:
                raise CommandError(
                    f"node {node_id} already has {len(pending)} commands waiting; wait for them "
                    "(or for them to expire) before sending more"
                )
            handle = CommandHandle(self, uuid.uuid4().hex, node_id, action, plain, now, now + timeout_s)
            self._all[handle.id] = handle
            pending[handle.id] = handle
            self._prune_locked(now)
            events.append(self._event("command.submitted", handle))
        self._emit(events)
        log.info("command %s: %s %s queued for node %s", handle.id, action, plain, node_id)
        return handle

    def get(self, command_id: str) -> CommandHandle | None:
        """The command with this id (kept ``keep_s`` after it finished), or None."""
        self.expire()
        with self._cond:
            return self._all.get(command_id)

    def pending(self, node_id: str) -> list[CommandHandle]:
        """The node's unfinished commands, oldest first."""
        self.expire()
        with self._cond:
            return list(self._pending.get(node_id, {}).values())

    # -- the ingest path -------------------------------------------------------------

    def take(self, node_id: str) -> list[Command]:
        """The commands to send on this answer to ``node_id``: queued ones, and sent ones not yet
        mentioned by a report (sent again: the agent runs each id once)."""
        if node_id not in self._pending:  # the common case, without the lock: nothing for this node
            return []
        out: list[Command] = []
        events: list[dict[str, object]] = []
        with self._cond:
            now = self._clock()
            events += self._expire_locked(now)
            for h in self._pending.get(node_id, {}).values():
                if h.received or h.finished:
                    continue
                if h.state is CommandState.QUEUED:
                    h.state = CommandState.SENT
                    h.sent_at = now
                    h.version += 1
                out.append(
                    Command(
                        id=h.id,
                        action=h.action,
                        deadline=h.deadline,
                        timeout_s=max(0.0, h.deadline - now),
                        params=h.params,
                    )
                )
            if out:
                self._cond.notify_all()
        self._emit(events)
        return out

    def report(
        self, node_id: str, progress: Iterable[CommandProgress], results: Iterable[CommandResult]
    ) -> list[str]:
        """Record what a report of ``node_id`` says about its commands; the result ids to acknowledge.

        Every result id of that node's commands is acknowledged (recorded now or
        before), so the agent stops sending it.  Entries about other nodes'
        commands, or unknown (long forgotten) ones, are acknowledged too and
        otherwise ignored.
        """
        acked: list[str] = []
        events: list[dict[str, object]] = []
        with self._cond:
            now = self._clock()
            for p in progress:
                h = self._all.get(p.id)
                if h is None or h.node_id != node_id or h.finished:
                    continue
                if not h.received or p.detail != h.progress:
                    h.received = True
                    h.progress = dict(p.detail)
                    h.version += 1
            for r in results:
                acked.append(r.id)
                h = self._all.get(r.id)
                if h is None or h.node_id != node_id:
                    if h is None:
                        log.debug("result of unknown command %s from node %s ignored", r.id, node_id)
                    else:
                        log.warning(
                            "node %s sent a result for command %s of node %s; ignored",
                            node_id,
                            r.id,
                            h.node_id,
                        )
                    continue
                if h.state is CommandState.DONE:
                    continue  # a copy (a lost answer, a spool replay): the first one stands
                late = h.state is CommandState.EXPIRED
                h.state = CommandState.DONE
                h.received = True
                h.result = r
                h.finished_at = now
                h.version += 1
                self._pending.get(node_id, {}).pop(h.id, None)
                event = self._event("command.done" if r.ok else "command.failed", h)
                if late:
                    event["late"] = True
                events.append(event)
            for node in [n for n, p in self._pending.items() if not p]:
                del self._pending[node]
            if events or acked:
                self._cond.notify_all()
        self._emit(events)
        return acked

    # -- expiry ----------------------------------------------------------------------------

    def expire(self) -> list[CommandHandle]:
        """Expire what is past its deadline now; the handles that expired."""
        with self._cond:
            events = self._expire_locked(self._clock())
            if events:
                self._cond.notify_all()
        self._emit(events)
        return [self._all[str(e["command_id"])] for e in events if str(e["command_id"]) in self._all]

    def _expire_locked(self, now: float) -> list[dict[str, object]]:
        events: list[dict[str, object]] = []
        for node_id in list(self._pending):
            pending = self._pending[node_id]
            for h in list(pending.values()):
                if h.state is CommandState.QUEUED and now >= h.deadline:
                    error = (
                        f"node {node_id} did not pick the command up within {h.deadline - h.submitted:.0f} s "
                        "(it has not reported since it was submitted); it was not run"
                    )
                elif h.state is CommandState.SENT and now >= h.deadline + self._grace:
                    where = "it was running" if h.received else "it was sent but the node never mentioned it"
                    error = (
                        f"no result from node {node_id} within {h.deadline - h.submitted:.0f} s ({where}); "
                        f"it may still run or have run: check before retrying (vm.state)"
                    )
                else:
                    continue
                h.state = CommandState.EXPIRED
                h.result = CommandResult(id=h.id, ok=False, started=h.submitted, finished=now, error=error)
                h.finished_at = now
                h.version += 1
                del pending[h.id]
                events.append(self._event("command.expired", h))
                log.warning("command %s (%s on %s) expired: %s", h.id, h.action, node_id, error)
            if not pending:
                del self._pending[node_id]
        return events

    def _prune_locked(self, now: float) -> None:
        for cid in list(self._all):
            h = self._all[cid]
            too_many = len(self._all) > self._max
            old = h.finished_at is not None and now - h.finished_at > self._keep_s
            if h.finished and (too_many or old):
                del self._all[cid]

    # -- waiting ---------------------------------------------------------------------------

    def _wait(self, h: CommandHandle, timeout: float | None, since: int | None) -> CommandResult | None:
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            self.expire()
            with self._cond:
                if h.finished or (since is not None and h.version != since):
                    return h.result
                left = _WAIT_SLICE if end is None else min(_WAIT_SLICE, end - time.monotonic())
                if left <= 0:
                    return h.result
                self._cond.wait(left)

    def _view(self, h: CommandHandle) -> CommandView:
        with self._cond:
            return CommandView(
                id=h.id,
                node_id=h.node_id,
                action=h.action,
                params=dict(h.params),
                state=str(h.state),
                submitted=h.submitted,
                deadline=h.deadline,
                sent_at=h.sent_at,
                progress=dict(h.progress),
                result=h.result,
            )

    # -- events ----------------------------------------------------------------------------

    @staticmethod
    def _event(kind: str, h: CommandHandle) -> dict[str, object]:
        event: dict[str, object] = {
            "kind": kind,
            "command_id": h.id,
            "node_id": h.node_id,
            "action": h.action,
            "params": dict(h.params),
        }
        if h.result is not None:
            event["ok"] = h.result.ok
            if h.result.error:
                event["reason"] = h.result.error
            if h.result.detail:
                event["detail"] = dict(h.result.detail)
        return event

    def _emit(self, events: list[dict[str, object]]) -> None:
        sink = self.on_event
        if sink is None:
            return
        for e in events:
            try:
                sink(e)
            except Exception:  # a broken sink (store down) must not break the ingest path
                log.exception("recording command event %s failed", e.get("kind"))


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "CommandError",
    "CommandHandle",
    "CommandQueue",
    "CommandState",
    "CommandView",
    "SubmitCommand",
]
