"""The on-disk spool: order, acknowledgement, size bound, torn records, crash and reopen."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cloudmon_agent.spool import MAGIC, Spool, SpoolError, pending_records


def rec(i: int, size: int = 100) -> bytes:
    """A record that names its number and has ``size`` bytes."""
    head = f'{{"i":{i},"pad":"'.encode()
    return head + b"x" * max(0, size - len(head) - 2) + b'"}'


def num(r: bytes) -> int:
    return int(r.split(b",")[0].split(b":")[1])


def segments(d: Path) -> list[Path]:
    return sorted(d.glob("*.seg"))


def drain(sp: Spool, max_records: int = 1000) -> list[int]:
    out: list[int] = []
    while sp.pending:
        b = sp.read_batch(max_records)
        out += [num(r) for r in b.records]
        sp.ack(b)
    return out


def test_records_come_back_in_order_and_leave_only_when_acked(tmp_path: Path) -> None:
    with Spool(tmp_path, 1 << 20, segment_bytes=1000) as sp:
        for i in range(30):
            sp.append(rec(i))
        assert sp.pending == 30
        assert len(segments(tmp_path)) > 3  # spread over several segments
        first = sp.read_batch(7)
        assert [num(r) for r in first.records] == list(range(7))
        again = sp.read_batch(7)  # not acknowledged: the same records again
        assert again.records == first.records
        sp.ack(first)
        assert sp.pending == 23
        second = sp.read_batch(10)
        assert [num(r) for r in second.records] == list(range(7, 17))
        sp.ack(second)
        assert drain(sp, 5) == list(range(17, 30))
        assert sp.pending == 0
        assert segments(tmp_path) == []  # nothing lingers once everything is delivered
        sp.append(rec(99))
        assert drain(sp) == [99]


def test_batch_limits_records_and_bytes_but_returns_at_least_one(tmp_path: Path) -> None:
    with Spool(tmp_path, 1 << 20) as sp:
        for i in range(10):
            sp.append(rec(i, 1000))
        b = sp.read_batch(100, max_bytes=3500)
        assert [num(r) for r in b.records] == [0, 1, 2]
        assert b.size == 3000
        big = sp.read_batch(100, max_bytes=10)
        assert [num(r) for r in big.records] == [0]


def test_unacknowledged_records_survive_reopen_and_acks_persist(tmp_path: Path) -> None:
    with Spool(tmp_path, 1 << 20, segment_bytes=800) as sp:
        for i in range(20):
            sp.append(rec(i))
        sp.ack(sp.read_batch(5))
        sp.read_batch(5)  # read, never acknowledged (the answer was lost)
    with Spool(tmp_path, 1 << 20, segment_bytes=800) as sp:
        assert sp.pending == 15
        assert drain(sp, 4) == list(range(5, 20))
    with Spool(tmp_path, 1 << 20) as sp:
        assert sp.pending == 0
    assert pending_records(tmp_path) == []


def test_full_spool_drops_the_oldest_segment_and_counts(tmp_path: Path) -> None:
    max_bytes = 64 << 10
    with Spool(tmp_path, max_bytes, segment_bytes=8 << 10) as sp:
        for i in range(300):
            sp.append(rec(i, 1000))
            assert sp.stats().bytes <= max_bytes
        st = sp.stats()
        assert st.dropped > 0
        assert st.dropped + st.pending == 300
        kept = drain(sp)
    # What is left is the newest, contiguous, in order.
    assert kept == list(range(300 - len(kept), 300))
    assert sum(p.stat().st_size for p in segments(tmp_path)) == 0


def test_dropping_counts_only_unacknowledged_records(tmp_path: Path) -> None:
    with Spool(tmp_path, 64 << 10, segment_bytes=8 << 10) as sp:
        for i in range(5):
            sp.append(rec(i, 1000))
        sp.ack(sp.read_batch(3))  # 3 of the oldest segment are delivered
        for i in range(5, 200):
            sp.append(rec(i, 1000))
        st = sp.stats()
        assert st.dropped + st.pending == 200 - 3
        assert drain(sp)[-1] == 199


def test_a_record_larger_than_the_spool_is_dropped_and_counted(tmp_path: Path) -> None:
    with Spool(tmp_path, 64 << 10) as sp:
        sp.append(rec(1, 70 << 10))
        sp.append(rec(2))
        assert (sp.pending, sp.dropped) == (1, 1)
        assert drain(sp) == [2]


def test_a_torn_last_record_is_cut_off_and_appends_continue(tmp_path: Path) -> None:
    with Spool(tmp_path, 1 << 20) as sp:
        for i in range(3):
            sp.append(rec(i))
    (seg,) = segments(tmp_path)
    good = seg.stat().st_size
    with seg.open("ab") as fh:  # a record whose write was cut short by a crash
        fh.write((500).to_bytes(4, "little") + b"\x00\x00\x00\x00" + b"partial")
    assert [num(r) for r in pending_records(tmp_path)] == [0, 1, 2]  # the reader skips it too
    with Spool(tmp_path, 1 << 20) as sp:
        assert (sp.pending, sp.dropped) == (3, 1)
        assert seg.stat().st_size == good
        sp.append(rec(3))
        assert drain(sp) == [0, 1, 2, 3]


@pytest.mark.parametrize("cut", [1, 5, 9])
def test_a_half_written_header_is_cut_off(tmp_path: Path, cut: int) -> None:
    with Spool(tmp_path, 1 << 20) as sp:
        sp.append(rec(0))
    (seg,) = segments(tmp_path)
    full = seg.read_bytes()
    with Spool(tmp_path, 1 << 20) as sp:
        sp.append(rec(1))
    seg.write_bytes(seg.read_bytes()[: len(full) + cut])
    with Spool(tmp_path, 1 << 20) as sp:
        assert drain(sp) == [0]


def test_a_corrupt_record_is_detected_by_its_checksum(tmp_path: Path) -> None:
    with Spool(tmp_path, 1 << 20) as sp:
        for i in range(4):
            sp.append(rec(i))
    (seg,) = segments(tmp_path)
    data = bytearray(seg.read_bytes())
    data[-5] ^= 0xFF  # flip a byte in the last record's payload
    seg.write_bytes(bytes(data))
    with Spool(tmp_path, 1 << 20) as sp:
        assert sp.dropped == 1
        assert drain(sp) == [0, 1, 2]


def test_a_file_that_is_not_a_segment_is_removed_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "0000000000000001.seg").write_bytes(b"garbage that is not a spool")
    (tmp_path / "cursor").write_text("not numbers")
    with Spool(tmp_path, 1 << 20) as sp:
        assert sp.pending == 0
        sp.append(rec(7))
        assert drain(sp) == [7]


def test_the_spool_survives_sigkill_of_its_writer(tmp_path: Path) -> None:
    # A real crash: a child process appends and is killed without any cleanup.
    code = (
        "import os, signal, sys\n"
        "from cloudmon_agent.spool import Spool\n"
        "sp = Spool(sys.argv[1], 1 << 20, segment_bytes=4096, sync_every_s=3600)\n"
        "for i in range(50):\n"
        '    sp.append(b\'{"i":%d,"pad":"x"}\' % i)\n'
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL
    with Spool(tmp_path, 1 << 20) as sp:
        assert sp.pending == 50
        assert drain(sp, 7) == list(range(50))


def test_segments_start_with_the_magic_and_files_are_private(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool", 1 << 20) as sp:
        sp.append(rec(0))
    (seg,) = segments(tmp_path / "spool")
    assert seg.read_bytes().startswith(MAGIC)
    assert seg.stat().st_mode & 0o077 == 0


def test_unusable_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SpoolError, match=r"spool directory .*file/spool"):
        Spool(blocker / "spool")
    with pytest.raises(ValueError, match="at least"):
        Spool(tmp_path / "s", 1000)


def test_closed_spool_refuses_use(tmp_path: Path) -> None:
    sp = Spool(tmp_path, 1 << 20)
    sp.close()
    sp.close()
    with pytest.raises(SpoolError, match="closed"):
        sp.append(b"x")
    assert os.listdir(tmp_path) == []
