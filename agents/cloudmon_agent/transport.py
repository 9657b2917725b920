"""Pushing reports to the collector: HTTP(S) POST with keep-alive and a bearer token.

One :class:`HttpTransport` keeps one persistent connection (a new TCP/TLS
handshake per second per node would cost the collector about 40 % of its
throughput).  For ``http://`` it speaks the little HTTP/1.1 it needs itself
over a plain socket (:class:`_PlainConnection`): one ``sendall`` per request,
a status line, a few headers and a ``Content-Length`` (or chunked) body.  That
is about a third of ``http.client``'s CPU per request, and it keeps
``http.client``, the ``email`` parser and ``ssl`` (≈5.5 MiB RSS, mostly
libssl/libcrypto pages) out of the agent; ``https://`` still goes through
``http.client`` and ``ssl``, imported only then.  A kept-alive connection that the server has closed
in the meantime is detected on the next request and that request is retried
once on a fresh connection.  Failures are typed so the agent can react to
each: :class:`CollectorUnreachable` (retry later), :class:`AuthRejected` (the
token is wrong: retrying will not help until someone fixes it) and
:class:`ReportRejected` (this report is bad: drop it).

The token goes into the ``Authorization`` header and nowhere else: not into
logs, exception texts or ``repr``.
"""

from __future__ import annotations

import socket
import sys
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import urlsplit

from cloudmon_agent import __version__
from cloudmon_agent.schema import IngestResponse
from cloudmon_agent.wire import DecodeError, decode_any, decoder

if TYPE_CHECKING:
    import ssl

INGEST_PATH: Final = "/api/v1/ingest"
_MAX_MESSAGE: Final = 300
#: Largest response head / body the agent reads (the collector's answers are tiny).
_MAX_HEAD: Final = 64 << 10
_MAX_BODY: Final = 4 << 20
_decode_answer: Final = decoder(IngestResponse)


class _Disconnected(ConnectionError):
    """The server closed the connection before answering (an idle keep-alive it dropped)."""


class _BadResponse(ValueError):
    """The answer is not HTTP/1.x as this client reads it."""


_STALE: Final = (_Disconnected, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class _Answer:
    """What :meth:`_PlainConnection.post` (or the http.client path) got back."""

    __slots__ = ("body", "reason", "status", "will_close")

    def __init__(self, status: int, reason: str, body: bytes, will_close: bool) -> None:
        self.status = status
        self.reason = reason
        self.body = body
        self.will_close = will_close


class _PlainConnection:
    """One kept-alive HTTP/1.1 connection over a plain TCP socket: POST and read the answer."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout)
        # Request and answer are one small write each: no Nagle delay on them.
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()
        self._timeout = timeout

    def _settimeout(self, timeout: float) -> None:
        # Each settimeout() is an ioctl; the agent uses the same one or two values all day.
        if timeout != self._timeout:
            self._sock.settimeout(timeout)
            self._timeout = timeout

    def post(self, head: bytes, body: bytes, timeout: float) -> _Answer:
        self.send_request(head, body, timeout)
        return self._read_answer()

    def send_request(self, head: bytes, body: bytes, timeout: float) -> None:
        sock = self._sock
        self._settimeout(timeout)
        sock.sendall(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            sock.sendall(body)

    def read_answer(self, timeout: float) -> _Answer:
        self._settimeout(timeout)
        return self._read_answer()

    def _fill(self) -> bool:
        chunk = self._sock.recv(65536)
        if not chunk:
            return False
        self._buf += chunk
        return True

    def _read_answer(self) -> _Answer:
        buf = self._buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > _MAX_HEAD:
                raise _BadResponse("response head too large")
            if not self._fill():
                if buf:
                    raise _BadResponse("connection closed in the response head")
                raise _Disconnected("the server closed the connection without answering")
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        del buf[: end + 4]
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise _BadResponse(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        conn = headers.get("connection", "").lower()
        will_close = "close" in conn or (version == "HTTP/1.0" and "keep-alive" not in conn)
        status = int(code)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = self._read_chunked()
        elif "content-length" in headers:
            try:
                n = int(headers["content-length"])
            except ValueError:
                raise _BadResponse("bad Content-Length") from None
            if not 0 <= n <= _MAX_BODY:
                raise _BadResponse(f"Content-Length {n} out of range")
            body = self._read_exact(n)
        elif status in (204, 304) or 100 <= status < 200:
            body = b""
        else:  # delimited by the end of the connection
            while len(buf) <= _MAX_BODY and self._fill():
                pass
            body, will_close = bytes(buf), True
            buf.clear()
        return _Answer(status, reason, body, will_close)

    def _read_exact(self, n: int) -> bytes:
        buf = self._buf
        while len(buf) < n:
            if not self._fill():
                raise _BadResponse("connection closed in the response body")
        out = bytes(buf[:n])
        del buf[:n]
        return out

    def _read_line(self) -> bytes:
        buf = self._buf
        while (i := buf.find(b"\r\n")) < 0:
            if len(buf) > _MAX_HEAD or not self._fill():
                raise _BadResponse("bad chunked body")
        line = bytes(buf[:i])
        del buf[: i + 2]
        return line

    def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            try:
                size = int(self._read_line().split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BadResponse("bad chunk size") from None
            if size == 0:
                while self._read_line():  # trailers, up to the empty line
                    pass
                return b"".join(parts)
            total += size
            if total > _MAX_BODY:
                raise _BadResponse("chunked body too large")
            parts.append(self._read_exact(size))
            self._read_exact(2)  # the CRLF after the chunk

    def close(self) -> None:
        self._sock.close()


class _StdlibConnection:
    """``http.client`` for https:// (TLS); imported only when such a URL is used."""

    def __init__(self, host: str, port: int, timeout: float, context: ssl.SSLContext | None) -> None:
        import http.client

        self._conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
        self._conn.connect()

    def post(self, path: str, body: bytes, headers: dict[str, str], timeout: float) -> _Answer:
        import http.client

        conn = self._conn
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        try:
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except http.client.RemoteDisconnected as exc:
            raise _Disconnected(str(exc)) from None
        except http.client.HTTPException as exc:
            raise _BadResponse(str(exc) or type(exc).__name__) from None
        return _Answer(resp.status, resp.reason, data, bool(resp.will_close))

    def close(self) -> None:
        self._conn.close()


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

    def send(self, body: bytes, timeout: float | None = None) -> IngestResponse:
        """Deliver one encoded report; raises a :class:`TransportError`.

        ``timeout`` (seconds) overrides the transport's own for this call.
        """

    def close(self) -> None:
        """Drop connections (sending again reconnects)."""


def _error_text(data: bytes) -> str:
    try:
        doc = decode_any(data)
    except DecodeError:
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
    if isinstance(exc, _BadResponse):
        return f"bad HTTP answer: {exc}"
    ssl = sys.modules.get("ssl")  # only loaded (and only possible) with an https:// collector
    if ssl is not None and isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


class HttpTransport:
    """POSTs reports to ``<collector>/api/v1/ingest`` over one kept-alive connection.

    Not thread-safe: one thread at a time may use it (the agent hands it over
    under its own lock).
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
        host_header = host + (f":{parts.port}" if parts.port else "")
        # The constant part of every request, built once (Content-Length and the body follow).
        self._head = (
            f"POST {self._path} HTTP/1.1\r\nHost: {host_header}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in self._headers.items())
            + "Content-Length: "
        ).encode("latin-1")
        self._conn: Any = None  # _PlainConnection | _StdlibConnection
        self._last_answer: tuple[bytes, IngestResponse] = (b"", IngestResponse(accepted=0))
        #: Connections opened so far (1 while keep-alive holds).
        self.connections_opened = 0

    def __repr__(self) -> str:
        return f"HttpTransport({self.url!r})"

    def _connect(self, timeout: float) -> Any:
        self.connections_opened += 1
        if self._https:
            return _StdlibConnection(self._host, self._port, timeout, self._ssl_context)
        return _PlainConnection(self._host, self._port, timeout)

    def send(self, body: bytes, timeout: float | None = None) -> IngestResponse:
        """POST one encoded report (or JSON array of reports); the collector's answer."""
        limit = self._timeout if timeout is None else timeout
        for attempt in (1, 2):
            fresh = self._conn is None
            try:
                if self._conn is None:
                    self._conn = self._connect(limit)
                conn = self._conn
                if self._https:
                    answer = conn.post(self._path, body, self._headers, limit)
                else:
                    answer = conn.post(self._head + b"%d\r\n\r\n" % len(body), body, limit)
            except (OSError, _BadResponse) as exc:
                self.close()
                # The server may close an idle kept-alive connection at any
                # time; that shows up only when we next use it.  Retry once.
                if attempt == 1 and not fresh and isinstance(exc, _STALE):
                    continue
                raise CollectorUnreachable(self.url, _reason(exc)) from None
            if answer.will_close:
                self.close()
            return self._answer(answer.status, answer.reason, answer.body)
        raise AssertionError("unreachable")  # pragma: no cover

    def begin(self, body: bytes, timeout: float | None = None) -> bool:
        """Send one encoded report and return without waiting for the answer (read it with :meth:`finish`).

        The agent posts a report this way and reads the answer a cycle later, when
        it is long there: its sampling thread then never sleeps on the network, which
        saves a wake-up per cycle.  False (nothing sent) for https://, where the
        whole exchange goes through :meth:`send`.  Raises :class:`CollectorUnreachable`.
        """
        if self._https:
            return False
        limit = self._timeout if timeout is None else timeout
        head = self._head + b"%d\r\n\r\n" % len(body)
        for attempt in (1, 2):
            fresh = self._conn is None
            try:
                if self._conn is None:
                    self._conn = self._connect(limit)
                self._conn.send_request(head, body, limit)
            except OSError as exc:
                self.close()
                if attempt == 1 and not fresh and isinstance(exc, _STALE):
                    continue  # a kept-alive connection the server has closed: once more, fresh
                raise CollectorUnreachable(self.url, _reason(exc)) from None
            return True
        raise AssertionError("unreachable")  # pragma: no cover

    def finish(self, timeout: float | None = None) -> IngestResponse:
        """The answer to the report sent by :meth:`begin` (raises like :meth:`send`)."""
        limit = self._timeout if timeout is None else timeout
        conn = self._conn
        if conn is None:
            raise CollectorUnreachable(self.url, "the connection was closed before the answer came")
        try:
            answer = conn.read_answer(limit)
        except (OSError, _BadResponse) as exc:
            # The report may or may not have arrived: the agent sends it again, and
            # the collector keeps each (node, ts) once.
            self.close()
            raise CollectorUnreachable(self.url, _reason(exc)) from None
        if answer.will_close:
            self.close()
        return self._answer(answer.status, answer.reason, answer.body)

    def _answer(self, status: int, reason: str, data: bytes) -> IngestResponse:
        if 200 <= status < 300:
            if data == self._last_answer[0]:
                return self._last_answer[1]  # the common "accepted: 1" again: decoded once
            try:
                answer = _decode_answer(data)
            except DecodeError as exc:
                # Not a cloudmon collector (wrong URL?), or a broken one.
                raise CollectorUnreachable(
                    self.url, f"unexpected answer to POST {self._path}: {exc}"
                ) from None
            if not answer.commands:  # frozen; a command must be seen every time it comes
                self._last_answer = (data, answer)
            return answer
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
