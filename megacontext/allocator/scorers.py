"""Scorers: how useful it is to see a node expanded, by name (``FocusAllocator(scorer=...)``).

A scorer has ``needs_query`` and ``score(ctx, level, indices) -> [n] float64`` (higher: expand
first); ``ctx`` is the refocus in progress (:class:`ScoreContext`). ``recency`` needs nothing
but positions, ``similarity`` reads stored gists, ``oracle`` asks a judge that wraps the base
model (supplied by the runtime: this package never imports it), ``lexical`` looks the query's
rare tokens up in the nodes' own tokens (:mod:`megacontext.allocator.lexical`), ``lens`` is LensNet
(:class:`megacontext.lens.scorer.LensScorer`, registered here). :func:`register_scorer` adds
more.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from megacontext.allocator.lexical import LexicalScorer
from megacontext.lens.scorer import LensScorer
from megacontext.spans import centers, node_size
from megacontext.working_context import WorkingContext


class ScoreContext(Protocol):
    """What a scorer may look at during one refocus (implemented by the allocator)."""

    tree: Any
    cursor: int
    span: int
    query: np.ndarray | None  # [c] float64, unit norm, or None
    query_tokens: np.ndarray | None  # [q, c] float32: the query's token embeddings, or None
    query_ids: np.ndarray | None  # [q] int64: the query's token ids (``Query.ids``), or None

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
        size = node_size(level, ctx.span)
        return size / (ctx.cursor - centers(level, indices, ctx.span))


@register_scorer("similarity")
class SimilarityScorer:
    """Cosine of the query (a vector in embedding space) and the node's stored gist."""

    needs_query = True
    static_scores = True  # a node's score depends on it and the query alone: remembered

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


register_scorer("lens")(LensScorer)  # the learned scorer: megacontext.lens
register_scorer("lexical")(LexicalScorer)  # the query's rare words: allocator/lexical.py
