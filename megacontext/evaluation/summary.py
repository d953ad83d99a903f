"""Scores of a level's windows and their summaries: the ``lK`` blocks of
``substitutability.json``, the variants and the per-distance breakdown.

Axes: ``n`` windows, ``H`` scored tokens, ``D`` documents.

Every statistic is a function of condition → mean NLL (:mod:`megacontext.evaluation.stats`),
taken twice: over windows (the headline keys, as before) and **document-balanced** (the same
key with ``_doc``): each document's windows are averaged first, every document weighs once,
and the bootstrap resamples documents (docs/evaluation.md, "Document-balanced numbers").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from megacontext.data import TokenCorpus, WindowKey, WindowLayout
from megacontext.evaluation.config import SubstitutabilityConfig
from megacontext.evaluation.stats import by_document, recovery, resample, summarize
from megacontext.spans import centers


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


def distance_buckets(window: WindowLayout, buckets: int) -> list[np.ndarray]:
    """Groups of neighbouring node indices, nearest to the scored tokens first."""
    order = np.arange(window.num_gists)[::-1]
    return [np.sort(group) for group in np.array_split(order, buckets)]


# -- summaries --------------------------------------------------------------------------------

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


def balanced(per_window: dict[str, np.ndarray], docs: np.ndarray, statistics: dict,
             idx: np.ndarray, idx_doc: np.ndarray) -> tuple[dict, dict]:
    """``(values, ci95)`` of ``statistics`` over windows and, with the suffix ``_doc``,
    document-balanced (per-document means, documents resampled by ``idx_doc``)."""
    values, cis = _flatten(summarize(per_window, statistics, idx))
    v_doc, c_doc = _flatten(summarize(by_document(per_window, docs), statistics, idx_doc))
    values.update({f"{k}_doc": v for k, v in v_doc.items()})
    cis.update({f"{k}_doc": c for k, c in c_doc.items()})
    return values, cis


def mixed_statistics(budget: int, compare: str | None, names=()) -> dict:
    """The statistics of one budget's entry of an ``lK`` block's ``mixed`` list: the mixed
    context against full and truncated, and against the two sliding windows of the same
    entries (``streaming@W``: sinks + recent tokens at cache ranks; ``recent@W``: the last W
    tokens at their true positions; its statistics only when ``names``, the scored
    conditions, hold it); gains are NLL(baseline) − NLL(mixed), > 0: memory better."""
    name, stream, recent = f"mixed@{budget}", f"streaming@{budget}", f"recent@{budget}"
    stats = {
        "nll": lambda m: m[name],
        "delta_nll": lambda m: m[name] - m["full"],
        "recovery": lambda m: recovery(m["truncated"], m[name], m["full"]),
        "nll_streaming": lambda m: m[stream],
        "delta_nll_streaming": lambda m: m[stream] - m["full"],
        "recovery_streaming": lambda m: recovery(m["truncated"], m[stream], m["full"]),
        "gain_vs_streaming": lambda m: m[stream] - m[name],
    }
    if recent in names:
        stats.update({
            "nll_recent": lambda m: m[recent],
            "delta_nll_recent": lambda m: m[recent] - m["full"],
            "recovery_recent": lambda m: recovery(m["truncated"], m[recent], m["full"]),
            "gain_vs_recent": lambda m: m[recent] - m[name]})
    if compare is not None:
        other = f"mixed_{compare}@{budget}"
        stats["nll_compare"] = lambda m: m[other]
        stats["gain_vs_compare"] = lambda m: m[other] - m[name]
    return stats


def summarize_level(scores: LevelScores, cfg: SubstitutabilityConfig, corpus: TokenCorpus,
                    seed: int) -> dict:
    """The ``lK`` block of ``substitutability.json``."""
    level, window, plan = scores.level, scores.window, cfg.windows
    n = len(scores.keys)
    docs = np.array([key.doc for key in scores.keys], dtype=np.int64)
    idx = resample(n, cfg.bootstrap, seed, f"l{level}")
    idx_doc = resample(len(set(docs.tolist())), cfg.bootstrap, seed, f"l{level}_doc")
    values, cis = balanced(_means(scores, window.horizon), docs, level_statistics(level), idx,
                           idx_doc)
    block = {**values,
             "num_windows": n,
             "num_documents": len(set(docs.tolist())),
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
            v, c = balanced(means, docs, mixed_statistics(budget, cfg.mixed.compare, means), idx,
                            idx_doc)
            layout = scores.layouts[name]
            if cfg.mixed.compare is not None:
                v["entries_compare"] = float(sum(scores.layouts[
                    f"mixed_{cfg.mixed.compare}@{budget}"].values()))
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


