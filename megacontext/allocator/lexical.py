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

Cost: the first refocus for a query reads every token of the memory once (``tree.tokens``) —
O(memory), not bounded by the budget: fine for 10^6 tokens (a few milliseconds), not for the
billion-token tree, which would need a per-node token signature written at ingest.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from megacontext.spans import centers, node_size

CHUNK_SPANS = 1 << 15  # level-1 spans compared with the query at a time (1M tokens)


class LexicalScorer:
    """Scores nodes by the query's rare tokens they hold (module docstring); needs the query's
    token ids (``assemble(query=Query(ids=...))``).

    Args:
        recency_weight: the weight of recency's ``size / distance`` added to every score (0:
            none; nodes holding no query token are then all tied).
    """

    needs_query = True
    needs_query_ids = True

    def __init__(self, recency_weight: float = 1.0) -> None:
        if not isinstance(recency_weight, int | float) or isinstance(recency_weight, bool) \
                or not np.isfinite(recency_weight) or recency_weight < 0:
            raise ValueError(f"recency_weight={recency_weight!r} (expected a finite number >= 0)")
        self.recency_weight = float(recency_weight)
        self._tree: Any = None
        self._ids = np.zeros(0, np.int64)
        self._spans = np.zeros((0, 0), dtype=bool)  # [n, q] presence per level-1 span
        self._levels: dict[int, np.ndarray] = {}  # level -> [count, q] presence, k >= 2

    def presence(self, ctx: Any) -> np.ndarray:
        """``[n, q]`` bool: which distinct query tokens each complete level-1 span before the
        cursor holds (computed for the spans not seen before; a new tree or query starts over)."""
        ids = np.unique(np.asarray(ctx.query_ids, dtype=np.int64))
        tree = self._tree() if self._tree is not None else None
        if tree is not ctx.tree or not np.array_equal(ids, self._ids):
            self._tree, self._ids = weakref.ref(ctx.tree), ids
            self._spans = np.zeros((0, ids.size), dtype=bool)
            self._levels = {}
        s, done = ctx.span, self._spans.shape[0]
        want = ctx.cursor // s
        if want > done:
            parts = [self._spans]
            for a in range(done, want, CHUNK_SPANS):  # bounded memory: [chunk, s, q] at a time
                b = min(a + CHUNK_SPANS, want)
                tokens = np.asarray(ctx.tree.tokens(a * s, b * s)).reshape(b - a, s)
                parts.append((tokens[:, :, None] == ids[None, None, :]).any(axis=1))
            self._spans = np.concatenate(parts)
            self._levels = {}
        return self._spans

    def _level(self, level: int, s: int) -> np.ndarray:
        """``[count, q]`` presence of every complete level-``level`` node of the spans seen."""
        if level == 1:
            return self._spans
        if level not in self._levels:
            below = self._level(level - 1, s)
            whole = below.shape[0] // s
            self._levels[level] = below[:whole * s].reshape(whole, s, -1).any(axis=1)
        return self._levels[level]

    def score(self, ctx: Any, level: int, indices: np.ndarray) -> np.ndarray:
        s = ctx.span
        spans = self.presence(ctx)
        n = spans.shape[0]
        have = self._level(level, s)
        if indices.size and int(indices.max()) >= have.shape[0]:
            raise ValueError(f"lexical: level-{level} node {int(indices.max())} lies beyond the "
                             f"{n} complete spans before the cursor {ctx.cursor}")
        df = spans.sum(axis=0).astype(np.float64)  # [q]
        idf = np.log1p((n - df + 0.5) / (df + 0.5))  # [q]
        per_node = node_size(level, s) // s  # level-1 spans in one node
        chance = 1.0 - (1.0 - df / max(n, 1)) ** per_node  # [q]
        out = (have[indices].astype(np.float64) - chance) @ idf  # [len(indices)]
        if self.recency_weight:
            out += self.recency_weight * node_size(level, s) / (
                ctx.cursor - centers(level, indices, s))
        return out


__all__ = ["LexicalScorer"]
