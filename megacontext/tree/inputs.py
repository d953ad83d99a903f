"""The tree's record of what was ingested into it: ``inputs.jsonl``, one JSON object a line.

The tree stores these records and keeps them crash-safe; what a record says is the ingest
pipeline's business (``megacontext.ingest``: path, size, digest, token range, time). Like the
array files, the log is append-only and the header says how much of it is real: the
optional header key ``inputs`` = ``{"count", "bytes", "crc32"}`` (records, bytes and the
CRC-32 of those bytes) is replaced atomically with the counts by ``commit()``, so a record
is committed exactly when the tokens it describes are, and bytes past ``bytes`` are an
uncommitted tail that readers ignore and a writer truncates. A tree without the key (made
before the log existed) has no records. The file is separate from the header because the
header is rewritten at every commit: a tree of 10^5 files would rewrite megabytes of
records each time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megacontext.tree import format as fmt


def empty_entry() -> dict:
    """The header entry of a log without records."""
    return {"count": 0, "bytes": 0, "crc32": 0}


class InputsLog:
    """``inputs.jsonl`` of one open tree: the committed records and, for a writer, pending ones.

    Args:
        root: the tree's directory.
        entry: the header's ``inputs`` entry (None: no records yet).
        writable: a writer opens (creating if missing) and trims the file to what is committed.
    """

    def __init__(self, root: Path, entry: dict | None, writable: bool) -> None:
        self.path = Path(root) / fmt.INPUTS_NAME
        self.committed = dict(entry or empty_entry())
        self.pending: list[bytes] = []  # encoded lines appended since the last commit
        self.writable = writable

    def truncate_to_committed(self) -> None:
        """Drop pending records and any uncommitted tail on disk (check ``size_problem``
        first: trimming a file shorter than its committed bytes would hide the damage)."""
        self.pending = []
        if self.path.exists():
            with open(self.path, "r+b") as f:
                f.truncate(self.committed["bytes"])

    def size_problem(self) -> str | None:
        """A message when the file is shorter than its committed bytes, else None."""
        need = self.committed["bytes"]
        have = self.path.stat().st_size if self.path.exists() else 0
        if have < need:
            return (f"inputs file {fmt.INPUTS_NAME} is truncated at byte offset {have}: "
                    f"{self.committed['count']} committed records need {need} bytes")
        return None

    def append(self, records: list[dict]) -> None:
        """Queue records (JSON-ready objects); they reach the file and the header at commit."""
        for record in records:
            if not isinstance(record, dict):
                raise TypeError(f"an input record must be a dict, got {type(record).__name__}")
            line = json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"
            self.pending.append(line.encode("utf-8"))

    def sync(self) -> dict:
        """Write and fsync the pending records after the committed ones; return the header
        entry that will cover them (not yet committed: the header is)."""
        if not self.pending:
            return dict(self.committed)
        data = b"".join(self.pending)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, self.committed["bytes"])
            view, at = memoryview(data), self.committed["bytes"]
            while view:
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n
            os.fsync(fd)
        finally:
            os.close(fd)
        if self.committed["bytes"] == 0:
            fmt.fsync_dir(self.path.parent)  # a new file: make its name durable too
        return {"count": self.committed["count"] + len(self.pending),
                "bytes": self.committed["bytes"] + len(data),
                "crc32": fmt.crc32(data, self.committed["crc32"])}

    def mark_committed(self, entry: dict) -> None:
        self.committed, self.pending = dict(entry), []

    def read(self) -> list[dict]:
        """The committed records, in order."""
        n = self.committed["bytes"]
        if not n:
            return []
        with open(self.path, "rb") as f:
            data = f.read(n)
        return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def verify_inputs(root: Path, h: dict) -> list[str]:
    """Problems of the committed inputs log of the tree at ``root`` (header ``h``)."""
    entry = h.get("inputs")
    if entry is None:
        return []
    log = InputsLog(root, entry, writable=False)
    if (p := log.size_problem()) is not None:
        return [p]
    with open(log.path, "rb") as f:
        data = f.read(entry["bytes"])
    if fmt.crc32(data) != entry["crc32"]:
        return [f"inputs file {fmt.INPUTS_NAME}: CRC-32 of its {entry['bytes']} committed bytes "
                f"is {fmt.crc32(data):#010x}, the header says {entry['crc32']:#010x}"]
    lines = data.split(b"\n")
    if data and lines[-1] != b"":
        return [f"inputs file {fmt.INPUTS_NAME}: the committed bytes end inside a record"]
    problems = []
    for i, line in enumerate(lines[:-1] if data else []):
        try:
            if not isinstance(json.loads(line.decode("utf-8")), dict):
                raise ValueError("not an object")
        except ValueError as e:
            problems.append(f"inputs file {fmt.INPUTS_NAME}: record {i} is not a JSON object "
                            f"({e})")
    count = len(lines) - 1 if data else 0
    if count != entry["count"]:
        problems.append(f"inputs file {fmt.INPUTS_NAME} holds {count} committed records, the "
                        f"header says {entry['count']}")
    return problems
