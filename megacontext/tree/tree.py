"""`MegaContextTree`: the disk-backed, append-only, crash-safe gist tree.

Storage only: token ids at level 0, gists of `hidden_size` at levels 1 … `levels`, and per
gist its center and RoPE phases. It knows no neural net; the ingest pipeline computes the
gists and hands them over. The byte layout is in `format.py` and `docs/tree-format.md`; node
arithmetic (sizes, centers) in `megacontext.spans`. This module holds the handle: making and
opening trees, properties, reads, inspection and lifetime; the writes (appends, `commit`,
`discard`) are the `TreeWriter` mixin in `writer.py`.

Axis legend: `n` tokens, `g` gists (nodes of one level), `c` hidden size, `d` head dim,
`k` level (0 = tokens), `s` span (32).

Consistency model: appends go straight to the array files (bounded RAM at any tree size),
but only `commit()` makes them part of the tree, by atomically replacing the header that
holds the committed count of every level. Reads (`tokens`, `gists`, `centers`, `phases`,
`count`) always serve the committed prefix, through memory maps; a crash, `close()` without
`commit()`, or `discard()` drops the uncommitted tail.
"""

from __future__ import annotations

import json
import operator
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megacontext.rope import RopeConfig
from megacontext.spans import level_centers
from megacontext.tree import format as fmt
from megacontext.tree.files import ArrayFile, lock_writer, unlock_writer
from megacontext.tree.inputs import InputsLog
from megacontext.tree.writer import TreeWriter


def _index(x: Any, what: str) -> int:
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {x!r}") from None


class MegaContextTree(TreeWriter):
    """A memory tree on disk: token ids at level 0, gists of width `c` at levels 1 … L.

    Node `i` of level `k` covers tokens `[i·32^k, (i+1)·32^k)` and sits at RoPE position
    `i·32^k + (32^k − 1)/2`. Counts always satisfy `count(k) == count(k−1) // 32` at commit:
    a gist exists exactly when all 32 of its children do.

    Make one with `MegaContextTree.create(...)` or `MegaContextTree.open(...)`, never directly.
    Use as a context manager or call `close()`; closing does not commit. Appends and
    `commit()` come from `TreeWriter` (`writer.py`).
    """

    def __init__(self, path: Path, header: dict, mode: str, lock_fd: int | None):
        self._path = Path(path)
        self._h = header
        self._mode = mode
        self._lock_fd = lock_fd
        self._layout = fmt.layout_from_header(header)
        self._rope = RopeConfig.from_dict(header["rope"])
        self._files: dict[str, ArrayFile] = {}
        self._closed = False
        self._lexicon: dict = {}  # the open token index (tree/lexicon.py open_lexicon)
        self._ready = False  # files checked (and, for a writer, trimmed to the committed sizes)
        try:
            self._open_files()
        except BaseException:
            self.close()  # releases the lock too: callers must not unlock again
            raise
        self._ready = True

    def _open_files(self) -> None:
        writable = self._mode == "a"
        problems = []
        for level, name in self._layout.array_names():
            f = ArrayFile(self._path, level, name, self._layout, self._h["counts"][level],
                           self._h["tail_crc32"][name], writable)
            self._files[name] = f
            if (p := f.size_problem()) is not None:
                problems.append(p)
        self._inputs = InputsLog(self._path, self._h.get("inputs"), writable)
        if (p := self._inputs.size_problem()) is not None:
            problems.append(p)
        if problems:
            # Never serve a torn record: a file shorter than the header says is corruption.
            raise ValueError(f"tree at {self._path} is damaged: " + "; ".join(problems))
        if writable:
            for f in self._files.values():
                f.truncate_to_committed()
            self._inputs.truncate_to_committed()
            (self._path / fmt.HEADER_TMP_NAME).unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------
    # construction

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        hidden_size: int,
        vocab_size: int,
        rope: RopeConfig,
        fingerprint: dict,
        levels: int = fmt.DEFAULT_LEVELS,
        gist_dtype: str = "float16",
        gistnet_digest: str | None = None,
        span: int = fmt.DEFAULT_SPAN,
        checksum_chunk_records: int = fmt.DEFAULT_CHUNK_RECORDS,
    ) -> MegaContextTree:
        """Create an empty tree in directory `path` and open it for append.

        Args:
            path: the tree's directory; created if missing. It must not hold a tree already.
            hidden_size: `c`, the width of every gist (the base model's hidden size).
            vocab_size: token ids must lie in `[0, vocab_size)`; picks uint16 or uint32 storage.
            rope: the base model's RoPE; phases are recorded for its unscaled frequencies.
            fingerprint: JSON-serialisable description of base model and tokenizer, compared
                on `open(expect_fingerprint=...)`; opaque to the tree.
            levels: number of gist levels (1 … 12); a billion tokens wants 6.
            gist_dtype: "float16", "bfloat16" or "float32".
            gistnet_digest: identifies the GistNet that makes the gists (or None).
            span: children per node; the design fixes 32.
            checksum_chunk_records: records per checksum chunk.

        Returns:
            the new tree, open with mode "a".

        Raises:
            FileExistsError: a tree already exists at `path`.
            ValueError: an argument is invalid (all problems named at once).
        """
        h = fmt.new_header(
            span=span, levels=levels, hidden_size=hidden_size, gist_dtype=gist_dtype,
            vocab_size=vocab_size, fingerprint=fingerprint, gistnet_digest=gistnet_digest,
            rope=rope.to_dict() if isinstance(rope, RopeConfig) else rope,
            chunk_records=checksum_chunk_records,
        )
        p = fmt.header_problems(h)
        try:
            json.dumps(fingerprint)
        except (TypeError, ValueError) as e:
            p.append(f"fingerprint must be JSON-serialisable: {e}")
        if p:
            raise ValueError(f"cannot create a tree at {path}: " + "; ".join(p))
        h["fingerprint"] = json.loads(json.dumps(fingerprint))  # stored form: tuples → lists

        root = Path(path)
        if root.exists() and not root.is_dir():
            raise ValueError(f"cannot create a tree at {root}: it exists and is not a directory")
        root.mkdir(parents=True, exist_ok=True)
        lock_fd = lock_writer(root)
        try:
            if (root / fmt.HEADER_NAME).exists():
                raise FileExistsError(
                    f"a memory tree already exists at {root}; open it with "
                    f"MegaContextTree.open({str(root)!r}, mode='a') or choose another directory"
                )
            # Empty files first, header last: a crash in between leaves no header, i.e. no tree,
            # and a later create() over the debris simply truncates it.
            for _, name in fmt.layout_from_header(h).array_names():
                for fname in (name, fmt.crc_name(name)):
                    fd = os.open(root / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.fsync(fd)
                    os.close(fd)
            fmt.write_header(root, h)
        except BaseException:
            unlock_writer(lock_fd)
            raise
        return cls(root, h, "a", lock_fd)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        mode: str = "r",
        expect_fingerprint: dict | None = None,
        expect_hidden_size: int | None = None,
        expect_gistnet_digest: str | None = None,
    ) -> MegaContextTree:
        """Open an existing tree.

        Args:
            path: the tree's directory.
            mode: "r" to read (ignores any uncommitted tail on disk), or "a" to append (takes
                the single-writer lock and truncates any uncommitted tail away).
            expect_fingerprint: when given, must equal the stored fingerprint key for key.
            expect_hidden_size: when given, must equal the tree's hidden_size.
            expect_gistnet_digest: when given, must equal the stored GistNet digest.

        Raises:
            ValueError: header missing, corrupted, truncated, of an unknown version or missing
                keys; a file shorter than its committed records; or any expectation mismatch
                (every mismatched field named).
            RuntimeError: mode "a" while another handle holds the writer lock.
            PermissionError: mode "a" on a tree whose directory cannot be written (read-only
                file system or permissions), naming the tree.
        """
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        root = Path(path)
        h = fmt.read_header(root)
        mism = []
        if expect_hidden_size is not None and h["hidden_size"] != expect_hidden_size:
            mism.append(f"hidden_size {h['hidden_size']}, this model has {expect_hidden_size}")
        if expect_fingerprint is not None:
            want = json.loads(json.dumps(expect_fingerprint))  # compare as stored (tuples→lists)
            have = h["fingerprint"]
            for key in sorted(set(have) | set(want)):
                a, b = have.get(key, "<absent>"), want.get(key, "<absent>")
                if a != b:
                    mism.append(f"fingerprint.{key} {a!r}, this model has {b!r}")
        if expect_gistnet_digest is not None and h["gistnet_digest"] != expect_gistnet_digest:
            mism.append(
                f"gistnet_digest {h['gistnet_digest']!r}, this GistNet has "
                f"{expect_gistnet_digest!r}"
            )
        if mism:
            raise ValueError(f"tree at {root} was built for " + "; ".join(mism))
        lock_fd = lock_writer(root) if mode == "a" else None
        if lock_fd is not None:
            # Re-read under the lock: a writer may have committed between our read and the lock.
            try:
                h = fmt.read_header(root)
            except BaseException:
                unlock_writer(lock_fd)
                raise
        return cls(root, h, mode, lock_fd)

    def refresh(self) -> None:
        """Re-read the header so a reader sees what a writer committed since (mode "r" only)."""
        self._check_open()
        if self._mode != "r":
            raise ValueError(f"refresh() is for readers; tree at {self._path} is the writer")
        h = fmt.read_header(self._path)
        for key in ("span", "levels", "hidden_size", "gist_dtype", "rope", "checksum"):
            if h[key] != self._h[key]:
                raise ValueError(f"tree at {self._path} changed its {key} under a reader")
        for f in self._files.values():
            f.committed, f.committed_tail = h["counts"][f.level], h["tail_crc32"][f.name]
            f.count, f.tail_crc = f.committed, f.committed_tail
            if (p := f.size_problem()) is not None:
                raise ValueError(f"tree at {self._path} is damaged: {p}")
        self._inputs = InputsLog(self._path, h.get("inputs"), writable=False)
        self._h = h

    # ------------------------------------------------------------------------------------
    # properties

    @property
    def path(self) -> Path:
        return self._path

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def levels(self) -> int:
        """Number of gist levels (levels 1 … this exist; level 0 is tokens)."""
        return self._h["levels"]

    @property
    def span(self) -> int:
        return self._h["span"]

    @property
    def hidden_size(self) -> int:
        return self._h["hidden_size"]

    @property
    def vocab_size(self) -> int:
        return self._h["vocab_size"]

    @property
    def gist_dtype(self) -> str:
        return self._h["gist_dtype"]

    @property
    def token_dtype(self) -> str:
        return self._h["token_dtype"]

    @property
    def rope(self) -> RopeConfig:
        return self._rope

    @property
    def fingerprint(self) -> dict:
        return json.loads(json.dumps(self._h["fingerprint"]))

    @property
    def gistnet_digest(self) -> str | None:
        return self._h["gistnet_digest"]

    @property
    def format_version(self) -> int:
        return self._h["format_version"]

    @property
    def header(self) -> dict:
        """A copy of the committed header."""
        return json.loads(json.dumps(self._h))

    @property
    def num_tokens(self) -> int:
        """Committed tokens."""
        return self._h["counts"][0]

    def count(self, level: int) -> int:
        """Committed records of `level` (level 0: tokens; level k: gists)."""
        return self._h["counts"][self._level(level, allow_tokens=True)]

    def appended_count(self, level: int) -> int:
        """Records of `level` written by this handle so far, committed or not."""
        return self._files[fmt.data_name(self._level(level, allow_tokens=True))].count

    # ------------------------------------------------------------------------------------
    # reads (committed prefix only)

    def tokens(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Token ids `[start, stop)` (stop defaults to num_tokens).

        Returns:
            int64 `[n]`.
        """
        start, stop = self._range(0, start, stop)
        arr = self._files[fmt.data_name(0)].read(start, stop)
        return torch.from_numpy(arr.astype(np.int64))

    def gists(self, level: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Gists `[start, stop)` of gist level `level`, widened to float32.

        Returns:
            float32 `[g, c]`, the stored values exactly (float16/bfloat16 widen losslessly).
        """
        level = self._level(level)
        start, stop = self._range(level, start, stop)
        arr = self._files[fmt.data_name(level)].read(start, stop)  # [g, c] storage dtype
        if self.gist_dtype == "bfloat16":
            # bfloat16 bits are the top half of the float32 bits: widen by shifting.
            return torch.from_numpy((arr.astype(np.uint32) << 16).view(np.float32))
        return torch.from_numpy(arr.astype(np.float32))

    def centers(self, level: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Central positions of nodes `[start, stop)`: `i·32^k + (32^k − 1)/2`, exact.

        Level 0 is allowed and gives the token positions. Served from the stored metadata.

        Returns:
            float64 `[g]`.
        """
        level = self._level(level, allow_tokens=True)
        start, stop = self._range(level, start, stop)
        if level == 0:
            return torch.from_numpy(level_centers(0, start, stop, self.span))
        meta = self._files[fmt.meta_name(level)].read(start, stop)
        return torch.from_numpy(np.ascontiguousarray(meta["center"]))

    def phases(self, level: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Recorded RoPE phases `(c·θ_j) mod 2π` of nodes `[start, stop)` (unscaled RoPE).

        Returns:
            float32 `[g, d/2]`.
        """
        level = self._level(level)
        start, stop = self._range(level, start, stop)
        meta = self._files[fmt.meta_name(level)].read(start, stop)
        return torch.from_numpy(np.ascontiguousarray(meta["phases"]))

    def lexicon(self):
        """The token index beside the tree (``megacontext.tree.lexicon.Lexicon``), or None
        when there is none (``megacontext index`` builds it). Kept open between calls while
        its header and this tree's token count are unchanged.

        Raises:
            ValueError: the index is torn, of another tree, or stale (names how to rebuild).
        """
        from megacontext.tree.lexicon import open_lexicon

        self._check_open()
        return open_lexicon(self, self._lexicon)

    def inputs(self) -> list[dict]:
        """The committed input records (``inputs.jsonl``), in order; ``[]`` for a tree made
        before the record existed. What a record holds is the ingest's business
        (docs/tree-format.md)."""
        self._check_open()
        return self._inputs.read()

    # ------------------------------------------------------------------------------------
    # inspection

    def verify(self) -> list[str]:
        """Integrity problems of the committed tree (empty when sound); see `tree.verify`."""
        from megacontext.tree.verify import verify_header

        self._check_open()
        return verify_header(self._path, self._h)

    def nbytes(self, level: int | None = None) -> int:
        """Bytes on disk of one level's files (data, metadata, checksums), or of the whole tree.

        Counts the files' current sizes, so a writer's uncommitted appends are included.
        """
        if level is None:
            total = sum(self.nbytes(k) for k in range(self.levels + 1))
            for p in (self._path / fmt.HEADER_NAME, self._path / fmt.INPUTS_NAME):
                total += p.stat().st_size if p.exists() else 0
            return total
        level = self._level(level, allow_tokens=True)
        total = 0
        for name in fmt.level_array_names(level):
            for p in (self._path / name, self._path / fmt.crc_name(name)):
                total += p.stat().st_size if p.exists() else 0
        return total

    def info(self) -> dict:
        """A JSON-ready summary for `megacontext inspect --json`."""
        h = self.header
        return {
            "path": str(self._path),
            "format": h["format"],
            "format_version": h["format_version"],
            "num_tokens": self.num_tokens,
            "levels": self.levels,
            "span": self.span,
            "counts": h["counts"],
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "gist_dtype": self.gist_dtype,
            "token_dtype": self.token_dtype,
            "bytes_per_level": [self.nbytes(k) for k in range(self.levels + 1)],
            "bytes_total": self.nbytes(),
            "fingerprint": h["fingerprint"],
            "gistnet_digest": h["gistnet_digest"],
            "rope": h["rope"],
            "checksum": h["checksum"],
            "extra": h.get("extra", {}),
            "inputs": self.inputs(),
            "created": h["created"],
            "updated": h["updated"],
        }

    # ------------------------------------------------------------------------------------
    # lifetime

    def close(self) -> None:
        """Close the files and release the writer lock. Uncommitted appends are discarded."""
        if self._closed:
            return
        self._closed = True
        try:
            # Only once the sizes were checked: trimming a file shorter than its committed
            # size would extend it with zeros and hide the damage.
            if self._mode == "a" and self._ready:
                for f in self._files.values():
                    if f.fd is not None:
                        f.truncate_to_committed()
        finally:
            for f in self._files.values():
                f.close()
            unlock_writer(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> MegaContextTree:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        counts = self._h["counts"]
        return (f"MegaContextTree({str(self._path)!r}, mode={self._mode!r}, counts={counts}, "
                f"hidden_size={self.hidden_size}, gist_dtype={self.gist_dtype!r})")

    # ------------------------------------------------------------------------------------
    # helpers

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"tree at {self._path} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._mode != "a":
            raise ValueError(f"tree at {self._path} is open read-only; open it with mode='a'")

    def _level(self, level: int, allow_tokens: bool = False) -> int:
        level = _index(level, "level")
        lo = 0 if allow_tokens else 1
        if not lo <= level <= self.levels:
            raise ValueError(
                f"level {level} is out of range: tree at {self._path} has levels {lo} … "
                f"{self.levels}" + ("" if allow_tokens else " (level 0 is tokens; use tokens())")
            )
        return level

    def _range(self, level: int, start: int, stop: int | None) -> tuple[int, int]:
        self._check_open()
        n = self._h["counts"][level]
        start = _index(start, "start")
        stop = n if stop is None else _index(stop, "stop")
        if not 0 <= start <= stop <= n:
            raise ValueError(
                f"range [{start}, {stop}) is out of bounds for level {level} of tree at "
                f"{self._path}, which has {n} committed records"
            )
        return start, stop
