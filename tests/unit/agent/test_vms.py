"""VmCollector against libvirt's test:/// driver: the shared default host and a custom XML host."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from cloudmon_agent.schema import Vm

libvirt = pytest.importorskip("libvirt")

from cloudmon_agent.collectors.vms import VmCollector, hostdev_pci_addresses, parse_domain_xml  # noqa: E402

NODE_XML = Path(__file__).parent / "data" / "libvirt-test-node.xml"


class FakeClock:
    """A monotonic clock the test advances (rates need known elapsed time)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _validate(vms: list[Vm]) -> list[Vm]:
    return msgspec.json.decode(msgspec.json.encode(vms), type=list[Vm])


@pytest.fixture
def custom() -> Iterator[VmCollector]:
    c = VmCollector(f"test://{NODE_XML}")
    try:
        yield c
    finally:
        c.close()


def test_custom_host_reports_every_domain_with_its_state(custom: VmCollector) -> None:
    custom.prime()
    vms = {v.name: v for v in _validate(custom.collect())}
    assert set(vms) == {"web-1", "db-1", "paused-1", "off-1"}
    assert {n: v.state for n, v in vms.items()} == {
        "web-1": "running",
        "db-1": "running",
        "paused-1": "paused",
        "off-1": "shutoff",
    }
    assert {n: v.vcpus for n, v in vms.items()} == {"web-1": 2, "db-1": 4, "paused-1": 1, "off-1": 2}
    assert vms["db-1"].mem_max == 4194304 * 1024
    assert vms["db-1"].mem_current == 2097152 * 1024
    assert vms["web-1"].uuid == "11111111-2222-3333-4444-000000000001"
    # a shut-off guest: its configured figures, from the XML
    assert (vms["off-1"].mem_max, vms["off-1"].mem_current) == (1048576 * 1024, 524288 * 1024)


def test_cpu_is_zero_unless_running_and_rates_are_non_negative(custom: VmCollector) -> None:
    custom.prime()
    vms = {v.name: v for v in _validate(custom.collect())}
    assert vms["paused-1"].cpu_percent == 0.0
    assert vms["off-1"].cpu_percent == 0.0
    assert vms["off-1"].host_cpu_percent == 0.0
    # The test driver's CPU counter runs with wall time: a running guest shows CPU use.
    assert vms["web-1"].cpu_percent > 0
    # Host share = vCPU share * vcpus / host CPUs (8 in the XML).
    assert vms["web-1"].host_cpu_percent == pytest.approx(vms["web-1"].cpu_percent * 2 / 8, rel=0.3)
    running = vms["web-1"]
    assert [d.device for d in running.disks] == ["vda"]
    assert [n.name for n in running.nics] == ["testnet0"]
    for v in vms.values():
        for d in v.disks:
            assert min(d.read_bps, d.write_bps, d.read_iops, d.write_iops) >= 0
        for n in v.nics:
            assert min(n.rx_bps, n.tx_bps, n.rx_pps, n.tx_pps) >= 0
    assert running.mem_rss is not None
    assert running.mem_rss > 0
    assert vms["off-1"].disks == []
    assert vms["off-1"].mem_rss is None


def test_hostdev_gpus_are_listed_and_mapped_to_their_vm(custom: VmCollector) -> None:
    vms = {v.name: v for v in custom.collect()}
    assert vms["db-1"].hostdevs == ["0000:65:00.0"]
    assert vms["web-1"].hostdevs == []
    assert custom.gpu_owners() == {"0000:65:00.0": "db-1"}


def test_default_test_host_and_lifecycle_changes() -> None:
    # All test:///default connections in one process share state: restore what we change.
    c = VmCollector("test:///default")
    rw = libvirt.open("test:///default")
    dom = rw.lookupByName("test")
    try:
        c.prime()
        (vm,) = c.collect()
        assert (vm.name, vm.state, vm.vcpus) == ("test", "running", 2)
        assert vm.mem_max == 8388608 * 1024
        assert vm.mem_unused is not None
        dom.suspend()
        (vm,) = c.collect()
        assert (vm.state, vm.cpu_percent) == ("paused", 0.0)
        dom.resume()
        (vm,) = c.collect()
        assert vm.state == "running"
    finally:
        if dom.info()[0] == libvirt.VIR_DOMAIN_PAUSED:
            dom.resume()
        rw.close()
        c.close()


def test_unreachable_uri_gives_no_vms_logs_once_and_backs_off(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    c = VmCollector("test:///nonexistent/path/node.xml", clock=clock)
    try:
        with caplog.at_level(logging.INFO, logger="cloudmon_agent.collectors.vms"):
            assert c.collect() == []
            clock.t += 0.5  # inside the backoff: no new attempt, no new message
            assert c.collect() == []
            clock.t += 10  # past it: tries again, still failing, still one message
            assert c.collect() == []
    finally:
        c.close()
    warnings = [r for r in caplog.records if "cannot connect to libvirt" in r.getMessage()]
    assert len(warnings) == 1


def test_hostdev_parser_ignores_non_pci_and_bad_xml() -> None:
    xml = """<domain><devices>
      <hostdev mode='subsystem' type='usb'><source><vendor id='0x1'/></source></hostdev>
      <hostdev mode='subsystem' type='pci'><source>
        <address domain='0x0000' bus='0x3b' slot='0x00' function='0x1'/></source></hostdev>
    </devices></domain>"""
    assert hostdev_pci_addresses(xml) == ["0000:3b:00.1"]
    assert hostdev_pci_addresses("<not xml") == []


def test_agent_report_carries_every_section_and_flattens(tmp_path: Path) -> None:
    """default_collectors() as the agent uses it: one real report with host, VMs, processes, budget."""
    from cloudmon_agent.agent import Agent
    from cloudmon_agent.collectors import CollectorOptions, default_collectors
    from cloudmon_agent.config import AgentConfig
    from cloudmon_agent.schema import decode_report, encode, flatten

    cols = default_collectors(CollectorOptions(libvirt_uri=f"test://{NODE_XML}", processes_every_s=0.0))
    fields = [c.field for c in cols]
    assert fields[0] == "host"
    assert fields[-1] == "budget"
    assert {"processes", "vms", "containers", "gpus"} <= set(fields)
    with Agent(AgentConfig(state_dir=tmp_path / "state", name="n", node_id="n1"), collectors=cols) as agent:
        agent.prime()
        report = decode_report(encode(agent.sample()))
    assert {v.name for v in report.vms} == {"web-1", "db-1", "paused-1", "off-1"}
    assert report.processes is not None
    assert report.processes.count > 1
    assert report.budget is not None
    assert report.budget.budget_ms == 1.0
    # the VM's passed-through GPU is listed with its owner although NVML sees nothing here
    assert [(g.pci, g.vm) for g in report.gpus] == [("0000:65:00.0", "db-1")]
    flat = flatten(report)
    assert flat["vm.web-1.vcpus"] == 2.0
    assert flat["vm.off-1.cpu_percent"] == 0.0
    assert "vm.web-1.mem_rss" in flat
    assert "agent.budget.expected_ms" in flat
    assert not any(k.startswith(("process", "top")) for k in flat)  # top-N lists are not flattened
    for d in report.host.disks:
        assert f"disk.{d.name}.busy_percent" in flat
    for n in report.host.nics:
        assert f"net.{n.name}.rx_bps" in flat
    for p in report.host.pressure:
        assert flat[f"psi.{p.resource}.some_avg10"] == p.some_avg10
    assert len(flat) < 400


def test_domain_xml_memory_units_and_vcpus() -> None:
    x = parse_domain_xml(
        "<domain><memory unit='GiB'>2</memory><currentMemory unit='MiB'>512</currentMemory>"
        "<vcpu placement='static'>3</vcpu><devices><disk><target dev='sda'/></disk>"
        "<interface><mac address='52:54:00:aa:bb:cc'/></interface></devices></domain>"
    )
    assert (x.max_kib, x.cur_kib, x.vcpus) == (2 << 20, 512 << 10, 3)
    assert (x.disks, x.nics) == (["sda"], ["52:54:00:aa:bb:cc"])  # no target: the MAC names it


def _reference_parse(xml: str) -> tuple[list[str], list[str], list[str], int, int, int]:
    """The same fields read with ElementTree (what the agent did before it read expat directly)."""
    import xml.etree.ElementTree as ET

    units = {"KiB": 1024, "MiB": 1 << 20, "GiB": 1 << 30, "b": 1, "bytes": 1}
    root = ET.fromstring(xml)
    hostdevs = []
    for hd in root.iterfind("./devices/hostdev"):
        a = hd.find("./source/address")
        if hd.get("type") == "pci" and a is not None:
            d, b, s, f = (int(a.get(k, "0"), 0) for k in ("domain", "bus", "slot", "function"))
            hostdevs.append(f"{d:04x}:{b:02x}:{s:02x}.{f:x}")
    disks = [t.get("dev", "") for t in root.iterfind("./devices/disk/target")]
    nics = []
    for iface in root.iterfind("./devices/interface"):
        t, mac = iface.find("target"), iface.find("mac")
        nics.append(
            (t.get("dev") if t is not None else None) or (mac.get("address", "") if mac is not None else "")
        )

    def num(tag: str, scale: bool) -> int:
        el = root.find(tag)
        if el is None:
            return 0
        return int((el.text or "0").strip()) * (units[el.get("unit", "KiB")] // 1024 if scale else 1)

    mem = num("memory", True)
    return (
        hostdevs,
        [d for d in disks if d],
        [n for n in nics if n],
        mem,
        num("currentMemory", True) or mem,
        num("vcpu", False),
    )


def test_domain_xml_reader_agrees_with_elementtree_on_real_domain_definitions() -> None:
    import xml.etree.ElementTree as ET

    docs = []
    for name in ("libvirt-test-10vms.xml", "libvirt-test-node.xml"):
        node = ET.parse(Path(__file__).parent / "data" / name).getroot()
        docs += [ET.tostring(d, encoding="unicode") for d in node.iter("domain")]
    docs.append(
        "<domain type='kvm'><name>g</name><memory unit='KiB'>1048576</memory><vcpu>2</vcpu>"
        "<metadata><memory>9</memory></metadata><devices>"
        "<disk type='file'><source file='/a'/><target dev='vda' bus='virtio'/></disk>"
        "<disk type='file'><target dev='vdb'/></disk>"
        "<interface type='network'><mac address='52:54:00:00:00:01'/><target dev='vnet3'/></interface>"
        "<interface type='network'><mac address='52:54:00:00:00:02'/></interface>"
        "<hostdev mode='subsystem' type='pci'><source><address domain='0x0000' bus='0x65' slot='0x00' "
        "function='0x0'/></source></hostdev></devices></domain>"
    )
    assert len(docs) >= 12
    for doc in docs:
        x = parse_domain_xml(doc)
        assert (x.hostdevs, x.disks, x.nics, x.max_kib, x.cur_kib, x.vcpus) == _reference_parse(doc), doc[
            :200
        ]
    assert parse_domain_xml(docs[-1]).nics == ["vnet3", "52:54:00:00:00:02"]
    assert parse_domain_xml(docs[-1]).hostdevs == ["0000:65:00.0"]
