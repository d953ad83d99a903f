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
from collections.abc import Collection, Iterator, Sequence

import numpy as np
import torch

from megacontext import substitution as sub
from megacontext.allocator import FocusAllocator, Query
from megacontext.data import (
    TokenCorpus,
    WindowDataset,
    WindowKey,
    WindowLayout,
    collate_windows,
)
from megacontext.data import evenly_spaced_windows as _evenly_spaced
from megacontext.evaluation.arms import ArmCache, windows_digest
from megacontext.evaluation.config import (
    DistancePlan,
    MixedPlan,
    SubstitutabilityConfig,
    WindowPlan,
)
from megacontext.evaluation.summary import (  # noqa: F401 — summarize_level: public here too
    LevelScores,
    distance_buckets,
    summarize_distance,
    summarize_level,
    summarize_variants,
)
from megacontext.gistnet import Compressor, ConstantGist, GistLane, MeanPoolGist, lane_of
from megacontext.ingest import Ingestor
from megacontext.rope import RopeConfig, resolve, span_attenuation
from megacontext.spans import center
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
            *, rope: RopeConfig, gist_rope: str = "point", with_rows: bool = False):
    """A window's entries when each old-context node is ``raw``, ``gist`` or ``drop``.

    Args:
        embeds: ``[b, L]`` token embeddings of the window ``[b, L, c]``.
        gists: ``[b, g, c]`` the nodes' gists.
        states: one per node, in order.

    Returns:
        ``(entries [b, w, c], positions [w] float64, attenuation [w, j] | None)``, and with
        ``with_rows`` the gist rows ``[w]`` bool as a fourth; gists at their span centers,
        tokens at their indices, the tail and horizon always raw.
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
    if with_rows:
        return entries, torch.cat(positions), attenuation, mask
    return entries, torch.cat(positions), attenuation


# -- the scores --------------------------------------------------------------------------------

def _score(lm, ids, window, condition, rope, compressor=None, position_mode="center",
           gist_rope="point") -> torch.Tensor:
    return sub.score_window(lm, ids, window, condition, compressor=compressor,
                            position_mode=position_mode, gist_rope=gist_rope, rope=rope,
                            reduction="none")  # [b, H]


def window_arms(lm, window: WindowLayout, baselines: dict[str, Compressor],
                cfg: SubstitutabilityConfig, mixed: bool = False) -> dict[str, dict]:
    """The conditions of a level's windows that do not depend on the GistNet, each with what
    it is computed from (its part of the cache key, :mod:`megacontext.evaluation.arms`)."""
    base = concrete(lm.config.rope, window.length)
    common = {"layout": window, "sink_tokens": cfg.sink_tokens}
    arms = {c: {"condition": c, "rope": base, **common} for c in ("full", "truncated", "sink")}
    for name, baseline in baselines.items():
        arms[name] = {"condition": name, "rope": base, "baseline": baseline.config_dict(),
                      "position_mode": cfg.position_mode, "gist_rope": cfg.gist_rope,
                      **common}
    if mixed:
        for budget in cfg.mixed.budgets:
            for c in ("streaming", "recent"):
                arms[f"{c}@{budget}"] = {"condition": c, "entries": budget, "rope": base,
                                         **common}
    for v in cfg.variants:
        rope = concrete(variant_rope(lm.config.rope, v.rope, lm.config.max_position),
                        window.length)
        if rope != base:
            for c in ("full", "truncated"):
                arms[f"{v.label()}|{c}"] = {"condition": c, "rope": rope, **common}
    return arms


def score_batch(lm, ids: torch.Tensor, window: WindowLayout, compressor: Compressor,
                baselines: dict[str, Compressor], cfg: SubstitutabilityConfig,
                mixed: bool = False, skip: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """``[b, H]`` NLL of the batch ``ids [b, L]`` under the main conditions, the baselines
    (each compressor of ``baselines`` in the gist's place, ``sink``, and ``streaming@W`` and
    ``recent@W`` for every mixed budget when ``mixed``) and the variants; conditions named in
    ``skip`` (already known, e.g. from the cache) are not computed."""
    base = concrete(lm.config.rope, window.length)
    gist_kw = dict(position_mode=cfg.position_mode, gist_rope=cfg.gist_rope)
    sink = cfg.sink_tokens
    todo = {"full": lambda: _score(lm, ids, window, "full", base),
            "truncated": lambda: _score(lm, ids, window, "truncated", base),
            "sink": lambda: sub.score_window(lm, ids, window, "sink", rope=base,
                                             sink_tokens=sink, reduction="none"),
            "gist": lambda: _score(lm, ids, window, "gist", base, compressor, **gist_kw)}
    for name, baseline in baselines.items():
        todo[name] = lambda b=baseline: _score(lm, ids, window, "gist", base, b, **gist_kw)
    if mixed:
        for budget, c in itertools.product(cfg.mixed.budgets, ("streaming", "recent")):
            todo[f"{c}@{budget}"] = lambda c=c, w=budget: sub.score_window(
                lm, ids, window, c, rope=base, sink_tokens=sink, entries=w, reduction="none")
    for v in cfg.variants:
        name = v.label()
        rope = concrete(variant_rope(lm.config.rope, v.rope, lm.config.max_position),
                        window.length)
        kw = dict(position_mode=v.position_mode or cfg.position_mode,
                  gist_rope=v.gist_rope or cfg.gist_rope)
        todo[f"{name}|gist"] = lambda r=rope, kw=kw: _score(lm, ids, window, "gist", r,
                                                            compressor, **kw)
        if rope != base:
            for c in ("full", "truncated"):
                todo[f"{name}|{c}"] = lambda r=rope, c=c: _score(lm, ids, window, c, r)
    return {name: fn() for name, fn in todo.items() if name not in skip}


def mixed_contexts(lm, ids: torch.Tensor, window: WindowLayout, compressor: Compressor,
                   plan: MixedPlan, *, gist_rope: str = "point", rope: RopeConfig | None = None,
                   lens_options: dict | None = None) -> tuple[dict, dict]:
    """The allocator's working contexts of one window ``ids [L]`` at each budget
    (``mixed@W``; and ``mixed_<compare>@W`` with ``plan.compare``), and each one's entries per
    level; ``lens_options``: the ``lens`` scorer's options (``{"lens": LensNet, ...}``).

    The window's old context and tail go into a fresh memory tree (ingest pipeline, gists
    stored as ``plan.tree_dtype``); the allocator covers them under the budget, the tail raw.
    ``rope`` (default: the model's) is resolved once from the window's extent.

    Under a position rule other than ``exact`` (``plan.positions``) the contexts are read at
    the rule's positions with the model's own RoPE (they fit its trained length).

    Returns:
        ``(contexts, layouts)``: name → ``(entries [w, c], positions [w] float64,
        attenuation [w, j] | None, rope, gist rows [w] bool, next position)``, and name →
        ``{level: count}``.
    """
    cursor = window.context + window.tail
    compact = plan.positions.kind != "exact"
    rope = lm.config.rope if compact else concrete(rope or lm.config.rope, window.length)
    embedding = lm.model.embed_tokens.weight.detach().float()
    # What the reader is looking at: the text before the horizon (similarity: its mean).
    before = ids[max(0, cursor - 64):cursor]
    recent = lm.embed(before[None])[0].float()  # [64, c]
    queries = {"recency": None, "similarity": recent.mean(0), "lens": recent,
               "lexical": Query(ids=before.numpy().astype(np.int64), embeddings=recent)}
    scorers = {"mixed": plan.scorer}
    if plan.compare is not None:
        scorers[f"mixed_{plan.compare}"] = plan.compare
    contexts, layouts = {}, {}
    with tempfile.TemporaryDirectory(prefix="megacontext-eval-") as tmp:
        tree = MegaContextTree.create(
            f"{tmp}/tree", hidden_size=lm.config.hidden_size, vocab_size=lm.config.vocab_size,
            rope=lm.config.rope, fingerprint=lm.fingerprint, levels=window.level,
            gist_dtype=plan.tree_dtype)
        with tree:
            ingest = Ingestor(tree, embedding, compressor)
            ingest.feed(ids[:cursor].numpy())
            ingest.commit()
            for (prefix, scorer), budget in itertools.product(scorers.items(), plan.budgets):
                alloc = FocusAllocator(budget, tail_tokens=window.tail, scorer=scorer,
                                       scorer_options=(lens_options or {}) if scorer == "lens"
                                       else {})
                wc = alloc.assemble(tree, cursor=cursor, query=queries[scorer])
                m = materialize(wc, tree, lambda t: lm.embed(t[None])[0], rope=rope,
                                gist_rope=gist_rope, positions=plan.positions,
                                max_position=lm.config.max_position if compact else None)
                contexts[f"{prefix}@{budget}"] = (m.embeddings, m.positions, m.attenuation,
                                                  m.rope, m.gist_rows, m.next_position)
                layouts[f"{prefix}@{budget}"] = wc.counts()
    return contexts, layouts


def score_contexts(lm, contexts: Sequence[tuple], targets: torch.Tensor,
                   first: int, lane: GistLane | None = None) -> torch.Tensor:
    """``[b, H]`` NLL of ``targets [b, H]``, row i read after ``contexts[i]`` (a
    :func:`mixed_contexts` value), the targets at the context's next positions (their true
    positions ``first …`` under ``exact``); the contexts' gist rows read through ``lane`` when
    given.

    Rows whose contexts have the same length, RoPE and attenuation kind go through the model
    as one batch (no padding, so each row's numbers are its own pass's)."""
    horizon = targets.shape[1]
    late = [i for i, ctx in enumerate(contexts) if ctx[5] > first]
    if late:  # a position rule only ever moves entries closer
        raise ValueError(f"context {late[0]} continues at position {contexts[late[0]][5]}, "
                         f"past the targets' true position {first}")
    tail_embeds = lm.embed(targets)  # [b, H, c]
    after = torch.arange(horizon, dtype=torch.float64)  # [H], from each context's next position
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (entries, _, att, rope, _, _) in enumerate(contexts):
        groups[(entries.shape[0], att is None, rope)].append(i)
    out = torch.empty(targets.shape, dtype=torch.float32)
    for (_, _, rope), rows in groups.items():
        entries = torch.stack([torch.cat([contexts[i][0].to(tail_embeds.dtype),
                                          tail_embeds[i]]) for i in rows])  # [g, w + H, c]
        positions = torch.stack([torch.cat([contexts[i][1], contexts[i][5] + after])
                                 for i in rows])
        attenuation = None
        if contexts[rows[0]][2] is not None:
            attenuation = torch.stack([torch.cat([contexts[i][2], torch.ones(
                horizon, contexts[i][2].shape[1], dtype=contexts[i][2].dtype)]) for i in rows])
        bound = None
        if lane is not None:  # the horizon's rows are raw tokens
            bound = lane.at(torch.stack([torch.cat([contexts[i][4], torch.zeros(
                horizon, dtype=torch.bool)]) for i in rows]))
        out[rows] = sub.horizon_nll(lm, entries, positions, targets[rows], attenuation,
                                    rope=rope, reduction="none", lane=bound).float()
    return out


def mixed_window(lm, ids: torch.Tensor, window: WindowLayout, compressor: Compressor,
                 plan: MixedPlan, *, gist_rope: str = "point", rope: RopeConfig | None = None,
                 lens_options: dict | None = None):
    """NLL ``[H]`` of one window ``ids [L]`` under each working context of
    :func:`mixed_contexts` (same arguments), and each context's entries per level; the
    horizon follows the materialized context at its true positions."""
    cursor = window.context + window.tail
    contexts, layouts = mixed_contexts(lm, ids, window, compressor, plan, gist_rope=gist_rope,
                                       rope=rope, lens_options=lens_options)
    targets = ids[None, cursor:]  # [1, H]
    out = {name: score_contexts(lm, [ctx], targets, cursor, lane_of(compressor))[0]
           for name, ctx in contexts.items()}
    return out, layouts


def distance_batch(lm, ids: torch.Tensor, window: WindowLayout, compressor: Compressor,
                   plan: DistancePlan, *, gist_rope: str = "point") -> dict[str, torch.Tensor]:
    """``[b, H]`` NLL with one bucket of spans replaced by gists (``gist@j``) or dropped
    (``drop@j``), the rest raw."""
    rope = concrete(lm.config.rope, window.length)
    embeds = lm.embed(ids)  # [b, L, c]
    gists = sub.make_gists(embeds[:, :window.context], window, compressor)  # [b, g, c]
    lane = lane_of(compressor)
    targets = ids[:, -window.horizon:]
    out = {}
    for j, group in enumerate(distance_buckets(window, plan.buckets)):
        for state in ("gist", "drop"):
            states = ["raw"] * window.num_gists
            for i in group.tolist():
                states[i] = state
            entries, positions, att, rows = compose(embeds, gists, window, states, rope=rope,
                                                    gist_rope=gist_rope, with_rows=True)
            out[f"{state}@{j}"] = sub.horizon_nll(lm, entries, positions, targets, att,
                                                  rope=rope, reduction="none",
                                                  lane=None if lane is None else lane.at(rows))
    return out


def window_ids(dataset: WindowDataset) -> np.ndarray:
    """int64 ``[n, L]`` token ids of every window of ``dataset``."""
    if len(dataset) == 0:
        return np.zeros((0, 0), dtype=np.int64)
    return np.stack([np.asarray(dataset[j]["ids"], dtype=np.int64) for j in range(len(dataset))])


@torch.inference_mode()
def score_level(lm, corpus: TokenCorpus, keys: list[WindowKey], level: int,
                compressor: Compressor, baselines: dict[str, Compressor],
                cfg: SubstitutabilityConfig, progress=None,
                lens_options: dict | None = None, cache: ArmCache | None = None,
                where: dict | None = None) -> LevelScores:
    """Score every window of ``level`` under every condition of ``cfg``.

    With ``cache``, the conditions that do not depend on the GistNet (:func:`window_arms`)
    are read from it where present (and checked) and stored after scoring; ``where``
    (corpus, split) joins their keys beside the windows' token ids."""
    plan = cfg.windows
    window = plan.layout(level)
    dataset = WindowDataset(corpus, plan.spec(level), keys)
    scores = LevelScores(level, window, list(keys))
    acc: dict[str, list[torch.Tensor]] = defaultdict(list)
    layouts: dict[str, list[dict[int, int]]] = defaultdict(list)
    targets = []
    mixed = bool(level in cfg.mixed.levels and cfg.mixed.budgets)
    arms, known = {}, {}
    if cache is not None and cache.enabled and len(dataset):
        ids_sha = windows_digest(window_ids(dataset))
        arms = {name: {**arm, **(where or {}), "level": level, "num_windows": len(dataset),
                       "windows_sha256": ids_sha}
                for name, arm in window_arms(lm, window, baselines, cfg, mixed).items()}
        shape = (len(dataset), window.horizon)
        known = {name: v for name, arm in arms.items()
                 if (v := cache.get(arm, shape)) is not None}
    for batch in batches(dataset, range(len(dataset)), cfg.batch_size):
        ids = batch["ids"]  # [b, L]
        targets.append(ids[:, -window.horizon:])
        for name, nll in score_batch(lm, ids, window, compressor, baselines, cfg,
                                     mixed, skip=known).items():
            acc[name].append(nll)
        if mixed:  # the working contexts window by window, their passes batched
            built = [mixed_contexts(lm, row, window, compressor, cfg.mixed,
                                    gist_rope=cfg.gist_rope, lens_options=lens_options)
                     for row in ids]
            cursor = window.context + window.tail
            for name in built[0][0]:
                acc[name].append(score_contexts(lm, [b[0][name] for b in built],
                                                ids[:, cursor:], cursor, lane_of(compressor)))
                layouts[name] += [b[1][name] for b in built]
        if progress is not None:
            progress(ids.shape[0])
    scores.nll = {k: torch.cat(v).double().numpy() for k, v in acc.items()}
    for name, arm in arms.items():
        if name in known:
            scores.nll[name] = known[name]
        else:
            cache.put(arm, scores.nll[name])
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
                         seed: int, progress=None, lens_options: dict | None = None,
                         cache: ArmCache | None = None,
                         where: dict | None = None) -> tuple[dict, dict]:
    """Score and summarize. Returns ``(results, raw)``: the JSON-ready results (per level
    ``lK`` blocks, ``variants``, ``distance``) and the raw :class:`LevelScores`. ``cache``
    and ``where``: see :func:`score_level`."""
    levels = {level: score_level(lm, corpus, windows[level], level, compressor,
                                 baseline_compressors(lm, cfg.windows.span), cfg, progress,
                                 lens_options, cache, where)
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
