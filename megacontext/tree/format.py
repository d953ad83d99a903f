"""The on-disk format of a memory tree: file names, record layouts, header schema, checksums.

Everything here is pure description and small helpers; `tree.py` does the I/O. The format is
documented byte by byte in `docs/tree-format.md`; keep the two in step.

Axis legend: `n` tokens, `g` gists (nodes of one level), `c` hidden size, `d` head dim,
`k` level (0 = tokens).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megacontext import rope as rope_mod
from megacontext.rope import RopeConfig
from megacontext.spans import SPAN, level_centers, max_level

FORMAT_NAME = "megacontext-tree"
FORMAT_VERSION = 1
HEADER_NAME = "header.json"
HEADER_TMP_NAME = "header.json.tmp"
LOCK_NAME = "writer.lock"
INPUTS_NAME = "inputs.jsonl"  # the record of what was ingested (tree/inputs.py)
DEFAULT_SPAN = SPAN
DEFAULT_LEVELS = 2
DEFAULT_CHUNK_RECORDS = 65536
# 32^12 = 2^60 tokens per top node; one more level would overflow int64 node arithmetic.
MAX_LEVELS = max_level(SPAN)

GIST_DTYPES = ("float16", "bfloat16", "float32")
TOKEN_DTYPES = ("uint16", "uint32")

# Storage dtypes, always explicitly little-endian. bfloat16 has no numpy dtype: it is stored
# as its raw 16 bits (the high half of the float32 bits) in a little-endian uint16.
_GIST_NP = {"float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "float32": np.dtype("<f4")}
_TOKEN_NP = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}

HEADER_KEYS = (
    "format",
    "format_version",
    "span",
    "levels",
    "hidden_size",
    "gist_dtype",
    "token_dtype",
    "vocab_size",
    "fingerprint",
    "rope",
    "gistnet_digest",
    "checksum",
    "counts",
    "tail_crc32",
    "created",
    "updated",
)


def token_dtype_for(vocab_size: int) -> str:
    """The narrowest token storage that holds every id in `[0, vocab_size)`."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def data_name(level: int) -> str:
    """File name of a level's data: token ids at level 0, gists above."""
    return "level0.tokens" if level == 0 else f"level{level}.gists"


def meta_name(level: int) -> str:
    """File name of a gist level's node metadata (centers and phases)."""
    assert level >= 1, f"level {level} has no metadata file (tokens carry none)"
    return f"level{level}.meta"


def crc_name(array_name: str) -> str:
    """File name of the chunk checksums of one array file."""
    return array_name + ".crc32"


def level_array_names(level: int) -> list[str]:
    """The array files of one level, data first."""
    return [data_name(0)] if level == 0 else [data_name(level), meta_name(level)]


def meta_dtype(head_dim: int) -> np.dtype:
    """One packed metadata record: float64 center, then float32 phases [d/2] (8 + 2d bytes)."""
    return np.dtype([("center", "<f8"), ("phases", "<f4", (head_dim // 2,))])


def utc_now() -> str:
    """An ISO-8601 UTC timestamp with microseconds, e.g. `2025-01-31T12:00:00.000000+00:00`."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Layout:
    """The record layout of every array file of a tree, derived from its header.

    Attributes:
        span: children per node (32).
        levels: number of gist levels (files exist for levels 0 … levels).
        hidden_size: `c`, the width of a gist.
        head_dim: `d`, from the RoPE config; a metadata record holds d/2 phases.
        gist_dtype: "float16", "bfloat16" or "float32".
        token_dtype: "uint16" or "uint32".
        chunk_records: records per checksum chunk (the same for every file).
    """

    span: int
    levels: int
    hidden_size: int
    head_dim: int
    gist_dtype: str
    token_dtype: str
    chunk_records: int

    def record_dtype(self, name: str) -> np.dtype:
        """numpy dtype of one record of array file `name` (a gist row is one record)."""
        if name == data_name(0):
            return _TOKEN_NP[self.token_dtype]
        if name.endswith(".gists"):
            return np.dtype((_GIST_NP[self.gist_dtype], (self.hidden_size,)))
        if name.endswith(".meta"):
            return meta_dtype(self.head_dim)
        raise AssertionError(f"unknown array file {name!r}")

    def record_bytes(self, name: str) -> int:
        """Bytes per record of array file `name`."""
        return self.record_dtype(name).itemsize

    def array_names(self) -> list[tuple[int, str]]:
        """Every array file as (level, name), level by level, data before metadata."""
        return [(k, n) for k in range(self.levels + 1) for n in level_array_names(k)]


def layout_from_header(h: dict) -> Layout:
    """Build the Layout of a validated header."""
    return Layout(
        span=h["span"],
        levels=h["levels"],
        hidden_size=h["hidden_size"],
        head_dim=h["rope"]["head_dim"],
        gist_dtype=h["gist_dtype"],
        token_dtype=h["token_dtype"],
        chunk_records=h["checksum"]["chunk_records"],
    )


def node_metadata(level: int, start: int, stop: int, rope: RopeConfig, span: int = DEFAULT_SPAN):
    """The metadata records of nodes `[start, stop)` of a gist level.

    Returns:
        structured array `[g]` with `center` float64 and `phases` float32 `[g, d/2]`, where
        `phases = (center·θ_j) mod 2π` for the unscaled frequencies of `rope` (rope.phases,
        computed in float64 and cast to float32 after the reduction).
    """
    centers = level_centers(level, start, stop, span)  # exact: see megacontext.spans
    out = np.empty(stop - start, dtype=meta_dtype(rope.head_dim))
    out["center"] = centers
    if stop > start:
        ph = rope_mod.phases(torch.from_numpy(centers), rope)  # [g, d/2] float32
        out["phases"] = ph.detach().cpu().numpy().astype(np.float32, copy=False)
    return out


def crc32(buf, value: int = 0) -> int:
    """zlib's CRC-32 of `buf`, continuing from `value` (0 starts a fresh checksum)."""
    return zlib.crc32(buf, value) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# header


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def header_problems(h: Any) -> list[str]:
    """Every structural problem of a parsed header (empty when it is well formed)."""
    if not isinstance(h, dict):
        return [f"header is a JSON {type(h).__name__}, expected an object"]
    missing = [k for k in HEADER_KEYS if k not in h]
    if missing:
        return [f"header is missing keys {missing}"]
    p: list[str] = []
    if h["format"] != FORMAT_NAME:
        p.append(f"format is {h['format']!r}, expected {FORMAT_NAME!r}")
    if h["format_version"] != FORMAT_VERSION:
        p.append(
            f"unsupported format_version {h['format_version']!r} (this code reads {FORMAT_VERSION})"
        )
    if not (_is_int(h["span"]) and h["span"] >= 2):
        p.append(f"span must be an integer >= 2, got {h['span']!r}")
    if not (_is_int(h["levels"]) and 1 <= h["levels"] <= MAX_LEVELS):
        p.append(f"levels must be an integer in [1, {MAX_LEVELS}], got {h['levels']!r}")
    if not (_is_int(h["hidden_size"]) and h["hidden_size"] >= 1):
        p.append(f"hidden_size must be a positive integer, got {h['hidden_size']!r}")
    if h["gist_dtype"] not in GIST_DTYPES:
        p.append(f"gist_dtype must be one of {GIST_DTYPES}, got {h['gist_dtype']!r}")
    if not (_is_int(h["vocab_size"]) and 1 <= h["vocab_size"] <= 1 << 32):
        p.append(f"vocab_size must be an integer in [1, 2^32], got {h['vocab_size']!r}")
    elif h["token_dtype"] != token_dtype_for(h["vocab_size"]):
        p.append(
            f"token_dtype {h['token_dtype']!r} does not match vocab_size {h['vocab_size']} "
            f"(expected {token_dtype_for(h['vocab_size'])!r})"
        )
    if not isinstance(h["fingerprint"], dict):
        p.append(f"fingerprint must be an object, got {h['fingerprint']!r}")
    if h["gistnet_digest"] is not None and not isinstance(h["gistnet_digest"], str):
        p.append(f"gistnet_digest must be a string or null, got {h['gistnet_digest']!r}")
    rope = h["rope"]
    if not isinstance(rope, dict):
        p.append(f"rope must be an object, got {rope!r}")
    else:
        try:
            RopeConfig.from_dict(rope)
        except Exception as e:  # any failure to rebuild the config means a bad header
            p.append(f"rope config is invalid: {e}")
    ck = h["checksum"]
    if not (
        isinstance(ck, dict)
        and ck.get("algorithm") == "crc32"
        and _is_int(ck.get("chunk_records"))
        and ck["chunk_records"] >= 1
    ):
        p.append(f"checksum must be {{'algorithm': 'crc32', 'chunk_records': >=1}}, got {ck!r}")
    counts = h["counts"]
    if not (isinstance(counts, list) and all(_is_int(c) and c >= 0 for c in counts)):
        p.append(f"counts must be a list of non-negative integers, got {counts!r}")
    elif _is_int(h["levels"]) and 1 <= h["levels"] <= MAX_LEVELS and len(counts) != h["levels"] + 1:
        p.append(f"counts has {len(counts)} entries, expected levels + 1 = {h['levels'] + 1}")
    tails = h["tail_crc32"]
    if not isinstance(tails, dict):
        p.append(f"tail_crc32 must be an object, got {tails!r}")
    elif _is_int(h["levels"]) and 1 <= h["levels"] <= MAX_LEVELS:
        for k in range(h["levels"] + 1):
            for name in level_array_names(k):
                v = tails.get(name)
                if not (_is_int(v) and 0 <= v < 1 << 32):
                    p.append(f"tail_crc32[{name!r}] must be a uint32, got {v!r}")
    if "inputs" in h:  # optional: trees made before the inputs log have no records
        p += inputs_entry_problems(h["inputs"])
    if not isinstance(h.get("extra", {}), dict):
        p.append(f"extra must be an object, got {h['extra']!r}")
    for key in ("created", "updated"):
        if not isinstance(h[key], str):
            p.append(f"{key} must be a string timestamp, got {h[key]!r}")
    return p


def inputs_entry_problems(entry: Any) -> list[str]:
    """Structural problems of the header's optional ``inputs`` entry (tree/inputs.py)."""
    ok = (isinstance(entry, dict) and set(entry) == {"count", "bytes", "crc32"}
          and all(_is_int(v) and v >= 0 for v in entry.values()) and entry["crc32"] < 1 << 32)
    return [] if ok else [f"inputs must be {{'count': >=0, 'bytes': >=0, 'crc32': uint32}}, "
                          f"got {entry!r}"]


def new_header(*, span: int, levels: int, hidden_size: int, gist_dtype: str, vocab_size: int,
               fingerprint: Any, gistnet_digest: Any, rope: Any, chunk_records: int) -> dict:
    """The header of an empty tree (not validated: pass it to `header_problems`)."""
    now = utc_now()
    ok_levels = _is_int(levels) and 1 <= levels <= MAX_LEVELS
    names = [n for k in range(levels + 1) for n in level_array_names(k)] if ok_levels else []
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "span": span,
        "levels": levels,
        "hidden_size": hidden_size,
        "gist_dtype": gist_dtype,
        "token_dtype": token_dtype_for(vocab_size) if _is_int(vocab_size) else None,
        "vocab_size": vocab_size,
        "fingerprint": fingerprint,
        "rope": rope,
        "gistnet_digest": gistnet_digest,
        "checksum": {"algorithm": "crc32", "chunk_records": chunk_records},
        "counts": [0] * (levels + 1) if ok_levels else [],
        "tail_crc32": dict.fromkeys(names, 0),
        "created": now,
        "updated": now,
    }


def read_header(path: Path) -> dict:
    """Read and validate `path/header.json`.

    Raises:
        ValueError: naming the path when the file is missing, not UTF-8 JSON (garbage or a
            truncated write), or structurally wrong (all problems listed at once).
    """
    hp = Path(path) / HEADER_NAME
    try:
        raw = hp.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"no memory tree at {path}: {hp} does not exist") from None
    except NotADirectoryError:
        raise ValueError(f"no memory tree at {path}: it is not a directory") from None
    try:
        h = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"tree header {hp} is corrupted or truncated ({len(raw)} bytes): {e}"
        ) from None
    problems = header_problems(h)
    if problems:
        raise ValueError(f"tree header {hp} is invalid: " + "; ".join(problems))
    return h


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename inside it is durable (no-op where unsupported)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # platforms that cannot open directories (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_header(path: Path, h: dict) -> None:
    """Atomically replace `path/header.json` by `h`.

    The new header goes to a temporary file that is fsynced before `os.replace` renames it
    over the old one, and the directory is fsynced after: a crash at any point leaves either
    the old header or the new one, never a mix, and once this returns the new one survives a
    power cut. A torn temporary file is harmless, since nothing ever reads it.
    """
    assert not header_problems(h), f"refusing to write a bad header: {header_problems(h)}"
    replace_json(path, h)


def replace_json(path: Path, h: dict) -> None:
    """Atomically replace `path/header.json` by the JSON of `h` (temporary file, fsync,
    `os.replace`, directory fsync): the tree's header (`write_header`) and the token index's."""
    path = Path(path)
    tmp = path / HEADER_TMP_NAME
    data = (json.dumps(h, indent=2, sort_keys=False) + "\n").encode("utf-8")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path / HEADER_NAME)
    fsync_dir(path)
