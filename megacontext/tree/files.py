"""Low-level file handling of a memory tree: one append-only array file, the writer lock.

Axis legend: `m` records of one append.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np

from megacontext.tree import format as fmt

try:  # advisory single-writer lock; POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

# Largest block one pwrite is given, to keep the kernel call (and any copy) bounded.
_WRITE_BLOCK = 64 << 20


class ArrayFile:
    """One append-only array file of fixed-size records plus its chunk checksum file.

    State: `committed` records are covered by the header; `count` >= committed have been
    written. The checksum of every complete chunk of `chunk` records lives in the `.crc32`
    file; the running checksum of the last, partial chunk (`tail_crc`) lives in the header,
    so it is replaced atomically with the counts it belongs to.
    """

    def __init__(self, root: Path, level: int, name: str, layout: fmt.Layout, committed: int,
                 tail_crc: int, writable: bool):
        self.level, self.name = level, name
        self.path = root / name
        self.crc_path = root / fmt.crc_name(name)
        self.dtype = layout.record_dtype(name)
        self.rec = self.dtype.itemsize
        self.chunk = layout.chunk_records
        self.committed = self.count = committed
        self.committed_tail = self.tail_crc = tail_crc
        self.done_crcs: list[int] = []  # checksums of chunks completed since the last commit
        self.fd = self.crc_fd = None
        self._map: np.memmap | None = None
        self._mapped = 0
        if writable:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            self.crc_fd = os.open(self.crc_path, os.O_RDWR | os.O_CREAT, 0o644)

    # -- integrity of the committed prefix ------------------------------------------------

    def size_problem(self) -> str | None:
        """A message when the file is shorter than its committed records need, else None."""
        need = self.committed * self.rec
        size = self.path.stat().st_size if self.path.exists() else -1
        if size < need:
            have = max(size, 0)
            torn = have // self.rec
            return (
                f"level {self.level} file {self.name} is truncated at byte offset {have}: "
                f"{self.committed} committed records of {self.rec} bytes need {need} bytes; "
                f"record {torn} (byte offset {torn * self.rec}) is torn or missing"
            )
        need_crc = (self.committed // self.chunk) * 4
        size = self.crc_path.stat().st_size if self.crc_path.exists() else -1
        if size < need_crc:
            return (
                f"level {self.level} checksum file {self.crc_path.name} is truncated at byte "
                f"offset {max(size, 0)}: {self.committed // self.chunk} complete chunks need "
                f"{need_crc} bytes"
            )
        return None

    def truncate_to_committed(self) -> None:
        """Drop any uncommitted tail on disk (bytes past the committed records and chunks)."""
        os.ftruncate(self.fd, self.committed * self.rec)
        os.ftruncate(self.crc_fd, (self.committed // self.chunk) * 4)
        self.count, self.tail_crc, self.done_crcs = self.committed, self.committed_tail, []

    # -- writes ---------------------------------------------------------------------------

    def append(self, arr: np.ndarray) -> None:
        """Write records `arr` (`[m]` of this file's record dtype) after the last one."""
        assert arr.dtype == self.dtype.base or arr.dtype == self.dtype, (arr.dtype, self.dtype)
        buf = memoryview(np.ascontiguousarray(arr)).cast("B")
        m = len(buf) // self.rec
        assert m * self.rec == len(buf), f"{len(buf)} bytes is not whole records of {self.rec}"
        # Extend the running chunk checksums first (pure), then write, then commit the state,
        # so a failed write leaves this object exactly as it was.
        tail, done, pos, off = self.tail_crc, list(self.done_crcs), self.count, 0
        while off < m:
            take = min(self.chunk - pos % self.chunk, m - off)
            tail = fmt.crc32(buf[off * self.rec:(off + take) * self.rec], tail)
            pos, off = pos + take, off + take
            if pos % self.chunk == 0:
                done.append(tail)
                tail = 0
        start = self.count * self.rec
        try:
            done_bytes = 0
            while done_bytes < len(buf):
                piece = buf[done_bytes:done_bytes + _WRITE_BLOCK]
                done_bytes += os.pwrite(self.fd, piece, start + done_bytes)
        except BaseException:
            os.ftruncate(self.fd, start)
            raise
        self.count, self.tail_crc, self.done_crcs = pos, tail, done

    def rollback(self, count: int, tail_crc: int, done_crcs: list[int]) -> None:
        """Undo appends back to an earlier (count, checksum) state of this handle."""
        os.ftruncate(self.fd, count * self.rec)
        self.count, self.tail_crc, self.done_crcs = count, tail_crc, done_crcs

    def sync(self) -> None:
        """Make the data written so far durable (no-op when nothing is pending)."""
        if self.count == self.committed:
            return
        os.fsync(self.fd)
        if self.done_crcs:
            crcs = np.asarray(self.done_crcs, dtype="<u4").tobytes()
            off = (self.committed // self.chunk) * 4
            done = 0
            while done < len(crcs):
                done += os.pwrite(self.crc_fd, crcs[done:], off + done)
            os.fsync(self.crc_fd)

    def mark_committed(self) -> None:
        self.committed, self.committed_tail, self.done_crcs = self.count, self.tail_crc, []

    # -- reads ----------------------------------------------------------------------------

    def read(self, start: int, stop: int) -> np.ndarray:
        """Committed records `[start, stop)`, copied out of the memory map."""
        assert 0 <= start <= stop <= self.committed, (start, stop, self.committed)
        if stop == start:
            return np.empty((0,) + self.dtype.shape, dtype=self.dtype.base)
        if self._map is None or self._mapped < stop:
            # Map exactly the committed prefix: bytes past it may be torn or uncommitted.
            self._map = np.memmap(self.path, dtype=self.dtype, mode="r",
                                  shape=(self.committed,))
            self._mapped = self.committed
        return np.array(self._map[start:stop])

    def close(self) -> None:
        self._map = None
        for fd in (self.fd, self.crc_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.crc_fd = None


def lock_writer(root: Path) -> int | None:
    """Take the tree's single-writer lock, or raise naming the tree if someone holds it
    (RuntimeError) or its directory cannot be written (PermissionError)."""
    if fcntl is None:  # pragma: no cover
        return None
    try:
        fd = os.open(root / fmt.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        # The first write an append makes: say that the tree cannot be written, not which file.
        err = PermissionError(f"tree at {root} is not writable ({e.strerror}: cannot open "
                              f"{fmt.LOCK_NAME} for writing); appending needs write access to "
                              f"its directory")
        err.errno = e.errno
        raise err from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(
            f"tree at {root} is already open for append by another writer"
        ) from None
    return fd


def unlock_writer(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor releases its flock
