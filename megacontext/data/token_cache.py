"""A tokenized corpus on disk: one memory-mapped id array, document offsets, and metadata.

Layout of one cache entry (a directory, written once and renamed into place)::

    ids.bin     every document's token ids back to back, little-endian uint16 (vocabulary
                <= 65536) or uint32; no separators
    docs.npy    int64 offsets [num_docs + 1]: document i is ids[docs[i]:docs[i + 1]]
    meta.json   corpus name, sources digest, tokenizer sha256, vocab size, dtype, counts,
                document names

Empty documents are never stored. Filtering by length (``min_tokens``) happens when the
entry is opened, so one entry serves every threshold.

The train/validation split is by document and by a hash of ``(seed, name)`` alone: whether a
document is held out never depends on which other documents exist, so adding documents to a
corpus never moves an existing one across the split.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from megacontext.base.tokenizer import Tokenizer
from megacontext.textio import exact_segments

FORMAT_VERSION = 1
ENCODE_BATCH_CHARS = 1 << 22  # text handed to the (parallel) Rust tokenizer per call

# One document: its name and its text in pieces (a long file arrives in pieces of ~1 MiB).
Document = tuple[str, Iterable[str]]


def id_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocabulary <= 65536), else uint32; little-endian on disk."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class Split(NamedTuple):
    """Document indices of the three sides of a split (sorted int64, disjoint, together all
    documents)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_documents(names: list[str], val_fraction: float, seed: int,
                    test_fraction: float = 0.0) -> Split:
    """Split document indices into ``(train, val, test)`` by a hash of ``(seed, name)``.

    Document ``i`` draws ``u = blake2b(f"{seed}\\0{names[i]}")`` read as a fraction of 2^64; it
    is a test document when ``u < test_fraction``, a validation document when
    ``test_fraction <= u < test_fraction + val_fraction``, and a training document otherwise.
    Each document's side depends only on its own name and the seed, so the split is
    deterministic and adding or removing documents never moves another one. Validation is for
    training's model selection, test for the reported evaluation: no document is on two sides.

    One exception keeps tiny corpora usable: training gets the highest-hash document if it
    came out empty (two or more documents); then, when a side with a positive fraction comes
    out empty, the document nearest its hash interval moves there from the training side, or
    else from the other held-out side, if that side keeps at least one.

    Args:
        names: unique document names.
        val_fraction: expected share of validation documents, in [0, 1).
        seed: changes the split.
        test_fraction: expected share of test documents, in [0, 1); with ``val_fraction``
            below 1.

    Returns:
        A :class:`Split` ``(train, val, test)``.
    """
    problems = [f"{name}={v!r} must be in [0, 1)" for name, v in
                (("val_fraction", val_fraction), ("test_fraction", test_fraction))
                if not isinstance(v, int | float) or isinstance(v, bool) or not 0.0 <= v < 1.0]
    if not problems and val_fraction + test_fraction >= 1.0:
        problems.append(f"val_fraction + test_fraction = {val_fraction + test_fraction:g} "
                        f"leaves no training documents (must be < 1)")
    if problems:
        raise ValueError("invalid split: " + "; ".join(problems))
    if len(set(names)) != len(names):
        raise ValueError("document names must be unique to split by name")
    u = np.array([int.from_bytes(hashlib.blake2b(f"{seed}\0{name}".encode(),
                                                 digest_size=8).digest(), "little") / 2.0**64
                  for name in names], dtype=np.float64)
    side = np.where(u < test_fraction, 2, np.where(u < test_fraction + val_fraction, 1, 0))
    if len(names) >= 2 and not (side == 0).any():  # training needs a document
        side[np.argmax(u)] = 0
    # (side, interval) of each held-out side, test first: its interval starts at 0
    for k, fraction, lo, hi in ((2, test_fraction, 0.0, test_fraction),
                                (1, val_fraction, test_fraction, test_fraction + val_fraction)):
        if fraction <= 0 or (side == k).any():
            continue
        donors = [d for d in (0, 3 - k) if (side == d).sum() >= 2]  # training first
        if donors:
            pool = np.flatnonzero(side == donors[0])
            side[pool[np.argmin(np.maximum(lo - u[pool], u[pool] - hi))]] = k
    index = np.arange(len(names), dtype=np.int64)
    return Split(index[side == 0], index[side == 1], index[side == 2])


class TokenCorpus:
    """A read-only view of a cache entry, optionally keeping only documents of at least
    ``min_tokens`` tokens (indices, names and lengths all refer to the kept documents).

    Attributes:
        path: the cache entry directory.
        meta: its ``meta.json``.
        names: kept document names, in corpus order.
        doc_lengths: int64 ``[num_docs]`` tokens per kept document.
        cached: True when :func:`load_corpus` found the entry already built.
    """

    def __init__(self, path: str | os.PathLike, *, min_tokens: int = 1,
                 cached: bool = True) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} does not exist: not a corpus cache entry")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"corpus cache {self.path} has format version "
                             f"{self.meta.get('format_version')!r}, this code reads "
                             f"{FORMAT_VERSION}; delete the directory to rebuild it")
        self.dtype = np.dtype(self.meta["dtype"])
        offsets = np.load(self.path / "docs.npy")
        total = int(self.meta["num_tokens"])
        size = (self.path / "ids.bin").stat().st_size
        if (offsets.ndim != 1 or offsets.size != self.meta["num_docs"] + 1 or offsets[0] != 0
                or offsets[-1] != total or size != total * self.dtype.itemsize
                or np.any(np.diff(offsets) <= 0)):
            raise ValueError(f"corpus cache {self.path} is inconsistent (ids.bin {size} bytes, "
                             f"{offsets.size} offsets, meta says {total} tokens in "
                             f"{self.meta['num_docs']} documents); delete it to rebuild")
        lengths = np.diff(offsets)
        self.min_tokens = int(min_tokens)
        self._rows = np.flatnonzero(lengths >= self.min_tokens)
        self._offsets = offsets
        self.doc_lengths = lengths[self._rows]
        all_names = self.meta["names"]
        self.names = [all_names[r] for r in self._rows]
        self.cached = cached
        self._ids: np.ndarray | None = None

    @property
    def ids(self) -> np.ndarray:
        """All stored ids (memory-mapped; includes documents filtered out by ``min_tokens``)."""
        if self._ids is None:
            self._ids = np.memmap(self.path / "ids.bin", dtype=self.dtype, mode="r")
        return self._ids

    @property
    def num_docs(self) -> int:
        return int(self._rows.size)

    @property
    def num_tokens(self) -> int:
        return int(self.doc_lengths.sum())

    @property
    def name(self) -> str:
        return self.meta["corpus"]

    def doc(self, i: int) -> np.ndarray:
        """Token ids of document ``i``: a read-only view into the memory map, ``[len]``."""
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} out of range (corpus has {self.num_docs})")
        row = self._rows[i]
        return self.ids[self._offsets[row]:self._offsets[row + 1]]

    def split(self, val_fraction: float, seed: int = 0, test_fraction: float = 0.0) -> Split:
        """``(train, val, test)`` document indices; see :func:`split_documents`."""
        return split_documents(self.names, val_fraction, seed, test_fraction)

    def longest(self) -> tuple[str, int]:
        """Name and length of the longest kept document."""
        i = int(np.argmax(self.doc_lengths))
        return self.names[i], int(self.doc_lengths[i])

    def __getstate__(self) -> dict:
        # A memmap would pickle as a full in-memory copy; reopen it in the receiving process.
        return {**self.__dict__, "_ids": None}

    def __repr__(self) -> str:
        return (f"TokenCorpus({self.name!r}, {self.num_docs} documents, {self.num_tokens:,} "
                f"tokens, {self.path})")


def build_cache(target: Path, documents: Iterator[Document], tokenizer: Tokenizer, *,
                meta: dict, total_bytes: int | None = None, progress: bool = True) -> None:
    """Tokenize ``documents`` into a cache entry at ``target`` (atomically: built in a
    temporary sibling directory and renamed; if another process finished first, its entry
    wins).

    Each document's ids are exactly ``tokenizer.encode(text)``: its pieces are regrouped by
    :func:`megacontext.textio.exact_segments` (as :func:`megacontext.ingest.token_stream`
    does), and segments of many documents go to the tokenizer together (``encode_batch`` runs
    in parallel).

    Raises:
        ValueError: no document has any token.
    """
    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    dtype = id_dtype(tokenizer.vocab_size)
    start = time.perf_counter()
    try:
        offsets, names = [0], []
        with (open(tmp / "ids.bin", "wb") as out,
              tqdm(total=total_bytes, unit="B", unit_scale=True, file=sys.stderr,
                   desc=f"tokenizing {meta['corpus']}", disable=not progress) as bar):
            pending: list[tuple[str | None, str | None]] = []  # (None, piece) | (name, None)
            pending_chars, current = 0, 0

            def flush() -> None:
                nonlocal current, pending_chars
                texts = [t for _, t in pending if t is not None]
                encoded = iter(tokenizer.encode_batch(texts) if texts else [])
                for name, text in pending:
                    if text is not None:
                        ids = np.asarray(next(encoded), dtype=np.int64)
                        if ids.size and (ids.min() < 0 or ids.max() >= 1 << 8 * dtype.itemsize):
                            raise ValueError(f"token ids {ids.min()}..{ids.max()} do not fit "
                                             f"{dtype.name} (vocab_size "
                                             f"{tokenizer.vocab_size})")
                        ids.astype(dtype).tofile(out)
                        current += ids.size
                        bar.update(len(text.encode("utf-8", errors="surrogatepass")))
                    elif current:  # end of a non-empty document
                        offsets.append(offsets[-1] + current)
                        names.append(name)
                        current = 0
                pending.clear()
                pending_chars = 0
                bar.set_postfix_str(f"{len(names):,} docs, {offsets[-1]:,} tokens", refresh=False)

            for name, pieces in documents:
                for piece in exact_segments(pieces, tokenizer):
                    pending.append((None, piece))
                    pending_chars += len(piece)
                    if pending_chars >= ENCODE_BATCH_CHARS:
                        flush()
                pending.append((name, None))
            flush()
        if not names:
            raise ValueError(f"corpus {meta['corpus']!r} has no non-empty document")
        if len(set(names)) != len(names):
            raise ValueError(f"corpus {meta['corpus']!r} has duplicate document names")
        np.save(tmp / "docs.npy", np.asarray(offsets, dtype=np.int64))
        full = {"format_version": FORMAT_VERSION, **meta,
                "tokenizer_sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                "dtype": dtype.str, "num_docs": len(names), "num_tokens": offsets[-1],
                "build_seconds": round(time.perf_counter() - start, 3), "names": names}
        (tmp / "meta.json").write_text(json.dumps(full, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.replace(tmp, target)
        except OSError:  # another process built the same entry first
            if not (target / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
