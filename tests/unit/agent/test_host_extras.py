"""Host extras: per-disk and per-NIC rates, pressure stall information and hwmon sensors.

Checked on a fake /proc + /sys tree with known counters, and on this machine's real ones.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from cloudmon_agent.collectors.host import HostCollector, PressureReader, SensorReader
from cloudmon_agent.schema import HostMetrics
from tests.unit.agent.test_host import FakeHost


def _validate(h: HostMetrics) -> HostMetrics:
    return msgspec.json.decode(msgspec.json.encode(h), type=HostMetrics)


def _diskstats(fake: FakeHost, rows: dict[str, tuple[int, int, int, int, int]]) -> None:
    # major minor name reads merged rsect rtime writes merged wsect wtime inflight io_ticks ...
    (fake.proc / "diskstats").write_text(
        "".join(
            f" 254 0 {n} {r} 0 {rs} 0 {w} 0 {ws} 0 0 {t} 0 0 0 0 0 0 0\n"
            for n, (r, rs, w, ws, t) in rows.items()
        )
    )


def _netdev(fake: FakeHost, rows: dict[str, tuple[int, ...]]) -> None:
    # rx: bytes packets errs drop fifo frame compressed multicast | tx: bytes packets errs drop ...
    head = (fake.proc / "net" / "dev").read_text().splitlines(keepends=True)[:2]
    body = "".join(
        f"{n:>6}:{rb} {rp} {re} {rd} 0 0 0 0 {tb} {tp} {te} {td} 0 0 0 0\n"
        for n, (rb, rp, re, rd, tb, tp, te, td) in rows.items()
    )
    (fake.proc / "net" / "dev").write_text("".join(head) + body)


def _pressure(proc: Path, res: str, some: tuple[float, int], full: tuple[float, int] | None) -> None:
    (proc / "pressure").mkdir(exist_ok=True)
    text = f"some avg10={some[0]:.2f} avg60=0.00 avg300=0.00 total={some[1]}\n"
    if full is not None:
        text += f"full avg10={full[0]:.2f} avg60=0.00 avg300=0.00 total={full[1]}\n"
    (proc / "pressure" / res).write_text(text)


@pytest.fixture
def fake(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path)


def test_per_disk_rates_and_busy_percent(fake: FakeHost) -> None:
    c = fake.collector()
    try:
        _diskstats(fake, {"vda": (10, 100, 20, 200, 1000), "loop0": (1, 1, 1, 1, 1)})
        c.prime()
        # 2 s later: +40 reads of 800 sectors, +10 writes of 400 sectors, 500 ms busy
        _diskstats(fake, {"vda": (50, 900, 30, 600, 1500), "loop0": (9, 9, 9, 9, 9)})
        fake.now += 2
        h = _validate(c.collect())
    finally:
        c.close()
    (vda,) = h.disks  # loop0 is not a physical disk
    assert vda.name == "vda"
    assert (vda.read_iops, vda.write_iops) == pytest.approx((20, 5))
    assert (vda.read_bps, vda.write_bps) == pytest.approx((800 * 512 / 2, 400 * 512 / 2))
    assert vda.busy_percent == pytest.approx(25.0)


def test_per_nic_rates_errors_and_drops(fake: FakeHost) -> None:
    c = fake.collector()
    try:
        _netdev(fake, {"eth0": (1000, 10, 0, 0, 2000, 20, 0, 0), "vnet0": (5, 5, 5, 5, 5, 5, 5, 5)})
        c.prime()
        _netdev(fake, {"eth0": (5000, 50, 4, 2, 4000, 30, 1, 3), "vnet0": (9, 9, 9, 9, 9, 9, 9, 9)})
        fake.now += 2
        h = _validate(c.collect())
    finally:
        c.close()
    (eth0,) = h.nics  # vnet0 is virtual; physical interfaces are counted when there are any
    assert (eth0.rx_bps, eth0.tx_bps, eth0.rx_pps, eth0.tx_pps) == (2000, 1000, 20, 5)
    assert (eth0.rx_errors_ps, eth0.tx_errors_ps, eth0.rx_drops_ps, eth0.tx_drops_ps) == (2, 0.5, 1, 1.5)


def test_pressure_from_fake_proc(fake: FakeHost) -> None:
    _pressure(fake.proc, "cpu", (3.5, 1_000_000), None)
    _pressure(fake.proc, "io", (1.0, 0), (0.5, 0))
    c = fake.collector()
    try:
        first = c.collect()
        assert {p.resource for p in first.pressure} == {"cpu", "io"}  # no memory file: left out
        assert all(p.some_percent == 0 for p in first.pressure)
        _pressure(fake.proc, "cpu", (4.0, 1_500_000), None)  # +0.5 s stalled over 5 s: 10 %
        _pressure(fake.proc, "io", (1.0, 200_000), (0.5, 100_000))
        fake.now += 2
        # Pressure (like filesystems and sensors) is read every 5 s: until then the last reading.
        assert c.collect().pressure == first.pressure
        fake.now += 3
        by = {p.resource: p for p in _validate(c.collect()).pressure}
    finally:
        c.close()
    assert (by["cpu"].some_avg10, by["cpu"].some_percent) == pytest.approx((4.0, 10.0))
    assert by["cpu"].full_avg10 is None
    assert by["cpu"].full_percent is None
    assert (by["io"].some_percent, by["io"].full_percent) == pytest.approx((4.0, 2.0))


def test_sensors_from_fake_hwmon(tmp_path: Path) -> None:
    chip = tmp_path / "sys" / "class" / "hwmon" / "hwmon0"
    chip.mkdir(parents=True)
    (chip / "name").write_text("coretemp\n")
    (chip / "temp1_input").write_text("45500\n")
    (chip / "temp1_label").write_text("Package id 0\n")
    (chip / "temp2_input").write_text("40000\n")
    (chip / "fan1_input").write_text("1200\n")
    (chip / "in0_input").write_text("900\n")  # a voltage: not reported
    r = SensorReader(str(tmp_path / "sys"))
    try:
        got = {(s.chip, s.label, s.kind): s.value for s in r.read()}
        (chip / "temp1_input").write_text("50000\n")
        again = {s.label: s.value for s in r.read()}
    finally:
        r.close()
    assert got == {
        ("coretemp", "Package id 0", "temp"): 45.5,
        ("coretemp", "temp2", "temp"): 40.0,
        ("coretemp", "fan1", "fan"): 1200.0,
    }
    assert again["Package id 0"] == 50.0  # kept-open files re-read


def test_no_hwmon_and_no_pressure_give_empty_lists(tmp_path: Path) -> None:
    s = SensorReader(str(tmp_path / "nosys"))
    p = PressureReader(str(tmp_path / "noproc"))
    try:
        assert s.read() == []
        assert p.read(1.0) == []
    finally:
        s.close()
        p.close()


@pytest.mark.skipif(not os.path.exists("/proc/diskstats"), reason="needs Linux /proc")
def test_real_host_extras() -> None:
    c = HostCollector()
    try:
        c.prime()
        h = _validate(c.collect())
    finally:
        c.close()
    assert {d.name for d in h.disks} == {
        n for n in os.listdir("/sys/block") if os.path.exists(f"/sys/block/{n}/device")
    }
    assert h.nics, "at least one interface is counted"
    if os.path.exists("/proc/pressure/cpu"):
        assert "cpu" in {p.resource for p in h.pressure}
    if not os.path.isdir("/sys/class/hwmon"):
        assert h.sensors == []
