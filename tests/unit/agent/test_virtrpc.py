"""The agent's libvirt RPC client against peers that misbehave (real Unix sockets, no libvirt needed).

What a real libvirtd answers is checked call by call in tests/integration/test_virtrpc.py;
here each peer speaks the framing (length word + 28-byte header) but breaks one rule:
garbage, a truncated body, an error too short to hold its code, bytes that trickle in,
a daemon that accepts and then never answers, a socket that wants SASL.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloudmon_agent.collectors import virtrpc
from cloudmon_agent.collectors.vms import VmCollector

HEAD = struct.Struct(">IIIiiIi")
#: (proc, serial, prog, vers) -> bytes to send back, or None to send nothing.
Answer = Callable[[int, int, int, int], bytes | None]


def reply(proc: int, serial: int, body: bytes, status: int = 0, prog: int = 0x20008086) -> bytes:
    return HEAD.pack(28 + len(body), prog, 1, proc, 1, serial, status) + body


def error_reply(proc: int, serial: int, message: str) -> bytes:
    """A daemon's error, as remote_error: code, domain, message, level, then empty optional fields."""
    m = message.encode()
    body = struct.pack(">iiI", 1, 0, 1) + struct.pack(">I", len(m)) + m + b"\0" * (-len(m) & 3)
    body += struct.pack(">i", 2) + struct.pack(">IIIIiiI", 0, 0, 0, 0, 0, 0, 0)
    return reply(proc, serial, body, status=1)


def handshake(proc: int, serial: int, prog: int, vers: int, auth: tuple[int, ...] = (0,)) -> bytes | None:
    """AUTH_LIST, CONNECT_OPEN and CONNECT_CLOSE as a daemon without authentication answers them."""
    if proc == 66:
        return reply(
            proc, serial, struct.pack(">I", len(auth)) + b"".join(struct.pack(">i", a) for a in auth)
        )
    if proc in (1, 2):
        return reply(proc, serial, b"")
    return None


class Peer:
    """A Unix-socket server in a thread: answers each request with ``answer``; stopped by the fixture."""

    def __init__(self, path: Path, answer: Answer) -> None:
        self.path = str(path)
        self.uri = f"qemu+unix:///system?socket={path}"
        self._answer = answer
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(self.path)
        self._srv.listen(4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-libvirtd")
        self._thread.start()

    def _serve(self) -> None:
        self._srv.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(0.1)
                buf = b""
                while not self._stop.is_set():
                    try:
                        chunk = conn.recv(65536)
                    except TimeoutError:
                        continue
                    except OSError:
                        break
                    if not chunk:
                        break
                    buf += chunk
                    while len(buf) >= 28:
                        length, prog, vers, proc, _t, serial, _s = HEAD.unpack_from(buf)
                        if len(buf) < length:
                            break
                        buf = buf[length:]
                        out = self._answer(proc, serial, prog, vers)
                        if out:
                            try:
                                conn.sendall(out)
                            except OSError:
                                break

    def close(self) -> None:
        self._stop.set()
        self._srv.close()
        self._thread.join(timeout=10)


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[Callable[[Answer], Peer]]:
    made: list[Peer] = []

    def make(answer: Answer) -> Peer:
        p = Peer(tmp_path / f"peer{len(made)}.sock", answer)
        made.append(p)
        return p

    try:
        yield make
    finally:
        for p in made:
            p.close()


def test_uri_mapping() -> None:
    assert virtrpc.supports("qemu:///system")
    assert virtrpc.supports("qemu:///session")
    assert virtrpc._socket_and_name("qemu+unix:///system?socket=/tmp/s&mode=direct") == (
        "/tmp/s",
        "qemu:///system",
    )
    assert virtrpc._socket_and_name("qemu:///system?socket=/tmp/s") == ("/tmp/s", "qemu:///system")
    assert virtrpc._socket_and_name("test+unix:///a/b.xml?socket=/tmp/s") == ("/tmp/s", "test:///a/b.xml")
    assert virtrpc._socket_and_name("qemu+unix:///system?socket=/s&name=qemu:///embed") == (
        "/s",
        "qemu:///embed",
    )
    path, name = virtrpc._socket_and_name("qemu:///system") or ("", "")
    assert path.startswith("/run/libvirt/")
    assert path.endswith("-sock-ro")
    assert name == "qemu:///system"
    # In-process drivers and remote transports stay with libvirt-python.
    for uri in (
        "test:///default",
        "qemu+ssh://h/system",
        "qemu+tls://h/system",
        "qemu+tcp://h/system",
        "",
        "xen",
    ):
        assert not virtrpc.supports(uri), uri


def test_missing_socket_and_garbage_peer_give_clear_errors(
    tmp_path: Path, peers: Callable[[Answer], Peer]
) -> None:
    with pytest.raises(virtrpc.libvirtError, match="Failed to connect socket"):
        virtrpc.openReadOnly(f"qemu+unix:///system?socket={tmp_path}/none")
    garbage = peers(lambda *_: b"\xff\xff\xff\xff" + b"\0" * 24)  # a length word far past the limit
    with pytest.raises(virtrpc.libvirtError, match="message of"):
        virtrpc.openReadOnly(garbage.uri)


def test_malformed_answers_never_escape_collect(peers: Callable[[Answer], Peer]) -> None:
    def truncated(proc: int, serial: int, prog: int, vers: int) -> bytes | None:
        # The bulk-stats body says 5 records and ends.
        return handshake(proc, serial, prog, vers) or reply(proc, serial, struct.pack(">I", 5))

    def short_error(proc: int, serial: int, prog: int, vers: int) -> bytes | None:
        # An error reply whose body cannot even hold its code.
        return handshake(proc, serial, prog, vers) or reply(proc, serial, b"\0\0", status=1)

    def other_procedure(proc: int, serial: int, prog: int, vers: int) -> bytes | None:
        return handshake(proc, serial, prog, vers) or reply(proc + 1, serial, b"")

    for answer in (truncated, short_error, other_procedure):
        c = VmCollector(peers(answer).uri, host_cpus=2)  # host_cpus: straight to the bulk call
        try:
            assert c._lv is virtrpc
            assert c.collect() == []  # no exception, no VMs
            assert c._conn is None  # dropped: the next try reconnects after a back-off
            assert c._next_try > 0
        finally:
            c.close()


def test_a_trickling_daemon_cannot_hold_a_call_past_its_deadline(peers: Callable[[Answer], Peer]) -> None:
    """Each read has a timeout, and so has the whole call: bytes that come slowly do not extend it."""
    peer = peers(handshake)
    conn = virtrpc.openReadOnly(peer.uri)
    conn.timeout = 0.6
    stop = threading.Event()
    # After the handshake, the other end of a socket pair stands in for the daemon and
    # sends a valid answer one byte every 0.2 s.
    a, b = socket.socketpair()
    assert conn._sock is not None
    conn._sock.close()
    conn._sock = a
    answer = reply(344, conn._serial + 1, struct.pack(">I", 0))

    def drip() -> None:
        for byte in answer:
            if stop.wait(0.2):
                return
            try:
                b.send(bytes([byte]))
            except OSError:
                return

    t = threading.Thread(target=drip)
    t.start()
    try:
        with pytest.raises(virtrpc.libvirtError, match=r"no complete answer within 0\.6 s|timed out"):
            conn.getAllDomainStats(0)  # the whole answer would take 6.4 s to drip in
    finally:
        stop.set()
        t.join(timeout=10)
        b.close()
        conn.close()


def test_a_daemon_that_hangs_after_connecting_is_retried_less_and_less_and_logged_once(
    peers: Callable[[Answer], Peer], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(virtrpc, "CALL_TIMEOUT_S", 0.3)
    hang = peers(
        lambda proc, serial, prog, vers: handshake(proc, serial, prog, vers)
    )  # never answers the bulk call
    now = [1000.0]
    c = VmCollector(hang.uri, host_cpus=2, clock=lambda: now[0])
    try:
        delays = []
        with caplog.at_level(logging.INFO, logger="cloudmon_agent.collectors.vms"):
            for _ in range(4):
                assert c.collect() == []
                delays.append(c._next_try - now[0])
                now[0] = c._next_try  # the next try is due
        assert delays == [2.0, 4.0, 8.0, 16.0]
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "will reconnect" in warnings[0].getMessage()
    finally:
        c.close()


def test_a_socket_that_wants_sasl_switches_to_libvirt_python(peers: Callable[[Answer], Peer]) -> None:
    libvirt = pytest.importorskip("libvirt")

    def sasl_only(proc: int, serial: int, prog: int, vers: int) -> bytes | None:
        # SASL offered; libvirt-python's next step (SASL init) gets a refusal, not silence.
        return handshake(proc, serial, prog, vers, auth=(1,)) or error_reply(proc, serial, "no SASL here")

    sasl = peers(sasl_only)
    with pytest.raises(virtrpc.libvirtError, match="SASL") as err:
        virtrpc.openReadOnly(sasl.uri)
    assert err.value.get_error_code() == virtrpc.AUTH_REQUIRED
    c = VmCollector(sasl.uri, host_cpus=2)
    try:
        started = time.monotonic()
        assert c.collect() == []  # libvirt-python cannot do SASL with this fake either: no VMs, no exception
        assert c._lv is libvirt
        assert time.monotonic() - started < 60
    finally:
        c.close()
