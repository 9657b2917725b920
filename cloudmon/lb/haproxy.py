"""A small client for HAProxy's runtime API (the admin "stats socket").

HAProxy must expose an admin-level socket in its ``global`` section, either a
Unix socket or a TCP one::

    global
        stats socket /run/haproxy/admin.sock mode 600 level admin
        stats socket 127.0.0.1:9999 level admin     # alternative: TCP

Every command opens a fresh connection and sends one line: that is HAProxy's
non-interactive mode, where it answers and closes the connection, so nothing is
left open between calls and a hung HAProxy costs at most ``timeout`` seconds.

HAProxy answers a successful ``set`` command with an empty line and a failed
one with a sentence ("No such server.", "No such backend.", ...); those
sentences become :class:`LbError` with the text and how to fix it.  A socket
that cannot be reached raises :class:`LbUnavailable`.

Parsing is pure and separate (:func:`parse_servers_state`,
:func:`parse_stat_csv`, :func:`merge_server_states`) so it is tested on output
captured from a real HAProxy 2.6.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import socket
import time
from dataclasses import dataclass
from typing import Final, Literal

log = logging.getLogger(__name__)

ServerAdminState = Literal["ready", "drain", "maint"]
SERVER_STATES: Final[tuple[ServerAdminState, ...]] = ("ready", "drain", "maint")

#: HAProxy's weight range for ``set server B/S weight N``.
MAX_WEIGHT: Final = 256

DEFAULT_TIMEOUT_S: Final = 2.0
_MAX_ANSWER_BYTES: Final = 16 * 1024 * 1024

# srv_admin_state bits (haproxy include/haproxy/server-t.h, enum srv_admin):
# FMAINT 0x01 forced maint, IMAINT 0x02 inherited maint, CMAINT 0x04 disabled in
# the config, FDRAIN 0x08 forced drain, IDRAIN 0x10 inherited drain, RMAINT 0x20
# DNS resolution failure.  HMAINT (0x40, FQDN set) is not a maintenance state.
_ADMIN_MAINT: Final = 0x01 | 0x02 | 0x04 | 0x20
_ADMIN_DRAIN: Final = 0x08 | 0x10
# srv_op_state (enum srv_state): 0 stopped, 1 starting, 2 running, 3 stopping.
_OP_STATES: Final = {0: "stopped", 1: "starting", 2: "running", 3: "stopping"}

# Names HAProxy accepts for proxies and servers; anything else (spaces, ';',
# newlines) could chain a second command onto ours, so it is refused.
_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


class LbError(Exception):
    """The load balancer refused a command or answered something unexpected.

    ``answer`` is HAProxy's own text (empty when there was none) and ``fix``
    says what to change; ``str()`` gives both.
    """

    def __init__(self, message: str, *, answer: str = "", fix: str = "") -> None:
        self.message = message
        self.answer = answer
        self.fix = fix
        text = message
        if answer:
            text += f" (HAProxy said: {answer!r})"
        if fix:
            text += f"; {fix}"
        super().__init__(text)


class LbUnavailable(LbError):
    """The runtime API socket cannot be reached (HAProxy down, wrong path, timeout)."""


@dataclass(frozen=True, slots=True)
class ServerState:
    """One server of a backend as HAProxy sees it right now.

    ``weight`` is the current (user) weight, ``initial_weight`` the one from
    the configuration.  ``state`` is the admin state cloudmon sets (ready,
    drain, maint); ``op_state`` is HAProxy's own health view ("running",
    "stopped", ...).  ``sessions`` is the number of current sessions (``scur``),
    ``total_sessions`` the cumulated count (``stot``) and ``queue`` the requests
    waiting for a connection slot (``qcur``).
    """

    backend: str
    name: str
    address: str
    weight: int
    initial_weight: int
    state: ServerAdminState
    admin_flags: int
    op_state: str
    status: str
    sessions: int
    total_sessions: int
    queue: int

    @property
    def outstanding(self) -> int:
        """In-flight plus queued requests: what "least outstanding requests" balances."""
        return self.sessions + self.queue


def check_name(kind: str, name: str) -> str:
    """``name`` if HAProxy could accept it as a ``kind`` name; :class:`LbError` otherwise."""
    if not _NAME.match(name):
        raise LbError(
            f"invalid HAProxy {kind} name {name!r}",
            fix="use the name from the HAProxy configuration (letters, digits, '-', '_', '.', ':')",
        )
    return name


def admin_state(flags: int) -> ServerAdminState:
    """The admin state (ready / drain / maint) of ``srv_admin_state`` bits."""
    if flags & _ADMIN_MAINT:
        return "maint"
    if flags & _ADMIN_DRAIN:
        return "drain"
    return "ready"


def parse_servers_state(text: str) -> list[dict[str, str]]:
    """Rows of ``show servers state [BACKEND]`` as dicts keyed by the header's field names.

    The answer is a format version line (``1``), a ``# field ...`` header and
    one space-separated line per server.
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2 or not lines[1].startswith("#"):
        raise LbError(
            "unexpected answer to 'show servers state'",
            answer=text.strip()[:200],
            fix="check that the socket belongs to HAProxy 1.6 or newer",
        )
    if lines[0].strip() != "1":
        log.warning("show servers state: format version %s, expected 1; parsing anyway", lines[0].strip())
    fields = lines[1].lstrip("#").split()
    rows = []
    for line in lines[2:]:
        values = line.split()
        if len(values) < len(fields):
            raise LbError(
                "truncated line in 'show servers state'",
                answer=line[:200],
                fix="retry; report it if it persists",
            )
        rows.append(dict(zip(fields, values, strict=False)))
    return rows


def parse_stat_csv(text: str) -> list[dict[str, str]]:
    """Rows of ``show stat`` (CSV with a ``# pxname,svname,...`` header) as dicts."""
    if not text.startswith("# "):
        raise LbError(
            "unexpected answer to 'show stat'",
            answer=text.strip()[:200],
            fix="check that the socket belongs to HAProxy",
        )
    reader = csv.DictReader(io.StringIO(text[2:]))
    return [row for row in reader if row.get("pxname")]


def _int(value: str | None, default: int = 0) -> int:
    try:
        return int(value) if value not in (None, "", "-") else default
    except ValueError:
        return default


def merge_server_states(
    backend: str, state_rows: list[dict[str, str]], stat_rows: list[dict[str, str]]
) -> list[ServerState]:
    """Join ``show servers state`` rows (state, weights) with ``show stat`` rows (sessions).

    Only servers of ``backend`` are kept (the FRONTEND/BACKEND summary lines of
    ``show stat`` are not servers); order is the configuration's.
    """
    stats = {
        row["svname"]: row
        for row in stat_rows
        if row.get("pxname") == backend and row.get("svname") not in ("FRONTEND", "BACKEND")
    }
    servers = []
    for row in state_rows:
        if row.get("be_name") != backend:
            continue
        name = row["srv_name"]
        stat = stats.get(name, {})
        flags = _int(row.get("srv_admin_state"))
        port = row.get("srv_port", "0")
        servers.append(
            ServerState(
                backend=backend,
                name=name,
                address=f"{row.get('srv_addr', '')}:{port}",
                weight=_int(row.get("srv_uweight")),
                initial_weight=_int(row.get("srv_iweight")),
                state=admin_state(flags),
                admin_flags=flags,
                op_state=_OP_STATES.get(_int(row.get("srv_op_state"), -1), "unknown"),
                status=stat.get("status", ""),
                sessions=_int(stat.get("scur")),
                total_sessions=_int(stat.get("stot")),
                queue=_int(stat.get("qcur")),
            )
        )
    return servers


# HAProxy's error sentences and what they mean for us.
_UNKNOWN_BACKEND = ("No such backend.", "Can't find backend.", "No such proxy.")
_NO_PERMISSION = ("Permission denied", "Unknown command")


class HaproxyRuntime:
    """HAProxy's runtime API over its admin socket: one short connection per command.

    ``address`` is a Unix socket path (``/run/haproxy/admin.sock`` or
    ``unix:/run/...``) or ``host:port`` for a TCP stats socket.  Thread-safe
    (nothing is shared between calls).
    """

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        if not address:
            raise LbError(
                "no HAProxy runtime socket address given",
                fix="set the service group's runtime address (a socket path or host:port)",
            )
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.address = address
        self.timeout = timeout
        self._unix: str | None
        self._tcp: tuple[str, int] | None
        if address.startswith("unix:"):
            self._unix, self._tcp = address.removeprefix("unix:"), None
        elif "/" in address or ":" not in address:
            self._unix, self._tcp = address, None
        else:
            host, _, port = address.rpartition(":")
            if not port.isdigit():
                raise LbError(
                    f"HAProxy runtime address {address!r} has no valid port",
                    fix="write it as host:port (TCP) or as a socket path",
                )
            self._unix, self._tcp = None, (host.strip("[]"), int(port))

    def __repr__(self) -> str:
        return f"HaproxyRuntime({self.address!r})"

    def close(self) -> None:
        """Nothing to release (every command has its own connection); here for symmetry."""

    # -- commands -----------------------------------------------------------------

    def command(self, line: str) -> str:
        """Send one command line and return HAProxy's whole answer (it closes the connection)."""
        if "\n" in line or ";" in line:
            raise LbError(f"refusing to send {line!r}: one command per call, no ';' or newline")
        deadline = time.monotonic() + self.timeout
        try:
            sock = self._connect()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise LbUnavailable(
                f"HAProxy runtime API at {self.address} is not reachable ({exc.strerror or exc})",
                fix="is haproxy running, with 'stats socket "
                f"{self.address} level admin' in its global section?",
            ) from exc
        except PermissionError as exc:
            raise LbUnavailable(
                f"no permission to open the HAProxy runtime socket {self.address}",
                fix="run cloudmon as the socket's owner or give the socket a group/mode that allows it",
            ) from exc
        except OSError as exc:
            raise LbUnavailable(
                f"HAProxy runtime API at {self.address} is not reachable ({exc})",
                fix="check the address and that haproxy is running",
            ) from exc
        chunks: list[bytes] = []
        size = 0
        try:
            with sock:
                sock.sendall(line.encode("ascii") + b"\n")
                while True:
                    sock.settimeout(max(0.001, deadline - time.monotonic()))
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > _MAX_ANSWER_BYTES:
                        raise LbError(f"HAProxy's answer to {line!r} exceeds {_MAX_ANSWER_BYTES} bytes")
        except TimeoutError as exc:
            raise LbUnavailable(
                f"HAProxy runtime API at {self.address} did not answer {line!r} within {self.timeout} s",
                fix="check that haproxy is not overloaded or stuck; raise the timeout if it is just slow",
            ) from exc
        except OSError as exc:
            raise LbUnavailable(
                f"HAProxy runtime API at {self.address} failed during {line!r}: {exc}",
                fix="check that haproxy is running",
            ) from exc
        answer = b"".join(chunks).decode("utf-8", "replace")
        log.debug("haproxy %s: %r -> %d bytes", self.address, line, len(answer))
        return answer

    def _connect(self) -> socket.socket:
        if self._unix is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self._unix)
            except BaseException:
                sock.close()
                raise
            return sock
        assert self._tcp is not None
        return socket.create_connection(self._tcp, timeout=self.timeout)

    def _check_answer(self, answer: str, what: str, backend: str, server: str | None = None) -> None:
        text = answer.strip()
        if not text:
            return
        if text in _UNKNOWN_BACKEND:
            raise LbError(
                f"HAProxy has no backend {backend!r}",
                answer=text,
                fix="set the service group's backend to a backend name from the HAProxy configuration",
            )
        if text == "No such server." and server is not None:
            raise LbError(
                f"HAProxy backend {backend!r} has no server {server!r}",
                answer=text,
                fix=f"map the instance to a server listed by 'show servers state {backend}'",
            )
        if any(text.startswith(p) for p in _NO_PERMISSION):
            raise LbError(
                f"HAProxy refused {what}",
                answer=text,
                fix="give the stats socket 'level admin' in haproxy's global section",
            )
        raise LbError(f"HAProxy refused {what}", answer=text)

    def show_servers(self, backend: str) -> list[ServerState]:
        """Every server of ``backend`` with its state, weight, sessions and queue.

        Two commands (``show servers state`` and ``show stat``), so the state and
        the session counts are a few microseconds apart, not one snapshot.
        """
        check_name("backend", backend)
        state_text = self.command(f"show servers state {backend}")
        if not state_text.lstrip().startswith("1"):
            self._check_answer(state_text, f"'show servers state {backend}'", backend)
        # "show stat <proxy> 4 -1": servers only (type 4), every server id.
        stat_text = self.command(f"show stat {backend} 4 -1")
        if not stat_text.startswith("# "):
            self._check_answer(stat_text, f"'show stat {backend}'", backend)
        return merge_server_states(backend, parse_servers_state(state_text), parse_stat_csv(stat_text))

    def server(self, backend: str, server: str) -> ServerState:
        """One server of ``backend``; :class:`LbError` if it has none by that name."""
        check_name("server", server)
        for state in self.show_servers(backend):
            if state.name == server:
                return state
        raise LbError(
            f"HAProxy backend {backend!r} has no server {server!r}",
            fix=f"map the instance to a server listed by 'show servers state {backend}'",
        )

    def set_weight(self, backend: str, server: str, weight: int) -> None:
        """``set server BACKEND/SERVER weight N`` (0..256; 0 sends no new traffic)."""
        check_name("backend", backend)
        check_name("server", server)
        if not 0 <= weight <= MAX_WEIGHT:
            raise LbError(f"weight {weight} for {backend}/{server} is outside 0..{MAX_WEIGHT}")
        answer = self.command(f"set server {backend}/{server} weight {int(weight)}")
        self._check_answer(answer, f"weight {weight} for {backend}/{server}", backend, server)
        log.info("haproxy %s: %s/%s weight %d", self.address, backend, server, weight)

    def set_state(self, backend: str, server: str, state: ServerAdminState) -> None:
        """``set server BACKEND/SERVER state ready|drain|maint``.

        ``drain`` stops new connections (persistent ones aside) and lets existing
        ones finish; ``maint`` also stops health checks; ``ready`` serves again.
        """
        check_name("backend", backend)
        check_name("server", server)
        if state not in SERVER_STATES:
            raise LbError(f"unknown server state {state!r}", fix="use one of ready, drain, maint")
        answer = self.command(f"set server {backend}/{server} state {state}")
        self._check_answer(answer, f"state {state} for {backend}/{server}", backend, server)
        log.info("haproxy %s: %s/%s state %s", self.address, backend, server, state)
