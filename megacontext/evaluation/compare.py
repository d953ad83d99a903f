"""Paired A/B between GistNet exports: ``compare(cfg, a, b, *more) -> dict``, behind
``eval/compare.py``.

Axes: ``n`` windows, ``H`` scored tokens, ``D`` documents, ``B`` bootstrap resamples.

Both exports are scored on the very same windows (one corpus, one split, one layout) by the
evaluation's own pieces (:func:`run_substitutability`, :func:`run_long_range`); the conditions
that read the GistNet (``gist``, ``mixed@W``, ``mixed_<scorer>@W``, ``<variant>|gist``; long
range ``gist_lK`` and ``mixed@W``) are compared, the others (full, truncated, sink, constant,
mean pooling, streaming@W, recent@W, ...) must agree between the two runs: they are the proof
that the windows are the same. Each statistic is reported for A and B with the paired
difference B − A and its 95% percentile bootstrap interval; one set of resampled window
indices (or documents, for the ``_doc`` rows) serves A and B, so the interval is that of the
difference on the same windows. Passkey retrieval is not compared: a handful of binary trials
cannot be paired into an interval worth reading.

Writes into ``cfg.output_dir``: ``compare.json``, ``compare.md`` (the table), and
``A/substitutability.json`` and ``B/substitutability.json`` (each export's own results).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from megacontext.base import BaseLM
from megacontext.data import load_corpus
from megacontext.dtypes import TORCH_DTYPES
from megacontext.evaluation.checks import check_config
from megacontext.evaluation.config import MEAN
from megacontext.evaluation.evaluate import (
    SPLIT_KEYS,
    arm_cache,
    check_trained,
    evaluation_documents,
    load_compressor,
    needed_levels,
    write_json,
)
from megacontext.evaluation.long_range import independent as long_range_independent
from megacontext.evaluation.long_range import run_long_range
from megacontext.evaluation.render import interval, number, verdict
from megacontext.evaluation.stats import by_document, recovery, resample, summarize
from megacontext.evaluation.substitutability import evaluation_windows, run_substitutability
from megacontext.exports import read_export
from megacontext.gistnet import FORMAT_VERSION, META_FILE, WEIGHTS_FILE, gistnet_digest

log = logging.getLogger(__name__)

SIDES = ("A", "B")
ATOL = 1e-5  # GistNet-independent arms of A and B must agree to this (nats/token)

Stat = Callable[[Mapping[str, np.ndarray]], np.ndarray]


# -- which conditions read the GistNet -------------------------------------------------------

def gistnet_dependent(condition: str) -> bool:
    """Whether an in-window condition reads the GistNet: ``gist``, ``mixed@W``,
    ``mixed_<scorer>@W`` and ``<variant>|gist``; every other one (full, truncated, sink,
    constant, mean_pool*, streaming@W, recent@W, ``<variant>|full``, ...) reads only the base
    model."""
    return condition == "gist" or condition.startswith("mixed") or condition.endswith("|gist")


# -- the fingerprints ------------------------------------------------------------------------

def export_fingerprint(path: str) -> dict:
    """The ``base_fingerprint`` recorded in a GistNet export's ``gistnet.json`` (read and
    checked by the export reader, no weights loaded)."""
    return read_export(Path(path).expanduser(), META_FILE, WEIGHTS_FILE, "gistnet",
                       FORMAT_VERSION, None).get("base_fingerprint", {})


def check_same_base(a: str, b: str) -> dict:
    """A's fingerprint, when B's equals it.

    Raises:
        ValueError: the two exports were built for different base models; every differing
            field is named with both values.
    """
    fa, fb = export_fingerprint(a), export_fingerprint(b)
    differ = [k for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
    if differ:
        what = "; ".join(f"{k}: A {fa.get(k, '<unrecorded>')!r}, B {fb.get(k, '<unrecorded>')!r}"
                         for k in differ)
        raise ValueError(f"A ({a}) and B ({b}) were built for different base models "
                         f"(their base_fingerprint fields differ: {what}); a paired comparison "
                         f"needs two GistNets of one base model")
    return fa


# -- the pure part: raw scores -> paired differences ------------------------------------------

def _check_agree(what: str, a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray],
                 dependent: Callable[[str], bool]) -> list[str]:
    """The conditions of ``a`` and ``b`` that read the GistNet; raises when the others
    differ (set, shape or values)."""
    if set(a) != set(b):
        raise ValueError(f"{what}: A and B were scored under different conditions "
                         f"(only A: {sorted(set(a) - set(b))}, only B: {sorted(set(b) - set(a))})")
    for c in sorted(c for c in a if not dependent(c)):
        x, y = np.asarray(a[c], dtype=np.float64), np.asarray(b[c], dtype=np.float64)
        if x.shape != y.shape or not np.allclose(x, y, atol=ATOL, rtol=0.0):
            gap = float(np.max(np.abs(x - y))) if x.shape == y.shape else float("nan")
            raise ValueError(
                f"{what}: the GistNet-independent condition {c!r} differs between A and B "
                f"(shapes {x.shape} and {y.shape}, largest difference {gap:.3g} > {ATOL}): the "
                f"two were not scored on the same windows")
    return [c for c in a if dependent(c)]


def _sided(per_window: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``{"A:cond": [n], "B:cond": [n]}`` (independent conditions once, under A and B both)."""
    return {f"{s}:{c}": np.asarray(v, dtype=np.float64)
            for s in SIDES for c, v in per_window[s].items()}


def _view(m: Mapping[str, np.ndarray], side: str) -> dict[str, np.ndarray]:
    prefix = f"{side}:"
    return {k[len(prefix):]: v for k, v in m.items() if k.startswith(prefix)}


def paired_rows(per_window: Mapping[str, Mapping[str, np.ndarray]],
                statistics: Mapping[str, tuple[Stat, str]], indices: np.ndarray,
                suffix: str = "") -> list[dict]:
    """One row per statistic: A's and B's values, B − A and its interval, and a verdict.

    Args:
        per_window: ``{"A": condition → [n], "B": condition → [n]}`` per-window means.
        statistics: name → ``(function of condition → mean, "lower" | "higher")``, which
            side is better.
        indices: ``[B, n]`` resampled indices, one set for A, B and every statistic.
        suffix: appended to each name (``"_doc"``).
    """
    stats: dict[str, Stat] = {}
    for name, (fn, _) in statistics.items():
        stats[f"A|{name}"] = lambda m, fn=fn: fn(_view(m, "A"))
        stats[f"B|{name}"] = lambda m, fn=fn: fn(_view(m, "B"))
        stats[f"diff|{name}"] = lambda m, fn=fn: fn(_view(m, "B")) - fn(_view(m, "A"))
    summary = summarize(_sided(per_window), stats, indices)
    rows = []
    for name, (_, better) in statistics.items():
        diff, ci = summary[f"diff|{name}"]["value"], summary[f"diff|{name}"]["ci95"]
        sign = -1.0 if better == "lower" else 1.0  # a gain of B: > 0 when B is better
        word = verdict(None if diff is None else sign * diff,
                       None if ci is None else sorted([sign * ci[0], sign * ci[1]]), "B")
        rows.append({"statistic": name + suffix, "better": better,
                     "a": summary[f"A|{name}"]["value"], "b": summary[f"B|{name}"]["value"],
                     "diff": diff, "ci95": ci, "verdict": word})
    return rows


def level_statistics(level: int, conditions: list[str], names: set[str]) -> dict:
    """The per-level statistics: the NLL of each GistNet condition but ``mixed*`` (those go
    per budget), ``recovery_lK`` and ``content_recovery_lK`` of the gists."""
    k = f"l{level}"
    out: dict[str, tuple[Stat, str]] = {}
    for c in conditions:
        if not c.startswith("mixed"):
            name = f"nll_gist_{k}" if c == "gist" else f"nll_{c}"
            out[name] = (lambda m, c=c: m[c], "lower")
    if {"gist", "truncated", "full"} <= names:
        out[f"recovery_{k}"] = (lambda m: recovery(m["truncated"], m["gist"], m["full"]),
                                "higher")
    if {"gist", "constant", "full"} <= names:
        out[f"content_recovery_{k}"] = (lambda m: recovery(m["constant"], m["gist"], m["full"]),
                                        "higher")
    return out


def budget_statistics(budget: int, conditions: list[str], names: set[str]) -> dict:
    """One mixed budget's statistics: the NLL of ``mixed@W`` (and ``mixed_<scorer>@W``),
    ``gain_vs_streaming`` = NLL(streaming@W) − NLL(mixed@W) when streaming@W was scored."""
    out: dict[str, tuple[Stat, str]] = {}
    for c in conditions:
        if c.startswith("mixed") and c.endswith(f"@{budget}"):
            out[f"nll_{c.partition('@')[0]}"] = (lambda m, c=c: m[c], "lower")
    mixed, stream = f"mixed@{budget}", f"streaming@{budget}"
    if mixed in names and stream in names:
        out["gain_vs_streaming"] = (lambda m: m[stream] - m[mixed], "higher")
    return out


def _budgets(conditions: list[str]) -> list[int]:
    return sorted({int(c.rpartition("@")[2]) for c in conditions if c.startswith("mixed")})


def compare_level(level: int, a, b, *, seed: int, bootstrap: int) -> dict:
    """The paired rows of one window level from A's and B's :class:`LevelScores` (``.nll``
    condition → ``[n, H]``, ``.keys`` with ``.doc``).

    Raises:
        ValueError: A and B hold different windows, or a GistNet-independent condition differs.
    """
    what = f"level {level}"
    if list(a.keys) != list(b.keys):
        raise ValueError(f"{what}: A and B were scored on different windows")
    dependent = _check_agree(what, a.nll, b.nll, gistnet_dependent)  # every token compared
    means = {s: {c: np.asarray(v, dtype=np.float64).mean(axis=1) for c, v in x.nll.items()}
             for s, x in zip(SIDES, (a, b), strict=True)}  # [n] per condition
    names = set(means["A"])
    docs = np.array([key.doc for key in a.keys], dtype=np.int64)
    per_doc = {s: by_document(means[s], docs) for s in SIDES}  # [D] per condition
    n, d = docs.size, len(set(docs.tolist()))
    idx = resample(n, bootstrap, seed, f"l{level}")
    idx_doc = resample(d, bootstrap, seed, f"l{level}_doc")

    def rows(stats: dict) -> list[dict]:
        return paired_rows(means, stats, idx) + paired_rows(per_doc, stats, idx_doc, "_doc")

    return {"level": level, "num_windows": int(n), "num_documents": int(d),
            "conditions": dependent,
            "rows": rows(level_statistics(level, dependent, names)),
            "mixed": [{"budget": w, "rows": rows(budget_statistics(w, dependent, names))}
                      for w in _budgets(dependent)]}


def compare_long_range(a: dict, b: dict, *, seed: int, bootstrap: int) -> list[dict]:
    """Per context length, the NLL of each GistNet-dependent long-range condition (``gist_lK``,
    ``mixed@W``) for A and B, B − A and its interval over windows (the sections'
    ``nll_per_window``).

    Raises:
        ValueError: the sections hold different lengths or windows, or a GistNet-independent
            condition differs.
    """
    out = []
    blocks_a, blocks_b = a["by_length"], b["by_length"]
    if [x["context_tokens"] for x in blocks_a] != [x["context_tokens"] for x in blocks_b]:
        raise ValueError("long range: A and B were scored on different context lengths")
    for x, y in zip(blocks_a, blocks_b, strict=True):
        context = x["context_tokens"]
        what = f"long range, {context} old tokens"
        if x.get("windows") != y.get("windows"):
            raise ValueError(f"{what}: A and B were scored on different windows")
        per = {"A": x["nll_per_window"], "B": y["nll_per_window"]}
        dependent = _check_agree(what, per["A"], per["B"],
                                 lambda c: not long_range_independent(c))
        stats = {f"nll_{c}": (lambda m, c=c: m[c], "lower") for c in dependent}
        idx = resample(len(per["A"][dependent[0]]) if dependent else 0, bootstrap, seed,
                       f"long_range_{context}")
        out.append({"context_tokens": context, "num_windows": x["num_windows"],
                    "conditions": dependent, "rows": paired_rows(per, stats, idx)})
    return out


def paired_differences(raw_a: dict, raw_b: dict, *, seed: int, bootstrap: int) -> dict:
    """The JSON-ready paired comparison of two raw score sets.

    Args:
        raw_a, raw_b: ``{"levels": {k: LevelScores}, "long_range": section | None}``: the
            ``raw`` of :func:`run_substitutability` and the section of :func:`run_long_range`
            (its ``by_length[i]["nll_per_window"]``, condition → ``[n]``).
        seed, bootstrap: the resampling (as the evaluation's).

    Returns:
        ``{"levels": {"lK": {...rows, mixed}}, "long_range": [...] | None}``.

    Raises:
        ValueError: the two sets do not hold the same levels, windows or GistNet-independent
            scores (to 1e-5).
    """
    la, lb = raw_a["levels"], raw_b["levels"]
    if sorted(la) != sorted(lb):
        raise ValueError(f"A holds levels {sorted(la)}, B {sorted(lb)}")
    out: dict = {"levels": {f"l{k}": compare_level(k, la[k], lb[k], seed=seed,
                                                   bootstrap=bootstrap) for k in sorted(la)}}
    ra, rb = raw_a.get("long_range"), raw_b.get("long_range")
    if (ra is None) != (rb is None):
        raise ValueError("only one of A and B has a long-range section")
    out["long_range"] = None if ra is None else compare_long_range(ra, rb, seed=seed,
                                                                   bootstrap=bootstrap)
    return out


# -- running both exports ----------------------------------------------------------------------

PASSKEY_NOTE = ("passkey retrieval is not compared: a handful of binary trials per (length, "
                "depth) cannot be paired into an interval worth reading")


def _with_compressor(cfg: DictConfig, spec: str) -> DictConfig:
    out = cfg.copy()
    out.compressor = spec
    return out


def _check_inputs(cfg: DictConfig, specs: list[str]):
    """The settings of ``cfg`` (checked once per export, so every path is checked) and the
    base fingerprint of A paired with each other export; raises before any model loads."""
    for side, spec in zip(["A", *arm_labels(len(specs) - 1)], specs, strict=True):
        if spec == MEAN:
            raise ValueError(f"{side}={spec!r}: compare GistNet exports (<train run>/gistnet);"
                             f" the mean-pool baseline is in every evaluation's table")
    settings = check_config(_with_compressor(cfg, specs[0]))
    for spec in specs[1:]:
        check_config(_with_compressor(cfg, spec))
    mixed = settings.substitutability.mixed
    if mixed.budgets and "lens" in (mixed.scorer, mixed.compare):
        raise ValueError("substitutability.mixed with the lens scorer: a LensNet is trained for "
                         "one GistNet, so it cannot score both exports; compare with the "
                         "recency or similarity scorer")
    return settings, [check_same_base(specs[0], spec) for spec in specs[1:]]


def _score_export(lm, compressor, corpus, docs, windows, settings, cfg, cache, where, show,
                  label: str) -> tuple[dict, dict]:
    """``(results, raw)`` of one export: its substitutability results (with the long-range
    section) and ``{"levels": LevelScores, "long_range": section | None}``."""
    sub, long_cfg = settings.substitutability, settings.long_range
    total = sum(len(w) for w in windows.values()) + min(sub.distance.num_windows,
                                                        len(windows.get(1, [])))
    with tqdm(total=total, desc=f"substitutability {label}", unit="window", disable=not show,
              dynamic_ncols=True) as bar:
        results, raw = run_substitutability(lm, compressor, corpus, windows, sub,
                                            seed=int(cfg.seed), progress=bar.update,
                                            cache=cache, where=where)
    section = None
    if long_cfg.enabled:
        section = run_long_range(lm, compressor, corpus, docs, long_cfg, seed=int(cfg.seed),
                                 bootstrap=sub.bootstrap, progress=show,
                                 sink_tokens=sub.sink_tokens, cache=cache, where=where)
        for row in section["by_length"]:  # wall times: not results (the JSON stays exact)
            row.pop("seconds_per_window", None)
            row.pop("seconds", None)
        results["long_range"] = section
    return results, {"levels": raw["levels"], "long_range": section}


def arm_labels(count: int) -> list[str]:
    """The folder names of ``count`` compared exports: ``["B"]`` for one, else ``B1 … Bk``."""
    return ["B"] if count == 1 else [f"B{i}" for i in range(1, count + 1)]


def compare(cfg: DictConfig, a: str, b: str, *more: str) -> dict:
    """Score the GistNet exports ``a`` and ``b`` on the same windows as ``cfg`` configures
    (an ``eval`` config; ``compressor`` and the passkey test are ignored) and write
    ``compare.json``, ``compare.md`` and ``A/``, ``B/substitutability.json`` into
    ``cfg.output_dir``. Returns ``compare.json``'s content.

    With more exports (``compare(cfg, a, b, c, ...)``: an ablation against one reference) A is
    scored once and every other export is paired with it on the same windows: ``B1/``, ``B2/``,
    ... each hold that export's ``substitutability.json`` and its ``compare.json`` /
    ``compare.md`` against A; the top-level ``compare.md`` is one table (statistics down, arms
    across, B_i − A with its interval) and ``compare.json`` holds ``{"arms": [report, ...]}``,
    which is returned.

    Raises:
        ValueError: a bad config, an export that is not a GistNet export, two exports of
            different base models (every differing fingerprint field named), an export that
            does not fit the configured model, untrained levels (unless allowed), two exports
            that select different documents, or GistNet-independent scores that differ.
    """
    specs = [str(a), str(b), *(str(m) for m in more)]
    labels = ["A", *arm_labels(len(specs) - 1)]
    settings, fingerprints = _check_inputs(cfg, specs)
    sub = settings.substitutability
    settings = settings._replace(passkey=dataclasses.replace(settings.passkey, enabled=False))
    torch.manual_seed(int(cfg.seed))
    out = Path(str(cfg.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    show = bool(cfg.get("progress_bar", True))
    allow = bool(cfg.get("allow_untrained_levels", False))

    lm = BaseLM.load(cfg.model.name, dtype=TORCH_DTYPES[cfg.model.dtype])
    levels = needed_levels(settings)
    compressors, untrained = {}, {}
    for side, spec in zip(labels, specs, strict=True):
        compressors[side] = load_compressor(spec, lm, max(levels), sub.windows.span,
                                            untrained_upper=cfg.get("upper_levels") == "untrained")
        untrained[side] = check_trained(compressors[side], spec, levels, allow)
    data = cfg.data
    corpus = load_corpus(data.corpus, lm.tokenizer, min_tokens=data.get("min_tokens"),
                         cache_dir=data.get("cache_dir"), text_field=data.get("text_field", "text"),
                         source=data.get("source"), progress=False)
    split_name = str(cfg.get("split", "auto"))
    selected = [evaluation_documents(corpus, data, split_name, s) for s in specs]
    docs, split = selected[0]
    for side, (docs_b, split_b) in zip(labels[1:], selected[1:], strict=True):
        if not np.array_equal(docs, docs_b):
            raise ValueError(f"A and {side} select different documents with split={split_name} "
                             f"(A: {split['label']}, {side}: {split_b['label']}); set "
                             f"split=test, validation or all")
    windows = evaluation_windows(corpus, docs, sub.windows)
    log.info("comparing %s with %s (A) on %s (%s, %d documents): %s",
             ", ".join(f"{s} ({side})" for side, s in zip(labels[1:], specs[1:], strict=True)),
             specs[0], corpus.name, split["label"], docs.size,
             ", ".join(f"{len(w)} level-{k} windows" for k, w in windows.items()))

    cache = arm_cache(cfg, lm)
    where = {"corpus": corpus.name, "split": {k: split[k] for k in ("split", *SPLIT_KEYS)}}
    common = {"model": lm.config.name, "corpus": corpus.name, "split": split,
              "evaluated_documents": int(docs.size), "seed": int(cfg.seed),
              "bootstrap": sub.bootstrap, "horizon": sub.windows.horizon}
    exports, raws = {}, {}
    for side, spec in zip(labels, specs, strict=True):
        results, raws[side] = _score_export(lm, compressors[side], corpus, docs, windows,
                                            settings, cfg, cache, where, show, side)
        exports[side] = {"path": spec, "digest": gistnet_digest(compressors[side]),
                         "training_record": getattr(compressors[side], "training_record", None),
                         "untrained_levels": untrained[side]}
        (out / side).mkdir(exist_ok=True)
        write_json(out / side / "substitutability.json",
                   {**common, "compressor": spec, "compressor_digest": exports[side]["digest"],
                    "training_record": exports[side]["training_record"],
                    "untrained_levels": untrained[side], **results})
    reports = []
    for side, (_, split_b), fingerprint in zip(labels[1:], selected[1:], fingerprints,
                                               strict=True):
        diffs = paired_differences(raws["A"], raws[side], seed=int(cfg.seed),
                                   bootstrap=sub.bootstrap)
        report = {"a": exports["A"], "b": exports[side], **common,
                  "split_b": split_b if split_b != split else None,
                  "base_fingerprint": fingerprint,
                  "num_windows": {**{f"l{k}": len(w) for k, w in windows.items()},
                                  "long_range": None if diffs["long_range"] is None else {
                                      str(x["context_tokens"]): x["num_windows"]
                                      for x in diffs["long_range"]}},
                  "passkey": PASSKEY_NOTE, **diffs}
        where_to = out if len(labels) == 2 else out / side
        write_json(where_to / "compare.json", report)
        report = json.loads((where_to / "compare.json").read_text())  # exactly what was written
        (where_to / "compare.md").write_text(compare_markdown(report))
        reports.append(report)
    if len(reports) == 1:
        log.info("comparison written to %s (compare.json, compare.md, A/, B/)", out.resolve())
        return reports[0]
    write_json(out / "compare.json", {"arms": reports})
    (out / "compare.md").write_text(arms_markdown(reports, labels[1:]))
    log.info("comparisons written to %s (compare.json, compare.md; A/ and %s/ with each "
             "arm's compare.json)", out.resolve(), "/, ".join(labels[1:]))
    return {"arms": reports}


# -- the table ---------------------------------------------------------------------------------

def _row(label: str, r: dict) -> str:
    digits = 2 if "recovery" in r["statistic"] else 3
    return (f"| {label} | {number(r['a'], digits)} | {number(r['b'], digits)} | "
            f"{interval(r['diff'], r['ci95'], digits, sign=True)} | **{r['verdict']}** |")


HEADER = ["| statistic | A | B | B − A [95% CI] | verdict |", "|---|--:|--:|--:|---|"]


def compare_markdown(report: dict) -> str:
    """``compare.md``: A's and B's value, B − A with its paired 95% interval and a verdict,
    per level (and mixed budget) and per long-range context length."""
    a, b = report["a"], report["b"]
    lines = ["## Paired A/B: two GistNets on the same windows", "",
             f"- A: `{a['path']}` (digest {a['digest'][:12]})",
             f"- B: `{b['path']}` (digest {b['digest'][:12]})",
             f"- {report['model']} on {report['corpus']} ({report['split']['label']}); "
             f"seed {report['seed']}, {report['bootstrap']} bootstrap resamples", "",
             "NLL in nats/token over the same scored tokens (lower is better), recoveries "
             "(higher is better). B − A with its 95% percentile bootstrap interval, paired: one "
             "set of resampled windows (`_doc`: documents, each weighing once) serves A and B. "
             "**B better** / **B worse** when the interval excludes 0, **tie** when it holds "
             f"it. Passkey: {report['passkey']}."]
    for key, block in report["levels"].items():
        lines += ["", f"### {key.upper()} ({block['num_windows']} windows, "
                      f"{block['num_documents']} documents)", "", *HEADER]
        lines += [_row(f"`{r['statistic']}`", r) for r in block["rows"]]
        for m in block["mixed"]:
            lines += [_row(f"W = {m['budget']}: `{r['statistic']}`", r) for r in m["rows"]]
    for block in report.get("long_range") or []:
        lines += ["", f"### Long range: {block['context_tokens']:,} old tokens "
                      f"({block['num_windows']} windows)", "", *HEADER]
        lines += [_row(f"`{r['statistic']}`", r) for r in block["rows"]]
    return "\n".join(lines) + "\n"


def _sections(report: dict) -> list[tuple[str, list[tuple[str, dict]]]]:
    """``[(heading, [(row label, row), ...]), ...]`` of one report, in table order."""
    out = []
    for key, block in report["levels"].items():
        rows = [(f"`{r['statistic']}`", r) for r in block["rows"]]
        rows += [(f"W = {m['budget']}: `{r['statistic']}`", r)
                 for m in block["mixed"] for r in m["rows"]]
        out.append((f"{key.upper()} ({block['num_windows']} windows, "
                    f"{block['num_documents']} documents)", rows))
    for block in report.get("long_range") or []:
        out.append((f"Long range: {block['context_tokens']:,} old tokens "
                    f"({block['num_windows']} windows)",
                    [(f"`{r['statistic']}`", r) for r in block["rows"]]))
    return out


def arms_markdown(reports: list[dict], labels: list[str]) -> str:
    """The top-level ``compare.md`` of several arms against one A: per section, one row per
    statistic with A's value and, per arm, B_i − A with its paired 95% interval (**bold** when
    the interval excludes 0; every arm's own table is in its folder)."""
    a = reports[0]["a"]
    lines = ["## Paired arms: GistNets against one reference on the same windows", "",
             f"- A: `{a['path']}` (digest {a['digest'][:12]})"]
    lines += [f"- {label}: `{r['b']['path']}` (digest {r['b']['digest'][:12]})"
              for label, r in zip(labels, reports, strict=True)]
    first = reports[0]
    lines += [f"- {first['model']} on {first['corpus']} ({first['split']['label']}); seed "
              f"{first['seed']}, {first['bootstrap']} bootstrap resamples", "",
              "Each cell is B_i − A with its 95% percentile bootstrap interval, paired on the "
              "same windows (NLL: lower is better; recoveries and gains: higher is better); "
              "**bold** where the interval excludes 0. Each arm's full table: `B<i>/compare.md`."]
    per_arm = [dict(_sections(r)) for r in reports]
    for heading, rows in _sections(first):
        lines += ["", f"### {heading}", "",
                  "| statistic | A | " + " | ".join(f"{x} − A" for x in labels) + " |",
                  "|---|--:|" + "--:|" * len(labels)]
        for label, row in rows:
            cells = []
            for sections in per_arm:
                r = dict(sections.get(heading, [])).get(label)
                if r is None:
                    cells.append("n/a")
                    continue
                text = interval(r["diff"], r["ci95"], 2 if "recovery" in r["statistic"] else 3,
                                sign=True)
                cells.append(f"**{text}**" if r["verdict"] not in ("tie", "no interval")
                             else text)
            digits = 2 if "recovery" in row["statistic"] else 3
            lines.append(f"| {label} | {number(row['a'], digits)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- the command line --------------------------------------------------------------------------

def split_argv(argv: list[str]) -> tuple[str, list[str], str, list[str]]:
    """``(A, [B, ...], config name, overrides)`` of ``eval/compare.py``'s arguments: the
    entries without ``=`` are the exports (the first is A, the reference), ``--config-name X``
    (``-cn X``, ``--config-name=X``) picks the config (``eval`` by default), the rest are Hydra
    overrides.

    Raises:
        ValueError: fewer than two exports, or ``--config-name`` without a value.
    """
    name, exports, overrides = "eval", [], []
    args = iter(argv)
    for arg in args:
        if arg in ("--config-name", "-cn"):
            name = next(args, None)
            if name is None:
                raise ValueError(f"{arg} needs a config name (e.g. eval_quick)")
        elif arg.startswith("--config-name="):
            name = arg.partition("=")[2]
        elif "=" in arg:
            overrides.append(arg)
        else:
            exports.append(arg)
    if len(exports) < 2:
        raise ValueError(f"expected two or more GistNet exports (A, then B ...) before the "
                         f"overrides, got {exports}: python eval/compare.py A B [C ...] "
                         f"[key=value ...]")
    return exports[0], exports[1:], name, overrides


__all__ = ["arm_labels", "arms_markdown", "compare", "compare_markdown", "gistnet_dependent",
           "paired_differences", "paired_rows", "split_argv"]
