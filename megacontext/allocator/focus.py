"""``FocusAllocator``: the settings, the checks and ``assemble``, one refocus from cover to
``WorkingContext`` (the package docstring has the four steps).
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megacontext.allocator.cache import GistCache, ScoreMemo
from megacontext.allocator.cover import (
    carry_over,
    greedy_counts,
    greedy_cover,
    minimum_message,
    with_tokens,
)
from megacontext.allocator.refocus import Refocus, RefocusStats
from megacontext.allocator.scorers import SCORERS
from megacontext.spans import SPAN
from megacontext.working_context import WorkingContext, tree_counts


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and not math.isnan(x)


@dataclass(frozen=True)
class Query:
    """What a query-aware scorer reads: the query's token ids ``[q]`` (``lexical``) and/or
    their input embeddings ``[q, c]`` (``similarity`` reads their mean, ``lens`` each row).
    ``assemble(query=...)`` also takes the embeddings alone (a ``[q, c]`` matrix or a ``[c]``
    vector), as before."""

    ids: Any = None
    embeddings: Any = None


@dataclass(eq=False)
class FocusAllocator:
    """Chooses the working context for a cursor: the most useful nodes within a budget.

    Attributes:
        budget: W, the most entries a working context may hold.
        tail_tokens: the most recent tokens, always raw (clipped to the cursor).
        scorer: a registered scorer name (``recency``, ``similarity``, ``lexical``,
            ``oracle``, ``lens``) or an object with ``score(ctx, level, indices)`` and
            ``needs_query`` (and ``needs_query_ids`` when it reads ``Query.ids``).
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
        self._cache = GistCache(rows)
        self._memo = ScoreMemo()  # scores of static scorers (similarity), across refocuses

    def minimum(self, tree: Any, cursor: int | None = None) -> int:
        """Entries of the coarsest legal cover of ``[0, cursor)``: the least budget that works."""
        counts = tree_counts(tree)
        s = int(getattr(tree, "span", SPAN))
        cursor = self._cursor(counts, cursor)
        t = min(self.tail_tokens, cursor)
        return sum(greedy_counts(counts, s, 0, cursor - t)) + t

    def assemble(self, tree: Any, cursor: int | None = None, query: Any = None,
                 previous: WorkingContext | None = None) -> WorkingContext:
        """Choose the working context for ``cursor``.

        Args:
            tree: a ``MegaContextTree`` (or duck-typed: ``count``, ``levels``, ``span``, and
                ``gists`` for scorers that read them).
            cursor: tokens to cover, ``[0, cursor)``; defaults to ``tree.num_tokens``.
            query: ``[c]`` vector in embedding space (the ``similarity`` scorer's), or the
                query's token embeddings ``[q, c]`` (scorers read ``ctx.query_tokens``;
                ``ctx.query`` is then their mean, unit norm, which ``similarity`` reads), or
                a :class:`Query` with token ids (``ctx.query_ids``, the ``lexical``
                scorer's) and optionally those embeddings.
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
        q, q_tokens, q_ids = self._query(query, tree)
        self._cache.begin(tree)
        self._memo.begin(tree, q)

        tail = min(self.tail_tokens, cursor)
        if cursor <= self.budget:
            # Everything fits: the exact context, whatever the scorer says.
            wc = WorkingContext.raw(cursor, span=s, step=step)
            stats.entries = stats.minimum = cursor
            stats.seconds = time.perf_counter() - t0
            return wc
        per_level = greedy_counts(counts, s, 0, cursor - tail)
        stats.minimum = sum(per_level) + tail
        if stats.minimum > self.budget:
            raise ValueError(minimum_message(self.budget, self.tail_tokens, per_level, tail,
                                             cursor, counts))

        # A jump of more than a budget of new tokens would enter more raw tokens than the
        # context holds: start over (the work stays bounded by the budget, not the jump).
        stats.rebuilt = previous is not None and cursor - previous.cursor > self.budget
        incremental = previous is not None and not stats.rebuilt
        if incremental:
            entries = carry_over(previous, counts, s, cursor, tail)
        else:
            cover = np.array(list(greedy_cover(counts, s, 0, cursor - tail)), dtype=np.int64)
            entries = with_tokens(cover.reshape(-1, 2), np.full(len(cover), -1), cursor - tail,
                                   cursor)
        run = Refocus(self, tree, counts, s, cursor, cursor - tail, q, entries, step, stats,
                       incremental=incremental, query_tokens=q_tokens, query_ids=q_ids)
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

    def _query(self, query: Any, tree: Any
               ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """``(unit-norm mean [c] float64 or None, token rows [q, c] float32 or None, token ids
        [q] int64 or None)``."""
        ids = None
        if isinstance(query, Query):
            ids = None if query.ids is None else self._query_ids(query.ids, tree)
            query = query.embeddings
        if getattr(self._scorer, "needs_query_ids", False) and ids is None:
            raise ValueError(f"scorer {self.scorer!r} needs the query's token ids: "
                             f"query=Query(ids=...)")
        if query is None:
            if self._scorer.needs_query and not getattr(self._scorer, "needs_query_ids", False):
                raise ValueError(f"scorer {self.scorer!r} needs query= (a [c] vector or the "
                                 "query's token embeddings [q, c])")
            return None, None, ids
        if hasattr(query, "detach"):
            query = query.detach().cpu().double().numpy()
        q = np.asarray(query, dtype=np.float64)
        if q.ndim not in (1, 2) or q.size == 0 or not np.isfinite(q).all():
            raise ValueError(f"query must be a finite vector [c] or matrix [q, c], got shape "
                             f"{tuple(q.shape)}" + ("" if q.ndim not in (1, 2) or q.size == 0
                                                    else " with non-finite values"))
        tokens = q.astype(np.float32) if q.ndim == 2 else None
        mean = q.mean(0) if q.ndim == 2 else q
        if not np.linalg.norm(mean) > 0:
            raise ValueError(f"query must be non-zero, got shape {tuple(q.shape)} of norm 0")
        return mean / np.linalg.norm(mean), tokens, ids

    @staticmethod
    def _query_ids(ids: Any, tree: Any) -> np.ndarray:
        """The query's token ids as ``[q]`` int64, checked against the tree's vocabulary."""
        if hasattr(ids, "detach"):
            ids = ids.detach().cpu().numpy()
        arr = np.asarray(ids)
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"Query.ids must be a non-empty 1-d array of token ids, got shape "
                             f"{tuple(arr.shape)} of {arr.dtype}")
        vocab = getattr(tree, "vocab_size", None)
        bad = (arr < 0) | (arr >= vocab) if vocab is not None else arr < 0
        if bad.any():
            raise ValueError(f"Query.ids holds {int(arr[bad][0])}, outside the tree's "
                             f"vocabulary [0, {vocab})")
        return arr.astype(np.int64)
