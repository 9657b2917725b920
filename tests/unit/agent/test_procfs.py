"""ProcFile: one pread for a small file, the whole of a big one, a prefix up to a marker, reopen after errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cloudmon_agent.collectors.procfs import ProcFile


def test_small_big_and_changing_files_read_whole(tmp_path: Path) -> None:
    small, big = tmp_path / "small", tmp_path / "big"
    small.write_bytes(b"cpu 1 2 3\n")
    content = b"".join(b"line %05d %s\n" % (i, b"x" * 50) for i in range(1000))  # ~62 KB: several chunks
    big.write_bytes(content)
    f, g = ProcFile(str(small)), ProcFile(str(big))
    try:
        assert f.read() == b"cpu 1 2 3\n"
        assert g.read() == content
        small.write_bytes(b"cpu 4 5 6\n")  # rewritten in place: the kept descriptor sees it
        assert f.read() == b"cpu 4 5 6\n"
    finally:
        f.close()
        g.close()


def test_stop_at_returns_a_prefix_holding_the_marker(tmp_path: Path) -> None:
    p = tmp_path / "stat"
    head = b"".join(b"cpu%d 1 2 3 4\n" % i for i in range(400))  # > 2 KiB: not done after one read
    p.write_bytes(head + b"intr " + b"0 " * 20000 + b"\n")
    f = ProcFile(str(p), stop_at=b"\nintr")
    try:
        data = f.read()
    finally:
        f.close()
    assert data.startswith(head + b"intr")
    assert len(data) < len(p.read_bytes())


def test_real_proc_files_match_a_plain_read() -> None:
    # /proc/slabinfo (root only) is a seq_file of several pages: read in more than one pread.
    for path in ("/proc/meminfo", "/proc/net/dev", "/proc/diskstats", "/proc/self/mountinfo", "/proc/slabinfo"):
        if not os.access(path, os.R_OK):
            continue
        f = ProcFile(path)
        try:
            ours = f.read()
        finally:
            f.close()
        with open(path, "rb") as fh:
            theirs = fh.read()
        # Counters move between the two reads; the lines (records) must be the same ones.
        assert [ln.split()[:1] for ln in ours.splitlines()] == [
            ln.split()[:1] for ln in theirs.splitlines()
        ], path


def test_a_vanished_file_raises_and_is_reopened(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"a")
    f = ProcFile(str(p))
    try:
        assert f.read() == b"a"
        f.close()
        p.unlink()
        with pytest.raises(FileNotFoundError):
            f.read()
        p.write_bytes(b"b")
        assert f.read() == b"b"
    finally:
        f.close()
