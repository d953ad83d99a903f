"""Substitution windows: score a continuation with old context as tokens, gists, or nothing.

Axes: ``b`` batch, ``n`` tokens of the window, ``g`` gists, ``s`` span (32), ``c`` hidden,
``H`` horizon (scored tokens), ``d`` head dim.

A window is ``[old context | raw tail | horizon]`` taken from one document, with the old
context ``g · 32^k`` tokens long and aligned to level-k nodes; its shape is a
:class:`~megacontext.data.windows.WindowLayout` (``Window`` here, the old name; the window
vocabulary is in :mod:`megacontext.data.windows`). The same window is scored under several
conditions, always on the same horizon tokens:

- ``full``: every token, at positions 0 … n−1;
- ``truncated``: the old context dropped; the tail and horizon keep their true positions;
- ``sink``: ``truncated`` plus the window's first ``sink_tokens`` tokens at their true positions
  (the attention-sink control of StreamingLLM: the full condition has those first tokens too);
- ``streaming``: StreamingLLM (Xiao et al., 2023) at ``entries`` entries: ``sink_tokens``
  first tokens plus the most recent raw tokens before the horizon, ``entries`` in all (with
  less room than tail + sinks, fewer sinks), placed at **consecutive positions** (cache ranks
  ``0 … entries + H − 1``) as StreamingLLM places its cache, so its positions never exceed
  the budget whatever the window's length;
- ``recent``: the last ``entries`` tokens before the horizon at their true positions (a plain
  sliding window of the same size);
- ``gist``: the old context replaced by ``g`` level-k gists, each at its span's center
  ``i·32^k + (32^k − 1)/2`` (:func:`megacontext.spans.centers`; or renumbered ``0 … g−1``, the
  "consecutive" variant), optionally with RoPE span attenuation.

This is the measurement training optimises and evaluation reports
(docs/design.md: substitutability).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from megacontext.data.windows import WindowLayout
from megacontext.gistnet import Compressor, GistLane, lane_of
from megacontext.rope import RopeConfig, span_attenuation
from megacontext.spans import centers
from megacontext.working_context import GIST_ROPES

Window = WindowLayout  # the old name of a window's layout, kept for its many users
POSITION_MODES = ("center", "consecutive")

__all__ = ["CONDITIONS", "GIST_ROPES", "POSITION_MODES", "Compressor", "Window", "WindowLayout",
           "gist_attenuation", "gist_positions", "gist_rows", "horizon_nll", "kept_tokens",
           "make_gists", "recovery", "score_window"]


def make_gists(token_embeds: torch.Tensor, window: WindowLayout, compressor: Compressor,
               round_to: torch.dtype | None = None) -> torch.Tensor:
    """Compress the old context ``[b, context, c]`` into ``[b, g, c]`` level-k gists, level by
    level (level k reads the level-(k−1) gists of its 32^(k−1)-token children).

    ``round_to`` rounds each level's output to a storage dtype before the next level reads it,
    as the disk tree does (evaluation of stored trees); training leaves it None.
    """
    x = token_embeds
    for level in range(1, window.level + 1):
        x = rearrange(x, "b (g s) c -> b g s c", s=window.span)
        x = compressor(x, level)  # [b, g, c]
        if round_to is not None:
            x = x.to(round_to).float()
    return x


def gist_positions(window: WindowLayout, mode: str = "center") -> torch.Tensor:
    """float64 positions ``[g + tail + horizon]`` of the gist condition's entries."""
    if mode not in POSITION_MODES:
        raise ValueError(f"position mode {mode!r} is not one of {POSITION_MODES}")
    g, rest = window.num_gists, window.tail + window.horizon
    if mode == "center":
        gists = torch.from_numpy(centers(window.level, np.arange(g), window.span))
        tokens = torch.arange(window.context, window.length, dtype=torch.float64)
    else:  # renumbered: gists and tokens packed at consecutive positions
        gists = torch.arange(g, dtype=torch.float64)
        tokens = torch.arange(g, g + rest, dtype=torch.float64)
    return torch.cat([gists, tokens])


def gist_attenuation(window: WindowLayout, rope: RopeConfig,
                     kind: str = "point") -> torch.Tensor | None:
    """``[g + tail + horizon, d/2]`` attenuation (gist rows attenuated, token rows 1), or None
    for ``point``."""
    if kind not in GIST_ROPES:
        raise ValueError(f"gist_rope {kind!r} is not one of {GIST_ROPES}")
    if kind == "point":
        return None
    rows = torch.ones(window.num_gists + window.tail + window.horizon, rope.head_dim // 2,
                      dtype=torch.float64)
    rows[: window.num_gists] = span_attenuation(window.node_tokens, rope, kind=kind)
    return rows


def horizon_nll(lm, embeds: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
                attenuation: torch.Tensor | None = None, *, rope: RopeConfig | None = None,
                reduction: str = "mean", return_logits: bool = False, lane=None):
    """NLL of ``targets [b, H]``, the last H entries of ``embeds [b, w, c]``, each predicted
    from the entry before it; ``lane`` (a gist lane bound to the gist rows) as in
    :meth:`megacontext.base.BaseLM.forward`.

    Returns the mean over batch and horizon (``reduction="mean"``) or ``[b, H]`` (``"none"``);
    with ``return_logits`` also the ``[b, H, vocab]`` logits that scored them.
    """
    horizon = targets.shape[1]
    logits = lm(embeds, positions, attenuation, rope=rope, num_logits=horizon + 1,
                **({} if lane is None else {"lane": lane}))[:, :-1]
    nll = F.cross_entropy(rearrange(logits, "b h v -> (b h) v"), targets.reshape(-1),
                          reduction="none").view_as(targets)
    nll = nll.mean() if reduction == "mean" else nll
    return (nll, logits) if return_logits else nll


CONDITIONS = ("full", "truncated", "sink", "streaming", "recent", "gist")
RANKED = ("streaming",)  # token-only conditions read at cache ranks, not true positions


def kept_tokens(window: WindowLayout, condition: str, *, sink_tokens: int = 4,
                entries: int | None = None) -> torch.Tensor:
    """int64 window positions of the raw tokens a token-only condition keeps (sorted; the
    horizon always last): ``full``, ``truncated``, ``sink``, ``streaming`` or ``recent``
    (``entries`` in all before the horizon; at least the raw tail, and at most everything).

    Raises:
        ValueError: an unknown condition, or ``streaming``/``recent`` without a valid
            ``entries``.
    """
    if sink_tokens < 0:
        raise ValueError(f"sink_tokens={sink_tokens!r} must be >= 0")
    cursor = window.context + window.tail
    rest = torch.arange(window.context, window.length)
    if condition == "full":
        return torch.arange(window.length)
    if condition == "truncated":
        return rest
    if condition == "sink":
        return torch.cat([torch.arange(min(sink_tokens, window.context)), rest])
    if condition in ("streaming", "recent") and (entries is None or entries < window.tail):
        raise ValueError(f"{condition} needs entries >= the raw tail ({window.tail}), got "
                         f"{entries!r}")
    if condition == "recent":
        return torch.arange(max(0, cursor - entries), window.length)
    if condition == "streaming":
        # the sinks take what the tail leaves, up to sink_tokens; recent tokens the rest
        sinks = min(sink_tokens, window.context, entries - window.tail)
        start = max(sinks, cursor - (entries - sinks))
        return torch.cat([torch.arange(sinks), torch.arange(start, window.length)])
    raise ValueError(f"condition {condition!r} is not one of {CONDITIONS}")


def score_window(lm, ids: torch.Tensor, window: WindowLayout, condition: str, *,
                 compressor: Compressor | None = None, position_mode: str = "center",
                 gist_rope: str = "point", rope: RopeConfig | None = None,
                 round_to: torch.dtype | None = None, reduction: str = "mean",
                 return_logits: bool = False, sink_tokens: int = 4,
                 entries: int | None = None, lane: GistLane | None | str = "auto"):
    """NLL of the horizon of ``ids [b, n]`` under ``condition``: ``full``, ``truncated``,
    ``sink``, ``recent`` (see :func:`kept_tokens`; every kept token at its true position),
    ``streaming`` (the kept tokens at consecutive positions) or ``gist`` (which needs
    ``compressor``; pass a mean-pool or constant module for those baselines).

    The gist condition's gist rows are read through ``lane``: by default (``"auto"``) the
    compressor's own gist lane (:func:`megacontext.gistnet.lane_of`; none for baselines)."""
    if ids.shape[1] != window.length:
        raise ValueError(f"ids have {ids.shape[1]} tokens, the window needs {window.length} "
                         f"(context {window.context} + tail {window.tail} + horizon "
                         f"{window.horizon})")
    targets = ids[:, -window.horizon:]
    kw = dict(rope=rope, reduction=reduction, return_logits=return_logits)
    if condition != "gist":
        keep = kept_tokens(window, condition, sink_tokens=sink_tokens, entries=entries)
        embeds = lm.embed(ids[:, keep])  # [b, w, c]
        positions = torch.arange(keep.numel()) if condition in RANKED else keep
        return horizon_nll(lm, embeds, positions, targets, **kw)
    embeds = lm.embed(ids)  # [b, n, c]
    if compressor is None:
        raise ValueError("the gist condition needs a compressor (a GistNet or mean pooling)")
    gists = make_gists(embeds[:, : window.context], window, compressor, round_to)
    entries = torch.cat([gists.to(embeds.dtype), embeds[:, window.context:]], dim=1)
    attenuation = gist_attenuation(window, rope or lm.config.rope, gist_rope)
    lane = lane_of(compressor) if lane == "auto" else lane
    if lane is not None:
        kw["lane"] = lane.at(gist_rows(window))
    return horizon_nll(lm, entries, gist_positions(window, position_mode), targets,
                       attenuation, **kw)


def gist_rows(window: WindowLayout) -> torch.Tensor:
    """bool ``[g + tail + horizon]``: which entries of the gist condition are gists."""
    rows = torch.zeros(window.num_gists + window.tail + window.horizon, dtype=torch.bool)
    rows[: window.num_gists] = True
    return rows


def recovery(truncated, gist, full):
    """``(NLL(truncated) − NLL(gists)) / (NLL(truncated) − NLL(full))``: 1 when gists are as
    good as the tokens they replace, 0 when they are as good as nothing, < 0 when worse; NaN
    where the gap is 0.

    Elementwise over arrays (bootstrap samples: ``megacontext.evaluation.stats``); a float
    for scalar arguments.
    """
    t, g, f = (np.asarray(x, dtype=np.float64) for x in (truncated, gist, full))
    gap = t - f
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(gap == 0, np.nan, (t - g) / np.where(gap == 0, 1.0, gap))
    return float(out) if out.ndim == 0 else out
