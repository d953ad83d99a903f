"""Long range: old context beyond the base model's trained length, replaced by gists.

Axes: ``n`` windows, ``L`` window tokens, ``H`` scored tokens (the horizon), ``C`` old-context
tokens, ``T`` stream tokens.

Few documents are 16–32k tokens long, so the evaluated documents are laid back to back as one
stream (what a memory would ingest; by default with the tokenizer's end-of-sequence id between
documents, as ``megacontext ingest`` does) and, for each old-context length ``C``,
``plan.num_windows`` windows ``[old context C | raw tail | horizon H]`` are cut from it, evenly
spaced. Every window is scored on the same ``H`` horizon tokens under:

- ``truncated``: the tail only; ``sink``: the window's first 4 tokens + the tail;
- ``gist_l1``: the old context replaced by ``C/32`` L1 gists; ``gist_l2``: by ``C/1024`` L2
  gists (made from L1 gists), each at its span's center;
- ``mixed@W``: the working context the focus allocator picks (``plan.scorer``) under a budget
  of ``W`` entries from a memory tree holding old context + tail (level ``max(levels)``), for
  each W of ``plan.mixed_budget``;
- ``streaming@W``: StreamingLLM at the same W entries: the window's first ``sink_tokens``
  tokens + the most recent ones, at consecutive positions (cache ranks) under the model's own
  RoPE (no scaling: its positions stay below W + H); ``recent@W``: the last W tokens before
  the horizon at their true positions (under the window's RoPE, as ``truncated``);
- ``full``: every token, only for windows of at most ``plan.full_max_tokens`` tokens.

All conditions of one window but ``streaming@W`` use one RoPE: the model's with
``plan.rope`` overrides, ``auto`` resolved once from the window's length (NTK with the factor
the next power of two of ``L / trained length`` above the trained length, no scaling below
it; ``rope.resolve``).
Without ``full`` there is no recovery; the gains against ``truncated`` and ``sink`` are the
honest comparison then.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from megacontext import substitution as sub
from megacontext.data import TokenCorpus, WindowLayout
from megacontext.evaluation.arms import ArmCache, windows_digest
from megacontext.evaluation.config import LongRangePlan, MixedPlan
from megacontext.evaluation.render import error_bar, figure, interval, number, verdict
from megacontext.evaluation.stats import recovery, resample, summarize
from megacontext.evaluation.substitutability import concrete, mixed_window, variant_rope
from megacontext.gistnet import Compressor
from megacontext.rope import RopeConfig
from megacontext.spans import SPAN, node_size

SINK_TOKENS = 4  # default; the evaluation passes substitutability.sink_tokens
REFERENCES = ("truncated", "sink")  # the baselines every other condition is compared with
EOS = "eos"  # separator: the tokenizer's end-of-sequence id between documents


# -- the stream --------------------------------------------------------------------------------

class DocumentStream:
    """Corpus documents ``docs`` (indices, in the given order) laid back to back, optionally
    with a ``separator`` token between consecutive documents; read without concatenating the
    whole stream.

    Attributes:
        starts: int64 ``[len(docs)]`` stream offset of each document's first token.
        total: stream length in tokens (T).
    """

    def __init__(self, corpus: TokenCorpus, docs, separator: int | None = None) -> None:
        self.corpus = corpus
        self.docs = np.asarray(docs, dtype=np.int64).reshape(-1)
        self.separator = None if separator is None else int(separator)
        lengths = np.asarray(corpus.doc_lengths, dtype=np.int64)[self.docs]
        gap = 0 if self.separator is None else 1
        self.lengths = lengths
        self.starts = np.concatenate([[0], np.cumsum(lengths + gap)[:-1]]).astype(np.int64) \
            if lengths.size else np.zeros(0, dtype=np.int64)
        self.total = int(lengths.sum() + gap * max(lengths.size - 1, 0))

    def _overlapping(self, start: int, stop: int) -> np.ndarray:
        """Positions in ``docs`` of the documents with a token in ``[start, stop)``."""
        ends = self.starts + self.lengths
        return np.flatnonzero((self.starts < stop) & (ends > start))

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """int64 ``[stop − start]`` stream tokens."""
        if not 0 <= start <= stop <= self.total:
            raise ValueError(f"[{start}, {stop}) is outside the stream of {self.total} tokens")
        out = np.empty(stop - start, dtype=np.int64)
        if self.separator is not None:
            out.fill(self.separator)  # every stream token outside a document is a separator
        for j in self._overlapping(start, stop).tolist():
            a = max(start, int(self.starts[j]))
            b = min(stop, int(self.starts[j] + self.lengths[j]))
            doc = self.corpus.doc(int(self.docs[j]))
            out[a - start:b - start] = doc[a - int(self.starts[j]):b - int(self.starts[j])]
        return out

    def names(self, start: int, stop: int) -> list[str]:
        """Names of the documents with a token in ``[start, stop)``, in stream order."""
        return [self.corpus.names[int(self.docs[j])]
                for j in self._overlapping(start, stop).tolist()]


def window_starts(total: int, length: int, count: int) -> list[int]:
    """``count`` starts of ``length``-token windows evenly spaced over ``total`` tokens: window
    ``i`` is centered on ``(i + 1/2)·total/count`` (clipped to the stream), so the windows do not
    overlap whenever ``count · length <= total``.

    Raises:
        ValueError: the stream is shorter than one window.
    """
    if count < 1:
        raise ValueError(f"count={count} must be >= 1")
    if total < length:
        raise ValueError(f"the stream has {total} tokens, shorter than one window of {length}")
    return [min(max(((2 * i + 1) * total - count * length) // (2 * count), 0), total - length)
            for i in range(count)]


def layout(plan: LongRangePlan, context: int, level: int) -> WindowLayout:
    """The level-``level`` window of old-context length ``context``."""
    return WindowLayout(level=level, num_gists=context // node_size(level, SPAN),
                        tail=plan.tail_tokens, horizon=plan.horizon, span=SPAN)


def conditions(plan: LongRangePlan, context: int) -> list[str]:
    """The conditions scored for windows of old-context length ``context``, in order."""
    out = ["truncated", "sink"] + [f"gist_l{k}" for k in sorted(set(plan.levels))]
    for budget in plan.mixed_budget:
        out += [f"streaming@{budget}", f"recent@{budget}", f"mixed@{budget}"]
    if context + plan.tail_tokens + plan.horizon <= plan.full_max_tokens:
        out.append("full")
    return out


def _separator(lm, separator) -> int | None:
    if separator == EOS:
        return getattr(getattr(lm, "tokenizer", None), "eos_id", None)
    return None if separator is None else int(separator)


def _check(compressor: Compressor, plan: LongRangePlan) -> None:
    problems = []
    top = max(plan.levels, default=0)
    served = getattr(getattr(compressor, "cfg", None), "levels", None)
    if served is not None and top > served:
        problems.append(f"the compressor serves levels 1..{served}, the plan needs level {top} "
                        f"(levels={list(plan.levels)})")
    if plan.mixed_budget:
        if not plan.levels:
            problems.append("mixed_budget > 0 needs at least one level")
        for c, budget in itertools.product(plan.context_tokens, plan.mixed_budget):
            nodes = c // node_size(top, SPAN)  # context_tokens are multiples of an L2 node
            least = nodes + plan.tail_tokens
            if plan.levels and budget < least:
                problems.append(f"mixed_budget {budget} is below the coarsest working "
                                f"context of a {c}-token old context ({nodes} L{top} "
                                f"gists + {plan.tail_tokens} raw tail = {least} entries)")
    if problems:
        raise ValueError("long range: " + "; ".join(problems))


# -- scoring -----------------------------------------------------------------------------------

def independent(cond: str) -> bool:
    """Whether a long-range condition reads only the base model (not the GistNet)."""
    return cond in ("truncated", "sink", "full") or cond.startswith(("streaming@", "recent@"))


def score_long_window(lm, ids: torch.Tensor, plan: LongRangePlan, context: int,
                      compressor: Compressor, rope: RopeConfig,
                      names: list[str] | None = None, on_condition=None,
                      sink_tokens: int = SINK_TOKENS
                      ) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, float],
                                 dict[str, dict[int, int]]]:
    """One window ``ids [L]`` under every condition of ``names`` (default:
    ``conditions(plan, context)``).

    Returns ``(nll, seconds, entries, mixed_layouts)``: condition → float64 ``[H]``,
    condition → seconds, condition → working-context entries before the horizon, and each
    mixed context's entries per level (``mixed@W`` → ``{level: count}``). The mixed contexts
    of every budget come from one memory tree (its build is timed with the first).
    """
    names = conditions(plan, context) if names is None else names
    row = ids[None]  # [1, L]
    l1 = layout(plan, context, 1)
    nll, seconds, entries, mixed_layouts = {}, {}, {}, {}
    mixed: dict[str, torch.Tensor] = {}
    for cond in names:
        if on_condition is not None:
            on_condition(cond)
        t0 = time.perf_counter()
        if cond in ("truncated", "sink", "full") or cond.startswith(("streaming@", "recent@")):
            kind, _, budget = cond.partition("@")
            w = int(budget) if budget else None
            own = lm.config.rope if kind == "streaming" else rope  # ranks: the model's own
            out = sub.score_window(lm, row, l1, kind, rope=own, sink_tokens=sink_tokens,
                                   entries=w, reduction="none")[0]
            entries[cond] = long_entries(plan, context, cond, sink_tokens)
        elif cond.startswith("gist_l"):
            w = layout(plan, context, int(cond[len("gist_l"):]))
            out = sub.score_window(lm, row, w, "gist", compressor=compressor, rope=rope,
                                   reduction="none")[0]
            entries[cond] = w.num_gists + w.tail
        elif cond.startswith("mixed@"):
            if not mixed:
                w = layout(plan, context, max(plan.levels))
                budgets = tuple(int(c[len("mixed@"):]) for c in names if c.startswith("mixed@"))
                mplan = MixedPlan(budgets=budgets, levels=(w.level,), scorer=plan.scorer,
                                  tree_dtype="float32", positions=plan.positions)
                mixed, lays = mixed_window(lm, ids, w, compressor, mplan, rope=rope)
                mixed_layouts = {c: dict(v) for c, v in lays.items()}
            out = mixed[cond]
            entries[cond] = int(sum(mixed_layouts[cond].values()))
        else:
            raise ValueError(f"unknown long-range condition {cond!r}")
        seconds[cond] = time.perf_counter() - t0
        nll[cond] = out.detach().double().cpu().numpy()
    return nll, seconds, entries, mixed_layouts


def statistics(names: list[str]) -> dict:
    """The summary statistics of one context length: NLLs, gains against the references, and
    recovery where ``full`` was scored."""
    stats: dict = {f"nll_{c}": (lambda m, c=c: m[c]) for c in names}
    for c in names:
        if c != "truncated":
            stats[f"gain_{c}_vs_truncated"] = lambda m, c=c: m["truncated"] - m[c]
    for c in names:
        if c not in REFERENCES:
            stats[f"gain_{c}_vs_sink"] = lambda m, c=c: m["sink"] - m[c]
    for c in names:
        if c.startswith("mixed@"):
            w = c[len("mixed@"):]
            for ref in (f"streaming@{w}", f"recent@{w}"):
                if ref in names:
                    stats[f"gain_{c}_vs_{ref}"] = lambda m, c=c, r=ref: m[r] - m[c]
    if "full" in names:
        for c in names:
            if c not in ("truncated", "full"):
                stats[f"recovery_{c}"] = lambda m, c=c: recovery(m["truncated"], m[c], m["full"])
    return stats


def long_entries(plan: LongRangePlan, context: int, cond: str, sink_tokens: int) -> int:
    """Working-context entries before the horizon of a token-only condition."""
    kind, _, budget = cond.partition("@")
    return int(sub.kept_tokens(layout(plan, context, 1), kind, sink_tokens=sink_tokens,
                               entries=int(budget) if budget else None).numel() - plan.horizon)


def mean_layout(lays: list[dict[int, int]]) -> dict[str, float]:
    """Mean entries per level (``L2``, ``L1``, ``L0``) over windows."""
    levels = sorted({k for lay in lays for k in lay}, reverse=True)
    return {f"L{k}": float(np.mean([lay.get(k, 0) for lay in lays])) for k in levels}


@torch.inference_mode()
def run_long_range(lm, compressor: Compressor, corpus: TokenCorpus, docs: np.ndarray,
                   plan: LongRangePlan, *, seed: int, bootstrap: int = 1000, progress=None,
                   separator: int | str | None = EOS, sink_tokens: int = SINK_TOKENS,
                   cache: ArmCache | None = None, where: dict | None = None) -> dict:
    """Score and summarize the long-range windows; returns the JSON-ready ``long_range``
    section (layout in docs/evaluation.md, "Long range").

    Args:
        docs: corpus document indices laid back to back, in this order.
        seed: the bootstrap's seed (windows do not depend on it).
        bootstrap: resamples of the windows for the 95% intervals (0: none).
        progress: a truthy value shows a tqdm bar over the windows.
        separator: a token id between consecutive documents, ``"eos"`` (the tokenizer's
            end-of-sequence id, as ``megacontext ingest`` puts there) or None (none).
        cache: where the conditions that do not read the GistNet (truncated, sink, full,
            streaming@W, recent@W) are looked up and stored, keyed by the windows' token ids,
            the RoPE and the settings (:mod:`megacontext.evaluation.arms`); ``where``
            (corpus, split) joins the keys.

    Raises:
        ValueError: the stream is shorter than one window (names the lengths), the compressor
            does not serve a level of the plan, or the mixed budget cannot hold the coarsest
            cover.
    """
    from tqdm import tqdm

    _check(compressor, plan)
    stream = DocumentStream(corpus, docs, _separator(lm, separator))
    longest = max(plan.context_tokens) + plan.tail_tokens + plan.horizon
    if stream.total < longest:
        raise ValueError(
            f"the stream of {stream.docs.size} documents of corpus {corpus.name!r} has "
            f"{stream.total} tokens, shorter than one long-range window of {longest} tokens "
            f"(context {max(plan.context_tokens)} + tail {plan.tail_tokens} + horizon "
            f"{plan.horizon}); add documents or shorten context_tokens")
    base = variant_rope(lm.config.rope, plan.rope, lm.config.max_position)
    bar = tqdm(total=len(plan.context_tokens) * plan.num_windows, unit="window",
               desc="long range", file=sys.stderr, disable=not progress)
    by_length = []
    with bar:
        for context in plan.context_tokens:
            length = context + plan.tail_tokens + plan.horizon
            rope = concrete(base, length)
            names = conditions(plan, context)
            starts = window_starts(stream.total, length, plan.num_windows)
            windows = np.stack([stream.tokens(a, a + length) for a in starts])  # [n, L]
            arms = {c: {"long_range": c, "context_tokens": context, "tail": plan.tail_tokens,
                        "horizon": plan.horizon, "sink_tokens": sink_tokens,
                        "rope": lm.config.rope if c.startswith("streaming@") else rope,
                        "windows_sha256": windows_digest(windows), **(where or {})}
                    for c in names if independent(c)} if cache is not None else {}
            known = {c: v for c, arm in arms.items()
                     if (v := cache.get(arm, (len(starts), plan.horizon))) is not None}
            todo = [c for c in names if c not in known]
            per_token: dict[str, list[np.ndarray]] = defaultdict(list)
            seconds: dict[str, float] = defaultdict(float)
            entries: dict[str, list[int]] = defaultdict(list)
            layouts: dict[str, list[dict[int, int]]] = defaultdict(list)
            for row in windows:
                ids = torch.from_numpy(row)  # [L]
                nll, secs, ents, lays = score_long_window(
                    lm, ids, plan, context, compressor, rope, todo,
                    on_condition=lambda c, n=context: bar.set_postfix_str(f"{n:,} tokens: {c}"),
                    sink_tokens=sink_tokens)
                for c in todo:
                    per_token[c].append(nll[c])
                    seconds[c] += secs[c]
                for c in names:
                    entries[c].append(ents[c] if c in ents else long_entries(plan, context, c,
                                                                             sink_tokens))
                for c, lay in lays.items():
                    layouts[c].append(lay)
                bar.update(1)
            nll_windows = {c: np.stack(v) for c, v in per_token.items()}  # [n, H]
            for c, arm in arms.items():
                if c in known:
                    nll_windows[c] = known[c]
                else:
                    cache.put(arm, nll_windows[c])
            means = {c: nll_windows[c].mean(axis=1) for c in names}  # [n]
            idx = resample(len(starts), bootstrap, seed, f"long_range_{context}")
            summary = summarize(means, statistics(names), idx)
            block = {"context_tokens": context, "window_tokens": length,
                     "num_windows": len(starts),
                     "num_tokens_scored": len(starts) * plan.horizon,
                     "conditions": names,
                     **{k: v["value"] for k, v in summary.items()},
                     "ci95": {k: v["ci95"] for k, v in summary.items()},
                     "rope": {"scaling": rope.scaling, "factor": float(rope.factor)
                              if rope.scaling != "none" else 1.0},
                     "entries": {c: float(np.mean(v)) for c, v in entries.items()},
                     "seconds": {c: round(seconds[c], 3) for c in names},
                     "seconds_per_window": {c: round(seconds[c] / len(starts), 3)
                                            for c in names},
                     "nll_per_window": {c: [float(x) for x in means[c]] for c in names},
                     "windows": [[int(s), stream.names(s, s + length)] for s in starts]}
            if layouts:
                block["mixed_layouts"] = {c: mean_layout(lays) for c, lays in layouts.items()}
                block["mixed_layout"] = block["mixed_layouts"][f"mixed@{max(plan.mixed_budget)}"]
            by_length.append(block)
    return {"context_tokens": list(plan.context_tokens), "tail_tokens": plan.tail_tokens,
            "horizon": plan.horizon, "levels": list(plan.levels),
            "mixed_budget": list(plan.mixed_budget), "full_max_tokens": plan.full_max_tokens,
            "rope": dict(plan.rope) if plan.rope else None,
            "positions": plan.positions.as_dict(), "scorer": plan.scorer,
            "trained_length": int(lm.config.max_position),
            "documents": int(stream.docs.size), "stream_tokens": stream.total,
            "separator": stream.separator, "sink_tokens": sink_tokens,
            "bootstrap": bootstrap, "by_length": by_length}


# -- outputs -----------------------------------------------------------------------------------

def _label(cond: str) -> str:
    return {"gist_l1": "L1 gists", "gist_l2": "L2 gists"}.get(cond, cond)


def long_range_markdown(section: dict) -> str:
    """A table per context length: NLL of every condition [95% CI], and the gains against
    ``truncated`` and ``sink`` (positive: better than the reference)."""
    rope = section.get("rope") or {}
    # wall times are absent when the section was read back from substitutability.json (they
    # go to timing.json, so the JSON stays byte-identical between runs)
    timed = any("seconds_per_window" in b for b in section["by_length"])
    lines = [f"### Long range: old context beyond the trained length "
             f"({section['trained_length']:,} tokens)" if "trained_length" in section
             else "### Long range", "",
             f"{section['documents']} documents laid back to back; windows = old context + "
             f"{section['tail_tokens']} raw tail + {section['horizon']} scored tokens; NLL in "
             f"nats/token [95% bootstrap interval over windows]; RoPE overrides "
             f"{rope or 'none'}; gain = NLL(reference) − NLL(condition).", "",
             "| context | windows | RoPE | condition | entries | NLL | gain vs truncated "
             "| gain vs sink | recovery |" + (" s/window |" if timed else ""),
             "|--:|--:|---|---|--:|--:|--:|--:|--:|" + ("--:|" if timed else "")]
    for b in section["by_length"]:
        ci = b["ci95"]
        r = b["rope"]
        rope_text = r["scaling"] if r["scaling"] == "none" else f"{r['scaling']} ×{r['factor']:.2f}"
        for c in b["conditions"]:
            gains = []
            for ref in REFERENCES:
                k = f"gain_{c}_vs_{ref}"
                gains.append(interval(b[k], ci[k], sign=True) if k in b else "—")
            rk = f"recovery_{c}"
            rec = interval(b[rk], ci[rk], 2) if rk in b else "—"
            lines.append(f"| {b['context_tokens']:,} | {b['num_windows']} | {rope_text} | "
                         f"{_label(c)} | {b['entries'][c]:,.0f} | "
                         f"{interval(b[f'nll_{c}'], ci[f'nll_{c}'])} | {gains[0]} | {gains[1]} | "
                         f"{rec} |" + (f" {number(b['seconds_per_window'].get(c), 1)} |"
                                       if "seconds_per_window" in b else ""))
    verdicts = verdict_lines(section)
    if verdicts:
        lines += ["", "Memory against the sliding windows of the same entries (gain = "
                      "NLL(window) − NLL(mixed), paired over the windows):", "", *verdicts]
    return "\n".join(lines) + "\n"


def verdict_lines(section: dict) -> list[str]:
    """One line per (length, budget): ``mixed@W`` against ``streaming@W`` (and ``recent@W``),
    in words."""
    out = []
    for b in section["by_length"]:
        for c in b["conditions"]:
            if not c.startswith("mixed@"):
                continue
            w = c[len("mixed@"):]
            parts = []
            for ref in (f"streaming@{w}", f"recent@{w}"):
                k = f"gain_{c}_vs_{ref}"
                if k in b:
                    parts.append(f"vs {ref} {interval(b[k], b['ci95'][k], sign=True)}: "
                                 f"**{verdict(b[k], b['ci95'][k])}**")
            if parts:
                out.append(f"- {b['context_tokens']:,} old tokens, W = {int(w):,} "
                           f"({b['num_windows']} windows): " + "; ".join(parts))
    return out


COLORS = {"truncated": "tab:red", "sink": "tab:orange", "gist_l1": "tab:blue",
          "gist_l2": "tab:purple", "mixed": "tab:green", "full": "black",
          "streaming": "tab:brown", "recent": "tab:olive"}


def plot_long_range(section: dict, path) -> Path:
    """NLL per condition per context length with 95% CI error bars; ``truncated``, ``sink``
    (and ``full`` where scored) as reference lines across each length's group, their
    intervals shaded."""
    path = Path(path)
    blocks = section["by_length"]
    points = [c for c in dict.fromkeys(c for b in blocks for c in b["conditions"])
              if c not in (*REFERENCES, "full")]
    fig, (ax,) = figure(4.2 + 2.4 * len(blocks), 5.2)  # + the legend's column on the right
    step = 0.8 / max(len(points), 1)
    for i, b in enumerate(blocks):
        ci = b["ci95"]
        for c, style in (("truncated", "--"), ("sink", ":"), ("full", "-")):
            if c not in b["conditions"]:
                continue
            value, lo_hi = b[f"nll_{c}"], ci[f"nll_{c}"]
            label = {"truncated": "truncated (tail only)", "sink": "sink (4 first + tail)",
                     "full": "full context"}[c]
            ax.hlines(value, i - 0.45, i + 0.45, color=COLORS[c], ls=style, lw=1.5,
                      label=label if i == 0 else None)
            if lo_hi:
                ax.fill_between([i - 0.45, i + 0.45], lo_hi[0], lo_hi[1], color=COLORS[c],
                                alpha=0.12, lw=0)
        for j, c in enumerate(points):
            if c not in b["conditions"]:
                continue
            x = i + (j - (len(points) - 1) / 2) * step
            value = b[f"nll_{c}"]
            ax.errorbar(x, value, yerr=error_bar(value, ci[f"nll_{c}"]), marker="o", capsize=3,
                        color=COLORS.get(c.split("@")[0], "tab:gray"),
                        label=_label(c) if i == 0 else None)
            ax.annotate(f"{value:.2f}", (x, value), ha="left", va="bottom", fontsize=7,
                        xytext=(3, 2), textcoords="offset points")

    def tick(b: dict) -> str:
        r = b["rope"]
        rope = r["scaling"] if r["scaling"] == "none" else f"{r['scaling']} ×{r['factor']:.3g}"
        entries = "\n".join(f"{_label(c)}: {b['entries'][c]:,.0f} entries"
                             for c in b["conditions"] if c not in (*REFERENCES, "full"))
        return (f"{b['context_tokens']:,} old tokens, {b['num_windows']} windows\n"
                f"RoPE {rope}\n{entries}")

    ax.set_xticks(range(len(blocks)))
    ax.set_xticklabels([tick(b) for b in blocks], fontsize=8)
    ax.set_xlim(-0.6, len(blocks) - 0.4)
    ax.margins(y=0.15)
    ax.set_ylabel(f"NLL (nats/token, H = {section['horizon']})")
    positions = section.get("positions") or {"kind": "exact"}
    where = ("" if positions.get("kind", "exact") == "exact" else
             f"\nmixed@W at `{positions['kind']}` positions under the model's own RoPE")
    ax.set_title(f"Long range: old context replaced by gists (95% bootstrap CI){where}",
                 fontsize=9)
    # Beside the axes, not on them: inside, it covered the points of the last length.
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=130)
    return path
