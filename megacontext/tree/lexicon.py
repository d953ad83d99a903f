"""The token index beside a tree (``<tree>/lexicon/``): which level-1 spans hold each token id.

Derived data: built from the committed token ids (``build_lexicon``, ``megacontext index``),
never part of the tree's commits; deleting the directory loses nothing. It lets the
``lexical`` scorer look a query's tokens up in the nodes it scores without reading the memory:
document frequencies from the offsets (O(1) per token) and "does node (k, i) hold token t" by a
binary search of t's postings for the node's span range (O(log) per node and token).

Axes: ``v`` vocabulary, ``p`` postings of a segment, ``q`` query tokens, ``m`` node ranges,
``s`` span (32).

Layout (docs/tree-format.md, "Token index"): ``header.json`` lists segments, each a CSR over
the vocabulary for the complete spans ``[start, stop)``:

- ``g{gen}.offsets``: int64 ``[v + 1]``; token t's postings are
  ``postings[offsets[t]:offsets[t + 1]]``;
- ``g{gen}.postings``: the ascending, distinct indices of the spans of ``[start, stop)`` that
  hold t (global span indices; uint32 when ``stop`` fits, else int64), token after token.

Segments tile ``[0, spans)`` in order. Extending the index (a tree that grew) writes one more
segment for the new spans; past ``MAX_SEGMENTS`` they are merged into one (streamed from the
segments, not the tree). Crash safety is the tree's: new files are written under a fresh
generation's names and fsynced, then the header is replaced atomically; files no header
names are debris, deleted by the next build. An index without a header is no index; a header
whose files are missing or of the wrong size, or that names another tree (fingerprint,
creation time) or more spans than the tree holds, is refused with a ``ValueError``. An index
behind the tree (an ingest killed before it extended the index, ``--no-index``) is sound: it
serves the spans it covers, and the next build adds the rest; one ahead of an open handle
(whose tree a writer has since committed and indexed) is served too, up to the handle's spans.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megacontext.tree import format as fmt

try:  # advisory single-builder lock; POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LEXICON_DIR = "lexicon"
FORMAT_NAME = "megacontext-lexicon"
FORMAT_VERSION = 1
LOCK_NAME = "build.lock"
CHUNK_SPANS = 1 << 15  # spans read from the tree at a time while building (1M tokens)
MERGE_BLOCK = 1 << 24  # postings moved at a time while merging segments (64-128 MiB)
MAX_SEGMENTS = 8  # more after an extension: merge them into one
_FILE = re.compile(r"^g\d+\.(offsets|postings)$")
_CRC_BLOCK = 16 << 20


def lexicon_dir(tree_dir: str | os.PathLike) -> Path:
    return Path(tree_dir) / LEXICON_DIR


def postings_dtype(stop: int) -> np.dtype:
    """uint32 while every span index of the segment, and its end, fit; else int64 (LE)."""
    return np.dtype("<u4") if stop < 1 << 32 else np.dtype("<i8")


def tree_identity(tree: Any) -> dict:
    """What an index records of its tree, and checks on open: the tokenizer/base-model
    fingerprint and the tree's creation time (two trees of one model differ by it)."""
    return {"fingerprint": tree.fingerprint, "created": tree.header["created"]}


@dataclass(frozen=True)
class Segment:
    """One CSR of the index: the spans ``[start, stop)``, ``postings`` entries."""

    name: str
    start: int
    stop: int
    postings: int
    dtype: str
    crc32: dict


class Lexicon:
    """An open token index (read-only, memory-mapped). Make one with :meth:`open`.

    Attributes:
        spans: complete level-1 spans covered, ``[0, spans)``.
        vocab_size, span: the tree's.
    """

    def __init__(self, path: Path, header: dict, segments: list[tuple[Segment, np.ndarray,
                                                                        np.ndarray]]):
        self.path, self.header = path, header
        self.spans, self.vocab_size, self.span = header["spans"], header["vocab_size"], \
            header["span"]
        self._segs = segments  # (segment, offsets [v+1] int64, postings [p])
        self._cached: tuple[bytes | None, list] = (None, [])  # _lists of the last ids

    @property
    def segments(self) -> list[Segment]:
        return [seg for seg, _, _ in self._segs]

    @classmethod
    def open(cls, tree: Any) -> Lexicon | None:
        """The index of ``tree`` (an open ``MegaContextTree``, or duck-typed: ``path``,
        ``fingerprint``, ``header["created"]``, ``vocab_size``, ``span``, ``num_tokens``);
        None when it has none (no ``lexicon/header.json``: never built, or a first build that
        was interrupted).

        Raises:
            ValueError: the index is torn, of another tree or format, or covers more spans
                than the tree holds (the message names both sides and how to rebuild); more
                than ``tree`` counts but no more than its committed header on disk does is
                served (a handle opened before the latest commit).
        """
        root = lexicon_dir(tree.path)
        hp = root / fmt.HEADER_NAME
        if not hp.is_file():
            return None
        rebuild = f"rebuild it with `megacontext index {tree.path} --rebuild`"
        try:
            h = json.loads(hp.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"token index {hp} is corrupted ({e}); {rebuild}") from None
        problems = header_problems(h)
        if problems:
            raise ValueError(f"token index {hp} is invalid: {'; '.join(problems)}; {rebuild}")
        want = tree_identity(tree)
        mism = [f"{key} {h['tree'].get(key)!r}, this tree has {want[key]!r}"
                for key in ("fingerprint", "created") if h["tree"].get(key) != want[key]]
        mism += [f"{key} {h[key]}, this tree has {getattr(tree, key)}"
                 for key in ("vocab_size", "span") if h[key] != getattr(tree, key)]
        if mism:
            raise ValueError(f"token index at {root} was built for another tree: "
                             f"{'; '.join(mism)}; {rebuild}")
        have = tree.num_tokens // tree.span
        if h["spans"] > have and h["spans"] > _committed_spans(tree):  # not a handle behind
            raise ValueError(f"token index at {root} covers {h['spans']:,} spans, the tree at "
                             f"{tree.path} holds {have:,}: it is stale (of another copy of the "
                             f"tree); {rebuild}")
        segs, problems = [], []
        for entry in h["segments"]:
            seg = Segment(**entry)
            try:
                offsets, postings = _map_segment(root, seg, h["vocab_size"])
            except ValueError as e:
                problems.append(str(e))
                continue
            segs.append((seg, offsets, postings))
        if problems:
            raise ValueError(f"token index at {root} is damaged: {'; '.join(problems)}; "
                             f"{rebuild}")
        return cls(root, h, segs)

    # -- lookups ------------------------------------------------------------------------

    def document_frequency(self, ids: np.ndarray, n: int) -> np.ndarray:
        """``[q]`` int64: how many of the spans ``[0, min(n, spans))`` hold each token of
        ``ids`` (``[q]`` int64 in the vocabulary). O(1) per token and segment below ``n``,
        one binary search in the segment ``n`` falls in."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.zeros(ids.size, dtype=np.int64)
        for seg, off, post in self._segs:
            if seg.start >= n:
                break
            lo, hi = off[ids], off[ids + 1]  # [q]
            if seg.stop <= n:
                out += hi - lo
                continue
            cut = post.dtype.type(n)
            out += [np.searchsorted(post[a:b], cut) for a, b in zip(lo.tolist(), hi.tolist(),
                                                                    strict=True)]
        return out

    def holds(self, ids: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """``[m, q]`` bool: whether some span of ``[lo_j, hi_j)`` (span indices, ``[m]``
        int64, within ``[0, spans]``) holds token ``ids[t]``: one binary search of the token's
        postings per range (its first posting at or after ``lo_j`` is before ``hi_j``),
        vectorised over the ranges."""
        ids = np.asarray(ids, dtype=np.int64)
        lo, hi = np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)
        out = np.zeros((lo.size, ids.size), dtype=bool)
        if lo.size == 0:
            return out
        first, last = int(lo.min()), int(hi.max())
        for (seg, _, post), (p0, p1, lists) in zip(self._segs, self._lists(ids), strict=True):
            if seg.stop <= first or seg.start >= last or post.size == 0:
                continue
            # clipped to the segment: every value fits its postings' dtype (no cast of them)
            a = np.clip(lo, seg.start, seg.stop).astype(post.dtype)
            found = np.zeros((ids.size, lo.size), dtype=np.int64)  # [q, m] first >= lo
            for j, plist in lists:
                found[j] = plist.searchsorted(a)
            found += p0[:, None]
            inside = found < p1[:, None]  # [q, m]: some posting of t at or after lo_j ...
            first_at = post[np.minimum(found, post.size - 1)]  # [q, m]
            out |= (inside & (first_at < hi[None, :])).T  # ... and it is before hi_j
        return out

    def _lists(self, ids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, list]]:
        """Per segment ``(starts [q], stops [q], [(j, postings of ids[j])] of the non-empty
        lists)``, kept for the last ``ids`` (one query asks again and again)."""
        key = ids.tobytes()
        if self._cached[0] != key:
            out = []
            for _, off, post in self._segs:
                p0, p1 = off[ids], off[ids + 1]
                out.append((p0, p1, [(j, post[x:y]) for j, (x, y)
                                     in enumerate(zip(p0.tolist(), p1.tolist(), strict=True))
                                     if y > x]))
            self._cached = (key, out)
        return self._cached[1]

    def postings(self, token: int) -> np.ndarray:
        """int64: every span of ``[0, spans)`` that holds ``token``, ascending."""
        parts = [post[off[token]:off[token + 1]] for _, off, post in self._segs]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def nbytes(self) -> int:
        total = (self.path / fmt.HEADER_NAME).stat().st_size
        for seg in self.segments:
            total += sum((self.path / f"{seg.name}.{kind}").stat().st_size
                         for kind in ("offsets", "postings"))
        return total

    def info(self) -> dict:
        """A JSON-ready summary (``megacontext inspect``)."""
        return {"path": str(self.path), "format_version": self.header["format_version"],
                "spans": self.spans, "tokens": self.spans * self.span,
                "segments": len(self._segs),
                "postings": sum(seg.postings for seg in self.segments),
                "bytes": self.nbytes(), "updated": self.header["updated"]}


def open_lexicon(tree: Any, cache: dict) -> Lexicon | None:
    """``Lexicon.open(tree)``, reused from ``cache`` (a dict the caller keeps) while the index's
    header file (inode, size, time) and the tree's token count are unchanged: a new query
    then finds the index's pages mapped already. A rebuild or extension renames a new header
    in, so it is seen at the next call."""
    try:
        st = os.stat(lexicon_dir(tree.path) / fmt.HEADER_NAME)
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns, tree.num_tokens)
    except FileNotFoundError:
        stamp = (None, tree.num_tokens)
    if cache.get("stamp") != stamp:
        cache.clear()
        lex = Lexicon.open(tree)  # raises for a refused index: nothing cached
        cache.update(stamp=stamp, lexicon=lex)
    return cache["lexicon"]


def _committed_spans(tree: Any) -> int:
    """Complete spans the tree's committed header on disk counts: more than ``tree`` sees when
    the handle read its header before a writer's latest commit (an ingest that extended the
    index since: then the index is this tree's, ahead of the handle, and served; lookups stop
    at the caller's span count). -1 when it cannot be read or is another tree's."""
    try:
        h = fmt.read_header(Path(tree.path))
    except (OSError, ValueError):
        return -1
    return h["counts"][0] // tree.span if h.get("created") == tree.header["created"] else -1


def _map_segment(root: Path, seg: Segment, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Memory maps ``(offsets [v+1] int64, postings [p])`` of one segment, its sizes and
    ends checked (cheap: the full check is :func:`lexicon_problems`)."""
    op, pp = root / f"{seg.name}.offsets", root / f"{seg.name}.postings"
    dtype = np.dtype(seg.dtype)
    for path, need in ((op, (vocab + 1) * 8), (pp, seg.postings * dtype.itemsize)):
        size = path.stat().st_size if path.is_file() else -1
        if size != need:
            raise ValueError(f"{path.name} is {'missing' if size < 0 else f'{size:,} bytes'}, "
                             f"the header says {need:,} bytes (torn or replaced)")
    offsets = np.memmap(op, dtype="<i8", mode="r").view(np.ndarray)
    if offsets[0] != 0 or offsets[-1] != seg.postings:
        raise ValueError(f"{op.name} runs from {int(offsets[0])} to {int(offsets[-1])}, "
                         f"expected 0 to {seg.postings:,} postings")
    postings = (np.memmap(pp, dtype=dtype, mode="r").view(np.ndarray) if seg.postings
                else np.zeros(0, dtype))
    return offsets, postings


def header_problems(h: Any) -> list[str]:
    """Structural problems of a parsed index header (empty when well formed)."""
    keys = ("format", "format_version", "span", "vocab_size", "spans", "tree", "generation",
            "segments", "created", "updated")
    if not isinstance(h, dict) or any(k not in h for k in keys):
        return [f"expected an object with keys {list(keys)}"]
    p = []
    if h["format"] != FORMAT_NAME or h["format_version"] != FORMAT_VERSION:
        p.append(f"format {h['format']!r} version {h['format_version']!r} (this code reads "
                 f"{FORMAT_NAME!r} version {FORMAT_VERSION})")
    if not isinstance(h["tree"], dict):
        p.append(f"tree must be an object, got {h['tree']!r}")
    at = 0
    for entry in h["segments"] if isinstance(h["segments"], list) else [None]:
        try:
            seg = Segment(**entry)
            ok = (seg.start == at and seg.stop > seg.start and seg.postings >= 0
                  and np.dtype(seg.dtype) == postings_dtype(seg.stop))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            p.append(f"segment {entry!r} does not continue the spans at {at}")
            break
        at = seg.stop
    if not p and at != h["spans"]:
        p.append(f"segments cover {at} spans, the header says {h['spans']}")
    return p


def lexicon_problems(tree: Any) -> list[str]:
    """Every problem of ``tree``'s index, reading all of it (empty when sound or absent):
    what :meth:`Lexicon.open` refuses, the files' CRC-32s, ascending offsets, and ascending
    postings within each token's list and its segment's spans."""
    try:
        lex = Lexicon.open(tree)
    except ValueError as e:
        return [str(e)]
    if lex is None:
        return []
    p = []
    for seg, off, post in lex._segs:
        for kind in ("offsets", "postings"):
            if _crc_file(lex.path / f"{seg.name}.{kind}") != seg.crc32[kind]:
                p.append(f"token index {seg.name}.{kind} does not match its CRC-32")
        if (np.diff(off) < 0).any():
            p.append(f"token index {seg.name}.offsets is not ascending")
            continue
        for a in range(0, post.size, MERGE_BLOCK):
            block = post[a:a + MERGE_BLOCK].astype(np.int64)
            if block.size and (block.min() < seg.start or block.max() >= seg.stop):
                p.append(f"token index {seg.name}.postings holds spans outside "
                         f"[{seg.start}, {seg.stop})")
                break
        inner = np.ones(max(post.size - 1, 0), dtype=bool)  # pairs within one token's list
        inner[off[1:-1][(off[1:-1] > 0) & (off[1:-1] < post.size)] - 1] = False
        if post.size > 1 and (np.diff(post.astype(np.int64))[inner] <= 0).any():
            p.append(f"token index {seg.name}.postings is not ascending within a token")
    return p


# ---------------------------------------------------------------------------------------------
# building


def _unique_per_span(tokens: np.ndarray, first: int) -> tuple[np.ndarray, np.ndarray]:
    """``(token ids, span indices)`` of the distinct tokens of each span of ``tokens``
    (``[m, s]``, spans ``first …``), span after span, ids ascending within one."""
    srt = np.sort(tokens, axis=1)  # [m, s]
    keep = np.ones(srt.shape, dtype=bool)
    keep[:, 1:] = srt[:, 1:] != srt[:, :-1]
    return srt[keep], np.repeat(np.arange(first, first + srt.shape[0]), keep.sum(axis=1))


def _span_chunks(tree: Any, start: int, stop: int, chunk: int):
    s = tree.span
    for a in range(start, stop, chunk):
        b = min(a + chunk, stop)
        tokens = np.asarray(tree.tokens(a * s, b * s)).astype(np.int64, copy=False)
        yield a, b, tokens.reshape(b - a, s)


def _write_segment(root: Path, name: str, tree: Any, start: int, stop: int, chunk: int,
                   bar: Any) -> Segment:
    """Two passes over the spans ``[start, stop)``: document frequencies (→ offsets), then
    each chunk's (token, span) pairs sorted by token and written to their places. RAM: one
    chunk's pairs and the ``[v + 1]`` offsets; the postings go straight to their file."""
    vocab = tree.vocab_size
    df = np.zeros(vocab, dtype=np.int64)
    for a, b, tokens in _span_chunks(tree, start, stop, chunk):
        ids, _ = _unique_per_span(tokens, a)
        df += np.bincount(ids, minlength=vocab)
        bar.update(b - a)
    offsets = np.zeros(vocab + 1, dtype="<i8")
    np.cumsum(df, out=offsets[1:])
    total, dtype = int(offsets[-1]), postings_dtype(stop)
    _write_array(root / f"{name}.offsets", offsets)
    pp = root / f"{name}.postings"
    with open(pp, "wb") as f:
        f.truncate(total * dtype.itemsize)
    if total:
        out = np.memmap(pp, dtype=dtype, mode="r+", shape=(total,))
        cursor = offsets[:-1].copy()  # [v] next free place of each token's list
        for a, b, tokens in _span_chunks(tree, start, stop, chunk):
            ids, spans = _unique_per_span(tokens, a)
            order = np.argsort(ids, kind="stable")  # by token; spans stay ascending
            ids, spans = ids[order], spans[order]
            counts = np.bincount(ids, minlength=vocab)
            first = np.cumsum(counts) - counts  # [v] each token's first pair in the chunk
            out[cursor[ids] + np.arange(ids.size) - first[ids]] = spans
            cursor += counts
            bar.update(b - a)
        assert np.array_equal(cursor, offsets[1:]), "pass 2 filled other counts than pass 1"
        out.flush()
        del out
    _fsync(pp)
    return Segment(name, start, stop, total, dtype.str,
                   {"offsets": _crc_file(root / f"{name}.offsets"), "postings": _crc_file(pp)})


def _merge_segments(root: Path, name: str, segs: list[tuple[Segment, np.ndarray, np.ndarray]],
                    vocab: int) -> Segment:
    """One segment holding all of ``segs`` (consecutive): token by token, their lists
    concatenated in order (already ascending), in blocks of about ``MERGE_BLOCK`` postings."""
    start, stop = segs[0][0].start, segs[-1][0].stop
    offsets = np.zeros(vocab + 1, dtype="<i8")
    for _, off, _ in segs:
        offsets += off
    _write_array(root / f"{name}.offsets", offsets)
    total, dtype = int(offsets[-1]), postings_dtype(stop)
    pp = root / f"{name}.postings"
    with open(pp, "wb") as f:
        t = 0
        while t < vocab:  # tokens [t, u): about MERGE_BLOCK postings
            u = int(np.searchsorted(offsets, offsets[t] + MERGE_BLOCK, side="right"))
            u = min(max(u - 1, t + 1), vocab)
            block = np.empty(int(offsets[u] - offsets[t]), dtype=dtype)
            done = np.zeros(u - t, dtype=np.int64)  # [u − t] filled so far per token
            for _, off, post in segs:
                lengths = np.diff(off[t:u + 1])
                src = post[off[t]:off[u]]
                dest = (np.repeat(offsets[t:u] - offsets[t] + done - (off[t:u] - off[t]),
                                  lengths) + np.arange(src.size))
                block[dest] = src
                done += lengths
            f.write(block.tobytes())
            t = u
    _fsync(pp)
    return Segment(name, start, stop, total, dtype.str,
                   {"offsets": _crc_file(root / f"{name}.offsets"), "postings": _crc_file(pp)})


def build_lexicon(tree: Any, *, rebuild: bool = False, chunk_spans: int = CHUNK_SPANS,
                  progress: bool = True) -> Lexicon:
    """Build or extend the token index of ``tree`` (open, any mode; reads only its committed
    tokens and writes only under ``<tree>/lexicon/``).

    Extends a sound index by one segment for the spans the tree gained (merging all into one
    past ``MAX_SEGMENTS``); ``rebuild`` (or no index yet) writes one segment for all spans. A
    torn or foreign index is refused unless ``rebuild``. Crash-safe: a build interrupted at
    any point leaves the previous index (or none) in force.

    Returns:
        the new index, open.

    Raises:
        ValueError: the existing index is refused (see :meth:`Lexicon.open`) and not
            ``rebuild``; ``chunk_spans`` < 1.
        RuntimeError: another build of this index holds its lock.
    """
    from tqdm import tqdm

    if not isinstance(chunk_spans, int) or chunk_spans < 1:
        raise ValueError(f"chunk_spans={chunk_spans!r} (expected a positive int)")
    root = lexicon_dir(tree.path)
    root.mkdir(exist_ok=True)
    lock = _lock(root)
    try:
        old = None if rebuild else Lexicon.open(tree)
        h = old.header if old is not None else None
        gen = max(h["generation"] if h else 0, _highest_generation(root)) + 1
        have, stop = (old.spans if old else 0), tree.num_tokens // tree.span
        segs = [] if old is None else list(old._segs)
        if old is not None and stop <= have:  # nothing new (or this handle is behind)
            _remove_debris(root, h)
            return old
        name = f"g{gen:06d}"
        passes = 2 * (stop - have)
        with tqdm(total=passes, unit="span", unit_scale=True, desc="index", disable=not progress,
                  leave=False) as bar:
            new = _write_segment(root, name, tree, have, stop, chunk_spans, bar) \
                if stop > have else None
        entries = [seg for seg, _, _ in segs] + ([new] if new else [])
        if len(entries) > MAX_SEGMENTS:
            mapped = segs + [(new, *_map_segment(root, new, tree.vocab_size))]
            gen += 1
            entries = [_merge_segments(root, f"g{gen:06d}", mapped, tree.vocab_size)]
            del mapped
        now = fmt.utc_now()
        header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "span": tree.span,
                  "vocab_size": tree.vocab_size, "spans": stop, "tree": tree_identity(tree),
                  "generation": gen, "segments": [vars(seg) for seg in entries],
                  "created": h["created"] if h else now, "updated": now}
        assert not header_problems(header), header_problems(header)
        _write_header(root, header)
        del old, segs
        _remove_debris(root, header)
        lex = Lexicon.open(tree)
        assert lex is not None
        return lex
    finally:
        if lock is not None:
            os.close(lock)  # releases the flock


def _highest_generation(root: Path) -> int:
    gens = [int(p.name[1:].split(".")[0]) for p in root.iterdir() if _FILE.match(p.name)]
    return max(gens, default=0)


def _remove_debris(root: Path, header: dict) -> None:
    """Delete the index files the header does not name (older generations, torn builds)."""
    keep = {f"{seg['name']}.{kind}" for seg in header["segments"]
            for kind in ("offsets", "postings")}
    for p in root.iterdir():
        if _FILE.match(p.name) and p.name not in keep:
            p.unlink(missing_ok=True)
    (root / fmt.HEADER_TMP_NAME).unlink(missing_ok=True)


def _write_array(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(np.ascontiguousarray(arr).tobytes())
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crc_file(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_CRC_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc & 0xFFFFFFFF


def _write_header(root: Path, h: dict) -> None:
    """Atomically replace ``header.json`` (temporary file, fsync, rename, directory fsync)."""
    fmt.fsync_dir(root)  # the segment files' names are durable before the header names them
    fmt.replace_json(root, h)


def _lock(root: Path) -> int | None:
    if fcntl is None:  # pragma: no cover
        return None
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"token index at {root} is being built by another process") from None
    return fd


__all__ = ["LEXICON_DIR", "Lexicon", "build_lexicon", "lexicon_dir", "lexicon_problems",
           "open_lexicon"]
