"""The focus allocator: which tree nodes, at which level, fill the working-context budget.

Axes: ``w`` working-context entries, ``c`` hidden size, ``s`` span (32).

A refocus (``FocusAllocator.assemble``), in four steps (docs/allocator.md has the long form):

1. **Cover.** The coarsest legal cover of ``[0, cursor)``: the last ``tail_tokens`` tokens raw,
   the rest tiled greedily by the largest aligned nodes the tree holds (the base-``s`` digits
   of the covered length: at most ``s − 1`` entries per level plus the top level's nodes).
   If even that exceeds the budget, a ``ValueError`` says the minimum. With ``previous``, its
   entries are kept instead where still legal, and the tokens the cursor advanced over enter
   raw (a jump of more than a budget starts over). A cursor within the budget gets the exact
   context: every token raw.
2. **Forced collapses.** While over budget, collapse the least useful complete group of
   ``s`` sibling entries into their parent (frees ``s − 1`` slots).
3. **Refinement.** A max-heap of expandable entries (by score) and a min-heap of collapsible
   groups (by their parent's score): expand the best entry into its ``s`` children while the
   budget has room (``s − 1`` slots) and its score beats ``expand_threshold``; when full,
   collapse the least useful group to pay for it, only if the entry beats the group by more
   than ``collapse_threshold``. Entries changed in the last ``cooldown`` refocuses are left
   alone, and a refocus with ``previous`` makes at most ``max_swaps`` such changes.
4. The entries, sorted by token, become a ``WorkingContext``.

Work per refocus is O(w log w) plus ``s`` scores per change, whatever the tree's size:
only the current entries, their complete groups' parents and the children of expanded
nodes are ever scored or read (``FocusAllocator.last_stats`` counts them).
"""

from __future__ import annotations

import heapq
import itertools
import math
import numbers
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from megacontext.working_context import SPAN, WorkingContext, node_centers, tree_counts

# ----------------------------------------------------------------------------------------
# scorers


class ScoreContext(Protocol):
    """What a scorer may look at during one refocus (implemented by the allocator)."""

    tree: Any
    cursor: int
    span: int
    query: np.ndarray | None  # [c] float64, unit norm, or None

    def read_gists(self, level: int, indices: np.ndarray) -> np.ndarray:
        """Stored gists ``[n, c]`` float32 of nodes ``indices`` (counted as nodes read)."""

    def pair(self, level: int, index: int) -> tuple[WorkingContext, WorkingContext]:
        """The current context with node (level, index) collapsed, and with it expanded."""


class Scorer(Protocol):
    """Scores nodes by how useful it is to see them expanded (higher = expand first).

    A node's score is both the benefit of expanding it, while it is an entry, and the cost
    of collapsing its ``s`` children back into it, while they are.
    """

    needs_query: bool

    def score(self, ctx: ScoreContext, level: int, indices: np.ndarray) -> np.ndarray:
        """Scores ``[n]`` float64 of nodes ``indices`` (int64 ``[n]``) of ``level`` >= 1."""


SCORERS: dict[str, Callable[..., Scorer]] = {}


def register_scorer(name: str, *, replace: bool = False) -> Callable:
    """Class decorator: make a scorer constructible by name (``FocusAllocator(scorer=name)``).

    The factory is called with ``FocusAllocator.scorer_options`` as keyword arguments.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"scorer name must be a non-empty string, got {name!r}")

    def deco(factory: Callable[..., Scorer]) -> Callable[..., Scorer]:
        if name in SCORERS and SCORERS[name] is not factory and not replace:
            raise ValueError(f"a scorer named {name!r} is already registered "
                             f"({SCORERS[name]!r}); pass replace=True to override it")
        SCORERS[name] = factory
        return factory

    return deco


@register_scorer("recency")
class RecencyScorer:
    """Nearer the cursor is more useful: ``s^k / (cursor − center)``.

    The ratio of a node's size to its distance: expanding everything above a threshold τ
    leaves entries whose size grows in proportion to their distance (a log-polar "fovea").
    """

    needs_query = False

    def score(self, ctx: ScoreContext, level: int, indices: np.ndarray) -> np.ndarray:
        size = ctx.span**level
        centers = node_centers(np.full(indices.shape, level), indices * size, ctx.span)
        return size / (ctx.cursor - centers)


@register_scorer("similarity")
class SimilarityScorer:
    """Cosine of the query (a vector in embedding space) and the node's stored gist."""

    needs_query = True

    def score(self, ctx: ScoreContext, level: int, indices: np.ndarray) -> np.ndarray:
        g = ctx.read_gists(level, indices)  # [n, c]
        if g.shape[1] != ctx.query.shape[0]:
            raise ValueError(f"query has width {ctx.query.shape[0]}, the tree's gists have "
                             f"width {g.shape[1]}")
        q = ctx.query.astype(g.dtype)  # float32 math: a ranking needs no more
        norms = np.sqrt(np.einsum("nc,nc->n", g, g)).astype(np.float64)  # [n]
        return (g @ q).astype(np.float64) / np.maximum(norms, 1e-30)


@register_scorer("oracle")
class OracleScorer:
    """The real effect of expanding a node, measured by the base model. Slow: research only.

    ``judge.delta_nll(before, after)`` (two ``WorkingContext``s, the node collapsed and
    expanded, everything else equal) returns ``NLL(after) − NLL(before)`` on whatever
    continuation the judge holds; the score is its negation, the NLL the expansion saves.
    The runtime supplies the judge (it wraps the base model; this module must not).
    """

    needs_query = False

    def __init__(self, judge: Any) -> None:
        if not callable(getattr(judge, "delta_nll", None)):
            raise TypeError(f"the oracle scorer needs a judge with delta_nll(before, after), "
                            f"got {type(judge).__name__}")
        self.judge = judge

    def score(self, ctx: ScoreContext, level: int, indices: np.ndarray) -> np.ndarray:
        out = np.empty(indices.shape[0], dtype=np.float64)
        for n, i in enumerate(indices.tolist()):
            before, after = ctx.pair(level, i)
            out[n] = -float(self.judge.delta_nll(before, after))
        return out


# ----------------------------------------------------------------------------------------
# the allocator


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


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and not math.isnan(x)


@dataclass(eq=False)
class FocusAllocator:
    """Chooses the working context for a cursor: the most useful nodes within a budget.

    Attributes:
        budget: W, the most entries a working context may hold.
        tail_tokens: the most recent tokens, always raw (clipped to the cursor).
        scorer: a registered scorer name (``recency``, ``similarity``, ``oracle``) or an
            object with ``score(ctx, level, indices)`` and ``needs_query``.
        expand_threshold: expand only nodes scoring above this (−inf: fill the budget).
        collapse_threshold: a full budget collapses a group to expand an entry only when the
            entry's score beats the group's by more than this margin (hysteresis).
        cooldown: an entry made by an expansion or collapse in one of the last ``cooldown``
            refocuses is not expanded or collapsed again (forced collapses excepted, as a
            last resort).
        max_swaps: the most discretionary changes (expansions + collapses) per refocus when
            ``previous`` is given; collapses forced by the budget are not counted, and a
            cursor that jumped more than ``budget`` tokens ahead starts over instead.
        scorer_options: keyword arguments for a scorer given by name (``{"judge": ...}`` for
            ``oracle``).
        gist_cache: rows of the gist cache (None: 4 × budget; 0: off). The gists of the
            current entries are reused from one refocus to the next, so a refocus reads only
            the nodes new to the context from the tree.
    """

    budget: int
    tail_tokens: int = 64
    scorer: Any = "recency"
    expand_threshold: float = -math.inf
    collapse_threshold: float = 0.05
    cooldown: int = 1
    max_swaps: int = 8
    scorer_options: Mapping[str, Any] = field(default_factory=dict)
    gist_cache: int | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not _is_int(self.budget) or self.budget < 1:
            problems.append(f"budget={self.budget!r} (expected a positive int)")
        if not _is_int(self.tail_tokens) or self.tail_tokens < 0:
            problems.append(f"tail_tokens={self.tail_tokens!r} (expected an int >= 0)")
        elif _is_int(self.budget) and self.tail_tokens > self.budget:
            problems.append(f"tail_tokens={self.tail_tokens!r} (expected <= budget="
                            f"{self.budget}: the raw tail alone would not fit)")
        if not _is_real(self.expand_threshold) or self.expand_threshold == math.inf:
            problems.append(f"expand_threshold={self.expand_threshold!r} (expected a number "
                            "below +inf; -inf fills the budget)")
        if not _is_real(self.collapse_threshold) or not (0 <= self.collapse_threshold < math.inf):
            problems.append(f"collapse_threshold={self.collapse_threshold!r} (expected a "
                            "finite number >= 0)")
        if not _is_int(self.cooldown) or self.cooldown < 0:
            problems.append(f"cooldown={self.cooldown!r} (expected an int >= 0)")
        if not _is_int(self.max_swaps) or self.max_swaps < 0:
            problems.append(f"max_swaps={self.max_swaps!r} (expected an int >= 0)")
        if self.gist_cache is not None and (not _is_int(self.gist_cache) or self.gist_cache < 0):
            problems.append(f"gist_cache={self.gist_cache!r} (expected an int >= 0 or None)")
        if not isinstance(self.scorer_options, Mapping):
            problems.append(f"scorer_options={self.scorer_options!r} (expected a mapping)")
        self._scorer: Any = None
        if isinstance(self.scorer, str):
            if self.scorer not in SCORERS:
                problems.append(f"scorer={self.scorer!r} (expected one of {sorted(SCORERS)} "
                                "or a scorer object)")
            elif isinstance(self.scorer_options, Mapping):
                try:
                    self._scorer = SCORERS[self.scorer](**self.scorer_options)
                except TypeError as e:
                    problems.append(f"scorer={self.scorer!r} with scorer_options="
                                    f"{dict(self.scorer_options)!r}: {e}")
        elif callable(getattr(self.scorer, "score", None)):
            self._scorer = self.scorer
        else:
            problems.append(f"scorer={self.scorer!r} (expected a registered name or an object "
                            "with score(ctx, level, indices))")
        if problems:
            raise ValueError("invalid FocusAllocator: " + "; ".join(problems))
        self.last_stats = RefocusStats()
        rows = 4 * self.budget if self.gist_cache is None else self.gist_cache
        self._cache = _GistCache(rows)

    def minimum(self, tree: Any, cursor: int | None = None) -> int:
        """Entries of the coarsest legal cover of ``[0, cursor)``: the least budget that works."""
        counts = tree_counts(tree)
        s = int(getattr(tree, "span", SPAN))
        cursor = self._cursor(counts, cursor)
        t = min(self.tail_tokens, cursor)
        return sum(_greedy_counts(counts, s, 0, cursor - t)) + t

    def assemble(self, tree: Any, cursor: int | None = None, query: Any = None,
                 previous: WorkingContext | None = None) -> WorkingContext:
        """Choose the working context for ``cursor``.

        Args:
            tree: a ``MegaContextTree`` (or duck-typed: ``count``, ``levels``, ``span``, and
                ``gists`` for scorers that read them).
            cursor: tokens to cover, ``[0, cursor)``; defaults to ``tree.num_tokens``.
            query: ``[c]`` vector in embedding space, for the ``similarity`` scorer.
            previous: the last refocus's context: reused where still legal, with hysteresis.

        Returns:
            a valid ``WorkingContext`` of at most ``budget`` entries whose last
            ``min(tail_tokens, cursor)`` entries are raw tokens.

        Raises:
            ValueError: the coarsest legal cover exceeds the budget (the message gives the
                minimum), a cursor outside ``[0, num_tokens]``, a ``previous`` that does not
                fit the tree, or a missing/bad query.
        """
        t0 = time.perf_counter()
        stats = RefocusStats()
        self.last_stats = stats
        counts = tree_counts(tree)
        s = int(getattr(tree, "span", SPAN))
        cursor = self._cursor(counts, cursor)
        if previous is not None:
            if not isinstance(previous, WorkingContext):
                raise TypeError(f"previous must be a WorkingContext, got "
                                f"{type(previous).__name__}")
            try:
                previous.validate(counts)
            except ValueError as e:
                raise ValueError(f"previous working context does not fit this tree: {e}") from e
        step = previous.step + 1 if previous is not None else 0
        q = self._query(query)
        self._cache.begin(tree)

        tail = min(self.tail_tokens, cursor)
        if cursor <= self.budget:
            # Everything fits: the exact context, whatever the scorer says.
            wc = WorkingContext.raw(cursor, span=s, step=step)
            stats.entries = stats.minimum = cursor
            stats.seconds = time.perf_counter() - t0
            return wc
        per_level = _greedy_counts(counts, s, 0, cursor - tail)
        stats.minimum = sum(per_level) + tail
        if stats.minimum > self.budget:
            raise ValueError(_minimum_message(self, per_level, tail, cursor, counts))

        # A jump of more than a budget of new tokens would enter more raw tokens than the
        # context holds: start over (the work stays bounded by the budget, not the jump).
        stats.rebuilt = previous is not None and cursor - previous.cursor > self.budget
        incremental = previous is not None and not stats.rebuilt
        if incremental:
            entries = _carry_over(previous, counts, s, cursor, tail)
        else:
            cover = np.array(list(_greedy_cover(counts, s, 0, cursor - tail)), dtype=np.int64)
            entries = _with_tokens(cover.reshape(-1, 2), np.full(len(cover), -1), cursor - tail,
                                   cursor)
        run = _Refocus(self, tree, counts, s, cursor, cursor - tail, q, entries, step, stats,
                       incremental=incremental)
        run.forced_collapses()
        # From scratch: best-first expansion, then swaps until none gains (a fixed point, so
        # an unchanged query refocuses to the same context), capped for bounded work.
        limit = self.max_swaps if incremental else 4 * (self.budget // (s - 1) + 8)
        run.refine(limit)
        wc = run.working_context()
        stats.entries = len(wc)
        stats.seconds = time.perf_counter() - t0
        return wc

    # ------------------------------------------------------------------------------------

    @staticmethod
    def _cursor(counts: list[int], cursor: Any) -> int:
        if cursor is None:
            return counts[0]
        if not _is_int(cursor) or not 0 <= cursor <= counts[0]:
            raise ValueError(f"cursor={cursor!r} (expected an int in [0, {counts[0]}], the "
                             "tree's committed tokens)")
        return int(cursor)

    def _query(self, query: Any) -> np.ndarray | None:
        if query is None:
            if self._scorer.needs_query:
                raise ValueError(f"scorer {self.scorer!r} needs query= (a [c] vector)")
            return None
        if hasattr(query, "detach"):
            query = query.detach().cpu().double().numpy()
        q = np.asarray(query, dtype=np.float64)
        if q.ndim != 1 or not np.isfinite(q).all() or not np.linalg.norm(q) > 0:
            raise ValueError(f"query must be a finite non-zero vector [c], got shape "
                             f"{tuple(q.shape)}")
        return q / np.linalg.norm(q)


def _greedy_counts(counts: list[int], s: int, a: int, b: int) -> list[int]:
    """Entries per level (top first, tokens last) of the greedy aligned cover of ``[a, b)``,
    ``a`` a multiple of ``s^top``, counted without listing them."""
    top = len(counts) - 1
    out, p = [], a
    for k in range(top, 0, -1):
        size = s**k
        n = max(0, min((b - p) // size, counts[k] - p // size))
        out.append(n)
        p += n * size
    out.append(b - p)
    return out


def _greedy_cover(counts: list[int], s: int, a: int, b: int, top: int | None = None):
    """The fewest aligned, existing nodes (level <= ``top``) tiling ``[a, b)``, in order:
    at each point the largest node that starts there, fits, and exists."""
    top = len(counts) - 1 if top is None else top
    p = a
    while p < b:
        k = top
        while k > 0 and (p % s**k or p + s**k > b or p // s**k >= counts[k]):
            k -= 1
        yield (k, p // s**k)
        p += s**k


def _with_tokens(keys: np.ndarray, born: np.ndarray, a: int, b: int):
    """``(keys [w, 2], born [w])`` with raw tokens ``[a, b)`` appended (born −1)."""
    t = np.arange(a, max(a, b), dtype=np.int64)
    tokens = np.stack([np.zeros_like(t), t], axis=1)  # [n, 2]
    return np.concatenate([keys, tokens]), np.concatenate([born, np.full(t.size, -1)])


def _carry_over(previous: WorkingContext, counts: list[int], s: int, cursor: int,
                tail: int) -> tuple[np.ndarray, np.ndarray]:
    """``previous``'s entries made legal for the new cursor: ``(keys [w, 2], born [w])``.

    Entries past the cursor go; a node reaching into the new raw tail (the cursor moved back
    or the tail grew) is replaced by its greedy cover and raw tokens; tokens the cursor
    advanced over enter raw. Nothing is folded here: the budget decides that.
    """
    lv, st, en, born = previous.levels, previous.starts, previous.ends, previous.born
    edge = cursor - tail
    keep = (st < cursor) & ((lv == 0) | (en <= edge))
    keys = np.stack([lv[keep], previous.indices[keep]], axis=1)  # [w, 2]
    born = born[keep]
    for j in np.flatnonzero(~keep & (st < cursor)).tolist():
        a, b = int(st[j]), int(en[j])
        cover = np.array(list(_greedy_cover(counts, s, a, min(b, edge), int(lv[j]) - 1)),
                         dtype=np.int64).reshape(-1, 2)
        keys, born = _with_tokens(np.concatenate([keys, cover]),
                                  np.concatenate([born, np.full(len(cover), -1)]),
                                  max(a, edge), min(b, cursor))
    return _with_tokens(keys, born, previous.cursor, cursor)


def _read_runs(tree: Any, level: int, uniq: np.ndarray, span: int,
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


class _GistCache:
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
            try:
                self._tree = weakref.ref(tree)
            except TypeError:  # not weakly referenceable: hold it
                self._tree = (lambda t: lambda: t)(tree)
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
            return _read_runs(tree, level, uniq, span, stats)[inv]
        slots = self._lookup(level, uniq)  # [u]
        miss = slots < 0
        stats.cache_hits += int(uniq.size - miss.sum())
        self.used[slots[~miss]] = self.tick
        if not miss.any():
            return self.mat[slots[inv]]  # [n, c]
        fresh = _read_runs(tree, level, uniq[miss], span, stats)  # [m, c]
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


def _entry_arrays(entries: dict[tuple[int, int], int]) -> tuple[np.ndarray, np.ndarray]:
    """The cut's keys as int64 ``[w, 2]`` (level, index) and their ``born`` stamps ``[w]``."""
    n = len(entries)
    keys = np.fromiter(itertools.chain.from_iterable(entries), dtype=np.int64, count=2 * n)
    return keys.reshape(n, 2), np.fromiter(entries.values(), dtype=np.int64, count=n)


def _minimum_message(alloc: FocusAllocator, per_level: list[int], tail: int, cursor: int,
                     counts: list[int]) -> str:
    top = len(counts) - 1
    minimum = sum(per_level) + tail
    parts = [f"{n} L{top - i} nodes" for i, n in enumerate(per_level[:-1]) if n]
    parts.append(f"{per_level[-1] + tail} tokens ({tail} of them the raw tail)")
    return (
        f"budget {alloc.budget} is too small for cursor {cursor}: the coarsest legal cover "
        f"needs at least {minimum} entries ({', '.join(parts)}). Raise the budget to >= "
        f"{minimum}, lower tail_tokens (now {alloc.tail_tokens}), or build the tree with more "
        f"levels (it has {top}; the {per_level[0]} top-level nodes each take a slot)"
    )


class _Refocus:
    """One refocus: the cut as a dict ``(level, index) → born``, two lazy heaps, the scorer.

    Also the ``ScoreContext`` the scorer sees.
    """

    def __init__(self, alloc: FocusAllocator, tree: Any, counts: list[int], s: int,
                 cursor: int, edge: int, query: np.ndarray | None,
                 entries: tuple[np.ndarray, np.ndarray], step: int, stats: RefocusStats,
                 incremental: bool) -> None:
        self.alloc, self.tree, self.counts, self.span = alloc, tree, counts, s
        self.cursor, self.edge, self.query = cursor, edge, query
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
        return k <= self.top and j < self.counts[k] and (j + 1) * self.span**k <= self.edge

    def _build_heaps(self, keys: np.ndarray, born: np.ndarray) -> None:
        s = self.span
        frozen = (born >= self.frozen_from) & (born < self.step)  # [w]
        self.n = len(self.entries)
        for k in range(0, self.top + 1):
            sel = keys[:, 0] == k
            idx = keys[sel, 1]
            if k >= 1:
                ok = ~frozen[sel]
                sc = self._score(k, idx[ok])
                self.expand_heap.extend(zip((-sc).tolist(), [k] * sc.size,
                                            idx[ok].tolist(), strict=True))
            if k < self.top and idx.size:
                parents, inv, cnt = np.unique(idx // s, return_inverse=True, return_counts=True)
                pfrozen = np.bincount(inv, weights=frozen[sel], minlength=parents.size) > 0
                legal = ((cnt == s) & (parents < self.counts[k + 1])
                         & ((parents + 1) * s ** (k + 1) <= self.edge))
                p = parents[legal]
                sc = self._score(k + 1, p)
                for heap, m in ((self.collapse_free, ~pfrozen[legal]),
                                (self.collapse_frozen, pfrozen[legal])):
                    heap.extend(zip(sc[m].tolist(), [k + 1] * int(m.sum()), p[m].tolist(),
                                    strict=True))
        heapq.heapify(self.expand_heap)
        heapq.heapify(self.collapse_free)
        heapq.heapify(self.collapse_frozen)

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

    def _peek_expand(self):
        h = self.expand_heap
        while h and (h[0][1], h[0][2]) not in self.entries:
            heapq.heappop(h)  # stale: already expanded or collapsed away
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
        keys, born = _entry_arrays(entries)  # [w, 2], [w]
        lv = keys[:, 0]
        starts = keys[:, 1] * np.power(np.int64(self.span), lv)
        order = np.argsort(starts, kind="stable")
        return WorkingContext.from_entries(lv[order], keys[order, 1], self.cursor,
                                           span=self.span, born=born[order], step=self.step)

    def working_context(self) -> WorkingContext:
        wc = self._to_wc(self.entries)
        assert len(wc) == self.n <= self.budget, (len(wc), self.n, self.budget)
        return wc
