"""The agent's VM collector against a real QEMU guest under a real libvirtd (tests/integration/vmhost.py).

One module-wide lab: two libvirtd "hosts" in their own namespaces, joined by a
veth pair, and a 128 MiB TCG guest on the first. The guest idles until the test
tells it (over its serial console) to burn a vCPU, read its disk, send packets
or fill memory; the figures the agent reports must move with that work.
Run only these: ``pytest -m qemu``. Cold cache: the guest image is built once
(``apt-get download``), then kept in ``$CLOUDMON_TEST_CACHE`` or ``~/.cache/cloudmon-tests``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from cloudmon_agent.schema import Vm
from tests.integration import vmhost
from tests.integration.conftest import (
    INTEGRATION_TOKEN,
    ManagedProcess,
    StartCollectorProcess,
    agent_command,
    private_env,
    wait_until,
)

pytestmark = [pytest.mark.qemu, pytest.mark.integration]

T = TypeVar("T")
MiB = 1024 * 1024
# An idle TCG guest costs ≈ 5 % of its vCPU here, a busy one 50-100 % (less when
# the machine is loaded): the bounds leave room for both.
IDLE = 30.0
RISE = 25.0


@dataclass
class Lab:
    lab: vmhost.VmLab
    a: vmhost.VmHost
    b: vmhost.VmHost
    image: vmhost.GuestImage
    guest: vmhost.Guest


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    missing = vmhost.missing_prerequisites()
    if missing:
        pytest.skip("real QEMU guests need: " + ", ".join(missing))
    image = vmhost.ensure_guest_image()
    vl = vmhost.VmLab()
    try:
        a, b = vl.add_host("a"), vl.add_host("b")
        vl.link(a, b)
        vl.start()
        guest = a.start_guest("g0", image)
        yield Lab(vl, a, b, image, guest)
    finally:
        vl.close()
    left = list(vmhost.iter_leftovers(vl))
    assert not left, f"the lab left things behind: {left}"


def poll(sample: Callable[[], T], cond: Callable[[T], bool], timeout: float, what: str) -> T:
    """Take samples until ``cond`` holds; fail with the last one after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = sample()
    while not cond(last):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last sample {last!r}")
        time.sleep(0.25)
        last = sample()
    return last


# -------------------------------------------------------------------- in-process collector


class Sampler:
    """The agent's VmCollector, with the time of each sample so rates can be turned back into amounts."""

    def __init__(self, uri: str, name: str) -> None:
        from cloudmon_agent.collectors.vms import VmCollector

        self.times: list[float] = []
        self.collector = VmCollector(uri, clock=self._clock)
        self.name = name

    def _clock(self) -> float:
        self.times.append(time.monotonic())
        return self.times[-1]

    def sample(self) -> Vm:
        """This guest's Vm record from one collect() (one getAllDomainStats call)."""
        vms = {vm.name: vm for vm in self.collector.collect()}
        assert self.name in vms, f"guest {self.name} not reported; got {sorted(vms)}"
        return vms[self.name]

    def interval(self) -> float:
        """Seconds the last sample's rates cover."""
        return self.times[-1] - self.times[-2]

    def close(self) -> None:
        self.collector.close()


@pytest.fixture
def sampler(lab: Lab) -> Iterator[Sampler]:
    s = Sampler(lab.a.uri, lab.guest.name)
    try:
        s.collector.prime()
        yield s
    finally:
        s.close()


def test_reports_the_running_guest_as_configured(lab: Lab, sampler: Sampler) -> None:
    vm = sampler.sample()
    assert vm.state == "running"
    assert vm.uuid == lab.guest.domain().UUIDString()
    assert vm.vcpus == 1
    assert vm.mem_max == 128 * MiB
    assert vm.mem_current == 128 * MiB
    # A TCG QEMU process holds at least some of its guest's memory, and the
    # guest's balloon driver reports what it has unused.
    assert vm.mem_rss is not None
    assert vm.mem_rss > 16 * MiB
    poll(
        sampler.sample,
        lambda v: v.mem_unused is not None and 0 < v.mem_unused < 128 * MiB,
        20,
        "balloon stats",
    )
    assert [d.device for d in vm.disks] == ["vda"]
    assert [n.name for n in vm.nics] == [lab.guest.tap]
    assert 0.0 <= vm.cpu_percent <= 100.0
    # The other host's libvirtd does not have it: hosts are independent.
    assert lab.guest.name not in [d.name() for d in lab.b.conn().listAllDomains()]
    assert lab.a.conn().getHostname() != lab.b.conn().getHostname()


def test_cpu_percent_rises_while_the_guest_burns_a_vcpu(lab: Lab, sampler: Sampler) -> None:
    console = lab.guest.console
    idle = poll(sampler.sample, lambda v: v.cpu_percent < IDLE, 30, "an idle guest")
    console.command("cpu", "on")
    try:
        busy = poll(
            sampler.sample, lambda v: v.cpu_percent > idle.cpu_percent + RISE, 30, "CPU % of a busy guest"
        )
        assert busy.host_cpu_percent > idle.host_cpu_percent
    finally:
        console.command("cpu", "off")
    poll(sampler.sample, lambda v: v.cpu_percent < IDLE, 30, "CPU % back down after the loop stopped")


def test_disk_read_rate_shows_the_guest_reading_its_disk(lab: Lab, sampler: Sampler) -> None:
    idle = sampler.sample()
    # No filesystem on vda: nothing reads it unless told to.
    assert idle.disks[0].read_bps == 0
    lab.guest.console.command("disk")
    vm = sampler.sample()
    read = vm.disks[0].read_bps * sampler.interval()
    # The whole disk was read (after the guest dropped its caches) within this sample's interval.
    assert read >= lab.image.disk_bytes * 0.99, (read, vm)
    assert vm.disks[0].read_iops > 0
    assert vm.disks[0].write_bps == 0  # read-only disk


def test_network_rates_show_the_guests_packets(lab: Lab, sampler: Sampler) -> None:
    idle = sampler.sample()
    idle_bytes = (idle.nics[0].tx_bps + idle.nics[0].rx_bps) * sampler.interval()
    count = 200
    lab.guest.console.command("net", str(count))
    vm = sampler.sample()
    nic = vm.nics[0]
    # Each ping is a 1,028-byte IP packet out and its answer back (the host side of the tap answers).
    tx = nic.tx_bps * sampler.interval()
    rx = nic.rx_bps * sampler.interval()
    assert tx >= count * 1000, (tx, nic)
    assert rx >= count * 1000, (rx, nic)
    assert nic.tx_pps > 0
    assert nic.rx_pps > 0
    assert tx + rx > idle_bytes


def test_memory_figures_follow_the_guest_filling_its_memory(lab: Lab, sampler: Sampler) -> None:
    console = lab.guest.console
    before = poll(sampler.sample, lambda v: v.mem_unused is not None, 20, "balloon stats")
    assert before.mem_unused is not None
    assert before.mem_rss is not None
    unused0 = before.mem_unused
    fill = 40
    console.command("mem", str(fill))
    try:
        # The balloon driver reports every second; the guest's unused memory drops by the fill.
        after = poll(
            sampler.sample,
            lambda v: v.mem_unused is not None and v.mem_unused <= unused0 - (fill - 8) * MiB,
            20,
            "guest-reported unused memory to drop",
        )
        assert after.mem_rss is not None
        assert after.mem_rss >= before.mem_rss
    finally:
        console.command("mem", "0")
    poll(
        sampler.sample,
        lambda v: v.mem_unused is not None and v.mem_unused >= unused0 - 8 * MiB,
        20,
        "unused memory back after the fill was freed",
    )


# -------------------------------------------------------------------- the real agent process

# Until the agent's CLI takes --libvirt-uri, the same Agent runs from this script
# in its own process (what the CLI does, with the VM collector pointed at the lab).
_AGENT_SCRIPT = """
import signal, sys
from cloudmon_agent.agent import Agent
from cloudmon_agent.collectors import CollectorOptions, default_collectors
from cloudmon_agent.config import AgentConfig
url, token, state, uri = sys.argv[1:5]
cfg = AgentConfig(collector=url, token=token, interval=0.5, state_dir=state, node_id="vmnode")
opts = CollectorOptions(libvirt_uri=uri, top_n=0, containers=False, gpus=False)
agent = Agent(cfg, collectors=default_collectors(opts))
signal.signal(signal.SIGTERM, lambda *_: agent.stop())
try:
    agent.run()
finally:
    agent.close()
"""


def _agent_args(collector_url: str, state_dir: Path, uri: str) -> list[str]:
    """``cloudmon-agent --libvirt-uri URI ...`` where the CLI has the option, else the script above."""
    cmd = agent_command()
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60, check=False)
    if "--libvirt-uri" in out.stdout:
        args = [*cmd, "--collector", collector_url, "--token", INTEGRATION_TOKEN, "--interval", "0.5"]
        return [*args, "--state-dir", str(state_dir), "--node-id", "vmnode", "--libvirt-uri", uri]
    return [sys.executable, "-c", _AGENT_SCRIPT, collector_url, INTEGRATION_TOKEN, str(state_dir), uri]


def test_real_agent_process_reports_the_guest_to_a_real_collector(
    lab: Lab, tmp_path: Path, start_collector_process: StartCollectorProcess
) -> None:
    from cloudmon.client import ApiClient, ApiError

    collector = start_collector_process()
    log_path = tmp_path / "agent-vm.log"
    args = _agent_args(collector.url, tmp_path / "agent-state", lab.a.uri)
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        args, stdout=log_file, stderr=subprocess.STDOUT, env=private_env(tmp_path / "home"), cwd=tmp_path
    )
    agent = ManagedProcess("agent vmnode", proc, log_path, log_file)
    client = ApiClient(collector.url, INTEGRATION_TOKEN)
    p = f"vm.{lab.guest.name}."
    console = lab.guest.console
    try:

        def latest() -> dict[str, float]:
            try:
                return client.node("vmnode").latest
            except ApiError:  # the node is not registered yet
                return {}

        wait_until(lambda: p + "mem_max" in latest(), 60, "the guest in the agent's reports", agent)
        got = latest()
        assert got[p + "mem_max"] == 128 * MiB
        assert got[p + "mem_current"] == 128 * MiB
        assert got[p + "vcpus"] == 1
        assert got[p + "mem_rss"] > 16 * MiB
        wait_until(
            lambda: latest().get(p + "cpu_percent", 100) < IDLE, 60, "idle guest CPU % via the agent", agent
        )
        idle = latest()[p + "cpu_percent"]
        console.command("cpu", "on")
        try:
            wait_until(
                lambda: latest().get(p + "cpu_percent", 0) > idle + RISE,
                60,
                "busy guest CPU % via the agent",
                agent,
            )
        finally:
            console.command("cpu", "off")
        console.command("net", "200")
        wait_until(lambda: latest().get(p + "net_tx_bps", 0) > 0, 60, "guest packets via the agent", agent)
        console.command("disk")
        wait_until(
            lambda: latest().get(p + "disk_read_bps", 0) > 0, 60, "guest disk reads via the agent", agent
        )
    finally:
        client.close()
        agent.stop()


# -------------------------------------------------------------------- live migration


def test_live_migration_keeps_the_guest_running(lab: Lab) -> None:
    guest = lab.a.start_guest("g1", lab.image)
    boot_id = guest.console.boot_id
    up_before = float(guest.console.command("ping")[1])  # guest uptime, seconds
    guest.migrate(lab.b)
    assert guest.host is lab.b
    assert [d.name() for d in lab.a.conn().listAllDomains() if d.name() == "g1"] == []
    dom = lab.b.conn().lookupByName("g1")
    assert dom.isActive()
    assert dom.isPersistent()
    words = guest.console.command("ping")
    assert guest.console.boot_id == boot_id, "the guest rebooted instead of moving"
    assert words[0] == "up"
    assert float(words[1]) >= up_before
    # Still working on the new host: the collector pointed at b sees it running and busy.
    s = Sampler(lab.b.uri, "g1")
    try:
        s.collector.prime()
        guest.console.command("cpu", "on")
        vm = poll(s.sample, lambda v: v.cpu_percent > IDLE + RISE, 30, "CPU % of the migrated guest")
        assert vm.state == "running"
    finally:
        guest.console.command("cpu", "off")
        s.close()
