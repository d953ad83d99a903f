"""The ``lexical`` scorer: a node is worth expanding when it holds the query's rare words.

Axes: ``n`` complete level-1 spans of the memory, ``q`` distinct query tokens, ``s`` span.

Training-free retrieval by the words themselves (BM25's inverse document frequency, with the
level-1 span as the document): the query's distinct token ids are looked up in every span
once (``presence [n, q]``, kept across refocuses and extended as the memory grows), a level-k
node holds a token when one of its spans does, and its score is the evidence it holds beyond
what a node of its size holds by chance,

    score = Σ_t idf_t · (present_t − P(a node of this size holds t)) + recency's score,

with ``idf_t = log(1 + (n − df_t + 0.5) / (df_t + 0.5))`` and the chance
``1 − (1 − df_t / n)^(spans of the node)``. Common words cancel at every level (a coarse node
holds them all and is expected to), so the chain of nodes above the span that holds the rare
words of the query outscores its siblings at each level of the descent; where no node holds
any, recency's ``size / distance`` orders them (a fovea, as ``recency``).

Two ways to know which nodes hold which query tokens, giving the same scores (the tests
compare them exactly):

- **the token index** (``megacontext index TREE_DIR``, extended by each later ingest;
  ``tree.lexicon()``, :mod:`megacontext.tree.lexicon`), when the tree has one: ``df_t`` from
  its offsets, and "node (k, i) holds t" by a binary search of t's postings for the node's
  span range, vectorised over the nodes scored. Work per refocus: O(nodes scored · q ·
  log(memory)), bounded by the budget and the query; spans committed past the index (an
  ingest killed before extending it, ``--no-index``, MemoryLM's appends) are scanned (only
  those).
- **the scan**, otherwise (or ``use_index=False``): the query's tokens are compared with every
  token of the memory once per query (``presence [n, q]``, kept and extended as the memory
  grows). O(memory) on the first refocus: milliseconds at 10^6 tokens, not for the
  billion-token tree.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from megacontext.spans import centers, node_size

CHUNK_SPANS = 1 << 15  # level-1 spans compared with the query at a time (1M tokens)
MEMO_NODES = 1 << 16  # node presences remembered per level (index path) before starting over


class LexicalScorer:
    """Scores nodes by the query's rare tokens they hold (module docstring); needs the query's
    token ids (``assemble(query=Query(ids=...))``).

    Args:
        recency_weight: the weight of recency's ``size / distance`` added to every score (0:
            none; nodes holding no query token are then all tied).
        use_index: read the tree's token index when it has one (``tree.lexicon()``); False
            scans the memory's tokens always (the reference the index is tested against). A
            torn, stale or foreign index is refused (``ValueError`` naming it), not scanned
            past: a billion-token scan is no silent fallback.
    """

    needs_query = True
    needs_query_ids = True

    def __init__(self, recency_weight: float = 1.0, use_index: bool = True) -> None:
        if not isinstance(recency_weight, int | float) or isinstance(recency_weight, bool) \
                or not np.isfinite(recency_weight) or recency_weight < 0:
            raise ValueError(f"recency_weight={recency_weight!r} (expected a finite number >= 0)")
        if not isinstance(use_index, bool):
            raise ValueError(f"use_index={use_index!r} (expected True or False)")
        self.recency_weight, self.use_index = float(recency_weight), use_index
        self._tree: Any = None
        self._ids = np.zeros(0, np.int64)
        self._lex: Any = None  # the tree's index (opened once per tree and query), or None
        self._spans = np.zeros((0, 0), dtype=bool)  # scan: [n, q] presence per level-1 span
        self._levels: dict[int, np.ndarray] = {}  # scan: level -> [count, q] presence, k >= 2
        self._tail = np.zeros((0, 0), dtype=bool)  # index: presence of spans past its cover
        self._tail_sum = np.zeros((1, 0), dtype=np.int64)  # [tail + 1, q] prefix sums of it
        self._df: tuple[int, np.ndarray] = (-1, np.zeros(0))  # (n, df [q]) of the last cursor
        # index: level -> (node indices [c] ascending, their presence [c, q]); a complete node's
        # tokens never change, so a steady refocus looks most of its nodes up here
        self._memo: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._seen: Any = None  # the last ctx.query_ids seen (the same object: the same ids)

    def _begin(self, ctx: Any) -> np.ndarray:
        """The query's distinct ids ``[q]``; a new tree or query starts over (and opens the
        tree's index)."""
        tree = self._tree() if self._tree is not None else None
        if ctx.query_ids is self._seen and tree is ctx.tree:
            return self._ids  # the same refocus (the allocator's ids are its own copy)
        self._seen = ctx.query_ids
        ids = np.unique(np.asarray(ctx.query_ids, dtype=np.int64))
        if tree is not ctx.tree or not np.array_equal(ids, self._ids):
            self._tree, self._ids = weakref.ref(ctx.tree), ids
            self._spans = np.zeros((0, ids.size), dtype=bool)
            self._levels = {}
            opener = getattr(ctx.tree, "lexicon", None)
            self._lex = opener() if self.use_index and callable(opener) else None
            self._tail = np.zeros((0, ids.size), dtype=bool)
            self._tail_sum = np.zeros((1, ids.size), dtype=np.int64)
            self._df = (-1, np.zeros(ids.size))
            self._memo = {}
        return ids

    @staticmethod
    def _scan(tree: Any, ids: np.ndarray, start: int, stop: int, s: int) -> np.ndarray:
        """``[stop − start, q]`` bool: the query tokens each span of ``[start, stop)`` holds,
        read from the tree's tokens ``CHUNK_SPANS`` spans at a time (``[chunk, s, q]``)."""
        parts = [np.zeros((0, ids.size), dtype=bool)]
        for a in range(start, stop, CHUNK_SPANS):
            b = min(a + CHUNK_SPANS, stop)
            tokens = np.asarray(tree.tokens(a * s, b * s)).reshape(b - a, s)
            parts.append((tokens[:, :, None] == ids[None, None, :]).any(axis=1))
        return np.concatenate(parts)

    def presence(self, ctx: Any) -> np.ndarray:
        """``[n, q]`` bool, the scan: which distinct query tokens each complete level-1 span
        before the cursor holds (read for the spans not seen before; a new tree or query
        starts over). Reads every token: the index path never calls it."""
        ids = self._begin(ctx)
        s, done = ctx.span, self._spans.shape[0]
        want = ctx.cursor // s
        if want > done:
            self._spans = np.concatenate([self._spans,
                                          self._scan(ctx.tree, ids, done, want, s)])
            self._levels = {}
        return self._spans[:want]

    def _level(self, level: int, s: int) -> np.ndarray:
        """``[count, q]`` presence of every complete level-``level`` node of the spans seen."""
        if level == 1:
            return self._spans
        if level not in self._levels:
            below = self._level(level - 1, s)
            whole = below.shape[0] // s
            self._levels[level] = below[:whole * s].reshape(whole, s, below.shape[1]).any(axis=1)
        return self._levels[level]

    def _indexed(self, ctx: Any, ids: np.ndarray, n: int, level: int, indices: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
        """``(presence [len(indices), q] of the level-``level`` nodes, df [q])`` from the
        index, and for spans ``[index.spans, n)`` from a scan of those only; presence
        remembered per node."""
        lex = self._lex
        cover = lex.spans
        if n > cover + self._tail.shape[0]:  # the tree grew past the index: scan the new spans
            start = cover + self._tail.shape[0]
            self._tail = np.concatenate([self._tail, self._scan(ctx.tree, ids, start, n,
                                                                ctx.span)])
            self._tail_sum = np.concatenate([np.zeros((1, ids.size), dtype=np.int64),
                                             np.cumsum(self._tail, axis=0, dtype=np.int64)])
        if self._df[0] != n:
            df = lex.document_frequency(ids, n)
            if n > cover:
                df = df + self._tail_sum[n - cover]
            self._df = (n, df)
        keys, rows = self._memo.get(level, (np.zeros(0, np.int64),
                                            np.zeros((0, ids.size), dtype=bool)))
        if keys.size:
            at = np.minimum(keys.searchsorted(indices), keys.size - 1)
            hit = keys[at] == indices
            if hit.all():
                return rows[at], self._df[1]
            new = indices[~hit]
        else:
            new = indices
        if new.size > 1 and not (new[1:] > new[:-1]).all():  # the allocator's are, mostly
            new = np.unique(new)
        per_node = node_size(level, ctx.span) // ctx.span
        lo, hi = new * per_node, (new + 1) * per_node  # their span ranges
        have = lex.holds(ids, lo, np.minimum(hi, cover))
        if n > cover:
            a = np.clip(lo, cover, n) - cover
            b = np.clip(hi, cover, n) - cover
            have |= self._tail_sum[b] > self._tail_sum[a]
        if keys.size + new.size > MEMO_NODES:
            keys, rows = keys[:0], rows[:0]  # start over: bounded memory
        keys, rows = np.concatenate([keys, new]), np.concatenate([rows, have])
        order = np.argsort(keys, kind="stable")
        keys, rows = keys[order], rows[order]
        self._memo[level] = (keys, rows)
        return rows[np.searchsorted(keys, indices)], self._df[1]

    def score(self, ctx: Any, level: int, indices: np.ndarray) -> np.ndarray:
        s = ctx.span
        ids = self._begin(ctx)
        n = ctx.cursor // s  # complete spans before the cursor: the documents
        per_node = node_size(level, s) // s  # level-1 spans in one node
        if indices.size and int(indices.max()) >= n // per_node:
            raise ValueError(f"lexical: level-{level} node {int(indices.max())} lies beyond the "
                             f"{n} complete spans before the cursor {ctx.cursor}")
        indices = np.asarray(indices, dtype=np.int64)
        if self._lex is not None:
            have, df = self._indexed(ctx, ids, n, level, indices)
        else:
            spans = self.presence(ctx)
            have = self._level(level, s)[indices]
            if self._df[0] != n:
                self._df = (n, spans.sum(axis=0))
            df = self._df[1]
        df = df.astype(np.float64)  # [q]
        idf = np.log1p((n - df + 0.5) / (df + 0.5))  # [q]
        chance = 1.0 - (1.0 - df / max(n, 1)) ** per_node  # [q]
        out = (have.astype(np.float64) - chance) @ idf  # [len(indices)]
        if self.recency_weight:
            out += self.recency_weight * node_size(level, s) / (
                ctx.cursor - centers(level, indices, s))
        return out


__all__ = ["LexicalScorer"]
