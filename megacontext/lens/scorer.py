"""The allocator's scorer ``lens``: LensNet (:mod:`megacontext.lens.model`) scores the nodes a
refocus asks about.

``ctx`` is the allocator's ``ScoreContext`` (``megacontext.allocator.scorers``), read
duck-typed: this module does not import the allocator, which imports it and registers
:class:`LensScorer` under the name ``lens``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from megacontext.lens.model import LensNet, load_lens, node_features


class LensScorer:
    """The allocator's scorer ``lens``: a :class:`LensNet` (or the folder of one) scores nodes.

    ``FocusAllocator(budget, scorer="lens", scorer_options={"lens": path_or_model})``; a query
    (``assemble(query=...)``) of token embeddings ``[q, c]`` is read as such, a ``[c]``
    vector as one token; without one the net sees its "no query" slot. A tree whose gists
    were made by another GistNet than the lens learned on is refused on first use.

    ``child_pool``: score a node of level >= 2 by the best of its 32 children's scores
    instead of its own gist — for trees whose upper levels are untrained (an untrained GistNet
    level emits one constant vector, so those gists cannot tell nodes apart). It reads 32
    gists per such node (bounded: a refocus scores O(budget) nodes) and descends one level
    only, so it serves 2-level trees; deeper ones need trained upper levels.
    """

    needs_query = False

    def __init__(self, lens: LensNet | str | Path, fingerprint: dict | None = None,
                 child_pool: bool = False) -> None:
        self.lens = lens if isinstance(lens, LensNet) else load_lens(lens, fingerprint)
        self.lens.eval()
        self.child_pool = bool(child_pool)

    def _check_tree(self, tree: Any) -> None:
        made_by, learned_on = getattr(tree, "gistnet_digest", None), self.lens.gistnet_digest
        if made_by is not None and learned_on is not None and made_by != learned_on:
            raise ValueError(f"the lens learned on the gists of GistNet {learned_on[:12]}…, "
                             f"this tree's gists were made by GistNet {made_by[:12]}…: "
                             "retrain the lens for this GistNet (or use another scorer)")

    @torch.no_grad()
    def score(self, ctx: Any, level: int, indices: np.ndarray) -> np.ndarray:
        self._check_tree(ctx.tree)
        indices = np.asarray(indices, dtype=np.int64)
        if self.child_pool and level >= 2 and indices.size:
            s = ctx.span
            kids = (indices[:, None] * s + np.arange(s)).reshape(-1)  # [n·s]
            return self._score(ctx, level - 1, kids).reshape(-1, s).max(axis=1)
        return self._score(ctx, level, indices)

    @torch.no_grad()
    def _score(self, ctx: Any, level: int, indices: np.ndarray) -> np.ndarray:
        g = np.asarray(ctx.read_gists(level, indices), dtype=np.float32)  # [n, c]
        if g.shape[1] != self.lens.cfg.hidden_size:
            raise ValueError(f"the lens reads gists of width {self.lens.cfg.hidden_size}, the "
                             f"tree's have width {g.shape[1]}")
        feats = node_features(level, indices, ctx.cursor, g, ctx.span)
        q = getattr(ctx, "query_tokens", None)
        if q is None and ctx.query is not None:
            q = ctx.query[None].astype(np.float32)
        query = None if q is None else torch.from_numpy(np.ascontiguousarray(q))[None]
        levels = torch.full((1, g.shape[0]), int(level), dtype=torch.int64)
        s = self.lens(torch.from_numpy(g)[None], levels, torch.from_numpy(feats)[None], query)
        return s[0].double().numpy()


__all__ = ["LensScorer"]
