"""Cheap repeated reads of Linux ``/proc`` files.

The agent reads the same handful of files every second all day, so each is
opened once and re-read from offset 0 (``lseek`` + ``read``): no ``open``/
``close`` pair and no Python file object per read.  A file that disappears or
fails is reopened on the next read.
"""

from __future__ import annotations

import os
from typing import Final

_CHUNK: Final = 16384


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
            os.lseek(fd, 0, os.SEEK_SET)
            parts: list[bytes] = []
            # Loop to EOF: a seq_file (/proc/net/dev, /proc/diskstats) hands out
            # at most one page of records per read, so a short read is not EOF.
            while chunk := os.read(fd, _CHUNK):
                parts.append(chunk)
                if self._stop_at is not None and self._stop_at in chunk:
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
