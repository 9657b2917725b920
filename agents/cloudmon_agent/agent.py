"""The agent: sample on a fixed cadence, push each report, survive the collector being away.

Two threads, so a slow or black-holed collector can never stall sampling:

- the *sampling* thread (the one running :meth:`Agent.run`) wakes at
  ``start + k * interval`` on the monotonic clock (no drift; after an overrun
  it skips the missed cycles instead of bursting), samples every collector
  and encodes the report.  In the steady state (the collector answered the
  last post, nothing is queued or spooled, the sender is idle) it posts the
  report itself and reads the answer at the next cycle, when it has long
  arrived (over https, where the exchange cannot be split, it waits for it),
  with a short timeout (:data:`INLINE_TIMEOUT_FRACTION` of the interval, at
  least :data:`INLINE_TIMEOUT_MIN`, at most ``config.timeout``): no thread
  hand-off, no wake-up of a second thread, no sleep on the network.  Otherwise,
  or if that post fails in any way but a refusal of the report, the report is
  queued for the sender, which owns every retry, the spool and every change of
  link state;
- the *sender* thread posts queued reports in order.  While the collector is
  up nothing touches the disk.  When a post fails (unreachable, 5xx such as a
  full collector's 503, or a rejected token) that report and every later one
  go to the bounded on-disk :class:`~cloudmon_agent.spool.Spool` in
  ``state_dir/spool`` (one ``write()`` each, so a SIGKILL loses at most the
  report being sampled) and the sender retries with capped exponential
  backoff (1 s … ``config.retry_max``, 30 s by default).  Once a post succeeds again the spool is replayed
  oldest first as JSON arrays of up to ``replay_batch`` reports, one batch
  per turn, and every turn first sends the fresh reports waiting in memory:
  fresh data is never held back behind the backlog.  A batch leaves the spool
  only after the collector answered 200; a lost answer means the batch is
  sent again, which the collector ignores (it stores each ``(node, ts)``
  once).  A batch the collector refuses (400/413) is split in halves until the
  bad report is alone; that one is dropped and counted.  The spool survives a
  restart: a new agent on the same state directory replays it.  When full,
  the spool drops its oldest segment and counts the reports
  (``AgentStats.spool_dropped``); ``AgentStats.dropped_reports`` counts every
  report lost since start, ``AgentStats.spooled`` what waits on disk.
  The in-memory queue only buffers reports while a post is in flight (at most
  ``queue_max``; the oldest are dropped and counted beyond that).

Commands ride back on the collector's answers (whichever thread posted): they
go to the :class:`~cloudmon_agent.actions.Executor`, which runs the
allow-listed ones in a third thread of its own.  Every report carries what the
executor has in flight and its results until the collector acknowledges them
(``IngestResponse.acked``); spooled reports carry them too, and the collector
keeps each result once.

State changes are logged once each: one warning when the collector becomes
unreachable, one info line when it is back, one error when it rejects the
token.  Nothing is logged per cycle.

``AgentStats.cpu_ms`` is the CPU time both agent threads used during the last
cycle, from ``time.thread_time()`` deltas, so it is right standalone and when
the agent is embedded in a bigger process (the desktop app).
"""

from __future__ import annotations

import collections
import contextlib
import enum
import logging
import math
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from cloudmon_agent import __version__
from cloudmon_agent.actions import Executor
from cloudmon_agent.budget import REPORT_COST, find_policy
from cloudmon_agent.collectors import Collector, CollectorOptions, default_collectors
from cloudmon_agent.collectors.procfs import ProcFile
from cloudmon_agent.config import AgentConfig, ConfigError, resolve_node_id
from cloudmon_agent.schema import SCHEMA_VERSION, AgentStats, IngestResponse, NodeInfo, Report, encode
from cloudmon_agent.spool import Batch, Spool, SpoolError
from cloudmon_agent.transport import (
    AuthRejected,
    CollectorUnreachable,
    HttpTransport,
    ReportRejected,
    Transport,
    TransportError,
)
from cloudmon_agent.wire import Struct

log = logging.getLogger(__name__)

#: How often a repeated rejection of reports is logged again (seconds).
_REJECT_LOG_EVERY: Final = 60.0


#: Seconds after priming at which the first report is sampled and sent.
FIRST_REPORT_AFTER_S: Final = 0.25
#: Most reports per replay request (the collector's ``MAX_BATCH``).
REPLAY_BATCH_MAX: Final = 1000
#: Most payload bytes per replay request (the collector's default body limit is 1 MiB).
REPLAY_BYTES_MAX: Final = 512 << 10
SPOOL_DIR: Final = "spool"
#: The sampling thread's own post of a report waits at most this fraction of
#: the interval (a slow collector then delays one cycle a little, never skips
#: one; the sender retries the report with the full ``config.timeout``) ...
INLINE_TIMEOUT_FRACTION: Final = 0.3
#: ... but not less than this (seconds): with very short intervals a busy but
#: healthy collector must not look slow (a handed-over report is posted twice).
INLINE_TIMEOUT_MIN: Final = 0.25


class LinkState(enum.Enum):
    """What the sender last learned about the collector."""

    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"
    AUTH_REJECTED = "auth-rejected"


class AgentCounters(Struct, frozen=True):
    """A snapshot of what the agent has done since it started."""

    sampled: int
    sent: int
    dropped: int
    rejected: int
    skipped_cycles: int
    pending: int
    link: LinkState
    #: Reports waiting in the on-disk spool.
    spooled: int = 0
    #: Reports the spool dropped (full, or torn by a crash).
    spool_dropped: int = 0
    #: Reports delivered from the spool (included in ``sent``).
    replayed: int = 0


def next_cycle(k: int, start: float, now: float, interval: float) -> tuple[int, int]:
    """The cycle to run after cycle ``k``, and how many cycles are skipped to get there.

    Cycle ``j`` is due at ``start + j * interval``.  Normally that is ``k + 1``;
    if cycle ``k`` overran past one or more due times, the next is the first
    one still in the future, so a stall never causes a burst of samples.
    """
    nxt = k + 1
    if start + nxt * interval < now:
        nxt = math.floor((now - start) / interval) + 1
    return nxt, nxt - (k + 1)


def os_description() -> str:
    """``Linux 6.1.0-13-amd64 (Debian GNU/Linux 12 (bookworm))`` or the like."""
    try:
        u = os.uname()
        base = f"{u.sysname} {u.release}"
    except AttributeError:  # Windows
        import platform

        base = f"{platform.system()} {platform.release()}"
    pretty = ""
    try:
        with open("/etc/os-release", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("PRETTY_NAME="):
                    pretty = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return (f"{base} ({pretty})" if pretty else base)[:255]


def collector_options(config: AgentConfig) -> CollectorOptions:
    """The collector switches of ``config`` as :func:`default_collectors` takes them."""
    return CollectorOptions(
        libvirt_uri=config.libvirt_uri,
        top_n=config.top_n,
        processes_every_s=config.processes_every,
        containers=config.containers,
        gpus=config.gpus,
        budget_ms=config.budget_ms,
    )


class _Waker:
    """The sampling thread's sleep between cycles: ``poll`` on a pipe that :meth:`wake` writes to.

    One ``poll`` system call per cycle, where ``Event.wait(timeout)`` costs a new
    lock, a ``futex`` wait and the condition's bookkeeping: ≈45 µs of CPU less per
    cycle on the benchmark machine.  Without ``select.poll`` (Windows) it is an Event.
    """

    def __init__(self) -> None:
        self._event: threading.Event | None = None
        self._fds: tuple[int, int] | None = None
        if hasattr(select, "poll"):
            r, w = os.pipe()
            os.set_blocking(w, False)
            self._fds = (r, w)
            self._poll = select.poll()
            self._poll.register(r, select.POLLIN)
        else:  # pragma: no cover - not Linux
            self._event = threading.Event()

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds; True if woken."""
        if self._event is not None:  # pragma: no cover - not Linux
            return self._event.wait(timeout)
        return bool(self._poll.poll(timeout * 1000.0))

    def wake(self) -> None:
        """End the current and every later :meth:`wait` at once."""
        if self._event is not None:  # pragma: no cover - not Linux
            self._event.set()
        elif self._fds is not None:
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._fds[1], b"x")

    def close(self) -> None:
        if self._fds is not None:
            fds, self._fds = self._fds, None
            for fd in fds:
                os.close(fd)


class _Rss:
    """Resident set size of this process: ``/proc/self/statm`` (one read) or psutil."""

    def __init__(self) -> None:
        self._statm: ProcFile | None = (
            ProcFile("/proc/self/statm") if os.path.exists("/proc/self/statm") else None
        )
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._proc: Any = None

    def read(self) -> int:
        if self._statm is not None:
            try:
                return int(self._statm.read().split()[1]) * self._page
            except (OSError, ValueError, IndexError):
                return 0
        if self._proc is None:
            import psutil

            self._proc = psutil.Process()
        return int(self._proc.memory_info().rss)

    def close(self) -> None:
        if self._statm is not None:
            self._statm.close()


class Agent:
    """Samples the node and pushes reports to the collector.

    ``collectors`` default to :func:`~cloudmon_agent.collectors.default_collectors`
    with the switches of ``config`` (:func:`collector_options`);
    ``transport`` defaults to an :class:`~cloudmon_agent.transport.HttpTransport`
    to ``config.collector`` (none is needed just to :meth:`sample`).

    Use :meth:`run` to block in the calling thread, or :meth:`start` to run in
    a background (non-daemon) thread; :meth:`close` stops either, joins the
    threads and releases connections and files (if a post is in flight it
    waits for it, at most ``config.timeout``).  Constructing it resolves the
    node id (:func:`~cloudmon_agent.config.resolve_node_id`), which may raise
    :class:`~cloudmon_agent.config.ConfigError`.
    """

    def __init__(
        self,
        config: AgentConfig,
        collectors: Sequence[Collector] | None = None,
        transport: Transport | None = None,
        *,
        queue_max: int = 60,
        retry_min: float = 1.0,
        retry_max: float | None = None,
        replay_batch: int = REPLAY_BATCH_MAX,
        replay_bytes: int = REPLAY_BYTES_MAX,
        executor: Executor | None = None,
        whole_process: bool = False,
    ) -> None:
        self.config = config
        #: The budget counts the whole process's CPU (the agent runs as its own
        #: process); else, embedded in another program, only its own threads' work.
        self._whole_process = whole_process
        self.node_id = resolve_node_id(config)
        self._collectors: list[Collector] = (
            list(collectors) if collectors is not None else default_collectors(collector_options(config))
        )
        fields = [c.field for c in self._collectors]
        if len(set(fields)) != len(fields):
            raise ValueError(f"two collectors fill the same report field: {fields}")
        if "host" not in fields:
            raise ValueError("the collectors must include one that fills 'host' (a HostCollector)")
        if transport is None and config.collector:
            transport = HttpTransport(config.collector, config.token, config.timeout)
        self._transport = transport
        if queue_max < 1:
            raise ValueError("queue_max must be >= 1")
        self._queue_max = queue_max
        self._retry_max = config.retry_max if retry_max is None else retry_max
        self._retry_min = min(retry_min, self._retry_max)
        if not 1 <= replay_batch <= REPLAY_BATCH_MAX:
            raise ValueError(f"replay_batch must be 1..{REPLAY_BATCH_MAX}")
        self._replay_max = replay_batch
        self._replay_n = replay_batch  # shrinks while the collector refuses a batch
        self._replay_bytes = replay_bytes
        self._spool: Spool | None = None  # opened by start()/run(), used by the sender only
        self._node = NodeInfo(
            hostname=config.name,
            os=os_description(),
            cpu_count=os.cpu_count() or 0,
            agent_version=__version__,
            migrate_uri=config.migrate_uri,
        )
        self._rss = _Rss()
        #: Runs the collector's commands; built by run()/start() (or given), so that
        #: --once and sample() never touch the command journal.
        self._executor = executor

        self._stop = threading.Event()
        #: What the sampling loop sleeps on (stop() wakes it); made by run(), closed by close().
        self._waker: _Waker | None = None
        #: The report the sampling thread posted and whose answer it has not read yet.
        self._inflight: bytes | None = None
        self._cond = threading.Condition()  # guards everything below that both threads touch
        self._pending: collections.deque[bytes] = collections.deque()
        #: True while a thread uses the transport (the sender, or the sampling
        #: thread posting a report itself): the transport is not thread-safe
        #: and reports must go out in order.
        self._busy = False
        self._inline_timeout = min(
            config.timeout, max(INLINE_TIMEOUT_MIN, config.interval * INLINE_TIMEOUT_FRACTION)
        )
        self._dropped = 0
        self._rejected = 0
        self._sent = 0
        self._sender_cpu_s = 0.0
        self._link = LinkState.UNKNOWN
        self._dropped_at_down = 0
        self._spooled = 0
        self._spool_bytes = 0
        self._spool_dropped = 0
        self._replayed = 0

        self._sample_lock = threading.Lock()
        self._seq = 0
        self._skipped = 0
        self._primed = False
        self._last_tt: float | None = None
        self._last_thread: int | None = None
        self._last_reject_log = -math.inf
        self._rejects_unlogged = 0

        self._started = False
        self._sampling_done = False
        self._closed = False
        self._failed = False
        self._thread: threading.Thread | None = None
        self._sender: threading.Thread | None = None

    # -- sampling -----------------------------------------------------------
    def prime(self) -> None:
        """Take the collectors' first readings (rates need two samples)."""
        with self._sample_lock:
            # The first report's cpu_ms then covers priming and the first wait.
            self._last_tt, self._last_thread = time.thread_time(), threading.get_ident()
            for c in self._collectors:
                c.prime()
            self._primed = True

    def sample(self) -> Report:
        """One report, now.  Primes the collectors first if needed (its rates are then 0)."""
        with self._sample_lock:
            tt = time.thread_time()
            me = threading.get_ident()
            cpu_s = tt - self._last_tt if (self._last_tt is not None and me == self._last_thread) else 0.0
            self._last_tt, self._last_thread = tt, me
            with self._cond:
                cpu_s += self._sender_cpu_s
                self._sender_cpu_s = 0.0
                dropped = self._dropped + self._spool_dropped
                spooled, spool_bytes, spool_dropped = self._spooled, self._spool_bytes, self._spool_dropped
            ts = time.time()
            parts: dict[str, Any] = {c.field: c.collect() for c in self._collectors}
            if self._executor is not None:
                parts["progress"], parts["results"] = self._executor.outgoing()
            self._primed = True
            report = Report(
                v=SCHEMA_VERSION,
                node_id=self.node_id,
                ts=ts,
                seq=self._seq,
                interval=self.config.interval,
                node=self._node,
                agent=AgentStats(
                    cpu_ms=max(0.0, cpu_s * 1000.0),
                    rss_bytes=self._rss.read(),
                    dropped_reports=dropped,
                    spooled=spooled,
                    spool_bytes=spool_bytes,
                    spool_dropped=spool_dropped,
                ),
                **parts,
            )
            self._seq += 1
            return report

    def counters(self) -> AgentCounters:
        """What the agent has done so far (thread-safe snapshot)."""
        with self._cond:
            return AgentCounters(
                sampled=self._seq,
                sent=self._sent,
                dropped=self._dropped,
                rejected=self._rejected,
                skipped_cycles=self._skipped,
                pending=len(self._pending),
                link=self._link,
                spooled=self._spooled,
                spool_dropped=self._spool_dropped,
                replayed=self._replayed,
            )

    # -- the loop -----------------------------------------------------------
    def run(self) -> None:
        """Sample and push until :meth:`close` (or :meth:`stop`); blocks the calling thread."""
        if self._transport is None:
            raise RuntimeError("no collector configured: set --collector URL or CLOUDMON_COLLECTOR")
        with self._cond:
            if self._started and self._thread is not threading.current_thread():
                raise RuntimeError("this Agent is already running (or has run); create a new one")
            self._started = True
        if self._stop.is_set():
            return
        self.open_spool()
        self.open_executor()
        self._sender = threading.Thread(target=self._send_loop, name="cloudmon-agent-send")
        self._sender.start()
        log.info(
            "cloudmon-agent %s: node %s (%s) reporting to %s every %g s",
            __version__,
            self.node_id,
            self.config.name,
            self._transport.url,
            self.config.interval,
        )
        try:
            self._cycles()
        finally:
            self._stop.set()
            if self._inflight is not None:
                try:
                    self._finish_inflight()  # its answer (or the sender, which spools it)
                except Exception:  # shutting down: the report is with the sender or answered
                    log.exception("reading the last answer failed")
            with self._cond:
                # The sender keeps what is left only after the last sample is handed over.
                self._sampling_done = True
                self._cond.notify_all()
            self._sender.join()

    def _cycles(self) -> None:
        interval = self.config.interval
        with self._cond:  # stop() wakes it from here on; a stop() before is seen by is_set()
            if self._waker is None:
                self._waker = _Waker()
            waker = self._waker
        if not self._primed:
            self.prime()
        start = time.monotonic()
        # The first report goes out soon after priming (rates are per real
        # elapsed second, so a short first window is still right): a new node
        # shows up in the console at once instead of after a whole interval.
        first = min(FIRST_REPORT_AFTER_S, interval)
        k = 0
        errors_logged: set[str] = set()
        budget = find_policy(self._collectors)
        last_cpu: float | None = None
        while True:
            due = start + (k * interval if k else first)
            delay = due - time.monotonic()
            if (delay > 0 and waker.wait(delay)) or self._stop.is_set():
                return
            try:
                report = self.sample()
                t0 = time.thread_time()
                self._push(encode(report))
                if budget is not None:
                    if not self._whole_process:
                        # Embedded: encoding and posting (this thread) count against the budget.
                        budget.record(REPORT_COST, max(0.0, (time.thread_time() - t0) * 1000.0))
                    else:
                        # Its own process: what this cycle cost beyond its collectors
                        # (encoding, posting, the sender and command threads, GC) counts.
                        now_cpu = time.process_time()
                        if last_cpu is not None:
                            overhead = (now_cpu - last_cpu) * 1000.0 - budget.last_cycle_ms
                            budget.record(REPORT_COST, max(0.0, overhead))
                        last_cpu = now_cpu
            except Exception as exc:  # worker loop: one bad cycle must not stop sampling
                key = f"{type(exc).__name__}: {exc}"
                if key not in errors_logged and len(errors_logged) < 50:  # once per distinct error
                    errors_logged.add(key)
                    log.exception("sampling failed (%s); will keep sampling", key)
                else:
                    log.debug("sampling failed again: %s", key)
            k, skipped = next_cycle(k, start, time.monotonic(), interval)
            if skipped:
                with self._cond:
                    self._skipped += skipped
                log.debug("cycle overran; skipped %d cycle(s)", skipped)

    def _push(self, body: bytes) -> None:
        """Post ``body`` from this (sampling) thread when the way is clear, else queue it for the sender.

        The post's answer is read at the next cycle (:meth:`_finish_inflight`),
        when it has long arrived, where the transport can split the exchange.
        """
        transport = self._transport
        assert transport is not None
        if self._inflight is not None:
            self._finish_inflight()
        with self._cond:
            inline = (
                not self._busy
                and not self._pending
                and self._link is LinkState.UP
                and self._spooled == 0
                and not self._stop.is_set()
            )
            if inline:
                self._busy = True
        if not inline:
            self._enqueue(body)
            return
        begin = getattr(transport, "begin", None)
        if begin is not None:
            try:
                started = bool(begin(body, timeout=self._inline_timeout))
            except TransportError:  # not sent: the sender takes it (and the link state) over
                with self._cond:
                    self._busy = False
                    self._pending.append(body)
                    self._cond.notify()
                return
            if started:
                self._inflight = body  # _busy stays set: the transport is ours until the answer is read
                return
        self._take_answer(body, lambda: transport.send(body, timeout=self._inline_timeout))

    def _finish_inflight(self) -> None:
        """Read the answer to the report posted by the last :meth:`_push`; on failure hand it to the sender."""
        body, self._inflight = self._inflight, None
        transport = self._transport
        if body is None or transport is None:
            return
        finish = getattr(transport, "finish")  # noqa: B009 - only transports with begin() get here
        self._take_answer(body, lambda: finish(timeout=self._inline_timeout))

    def _take_answer(self, body: bytes, answer_of: Callable[[], IngestResponse]) -> None:
        """The sampling thread's own post of ``body``: count it, drop it if refused, else hand it over.

        On any failure but a refusal of the report (away, slow, refusing the token) the
        sender tries again with its full timeout and, failing that, spools the report and
        says so once; the collector keeps each report once, so a resend is harmless.
        The transport is free again afterwards.
        """
        handed_over = False
        answer: IngestResponse | None = None
        try:
            answer = answer_of()
        except ReportRejected as exc:
            self._report_rejected(exc)
        except TransportError:
            handed_over = True
        else:
            with self._cond:
                self._sent += 1
        finally:
            with self._cond:
                self._busy = False
                if handed_over:
                    self._pending.append(body)
                if self._pending:  # handed over now, or queued while the transport was ours
                    # Only then: in the steady state the sender thread stays asleep.
                    self._cond.notify()
        self._answered(answer)

    def open_executor(self) -> Executor:
        """The executor of the collector's commands (built on first use; its journal is in ``state_dir``).

        :meth:`start` and :meth:`run` call it; raises ConfigError if the journal cannot be opened.
        """
        if self._executor is None:
            try:
                self._executor = Executor(
                    self.config.allow_actions,
                    self.config.libvirt_uri,
                    self.config.state_path,
                    image_dirs=self.config.image_dirs,
                )
            except OSError as exc:
                raise ConfigError(f"state_dir: {exc}") from None
        return self._executor

    def _answered(self, answer: IngestResponse | None) -> None:
        """Hand the commands and acknowledgements of a collector's answer to the executor."""
        executor = self._executor
        if executor is None or answer is None:
            return
        if isinstance(answer.acked, list) and answer.acked:
            executor.acked(answer.acked)
        if answer.commands:
            executor.submit(answer.commands)

    def _enqueue(self, body: bytes) -> None:
        with self._cond:
            if len(self._pending) >= self._queue_max:
                self._pending.popleft()
                self._dropped += 1
            self._pending.append(body)
            self._cond.notify()

    def open_spool(self) -> None:
        """Open (or create) the spool in ``state_dir/spool`` now; raises ConfigError if it cannot be.

        :meth:`start` and :meth:`run` call it; a spool left by an earlier agent is then replayed.
        """
        if self._spool is not None:
            return
        try:
            spool = Spool(self.config.state_path / SPOOL_DIR, self.config.spool_max_bytes)
        except SpoolError as exc:
            raise ConfigError(f"state_dir: {exc}") from None
        self._spool = spool
        self._note_spool()

    def _note_spool(self) -> None:
        spool = self._spool
        if spool is None:
            return
        st = spool.stats()
        with self._cond:
            self._spooled, self._spool_bytes, self._spool_dropped = st.pending, st.bytes, st.dropped

    def _send_loop(self) -> None:
        spool = self._spool
        assert spool is not None, "opened by run()"
        delay = self._retry_min
        retry_at = 0.0  # monotonic; while in the future the collector is taken as away
        try:
            while True:
                with self._cond:
                    while not self._stop.is_set() and (self._busy or not self._pending):
                        if self._busy:
                            # The sampling thread is posting a report itself (or waits for its
                            # answer until the next cycle); it notifies whenever it frees the
                            # transport with reports queued.  Timed only as a safety net: a
                            # 1 s timer here would wake this thread every cycle.
                            self._cond.wait(30.0)
                        elif spool.pending:
                            wait = retry_at - time.monotonic()
                            if wait <= 0:
                                break  # replay (or probe with) the oldest spooled batch
                            self._cond.wait(wait)
                        else:
                            self._cond.wait()
                    if self._stop.is_set():
                        break
                    fresh = list(self._pending)
                    self._pending.clear()
                    self._busy = True
                t0 = time.thread_time()
                try:
                    if fresh and time.monotonic() < retry_at:
                        # Away: straight to disk, so a crash now loses nothing already sampled.
                        for body in fresh:
                            spool.append(body)
                        ok = None
                    else:
                        ok = self._deliver(fresh) if fresh else True
                        if ok and spool.pending:
                            ok = self._replay_one(spool)
                    if ok:
                        delay, retry_at = self._retry_min, 0.0
                    elif ok is False:
                        retry_at = time.monotonic() + delay
                        delay = min(delay * 2, self._retry_max)
                except Exception:  # worker loop: a bug here must not end delivery
                    log.exception("sending reports failed unexpectedly; will retry")
                    retry_at = time.monotonic() + delay
                    delay = min(delay * 2, self._retry_max)
                finally:
                    self._note_spool()
                    spent = time.thread_time() - t0
                    with self._cond:
                        self._sender_cpu_s += spent
                        self._busy = False
        finally:
            self._shutdown_sender(spool, retry_at)

    def _shutdown_sender(self, spool: Spool, retry_at: float) -> None:
        # Nothing sampled is left behind in memory: deliver it if the collector is
        # up (one short try), else keep it in the spool for the next start.
        with self._cond:
            # Wait for the sampling thread to finish its last cycle (it may be between
            # sampling and handing the report over) and for its own post, if any.
            while self._busy or not self._sampling_done:
                self._cond.wait(0.1)
            fresh = list(self._pending)
            self._pending.clear()
        try:
            if fresh and self._link is LinkState.UP and time.monotonic() >= retry_at:
                self._deliver(fresh)
            else:
                for body in fresh:
                    spool.append(body)
        except Exception:  # shutdown boundary: log, never hang or raise out of the thread
            log.exception("could not keep the last reports at shutdown")
        finally:
            self._note_spool()
            spool.close()
            if spool.pending:
                log.info("%d report(s) kept in the spool %s for the next start", spool.pending, spool.path)

    def _deliver(self, fresh: list[bytes]) -> bool:
        """Post fresh reports in order; on failure they go to the spool.  False if away.

        Several waiting reports (a slow collector) go as one batch, so the agent
        catches up in one request instead of falling further behind.
        """
        transport = self._transport
        spool = self._spool
        assert transport is not None
        assert spool is not None
        body = fresh[0] if len(fresh) == 1 else b"[" + b",".join(fresh) + b"]"
        try:
            answer = transport.send(body)
        except (CollectorUnreachable, AuthRejected) as exc:
            for rest in fresh:
                spool.append(rest)
            state = LinkState.DOWN if isinstance(exc, CollectorUnreachable) else LinkState.AUTH_REJECTED
            self._set_link(state, exc)
            return False
        except ReportRejected as exc:
            self._set_link(LinkState.UP)
            if len(fresh) == 1:
                self._report_rejected(exc)
            else:
                # One of them is bad: the replay path splits the batch until it is alone.
                for rest in fresh:
                    spool.append(rest)
            return True
        with self._cond:
            self._sent += len(fresh)
        self._set_link(LinkState.UP)
        self._answered(answer)
        return True

    def _replay_one(self, spool: Spool) -> bool:
        """Post the oldest spooled batch; forget it once acknowledged.  False if the collector is away."""
        transport = self._transport
        assert transport is not None
        batch: Batch = spool.read_batch(self._replay_n, self._replay_bytes)
        if not batch.records:
            return True
        body = b"[" + b",".join(batch.records) + b"]"
        try:
            answer = transport.send(body)
        except (CollectorUnreachable, AuthRejected) as exc:
            self._set_link(
                LinkState.DOWN if isinstance(exc, CollectorUnreachable) else LinkState.AUTH_REJECTED, exc
            )
            return False
        except ReportRejected as exc:
            self._set_link(LinkState.UP)
            if len(batch) > 1:
                # One bad report (or a too large body) refuses the whole batch: halve
                # until the culprit is alone, so only it is lost.
                self._replay_n = max(1, len(batch) // 2)
                log.debug(
                    "collector refused a replay batch of %d (%s); trying %d", len(batch), exc, self._replay_n
                )
                return True
            spool.ack(batch)
            self._report_rejected(exc)
            return True
        spool.ack(batch)
        self._replay_n = min(self._replay_max, self._replay_n * 2)
        n = len(batch)
        with self._cond:
            self._sent += n
            self._replayed += n
        self._set_link(LinkState.UP)
        self._answered(answer)
        if not spool.pending:
            log.info("spool replayed: the collector has every report kept while it was away")
        return True

    def _set_link(self, state: LinkState, exc: Exception | None = None) -> None:
        with self._cond:
            old, self._link = self._link, state
            dropped = self._dropped + self._spool_dropped
            if (
                state != old
                and state in (LinkState.DOWN, LinkState.AUTH_REJECTED)
                and old
                in (
                    LinkState.UP,
                    LinkState.UNKNOWN,
                )
            ):
                self._dropped_at_down = dropped
        if state == old:
            return
        url = self._transport.url if self._transport is not None else "?"
        if state is LinkState.DOWN and isinstance(exc, CollectorUnreachable):
            log.warning("collector %s unreachable (%s); will keep sampling and retry", url, exc.reason)
        elif state is LinkState.AUTH_REJECTED and isinstance(exc, AuthRejected):
            log.error(
                "token rejected by collector %s (HTTP %s: %s); pass the collector's token with "
                "--token or CLOUDMON_TOKEN",
                url,
                exc.status,
                exc.message,
            )
        elif state is LinkState.UP and old in (LinkState.DOWN, LinkState.AUTH_REJECTED):
            log.info(
                "collector %s reachable again; %d report(s) dropped meanwhile, %d spooled to replay",
                url,
                dropped - self._dropped_at_down,
                self._spool.pending if self._spool is not None else 0,
            )
        elif state is LinkState.UP:
            log.info("connected to collector %s", url)

    def _report_rejected(self, exc: ReportRejected) -> None:
        with self._cond:
            self._rejected += 1
            self._dropped += 1
        # A rejected report is a bug (agent/collector version skew): say it,
        # but at most once a minute, with how many were suppressed.
        now = time.monotonic()
        if now - self._last_reject_log >= _REJECT_LOG_EVERY:
            more = (
                f" (and {self._rejects_unlogged} more since the last message)"
                if self._rejects_unlogged
                else ""
            )
            log.warning("%s; report dropped%s", exc, more)
            self._last_reject_log = now
            self._rejects_unlogged = 0
        else:
            self._rejects_unlogged += 1

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        """Run :meth:`run` in a background (non-daemon) thread and return."""
        if self._transport is None:
            raise RuntimeError("no collector configured: set --collector URL or CLOUDMON_COLLECTOR")
        with self._cond:
            if self._started or self._thread is not None:
                raise RuntimeError("this Agent is already running (or has run); create a new one")
        # In the caller's thread, so a spool that cannot be opened is a clear error here.
        self.open_spool()
        self.open_executor()
        with self._cond:
            self._thread = threading.Thread(target=self._run_logged, name="cloudmon-agent")
        self._thread.start()

    def _run_logged(self) -> None:
        try:
            self.run()
        except Exception:  # thread boundary: report it instead of dying silently
            self._failed = True
            log.exception("the agent stopped because of an error")

    @property
    def running(self) -> bool:
        """True while the background thread started by :meth:`start` is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def failed(self) -> bool:
        """True if the background thread ended because of an error."""
        return self._failed

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the background thread to end; True if it has."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        """Ask the loop to stop (returns at once; :meth:`close` also waits)."""
        self._stop.set()
        with self._cond:
            if self._waker is not None:
                self._waker.wake()
            self._cond.notify_all()

    def close(self) -> None:
        """Stop, join the threads, close the connection, spool and collectors.  Idempotent."""
        self.stop()
        me = threading.current_thread()
        for t in (self._thread, self._sender):
            if t is not None and t is not me and t.ident is not None:
                t.join()
        with self._cond:
            if self._closed:
                return
            self._closed = True
        if self._transport is not None:
            self._transport.close()
        with self._cond:
            waker, self._waker = self._waker, None
        if waker is not None:
            waker.close()
        if self._spool is not None:
            self._spool.close()  # already closed by the sender if it ran
        if self._executor is not None:
            self._executor.close()
        for c in self._collectors:
            c.close()
        self._rss.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Agent", "AgentCounters", "LinkState", "collector_options", "next_cycle", "os_description"]
