"""The agent's executor: typed, allow-listed actions the collector sends back on its answers.

Commands arrive on ingest answers (:class:`~cloudmon_agent.schema.Command`);
the agent hands them to :meth:`Executor.submit`, which never blocks the
thread that posted the report.  One worker thread of its own (never the
sampling thread) runs them one at a time from a bounded queue, on one libvirt
connection of its own, each within its deadline.  What it has taken and not
finished (:class:`~cloudmon_agent.schema.CommandProgress`) and what has
finished (:class:`~cloudmon_agent.schema.CommandResult`) ride in the next
reports, from :meth:`Executor.outgoing`, until the collector acknowledges each
result (:meth:`Executor.acked`).

Only actions in ``allow_actions`` run (empty by default): any other command
gets a result saying so and how to allow it.  Parameters are validated per
action (:func:`~cloudmon_agent.schema.command_params`) before anything runs.

Exactly once, by command id: the collector sends a command with every answer
until a report mentions it, and a lost answer or a replayed spool batch can
deliver results twice.  So the executor writes each id to a journal in
``state_dir/commands.journal`` (fsync'd) *before* it runs the command, and the
result after; an id it has seen is never run again, even after a restart.  A
command that was running when the agent died gets the result "outcome
unknown" rather than a second run.  Results stay in the journal until
acknowledged, so a restart loses none; the collector ignores copies.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final

from cloudmon_agent.schema import (
    ACTIONS,
    Command,
    CommandProgress,
    CommandResult,
    CreateParams,
    MigrateParams,
    SchemaError,
    StopParams,
    VmRef,
    command_params,
)
from cloudmon_agent.wire import DecodeError, Struct, asdict, decoder, encode

log = logging.getLogger(__name__)

JOURNAL_FILE: Final = "commands.journal"
#: Commands that may wait for the worker; beyond that a command is refused at once.
QUEUE_MAX: Final = 16
#: Most results one report carries (the rest follow in later reports).
RESULTS_PER_REPORT: Final = 32
#: Ids remembered for de-duplication after their result was acknowledged.
REMEMBER_IDS: Final = 2000
#: Journal lines after which it is rewritten with only what is still needed.
COMPACT_AFTER: Final = 4 * REMEMBER_IDS


def not_allowed_message(action: str) -> str:
    """The refusal of an action this node does not allow, saying how to allow it."""
    return (
        f"action {action} is not allowed on this node; add it to allow_actions in agent.toml "
        "or CLOUDMON_ALLOW_ACTIONS"
    )


class _Entry(Struct, omit_defaults=True):
    """One journal line: a command taken, its result, or the acknowledgement of that result."""

    id: str
    event: str  # taken | result | acked
    action: str = ""
    result: CommandResult | None = None


class Journal:
    """Command ids and unacknowledged results, kept on disk (one JSON line per event).

    ``path`` None keeps everything in memory only (an embedded agent without a
    state directory); then exactly-once holds only while the process lives.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fd: int | None = None
        self._lines = 0
        #: id -> "taken" | "result" | "acked", oldest first.
        self.seen: collections.OrderedDict[str, str] = collections.OrderedDict()
        #: Results not yet acknowledged, by id, oldest first.
        self.unacked: collections.OrderedDict[str, CommandResult] = collections.OrderedDict()
        #: Commands that were taken but have no result (the agent died running them).
        self.interrupted: list[tuple[str, str]] = []
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        actions: dict[str, str] = {}
        dec = decoder(_Entry)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            data = path.read_bytes() if path.exists() else b""
        except OSError as exc:
            raise OSError(f"cannot read the command journal {path}: {exc.strerror or exc}") from None
        for line in data.splitlines():
            try:
                e = dec(line)
            except DecodeError:
                continue  # a torn last line from a crash: that event never completed
            self._apply(e)
            if e.event == "taken":
                actions[e.id] = e.action
        self.interrupted = [(i, actions.get(i, "")) for i, st in self.seen.items() if st == "taken"]
        self._lines = len(data.splitlines())
        if self._lines > COMPACT_AFTER:
            self._rewrite(path)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def _apply(self, e: _Entry) -> None:
        if e.event == "taken":
            self.seen.setdefault(e.id, "taken")
        elif e.event == "result" and e.result is not None:
            self.seen[e.id] = "result"
            self.unacked[e.id] = e.result
        elif e.event == "acked":
            self.seen[e.id] = "acked"
            self.unacked.pop(e.id, None)
        self._trim()

    def _trim(self) -> None:
        while len(self.seen) > REMEMBER_IDS:
            oldest, state = next(iter(self.seen.items()))
            if state != "acked":
                break  # still needed: never forget a command in flight or an unsent result
            del self.seen[oldest]

    def _rewrite(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            for i, state in self.seen.items():
                if state == "result" and i in self.unacked:
                    fh.write(encode(_Entry(i, "result", result=self.unacked[i])) + b"\n")
                else:
                    fh.write(encode(_Entry(i, state if state != "result" else "acked")) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        self._lines = len(self.seen)

    def write(self, entry: _Entry) -> None:
        """Record ``entry`` (durably, before the caller acts on it)."""
        self._apply(entry)
        if self._fd is None:
            return
        os.write(self._fd, encode(entry) + b"\n")
        os.fsync(self._fd)
        self._lines += 1
        if self._lines > COMPACT_AFTER and self.path is not None:
            os.close(self._fd)
            self._fd = None
            self._rewrite(self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _Task(Struct):
    command: Command
    #: Monotonic time by which it must be done (received + the command's timeout_s).
    deadline: float
    received: float


def _check_allow(actions: Iterable[str]) -> frozenset[str]:
    allowed = frozenset(actions)
    unknown = sorted(allowed - set(ACTIONS))
    if unknown:
        raise ValueError(
            f"unknown action(s) {', '.join(unknown)} in allow_actions; known: {', '.join(ACTIONS)}"
        )
    return allowed


class Executor:
    """Runs allow-listed commands in its own thread; see the module docs.

    ``libvirt_uri`` is the host's libvirtd (empty: no VM actions can run);
    ``state_dir`` holds the journal (None: in memory only).  ``open_conn``
    replaces ``libvirt.open(libvirt_uri)`` (an embedding program's own
    connection factory).  ``clock`` stamps results (epoch seconds).
    The worker thread starts on the first command; :meth:`close` joins it.
    """

    def __init__(
        self,
        allow_actions: Iterable[str],
        libvirt_uri: str,
        state_dir: Path | None,
        *,
        queue_max: int = QUEUE_MAX,
        clock: Callable[[], float] = time.time,
        open_conn: Callable[[], Any] | None = None,
        image_dirs: Iterable[str] = (),
    ) -> None:
        self.allowed = _check_allow(allow_actions)
        #: Where ``vm.create`` may read images/templates/kernels and write overlays.
        self.image_dirs = tuple(os.path.realpath(d) for d in image_dirs)
        self._uri = libvirt_uri
        self._open_conn = open_conn
        self._clock = clock
        self._queue_max = queue_max
        self._journal = Journal(state_dir / JOURNAL_FILE if state_dir is not None else None)
        self._lock = threading.Condition()
        self._queue: collections.deque[_Task] = collections.deque()
        self._progress: dict[str, CommandProgress] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self._closed = False
        self._busy = False
        now = clock()
        for cid, action in self._journal.interrupted:
            self._finish(
                CommandResult(
                    id=cid,
                    ok=False,
                    started=now,
                    finished=now,
                    error=(
                        f"the agent stopped while running {action or 'this command'}; its outcome is "
                        "unknown and it was not run again: check the VM's state (vm.state) before retrying"
                    ),
                )
            )
        if self._journal.interrupted:
            log.warning(
                "%d command(s) were interrupted by the last stop; reported as unknown",
                len(self._journal.interrupted),
            )

    # -- from the agent's threads ----------------------------------------------------

    def submit(self, commands: Sequence[Command]) -> None:
        """Take commands from an ingest answer; returns at once (ids seen before are ignored)."""
        if not commands:
            return
        now_m = time.monotonic()
        with self._lock:
            for cmd in commands:
                if cmd.id in self._journal.seen or self._closed:
                    continue
                refusal = self._refusal(cmd)
                if refusal is not None:
                    now = self._clock()
                    self._journal.write(_Entry(cmd.id, "taken", action=cmd.action))
                    self._finish(CommandResult(id=cmd.id, ok=False, started=now, finished=now, error=refusal))
                    log.warning("command %s (%s) refused: %s", cmd.id, cmd.action, refusal)
                    continue
                self._journal.write(_Entry(cmd.id, "taken", action=cmd.action))
                self._queue.append(_Task(cmd, now_m + cmd.timeout_s, now_m))
                self._progress[cmd.id] = CommandProgress(cmd.id, "queued")
                log.info("command %s: %s %s queued", cmd.id, cmd.action, cmd.params)
            if self._queue and self._thread is None:
                self._thread = threading.Thread(target=self._work, name="cloudmon-agent-actions")
                self._thread.start()
            self._lock.notify_all()

    def _refusal(self, cmd: Command) -> str | None:
        if cmd.action not in ACTIONS:
            return (
                f"unknown action {cmd.action!r}: this agent knows {', '.join(ACTIONS)} "
                "(upgrade the agent for newer actions)"
            )
        if cmd.action not in self.allowed:
            return not_allowed_message(cmd.action)
        try:
            command_params(cmd.action, cmd.params)
        except SchemaError as exc:
            return str(exc)
        if len(self._queue) >= self._queue_max:
            return f"the agent's action queue is full ({len(self._queue)} commands waiting); retry later"
        return None

    def outgoing(self) -> tuple[list[CommandProgress], list[CommandResult]]:
        """What the next report carries: commands in flight, and results not yet acknowledged."""
        with self._lock:
            return list(self._progress.values()), list(self._journal.unacked.values())[:RESULTS_PER_REPORT]

    def acked(self, ids: Iterable[str]) -> None:
        """The collector recorded these results: stop sending them."""
        with self._lock:
            for cid in ids:
                if cid in self._journal.unacked:
                    self._journal.write(_Entry(cid, "acked"))

    def idle(self) -> bool:
        """True when nothing is queued or running."""
        with self._lock:
            return not self._queue and not self._busy

    def _finish(self, result: CommandResult) -> None:
        # Caller holds the lock (or is the constructor).
        self._progress.pop(result.id, None)
        self._journal.write(_Entry(result.id, "result", result=result))

    # -- the worker ------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._queue and not self._stop.is_set():
                        self._lock.wait()
                    if self._stop.is_set() and not self._queue:
                        return
                    task = self._queue.popleft()
                    self._busy = True
                    self._progress[task.command.id] = CommandProgress(task.command.id, "running")
                try:
                    result = self._run(task)
                finally:
                    with self._lock:
                        self._busy = False
                with self._lock:
                    self._finish(result)
                    self._lock.notify_all()
                level = logging.INFO if result.ok else logging.WARNING
                log.log(
                    level,
                    "command %s (%s) %s",
                    task.command.id,
                    task.command.action,
                    "done" if result.ok else f"failed: {result.error}",
                )
        finally:
            self._drop_conn()

    def _run(self, task: _Task) -> CommandResult:
        cmd = task.command
        started = self._clock()
        if self._stop.is_set():
            return CommandResult(
                id=cmd.id,
                ok=False,
                started=started,
                finished=started,
                error="the agent stopped before this command ran; it was not run",
            )
        left = task.deadline - time.monotonic()
        if left <= 0:
            waited = time.monotonic() - task.received
            return CommandResult(
                id=cmd.id,
                ok=False,
                started=started,
                finished=started,
                error=f"deadline passed before it could start (waited {waited:.1f} s in the agent's queue); not run",
            )
        try:
            detail = self._dispatch(cmd, left)
        except _ActionFailed as exc:
            return CommandResult(id=cmd.id, ok=False, started=started, finished=self._clock(), error=str(exc))
        except Exception as exc:  # worker boundary: one bad command must not end the executor
            log.exception("command %s (%s) failed unexpectedly", cmd.id, cmd.action)
            return CommandResult(
                id=cmd.id,
                ok=False,
                started=started,
                finished=self._clock(),
                error=f"internal error in the agent: {type(exc).__name__}: {exc} (see the agent's log)",
            )
        return CommandResult(id=cmd.id, ok=True, started=started, finished=self._clock(), detail=detail)

    def _dispatch(self, cmd: Command, left: float) -> dict[str, Any]:
        params = command_params(cmd.action, cmd.params)
        conn = self._connection()
        from cloudmon_agent import vmops

        try:
            if isinstance(params, MigrateParams):
                return self._migrate(cmd, conn, params, left)
            if isinstance(params, CreateParams):
                self._check_paths(params)
                spec = vmops.VmSpec(**asdict(params))
                uuid = vmops.create_vm(conn, spec)
                return {"vm": params.name, "uuid": uuid, "state": vmops.vm_state(conn, params.name)}
            # Only VMs cloudmon made: the collector's token must not stop or delete others.
            if (
                isinstance(params, (StopParams, VmRef))
                and cmd.action in ("vm.stop", "vm.delete")
                and vmops.vm_state(conn, params.vm) != vmops.MISSING
                and vmops.domain_meta(conn, params.vm) is None
            ):
                raise _ActionFailed(
                    f"VM {params.vm!r} was not created by cloudmon: this agent stops and deletes "
                    "only the VMs cloudmon created"
                )
            if isinstance(params, StopParams):
                vmops.stop_vm(conn, params.vm, min(params.timeout_s, left), force=params.force)
            elif isinstance(params, VmRef):
                if cmd.action == "vm.start":
                    vmops.start_vm(conn, params.vm)
                elif cmd.action == "vm.delete":
                    vmops.delete_vm(conn, params.vm)
                    return {"vm": params.vm, "state": "missing"}
            else:  # pragma: no cover - PARAMS lists every struct
                raise _ActionFailed(f"no handler for {cmd.action}")
            vm = params.vm
            return {"vm": vm, "state": vmops.vm_state(conn, vm)}
        except vmops.VmOpError as exc:
            raise _ActionFailed(str(exc)) from None
        except self._libvirt_error() as exc:
            self._check_conn()
            raise _ActionFailed(f"{cmd.action} failed: {_libvirt_text(exc)}") from None

    def _check_paths(self, p: CreateParams) -> None:
        """Every file path of a ``vm.create`` must lie under one of the agent's ``image_dirs``."""
        for field in ("base_image", "overlay_dir", "template_xml", "kernel", "initrd"):
            value = getattr(p, field)
            if value is None:
                continue
            real = os.path.realpath(value)
            if not any(real == d or real.startswith(d + os.sep) for d in self.image_dirs):
                raise _ActionFailed(
                    f"vm.create: {field} {value!r} is outside this agent's image_dirs "
                    f"({', '.join(self.image_dirs) or 'none set'}); add its directory to image_dirs "
                    "in agent.toml (or CLOUDMON_IMAGE_DIRS)"
                )

    def _migrate(self, cmd: Command, conn: Any, p: MigrateParams, left: float) -> dict[str, Any]:
        from cloudmon_agent.migrate import MigrationError, migrate_vm

        def progress(figures: dict[str, float]) -> None:
            with self._lock:
                if cmd.id in self._progress:
                    self._progress[cmd.id] = CommandProgress(cmd.id, "running", dict(figures))

        timeout = left if p.timeout_s is None else min(p.timeout_s, left)
        try:
            figures = migrate_vm(
                conn,
                p.vm,
                p.dest_uri,
                timeout,
                p.live,
                data_uri=p.data_uri,
                bandwidth_mib=p.bandwidth_mib,
                progress=progress,
                stop=self._stop,
            )
        except MigrationError as exc:
            self._check_conn()
            raise _ActionFailed(str(exc)) from None
        return {"vm": p.vm, "dest_uri": p.dest_uri, **figures}

    # -- libvirt ---------------------------------------------------------------------

    @staticmethod
    def _libvirt_error() -> type[Exception]:
        try:
            import libvirt
        except ImportError:
            return _ActionFailed
        err: type[Exception] = libvirt.libvirtError
        return err

    def _connection(self) -> Any:
        if self._conn is not None:
            return self._conn
        if self._open_conn is not None:
            self._conn = self._open_conn()
            return self._conn
        if not self._uri:
            raise _ActionFailed(
                "VMs are off on this node (libvirt_uri is empty); set libvirt_uri in agent.toml or "
                "CLOUDMON_LIBVIRT_URI"
            )
        try:
            import libvirt
        except ImportError:
            raise _ActionFailed(
                "libvirt-python is not installed on this node; install the agent's libvirt extra "
                "(pip install 'cloudmon-agent[libvirt]')"
            ) from None
        try:
            self._conn = libvirt.open(self._uri)
        except libvirt.libvirtError as exc:
            raise _ActionFailed(f"cannot connect to libvirt at {self._uri}: {_libvirt_text(exc)}") from None
        return self._conn

    def _check_conn(self) -> None:
        """Drop a connection that died, so the next command reconnects."""
        conn = self._conn
        if conn is None:
            return
        alive = False
        with contextlib.suppress(Exception):
            alive = bool(conn.isAlive())
        if not alive:
            self._drop_conn()

    def _drop_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._open_conn is None:
            with contextlib.suppress(Exception):
                conn.close()

    # -- lifecycle -------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> None:
        """Stop taking commands, abort a running migration, join the worker.  Idempotent.

        Commands still queued are not run: each gets a result saying so (sent
        on the next start, from the journal).
        """
        with self._lock:
            if self._closed and self._thread is None:
                return
            self._closed = True
            self._stop.set()
            now = self._clock()
            while self._queue:
                task = self._queue.popleft()
                self._finish(
                    CommandResult(
                        id=task.command.id,
                        ok=False,
                        started=now,
                        finished=now,
                        error="the agent stopped before this command ran; it was not run",
                    )
                )
            self._lock.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with self._lock:
            self._thread = None
            self._journal.close()


class _ActionFailed(Exception):
    """An action did not do what was asked; the text is the result's error."""


def _libvirt_text(exc: BaseException) -> str:
    get = getattr(exc, "get_error_message", None)
    msg = get() if callable(get) else None
    return str(msg or exc)


__all__ = ["JOURNAL_FILE", "Executor", "Journal", "not_allowed_message"]
