"""Worker threads that talk to the collector so the GUI thread never does.

Two kinds, each with its own :class:`~cloudmon.client.ApiClient` (the client is
not thread-safe):

* :class:`RequestWorker` runs one-off calls (``nodes()``, ``series()``, ...)
  one at a time.  Every request has an id and a *key* naming the view it is
  for; a newer request with the same key replaces a queued older one, and the
  GUI ignores replies whose id is not the newest for their key
  (:class:`RequestTracker`).  Stale results therefore never reach a widget.
* :class:`StreamWorker` follows ``GET /api/v1/stream`` and reconnects with
  exponential backoff when the collector goes away, reporting its connection
  state.

Both are ``threading.Thread`` based and emit Qt signals of a ``QObject`` that
lives in the GUI thread: Qt then queues the call into the GUI thread's event
loop (the connection is made explicitly queued by the window), so slots run on
the GUI thread only.  ``close()`` stops and joins the thread; call it before
the QObject is destroyed.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import msgspec
from PySide6.QtCore import QObject, Signal

from cloudmon.client import ApiClient, ApiError, CollectorUnreachable, NodesResponse

logger = logging.getLogger(__name__)

#: Seconds without a byte on the stream before it counts as dead: the collector
#: sends a ``nodes`` event every second, so three missed ones mean trouble.
STREAM_READ_TIMEOUT = 3.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 5.0

_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Request:
    """An immutable unit of work: ``fn`` gets the worker's own client."""

    request_id: int
    key: str
    fn: Callable[[ApiClient], Any]


@dataclass(frozen=True, slots=True)
class Reply:
    """The outcome of a :class:`Request`: ``value`` or ``error`` is set."""

    request_id: int
    key: str
    value: Any = None
    error: str | None = None
    unreachable: bool = False


class RequestTracker:
    """Remembers the newest request id per key (GUI-thread only)."""

    def __init__(self) -> None:
        self._latest: dict[str, int] = {}

    def issued(self, key: str, request_id: int) -> None:
        self._latest[key] = request_id

    def is_current(self, reply: Reply) -> bool:
        return self._latest.get(reply.key) == reply.request_id

    def forget(self, key: str) -> None:
        self._latest.pop(key, None)


class RequestWorker(QObject):
    """Runs API calls in one background thread, newest-per-key wins."""

    #: Emitted with a :class:`Reply` (queued into the GUI thread).
    replied = Signal(object)

    def __init__(self, url: str, token: str | None, name: str = "requests", timeout: float = 10.0) -> None:
        super().__init__()
        self._url = url
        self._token = token
        self._timeout = timeout
        self._pending: OrderedDict[str, Request] = OrderedDict()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"cloudmon-ui-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, key: str, fn: Callable[[ApiClient], Any]) -> int:
        """Queue ``fn(client)``; a queued request with the same key is dropped."""
        req = Request(next(_ids), key, fn)
        with self._cond:
            self._pending.pop(key, None)
            self._pending[key] = req
            self._cond.notify()
        return req.request_id

    def _next(self) -> Request | None:
        with self._cond:
            while not self._stop and not self._pending:
                self._cond.wait()
            if self._stop:
                return None
            return self._pending.popitem(last=False)[1]

    def _run(self) -> None:
        client = ApiClient(self._url, self._token, timeout=self._timeout)
        try:
            while (req := self._next()) is not None:
                reply = self._execute(client, req)
                if self._stop:
                    break
                self.replied.emit(reply)
        finally:
            client.close()

    @staticmethod
    def _execute(client: ApiClient, req: Request) -> Reply:
        try:
            return Reply(req.request_id, req.key, value=req.fn(client))
        except CollectorUnreachable as exc:
            return Reply(req.request_id, req.key, error=str(exc), unreachable=True)
        except ApiError as exc:
            return Reply(req.request_id, req.key, error=str(exc))
        except (msgspec.MsgspecError, ValueError) as exc:
            return Reply(req.request_id, req.key, error=f"unexpected answer from the collector: {exc}")
        except Exception as exc:  # worker loop boundary: log, report, keep serving
            logger.exception("request %s failed", req.key)
            return Reply(req.request_id, req.key, error=f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        """Stop taking requests; the thread ends after the call in flight (no join)."""
        with self._cond:
            self._stop = True
            self._pending.clear()
            self._cond.notify_all()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 15.0) -> None:
        """Stop taking requests and join the thread (idempotent)."""
        self.stop()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("thread %s did not stop within %.0f s", self._thread.name, timeout)


@dataclass(frozen=True, slots=True)
class LiveSample:
    """One report of one node as the stream delivers it."""

    node_id: str
    ts: float
    values: dict[str, float]


@dataclass(frozen=True, slots=True)
class StreamState:
    """Connection state of a stream: connected, or failing and retrying."""

    connected: bool
    message: str = ""
    retry_in: float = 0.0
    #: True when the collector answered but refused (bad token, 404): not a network problem.
    refused: bool = False


class _SampleWire(msgspec.Struct):
    node_id: str
    ts: float
    values: dict[str, float]


def decode_event(event: str, data: Any) -> Any:
    """Turn an SSE payload into typed data (runs in the worker thread)."""
    if event == "nodes":
        return msgspec.convert(data, NodesResponse)
    if event == "sample":
        s = msgspec.convert(data, _SampleWire)
        return LiveSample(s.node_id, s.ts, s.values)
    return data


class StreamWorker(QObject):
    """Follows the collector's live stream, reconnecting with backoff."""

    #: ``NodesResponse`` from each ``nodes`` event.
    nodes = Signal(object)
    #: ``LiveSample`` from each ``sample`` event (only with a ``node_id``).
    sample = Signal(object)
    #: ``StreamState`` whenever the connection comes up or fails.
    state = Signal(object)

    def __init__(
        self, url: str, token: str | None, node_id: str | None = None, *, nodes: bool = True
    ) -> None:
        super().__init__()
        self._url = url
        self._token = token
        self.node_id = node_id
        # A node page needs only its samples: skip typing 1,000-node snapshots it ignores.
        self._want_nodes = nodes
        self._stop = threading.Event()
        name = f"cloudmon-ui-stream-{node_id}" if node_id else "cloudmon-ui-stream"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        backoff = BACKOFF_FIRST
        while not self._stop.is_set():
            client = ApiClient(self._url, self._token, timeout=STREAM_READ_TIMEOUT)
            events = client.stream(self.node_id, timeout=STREAM_READ_TIMEOUT)
            connected = False
            refused = False
            try:
                for ev in events:
                    if self._stop.is_set():
                        break
                    if not connected:
                        connected = True
                        backoff = BACKOFF_FIRST
                        self.state.emit(StreamState(True))
                    self._dispatch(ev.event, ev.data)
                reason = "the collector closed the stream"
            except CollectorUnreachable as exc:
                reason = exc.message
            except ApiError as exc:
                reason, refused = exc.message, True
                if exc.status in (401, 403):
                    reason = f"the collector refused the token ({exc.message})"
            finally:
                if isinstance(events, Generator):
                    events.close()  # closes the stream's own connection now, not at GC
                client.close()
            if self._stop.is_set():
                break
            if refused:
                backoff = BACKOFF_MAX
            logger.info("stream %s: %s; retrying in %.1f s", self.node_id or "overview", reason, backoff)
            self.state.emit(StreamState(False, reason, backoff, refused))
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _dispatch(self, event: str, data: Any) -> None:
        if event == "nodes" and not self._want_nodes:
            return
        try:
            value = decode_event(event, data)
        except (msgspec.ValidationError, TypeError) as exc:
            logger.warning("ignoring malformed %r event: %s", event, exc)
            return
        if event == "nodes":
            self.nodes.emit(value)
        elif event == "sample":
            self.sample.emit(value)

    def stop(self) -> None:
        """Ask the thread to stop (returns at once; :meth:`close` joins)."""
        self._stop.set()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 10.0) -> None:
        """Stop and join the thread (idempotent)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("thread %s did not stop within %.0f s", self._thread.name, timeout)
