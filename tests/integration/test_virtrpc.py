"""The agent's own libvirt RPC client against a real libvirtd, checked call by call against libvirt-python.

One libvirtd (tests/integration/vmhost.py, no guests) serves libvirt's test driver
with the 10-domain host of the agent benchmark over its Unix socket
(``test+unix:///FILE?socket=SOCK``).  Both clients ask the same daemon the same
questions and must get the same answers; then the VM collector must report the
same VMs through either.  Peers that misbehave are in
tests/unit/agent/test_virtrpc.py.  Needs root and libvirtd (as the QEMU tests do).
"""

from __future__ import annotations

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
        # The test driver's counters move with the clock: same fields, in the same order, within 0.1 %.
        for mine_stats, ref_stats in (
            (dom.blockStats("vda"), ref.blockStats("vda")),
            (dom.interfaceStats("testnet0"), ref.interfaceStats("testnet0")),
        ):
            assert len(mine_stats) == len(ref_stats)
            for a, b in zip(mine_stats, ref_stats, strict=True):
                assert a == pytest.approx(b, rel=1e-3)
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
