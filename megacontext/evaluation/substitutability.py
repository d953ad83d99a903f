"""Substitutability: how well gists stand in for the tokens they replace.

Axes: ``b`` batch of windows, ``n`` windows, ``L`` window tokens, ``H`` scored tokens,
``g`` gists, ``w`` working-context entries, ``c`` hidden size, ``j`` RoPE frequency pairs.

Every held-out window ``[old context | raw tail | horizon]`` is scored on the same ``H``
horizon tokens under each condition (docs/design.md, "Training and evaluation"):

- ``full``: every token; ``truncated``: the old context dropped (tail and horizon keep their
  true positions); ``mean_pool``: each node replaced by the mean of its tokens' embeddings;
  ``gist``: each node replaced by its GistNet gist (level 1 from tokens, level 2 from level-1
  gists), at its span center;
- ``mixed@W``: the working context the focus allocator picks under a budget of ``W`` entries
  from a memory tree holding the window's old context and tail (the tail always raw);
- variants of the gist condition (position mode, gist RoPE, RoPE scaling);
- per distance (level 1): one group of neighbouring spans replaced by gists, or dropped, the
  rest raw.

Scoring goes through :func:`megacontext.substitution.horizon_nll` everywhere, so the scored
tokens are the window's last ``H`` tokens in every condition by construction.
"""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from megacontext import substitution as sub
from megacontext.allocator import FocusAllocator
from megacontext.data import (
    TokenCorpus,
    WindowDataset,
    WindowKey,
    WindowLayout,
    collate_windows,
)
from megacontext.data import evenly_spaced_windows as _evenly_spaced
from megacontext.evaluation.config import (
    DistancePlan,
    MixedPlan,
    SubstitutabilityConfig,
    WindowPlan,
)
from megacontext.evaluation.stats import recovery, resample, summarize
from megacontext.gistnet import Compressor, ConstantGist, MeanPoolGist
from megacontext.ingest import Ingestor
from megacontext.rope import RopeConfig, resolve, span_attenuation
from megacontext.spans import center, centers
from megacontext.tree import MegaContextTree
from megacontext.working_context import materialize

# Scalings whose formula needs the model's trained length.
NEEDS_TRAINED_LENGTH = ("dynamic", "yarn", "llama3", "auto")


# -- windows -----------------------------------------------------------------------------------

def evaluation_windows(corpus: TokenCorpus, docs: np.ndarray,
                       plan: WindowPlan) -> dict[int, list[WindowKey]]:
    """The evaluation windows of each level, evenly spaced over the documents ``docs`` (the
    test documents of the training corpus, or every document of another corpus; see
    :func:`megacontext.evaluation.evaluate.evaluation_documents`).

    Raises:
        ValueError: no document of ``docs`` holds a window of some level (names the longest).
    """
    lengths = corpus.doc_lengths
    docs = np.asarray(docs, dtype=np.int64)
    out: dict[int, list[WindowKey]] = {}
    for level in plan.levels:
        length = plan.length(level)
        if docs.size == 0 or int(lengths[docs].max()) < length:
            longest = int(lengths[docs].max(initial=0)) if docs.size else 0
            w = plan.layout(level)
            raise ValueError(
                f"no evaluated document of corpus {corpus.name!r} ({docs.size} documents) fits "
                f"a level-{level} window of {length} tokens (context {w.context} + tail "
                f"{w.tail} + horizon {w.horizon}); the longest has {longest}. Shorten the "
                f"window or the horizon")
        out[level] = _evenly_spaced(lengths, docs, plan.spec(level), plan.count(level))
    return out


def batches(dataset: WindowDataset, indices: Sequence[int], size: int) -> Iterator[dict]:
    for i in range(0, len(indices), size):
        yield collate_windows([dataset[j] for j in indices[i:i + size]])


# -- RoPE per window ---------------------------------------------------------------------------

def variant_rope(base: RopeConfig, overrides: dict | None, max_position: int) -> RopeConfig:
    """The model's RoPE with a variant's overrides (its trained length filled in where the
    scaling needs one)."""
    if not overrides:
        return base
    kw = dict(overrides)
    if kw.get("scaling", base.scaling) in NEEDS_TRAINED_LENGTH:
        kw.setdefault("original_max_position", base.original_max_position or max_position)
    return dataclasses.replace(base, **kw)


def concrete(rope: RopeConfig, extent: int) -> RopeConfig:
    """``auto`` resolved once per window from its full extent, so every condition of the
    window uses the same rotation (as the runtime does once per refocus)."""
    return resolve(rope, float(extent)) if rope.scaling == "auto" else rope


# -- partial replacement -----------------------------------------------------------------------

def compose(embeds: torch.Tensor, gists: torch.Tensor, window: WindowLayout, states: Sequence[str],
            *, rope: RopeConfig, gist_rope: str = "point"):
    """A window's entries when each old-context node is ``raw``, ``gist`` or ``drop``.

    Args:
        embeds: ``[b, L]`` token embeddings of the window ``[b, L, c]``.
        gists: ``[b, g, c]`` the nodes' gists.
        states: one per node, in order.

    Returns:
        ``(entries [b, w, c], positions [w] float64, attenuation [w, j] | None)``; gists at
        their span centers, tokens at their indices, the tail and horizon always raw.
    """
    if len(states) != window.num_gists:
        raise ValueError(f"{len(states)} states for {window.num_gists} nodes")
    size = window.node_tokens
    pieces, positions, is_gist = [], [], []
    for i, state in enumerate(states):
        a = i * size
        if state == "raw":
            pieces.append(embeds[:, a:a + size])
            positions.append(torch.arange(a, a + size, dtype=torch.float64))
            is_gist.append(torch.zeros(size, dtype=torch.bool))
        elif state == "gist":
            pieces.append(gists[:, i:i + 1].to(embeds.dtype))
            positions.append(torch.tensor([center(window.level, i, window.span)],
                                          dtype=torch.float64))
            is_gist.append(torch.ones(1, dtype=torch.bool))
        elif state != "drop":
            raise ValueError(f"state {state!r} is not one of raw, gist, drop")
    pieces.append(embeds[:, window.context:])
    positions.append(torch.arange(window.context, window.length, dtype=torch.float64))
    is_gist.append(torch.zeros(window.tail + window.horizon, dtype=torch.bool))
    entries = torch.cat(pieces, dim=1)  # [b, w, c]
    mask = torch.cat(is_gist)  # [w]
    attenuation = None
    if gist_rope != "point" and mask.any():
        attenuation = torch.ones(mask.shape[0], rope.head_dim // 2, dtype=torch.float64)
        attenuation[mask] = span_attenuation(size, rope, kind=gist_rope)
    return entries, torch.cat(positions), attenuation


# -- the scores --------------------------------------------------------------------------------

@dataclass
class LevelScores:
    """Per-token NLL of one level's windows under every condition.

    Attributes:
        nll: condition → float64 ``[n, H]``.
        targets: int64 ``[n, H]``, the scored tokens (the same in every condition).
        layouts: ``mixed@W`` → mean entries per level ``{k: count}`` over the windows.
    """

    level: int
    window: WindowLayout
    keys: list[WindowKey]
    nll: dict[str, np.ndarray] = field(default_factory=dict)
    targets: np.ndarray | None = None
    layouts: dict[str, dict[int, float]] = field(default_factory=dict)


def _score(lm, ids, window, condition, rope, compressor=None, position_mode="center",
           gist_rope="point") -> torch.Tensor:
    return sub.score_window(lm, ids, window, condition, compressor=compressor,
                            position_mode=position_mode, gist_rope=gist_rope, rope=rope,
                            reduction="none")  # [b, H]


def score_batch(lm, ids: torch.Tensor, window: WindowLayout, compressor: Compressor,
                baselines: dict[str, Compressor], cfg: SubstitutabilityConfig,
                mixed: bool = False) -> dict[str, torch.Tensor]:
    """``[b, H]`` NLL of the batch ``ids [b, L]`` under the main conditions, the baselines
    (each compressor of ``baselines`` in the gist's place, ``sink``, and ``streaming@W`` for
    every mixed budget when ``mixed``) and the variants."""
    base = concrete(lm.config.rope, window.length)
    gist_kw = dict(position_mode=cfg.position_mode, gist_rope=cfg.gist_rope)
    sink = cfg.sink_tokens
    out = {"full": _score(lm, ids, window, "full", base),
           "truncated": _score(lm, ids, window, "truncated", base),
           "sink": sub.score_window(lm, ids, window, "sink", rope=base, sink_tokens=sink,
                                    reduction="none"),
           "gist": _score(lm, ids, window, "gist", base, compressor, **gist_kw)}
    for name, baseline in baselines.items():
        out[name] = _score(lm, ids, window, "gist", base, baseline, **gist_kw)
    if mixed:
        for budget in cfg.mixed.budgets:
            out[f"streaming@{budget}"] = sub.score_window(
                lm, ids, window, "streaming", rope=base, sink_tokens=sink, entries=budget,
                reduction="none")
    for v in cfg.variants:
        name = v.label()
        rope = concrete(variant_rope(lm.config.rope, v.rope, lm.config.max_position),
                        window.length)
        kw = dict(position_mode=v.position_mode or cfg.position_mode,
                  gist_rope=v.gist_rope or cfg.gist_rope)
        out[f"{name}|gist"] = _score(lm, ids, window, "gist", rope, compressor, **kw)
        if rope != base:
            out[f"{name}|full"] = _score(lm, ids, window, "full", rope)
            out[f"{name}|truncated"] = _score(lm, ids, window, "truncated", rope)
    return out


def mixed_window(lm, ids: torch.Tensor, window: WindowLayout, compressor: Compressor,
                 plan: MixedPlan, *, gist_rope: str = "point", rope: RopeConfig | None = None,
                 lens_options: dict | None = None):
    """NLL ``[H]`` of one window ``ids [L]`` under the allocator's working context at each
    budget (``mixed@W``; and ``mixed_<compare>@W`` with ``plan.compare``), and each context's
    entries per level; ``lens_options``: the ``lens`` scorer's options (``{"lens": LensNet,
    ...}``).

    The window's old context and tail go into a fresh memory tree (ingest pipeline, gists
    stored as ``plan.tree_dtype``); the allocator covers them under the budget, the tail raw;
    the horizon follows the materialized context at its true positions. ``rope`` (default:
    the model's) is resolved once from the window's extent.
    """
    cursor, horizon = window.context + window.tail, window.horizon
    targets = ids[None, cursor:]  # [1, H]
    rope = concrete(rope or lm.config.rope, window.length)
    embedding = lm.model.embed_tokens.weight.detach().float()
    # What the reader is looking at: the text before the horizon (similarity: its mean).
    recent = lm.embed(ids[None, max(0, cursor - 64):cursor])[0].float()  # [64, c]
    queries = {"recency": None, "similarity": recent.mean(0), "lens": recent}
    scorers = {"mixed": plan.scorer}
    if plan.compare is not None:
        scorers[f"mixed_{plan.compare}"] = plan.compare
    out, layouts = {}, {}
    with tempfile.TemporaryDirectory(prefix="megacontext-eval-") as tmp:
        tree = MegaContextTree.create(
            f"{tmp}/tree", hidden_size=lm.config.hidden_size, vocab_size=lm.config.vocab_size,
            rope=lm.config.rope, fingerprint=lm.fingerprint, levels=window.level,
            gist_dtype=plan.tree_dtype)
        with tree:
            ingest = Ingestor(tree, embedding, compressor)
            ingest.feed(ids[:cursor].numpy())
            ingest.commit()
            tail_embeds = lm.embed(targets)[0]  # [H, c]
            for (prefix, scorer), budget in itertools.product(scorers.items(), plan.budgets):
                alloc = FocusAllocator(budget, tail_tokens=window.tail, scorer=scorer,
                                       scorer_options=(lens_options or {}) if scorer == "lens"
                                       else {})
                wc = alloc.assemble(tree, cursor=cursor, query=queries[scorer])
                m = materialize(wc, tree, lambda t: lm.embed(t[None])[0], rope=rope,
                                gist_rope=gist_rope)
                entries = torch.cat([m.embeddings.to(tail_embeds.dtype), tail_embeds])[None]
                positions = torch.cat([m.positions, torch.arange(
                    cursor, cursor + horizon, dtype=torch.float64)])  # [w + H]
                attenuation = m.attenuation
                if attenuation is not None:
                    attenuation = torch.cat([attenuation, torch.ones(
                        horizon, attenuation.shape[1], dtype=attenuation.dtype)])
                nll = sub.horizon_nll(lm, entries, positions, targets, attenuation,
                                      rope=m.rope, reduction="none")[0]  # [H]
                out[f"{prefix}@{budget}"] = nll
                layouts[f"{prefix}@{budget}"] = wc.counts()
    return out, layouts


def distance_buckets(window: WindowLayout, buckets: int) -> list[np.ndarray]:
    """Groups of neighbouring node indices, nearest to the scored tokens first."""
    order = np.arange(window.num_gists)[::-1]
    return [np.sort(group) for group in np.array_split(order, buckets)]


def distance_batch(lm, ids: torch.Tensor, window: WindowLayout, compressor: Compressor,
                   plan: DistancePlan, *, gist_rope: str = "point") -> dict[str, torch.Tensor]:
    """``[b, H]`` NLL with one bucket of spans replaced by gists (``gist@j``) or dropped
    (``drop@j``), the rest raw."""
    rope = concrete(lm.config.rope, window.length)
    embeds = lm.embed(ids)  # [b, L, c]
    gists = sub.make_gists(embeds[:, :window.context], window, compressor)  # [b, g, c]
    targets = ids[:, -window.horizon:]
    out = {}
    for j, group in enumerate(distance_buckets(window, plan.buckets)):
        for state in ("gist", "drop"):
            states = ["raw"] * window.num_gists
            for i in group.tolist():
                states[i] = state
            entries, positions, att = compose(embeds, gists, window, states, rope=rope,
                                              gist_rope=gist_rope)
            out[f"{state}@{j}"] = sub.horizon_nll(lm, entries, positions, targets, att,
                                                  rope=rope, reduction="none")
    return out


@torch.inference_mode()
def score_level(lm, corpus: TokenCorpus, keys: list[WindowKey], level: int,
                compressor: Compressor, baselines: dict[str, Compressor],
                cfg: SubstitutabilityConfig, progress=None,
                lens_options: dict | None = None) -> LevelScores:
    """Score every window of ``level`` under every condition of ``cfg``."""
    plan = cfg.windows
    window = plan.layout(level)
    dataset = WindowDataset(corpus, plan.spec(level), keys)
    scores = LevelScores(level, window, list(keys))
    acc: dict[str, list[torch.Tensor]] = defaultdict(list)
    layouts: dict[str, list[dict[int, int]]] = defaultdict(list)
    targets = []
    mixed = bool(level in cfg.mixed.levels and cfg.mixed.budgets)
    for batch in batches(dataset, range(len(dataset)), cfg.batch_size):
        ids = batch["ids"]  # [b, L]
        targets.append(ids[:, -window.horizon:])
        for name, nll in score_batch(lm, ids, window, compressor, baselines, cfg,
                                     mixed).items():
            acc[name].append(nll)
        if mixed:
            for row in ids:
                nll, lay = mixed_window(lm, row, window, compressor, cfg.mixed,
                                        gist_rope=cfg.gist_rope, lens_options=lens_options)
                for name in nll:
                    acc[name].append(nll[name][None])
                    layouts[name].append(lay[name])
        if progress is not None:
            progress(ids.shape[0])
    scores.nll = {k: torch.cat(v).double().numpy() for k, v in acc.items()}
    scores.targets = torch.cat(targets).numpy() if targets else np.zeros((0, window.horizon))
    for name, lays in layouts.items():
        levels = sorted({k for lay in lays for k in lay}, reverse=True)
        scores.layouts[name] = {k: float(np.mean([lay.get(k, 0) for lay in lays]))
                                for k in levels}
    return scores


@torch.inference_mode()
def score_distance(lm, corpus: TokenCorpus, level1: LevelScores, compressor: Compressor,
                   cfg: SubstitutabilityConfig, progress=None) -> LevelScores:
    """Per-distance scores on the first ``cfg.distance.num_windows`` level-1 windows (their
    full-context scores are reused from ``level1``)."""
    plan = cfg.windows
    window = plan.layout(1)
    keys = list(level1.keys[:cfg.distance.num_windows])
    dataset = WindowDataset(corpus, plan.spec(1), keys)
    scores = LevelScores(1, window, keys)
    acc: dict[str, list[torch.Tensor]] = defaultdict(list)
    for batch in batches(dataset, range(len(dataset)), cfg.batch_size):
        for name, nll in distance_batch(lm, batch["ids"], window, compressor, cfg.distance,
                                        gist_rope=cfg.gist_rope).items():
            acc[name].append(nll)
        if progress is not None:
            progress(batch["ids"].shape[0])
    scores.nll = {k: torch.cat(v).double().numpy() for k, v in acc.items()}
    scores.nll["full"] = level1.nll["full"][:len(keys)]
    return scores


# -- summaries ---------------------------------------------------------------------------------

def _means(scores: LevelScores, horizon: int) -> dict[str, np.ndarray]:
    """condition → ``[n]`` per-window mean NLL over the first ``horizon`` scored tokens."""
    return {k: v[:, :horizon].mean(axis=1) for k, v in scores.nll.items()}


def _flatten(summary: dict[str, dict]) -> tuple[dict, dict]:
    values = {k: v["value"] for k, v in summary.items()}
    cis = {k: v["ci95"] for k, v in summary.items()}
    return values, cis


# Baselines in the gist's place (same entries, same positions): name → what stands there.
GIST_BASELINES = ("mean_pool", "mean_pool_rescaled", "constant")


def level_statistics(level: int) -> dict:
    """The statistics of an ``lK`` block: functions of condition → mean NLL over windows.

    ``recovery_X = (truncated − X) / (truncated − full)`` for every condition X (the gist's is
    ``recovery_lK``), and ``content_recovery_lK = (constant − gist) / (constant − full)``: the
    share of the gap between a content-free placeholder and the real tokens that the gist's
    content closes.
    """
    k = f"l{level}"
    stats = {
        "nll_full": lambda m: m["full"],
        "nll_truncated": lambda m: m["truncated"],
        "nll_sink": lambda m: m["sink"],
        f"nll_gist_{k}": lambda m: m["gist"],
        f"delta_nll_{k}": lambda m: m["gist"] - m["full"],
        f"recovery_{k}": lambda m: recovery(m["truncated"], m["gist"], m["full"]),
        f"content_recovery_{k}": lambda m: recovery(m["constant"], m["gist"], m["full"]),
        "delta_nll_truncated": lambda m: m["truncated"] - m["full"],
        "delta_nll_sink": lambda m: m["sink"] - m["full"],
        f"recovery_sink_{k}": lambda m: recovery(m["truncated"], m["sink"], m["full"]),
        f"gain_gist_vs_sink_{k}": lambda m: m["sink"] - m["gist"],
    }
    for name in GIST_BASELINES:
        stats[f"nll_{name}"] = lambda m, n=name: m[n]
        stats[f"delta_nll_{name}"] = lambda m, n=name: m[n] - m["full"]
        key = f"recovery_{name}_{k}" if name == "constant" else f"recovery_{name}"
        stats[key] = lambda m, n=name: recovery(m["truncated"], m[n], m["full"])
    return stats


def summarize_level(scores: LevelScores, cfg: SubstitutabilityConfig, corpus: TokenCorpus,
                    seed: int) -> dict:
    """The ``lK`` block of ``substitutability.json``."""
    level, window, plan = scores.level, scores.window, cfg.windows
    n = len(scores.keys)
    idx = resample(n, cfg.bootstrap, seed, f"l{level}")
    values, cis = _flatten(summarize(_means(scores, window.horizon), level_statistics(level),
                                     idx))
    block = {**values,
             "num_windows": n,
             "num_documents": len({key.doc for key in scores.keys}),
             "num_tokens_scored": n * window.horizon,
             "context_tokens": window.context, "num_gists": window.num_gists,
             "tail_tokens": window.tail, "window_tokens": window.length,
             "ci95": cis}
    block["by_horizon"] = {}
    for h in plan.horizons:
        v, c = _flatten(summarize(_means(scores, h), level_statistics(level), idx))
        block["by_horizon"][str(h)] = {**v, "ci95": c}
    if scores.layouts:
        block["mixed"] = []
        means = _means(scores, window.horizon)
        for budget in cfg.mixed.budgets:
            name = f"mixed@{budget}"
            stream = f"streaming@{budget}"
            other = f"mixed_{cfg.mixed.compare}@{budget}"
            compare = {} if cfg.mixed.compare is None else {
                "nll_compare": lambda m, o=other: m[o],
                "gain_vs_compare": lambda m, name=name, o=other: m[o] - m[name]}
            stats = summarize(means, {
                "nll": lambda m, name=name: m[name],
                "delta_nll": lambda m, name=name: m[name] - m["full"],
                "recovery": lambda m, name=name: recovery(m["truncated"], m[name], m["full"]),
                "nll_streaming": lambda m, s=stream: m[s],
                "delta_nll_streaming": lambda m, s=stream: m[s] - m["full"],
                "recovery_streaming": lambda m, s=stream: recovery(m["truncated"], m[s],
                                                                   m["full"]),
                "gain_vs_streaming": lambda m, name=name, s=stream: m[s] - m[name],
                **compare,
            }, idx)
            v, c = _flatten(stats)
            layout = scores.layouts[name]
            if cfg.mixed.compare is not None:
                v["entries_compare"] = float(sum(scores.layouts[other].values()))
            block["mixed"].append({"budget": budget, **v,
                                   "entries": float(sum(layout.values())),
                                   "entries_by_level": {f"L{k}": x for k, x in layout.items()},
                                   "ci95": c})
    block["windows"] = [[corpus.names[key.doc], key.offset] for key in scores.keys]
    return block


def summarize_variants(levels: dict[int, LevelScores], cfg: SubstitutabilityConfig,
                       seed: int) -> list[dict]:
    out = []
    for v in cfg.variants:
        name = v.label()
        entry = {"name": name, "position_mode": v.position_mode or cfg.position_mode,
                 "gist_rope": v.gist_rope or cfg.gist_rope, "rope": v.rope}
        for level, scores in levels.items():
            means = _means(scores, scores.window.horizon)
            full = f"{name}|full" if f"{name}|full" in means else "full"
            trunc = f"{name}|truncated" if f"{name}|truncated" in means else "truncated"
            gist = f"{name}|gist"
            stats = summarize(means, {
                "nll_full": lambda m, full=full: m[full],
                "nll_truncated": lambda m, trunc=trunc: m[trunc],
                "nll_gist": lambda m, gist=gist: m[gist],
                "delta_nll": lambda m, gist=gist, full=full: m[gist] - m[full],
                "recovery": lambda m, g=gist, f=full, t=trunc: recovery(m[t], m[g], m[f]),
            }, resample(len(scores.keys), cfg.bootstrap, seed, f"l{level}"))
            values, cis = _flatten(stats)
            entry[f"l{level}"] = {**values, "ci95": cis}
        out.append(entry)
    return out


def summarize_distance(scores: LevelScores, cfg: SubstitutabilityConfig, seed: int) -> dict:
    window = scores.window
    first_scored = window.context + window.tail
    size = window.node_tokens
    means = _means(scores, window.horizon)
    idx = resample(len(scores.keys), cfg.bootstrap, seed, "distance")
    rows = []
    for j, group in enumerate(distance_buckets(window, cfg.distance.buckets)):
        g, d = f"gist@{j}", f"drop@{j}"
        stats = summarize(means, {
            "nll_gist": lambda m, g=g: m[g],
            "nll_dropped": lambda m, d=d: m[d],
            "delta_nll_gist": lambda m, g=g: m[g] - m["full"],
            "delta_nll_dropped": lambda m, d=d: m[d] - m["full"],
            "recovery": lambda m, g=g, d=d: recovery(m[d], m[g], m["full"]),
        }, idx)
        values, cis = _flatten(stats)
        lo, hi = int(group.min()), int(group.max())
        rows.append({"spans": [lo, hi],
                     "tokens_before_scored": [first_scored - (hi + 1) * size + 1,
                                              first_scored - lo * size],
                     "distance": float(first_scored - centers(window.level, group,
                                                              window.span).mean()),
                     **values, "ci95": cis})
    return {"level": 1, "num_windows": len(scores.keys), "buckets_requested":
            cfg.distance.buckets, "nll_full": float(means["full"].mean()), "buckets": rows}


def check_targets(levels: dict[int, LevelScores], corpus: TokenCorpus) -> None:
    """Every scored token is the window's own continuation (read back from the corpus)."""
    for level, scores in levels.items():
        for key, row in zip(scores.keys, scores.targets, strict=True):
            end = key.offset + scores.window.length
            want = corpus.doc(key.doc)[end - scores.window.horizon:end]
            assert np.array_equal(row, want), f"level {level} window {key}: scored tokens differ"


def baseline_compressors(lm, span: int) -> dict[str, Compressor]:
    """The baselines that stand where the gists stand: mean pooling of the children (raw, and
    rescaled to the mean token-embedding norm) and the content-free constant (the untrained
    GistNet's output prior, the mean token embedding)."""
    embedding = lm.model.embed_tokens.weight.detach().float()  # [vocab, c]
    return {"mean_pool": MeanPoolGist(span),
            "mean_pool_rescaled": MeanPoolGist(span, target_norm=float(
                embedding.norm(dim=-1).mean())),
            "constant": ConstantGist.prior(embedding)}


def run_substitutability(lm, compressor: Compressor, corpus: TokenCorpus,
                         windows: dict[int, list[WindowKey]], cfg: SubstitutabilityConfig, *,
                         seed: int, progress=None,
                         lens_options: dict | None = None) -> tuple[dict, dict]:
    """Score and summarize. Returns ``(results, raw)``: the JSON-ready results (per level
    ``lK`` blocks, ``variants``, ``distance``) and the raw :class:`LevelScores`."""
    levels = {level: score_level(lm, corpus, windows[level], level, compressor,
                                 baseline_compressors(lm, cfg.windows.span), cfg, progress,
                                 lens_options)
              for level in cfg.windows.levels}
    check_targets(levels, corpus)
    results: dict = {f"l{level}": summarize_level(s, cfg, corpus, seed)
                     for level, s in levels.items()}
    raw: dict = {"levels": levels}
    if cfg.variants:
        results["variants"] = summarize_variants(levels, cfg, seed)
    if cfg.distance.num_windows and 1 in levels:
        dist = score_distance(lm, corpus, levels[1], compressor, cfg, progress)
        results["distance"] = summarize_distance(dist, cfg, seed)
        raw["distance"] = dist
    return results, raw
