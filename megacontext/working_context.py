"""The working context: the entries the base model reads, and turning them into its inputs.

Axes: ``w`` working-context entries, ``n`` tokens, ``c`` hidden size, ``j`` RoPE frequency
pairs (d/2), ``s`` span (32).

An entry is a raw token (level 0) or one aligned node of the memory tree. A level-k entry
with node index ``i`` covers tokens ``[i·s^k, (i+1)·s^k)`` and sits at RoPE position
``i·s^k + (s^k − 1)/2`` (its center; a token sits at its index; the arithmetic is
:mod:`megacontext.spans`). A working context lists its
entries in token order and tiles ``[0, cursor)`` exactly, so the positional distance between
any two entries equals the distance between what they stand for (docs/design.md, "Positions").

This module reads the tree (duck-typed: ``count``, ``levels``, ``span``, ``tokens``,
``gists``) and the RoPE math; it never imports the base model: ``materialize`` takes the
token-embedding function as a callable.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megacontext.positions import PositionRule
from megacontext.rope import RopeConfig, resolve, span_attenuation
from megacontext.spans import (
    SPAN,
    entry_positions,
    max_level,
    node_index,
    node_size,
    node_sizes,
)

# How a gist's RoPE stands for its span (the one list; rope.span_attenuation's kinds).
GIST_ROPES = ("point", "span", "gaussian")


def _int_array(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.size == 0:
        return np.zeros(0, dtype=np.int64) if a.ndim <= 1 else a.astype(np.int64)
    if a.dtype.kind not in "iu":
        raise TypeError(f"WorkingContext.{name} must be an integer array, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


@dataclass(eq=False)
class WorkingContext:
    """An ordered list of entries that tiles tokens ``[0, cursor)``.

    Attributes:
        levels: ``[w]`` int64, 0 for a raw token, k for a level-k gist.
        starts: ``[w]`` int64, first token each entry covers.
        ends: ``[w]`` int64, one past the last token it covers (``start + s^level``).
        positions: ``[w]`` float64 RoPE positions (token index or node center).
        cursor: the number of tokens covered; the next token to predict is ``cursor``.
        span: children per node (the tree's span, 32).
        born: ``[w]`` int64, the refocus ``step`` at which the allocator made each entry by
            an expansion or a collapse, −1 where it never did (the hysteresis memory).
        step: how many refocuses led here (0 for one assembled from scratch).
    """

    levels: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    positions: np.ndarray
    cursor: int
    span: int = SPAN
    born: np.ndarray | None = None
    step: int = 0

    def __post_init__(self) -> None:
        self.levels = _int_array(self.levels, "levels")
        self.starts = _int_array(self.starts, "starts")
        self.ends = _int_array(self.ends, "ends")
        pos = np.asarray(self.positions)
        if pos.size and pos.dtype.kind not in "fiu":
            raise TypeError(f"WorkingContext.positions must be float64, got dtype {pos.dtype}")
        self.positions = pos.astype(np.float64, copy=False)
        w = self.levels.shape[0] if self.levels.ndim == 1 else -1
        if self.born is None:
            self.born = np.full(max(w, 0), -1, dtype=np.int64)
        self.born = _int_array(self.born, "born")
        arrays = {"levels": self.levels, "starts": self.starts, "ends": self.ends,
                  "positions": self.positions, "born": self.born}
        shapes = {k: v.shape for k, v in arrays.items()}
        if any(len(s) != 1 or s[0] != w for s in shapes.values()):
            raise ValueError(f"WorkingContext arrays must all be 1-D of one length w, got {shapes}")
        for name in ("cursor", "span", "step"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"WorkingContext.{name} must be an int, got {v!r}")
            setattr(self, name, int(v))
        if self.span < 2:
            raise ValueError(f"WorkingContext.span={self.span} (expected >= 2)")

    # ------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_entries(
        cls,
        levels: Sequence[int] | np.ndarray,
        indices: Sequence[int] | np.ndarray,
        cursor: int,
        *,
        span: int = SPAN,
        born: Sequence[int] | np.ndarray | None = None,
        step: int = 0,
    ) -> WorkingContext:
        """Entries given as (level, node index) pairs, in the order given.

        Args:
            levels: ``[w]`` levels.
            indices: ``[w]`` node indices within their level (the token index for level 0).
            cursor: tokens covered.
        """
        lv = _int_array(levels, "levels")
        idx = _int_array(indices, "indices")
        sizes = node_sizes(lv, span)  # [w]
        starts = idx * sizes
        return cls(lv, starts, starts + sizes, entry_positions(lv, starts, span), cursor,
                   span=span, born=born, step=step)

    @classmethod
    def raw(cls, cursor: int, *, span: int = SPAN, step: int = 0) -> WorkingContext:
        """The exact context: every token of ``[0, cursor)`` raw."""
        t = np.arange(cursor, dtype=np.int64)
        return cls(np.zeros(cursor, dtype=np.int64), t, t + 1, t.astype(np.float64), cursor,
                   span=span, step=step)

    # ------------------------------------------------------------------------------------
    # derived views

    def __len__(self) -> int:
        return int(self.levels.shape[0])

    @property
    def indices(self) -> np.ndarray:
        """``[w]`` int64 node index of each entry within its level (token index at level 0)."""
        return self.starts // node_sizes(self.levels, self.span)

    @property
    def tokens_covered(self) -> int:
        """How many tokens the entries stand for (``cursor`` when valid)."""
        return int((self.ends - self.starts).sum())

    def entries(self) -> list[tuple[int, int]]:
        """``[(level, index), ...]`` in order."""
        return list(zip(self.levels.tolist(), self.indices.tolist(), strict=True))

    def counts(self) -> dict[int, int]:
        """Entries per level, coarsest first."""
        lv, n = np.unique(self.levels, return_counts=True)
        return {int(k): int(c) for k, c in sorted(zip(lv, n, strict=True), reverse=True)}

    def runs(self) -> list[tuple[int, int, int]]:
        """Maximal runs of equal level as ``(level, first entry, stop entry)``.

        In a valid context a run of level k is a run of consecutive node indices, so one tree
        read serves it.
        """
        w = len(self)
        if w == 0:
            return []
        cut = np.flatnonzero(np.diff(self.levels)) + 1
        bounds = [0, *cut.tolist(), w]
        return [(int(self.levels[a]), a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def render(self, max_runs: int | None = None) -> str:
        """Compact text for logs: level runs in order, e.g. ``L2×3 L1×17 L0×64``."""
        parts = [f"L{k}×{b - a}" for k, a, b in self.runs()]
        if max_runs is not None and len(parts) > max_runs:
            head = max_runs // 2
            tail = max_runs - head
            skipped = len(parts) - max_runs
            parts = [*parts[:head], f"…({skipped} runs)…", *parts[len(parts) - tail:]]
        return " ".join(parts) if parts else "(empty)"

    def __repr__(self) -> str:
        return (f"WorkingContext(w={len(self)}, cursor={self.cursor}, step={self.step}, "
                f"{self.render(max_runs=12)})")

    def common_prefix(self, other: WorkingContext) -> int:
        """Number of leading entries equal in both (level and start): the KV cache that can be
        reused when switching from one context to the other."""
        n = min(len(self), len(other))
        same = (self.levels[:n] == other.levels[:n]) & (self.starts[:n] == other.starts[:n])
        bad = np.flatnonzero(~same)
        return int(bad[0]) if bad.size else n

    # ------------------------------------------------------------------------------------
    # checks

    def validate(
        self,
        tree_or_counts: Any = None,
        *,
        tail_tokens: int | None = None,
        budget: int | None = None,
    ) -> WorkingContext:
        """Check every invariant; raise ``ValueError`` naming the first bad entry.

        Invariants: entries tile ``[0, cursor)`` in order, without gap or overlap; a level-k
        entry starts at a multiple of ``s^k`` and covers exactly ``s^k`` tokens; its position
        is its token index or its center; with a tree (or counts per level ``[count(0), …]``)
        every node exists (``index < count(level)``, tokens ``< count(0)``); optionally the
        last ``tail_tokens`` entries are raw tokens and there are at most ``budget`` entries.

        Returns:
            self, for chaining.
        """
        w, s = len(self), self.span
        lv, st, en = self.levels, self.starts, self.ends

        def fail(j: int, why: str) -> None:
            raise ValueError(
                f"working context entry {j} (level {int(lv[j])}, tokens [{int(st[j])}, "
                f"{int(en[j])}), position {float(self.positions[j])!r}) {why}"
            )

        def first(mask: np.ndarray) -> int | None:
            hits = np.flatnonzero(mask)
            return int(hits[0]) if hits.size else None

        if self.cursor < 0:
            raise ValueError(f"working context cursor={self.cursor} (expected >= 0)")
        if w == 0:
            if self.cursor != 0:
                raise ValueError(f"empty working context cannot cover [0, {self.cursor})")
            return self
        top = max_level(s)  # keep s^k inside int64
        if (j := first((lv < 0) | (lv > top))) is not None:
            fail(j, f"has a level outside [0, {top}]")
        sizes = node_sizes(lv, s)  # [w]
        if (j := first(en - st != sizes)) is not None:
            fail(j, f"covers {int(en[j] - st[j])} tokens, a level-{int(lv[j])} entry covers "
                    f"{int(sizes[j])}")
        if (j := first(st % sizes != 0)) is not None:
            fail(j, f"is not aligned: its start is not a multiple of {s}^{int(lv[j])}")
        if st[0] != 0:
            fail(0, "is first but does not start at token 0")
        if (j := first(st[1:] != en[:-1])) is not None:
            gap = "leaves a gap after" if st[j + 1] > en[j] else "overlaps"
            fail(j + 1, f"{gap} the previous entry, which ends at {int(en[j])}")
        if en[-1] != self.cursor:
            fail(w - 1, f"is last but ends at {int(en[-1])}, not at the cursor {self.cursor}")
        want = entry_positions(lv, st, s)
        if (j := first(self.positions != want)) is not None:
            fail(j, f"has position {float(self.positions[j])!r}, expected {float(want[j])!r} "
                    "(token index or node center)")
        if tree_or_counts is not None:
            tree_span = getattr(tree_or_counts, "span", s)
            if tree_span != s:
                raise ValueError(f"working context has span {s}, the tree has span {tree_span}")
            counts = tree_counts(tree_or_counts)
            if (j := first(lv >= len(counts))) is not None:
                fail(j, f"has a level above the tree's top level {len(counts) - 1}")
            limit = np.asarray(counts, dtype=np.int64)[lv]  # [w]
            if (j := first(self.indices >= limit)) is not None:
                what = "token" if lv[j] == 0 else f"level-{int(lv[j])} node {int(self.indices[j])}"
                fail(j, f"is beyond the tree: {what} does not exist, level {int(lv[j])} has "
                        f"{int(limit[j])} committed records")
        if tail_tokens is not None:
            t = min(int(tail_tokens), self.cursor)
            if (j := first((en > self.cursor - t) & (lv != 0))) is not None:
                fail(j, f"is a gist inside the raw tail (the last {t} tokens)")
        if budget is not None and w > budget:
            raise ValueError(f"working context has {w} entries, over the budget {budget}")
        return self

    # ------------------------------------------------------------------------------------
    # picture

    def plot(self, path: str | os.PathLike, *, scale: str = "log", title: str | None = None,
             tail_tokens: int | None = None, dpi: int = 150) -> Path:
        """Draw the level of every entry over the token timeline into a PNG.

        One row per level (tokens at the bottom), one box per entry, colored by level. With
        ``scale="log"`` the x axis is tokens before the cursor on a log scale (old on the left,
        the cursor on the right), which shows the fine detail near the cursor and the coarse
        past at once; ``"linear"`` plots token positions.

        Args:
            path: the PNG to write.
            scale: ``"log"`` or ``"linear"``.
            title: figure title; a summary by default.
            tail_tokens: shade this raw tail (None: not shaded).

        Returns:
            the path written.
        """
        if scale not in ("log", "linear"):
            raise ValueError(f"scale={scale!r} (expected 'log' or 'linear')")
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        # Figure + Agg canvas rather than pyplot: no global backend switch, no open figures.
        fig = Figure(figsize=(11, 3.6), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        top = max(1, int(self.levels.max()) if len(self) else 1)
        cmap = colormaps["viridis"]
        counts = self.counts()
        c = self.cursor
        for k in range(top + 1):
            sel = self.levels == k
            if scale == "log":
                # Token t is (c − t) tokens before the cursor; the box of each token is one
                # unit wide around its age, so a gist of 32^k tokens spans 32^k units.
                x0 = (c - self.ends[sel]).astype(np.float64) + 0.5
                widths = (self.ends[sel] - self.starts[sel]).astype(np.float64)
            else:
                x0 = self.starts[sel].astype(np.float64)
                widths = (self.ends[sel] - self.starts[sel]).astype(np.float64)
            color = cmap(k / top if top else 0.0)
            # Thin dark edges mark entry boundaries; where entries crowd, the bar darkens.
            ax.broken_barh(list(zip(x0.tolist(), widths.tolist(), strict=True)), (k - 0.38, 0.76),
                           facecolors=color, edgecolors=(0, 0, 0, 0.45), linewidths=0.3)
        if tail_tokens:
            t = min(int(tail_tokens), c)
            span = (0.5, t + 0.5) if scale == "log" else (c - t, c)
            ax.axvspan(*span, color="tab:red", alpha=0.12, lw=0)
            ax.text(span[0] if scale == "log" else span[1], top + 0.45, f"raw tail ({t})",
                    color="tab:red", ha="right", va="bottom", fontsize=8)
        ax.set_yticks(range(top + 1))
        ax.set_yticklabels([f"L{k}  ×{counts.get(k, 0)}" for k in range(top + 1)])
        ax.set_ylim(-0.6, top + 0.9)
        if scale == "log":
            ax.set_xscale("log")
            ax.set_xlim(max(c, 1) + 0.5, 0.5)  # inverted: the cursor on the right
            ax.set_xlabel("tokens before the cursor (log scale)")
        else:
            ax.set_xlim(0, max(c, 1))
            ax.axvline(c, color="tab:red", lw=1)
            ax.set_xlabel("token position")
        ax.grid(axis="x", which="major", alpha=0.3)
        ax.set_title(title or (f"working context: {len(self)} entries over {c:,} tokens "
                               f"(levels {self.render(max_runs=8)})"), fontsize=9)
        fig.savefig(path, dpi=dpi)
        return Path(path)


def tree_counts(tree_or_counts: Any) -> list[int]:
    """Committed records per level ``[count(0), …, count(levels)]`` of a tree or a sequence."""
    if hasattr(tree_or_counts, "count") and hasattr(tree_or_counts, "levels"):
        return [int(tree_or_counts.count(k)) for k in range(int(tree_or_counts.levels) + 1)]
    counts = [int(c) for c in tree_or_counts]
    if not counts or any(c < 0 for c in counts):
        raise ValueError(f"counts per level must be non-negative and non-empty, got {counts}")
    return counts


# ----------------------------------------------------------------------------------------
# materialize


@dataclass
class Materialized:
    """A working context turned into base-model inputs.

    Attributes:
        embeddings: ``[w, c]`` float32, token embeddings and stored gists in entry order.
        positions: ``[w]`` float64 read-time positions: token index or node center under
            ``exact``, the rule's positions otherwise (``megacontext.positions``).
        attenuation: ``[w, d/2]`` float64 RoPE attenuation (ones for tokens), or None when
            every entry is unattenuated (``gist_rope="point"`` or no gists).
        rope: the concrete RoPE for this refocus (``auto`` resolved), to pass as ``rope=``.
        extent: the positional extent ``max(positions) − min(positions) + 1``.
        gist_rows: ``[w]`` bool, True at the entries that hold gists: where the gist lane
            fires (``lane=gistnet.lane.at(m.gist_rows)``).
        next_position: where the token at the cursor is read (the cursor itself under
            ``exact``): a continuation goes at ``next_position + i``.
        rule: the position rule that placed the entries.
    """

    embeddings: torch.Tensor
    positions: torch.Tensor
    attenuation: torch.Tensor | None
    rope: RopeConfig
    extent: float
    gist_rows: torch.Tensor | None = None
    next_position: float = 0.0
    rule: PositionRule = PositionRule()

    def inputs(self) -> dict[str, Any]:
        """Keyword arguments for ``BaseLM.forward`` with a batch of one."""
        return {"inputs_embeds": self.embeddings[None], "positions": self.positions,
                "attenuation": self.attenuation, "rope": self.rope}


def materialize(
    wc: WorkingContext,
    tree: Any,
    embed: Callable[[torch.Tensor], torch.Tensor],
    *,
    rope: RopeConfig,
    gist_rope: str = "point",
    max_position: int | None = None,
    positions: PositionRule | str | dict | None = None,
) -> Materialized:
    """Turn a working context into embeddings, positions and RoPE attenuation.

    Token entries get ``embed`` of the tree's token ids (one call for all of them); level-k
    entries get the stored gists, read with one ``tree.gists`` call per run of consecutive
    entries of one level (a run is a run of consecutive nodes).

    Args:
        wc: the context; checked against the tree first (``WorkingContext.validate``).
        tree: a ``MegaContextTree`` or anything with ``count``, ``levels``, ``span``,
            ``tokens(start, stop)`` (int64 ``[n]``) and ``gists(level, start, stop)`` (``[g, c]``).
        embed: token ids int64 ``[n]`` → ``[n, c]``, e.g. ``lambda ids: lm.embed(ids[None])[0]``.
        rope: the base model's RoPE. With ``scaling="auto"`` it is resolved here, once, from
            the context's extent against the trained length (``max_position`` when given,
            else ``rope.original_max_position``); any other config passes through.
        gist_rope: ``point`` (no attenuation), ``span`` (``D_L(θ)`` of the gist's span
            length) or ``gaussian``; tokens are never attenuated.
        max_position: the model's trained length, overriding ``rope.original_max_position``
            for ``auto`` (and bounding the extent of the rules other than ``exact``).
        positions: the read-time position rule (``exact``, the default, or ``compact``,
            ``grouped``, ``single``: ``megacontext.positions.PositionRule``). ``auto`` then
            resolves from the extent of the positions the rule gives.

    Returns:
        a ``Materialized``.

    Raises:
        ValueError: an unknown ``gist_rope``, a bad ``max_position``, an entry the tree does
            not hold (beyond its committed counts) or a broken context, each named.
    """
    if gist_rope not in GIST_ROPES:
        raise ValueError(f"gist_rope={gist_rope!r} (expected one of {', '.join(GIST_ROPES)})")
    if not isinstance(rope, RopeConfig):
        raise TypeError(f"rope must be a RopeConfig, got {type(rope).__name__}")
    if max_position is not None and (isinstance(max_position, bool)
                                     or not isinstance(max_position, numbers.Integral)
                                     or max_position < 1):
        raise ValueError(f"max_position={max_position!r} (expected a positive int or None)")
    wc.validate(tree)
    w = len(wc)

    token_runs = [(a, b) for k, a, b in wc.runs() if k == 0]
    token_rows = np.concatenate([np.arange(a, b) for a, b in token_runs]) if token_runs else \
        np.zeros(0, dtype=np.int64)
    embedded = None
    if token_rows.size:
        ids = torch.cat([torch.as_tensor(tree.tokens(int(wc.starts[a]), int(wc.ends[b - 1])))
                         for a, b in token_runs]).to(torch.int64)  # [n]
        embedded = embed(ids)  # [n, c]
        if not isinstance(embedded, torch.Tensor) or embedded.shape[:1] != ids.shape \
                or embedded.ndim != 2:
            raise ValueError(f"embed must map ids [{ids.shape[0]}] to [{ids.shape[0]}, c], got "
                             f"{getattr(embedded, 'shape', type(embedded).__name__)}")
    gist_runs = [(k, a, b) for k, a, b in wc.runs() if k > 0]
    gists = []
    for k, a, b in gist_runs:
        first = node_index(k, int(wc.starts[a]), wc.span)
        g = torch.as_tensor(tree.gists(k, first, first + (b - a)))  # [b − a, c]
        gists.append(g)

    if embedded is not None:
        c, device = embedded.shape[1], embedded.device
    elif gists:
        c, device = gists[0].shape[1], gists[0].device
    else:
        c, device = int(getattr(tree, "hidden_size", 0)), torch.device("cpu")
    out = torch.empty(w, c, dtype=torch.float32, device=device)  # [w, c]
    if embedded is not None:
        out[torch.from_numpy(token_rows).to(device)] = embedded.detach().to(torch.float32)
    for (_, a, b), g in zip(gist_runs, gists, strict=True):
        if g.shape != (b - a, c):
            raise ValueError(f"tree.gists returned shape {tuple(g.shape)} for entries [{a}, {b}),"
                             f" expected ({b - a}, {c}) (token embeddings have width {c})")
        out[a:b] = g.to(device=device, dtype=torch.float32)

    rule = PositionRule.of(positions)
    trained = max_position or rope.original_max_position
    placed, next_position = rule.place(wc.positions, wc.starts, wc.cursor,
                                       max_position=trained)  # [w]
    positions = torch.from_numpy(placed)  # [w] float64
    extent = float(placed.max() - placed.min()) + 1.0 if w else 1.0
    used = rope
    if rope.scaling == "auto":
        if max_position is not None:
            rope = dataclasses.replace(rope, original_max_position=int(max_position))
        # Once per refocus: one KV cache never mixes two scalings.
        used = resolve(rope, extent)

    attenuation = None
    gist_levels = sorted({int(k) for k in np.unique(wc.levels) if k > 0})
    if gist_rope != "point" and gist_levels:
        half = used.head_dim // 2
        attenuation = torch.ones(w, half, dtype=torch.float64)  # [w, j]
        lv = torch.from_numpy(wc.levels)
        for k in gist_levels:
            # span= as BaseLM computes it for dynamic NTK (integer extent).
            row = span_attenuation(node_size(k, wc.span), used, gist_rope,
                                   span=math.floor(extent))  # [j]
            attenuation[lv == k] = row
        attenuation = attenuation.to(device)
    gist_rows = torch.from_numpy(wc.levels > 0).to(device)  # [w] bool
    return Materialized(out, positions.to(device), attenuation, used, extent, gist_rows,
                        next_position, rule)
