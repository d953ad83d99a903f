"""The oracle read-out: is passkey retrieval from memory limited by focus or by read-out?

An oracle focus puts the needle's tokens raw into the working context; does the model then
answer? For each memory length, depth and key (the passkey test's protocol, :mod:`passkey`),
the memory is built once per condition through the given GistNet and asked under working
contexts that all hold the needle raw:

- ``fill@W``: the needle's path expanded first, the rest of the budget ``W`` by recency;
- ``minimal``: the coarsest cover with only the needle's path expanded (and the raw tail):
  the fewest gist entries any context holding the needle raw can have (budget: the largest W);
- ``recency@W`` (no oracle): what the recency scorer alone gives, for comparison;
- ``full``: every token raw (no memory), for lengths within the model's trained length;
- ``truncated@W``: the last W tokens of memory + question raw at their own positions, the
  model's own RoPE (no memory, no gists);
- ``truncated-ntk@W``: the same tokens under the RoPE a memory of this length resolves to
  (``auto``: NTK with the smallest power-of-two factor covering the extent) — the rotation
  alone, without a single gist.

Every memory condition (fill, minimal, recency) runs under each read-time position rule given
(``exact``: true positions under ``rope``; ``compact``, ``grouped``, ``single``:
:mod:`megacontext.positions`, the model's own RoPE) and is named ``condition|rule``.

The entry point is ``eval/readout.py`` (the eval_passkey config, the model and the filler);
the measurements are in docs/focus.md ("What limits retrieval past 16k: the read-out, not the
focus" and "Read-time positions: the read-out past the trained length") and docs/design.md
("Read-time positions"); their JSON in
``docs/readout-probe.json``, ``docs/readout-positions.json`` and
``docs/readout-positions-1m.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from megacontext.allocator import FocusAllocator
from megacontext.allocator.scorers import RecencyScorer
from megacontext.data.needles import answer_is, make_example
from megacontext.evaluation.config import PasskeyConfig
from megacontext.evaluation.passkey import greedy
from megacontext.gistnet import gistnet_digest
from megacontext.positions import PositionRule
from megacontext.rope import RopeConfig, resolve
from megacontext.spans import node_size

CONDITIONS = ("fill", "minimal", "recency", "full", "truncated", "truncated-ntk")
PER_BUDGET = ("fill", "recency", "truncated", "truncated-ntk")  # one condition per budget W
NO_MEMORY = ("full", "truncated", "truncated-ntk")  # raw tokens: no memory, no position rule


class NeedleOracle:
    """Nodes overlapping the needle's tokens ``[start, end)`` score above everything; the rest
    by recency."""

    needs_query = False

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.recency = RecencyScorer()

    def score(self, ctx, level: int, indices: np.ndarray) -> np.ndarray:
        size = node_size(level, ctx.span)
        lo, hi = indices * size, (indices + 1) * size
        hit = (lo < self.end) & (hi > self.start)
        return np.where(hit, 1e9, self.recency.score(ctx, level, indices))


def condition_names(conditions: Sequence[str], budgets: Sequence[int],
                    positions: Sequence[str]) -> list[str]:
    """The measured conditions in order: ``fill@256|exact``, ``minimal|compact``,
    ``truncated@256``, ``full``, … (one per budget where it has one, one per position rule
    where it reads a memory)."""
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad:
        raise ValueError(f"conditions {bad} are not among {list(CONDITIONS)}")
    out = []
    for c in conditions:
        for b in (budgets if c in PER_BUDGET else [None]):
            name = c if b is None else f"{c}@{b}"
            out += [name] if c in NO_MEMORY else [f"{name}|{rule}" for rule in positions]
    return out


def run_readout(lm, compressor, filler: np.ndarray, pk: PasskeyConfig, *,
                budgets: Sequence[int] = (256, 1024),
                conditions: Sequence[str] = ("fill", "minimal", "recency"),
                positions: Sequence[str] = ("exact",), local: int = 4096, levels: int = 2,
                rope: RopeConfig | None = None, tail_tokens: int = 64, seed: int = 0,
                progress: Callable[[str], None] | None = print) -> dict:
    """Each (length, depth, trial) of ``pk`` asked under every condition (module docstring).

    Args:
        filler: the filler token stream (``filler_stream`` of the held-out documents).
        pk: lengths, depths, trials, digits, max_new_tokens and the templates.
        rope: the memory's RoPE under the ``exact`` rule (``None``: the model's own; ``auto``
            resolves per refocus from the context's extent); ``truncated-ntk`` resolves it at
            the memory's extent.
        local: ``positions.local`` of the rules other than exact.
        progress: called with each row as a JSON line.

    Returns:
        ``lengths``, ``depths``, ``budgets``, ``positions``, ``local``, ``conditions``,
        ``rows`` (one per trial and condition: key, condition, entries, gist_entries,
        needle_raw, answer, correct, and for the memory conditions the placed context's
        extent and the seconds) and ``table`` (``{condition: ["right/asked" per length]}``).
        Deterministic for ``seed``: each (length, depth, trial) draws its key
        and filler offset from ``default_rng([seed, i_length, i_depth, trial])``.
    """
    from megacontext.runtime import MemoryLM  # the runtime joins everything: import on use

    tok = lm.tokenizer
    question = np.asarray(tok.encode(pk.question.format()), dtype=np.int64)
    stop = tuple(t for t in (tok.eos_id,) if t is not None)
    new = int(pk.max_new_tokens)
    digest = gistnet_digest(compressor)
    names = condition_names(conditions, budgets, positions)
    rows = []
    for i, length in enumerate(pk.lengths):
        for j, depth in enumerate(pk.depths):
            for trial in range(pk.trials):
                rng = np.random.default_rng([int(seed), i, j, trial])
                key = str(int(rng.integers(10 ** (pk.digits - 1), 10 ** pk.digits)))
                ids, start = make_example(tok, filler, length, depth, key,
                                          int(rng.integers(0, filler.size)),
                                          intro=pk.intro, needle=pk.needle)
                needle = len(tok.encode(pk.needle.format(key=key)))  # as make_example has it
                oracle = NeedleOracle(start, start + needle)
                head = {"length": length, "depth": depth, "trial": trial, "key": key}
                for cond in names:
                    cond_rule, _, rule = cond.partition("|")
                    name, _, b = cond_rule.partition("@")
                    if name in NO_MEMORY:
                        seen = np.concatenate([ids, question])
                        if name == "full" and seen.size + new > lm.config.max_position:
                            continue
                        kept = seen if name == "full" else seen[-int(b):]
                        first = seen.size - kept.size
                        r = resolve(rope, float(seen.size + new)) \
                            if name == "truncated-ntk" and rope else None
                        text = tok.decode(greedy(lm, kept, first, new, stop, rope=r))
                        row = {**head, "condition": cond, "entries": int(kept.size),
                               "gist_entries": 0, "needle_raw": bool(start >= first),
                               "rope_factor": None if r is None else r.factor,
                               "answer": text, "correct": answer_is(text, key)}
                    else:
                        if name == "minimal":  # nothing but the needle's path is expanded
                            alloc = FocusAllocator(max(budgets), tail_tokens=tail_tokens,
                                                   scorer=oracle, expand_threshold=1e8)
                        else:
                            alloc = FocusAllocator(int(b), tail_tokens=tail_tokens,
                                                   scorer=oracle if name == "fill" else "recency")
                        t0 = time.perf_counter()
                        with MemoryLM(lm, compressor, alloc, levels=levels,
                                      gist_dtype="float16", refocus_every=32,
                                      gistnet_digest=digest, rope=rope,
                                      positions=PositionRule(rule, local=local)) as mem:
                            mem.feed(ids)
                            out = mem.generate(list(question), new, stop=stop)
                            wc = mem.context
                            wc_levels = np.asarray(wc.levels)
                            k = int(np.searchsorted(wc.starts, start, side="right")) - 1
                            extent = float(mem.read_positions.max()
                                           - mem.read_positions.min() + 1)
                        text = tok.decode(out)
                        row = {**head, "condition": cond, "entries": len(wc),
                               "gist_entries": int((wc_levels > 0).sum()),
                               "needle_raw": bool(wc_levels[k] == 0), "answer": text,
                               "extent": extent, "correct": answer_is(text, key),
                               "seconds": round(time.perf_counter() - t0, 2)}
                    rows.append(row)
                    if progress is not None:
                        progress(json.dumps(row))
    table = {c: [f"{sum(r['correct'] for r in rows if r['condition'] == c and r['length'] == n)}"
                 f"/{sum(r['condition'] == c and r['length'] == n for r in rows)}"
                 for n in pk.lengths] for c in names}
    return {"lengths": list(pk.lengths), "depths": list(pk.depths), "budgets": list(budgets),
            "positions": list(positions), "local": local, "conditions": names, "rows": rows,
            "table": table}


def render_table(result: dict) -> str:
    """The markdown table: right answers per condition and memory length, and the mean number
    of gist entries."""
    lengths = result["lengths"]
    lines = ["| condition | " + " | ".join(str(n) for n in lengths) + " | gist entries (mean) |",
             "|---|" + "--:|" * (len(lengths) + 1)]
    for cond, cells in result["table"].items():
        g = [r["gist_entries"] for r in result["rows"] if r["condition"] == cond] or [0]
        lines.append(f"| {cond} | " + " | ".join(cells) + f" | {np.mean(g):.0f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Accuracy per condition (rows) × length and depth (columns), one cell per (length,
    depth) with its count of right answers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    conds = list(dict.fromkeys(r["condition"] for r in rows))
    cols = [(n, d) for n in result["lengths"] for d in result["depths"]]
    acc = np.full((len(conds), len(cols)), np.nan)
    text = [["" for _ in cols] for _ in conds]
    for i, c in enumerate(conds):
        for j, (n, d) in enumerate(cols):
            cell = [r["correct"] for r in rows
                    if r["condition"] == c and r["length"] == n and r["depth"] == d]
            if cell:
                acc[i, j] = np.mean(cell)
                text[i][j] = f"{sum(cell)}/{len(cell)}"
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(cols), 0.9 + 0.45 * len(conds)))
    ax.imshow(acc, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i in range(len(conds)):
        for j in range(len(cols)):
            ax.text(j, i, text[i][j] or "–", ha="center", va="center", fontsize=8,
                    color="white" if acc[i, j] < 0.5 else "black")
    ax.set_yticks(range(len(conds)), conds)
    ax.set_xticks(range(len(cols)), [f"{n // 1024}k\n{d:g}" for n, d in cols], fontsize=8)
    for j in range(1, len(result["lengths"])):
        ax.axvline(j * len(result["depths"]) - 0.5, color="white", lw=2)
    ax.set_xlabel("memory length / needle depth")
    rope = result.get("rope_scaling", "auto")
    ax.set_title(f"passkey answers right (fill, minimal: the needle raw by an oracle)\nRoPE "
                 f"{rope} (exact rule), GistNet {Path(str(result['compressor'])).parent.name}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
