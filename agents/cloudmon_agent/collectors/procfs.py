"""Cheap repeated reads of Linux ``/proc`` files.

The agent reads the same handful of files every second all day, so each is
opened once and re-read with ``pread`` at offset 0: no ``open``/``close`` pair,
no ``lseek`` and no Python file object per read.  A file that disappears or
fails is reopened on the next read.
"""

from __future__ import annotations

import os
from typing import Final

_CHUNK: Final = 16384
#: A first read shorter than this is the whole file: a seq_file hands out a page
#: (4096 bytes) per read, less only the record that did not fit (far below 2 KiB).
_SURELY_ALL: Final = 2048


class ProcFile:
    """One ``/proc`` (or ``/sys``) file kept open and re-read on demand.

    ``stop_at`` lets a caller read only a prefix: reading stops at the first
    chunk that contains the marker (``/proc/stat``'s per-CPU lines come before
    the huge ``intr`` line, which need not be read at all).
    """

    def __init__(self, path: str, stop_at: bytes | None = None) -> None:
        self.path = path
        self._stop_at = stop_at
        self._fd: int | None = None

    def read(self) -> bytes:
        """The file's current content (or its prefix up to ``stop_at``); raises OSError."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        fd = self._fd
        try:
            # One pread at offset 0 instead of lseek + read + read-to-EOF.  A
            # seq_file (/proc/net/dev, /proc/diskstats) fills one page of records
            # per read, so only a read well short of a page is known to be all.
            data = os.pread(fd, _CHUNK, 0)
            stop = self._stop_at
            if len(data) < _SURELY_ALL or (stop is not None and stop in data):
                return data
            parts = [data]
            offset = len(data)
            while chunk := os.pread(fd, _CHUNK, offset):
                parts.append(chunk)
                offset += len(chunk)
                if stop is not None and stop in chunk:
                    break
            return b"".join(parts)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        """Release the file descriptor (reading again reopens it)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
