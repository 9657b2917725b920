"""The agent's own libvirt RPC client against a real libvirtd, checked call by call against libvirt-python.

One libvirtd (tests/integration/vmhost.py, no guests) serves libvirt's test driver
with the 10-domain host of the agent benchmark over its Unix socket
(``test+unix:///FILE?socket=SOCK``).  Both clients ask the same daemon the same
questions and must get the same answers; then the VM collector must report the
same VMs through either.  A peer that speaks garbage must give a clear error, not
a hang.  Needs root and libvirtd (as the QEMU tests do).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudmon_agent.collectors import virtrpc
from tests.integration import vmhost

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.integration

TEN_VMS = Path(__file__).resolve().parents[1] / "unit" / "agent" / "data" / "libvirt-test-10vms.xml"


@pytest.fixture(scope="module")
def daemon_uri() -> Iterator[str]:
    missing = [
        m for m in vmhost.missing_prerequisites() if "qemu" not in m.lower() and "kernel" not in m.lower()
    ]
    if missing:
        pytest.skip(f"cannot start libvirtd here: {missing}")
    lab = vmhost.VmLab(cgroups=False)
    try:
        host = lab.add_host("h0")
        lab.start()
        yield f"test+unix://{TEN_VMS}?socket={host.socket_path}"
    finally:
        lab.close()
    left = list(vmhost.iter_leftovers(lab))
    assert not left, f"the lab left things behind: {left}"


@pytest.fixture
def both(daemon_uri: str) -> Iterator[tuple[Any, Any]]:
    mine = virtrpc.openReadOnly(daemon_uri)
    theirs = libvirt.openReadOnly(daemon_uri)
    try:
        yield mine, theirs
    finally:
        mine.close()
        theirs.close()


def test_uri_mapping() -> None:
    assert virtrpc.supports("qemu:///system")
    assert virtrpc.supports("qemu:///session")
    assert virtrpc.supports("qemu+unix:///system?socket=/tmp/s")
    assert virtrpc._socket_and_name("qemu+unix:///system?socket=/tmp/s&mode=direct") == (
        "/tmp/s",
        "qemu:///system",
    )
    assert virtrpc._socket_and_name("test+unix:///a/b.xml?socket=/tmp/s") == ("/tmp/s", "test:///a/b.xml")
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


def test_bulk_stats_and_per_domain_calls_match_libvirt_python(both: tuple[Any, Any]) -> None:
    mine, theirs = both
    flags = 0x3F  # state, cpu, balloon, vcpu, interface, block
    got = mine.getAllDomainStats(flags)
    want = theirs.getAllDomainStats(flags)
    assert len(got) == len(want) == 10
    assert [(d.name(), d.UUIDString(), s) for d, s in got] == [(d.name(), d.UUIDString(), s) for d, s in want]
    assert mine.getInfo() == theirs.getInfo()
    for dom, _ in got:
        ref = theirs.lookupByUUIDString(dom.UUIDString())
        assert dom.XMLDesc(0) == ref.XMLDesc(0)
        a, b = dom.info(), ref.info()
        assert a[:4] == b[:4]  # the test driver's CPU time is the wall clock: it moves between calls
        assert abs(a[4] - b[4]) < 5e9
        assert {k: v for k, v in dom.memoryStats().items() if k != "last_update"} == {
            k: v for k, v in ref.memoryStats().items() if k != "last_update"
        }
        assert dom.blockStats("vda")[4] == ref.blockStats("vda")[4]  # errs; the counters move with time
    with pytest.raises(virtrpc.libvirtError, match="not a known interface") as err:
        got[0][0].interfaceStats("nope0")
    assert err.value.get_error_code() > 0
    # The connection is still good after the daemon's error.
    assert len(mine.getAllDomainStats(flags)) == 10


def test_vm_collector_reports_the_same_vms_through_either_client(daemon_uri: str) -> None:
    from cloudmon_agent.collectors.vms import VmCollector

    rpc = VmCollector(daemon_uri)
    lib = VmCollector(f"test://{TEN_VMS}")  # the same host, in process, through libvirt-python
    try:
        assert rpc._lv is virtrpc
        assert lib._lv is libvirt
        rpc.prime()
        lib.prime()

        def shape(vms: list[Any]) -> list[tuple[Any, ...]]:
            return sorted(
                (v.name, v.uuid, v.state, v.vcpus, v.mem_max, v.mem_current, v.mem_rss, v.mem_unused,
                 [d.device for d in v.disks], [n.name for n in v.nics])
                for v in vms
            )  # fmt: skip

        got = shape(rpc.collect())
        assert len(got) == 10
        assert got == shape(lib.collect())
    finally:
        rpc.close()
        lib.close()


def test_missing_socket_and_garbage_peer_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(virtrpc.libvirtError, match="Failed to connect socket"):
        virtrpc.openReadOnly(f"qemu+unix:///system?socket={tmp_path}/none")
    path = str(tmp_path / "bad.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"\xff\xff\xff\xff" + b"\0" * 24)  # a length word far past the protocol's limit
            conn.recv(4096)

    t = threading.Thread(target=serve)
    t.start()
    try:
        with pytest.raises(virtrpc.libvirtError, match="message of"):
            virtrpc.openReadOnly(f"qemu+unix:///system?socket={path}")
    finally:
        t.join(timeout=10)
        srv.close()


def test_a_truncated_reply_is_an_error_and_the_collector_reports_no_vms(tmp_path: Path) -> None:
    """A peer that speaks the framing but sends a bulk-stats body that ends early."""
    import struct

    from cloudmon_agent.collectors.vms import VmCollector

    path = str(tmp_path / "short.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            while True:
                head = conn.recv(28)
                if len(head) < 28:
                    return
                length, prog, vers, proc, _type, serial, _status = struct.unpack(">IIIiiIi", head)
                if length > 28:
                    conn.recv(length - 28)
                body = {66: struct.pack(">I", 0), 1: b"", 2: b""}.get(
                    proc, struct.pack(">I", 5)
                )  # 5 records, none sent
                conn.sendall(struct.pack(">IIIiiIi", 28 + len(body), prog, vers, proc, 1, serial, 0) + body)

    t = threading.Thread(target=serve)
    t.start()
    c = VmCollector(f"qemu+unix:///system?socket={path}", host_cpus=2)  # straight to the bulk call
    try:
        assert c._lv is virtrpc
        assert c.collect() == []  # the malformed answer drops the connection; no exception escapes
        assert c._conn is None
    finally:
        c.close()
        srv.close()
        t.join(timeout=10)
