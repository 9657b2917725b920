"""A read-only libvirt client in pure Python: the daemon's RPC protocol over its Unix socket.

Why: ``import libvirt`` alone costs the agent about 18 MiB of RSS (libvirt's C
library with GnuTLS, libxml2, GLib, ICU ... and a 10 000-line Python module),
more than the agent's whole budget.  On a VM host the agent only reads: it
asks the local daemon (``virtqemud`` or ``libvirtd``) for the bulk domain
statistics once a cycle, and for a domain's XML when the set of domains
changes.  Those few calls are spoken here directly, in libvirt's RPC protocol
(``src/rpc/virnetprotocol.x`` + ``src/remote/remote_protocol.x``: XDR, a
length word, a 24-byte header), over the same Unix socket libvirt's own remote
driver uses.  It costs ~0.3 MiB and no C library.

The module mimics the slice of libvirt-python the VM collector uses
(``openReadOnly``, ``libvirtError``, ``VIR_DOMAIN_STATS_*``, a connection's
``getAllDomainStats``/``getInfo``/``close`` and a domain's ``name``,
``UUIDString``, ``XMLDesc``, ``info``, ``memoryStats``, ``blockStats``,
``interfaceStats``), so :class:`~cloudmon_agent.collectors.vms.VmCollector`
runs unchanged on either.  :func:`supports` says which URIs it speaks:
local daemon URIs (``qemu:///system``, ``qemu:///session``, ``lxc:///system``
...) and ``DRIVER+unix:///PATH?socket=SOCK`` (e.g. a ``test:///`` driver
served by a daemon), over the read-only sockets, which ask for no
authentication or for polkit (whose default policy lets anyone monitor).
Everything else (``test:///`` in-process, ``+ssh``, ``+tls``, ``+tcp``, SASL)
goes through libvirt-python as before.

Robustness: every socket operation is bounded by :data:`CALL_TIMEOUT_S` and
every message by the protocol's own size limit (a bad length word drops the
connection); a reply to another procedure, or a body that does not decode,
raises :class:`libvirtError`, and the collector reconnects with back-off.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, Final, NoReturn, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

# -- constants the collector uses (same values as libvirt-python's) -------------
VIR_DOMAIN_STATS_STATE: Final = 1
VIR_DOMAIN_STATS_CPU_TOTAL: Final = 2
VIR_DOMAIN_STATS_BALLOON: Final = 4
VIR_DOMAIN_STATS_VCPU: Final = 8
VIR_DOMAIN_STATS_INTERFACE: Final = 16
VIR_DOMAIN_STATS_BLOCK: Final = 32

# -- protocol ------------------------------------------------------------------
_PROGRAM: Final = 0x20008086
_VERSION: Final = 1
_CALL: Final = 0
_REPLY: Final = 1
_OK: Final = 0
_ERROR: Final = 1
#: The protocol's own ceiling on one message (virnetprotocol.x VIR_NET_MESSAGE_MAX, 32 MiB).
_MESSAGE_MAX: Final = 32 << 20

_PROC_CONNECT_OPEN: Final = 1
_PROC_CONNECT_CLOSE: Final = 2
_PROC_NODE_GET_INFO: Final = 6
_PROC_DOMAIN_GET_XML_DESC: Final = 14
_PROC_DOMAIN_GET_INFO: Final = 16
_PROC_DOMAIN_BLOCK_STATS: Final = 64
_PROC_DOMAIN_INTERFACE_STATS: Final = 65
_PROC_AUTH_LIST: Final = 66
_PROC_AUTH_POLKIT: Final = 70
_PROC_DOMAIN_MEMORY_STATS: Final = 159
_PROC_CONNECT_GET_ALL_DOMAIN_STATS: Final = 344

#: Longest wait for the daemon's answer to one call (or one pipelined batch): a hung
#: daemon stalls the sampling thread at most this long per try (then the collector
#: backs off, 2 s ... 60 s).
CALL_TIMEOUT_S: Final = 3.0
#: :meth:`libvirtError.get_error_code` of a socket that wants SASL: only libvirt-python can go on.
AUTH_REQUIRED: Final = -2

#: Most calls written before their answers are read.
_BATCH_MAX: Final = 256

_AUTH_NONE: Final = 0
_AUTH_POLKIT: Final = 2
_VIR_CONNECT_RO: Final = 1
#: virDomainMemoryStatTags -> the names libvirt-python's memoryStats() uses.
_MEMORY_TAGS: Final = (
    "swap_in", "swap_out", "major_fault", "minor_fault", "unused", "available",
    "actual", "rss", "usable", "last_update", "disk_caches", "hugetlb_pgalloc", "hugetlb_pgfail",
)  # fmt: skip
_MEMORY_STATS_MAX: Final = 13

_T = TypeVar("_T")

_HEAD = struct.Struct(">IIIiiIi")  # length, prog, vers, proc, type, serial, status
_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_F64 = struct.Struct(">d")

#: Daemon sockets for a local URI's driver, tried in order (modular daemon first).
_DAEMONS: Final = {"qemu": "virtqemud", "lxc": "virtlxcd", "ch": "virtchd", "vbox": "virtvboxd"}
_RUN_DIR: Final = "/run/libvirt"


class libvirtError(Exception):
    """A libvirt RPC failure: the daemon's error, or the connection's."""

    def __init__(self, message: str, code: int = -1) -> None:
        super().__init__(message)
        self.code = code

    def get_error_code(self) -> int:
        return self.code


def _fail(message: str, code: int = -1) -> NoReturn:
    raise libvirtError(message, code)


def registerErrorHandler(_handler: Any, _ctx: Any) -> None:
    """Nothing to silence: this client prints nothing."""


# -- URIs ------------------------------------------------------------------------
def _socket_and_name(uri: str) -> tuple[str, str] | None:
    """(Unix socket path, URI name to open on the daemon), or None where this client cannot go."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return None
    driver, _, transport = parts.scheme.partition("+")
    if not driver or parts.netloc or transport not in ("", "unix"):
        return None
    query = parse_qsl(parts.query, keep_blank_values=True)
    given = dict(query)
    sock = given.get("socket")
    # The remote driver's own parameters stay here; the rest belong to the URI the daemon opens.
    rest = [(k, v) for k, v in query if k not in ("socket", "mode", "no_tty", "no_verify", "name")]
    name = given.get("name") or f"{driver}://{parts.path}" + (
        "?" + urlencode(rest, quote_via=quote) if rest else ""
    )
    if sock:
        return sock, name
    if driver == "test":
        return None  # test:/// runs inside the client library: no daemon to ask
    if parts.path == "/system":
        daemon = _DAEMONS.get(driver)
        names = ([f"{daemon}-sock-ro"] if daemon else []) + ["libvirt-sock-ro"]
        for n in names:
            path = f"{_RUN_DIR}/{n}"
            if os.path.exists(path):
                return path, name
        return f"{_RUN_DIR}/{names[-1]}", name
    if parts.path == "/session":
        base = os.environ.get("XDG_RUNTIME_DIR") or os.path.expanduser("~/.cache")
        daemon = _DAEMONS.get(driver)
        for n in ([f"{daemon}-sock"] if daemon else []) + ["libvirt-sock"]:
            path = f"{base}/libvirt/{n}"
            if os.path.exists(path):
                return path, name
        return f"{base}/libvirt/libvirt-sock", name
    return None


def supports(uri: str) -> bool:
    """True when this client can open ``uri`` (a local daemon over its Unix socket)."""
    return _socket_and_name(uri) is not None


# -- XDR -------------------------------------------------------------------------
def _string(s: str) -> bytes:
    b = s.encode()
    return _U32.pack(len(b)) + b + b"\0" * (-len(b) & 3)


class _Reader:
    """Sequential XDR decoding of one reply body."""

    __slots__ = ("buf", "off")

    def __init__(self, buf: bytes, off: int = 0) -> None:
        self.buf = buf
        self.off = off

    def u32(self) -> int:
        (v,) = _U32.unpack_from(self.buf, self.off)
        self.off += 4
        return int(v)

    def i32(self) -> int:
        (v,) = _I32.unpack_from(self.buf, self.off)
        self.off += 4
        return int(v)

    def u64(self) -> int:
        (v,) = _U64.unpack_from(self.buf, self.off)
        self.off += 8
        return int(v)

    def i64(self) -> int:
        (v,) = _I64.unpack_from(self.buf, self.off)
        self.off += 8
        return int(v)

    def string(self) -> str:
        n = self.u32()
        end = self.off + n
        if end > len(self.buf):
            raise libvirtError("libvirt reply truncated")
        s = self.buf[self.off : end].decode("utf-8", "replace")
        self.off = end + (-n & 3)
        return s

    def opt_string(self) -> str | None:
        return self.string() if self.u32() else None

    def domain(self) -> tuple[str, bytes, int]:
        name = self.string()
        uuid = self.buf[self.off : self.off + 16]
        self.off += 16
        return name, uuid, self.i32()

    def typed_params(self) -> dict[str, Any]:
        """``remote_typed_param params<>``: the hot loop of a bulk-stats reply."""
        buf = self.buf
        off = self.off
        u32 = _U32.unpack_from
        out: dict[str, Any] = {}
        (n,) = u32(buf, off)
        off += 4
        for _ in range(n):
            (ln,) = u32(buf, off)
            off += 4
            key = buf[off : off + ln].decode()
            off += ln + (-ln & 3)
            (t,) = u32(buf, off)
            off += 4
            if t == 4:  # ULLONG, by far the commonest
                (out[key],) = _U64.unpack_from(buf, off)
                off += 8
            elif t == 2:  # UINT
                (out[key],) = u32(buf, off)
                off += 4
            elif t == 3:
                (out[key],) = _I64.unpack_from(buf, off)
                off += 8
            elif t == 1:
                (out[key],) = _I32.unpack_from(buf, off)
                off += 4
            elif t == 6:
                (b,) = _I32.unpack_from(buf, off)
                out[key] = bool(b)
                off += 4
            elif t == 5:
                (out[key],) = _F64.unpack_from(buf, off)
                off += 8
            elif t == 7:
                (ls,) = u32(buf, off)
                off += 4
                out[key] = buf[off : off + ls].decode("utf-8", "replace")
                off += ls + (-ls & 3)
            else:
                raise libvirtError(f"libvirt reply has a typed parameter of unknown type {t}")
        if off > len(buf):
            raise libvirtError("libvirt reply truncated")
        self.off = off
        return out


_refs: dict[tuple[str, bytes, int], bytes] = {}


def _domain_ref(dom: tuple[str, bytes, int]) -> bytes:
    """A domain as a call's argument (kept: the same 10 domains are asked about every run)."""
    ref = _refs.get(dom)
    if ref is None:
        if len(_refs) > 4096:
            _refs.clear()
        ref = _refs[dom] = _string(dom[0]) + dom[1] + _I32.pack(dom[2])
    return ref


# -- connection --------------------------------------------------------------------
class virConnect:
    """One read-only connection to a libvirt daemon (not thread-safe: the collector owns it)."""

    def __init__(self, path: str, name: str, timeout: float | None = None) -> None:
        self.path = path
        #: Seconds the daemon has to answer one call (:data:`CALL_TIMEOUT_S` unless given).
        self.timeout = CALL_TIMEOUT_S if timeout is None else timeout
        self._serial = 0
        self._buf = bytearray()
        self._opened = False
        self._deadline = 0.0
        self._sock: socket.socket | None = None
        try:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.settimeout(self.timeout)
            self._sock.connect(path)
        except OSError as exc:
            self._abort()
            raise libvirtError(f"Failed to connect socket to '{path}': {exc.strerror or exc}") from None
        try:
            types = _parse(_decode_ints, self._call(_PROC_AUTH_LIST, b""))
            if types and _AUTH_NONE not in types:
                if _AUTH_POLKIT not in types:
                    _fail(
                        f"the libvirt socket {path} asks for SASL authentication, which only "
                        "libvirt-python speaks (install cloudmon-agent[libvirt])",
                        AUTH_REQUIRED,
                    )
                # polkit decides from this process's credentials (read-only monitoring is
                # allowed to everyone by libvirt's default policy): just ask.
                self._call(_PROC_AUTH_POLKIT, b"")
            self._call(_PROC_CONNECT_OPEN, _U32.pack(1) + _string(name) + _U32.pack(_VIR_CONNECT_RO))
        except BaseException:
            self._abort()
            raise
        self._opened = True

    # transport
    def _call(self, proc: int, args: bytes) -> bytes:
        """One request, its reply's body; the daemon's error as :class:`libvirtError`."""
        got = self._calls([(proc, args)])[0]
        if isinstance(got, libvirtError):
            raise got
        return got

    def _calls(self, calls: list[tuple[int, bytes]]) -> list[bytes | libvirtError]:
        """Several requests written at once, then their replies read (pipelined: one round trip).

        The daemon may answer in any order; each reply is matched by its serial.  A
        daemon's error for one call is returned in that call's place; a broken
        connection raises :class:`libvirtError` and closes it.
        """
        sock = self._sock
        if sock is None:
            raise libvirtError("the libvirt connection is closed")
        if self._serial + len(calls) >= 0xFFFFFFFF:
            self._serial = 0  # serials are 32 bits; none is outstanding between calls
        first = self._serial + 1
        self._serial += len(calls)
        out: list[bytes | libvirtError | None] = [None] * len(calls)
        # One deadline for the whole exchange, not one per read: a daemon that trickles
        # bytes cannot hold the sampling thread longer than this.
        self._deadline = time.monotonic() + self.timeout
        try:
            sock.settimeout(self.timeout)
            sock.sendall(
                b"".join(
                    _HEAD.pack(28 + len(args), _PROGRAM, _VERSION, proc, _CALL, first + i, _OK) + args
                    for i, (proc, args) in enumerate(calls)
                )
            )
            waiting = len(calls)
            buf = self._buf
            pos = 0  # replies are parsed in place; what was read is dropped once at the end
            while waiting:
                while len(buf) - pos < 28:
                    self._fill()
                length, prog, _vers, rproc, mtype, rserial, status = _HEAD.unpack_from(buf, pos)
                if not 28 <= length <= _MESSAGE_MAX:
                    _fail(f"libvirt sent a message of {length} bytes")
                while len(buf) - pos < length:
                    self._fill()
                body = bytes(buf[pos + 28 : pos + length])
                pos += length
                i = rserial - first
                if prog != _PROGRAM or mtype != _REPLY or not 0 <= i < len(calls) or out[i] is not None:
                    continue  # not an answer of ours (an event, a keepalive of another program): skip it
                if rproc != calls[i][0]:
                    _fail(f"libvirt answered procedure {rproc} to a call of {calls[i][0]}")
                if status == _ERROR:
                    r = _Reader(body)
                    code = r.i32()
                    r.i32()  # error domain
                    out[i] = libvirtError(r.opt_string() or f"libvirt error {code}", code)
                elif status == _OK:
                    out[i] = body
                else:
                    _fail(f"libvirt reply with status {status}")
                waiting -= 1
            del buf[:pos]
        except OSError as exc:
            self._abort()
            raise libvirtError(f"libvirt connection to {self.path} failed: {exc or 'timed out'}") from None
        except struct.error as exc:  # an error body too short to hold its code
            self._abort()
            raise libvirtError(f"malformed libvirt reply: {exc}") from None
        except libvirtError:
            self._abort()
            raise
        return [o if o is not None else libvirtError("no reply") for o in out]

    def _fill(self) -> None:
        """Append what the socket has (up to 256 KiB: usually several whole replies) to the buffer."""
        assert self._sock is not None
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete answer within {self.timeout:g} s")
        self._sock.settimeout(left)
        b = self._sock.recv(1 << 18)
        if not b:
            raise libvirtError(f"libvirt at {self.path} closed the connection")
        self._buf += b

    # the API the collector uses
    def getAllDomainStats(self, stats: int = 0, flags: int = 0) -> list[tuple[virDomain, dict[str, Any]]]:
        body = self._call(
            _PROC_CONNECT_GET_ALL_DOMAIN_STATS, _U32.pack(0) + _U32.pack(stats) + _U32.pack(flags)
        )

        def records(r: _Reader) -> list[tuple[virDomain, dict[str, Any]]]:
            # Each record: the domain, then its typed parameters (evaluated in that order).
            return [(virDomain(self, r.domain()), r.typed_params()) for _ in range(r.u32())]

        return _parse(records, body)

    def getInfo(self) -> list[Any]:
        return _parse(_decode_node_info, self._call(_PROC_NODE_GET_INFO, b""))

    def close(self) -> int:
        """Say goodbye to the daemon (briefly) and close the socket; safe to call twice."""
        if self._opened and self._sock is not None:
            self._opened = False
            self.timeout = min(self.timeout, 1.0)  # a goodbye is not worth waiting for
            with contextlib.suppress(libvirtError):
                self._call(_PROC_CONNECT_CLOSE, b"")
        self._abort()
        return 0

    def _abort(self) -> None:
        sock, self._sock = self._sock, None
        self._opened = False
        self._buf.clear()
        if sock is not None:
            sock.close()


class virDomain:
    """A domain as the bulk call named it (name, UUID, id)."""

    __slots__ = ("_conn", "_ref")

    def __init__(self, conn: virConnect, ref: tuple[str, bytes, int]) -> None:
        self._conn = conn
        self._ref = ref

    def name(self) -> str:
        return self._ref[0]

    def UUIDString(self) -> str:
        h = self._ref[1].hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def XMLDesc(self, flags: int = 0) -> str:
        body = self._conn._call(_PROC_DOMAIN_GET_XML_DESC, _domain_ref(self._ref) + _U32.pack(flags))
        return _parse(_Reader.string, body)

    def _one(self, what: str, *args: Any) -> Any:
        got = batch(self._conn, [(self, what, args)])[0]
        if isinstance(got, libvirtError):
            raise got
        return got

    def info(self) -> list[int]:
        return list(self._one("info"))

    def memoryStats(self) -> dict[str, int]:
        return dict(self._one("memoryStats"))

    def blockStats(self, path: str) -> tuple[int, ...]:
        return tuple(self._one("blockStats", path))

    def interfaceStats(self, path: str) -> tuple[int, ...]:
        return tuple(self._one("interfaceStats", path))


def batch(conn: virConnect, calls: list[tuple[virDomain, str, tuple[Any, ...]]]) -> list[Any]:
    """Per-domain calls (``(domain, "info" | "memoryStats" | "blockStats" | "interfaceStats", args)``)
    in one pipelined round trip; each result, or the :class:`libvirtError` of that call."""
    reqs: list[tuple[int, bytes]] = []
    for dom, what, args in calls:
        ref = _domain_ref(dom._ref)
        if what == "info":
            reqs.append((_PROC_DOMAIN_GET_INFO, ref))
        elif what == "memoryStats":
            reqs.append((_PROC_DOMAIN_MEMORY_STATS, ref + _U32.pack(_MEMORY_STATS_MAX) + _U32.pack(0)))
        elif what == "blockStats":
            reqs.append((_PROC_DOMAIN_BLOCK_STATS, ref + _string(args[0])))
        elif what == "interfaceStats":
            reqs.append((_PROC_DOMAIN_INTERFACE_STATS, ref + _string(args[0])))
        else:
            raise ValueError(f"no batched call {what!r}")
    bodies: list[bytes | libvirtError] = []
    for at in range(0, len(reqs), _BATCH_MAX):  # bounded, so neither side's buffers fill up
        bodies += conn._calls(reqs[at : at + _BATCH_MAX])
    out: list[Any] = []
    for (_, what, _), body in zip(calls, bodies, strict=True):
        if isinstance(body, libvirtError):
            out.append(body)
            continue
        out.append(_parse(_DECODE[what], body))
    return out


def _parse(decode: Callable[[_Reader], _T], body: bytes) -> _T:
    """``decode`` applied to a reply body; a body that does not decode is a :class:`libvirtError`."""
    try:
        return decode(_Reader(body))
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise libvirtError(f"malformed libvirt reply: {exc}") from None


def _decode_ints(r: _Reader) -> list[int]:
    return [r.i32() for _ in range(r.u32())]


def _decode_node_info(r: _Reader) -> list[Any]:
    # char model[32] is 32 XDR ints; memory is in KiB, libvirt-python gives MiB.
    model = bytes(r.i32() & 0xFF for _ in range(32)).split(b"\0", 1)[0].decode("ascii", "replace")
    memory_kib = r.u64()
    cpus, mhz, nodes, sockets, cores, threads = (r.i32() for _ in range(6))
    return [model, memory_kib >> 10, cpus, mhz, nodes, sockets, cores, threads]


# The fixed-layout replies are read with one struct call each (decoded once per VM per run).
_INFO: Final = struct.Struct(">IQQIQ")
_MEMORY_STAT: Final = struct.Struct(">iQ")  # XDR: int tag, unsigned hyper value (12 bytes)
_BLOCK: Final = struct.Struct(">5q")
_INTERFACE: Final = struct.Struct(">8q")


def _decode_info(r: _Reader) -> list[int]:
    out = list(_INFO.unpack_from(r.buf, r.off))
    r.off += _INFO.size
    return out


def _decode_memory(r: _Reader) -> dict[str, int]:
    n = r.u32()
    end = r.off + n * _MEMORY_STAT.size
    if end > len(r.buf):
        raise libvirtError("libvirt reply truncated")
    out = {
        _MEMORY_TAGS[tag]: val
        for tag, val in _MEMORY_STAT.iter_unpack(r.buf[r.off : end])
        if 0 <= tag < len(_MEMORY_TAGS)
    }
    r.off = end
    return out


def _decode_block(r: _Reader) -> tuple[int, ...]:
    out = _BLOCK.unpack_from(r.buf, r.off)
    r.off += _BLOCK.size
    return tuple(out)


def _decode_interface(r: _Reader) -> tuple[int, ...]:
    out = _INTERFACE.unpack_from(r.buf, r.off)
    r.off += _INTERFACE.size
    return tuple(out)


_DECODE: Final[dict[str, Callable[[_Reader], Any]]] = {
    "info": _decode_info,
    "memoryStats": _decode_memory,
    "blockStats": _decode_block,
    "interfaceStats": _decode_interface,
}


def openReadOnly(uri: str) -> virConnect:
    """A read-only connection to the daemon behind ``uri``; :class:`libvirtError` when it cannot be had."""
    target = _socket_and_name(uri)
    if target is None:
        raise libvirtError(f"{uri!r} is not a local libvirt daemon URI this client speaks")
    return virConnect(*target)
