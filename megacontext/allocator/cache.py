"""The allocator's gist cache: the gists of recently scored nodes, reused across refocuses.

Axes: ``n`` nodes asked for, ``c`` hidden size.

Committed gists never change, so a refocus needs from the tree only the nodes that are new to
the working context; everything else is served from a fixed ``[rows, c]`` float32 matrix
(``FocusAllocator(gist_cache=rows)``). Reads that do reach the tree are batched into one
``tree.gists`` call per run of nearby nodes (:func:`read_runs`).
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from megacontext.allocator.refocus import RefocusStats


def tree_ref(tree: Any):
    """A weak reference to ``tree`` (a callable returning it), or a strong one for an object
    that cannot be weakly referenced: what binds a cache to one tree object."""
    try:
        return weakref.ref(tree)
    except TypeError:
        return lambda: tree


def read_runs(tree: Any, level: int, uniq: np.ndarray, span: int,
              stats: RefocusStats) -> np.ndarray:
    """Gists ``[n, c]`` float32 of the sorted unique nodes ``uniq``, one tree read per run of
    nearby nodes: a read's fixed cost (checks, slicing, a dtype conversion) outweighs up to
    ``span`` rows read and dropped across a gap."""
    cut = np.flatnonzero(np.diff(uniq) > span) + 1
    out = []
    for a, b in zip([0, *cut.tolist()], [*cut.tolist(), uniq.size], strict=True):
        lo, hi = int(uniq[a]), int(uniq[b - 1]) + 1
        g = tree.gists(level, lo, hi)  # [hi − lo, c]
        g = np.asarray(g.numpy() if hasattr(g, "numpy") else g, dtype=np.float32)
        out.append(g[uniq[a:b] - lo])
        stats.nodes_read += hi - lo
    return np.concatenate(out)  # [n, c]


class GistCache:
    """Gists of recently scored nodes, so a refocus reads from the tree only the nodes that
    are new to the working context (committed gists never change).

    A fixed ``[rows, c]`` float32 matrix, per level a sorted array of cached node indices with
    their rows (vectorized lookups), and each row's last use; a miss takes the least recently
    used rows that the current refocus has not touched. Bound to one tree object (another
    clears it).
    """

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self._tree: Any = None
        self._clear()

    def _clear(self) -> None:
        self.mat = np.empty((self.rows, 0), dtype=np.float32)  # [rows, c]; c on first read
        self.keys: dict[int, np.ndarray] = {}  # level -> sorted node indices
        self.slots: dict[int, np.ndarray] = {}  # level -> their rows
        self.owner = np.full((self.rows, 2), -1, dtype=np.int64)  # [rows, (level, index)]
        self.used = np.full(self.rows, -1, dtype=np.int64)  # [rows] tick of last use
        self.tick = 0

    def begin(self, tree: Any) -> None:
        """Start a refocus on ``tree``: rows used from here on are not evicted until next."""
        if self._tree is None or self._tree() is not tree:
            self._tree = tree_ref(tree)
            self._clear()
        self.tick += 1

    def _lookup(self, level: int, uniq: np.ndarray) -> np.ndarray:
        keys = self.keys.get(level)
        if keys is None or keys.size == 0:
            return np.full(uniq.size, -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(keys, uniq), keys.size - 1)  # [u]
        return np.where(keys[pos] == uniq, self.slots[level][pos], -1)

    def _store(self, level: int, idx: np.ndarray, rows: np.ndarray) -> None:
        """Cache nodes ``idx`` of ``level`` in ``rows``, evicting whatever held them."""
        old = self.owner[rows]
        for k in np.unique(old[old[:, 0] >= 0, 0]).tolist():
            keep = ~np.isin(self.keys[k], old[old[:, 0] == k, 1])
            self.keys[k], self.slots[k] = self.keys[k][keep], self.slots[k][keep]
        keys = np.concatenate([self.keys.get(level, np.zeros(0, np.int64)), idx])
        slots = np.concatenate([self.slots.get(level, np.zeros(0, np.int64)), rows])
        order = np.argsort(keys, kind="stable")
        self.keys[level], self.slots[level] = keys[order], slots[order]
        self.owner[rows, 0], self.owner[rows, 1] = level, idx

    def get(self, tree: Any, level: int, indices: np.ndarray, span: int,
            stats: RefocusStats) -> np.ndarray:
        """Gists ``[n, c]`` float32 of nodes ``indices`` of ``level``, cached or read."""
        uniq, inv = np.unique(indices, return_inverse=True)
        if self.rows == 0:
            return read_runs(tree, level, uniq, span, stats)[inv]
        slots = self._lookup(level, uniq)  # [u]
        miss = slots < 0
        stats.cache_hits += int(uniq.size - miss.sum())
        self.used[slots[~miss]] = self.tick
        if not miss.any():
            return self.mat[slots[inv]]  # [n, c]
        fresh = read_runs(tree, level, uniq[miss], span, stats)  # [m, c]
        if self.mat.shape[1] != fresh.shape[1]:  # first read: now the width is known
            assert not self.keys, "gist width changed under a non-empty cache"
            self.mat = np.empty((self.rows, fresh.shape[1]), dtype=np.float32)
        # Reuse the least recently used rows, never one this refocus already relies on.
        free = np.flatnonzero(self.used < self.tick)
        take = free[np.argsort(self.used[free], kind="stable")[:fresh.shape[0]]]
        placed = np.flatnonzero(miss)[:take.size]
        self._store(level, uniq[placed], take)
        self.mat[take] = fresh[:take.size]
        self.used[take] = self.tick
        slots[placed] = take
        if take.size == fresh.shape[0]:
            return self.mat[slots[inv]]  # [n, c]
        out = np.empty((uniq.size, fresh.shape[1]), dtype=np.float32)  # overflow: uncached
        out[~miss] = self.mat[slots[~miss]]
        out[miss] = fresh
        return out[inv]


class ScoreMemo:
    """Scores kept across refocuses for a scorer whose score of a node depends on the node and
    the query alone (``static_scores = True``: ``similarity``; not ``recency`` or ``lens``,
    which read the cursor), so a refocus scores only the nodes it has not scored before.
    Bound to one tree object and one query (another clears it); cleared past ``limit`` nodes.
    """

    def __init__(self, limit: int = 1 << 20) -> None:
        self.limit = limit
        self._tree: Any = None
        self._query: bytes | None = None
        self._clear()

    def _clear(self) -> None:
        self.keys: dict[int, np.ndarray] = {}  # level -> sorted node indices
        self.vals: dict[int, np.ndarray] = {}  # level -> their scores
        self.size = 0

    def begin(self, tree: Any, query: np.ndarray | None) -> None:
        key = None if query is None else np.ascontiguousarray(query).tobytes()
        if self._tree is None or self._tree() is not tree or key != self._query:
            self._tree, self._query = tree_ref(tree), key
            self._clear()

    def scores(self, level: int, indices: np.ndarray, compute) -> np.ndarray:
        """Scores ``[n]`` of nodes ``indices`` of ``level``: remembered, or ``compute(new)``
        for the sorted unique ones not seen yet (then remembered)."""
        if indices.size > 1 and (indices[1:] > indices[:-1]).all():
            uniq, inv = indices, None  # sorted and unique already: no np.unique
        else:
            uniq, inv = np.unique(indices, return_inverse=True)
        keys = self.keys.get(level, np.zeros(0, np.int64))
        vals = self.vals.get(level, np.zeros(0, np.float64))
        out = np.empty(uniq.size, dtype=np.float64)
        if keys.size:
            pos = np.minimum(np.searchsorted(keys, uniq), keys.size - 1)
            hit = keys[pos] == uniq
            if hit.all():  # the usual refocus: every node scored before
                return vals[pos] if inv is None else vals[pos][inv]
            out[hit] = vals[pos[hit]]
        else:
            hit = np.zeros(uniq.size, dtype=bool)
        if not hit.all():
            new = uniq[~hit]
            fresh = np.asarray(compute(new), dtype=np.float64)
            out[~hit] = fresh
            if self.size + new.size > self.limit:
                self._clear()
                keys, vals = np.zeros(0, np.int64), np.zeros(0, np.float64)
            at = np.searchsorted(keys, new)  # both sorted: a merge, not a sort
            self.keys[level], self.vals[level] = np.insert(keys, at, new), np.insert(vals, at,
                                                                                  fresh)
            self.size += new.size
        return out if inv is None else out[inv]
