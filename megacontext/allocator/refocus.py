"""The refocus engine: one ``FocusAllocator.assemble`` after the cover, as moves on a cut.

Axes: ``w`` entries of the cut, ``s`` span (32).

:class:`Refocus` holds the cut as a dict ``(level, index) → born``, a max-heap of expandable
entries by score (fed on demand from a reserve of numpy arrays) and two min-heaps of complete
sibling groups by their parent's score (free and frozen by the cooldown). It does the forced
collapses that fit the budget and the refinement (best-first expansions, then
collapse-to-expand swaps with a margin), and is the
:class:`~megacontext.allocator.scorers.ScoreContext` its scorer sees. :class:`RefocusStats`
counts the work. docs/allocator.md has the long form.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import numpy as np

from megacontext.allocator.cover import entry_arrays
from megacontext.spans import node_size, node_sizes
from megacontext.working_context import WorkingContext


@dataclass
class RefocusStats:
    """What one ``assemble`` did (``FocusAllocator.last_stats``).

    Attributes:
        entries: entries in the result.
        minimum: entries of the coarsest legal cover (the least any budget must hold).
        nodes_scored: nodes passed to the scorer.
        nodes_read: gists read from the tree (by the scorer).
        expansions, collapses: operations of either kind, forced or not.
        forced: collapses needed to fit the budget after the cursor moved (not limited).
        swaps: discretionary changes (expansions and collapses), at most ``max_swaps`` when
            ``previous`` was given (from scratch: the best-first expansions and swaps).
        rebuilt: ``previous`` was given but the cursor jumped more than a budget ahead, so
            the context was assembled from scratch (no ``max_swaps`` limit applied).
        cache_hits: gists served by the allocator's cache instead of the tree.
        seconds: wall time of the refocus.
    """

    entries: int = 0
    minimum: int = 0
    nodes_scored: int = 0
    nodes_read: int = 0
    expansions: int = 0
    collapses: int = 0
    forced: int = 0
    swaps: int = 0
    rebuilt: bool = False
    cache_hits: int = 0
    seconds: float = 0.0


def _runs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(x, return_inverse=True, return_counts=True)``, without its sort when ``x``
    is already non-decreasing (a cut's entries of one level come in position order)."""
    if x.size < 2 or not (x[1:] >= x[:-1]).all():
        return np.unique(x, return_inverse=True, return_counts=True)
    starts = np.flatnonzero(np.concatenate(([True], x[1:] != x[:-1])))
    counts = np.diff(np.append(starts, x.size))
    return x[starts], np.repeat(np.arange(starts.size), counts), counts


RESERVE_CHUNK = 64  # expansion candidates moved from the reserve into the heap at once


def _sorted(parts: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """The concatenated ``(key, level, index)`` arrays of ``parts`` in ascending tuple order
    (ties broken by level, then index, as tuples compare)."""
    if not parts:
        return tuple(np.zeros(0, dtype=t) for t in (np.float64, np.int64, np.int64))
    key, level, index = (np.concatenate(c) for c in zip(*parts, strict=True))
    order = np.lexsort((index, level, key))
    return key[order], level[order], index[order]


def _tuples(arrays: tuple[np.ndarray, ...]) -> list[tuple]:
    """Sorted ``(key, level, index)`` arrays as a list of tuples: a valid heap."""
    return list(zip(*(x.tolist() for x in arrays), strict=True))


class Refocus:
    """One refocus: the cut as a dict ``(level, index) → born``, two lazy heaps, the scorer.

    Also the ``ScoreContext`` the scorer sees. ``alloc`` is the ``FocusAllocator`` (its
    settings, ``_scorer`` and ``_cache``; not imported here, which would be a cycle).
    """

    def __init__(self, alloc: Any, tree: Any, counts: list[int], s: int,
                 cursor: int, edge: int, query: np.ndarray | None,
                 entries: tuple[np.ndarray, np.ndarray], step: int, stats: RefocusStats,
                 incremental: bool, query_tokens: np.ndarray | None = None,
                 query_ids: np.ndarray | None = None) -> None:
        self.alloc, self.tree, self.counts, self.span = alloc, tree, counts, s
        self.cursor, self.edge, self.query = cursor, edge, query
        self.query_tokens, self.query_ids = query_tokens, query_ids
        keys, born = entries  # [w, 2], [w]
        self.entries = dict(zip(zip(keys[:, 0].tolist(), keys[:, 1].tolist(), strict=True),
                                born.tolist(), strict=True))
        assert len(self.entries) == len(keys), "duplicate entries in the cut"
        self.step, self.stats = step, stats
        self.top = len(counts) - 1
        self.budget = alloc.budget
        # Frozen: made by a change in one of the last `cooldown` refocuses.
        self.frozen_from = step - alloc.cooldown if incremental else step
        self.expand_heap: list[tuple[float, int, int]] = []  # (−score, level, index)
        self.collapse_free: list[tuple[float, int, int]] = []  # (score, parent level, index)
        self.collapse_frozen: list[tuple[float, int, int]] = []
        self._build_heaps(keys, born)

    # -- ScoreContext ---------------------------------------------------------------------

    def read_gists(self, level: int, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size == 0:
            return np.zeros((0, self.query.shape[0] if self.query is not None else 0), np.float32)
        return self.alloc._cache.get(self.tree, level, indices, self.span, self.stats)

    def pair(self, level: int, index: int) -> tuple[WorkingContext, WorkingContext]:
        s = self.span
        children = {(level - 1, index * s + t) for t in range(s)}
        if (level, index) in self.entries:
            before = dict(self.entries)
            after = {k: v for k, v in before.items() if k != (level, index)}
            after.update((c, self.step) for c in children)
        else:
            after = dict(self.entries)
            before = {k: v for k, v in after.items() if k not in children}
            before[(level, index)] = self.step
        return self._to_wc(before), self._to_wc(after)

    # -- scoring --------------------------------------------------------------------------

    def _score(self, level: int, indices: np.ndarray) -> np.ndarray:
        if indices.size == 0:
            return np.zeros(0)
        if getattr(self.alloc._scorer, "static_scores", False):  # node + query alone
            return self.alloc._memo.scores(level, indices, lambda new: self._fresh(level, new))
        return self._fresh(level, indices)

    def _fresh(self, level: int, indices: np.ndarray) -> np.ndarray:
        sc = np.asarray(self.alloc._scorer.score(self, level, indices), dtype=np.float64)
        if sc.shape != indices.shape or not np.isfinite(sc).all():
            raise ValueError(f"scorer {self.alloc.scorer!r} returned {sc.shape} scores with "
                             f"non-finite values for {indices.shape[0]} level-{level} nodes "
                             "(expected finite [n])")
        self.stats.nodes_scored += int(indices.size)
        return sc

    def _frozen(self, born: int) -> bool:
        return self.frozen_from <= born < self.step

    def _legal_parent(self, k: int, j: int) -> bool:
        """Node (k, j) may be an entry: it exists and ends before the raw tail."""
        return (k <= self.top and j < self.counts[k]
                and (j + 1) * node_size(k, self.span) <= self.edge)

    def _build_heaps(self, keys: np.ndarray, born: np.ndarray) -> None:
        """The three heaps of the cut ``keys [w, 2]`` (level, index) with ``born [w]``.

        Per level k >= 1 the scorer scores both kinds of level-k node: its unfrozen entries
        (expansion candidates) and the parents of complete legal groups of level-(k−1)
        entries (collapse candidates). Each heap starts as a
        sorted list — a valid heap — from one numpy sort; of the expansion candidates only
        the best ``RESERVE_CHUNK`` are selected (a partition) and sorted, the rest on demand
        (``_refill``, from ``_peek_expand``).
        """
        s = self.span
        frozen = (born >= self.frozen_from) & (born < self.step)  # [w]
        self.n = len(self.entries)
        expand: list[tuple[np.ndarray, ...]] = []  # (−score, level, index) per level
        free: list[tuple[np.ndarray, ...]] = []  # (score, level, index) per level
        held: list[tuple[np.ndarray, ...]] = []
        level_of = keys[:, 0]
        below = level_of == 0
        for k in range(1, self.top + 1):
            sel = level_of == k
            entries = keys[sel, 1][~frozen[sel]]
            sc = self._score(k, entries)
            expand.append((-sc, np.full(sc.size, k, dtype=np.int64), entries))
            idx = keys[below, 1]
            if idx.size >= s:  # complete groups of level-(k−1) entries: collapse candidates
                parents, inv, cnt = _runs(idx // s)
                pfrozen = np.bincount(inv, weights=frozen[below], minlength=parents.size) > 0
                legal = ((cnt == s) & (parents < self.counts[k])
                         & ((parents + 1) * node_size(k, s) <= self.edge))
                parents, pfrozen = parents[legal], pfrozen[legal]
                sc = self._score(k, parents)
                level = np.full(sc.size, k, dtype=np.int64)
                for out, m in ((free, ~pfrozen), (held, pfrozen)):
                    out.append((sc[m], level[m], parents[m]))
            below = sel
        # Expansion candidates: all of the cut's gists, but a refocus reads only its best few;
        # the rest wait, unsorted, in a reserve that _peek_expand draws from as needed.
        self.reserve = tuple(np.concatenate(c) for c in zip(*expand, strict=True)) if expand \
            else (np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64))
        self.reserve_head: tuple[float, int, int] | None = None
        self.expand_heap = []
        self._refill()
        self.collapse_free = _tuples(_sorted(free))
        self.collapse_frozen = _tuples(_sorted(held))

    # -- operations -----------------------------------------------------------------------

    def _group_ok(self, k: int, j: int, allow_frozen: bool) -> bool:
        """Node (k, j) is not an entry and all s children are (and, unless allowed, none is
        frozen)."""
        if (k, j) in self.entries:
            return False
        base = j * self.span
        for t in range(self.span):
            born = self.entries.get((k - 1, base + t))
            if born is None or (not allow_frozen and self._frozen(born)):
                return False
        return True

    def _expand(self, score: float, k: int, i: int) -> None:
        s, step = self.span, self.step
        del self.entries[(k, i)]
        children = np.arange(i * s, (i + 1) * s, dtype=np.int64)
        self.entries.update(((k - 1, c), step) for c in children.tolist())
        self.n += s - 1
        if k - 1 >= 1:
            sc = self._score(k - 1, children)
            for c, v in zip(children.tolist(), sc.tolist(), strict=True):
                heapq.heappush(self.expand_heap, (-v, k - 1, c))
        heapq.heappush(self.collapse_free, (score, k, i))
        self.stats.expansions += 1

    def _collapse(self, score: float, k: int, j: int) -> None:
        s = self.span
        for t in range(s):
            del self.entries[(k - 1, j * s + t)]
        self.entries[(k, j)] = self.step
        self.n -= s - 1
        heapq.heappush(self.expand_heap, (-score, k, j))
        gp = j // s  # the parent may complete its own parent's group
        if self._legal_parent(k + 1, gp) and self._group_ok(k + 1, gp, allow_frozen=True):
            v = float(self._score(k + 1, np.array([gp], dtype=np.int64))[0])
            free = self._group_ok(k + 1, gp, allow_frozen=False)
            heapq.heappush(self.collapse_free if free else self.collapse_frozen, (v, k + 1, gp))
        self.stats.collapses += 1

    def _pop_group(self, heap: list, allow_frozen: bool, exclude: tuple[int, int] | None = None):
        """Pop the least valid group of ``heap`` other than ``exclude``; None when none."""
        held, found = [], None
        while heap:
            item = heapq.heappop(heap)
            if not self._group_ok(item[1], item[2], allow_frozen):
                continue  # stale: a child changed, or the parent is an entry already
            if (item[1], item[2]) == exclude:
                held.append(item)
                continue
            found = item
            break
        for item in held:
            heapq.heappush(heap, item)
        return found

    def _refill(self) -> None:
        """Move the reserve's best ``RESERVE_CHUNK`` candidates (and any tied with the last)
        into the expansion heap; ``reserve_head`` becomes the best one left (or None)."""
        key, level, index = self.reserve
        if key.size == 0:
            self.reserve_head = None
            return
        if key.size > RESERVE_CHUNK:
            take = key <= np.partition(key, RESERVE_CHUNK - 1)[RESERVE_CHUNK - 1]
        else:
            take = np.ones(key.size, dtype=bool)
        best = _tuples(_sorted([(key[take], level[take], index[take])]))
        if self.expand_heap:
            for item in best:
                heapq.heappush(self.expand_heap, item)
        else:
            self.expand_heap.extend(best)  # sorted: a heap as it is
        rest = ~take
        key, level, index = self.reserve = key[rest], level[rest], index[rest]
        self.reserve_head = None
        if key.size:
            tied = np.flatnonzero(key == key.min())
            j = tied[np.lexsort((index[tied], level[tied]))[0]] if tied.size > 1 else tied[0]
            self.reserve_head = (float(key[j]), int(level[j]), int(index[j]))

    def _peek_expand(self):
        h = self.expand_heap
        while True:
            while h and (h[0][1], h[0][2]) not in self.entries:
                heapq.heappop(h)  # stale: already expanded or collapsed away
            if self.reserve_head is not None and (not h or self.reserve_head < h[0]):
                self._refill()  # the reserve holds the best candidate: its next chunk
                continue
            return h[0] if h else None

    def forced_collapses(self) -> None:
        """Collapse the least useful groups until the budget holds (prefer unfrozen ones)."""
        while self.n > self.budget:
            g = self._pop_group(self.collapse_free, allow_frozen=False)
            if g is None:
                g = self._pop_group(self.collapse_frozen, allow_frozen=True)
            # A legal cut above the (checked) minimum always has a complete group.
            assert g is not None, f"over budget ({self.n} > {self.budget}) with no group"
            self._collapse(*g)
            self.stats.forced += 1

    def refine(self, limit: int) -> None:
        """Best-first expansions into free room, then collapse-to-expand swaps with a margin."""
        alloc, s = self.alloc, self.span
        changes = 0
        while changes < limit:
            top = self._peek_expand()
            if top is None or -top[0] <= alloc.expand_threshold:
                break
            score, k, i = -top[0], top[1], top[2]
            if self.n + s - 1 <= self.budget:
                heapq.heappop(self.expand_heap)
                self._expand(score, k, i)
                changes += 1
                continue
            if changes + 2 > limit:
                break
            g = self._pop_group(self.collapse_free, allow_frozen=False, exclude=(k + 1, i // s))
            if g is None:
                break
            if not score > g[0] + alloc.collapse_threshold:
                heapq.heappush(self.collapse_free, g)
                break
            heapq.heappop(self.expand_heap)
            self._collapse(*g)
            self._expand(score, k, i)
            changes += 2
        self.stats.swaps = changes

    # -- result ---------------------------------------------------------------------------

    def _to_wc(self, entries: dict[tuple[int, int], int]) -> WorkingContext:
        keys, born = entry_arrays(entries)  # [w, 2], [w]
        lv = keys[:, 0]
        starts = keys[:, 1] * node_sizes(lv, self.span)
        order = np.argsort(starts, kind="stable")
        return WorkingContext.from_entries(lv[order], keys[order, 1], self.cursor,
                                           span=self.span, born=born[order], step=self.step)

    def working_context(self) -> WorkingContext:
        wc = self._to_wc(self.entries)
        assert len(wc) == self.n <= self.budget, (len(wc), self.n, self.budget)
        return wc
