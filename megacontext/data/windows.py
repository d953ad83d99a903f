"""Windows: the unit training and evaluation score, and the vocabulary that names them.

A window is a contiguous slice of ONE document, laid out as (positions inside the window
start at 0)::

    0                      C              C + T            C + T + H = L
    |---- old context -----|---- tail ----|--- horizon ----|
     g nodes of level k      raw tokens     scored tokens
     (32^k tokens each)

- level 1: ``C = context_spans · span`` (default 30 · 32 = 960), so ``L = 1088``;
- level 2: ``C = l2_spans · span²`` (1,024 per L2 node), ``L = 1024 · l2_spans + T + H``.

The old context starts at window position 0, a multiple of every node size, so node ``i`` of
level ``k`` covers window positions ``[i·32^k, (i+1)·32^k)`` and sits at its center
``i·32^k + (32^k − 1)/2``, as in the tree (:mod:`megacontext.spans`; docs/design.md, Positions).
The model replaces the old context by its ``g`` gists (gist condition) or drops it (truncated
condition); tail and horizon stay raw, and the horizon's H tokens are scored.

Vocabulary — four types, four roles:

- :class:`WindowLayout` — the *shape* of one window: level ``k``, ``g`` nodes of old context,
  tail ``T``, horizon ``H`` (and the derived ``C``, ``L``). What
  :mod:`megacontext.substitution` scores; ``substitution.Window`` is its old name, an alias.
- :class:`WindowSpec` — the *family* of shapes training draws from: the level-1 and level-2
  layouts, an optional *wide* level-1 layout with many more gists (``wide_spans``), and how
  often each comes (``l2_share``, ``wide_share``); ``spec.layout(level, wide)`` is one of them.
- :class:`WindowKey` — *where* one window lies: document, first token, level, wide or not.
  With a spec it names the tokens (:class:`WindowDataset`).
- ``WindowPlan`` (:mod:`megacontext.evaluation.config`) — *what an evaluation scores*: a spec
  per level, how many windows of each level and the horizons reported.

A batch has one fixed shape: the level is drawn once per batch (level 2 with probability
``l2_share``), then, for a level-1 batch, whether it is wide (probability ``wide_share``); shapes
are never mixed within a batch or padded. Validation windows use the level-1 and level-2
layouts only, so arms that differ in their wide share are selected on the same windows.

Training windows are drawn by :class:`WindowSampler` in the main process (the DataLoader's
workers only slice the memory map), so a seed gives the same batches whatever the number of
workers. Validation windows are a fixed, evenly spaced list (:func:`evenly_spaced_windows`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from megacontext.data.token_cache import TokenCorpus
from megacontext.spans import SPAN, node_size


@dataclass(frozen=True)
class WindowLayout:
    """The shape of one window: ``context`` old tokens (``num_gists`` nodes of ``level``),
    then ``tail`` raw tokens, then ``horizon`` scored tokens (positions from 0)."""

    level: int
    num_gists: int
    tail: int
    horizon: int
    span: int = SPAN

    def __post_init__(self) -> None:
        problems = [f"{k}={getattr(self, k)!r} must be >= {lo}" for k, lo in
                    (("level", 1), ("num_gists", 0), ("tail", 0), ("horizon", 1), ("span", 2))
                    if getattr(self, k) < lo]
        if problems:
            raise ValueError("invalid window: " + "; ".join(problems))

    @property
    def node_tokens(self) -> int:
        """Tokens one old-context node stands for: ``span ** level``."""
        return node_size(self.level, self.span)

    @property
    def context(self) -> int:
        """C, the old-context tokens."""
        return self.num_gists * self.node_tokens

    @property
    def length(self) -> int:
        """L = C + T + H."""
        return self.context + self.tail + self.horizon


@dataclass(frozen=True)
class WindowSpec:
    """The family of window shapes training draws from: a level-1 and a level-2 layout, an
    optional wide level-1 layout, and how often each comes (``spec.layout(level, wide)`` gives
    the :class:`WindowLayout`).

    Args:
        span: tokens per L1 node (children per node at every level); 32 in this project.
        context_spans: L1 nodes of old context in a level-1 window.
        tail_tokens: raw recent tokens between the old context and the horizon (may be 0).
        horizon: H, the continuation tokens scored.
        l2_share: fraction of batches whose old context is ``l2_spans`` L2 nodes instead.
        l2_spans: L2 nodes of old context in a level-2 window.
        wide_spans: L1 nodes of old context in a *wide* level-1 window (0: none): a context of
            many gists, the case a reader trained on ``context_spans`` of them meets at long
            range (docs/training.md, "Many gists through the lane").
        wide_share: fraction of level-1 batches that are wide.
    """

    span: int = SPAN
    context_spans: int = 30
    tail_tokens: int = 64
    horizon: int = 64
    l2_share: float = 0.0
    l2_spans: int = 1
    wide_spans: int = 0
    wide_share: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        for name, low in (("span", 2), ("context_spans", 1), ("tail_tokens", 0),
                          ("horizon", 1), ("l2_spans", 1), ("wide_spans", 0)):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or isinstance(value, bool):
                problems.append(f"{name}={value!r} must be an integer")
            elif value < low:
                problems.append(f"{name}={value!r} must be >= {low}")
        for name in ("l2_share", "wide_share"):
            share = getattr(self, name)
            if (not isinstance(share, int | float | np.floating) or isinstance(share, bool)
                    or not 0.0 <= share <= 1.0):
                problems.append(f"{name}={share!r} must be a number in [0, 1]")
            elif name == "wide_share" and share > 0 and self.wide_spans == 0:
                problems.append(f"wide_share={share!r} needs wide_spans >= 1 (the wide "
                                f"layout's L1 nodes)")
        if problems:
            raise ValueError("invalid WindowSpec: " + "; ".join(problems))

    @property
    def levels(self) -> tuple[int, ...]:
        """The levels windows are drawn at."""
        return {0.0: (1,), 1.0: (2,)}.get(float(self.l2_share), (1, 2))

    @property
    def shapes(self) -> tuple[tuple[int, bool], ...]:
        """The ``(level, wide)`` shapes windows are drawn in."""
        wide = self.wide_share > 0 and 1 in self.levels
        return tuple((level, False) for level in self.levels) + (((1, True),) if wide else ())

    def layout(self, level: int, wide: bool = False) -> WindowLayout:
        """The shape of a level-``level`` window (``wide``: the wide level-1 layout)."""
        return WindowLayout(level=level, num_gists=self.num_spans(level, wide),
                            tail=self.tail_tokens, horizon=self.horizon, span=self.span)

    def node_tokens(self, level: int) -> int:
        """Tokens one node of ``level`` stands for: ``span ** level``."""
        self._check_level(level)
        return node_size(level, self.span)

    def num_spans(self, level: int, wide: bool = False) -> int:
        """Nodes (gists) replacing the old context of a level-``level`` window."""
        self._check_level(level)
        if wide:
            if level != 1 or self.wide_spans < 1:
                raise ValueError(f"no wide level-{level} layout (wide_spans="
                                 f"{self.wide_spans}; wide windows are level 1)")
            return self.wide_spans
        return self.context_spans if level == 1 else self.l2_spans

    def context_tokens(self, level: int, wide: bool = False) -> int:
        """Tokens of old context in a level-``level`` window (a multiple of its node size)."""
        return self.layout(level, wide).context

    def window_tokens(self, level: int, wide: bool = False) -> int:
        """Window length L: old context + tail + horizon."""
        return self.layout(level, wide).length

    @property
    def max_window_tokens(self) -> int:
        return max(self.window_tokens(level, wide) for level, wide in self.shapes)

    @staticmethod
    def _check_level(level: int) -> None:
        if level not in (1, 2):
            raise ValueError(f"level {level!r}: windows are level 1 or 2")


class WindowKey(NamedTuple):
    """Where a window lies: document index, first token, level, and whether it has the wide
    level-1 layout (its shape comes from a :class:`WindowSpec`)."""

    doc: int
    offset: int
    level: int
    wide: bool = False


class WindowDataset(Dataset):
    """Windows of ``corpus`` as item dicts.

    Index it by position in its fixed ``windows`` list (validation), or directly by a
    :class:`WindowKey` (what :class:`WindowSampler` yields for training).

    Each item: ``ids`` int64 ``[L]``, ``level`` (1 or 2), ``num_spans`` (gists replacing the
    old context), ``context_tokens``, ``tail``, ``horizon``, ``doc`` (corpus document index),
    ``offset`` (first token in the document).
    """

    def __init__(self, corpus: TokenCorpus, spec: WindowSpec,
                 windows: Sequence[WindowKey] = ()) -> None:
        self.corpus, self.spec = corpus, spec
        self.windows = [WindowKey(*w) for w in windows]
        for w in self.windows:
            self._check(w)

    def __len__(self) -> int:
        return len(self.windows)

    @property
    def levels(self) -> list[int]:
        return [w.level for w in self.windows]

    def _check(self, w: WindowKey) -> int:
        length = self.spec.window_tokens(w.level, w.wide)
        doc_len = int(self.corpus.doc_lengths[w.doc])
        if not (0 <= w.offset and w.offset + length <= doc_len):
            raise IndexError(f"window {w} of {length} tokens does not fit document {w.doc} "
                             f"({doc_len} tokens)")
        return length

    def __getitem__(self, key: int | WindowKey) -> dict:
        w = key if isinstance(key, WindowKey) else self.windows[key]
        length = self._check(w)
        ids = self.corpus.doc(w.doc)[w.offset:w.offset + length]
        return {"ids": torch.from_numpy(ids.astype(np.int64)),  # [L]
                "level": w.level, "num_spans": self.spec.num_spans(w.level, w.wide),
                "context_tokens": self.spec.context_tokens(w.level, w.wide),
                "tail": self.spec.tail_tokens, "horizon": self.spec.horizon,
                "doc": w.doc, "offset": w.offset}


def collate_windows(items: list[dict]) -> dict:
    """Stack items of one level into a batch: ``ids`` ``[b, L]`` int64, ``doc`` and ``offset``
    ``[b]`` int64; ``level``, ``num_spans``, ``context_tokens``, ``tail``, ``horizon`` stay
    plain ints (shared by the whole batch).

    Raises:
        ValueError: the items differ in level or layout.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    shared = ("level", "num_spans", "context_tokens", "tail", "horizon")
    layouts = {tuple(item[k] for k in shared) for item in items}
    if len(layouts) > 1:
        raise ValueError(f"a batch mixes window layouts {sorted(layouts)} "
                         f"({', '.join(shared)}); batches must have one level")
    return {"ids": torch.stack([item["ids"] for item in items]),  # [b, L]
            **{k: items[0][k] for k in shared},
            "doc": torch.tensor([item["doc"] for item in items], dtype=torch.int64),
            "offset": torch.tensor([item["offset"] for item in items], dtype=torch.int64)}


def fitting_docs(doc_lengths: np.ndarray, docs: Sequence[int], length: int) -> np.ndarray:
    """The documents of ``docs`` holding at least one ``length``-token window."""
    docs = np.asarray(docs, dtype=np.int64)
    return docs[np.asarray(doc_lengths)[docs] >= length]


def evenly_spaced_windows(doc_lengths: np.ndarray, docs: Sequence[int], spec: WindowSpec,
                          max_windows: int) -> list[WindowKey]:
    """A deterministic validation set: non-overlapping windows, evenly spaced over ``docs``.

    Per level, the candidates are the windows at offsets ``0, L, 2L, …`` of every document
    (in index order); ``n`` of them are taken at evenly spaced ranks, so long documents give
    proportionally more windows. Level 2 gets ``round(max_windows · l2_share)`` windows (at
    least one when ``0 < l2_share < 1``), level 1 the rest. Level-1 windows come first.
    """
    if max_windows < 1:
        raise ValueError(f"max_windows={max_windows} must be >= 1")
    quota = {1: max_windows}
    if spec.levels == (2,):
        quota = {2: max_windows}
    elif spec.levels == (1, 2):
        n2 = min(max(round(max_windows * spec.l2_share), 1), max_windows - 1)
        quota = {1: max_windows - n2, 2: n2} if max_windows > 1 else {1: 1}
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    windows = []
    for level, n in quota.items():
        length = spec.window_tokens(level)
        pool = np.asarray(docs, dtype=np.int64)
        per_doc = lengths[pool] // length  # non-overlapping windows per document
        starts = np.concatenate([[0], np.cumsum(per_doc)])
        total = int(starts[-1])
        if total == 0 or n == 0:
            continue
        n = min(n, total)
        ranks = ((np.arange(n) + 0.5) * total / n).astype(np.int64)  # evenly spaced in [0, total)
        which = np.searchsorted(starts, ranks, side="right") - 1
        windows.extend(WindowKey(int(pool[j]), int((r - starts[j]) * length), level)
                       for r, j in zip(ranks, which, strict=True))
    return windows


class WindowSampler(Sampler[WindowKey]):
    """Random training windows, ``batch_size`` at a time, one level per batch.

    For each batch the level is 2 with probability ``l2_share``; a level-1 batch is wide with
    probability ``wide_share`` (that draw is made only when ``wide_share > 0``, so a spec without
    wide windows gives the batches it always gave); then each window picks a
    document with probability proportional to its number of valid start offsets
    (``len − L + 1``: every window position of the split is equally likely, so long documents
    are preferred) and a uniform offset. The stream is endless and indexed: global batch ``i``
    is a function of ``(seed, rank, i)`` only; each iteration (an "epoch" of ``num_batches``)
    continues where the last one stopped, and a resumed run sets ``next_batch`` to the number
    of batches already trained on, so it sees exactly the batches an uninterrupted run would.
    :meth:`set_epoch` only records the epoch (Lightning calls it). Wrap it in
    ``BatchSampler(sampler, batch_size, drop_last=True)`` with the same ``batch_size``.

    Args:
        doc_lengths: tokens per corpus document.
        docs: the documents to draw from (the training split).
        num_batches: batches per epoch.
        rank: distributed rank (each rank draws its own stream).
    """

    def __init__(self, doc_lengths: np.ndarray, docs: Sequence[int], spec: WindowSpec, *,
                 batch_size: int, num_batches: int, seed: int = 0, rank: int = 0) -> None:
        if batch_size < 1 or num_batches < 1:
            raise ValueError(f"batch_size={batch_size} and num_batches={num_batches} must be "
                             f">= 1")
        self.spec, self.batch_size, self.num_batches = spec, batch_size, num_batches
        self.seed, self.rank, self.epoch = seed, rank, 0
        self.next_batch = 0  # global index of the next batch drawn
        lengths = np.asarray(doc_lengths, dtype=np.int64)
        self.pools: dict[tuple[int, bool], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for level, wide in spec.shapes:
            length = spec.window_tokens(level, wide)
            pool = fitting_docs(lengths, docs, length)
            if pool.size == 0:
                longest = int(lengths[np.asarray(docs, dtype=np.int64)].max(initial=0))
                raise ValueError(f"no document fits a {'wide ' if wide else ''}level-{level} "
                                 f"window of {length} tokens (the longest of the {len(docs)} "
                                 f"given has {longest})")
            positions = lengths[pool] - length + 1  # valid start offsets per document
            self.pools[level, wide] = (pool, positions, positions / positions.sum())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self) -> Iterator[WindowKey]:
        start = self.next_batch
        for batch in range(start, start + self.num_batches):
            self.next_batch = batch + 1
            rng = np.random.default_rng([self.seed, self.rank, batch])
            level = 2 if rng.random() < self.spec.l2_share else 1
            wide = bool(level == 1 and self.spec.wide_share > 0
                        and rng.random() < self.spec.wide_share)
            pool, positions, p = self.pools[level, wide]
            j = rng.choice(pool.size, size=self.batch_size, p=p)
            offsets = rng.integers(0, positions[j])
            for k, o in zip(j, offsets, strict=True):
                yield WindowKey(int(pool[k]), int(o), level, wide)


class LevelBatchSampler(Sampler[list[int]]):
    """Consecutive indices in batches of ``batch_size`` that never cross a change of level
    (the last batch of each level may be smaller). For fixed lists such as validation."""

    def __init__(self, levels: Sequence[int], batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.batches: list[list[int]] = []
        run: list[int] = []
        for i, level in enumerate(levels):
            if run and (levels[run[0]] != level or len(run) == batch_size):
                self.batches.append(run)
                run = []
            run.append(i)
        if run:
            self.batches.append(run)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter([list(b) for b in self.batches])
