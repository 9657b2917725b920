"""The agent: sample on a fixed cadence, push each report, survive the collector being away.

Two threads, so a slow or black-holed collector can never delay sampling:

- the *sampling* thread (the one running :meth:`Agent.run`) wakes at
  ``start + k * interval`` on the monotonic clock (no drift; after an overrun
  it skips the missed cycles instead of bursting), samples every collector,
  encodes the report and queues it;
- the *sender* thread posts queued reports in order.  When the collector is
  unreachable it retries with capped exponential backoff (1 s … 30 s) while
  the queue keeps the newest ``queue_max`` reports; older ones are dropped and
  counted (``AgentStats.dropped_reports``, cumulative since start).  A later
  issue replaces this with an on-disk spool.

State changes are logged once each: one warning when the collector becomes
unreachable, one info line when it is back, one error when it rejects the
token.  Nothing is logged per cycle.

``AgentStats.cpu_ms`` is the CPU time both agent threads used during the last
cycle, from ``time.thread_time()`` deltas, so it is right standalone and when
the agent is embedded in a bigger process (the desktop app).
"""

from __future__ import annotations

import collections
import enum
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from cloudmon_agent import __version__
from cloudmon_agent.collectors import Collector, default_collectors
from cloudmon_agent.collectors.procfs import ProcFile
from cloudmon_agent.config import AgentConfig, resolve_node_id
from cloudmon_agent.schema import SCHEMA_VERSION, AgentStats, NodeInfo, Report, encode
from cloudmon_agent.transport import (
    AuthRejected,
    CollectorUnreachable,
    HttpTransport,
    ReportRejected,
    Transport,
)

log = logging.getLogger(__name__)

#: How often a repeated rejection of reports is logged again (seconds).
_REJECT_LOG_EVERY: Final = 60.0


#: Seconds after priming at which the first report is sampled and sent.
FIRST_REPORT_AFTER_S: Final = 0.25


class LinkState(enum.Enum):
    """What the sender last learned about the collector."""

    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"
    AUTH_REJECTED = "auth-rejected"


@dataclass(frozen=True, slots=True)
class AgentCounters:
    """A snapshot of what the agent has done since it started."""

    sampled: int
    sent: int
    dropped: int
    rejected: int
    skipped_cycles: int
    pending: int
    link: LinkState


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

    ``collectors`` default to :func:`~cloudmon_agent.collectors.default_collectors`;
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
        retry_max: float = 30.0,
    ) -> None:
        self.config = config
        self.node_id = resolve_node_id(config)
        self._collectors: list[Collector] = (
            list(collectors) if collectors is not None else default_collectors()
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
        self._retry_min = retry_min
        self._retry_max = retry_max
        self._node = NodeInfo(
            hostname=config.name,
            os=os_description(),
            cpu_count=os.cpu_count() or 0,
            agent_version=__version__,
        )
        self._rss = _Rss()

        self._stop = threading.Event()
        self._cond = threading.Condition()  # guards everything below that both threads touch
        self._pending: collections.deque[bytes] = collections.deque()
        self._dropped = 0
        self._rejected = 0
        self._sent = 0
        self._sender_cpu_s = 0.0
        self._link = LinkState.UNKNOWN
        self._dropped_at_down = 0

        self._sample_lock = threading.Lock()
        self._seq = 0
        self._skipped = 0
        self._primed = False
        self._last_tt: float | None = None
        self._last_thread: int | None = None
        self._last_reject_log = -math.inf
        self._rejects_unlogged = 0

        self._started = False
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
                dropped = self._dropped
            ts = time.time()
            parts: dict[str, Any] = {c.field: c.collect() for c in self._collectors}
            self._primed = True
            report = Report(
                v=SCHEMA_VERSION,
                node_id=self.node_id,
                ts=ts,
                seq=self._seq,
                interval=self.config.interval,
                node=self._node,
                agent=AgentStats(
                    cpu_ms=max(0.0, cpu_s * 1000.0), rss_bytes=self._rss.read(), dropped_reports=dropped
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
            with self._cond:
                self._cond.notify_all()
            self._sender.join()

    def _cycles(self) -> None:
        interval = self.config.interval
        if not self._primed:
            self.prime()
        start = time.monotonic()
        # The first report goes out soon after priming (rates are per real
        # elapsed second, so a short first window is still right): a new node
        # shows up in the console at once instead of after a whole interval.
        first = min(FIRST_REPORT_AFTER_S, interval)
        k = 0
        errors_logged: set[str] = set()
        while True:
            due = start + (k * interval if k else first)
            delay = due - time.monotonic()
            if (delay > 0 and self._stop.wait(delay)) or self._stop.is_set():
                return
            try:
                self._enqueue(encode(self.sample()))
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

    def _enqueue(self, body: bytes) -> None:
        with self._cond:
            if len(self._pending) >= self._queue_max:
                self._pending.popleft()
                self._dropped += 1
            self._pending.append(body)
            self._cond.notify()

    def _requeue(self, body: bytes) -> None:
        # Put a report that could not be delivered back at the front (order is
        # kept), unless newer reports have filled the queue meanwhile.
        with self._cond:
            if len(self._pending) >= self._queue_max:
                self._dropped += 1
            else:
                self._pending.appendleft(body)

    def _send_loop(self) -> None:
        transport = self._transport
        assert transport is not None
        delay = self._retry_min
        while True:
            with self._cond:
                while not self._pending and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set():
                    return
                body = self._pending.popleft()
            t0 = time.thread_time()
            retry = False
            try:
                transport.send(body)
            except CollectorUnreachable as exc:
                self._requeue(body)
                self._set_link(LinkState.DOWN, exc)
                retry = True
            except AuthRejected as exc:
                self._requeue(body)
                self._set_link(LinkState.AUTH_REJECTED, exc)
                retry = True
            except ReportRejected as exc:
                self._set_link(LinkState.UP)
                self._report_rejected(exc)
            except Exception:  # worker loop: a bug here must not end delivery
                with self._cond:
                    self._dropped += 1
                log.exception("sending a report failed unexpectedly; dropped it")
            else:
                with self._cond:
                    self._sent += 1
                self._set_link(LinkState.UP)
                delay = self._retry_min
            finally:
                spent = time.thread_time() - t0
                with self._cond:
                    self._sender_cpu_s += spent
            if retry:
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, self._retry_max)

    def _set_link(self, state: LinkState, exc: Exception | None = None) -> None:
        with self._cond:
            old, self._link = self._link, state
            dropped = self._dropped
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
                "collector %s reachable again; %d report(s) dropped meanwhile",
                url,
                dropped - self._dropped_at_down,
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
            self._cond.notify_all()

    def close(self) -> None:
        """Stop, join the threads, close the connection and collectors.  Idempotent."""
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
        for c in self._collectors:
            c.close()
        self._rss.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Agent", "AgentCounters", "LinkState", "next_cycle", "os_description"]
