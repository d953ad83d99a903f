"""Integrity check of a memory tree on disk, streamed in bounded RAM.

`verify(path)` returns every problem it finds as a sentence naming the level, file, and the
byte offset or chunk/record range; an empty list means the tree is sound. It checks:

- the header parses and has every key with the right types (format version included);
- every array file is at least as long as its committed records, every checksum file holds
  one checksum per complete chunk;
- the CRC-32 of every chunk of committed records (complete chunks against the `.crc32` file,
  the trailing partial chunk against the header's `tail_crc32`);
- `count(k) == count(k−1) // span` for every gist level;
- token ids lie in the vocabulary, gists are finite;
- stored centers equal `i·s^k + (s^k − 1)/2` bit for bit, stored phases equal `rope.phases`
  of them within 1e-6 rad, compared modulo 2π;
- the inputs log (`inputs.jsonl`), when the header has one: its committed bytes are there,
  match their CRC-32 and are whole JSON records, as many as the header counts.

Files are read in blocks of at most `_BLOCK_BYTES`, so verifying a billion-token tree needs
only a few tens of MiB.

Axis legend: `g` records of one block, `d` head dim.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from megacontext.rope import RopeConfig
from megacontext.tree import format as fmt
from megacontext.tree.inputs import verify_inputs

_BLOCK_BYTES = 16 << 20
_PHASE_TOL = 1e-6  # rad; float32 resolution near 2π is 4.8e-7
_MAX_PER_FILE = 8  # problems reported per file before summarising the rest


def verify(path: str | os.PathLike) -> list[str]:
    """Every integrity problem of the tree at `path` (empty when it is sound).

    Never raises for a damaged tree: a header that cannot be read is reported as a problem.
    """
    root = Path(path)
    try:
        h = fmt.read_header(root)
    except ValueError as e:
        return [str(e)]
    return verify_header(root, h)


def verify_header(root: Path, h: dict) -> list[str]:
    """Check the files of the tree at `root` against its (already validated) header `h`."""
    layout = fmt.layout_from_header(h)
    rope = RopeConfig.from_dict(h["rope"])
    counts = h["counts"]
    problems: list[str] = []
    for k in range(1, layout.levels + 1):
        if counts[k] != counts[k - 1] // layout.span:
            problems.append(
                f"level {k} has {counts[k]} committed gists but level {k - 1} has "
                f"{counts[k - 1]} records, so it should have {counts[k - 1] // layout.span}"
            )
    for level, name in layout.array_names():
        found = _check_file(root, level, name, layout, counts[level], h, rope)
        if len(found) > _MAX_PER_FILE:
            found = found[:_MAX_PER_FILE] + [
                f"level {level} file {name}: {len(found) - _MAX_PER_FILE} more problems"
            ]
        problems += found
    return problems + verify_inputs(root, h)


def _check_file(root: Path, level: int, name: str, layout: fmt.Layout, count: int, h: dict,
                rope: RopeConfig) -> list[str]:
    """Sizes, chunk checksums and record contents of one array file."""
    path, crc_path = root / name, root / fmt.crc_name(name)
    dtype = layout.record_dtype(name)
    rec, chunk = dtype.itemsize, layout.chunk_records
    need = count * rec
    if not path.exists():
        return [f"level {level} file {name} is missing ({count} committed records)"]
    size = path.stat().st_size
    if size < need:
        torn = size // rec
        return [
            f"level {level} file {name} is truncated at byte offset {size}: {count} committed "
            f"records of {rec} bytes need {need} bytes; record {torn} (byte offset "
            f"{torn * rec}) is torn or missing"
        ]
    full = count // chunk
    crc_size = crc_path.stat().st_size if crc_path.exists() else 0
    if crc_size < full * 4:
        return [
            f"level {level} checksum file {crc_path.name} is truncated at byte offset "
            f"{crc_size}: {full} complete chunks of {chunk} records need {full * 4} bytes"
        ]
    stored_crcs = np.fromfile(crc_path, dtype="<u4", count=full) if full else None

    problems: list[str] = []
    # Blocks never straddle a chunk boundary, so each chunk's CRC is the running CRC of its
    # blocks, and the block's records can be checked while they are in memory.
    per_block = max(1, min(chunk, _BLOCK_BYTES // rec))
    running, pos = 0, 0
    with open(path, "rb") as f:
        while pos < count:
            stop = min(pos + per_block, (pos // chunk + 1) * chunk, count)
            buf = f.read((stop - pos) * rec)
            assert len(buf) == (stop - pos) * rec, f"short read of {name} at record {pos}"
            running = fmt.crc32(buf, running)
            problems += _check_records(level, name, np.frombuffer(buf, dtype=dtype), pos,
                                       layout, h, rope)
            pos = stop
            if pos % chunk == 0 or pos == count:
                j = (pos - 1) // chunk
                want = int(stored_crcs[j]) if pos % chunk == 0 else h["tail_crc32"][name]
                if running != want:
                    a = j * chunk
                    problems.append(
                        f"level {level} file {name}: checksum mismatch in chunk {j} (records "
                        f"[{a}, {pos}), bytes [{a * rec}, {pos * rec})): stored {want:#010x}, "
                        f"computed {running:#010x}"
                    )
                running = 0
    return problems


def _check_records(level: int, name: str, recs: np.ndarray, first: int, layout: fmt.Layout,
                   h: dict, rope: RopeConfig) -> list[str]:
    """Content checks of records `[first, first + g)` of one file (`recs`: `[g]` records)."""
    if level == 0:
        bad = recs >= h["vocab_size"]
        if bad.any():
            i = int(bad.argmax())
            return [f"level 0 token {first + i}: id {int(recs[i])} is outside the vocabulary "
                    f"[0, {h['vocab_size']})"]
        return []
    if name.endswith(".gists"):
        if layout.gist_dtype == "bfloat16":
            vals = (recs.astype(np.uint32) << 16).view(np.float32)
        else:
            vals = recs
        finite = np.isfinite(vals).all(axis=1)
        if not finite.all():
            i = int((~finite).argmax())
            return [f"level {level} gist {first + i} is not finite"]
        return []
    ref = fmt.node_metadata(level, first, first + len(recs), rope, layout.span)
    out = []
    wrong = recs["center"] != ref["center"]
    if wrong.any():
        i = int(wrong.argmax())
        got, exp = float(recs["center"][i]), float(ref["center"][i])
        out.append(f"level {level} node {first + i}: stored center {got!r}, expected {exp!r}")
    # Compare modulo 2π: 6.2831850 and 0.0000003 are 7e-7 rad apart, not 6.28.
    diff = recs["phases"].astype(np.float64) - ref["phases"].astype(np.float64)  # [g, d/2]
    diff = np.abs((diff + math.pi) % (2 * math.pi) - math.pi)
    worst = diff.max(axis=1)  # [g]
    if (worst > _PHASE_TOL).any() or not np.isfinite(worst).all():
        i = int(np.argmax(~(worst <= _PHASE_TOL)))
        out.append(f"level {level} node {first + i}: stored phases differ from rope.phases by "
                   f"{worst[i]:.3g} rad (tolerance {_PHASE_TOL:g})")
    return out
