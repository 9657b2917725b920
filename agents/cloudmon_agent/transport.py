"""Pushing reports to the collector: HTTP(S) POST with keep-alive and a bearer token.

One :class:`HttpTransport` keeps one persistent ``http.client`` connection
(a new TCP/TLS handshake per second per node would cost the collector about
40 % of its throughput).  A kept-alive connection that the server has closed
in the meantime is detected on the next request and that request is retried
once on a fresh connection.  Failures are typed so the agent can react to
each: :class:`CollectorUnreachable` (retry later), :class:`AuthRejected` (the
token is wrong: retrying will not help until someone fixes it) and
:class:`ReportRejected` (this report is bad: drop it).

The token goes into the ``Authorization`` header and nowhere else: not into
logs, exception texts or ``repr``.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from typing import Final, Protocol
from urllib.parse import urlsplit

import msgspec

from cloudmon_agent import __version__
from cloudmon_agent.schema import IngestResponse

INGEST_PATH: Final = "/api/v1/ingest"
_STALE: Final = (
    http.client.RemoteDisconnected,
    BrokenPipeError,
    ConnectionResetError,
    ConnectionAbortedError,
)
_MAX_MESSAGE: Final = 300


class TransportError(Exception):
    """Sending a report failed."""


class CollectorUnreachable(TransportError):
    """No usable answer from the collector (refused, reset, timed out, 5xx); try again later."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"collector {url} unreachable ({reason})")
        self.url = url
        self.reason = reason


class AuthRejected(TransportError):
    """The collector refused the token (401/403)."""

    def __init__(self, url: str, status: int, message: str) -> None:
        super().__init__(f"collector {url} rejected the token (HTTP {status}: {message})")
        self.url = url
        self.status = status
        self.message = message


class ReportRejected(TransportError):
    """The collector refused this report (400/413/422); ``message`` is the server's reason."""

    def __init__(self, url: str, status: int, message: str) -> None:
        super().__init__(f"collector {url} rejected the report (HTTP {status}: {message})")
        self.url = url
        self.status = status
        self.message = message


class Transport(Protocol):
    """Delivers encoded reports to a collector."""

    #: Where reports go, safe to log (no credentials).
    url: str

    def send(self, body: bytes) -> IngestResponse:
        """Deliver one encoded report; raises a :class:`TransportError`."""

    def close(self) -> None:
        """Drop connections (sending again reconnects)."""


def _error_text(data: bytes) -> str:
    try:
        doc = msgspec.json.decode(data)
    except msgspec.DecodeError:
        text = data.decode("utf-8", "replace").strip()
    else:
        text = str(doc["error"]) if isinstance(doc, dict) and "error" in doc else str(doc)
    return text[:_MAX_MESSAGE] or "no message"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host: {exc.strerror or exc}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


class HttpTransport:
    """POSTs reports to ``<collector>/api/v1/ingest`` over one kept-alive connection.

    Not thread-safe: the agent's one sender thread uses it.
    """

    def __init__(
        self,
        url: str,
        token: str | None,
        timeout: float = 5.0,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"collector URL must look like http://HOST:PORT, got {url!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        base = parts.path.rstrip("/")
        #: Where reports go, without any user:password part (safe to log).
        self.url = f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "") + base
        self._path = base + INGEST_PATH
        self._timeout = timeout
        self._ssl_context = ssl_context
        self._headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"cloudmon-agent/{__version__}",
        }
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._conn: http.client.HTTPConnection | None = None
        #: Connections opened so far (1 while keep-alive holds).
        self.connections_opened = 0

    def __repr__(self) -> str:
        return f"HttpTransport({self.url!r})"

    def _connect(self) -> http.client.HTTPConnection:
        self.connections_opened += 1
        if self._https:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=self._timeout, context=self._ssl_context
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)

    def send(self, body: bytes) -> IngestResponse:
        """POST one encoded report (or JSON array of reports); the collector's answer."""
        for attempt in (1, 2):
            fresh = self._conn is None
            if self._conn is None:
                self._conn = self._connect()
            conn = self._conn
            try:
                conn.request("POST", self._path, body=body, headers=self._headers)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                # The server may close an idle kept-alive connection at any
                # time; that shows up only when we next use it.  Retry once.
                if attempt == 1 and not fresh and isinstance(exc, _STALE):
                    continue
                raise CollectorUnreachable(self.url, _reason(exc)) from None
            if resp.will_close:
                self.close()
            return self._answer(resp.status, resp.reason, data)
        raise AssertionError("unreachable")  # pragma: no cover

    def _answer(self, status: int, reason: str, data: bytes) -> IngestResponse:
        if 200 <= status < 300:
            try:
                return msgspec.json.decode(data, type=IngestResponse)
            except msgspec.DecodeError as exc:
                # Not a cloudmon collector (wrong URL?), or a broken one.
                raise CollectorUnreachable(
                    self.url, f"unexpected answer to POST {self._path}: {exc}"
                ) from None
        message = _error_text(data)
        if status in (401, 403):
            raise AuthRejected(self.url, status, message)
        if status in (400, 413, 422):
            raise ReportRejected(self.url, status, message)
        raise CollectorUnreachable(self.url, f"HTTP {status} {reason}: {message}")

    def close(self) -> None:
        """Drop the connection (idempotent; the next send reconnects)."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()
