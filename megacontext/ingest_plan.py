"""What an ingest streams: each input hashed and checked against the tree's record of what it
ingested (``MegaContextTree.inputs``), before anything is appended; the key that lets an
interrupted ingest of the same inputs resume. ``megacontext.ingest`` runs the plan.

Records hold ``path`` (as given; ``-`` for stdin), ``abspath``, ``kind``, ``size`` and
``sha256``; the ingest adds ``tokens`` ``[a, b)`` and ``ingested`` (docs/ingest.md, "Inputs a
tree holds").
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from megacontext.textio import Source
from megacontext.tree import MegaContextTree

__all__ = ["InputPlan", "file_digest", "inputs_digest", "plan_inputs", "spool_stdin"]


def inputs_digest(sources: list[Source]) -> str | None:
    """Identifies a set of inputs for resuming (names, sizes, mtimes); None if stdin is one."""
    if any(s.path is None for s in sources):
        return None
    blob = json.dumps([(str(s.path.resolve()), s.path.stat().st_size, s.path.stat().st_mtime_ns)
                       for s in sources])
    return hashlib.sha256(blob.encode()).hexdigest()


HASH_BYTES = 1 << 20


def spool_stdin() -> tuple[Path, int, str]:
    """Copy standard input to a temporary file (``$TMPDIR``), hashing it: its digest decides
    whether the tree holds it already, before any token is appended. Returns (path, size,
    sha256); the caller removes the file."""
    import os
    import sys
    import tempfile

    digest, size = hashlib.sha256(), 0
    fd, name = tempfile.mkstemp(prefix="megacontext-stdin-", suffix=".txt")
    with os.fdopen(fd, "wb") as out:
        while chunk := sys.stdin.buffer.read(HASH_BYTES):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    return Path(name), size, digest.hexdigest()


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in pieces."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


@dataclass
class InputPlan:
    """What an ingest will do with its inputs (:func:`plan_inputs`).

    Attributes:
        sources: the sources to stream, in order (stdin replaced by its spool file).
        records: one record per source to stream: ``path`` (as given; ``-`` for stdin),
            ``abspath`` (None for stdin), ``kind``, ``size`` and ``sha256`` of its bytes.
        held: ``(record, earlier record)`` per input skipped because the tree holds it.
        key: identifies this list of inputs, to resume an interrupted ingest of it.
        spooled: temporary files to remove once the ingest ends.
    """

    sources: list[Source]
    records: list[dict]
    held: list[tuple[dict, dict]]
    key: str | None
    spooled: list[Path] = field(default_factory=list)

    def cleanup(self) -> None:
        for path in self.spooled:
            path.unlink(missing_ok=True)


def plan_inputs(tree: MegaContextTree, sources: list[Source], *, again: bool = False,
                append_changed: bool = False) -> InputPlan:
    """Decide, before anything is appended, which inputs an ingest streams.

    Each input is hashed (stdin is spooled to a temporary file on the way). An input whose
    content the tree's record holds (``MegaContextTree.inputs``) is skipped — ``held`` says
    when it was ingested — unless ``again`` (append another copy). An input at a path the
    record holds with other content (the file changed) is refused unless ``append_changed``
    or ``again`` (append it as new text). A tree made before the record has none: its inputs
    are appended again, except when its last ingest, finished, was of exactly these files
    (same paths, sizes and modification times), which counts as held.

    Raises:
        ValueError: naming every changed input, when it was ingested and both digests.
    """
    earlier = tree.inputs()
    by_digest = {r["sha256"]: r for r in earlier}
    by_path = {r["abspath"]: r for r in earlier if r.get("abspath")}
    note = (tree.header.get("extra") or {}).get("ingest") or {}
    plan = InputPlan([], [], [], None)
    if not earlier and note.get("done") and not again and sources and \
            note.get("inputs") is not None and note.get("inputs") == inputs_digest(sources):
        when = tree.header["updated"]
        plan.held = [({"path": s.name}, {"path": s.name, "ingested": when,
                                         "tokens": [note.get("start_tokens", 0),
                                                    tree.num_tokens]}) for s in sources]
        return plan
    changed, seen = [], {}
    try:
        for source in sources:
            if source.path is None:
                path, size, digest = spool_stdin()
                plan.spooled.append(path)
                source = Source(path, "text", label="<stdin>")
                record = {"path": "-", "abspath": None, "kind": "stdin"}
            else:
                size, digest = file_digest(source.path)
                record = {"path": str(source.path), "abspath": str(source.path.resolve()),
                          "kind": source.kind}
            record.update(size=size, sha256=digest)
            held = by_digest.get(digest) or seen.get(digest)
            old = by_path.get(record["abspath"])
            if held is not None and not again:
                plan.held.append((record, held))
                continue
            if old is not None and old["sha256"] != digest and not (again or append_changed):
                changed.append(
                    f"{record['path']} changed since it was ingested at {old['ingested']} "
                    f"(then {old['size']:,} bytes, sha256 {old['sha256'][:16]}; now "
                    f"{size:,} bytes, sha256 {digest[:16]})")
            seen[digest] = {**record, "ingested": "earlier in this run"}
            plan.sources.append(source)
            plan.records.append(record)
        if changed:
            raise ValueError("; ".join(changed) + "; nothing was appended: pass "
                             "--append-changed to append changed inputs as new text")
    except BaseException:
        plan.cleanup()
        raise
    if any(r["kind"] == "stdin" for r in plan.records):  # content, not names and mtimes
        plan.key = hashlib.sha256(json.dumps(
            [(r["abspath"], r["size"], r["sha256"]) for r in plan.records]).encode()).hexdigest()
    else:
        plan.key = inputs_digest(plan.sources)
    return plan
