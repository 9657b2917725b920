"""ProcessCollector: the real /proc with a real busy child, and the stat parser."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import msgspec
import pytest

from cloudmon_agent.collectors.processes import ProcessCollector, parse_stat
from cloudmon_agent.schema import ProcessTop

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def busy_child() -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield p
    finally:
        p.kill()
        p.wait(timeout=10)


def _wait_cpu_ticks(pid: int, ticks: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _, t, _, _ = parse_stat(open(f"/proc/{pid}/stat", "rb").read())  # noqa: SIM115
        if t >= ticks:
            return
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} did not reach {ticks} CPU ticks")


def test_parse_stat_handles_parentheses_and_spaces_in_names() -> None:
    data = b"42 (we ird) (x) S 1 42 42 0 -1 4194560 10 0 0 0 7 3 0 0 20 0 1 0 5555 1000 250 rest"
    assert parse_stat(data) == ("we ird) (x", 10, 5555, 250)


def test_busy_child_tops_the_cpu_list(busy_child: subprocess.Popen[bytes]) -> None:
    c = ProcessCollector(top_n=3, every_s=0.0)
    try:
        c.prime()
        first = c.collect()  # a rescan right away (every_s=0)
        _wait_cpu_ticks(busy_child.pid, 30)
        top = msgspec.json.decode(msgspec.json.encode(c.collect()), type=ProcessTop)
    finally:
        c.close()
    assert first.count > 1
    assert len(top.by_cpu) == 3
    assert len(top.by_mem) == 3
    assert busy_child.pid in [p.pid for p in top.by_cpu]
    assert top.by_cpu[0].cpu_percent > 10
    rss = [p.rss_bytes for p in top.by_mem]
    assert rss == sorted(rss, reverse=True)
    assert rss[0] > 0
    assert top.age_s < 5


def test_scans_only_every_n_seconds_and_reports_age(busy_child: subprocess.Popen[bytes]) -> None:
    clock = FakeClock()
    c = ProcessCollector(top_n=2, every_s=5.0, clock=clock)
    try:
        c.prime()
        clock.t += 2
        a = c.collect()
        assert a.age_s == pytest.approx(2.0)
        busy_child.kill()
        busy_child.wait(timeout=10)
        clock.t += 1
        b = c.collect()  # still the old scan
        assert b.age_s == pytest.approx(3.0)
        assert b.count == a.count
        clock.t += 2
        fresh = c.collect()  # 5 s since the scan: rescans, the dead child is gone
        assert fresh.age_s == pytest.approx(0.0)
        assert busy_child.pid not in c._prev
    finally:
        c.close()


def test_kept_open_files_are_closed_for_exited_processes_and_on_close(
    busy_child: subprocess.Popen[bytes],
) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    c = ProcessCollector(every_s=0.0, max_open=100_000)
    try:
        c.prime()
        kept = open_fds() - before
        assert kept >= 2  # at least the child's and our own stat files are kept open
        busy_child.kill()
        busy_child.wait(timeout=10)
        top = c.collect()
        assert busy_child.pid not in [p.pid for p in top.by_mem]
        assert open_fds() - before == top.count  # one kept file per live process, none for the dead
    finally:
        c.close()
    assert open_fds() == before
