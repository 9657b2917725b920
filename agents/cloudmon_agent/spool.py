"""A bounded on-disk spool of encoded reports, kept while the collector is away.

Layout (in ``<state_dir>/spool/``)::

    0000000000000001.seg   append-only segment files, oldest first
    0000000000000002.seg
    cursor                 "<segment id> <offset>": where the unacknowledged records start

A segment starts with the 8-byte magic ``CMSPOOL1`` and holds records, each
``<length u32 LE><crc32 u32 LE><payload>``.  The checksum covers the payload, so a
record torn by a crash (SIGKILL or power loss in the middle of a write) is detected
when the spool is opened: the tail from the first bad record on is cut off (and
logged), never replayed and never fatal.

Why these choices:

* *Append-only segments* make each spooled report one ``write()`` (the data is in
  the kernel's page cache when it returns, so it survives SIGKILL of the agent) and
  make dropping the oldest data when the spool is full a single ``unlink`` of the
  oldest segment.
* *Acknowledge, then forget*: :meth:`Spool.read_batch` only reads; records leave
  the spool when :meth:`Spool.ack` is called after the collector answered 200.  The
  cursor file is replaced atomically (write, rename).  A crash between the
  collector's 200 and the cursor update replays that batch once more; the
  collector stores each ``(node, ts)`` once, so that costs nothing but bandwidth.
* *fsync policy*: ``fdatasync`` costs ≈ 95 µs CPU and ≈ 280 µs wall per call on the
  reference machine (a ``write()`` of a 3 kB report ≈ 2.5 µs), so the spool syncs at
  most once per ``sync_every_s`` (default 1 s) and when a segment is sealed or the
  spool closed.  A killed agent loses nothing that was written; a power loss
  loses at most the last ``sync_every_s`` seconds of spooled reports.
* *Bounded memory*: the spool keeps only per-segment sizes and counts in memory;
  batches are read from disk, capped by record count and bytes.

The spool is not thread-safe: the agent's sender thread is its only user.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
import time
import zlib
from pathlib import Path
from typing import Final

from cloudmon_agent.wire import Struct

log = logging.getLogger(__name__)

MAGIC: Final = b"CMSPOOL1"
_HEADER: Final = struct.Struct("<II")
_SEGMENT_RE: Final = re.compile(r"^(\d{16})\.seg$")
CURSOR_FILE: Final = "cursor"
#: Largest record accepted (a report is a few kB; this guards against a corrupt length).
MAX_RECORD: Final = 16 << 20
MIN_SPOOL_BYTES: Final = 64 << 10


class SpoolError(Exception):
    """The spool directory cannot be used (not writable, ...); the text says which path."""


class Batch(Struct, frozen=True):
    """Records read from the spool, oldest first, and where the next unread record starts."""

    records: list[bytes]
    end_segment: int
    end_offset: int
    #: Bytes of the records (payload only).
    size: int

    def __len__(self) -> int:
        return len(self.records)


class _Segment(Struct):
    id: int
    size: int  # bytes in the file (magic included)
    count: int  # records in the file


class SpoolStats(Struct, frozen=True):
    """What the spool holds and has lost."""

    #: Records waiting to be replayed.
    pending: int
    #: Bytes on disk (segments, including already acknowledged parts of the oldest).
    bytes: int
    #: Records dropped since the spool was opened (oldest first when full, or torn/corrupt).
    dropped: int


def _segment_name(seg_id: int) -> str:
    return f"{seg_id:016d}.seg"


class Spool:
    """An on-disk FIFO of byte records bounded by ``max_bytes`` (oldest segment dropped when full).

    Opening it scans the existing segments (checksums), cuts a torn tail, and
    reads the cursor, so a spool left by a killed agent is replayed by the next
    one.  Raises :class:`SpoolError` if the directory cannot be created or read.
    """

    def __init__(
        self,
        directory: Path | str,
        max_bytes: int = 64 << 20,
        *,
        segment_bytes: int | None = None,
        sync_every_s: float = 1.0,
    ) -> None:
        if max_bytes < MIN_SPOOL_BYTES:
            raise ValueError(f"spool max_bytes must be at least {MIN_SPOOL_BYTES}, got {max_bytes}")
        self.path = Path(directory)
        self.max_bytes = max_bytes
        # Eight or more segments: dropping the oldest then frees about 1/8 of the spool.
        self._segment_bytes = segment_bytes or max(16 << 10, min(4 << 20, max_bytes // 8))
        self._sync_every = sync_every_s
        self._segments: list[_Segment] = []
        self._fd: int | None = None  # the newest segment, open for appending
        self._dirty = False
        self._last_sync = 0.0
        self._cursor_seg = 0
        self._cursor_off = len(MAGIC)
        self._acked_in_first = 0  # records of the cursor's segment before the cursor
        self._pending = 0
        self._bytes = 0
        self.dropped = 0
        self._closed = False
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._load()
        except OSError as exc:
            raise SpoolError(
                f"spool directory {self.path}: {exc.strerror or exc}; make it writable or choose "
                "another state_dir"
            ) from None

    # -- opening -----------------------------------------------------------------

    def _load(self) -> None:
        ids = sorted(int(m.group(1)) for n in os.listdir(self.path) if (m := _SEGMENT_RE.match(n)))
        cur_seg, cur_off = self._read_cursor()
        for seg_id in ids:
            size, count, before = self._scan(seg_id, cur_off if seg_id == cur_seg else None)
            if size is None:
                continue
            if seg_id < cur_seg:
                # Fully acknowledged but not yet removed (crash between cursor and unlink).
                self._unlink(seg_id)
                continue
            self._segments.append(_Segment(seg_id, size, count))
            if seg_id == cur_seg:
                self._acked_in_first = before
        if self._segments:
            first = self._segments[0]
            if first.id != cur_seg:
                self._cursor_seg, self._cursor_off, self._acked_in_first = first.id, len(MAGIC), 0
            else:
                self._cursor_seg, self._cursor_off = cur_seg, min(cur_off, first.size)
        else:
            self._cursor_seg = (ids[-1] + 1) if ids else 1
            self._cursor_off = len(MAGIC)
        self._pending = sum(s.count for s in self._segments) - self._acked_in_first
        self._bytes = sum(s.size for s in self._segments)
        if self._pending:
            log.info("spool %s holds %d report(s) to replay", self.path, self._pending)

    def _read_cursor(self) -> tuple[int, int]:
        try:
            text = (self.path / CURSOR_FILE).read_text(encoding="ascii")
            seg, off = (int(x) for x in text.split())
        except FileNotFoundError:
            return 0, len(MAGIC)
        except (ValueError, UnicodeDecodeError):
            log.warning("spool cursor %s is unreadable; replaying the whole spool", self.path / CURSOR_FILE)
            return 0, len(MAGIC)
        return seg, max(off, len(MAGIC))

    def _scan(self, seg_id: int, cursor: int | None) -> tuple[int | None, int, int]:
        """Validate a segment: (good size or None if unusable, records, records before ``cursor``).

        A torn or corrupt tail is cut off so appends continue after the last good record.
        """
        path = self.path / _segment_name(seg_id)
        with open(path, "r+b") as fh:
            if fh.read(len(MAGIC)) != MAGIC:
                log.warning("spool segment %s has no spool header; removing it", path)
                fh.close()
                self._unlink(seg_id)
                return None, 0, 0
            off = len(MAGIC)
            count = before = 0
            while True:
                head = fh.read(_HEADER.size)
                if not head:
                    break
                bad = len(head) < _HEADER.size
                if not bad:
                    length, crc = _HEADER.unpack(head)
                    bad = length > MAX_RECORD
                    if not bad:
                        payload = fh.read(length)
                        bad = len(payload) < length or zlib.crc32(payload) != crc
                if bad:
                    fh.seek(0, os.SEEK_END)
                    cut = fh.tell() - off
                    log.warning(
                        "spool segment %s: torn or corrupt record at offset %d; dropping its last %d bytes",
                        path,
                        off,
                        cut,
                    )
                    fh.truncate(off)
                    self.dropped += 1
                    break
                if cursor is not None and off < cursor:
                    before += 1
                off += _HEADER.size + length
                count += 1
        return off, count, before

    # -- state --------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Records waiting to be replayed (no disk access)."""
        return self._pending

    def __len__(self) -> int:
        return self._pending

    def stats(self) -> SpoolStats:
        """Counts kept in memory (no disk access)."""
        return SpoolStats(self._pending, self._bytes, self.dropped)

    # -- writing -------------------------------------------------------------------

    def append(self, record: bytes) -> None:
        """Add one record at the end, dropping the oldest segments if the spool would overflow.

        A record larger than the whole spool is dropped (and counted) itself.
        """
        self._check_open()
        size = _HEADER.size + len(record)
        if size + len(MAGIC) > self.max_bytes or len(record) > MAX_RECORD:
            self.dropped += 1
            log.warning(
                "a report of %d bytes does not fit in the spool (%d bytes); dropped",
                len(record),
                self.max_bytes,
            )
            return
        while self._segments and self._bytes + size > self.max_bytes:
            self._drop_oldest()
        seg = self._segments[-1] if self._segments else None
        if seg is None or (seg.size + size > self._segment_bytes and seg.count):
            seg = self._new_segment()
        data = _HEADER.pack(len(record), zlib.crc32(record)) + record
        try:
            self._ensure_fd()
            assert self._fd is not None
            os.write(self._fd, data)
        except OSError as exc:
            # Disk full or gone: keep what is there and count the loss (never crash the sender).
            self.dropped += 1
            self._close_fd()
            log.warning("cannot write to the spool %s (%s); report dropped", self.path, exc.strerror or exc)
            with contextlib.suppress(OSError):
                os.truncate(self.path / _segment_name(seg.id), seg.size)
            return
        seg.size += size
        seg.count += 1
        self._bytes += size
        self._pending += 1
        self._dirty = True
        now = time.monotonic()
        if now - self._last_sync >= self._sync_every:
            self._sync(now)

    def _new_segment(self) -> _Segment:
        if self._fd is not None:
            self._sync(time.monotonic())
            self._close_fd()
        seg_id = self._segments[-1].id + 1 if self._segments else self._cursor_seg
        path = self.path / _segment_name(seg_id)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        os.write(fd, MAGIC)
        self._fd = fd
        seg = _Segment(seg_id, len(MAGIC), 0)
        self._segments.append(seg)
        self._bytes += len(MAGIC)
        if len(self._segments) == 1:
            self._cursor_seg, self._cursor_off, self._acked_in_first = seg_id, len(MAGIC), 0
        return seg

    def _ensure_fd(self) -> None:
        if self._fd is None and self._segments:
            path = self.path / _segment_name(self._segments[-1].id)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)

    def _drop_oldest(self) -> None:
        seg = self._segments.pop(0)
        lost = seg.count - self._acked_in_first
        self.dropped += lost
        self._pending -= lost
        self._bytes -= seg.size
        if not self._segments:
            self._close_fd()
        self._unlink(seg.id)
        nxt = self._segments[0].id if self._segments else seg.id + 1
        self._cursor_seg, self._cursor_off, self._acked_in_first = nxt, len(MAGIC), 0
        log.warning(
            "spool %s full (%d bytes): dropped the oldest %d report(s)", self.path, self.max_bytes, lost
        )

    def _sync(self, now: float) -> None:
        if self._fd is not None and self._dirty:
            with contextlib.suppress(OSError):
                os.fdatasync(self._fd)
        self._dirty = False
        self._last_sync = now

    # -- reading and acknowledging ------------------------------------------------------

    def read_batch(self, max_records: int = 1000, max_bytes: int = 512 << 10) -> Batch:
        """The oldest unacknowledged records (at least one if any, within both limits); nothing is removed."""
        self._check_open()
        records: list[bytes] = []
        total = 0
        seg_i = 0
        off = self._cursor_off
        end_seg, end_off = self._cursor_seg, off
        while seg_i < len(self._segments) and len(records) < max_records:
            seg = self._segments[seg_i]
            if seg_i:
                off = len(MAGIC)
            if off >= seg.size:
                seg_i += 1
                continue
            full = False
            with open(self.path / _segment_name(seg.id), "rb") as fh:
                fh.seek(off)
                while off < seg.size and len(records) < max_records:
                    head = fh.read(_HEADER.size)
                    length, crc = _HEADER.unpack(head)
                    if records and total + length > max_bytes:
                        full = True
                        break
                    payload = fh.read(length)
                    if len(payload) < length or zlib.crc32(payload) != crc:
                        # Changed under us (disk corruption): skip the rest of this segment.
                        log.warning("spool segment %s corrupt at offset %d; skipping its rest", fh.name, off)
                        lost = self._records_from(seg, off)
                        self.dropped += lost
                        self._pending -= lost
                        seg.count -= lost
                        seg.size = off
                        break
                    records.append(payload)
                    total += length
                    off += _HEADER.size + length
            end_seg, end_off = seg.id, off
            if full:
                break
            seg_i += 1
        return Batch(records, end_seg, end_off, total)

    def _records_from(self, seg: _Segment, off: int) -> int:
        n = 0
        with open(self.path / _segment_name(seg.id), "rb") as fh:
            fh.seek(off)
            while off < seg.size:
                head = fh.read(_HEADER.size)
                if len(head) < _HEADER.size:
                    break
                length = _HEADER.unpack(head)[0]
                fh.seek(length, os.SEEK_CUR)
                off += _HEADER.size + length
                n += 1
        return max(n, 1)

    def ack(self, batch: Batch) -> None:
        """Forget ``batch`` (the collector has it): advance the cursor and remove finished segments."""
        self._check_open()
        if not batch.records or not self._segments or batch.end_segment < self._segments[0].id:
            return  # nothing, or its segments were dropped meanwhile (spool full)
        n = len(batch.records)
        while self._segments and self._segments[0].id < batch.end_segment:
            seg = self._segments.pop(0)
            n -= seg.count - self._acked_in_first
            self._acked_in_first = 0
            self._bytes -= seg.size
            self._unlink(seg.id)
        self._acked_in_first += max(n, 0)
        self._pending -= len(batch.records)
        self._cursor_seg, self._cursor_off = batch.end_segment, batch.end_offset
        first = self._segments[0]
        if self._pending <= 0:
            # Everything delivered: start afresh so no file lingers.
            self._pending = 0
            last_id = self._segments[-1].id
            self._close_fd()
            for s in self._segments:
                self._unlink(s.id)
            self._segments.clear()
            self._bytes = 0
            self._cursor_seg, self._cursor_off, self._acked_in_first = last_id + 1, len(MAGIC), 0
        elif self._cursor_off >= first.size and len(self._segments) > 1:
            # The batch ended exactly at a sealed segment's end.
            self._segments.pop(0)
            self._bytes -= first.size
            self._unlink(first.id)
            self._cursor_seg, self._cursor_off, self._acked_in_first = self._segments[0].id, len(MAGIC), 0
        self._write_cursor()

    def _write_cursor(self) -> None:
        tmp = self.path / f".{CURSOR_FILE}.tmp"
        try:
            tmp.write_text(f"{self._cursor_seg} {self._cursor_off}\n", encoding="ascii")
            os.replace(tmp, self.path / CURSOR_FILE)
        except OSError as exc:
            # Not fatal: the acknowledged records are replayed again later and the
            # collector ignores the duplicates.
            log.warning("cannot update the spool cursor in %s: %s", self.path, exc.strerror or exc)

    def _unlink(self, seg_id: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.path / _segment_name(seg_id)).unlink()

    # -- lifecycle ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SpoolError(f"the spool {self.path} is closed")

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def close(self) -> None:
        """Sync and close the open segment.  Idempotent."""
        if self._closed:
            return
        self._sync(time.monotonic())
        self._close_fd()
        self._closed = True

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pending_records(directory: Path | str) -> list[bytes]:
    """Every record a spool directory holds past its cursor, read-only (for tests and tools).

    Safe to call while an agent writes to the spool: a record being written
    shows up as a torn tail and is left out.
    """
    path = Path(directory)
    cur_seg, cur_off = 0, len(MAGIC)
    with contextlib.suppress(FileNotFoundError, ValueError, UnicodeDecodeError):
        cur_seg, cur_off = (int(x) for x in (path / CURSOR_FILE).read_text(encoding="ascii").split())
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return []
    out: list[bytes] = []
    for seg_id in sorted(int(m.group(1)) for n in names if (m := _SEGMENT_RE.match(n))):
        if seg_id < cur_seg:
            continue
        try:
            data = (path / _segment_name(seg_id)).read_bytes()
        except FileNotFoundError:
            continue  # acknowledged and removed meanwhile
        if data[: len(MAGIC)] != MAGIC:
            continue
        off = max(cur_off, len(MAGIC)) if seg_id == cur_seg else len(MAGIC)
        while off + _HEADER.size <= len(data):
            length, crc = _HEADER.unpack_from(data, off)
            payload = data[off + _HEADER.size : off + _HEADER.size + length]
            if len(payload) < length or zlib.crc32(payload) != crc:
                break
            out.append(payload)
            off += _HEADER.size + length
    return out


__all__ = ["MAGIC", "Batch", "Spool", "SpoolError", "SpoolStats", "pending_records"]
