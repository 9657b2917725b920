"""HostCollector: checked against the real /proc, and against a fake /proc tree with known counters."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import msgspec
import pytest

from cloudmon_agent.collectors.host import HostCollector, Mount, ProcSource, PsutilSource, select_mounts
from cloudmon_agent.schema import HostMetrics

LINUX = os.path.exists("/proc/stat")
needs_proc = pytest.mark.skipif(not LINUX, reason="needs Linux /proc")


def _meminfo_kb() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, rest = line.split(":", 1)
        out[key] = int(rest.split()[0])
    return out


def _validate(h: HostMetrics) -> HostMetrics:
    # The schema's own constraints (percent in 0..100, non-negative rates...).
    return msgspec.json.decode(msgspec.json.encode(h), type=HostMetrics)


# -- against the real /proc --------------------------------------------------


@needs_proc
def test_first_sample_primes_then_rates_are_non_negative() -> None:
    c = HostCollector()
    try:
        primed_before = c.primed
        first = c.collect()
        assert (primed_before, c.primed) == (False, True)
        assert first.cpu_percent == 0.0
        assert set(first.cpu_per_core) == {0.0}
        assert (first.disk_read_bps, first.disk_write_bps, first.net_rx_bps, first.net_tx_pps) == (0, 0, 0, 0)
        # Make some work so the second sample has something to measure.
        sum(i * i for i in range(300_000))
        second = _validate(c.collect())
        rates = [
            second.disk_read_bps, second.disk_write_bps, second.disk_read_iops, second.disk_write_iops,
            second.net_rx_bps, second.net_tx_bps, second.net_rx_pps, second.net_tx_pps,
        ]  # fmt: skip
        assert all(r >= 0 for r in rates)
        assert second.cpu_percent > 0  # we just burned CPU in this interval
    finally:
        c.close()


@needs_proc
def test_values_match_proc() -> None:
    c = HostCollector()
    try:
        c.prime()
        load_before = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
        h = _validate(c.collect())
        load_after = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    finally:
        c.close()
    mem = _meminfo_kb()
    assert h.mem_total == mem["MemTotal"] * 1024
    assert 0 < h.mem_available <= h.mem_total
    assert h.mem_used == h.mem_total - h.mem_available
    assert h.mem_percent == pytest.approx(100 * h.mem_used / h.mem_total)
    assert h.swap_total == mem["SwapTotal"] * 1024
    assert 0 <= h.swap_used <= h.swap_total
    if h.swap_total == 0:
        assert h.swap_percent == 0.0
    cpu_lines = [
        ln for ln in Path("/proc/stat").read_text().splitlines() if ln[:3] == "cpu" and ln[3].isdigit()
    ]
    assert len(h.cpu_per_core) == max(int(ln.split()[0][3:]) for ln in cpu_lines) + 1
    for got, lo, hi in zip((h.load1, h.load5, h.load15), load_before, load_after, strict=True):
        assert min(lo, hi) - 0.01 <= got <= max(lo, hi) + 0.01
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    assert abs(h.uptime_s - uptime) < 5
    roots = [fs for fs in h.filesystems if fs.mount == "/"]
    assert len(roots) == 1
    st = os.statvfs("/")
    assert roots[0].total == st.f_blocks * st.f_frsize
    assert 0 <= roots[0].used <= roots[0].total
    assert all(fs.fstype not in {"tmpfs", "proc", "sysfs", "cgroup", "devpts"} for fs in h.filesystems)


@needs_proc
def test_total_cpu_is_consistent_with_per_core() -> None:
    c = HostCollector()
    try:
        c.prime()
        sum(i * i for i in range(300_000))
        h = c.collect()
    finally:
        c.close()
    # The total is the time-weighted mean of the cores, so it lies between them.
    # (Not compared with the plain mean: over a window this short the cores'
    # jiffy deltas differ by a tick or two, which moves the plain mean by >5 %.)
    assert min(h.cpu_per_core) - 0.01 <= h.cpu_percent <= max(h.cpu_per_core) + 0.01


@needs_proc
def test_psutil_fallback_source_gives_the_same_shape() -> None:
    c = HostCollector(PsutilSource())
    try:
        c.prime()
        h = _validate(c.collect())
    finally:
        c.close()
    assert h.mem_total == _meminfo_kb()["MemTotal"] * 1024
    assert len(h.cpu_per_core) == os.cpu_count()
    assert any(fs.mount == "/" for fs in h.filesystems)


# -- against a fake /proc tree with known counters ----------------------------

STAT = """cpu  {t0}
cpu0 {c0}
cpu1 {c1}
intr 12345 0 0 0
ctxt 1
"""
MEMINFO = """MemTotal:        1000 kB
MemFree:          100 kB
MemAvailable:     400 kB
Buffers:           10 kB
Cached:           200 kB
SwapTotal:        {swap_total} kB
SwapFree:         {swap_free} kB
"""
NETDEV_HEAD = (
    "Inter-|   Receive                                                |  Transmit\n"
    " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n"
)


def _netline(name: str, rx: int, rxp: int, tx: int, txp: int) -> str:
    return f"{name:>6}:{rx} {rxp} 0 0 0 0 0 0 {tx} {txp} 0 0 0 0 0 0\n"


def _diskline(name: str, reads: int, rsect: int, writes: int, wsect: int) -> str:
    return f" 254 0 {name} {reads} 0 {rsect} 0 {writes} 0 {wsect} 0 0 0 0 0 0 0 0 0 0\n"


class FakeHost:
    """A /proc + /sys tree whose counters the test sets, and a clock it advances."""

    def __init__(self, root: Path, physical_nics: bool = True) -> None:
        self.proc = root / "proc"
        self.sys = root / "sys"
        (self.proc / "net").mkdir(parents=True)
        (self.proc / "self").mkdir()
        for disk, physical in (("vda", True), ("loop0", False), ("dm-0", False)):
            (self.sys / "block" / disk).mkdir(parents=True)
            if physical:
                (self.sys / "block" / disk / "device").mkdir()
        net = self.sys / "class" / "net"
        net.mkdir(parents=True)
        nics = {"lo": "virtual", "virbr0": "virtual", "vnet0": "virtual", "eth0": "pci0000:00/0000:00:03.0"}
        if not physical_nics:
            nics["eth0"] = "virtual"
        for nic, where in nics.items():
            target = self.sys / "devices" / where / "net" / nic
            target.mkdir(parents=True)
            (net / nic).symlink_to(target)
        (self.proc / "filesystems").write_text(
            "nodev\tsysfs\nnodev\ttmpfs\nnodev\tproc\n\text4\n\tsquashfs\n"
        )
        (self.proc / "self" / "mounts").write_text(
            f"/dev/vda / ext4 rw 0 0\nproc /proc proc rw 0 0\ntmpfs /run tmpfs rw 0 0\n"
            f"/dev/vdb {root} ext4 rw 0 0\n"
        )
        (self.proc / "uptime").write_text("1234.5 100.0\n")
        (self.proc / "loadavg").write_text("0.50 0.25 0.10 1/100 42\n")
        self.now = 100.0
        self.set(cpu=((0, 0), (0, 0)), disks={}, nics={})

    def clock(self) -> float:
        return self.now

    def set(
        self,
        cpu: tuple[tuple[int, ...], ...],
        disks: dict[str, tuple[int, int, int, int]],
        nics: dict[str, tuple[int, int, int, int]],
        swap: tuple[int, int] = (0, 0),
    ) -> None:
        def fields(v: tuple[int, ...]) -> str:
            return " ".join(str(x) for x in (*v, *([0] * (10 - len(v)))))

        padded = [(*v, *([0] * (10 - len(v)))) for v in cpu]
        total = tuple(sum(col) for col in zip(*padded, strict=True))
        # write_text keeps the inode, so the source's kept-open fds see it
        (self.proc / "stat").write_text(STAT.format(t0=fields(total), c0=fields(cpu[0]), c1=fields(cpu[1])))
        (self.proc / "meminfo").write_text(MEMINFO.format(swap_total=swap[0], swap_free=swap[1]))
        (self.proc / "diskstats").write_text("".join(_diskline(n, *v) for n, v in disks.items()))
        (self.proc / "net" / "dev").write_text(
            NETDEV_HEAD + "".join(_netline(n, *v) for n, v in nics.items())
        )

    def collector(self) -> HostCollector:
        return HostCollector(ProcSource(str(self.proc), str(self.sys)), clock=self.clock)


@pytest.fixture
def fake(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path)


def test_cpu_percent_per_core_and_total(fake: FakeHost) -> None:
    c = fake.collector()
    try:
        # user nice system idle iowait irq softirq steal guest guest_nice
        fake.set(cpu=((100, 0, 0, 100), (0, 0, 0, 200)), disks={}, nics={})
        c.prime()
        # core0: +30 user +10 steal +40 idle +20 iowait -> busy 40 of 100
        # core1: +100 system +200 idle -> busy 100 of 300; guest (inside user) not added again
        fake.set(cpu=((130, 0, 0, 140, 20, 0, 0, 10, 30), (0, 0, 100, 400)), disks={}, nics={})
        fake.now += 1
        h = c.collect()
    finally:
        c.close()
    assert h.cpu_per_core == pytest.approx([40.0, 100 / 3])
    assert h.cpu_percent == pytest.approx(100 * 140 / 400)  # weighted by each core's time


def test_disk_rates_count_physical_disks_only(fake: FakeHost) -> None:
    c = fake.collector()
    try:
        base = {
            "vda": (10, 100, 20, 200),
            "vda1": (10, 100, 20, 200),
            "loop0": (5, 5, 5, 5),
            "dm-0": (1, 1, 1, 1),
        }
        fake.set(cpu=((0, 0, 0, 1), (0, 0, 0, 1)), disks=base, nics={})
        c.prime()
        fake.set(
            cpu=((0, 0, 0, 2), (0, 0, 0, 2)),
            disks={k: (a + 50, b + 1000, c_ + 30, d + 4000) for k, (a, b, c_, d) in base.items()},
            nics={},
        )
        fake.now += 2.0
        h = c.collect()
    finally:
        c.close()
    assert h.disk_read_iops == pytest.approx(25.0)
    assert h.disk_read_bps == pytest.approx(1000 * 512 / 2)
    assert h.disk_write_iops == pytest.approx(15.0)
    assert h.disk_write_bps == pytest.approx(4000 * 512 / 2)


def test_net_rates_prefer_physical_interfaces(fake: FakeHost) -> None:
    c = fake.collector()
    try:
        base = {n: (1000, 10, 2000, 20) for n in ("lo", "eth0", "virbr0", "vnet0")}
        fake.set(cpu=((0, 0, 0, 1), (0, 0, 0, 1)), disks={}, nics=base)
        c.prime()
        fake.set(cpu=((0, 0, 0, 2), (0, 0, 0, 2)), disks={}, nics={n: (3000, 30, 6000, 60) for n in base})
        fake.now += 1.0
        h = c.collect()
    finally:
        c.close()
    # Only eth0: bridge and tap carry the same bytes again, lo is local.
    assert (h.net_rx_bps, h.net_rx_pps, h.net_tx_bps, h.net_tx_pps) == (2000, 20, 4000, 40)


def test_net_rates_without_physical_interfaces_count_all_but_loopback(tmp_path: Path) -> None:
    fake = FakeHost(tmp_path, physical_nics=False)  # a container: eth0 is a veth
    c = fake.collector()
    try:
        base = {n: (1000, 10, 2000, 20) for n in ("lo", "eth0", "vnet0")}
        fake.set(cpu=((0, 0, 0, 1), (0, 0, 0, 1)), disks={}, nics=base)
        c.prime()
        fake.set(cpu=((0, 0, 0, 2), (0, 0, 0, 2)), disks={}, nics={n: (2000, 20, 2000, 20) for n in base})
        fake.now += 1.0
        h = c.collect()
    finally:
        c.close()
    assert (h.net_rx_bps, h.net_rx_pps, h.net_tx_bps) == (2000, 20, 0)


def test_counter_wrap_new_device_and_vanished_device(fake: FakeHost) -> None:
    c = fake.collector()
    cpu = ((0, 0, 0, 1), (0, 0, 0, 1))
    try:
        fake.set(
            cpu=cpu, disks={"vda": (1000, 1000, 1000, 1000)}, nics={"eth0": (10**9, 10**6, 10**9, 10**6)}
        )
        c.prime()
        # eth0 counters reset (driver reload) and a new disk appears with a long history
        fake.set(
            cpu=cpu,
            disks={"vda": (1010, 1000, 1000, 1000), "sdb": (10**6, 10**6, 10**6, 10**6)},
            nics={"eth0": (500, 5, 500, 5)},
        )
        (fake.sys / "block" / "sdb" / "device").mkdir(parents=True)
        c._source.refresh()  # as the periodic refresh would
        fake.now += 1.0
        h1 = c.collect()
        # next interval: the new disk now counts from its primed value
        fake.set(
            cpu=cpu, disks={"vda": (1010, 1000, 1000, 1000), "sdb": (10**6 + 7, 10**6, 10**6, 10**6)}, nics={}
        )
        fake.now += 1.0
        h2 = c.collect()
    finally:
        c.close()
    assert h1.net_rx_bps == 0
    assert h1.net_tx_pps == 0
    assert h1.disk_read_iops == pytest.approx(10.0)  # the new disk's history is not a spike
    assert h2.disk_read_iops == pytest.approx(7.0)
    assert (h2.net_rx_bps, h2.net_tx_bps) == (0, 0)  # eth0 vanished: no error


def test_missing_data_gives_zeros_and_one_warning(fake: FakeHost, caplog: pytest.LogCaptureFixture) -> None:
    (fake.proc / "diskstats").unlink()
    c = fake.collector()
    try:
        with caplog.at_level(logging.WARNING, logger="cloudmon_agent.collectors.host"):
            for _ in range(5):
                fake.now += 1
                h = _validate(c.collect())
    finally:
        c.close()
    assert (h.disk_read_bps, h.disk_write_iops) == (0, 0)
    assert (h.swap_total, h.swap_used, h.swap_percent) == (0, 0, 0.0)
    assert h.mem_total == 1000 * 1024
    assert h.mem_available == 400 * 1024
    warnings = [r for r in caplog.records if "disk counters" in r.getMessage()]
    assert len(warnings) == 1


def test_swap_and_memory_from_meminfo(fake: FakeHost) -> None:
    fake.set(cpu=((0, 0, 0, 1), (0, 0, 0, 1)), disks={}, nics={}, swap=(2000, 500))
    c = fake.collector()
    try:
        h = c.collect()
    finally:
        c.close()
    assert (h.swap_total, h.swap_used) == (2000 * 1024, 1500 * 1024)
    assert h.swap_percent == pytest.approx(75.0)
    assert h.mem_used == 600 * 1024
    assert h.mem_percent == pytest.approx(60.0)
    assert (h.load1, h.load5, h.load15, h.uptime_s) == (0.5, 0.25, 0.1, 1234.5)
    # "/" and the real fs mounted at the tmp dir; /proc and /run (tmpfs) are skipped
    assert next(fs.mount for fs in h.filesystems) == "/"
    assert {fs.fstype for fs in h.filesystems} == {"ext4"}


def test_mount_list_is_refreshed_on_schedule_not_every_sample(fake: FakeHost, tmp_path: Path) -> None:
    c = fake.collector()
    extra = tmp_path / "data"
    extra.mkdir()
    try:
        before = [fs.mount for fs in c.collect().filesystems]
        with (fake.proc / "self" / "mounts").open("a") as fh:
            fh.write(f"/dev/vdc {extra} xfs rw 0 0\n")
        fake.now += 1
        assert [fs.mount for fs in c.collect().filesystems] == before
        fake.now += 30
        assert str(extra) in [fs.mount for fs in c.collect().filesystems]
    finally:
        c.close()


def test_select_mounts_keeps_real_filesystems_once() -> None:
    table = [
        ("overlay", "/", "overlay"),
        ("proc", "/proc", "proc"),
        ("tmpfs", "/dev/shm", "tmpfs"),
        ("/dev/vda", "/etc/hosts", "ext4"),  # docker bind mount of the host disk
        ("/dev/vda", "/var/lib/data", "ext4"),
        ("/dev/loop3", "/snap/core/1", "squashfs"),
        ("nas:/export", "/mnt/nas", "nfs4"),
        ("sshfs#me@h:", "/mnt/ssh", "fuse.sshfs"),
        ("tank/home", "/home", "zfs"),
        ("/dev/sdb1", "/mnt/usb", "ext4"),
        ("tmpfs", "/mnt/usb", "tmpfs"),  # mounted over /mnt/usb: the ext4 there is hidden
        ("/dev/sdc1", "/mnt/with space", "xfs"),
    ]
    nodev = frozenset({"proc", "tmpfs", "overlay", "nfs4", "zfs"})
    got = select_mounts(table, nodev)
    assert got == [
        Mount("/", "overlay", "overlay"),
        Mount("/etc/hosts", "ext4", "/dev/vda"),
        Mount("/home", "zfs", "tank/home"),
        Mount("/mnt/with space", "xfs", "/dev/sdc1"),
    ]


def test_mount_points_with_escaped_characters(fake: FakeHost, tmp_path: Path) -> None:
    spaced = tmp_path / "my disk"
    spaced.mkdir()
    with (fake.proc / "self" / "mounts").open("a") as fh:
        fh.write(f"/dev/vde {str(spaced).replace(' ', chr(92) + '040')} ext4 rw 0 0\n")
    c = fake.collector()
    try:
        mounts = [fs.mount for fs in c.collect().filesystems]
    finally:
        c.close()
    assert str(spaced) in mounts


def test_counters_of_the_known_devices_are_found_by_name_not_by_look_alikes(tmp_path: Path) -> None:
    """Only the known disks' and NICs' lines are parsed: long names start their line, veth0 is not eth0."""
    fake = FakeHost(tmp_path)
    net = fake.sys / "class" / "net"
    target = fake.sys / "devices" / "pci0000:00" / "0000:00:1f.6" / "net" / "enp0s31f6"
    target.mkdir(parents=True)
    (net / "enp0s31f6").symlink_to(target)
    vtarget = fake.sys / "devices" / "virtual" / "net" / "veth0"
    vtarget.mkdir(parents=True)
    (net / "veth0").symlink_to(vtarget)
    src = ProcSource(str(fake.proc), str(fake.sys))
    try:
        fake.set(
            cpu=((0, 0), (0, 0)),
            disks={"vda": (1, 2, 3, 4), "vda1": (9, 9, 9, 9), "loop0": (7, 7, 7, 7)},
            nics={"veth0": (5, 5, 5, 5), "eth0": (10, 20, 30, 40), "enp0s31f6": (1, 2, 3, 4)},
        )
        assert (fake.proc / "net" / "dev").read_text().count("\nenp0s31f6:") == 1  # starts its line
        disks, nics = src.disk_counters(), src.net_counters()
    finally:
        src.close()
    assert set(disks) == {"vda"}
    assert disks["vda"][2:] == (1, 3)  # reads, writes of vda itself, not of vda1
    assert set(nics) == {"eth0", "enp0s31f6"}
    assert nics["eth0"][0] == 10  # eth0's own line, not veth0's
    assert nics["enp0s31f6"][0] == 1
