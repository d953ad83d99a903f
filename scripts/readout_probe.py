"""Is passkey retrieval from memory limited by focus or by read-out? An oracle focus puts the
needle's tokens raw into the working context; does the model then answer?

For each memory length, depth and key (the passkey test's protocol and default templates,
filler from the validation documents), the memory is built once through the given GistNet
and asked under working contexts that all hold the needle raw:

- ``fill@W``: the needle's path expanded first, the rest of the budget ``W`` by recency;
- ``minimal``: the coarsest cover with only the needle's path expanded (and the raw tail):
  the fewest gist entries any context holding the needle raw can have;
- ``recency@W`` (no oracle): what the recency scorer alone gives, for comparison;
- ``full``: every token raw (no memory), for lengths within the model's trained length;
- ``truncated@W``: the last W tokens of memory + question raw at their own positions, the
  model's own RoPE (no memory, no gists);
- ``truncated-ntk@W``: the same tokens under the RoPE a memory of this length resolves to
  (``auto``: NTK with the smallest power-of-two factor covering the extent) — the rotation
  alone, without a single gist.

Every memory condition runs under each read-time position rule of ``--positions`` (``exact``:
true positions under ``--rope``; ``compact``, ``grouped``, ``single``: ``megacontext.positions``,
the model's own RoPE), named ``condition|rule``.

    .venv/bin/python scripts/readout_probe.py COMPRESSOR [--lengths 4096 16384 65536]
        [--budgets 256 1024] [--trials 2] [--rope auto|none] [--positions exact compact]
        [--conditions fill minimal recency full truncated truncated-ntk] [--out probe.json]
        [--override data=folder data.corpus=outputs/prose] [--split all]
        [--intro T] [--needle T] [--question T]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megacontext.allocator import FocusAllocator  # noqa: E402
from megacontext.allocator.scorers import RecencyScorer  # noqa: E402
from megacontext.base import BaseLM  # noqa: E402
from megacontext.data import load_corpus  # noqa: E402
from megacontext.data.needles import answer_is, filler_stream, make_example  # noqa: E402
from megacontext.dtypes import TORCH_DTYPES  # noqa: E402
from megacontext.evaluation.evaluate import evaluation_documents, load_compressor  # noqa: E402
from megacontext.evaluation.passkey import greedy  # noqa: E402
from megacontext.evaluation.substitutability import variant_rope  # noqa: E402
from megacontext.gistnet import gistnet_digest  # noqa: E402
from megacontext.positions import POSITION_RULES, PositionRule  # noqa: E402
from megacontext.rope import resolve  # noqa: E402
from megacontext.runtime import MemoryLM  # noqa: E402
from megacontext.spans import node_size  # noqa: E402


class NeedleOracle:
    """Nodes overlapping the needle's tokens score above everything; the rest by recency."""

    needs_query = False

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.recency = RecencyScorer()

    def score(self, ctx, level: int, indices: np.ndarray) -> np.ndarray:
        size = node_size(level, ctx.span)
        lo, hi = indices * size, (indices + 1) * size
        hit = (lo < self.end) & (hi > self.start)
        return np.where(hit, 1e9, self.recency.score(ctx, level, indices))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compressor")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--levels", type=int, default=2)
    parser.add_argument("--rope", choices=["auto", "none"], default="auto",
                        help="memory.rope_scaling: auto (NTK factor from the context's extent, "
                             "the default) or none (the model's own RoPE)")
    parser.add_argument("--auto-kind", default="ntk",
                        help="the scaling auto resolves to: linear | ntk | dynamic | yarn | llama3")
    parser.add_argument("--factor", type=float, default=None,
                        help="a fixed NTK factor instead of auto's (which covers the extent)")
    parser.add_argument("--conditions", nargs="+", default=["fill", "minimal", "recency"],
                        help="fill | minimal | recency | full | truncated | truncated-ntk "
                             "(see above)")
    parser.add_argument("--positions", nargs="+", default=["exact"], choices=POSITION_RULES,
                        help="read-time position rules of the memory conditions")
    parser.add_argument("--local", type=int, default=4096,
                        help="positions.local of the rules other than exact")
    parser.add_argument("--override", nargs="*", default=[],
                        help="Hydra overrides of eval_passkey (e.g. data=folder "
                             "data.corpus=outputs/prose for a foreign filler)")
    parser.add_argument("--split", default="validation",
                        help="the filler documents: validation | test | all")
    for name in ("intro", "needle", "question"):
        parser.add_argument(f"--{name}", default=None,
                            help=f"passkey.{name} template instead of the config's")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("eval_passkey", overrides=["output_dir=unused", *args.override])
    for name in ("intro", "needle", "question"):
        if getattr(args, name) is not None:
            cfg.passkey[name] = getattr(args, name)
    lm = BaseLM.load(cfg.model.name, dtype=TORCH_DTYPES[cfg.model.dtype])
    compressor = load_compressor(args.compressor, lm, args.levels, untrained_upper=True)
    digest = gistnet_digest(compressor)
    corpus = load_corpus(cfg.data.corpus, lm.tokenizer, progress=False)
    docs, _ = evaluation_documents(corpus, cfg.data, args.split, args.compressor)
    filler = filler_stream(corpus, docs)
    pk = cfg.passkey
    tok = lm.tokenizer
    question = tok.encode(pk.question.format())
    stop = tuple(t for t in (tok.eos_id,) if t is not None)
    if args.factor is not None:
        rope = variant_rope(lm.config.rope, {"scaling": "ntk", "factor": args.factor},
                            lm.config.max_position)
    else:
        rope = None if args.rope == "none" else variant_rope(
            lm.config.rope, {"scaling": "auto", "auto_kind": args.auto_kind},
            lm.config.max_position)
    needle_len = len(tok.encode(pk.needle.format(key="12345")))
    tail = int(cfg.allocator.tail_tokens)

    per_budget = {"fill", "recency", "truncated", "truncated-ntk"}
    base_conditions = {"full", "truncated", "truncated-ntk"}
    conditions = [c if c not in per_budget else f"{c}@{b}" for c in args.conditions
                  for b in (args.budgets if c in per_budget else [None])]
    conditions = [c if c.partition("@")[0] in base_conditions else f"{c}|{rule}"
                  for c in conditions
                  for rule in ([None] if c.partition("@")[0] in base_conditions
                               else args.positions)]
    rows = []
    for i, length in enumerate(args.lengths):
        for j, depth in enumerate(args.depths):
            for trial in range(args.trials):
                rng = np.random.default_rng([int(cfg.seed), i, j, trial])
                key = str(int(rng.integers(10 ** (pk.digits - 1), 10 ** pk.digits)))
                ids, start = make_example(tok, filler, length, depth, key,
                                          int(rng.integers(0, filler.size)),
                                          intro=pk.intro, needle=pk.needle)
                oracle = NeedleOracle(start, start + needle_len)
                for cond in conditions:
                    cond_rule, _, rule = cond.partition("|")
                    name, _, b = cond_rule.partition("@")
                    if name in ("full", "truncated", "truncated-ntk"):
                        seen = np.concatenate([ids, question])
                        if name == "full" and \
                                seen.size + int(pk.max_new_tokens) > lm.config.max_position:
                            continue
                        kept = seen if name == "full" else seen[-int(b):]
                        first = seen.size - kept.size
                        extent = float(seen.size + int(pk.max_new_tokens))
                        r = resolve(rope, extent) if name == "truncated-ntk" and rope else None
                        out = greedy(lm, kept, first, int(pk.max_new_tokens), stop, rope=r)
                        text = tok.decode(out)
                        rows.append({"length": length, "depth": depth, "trial": trial,
                                     "key": key, "condition": cond, "entries": int(kept.size),
                                     "gist_entries": 0, "needle_raw": bool(start >= first),
                                     "rope_factor": None if r is None else r.factor,
                                     "answer": text, "correct": answer_is(text, key)})
                        print(json.dumps(rows[-1]), flush=True)
                        continue
                    if name == "minimal":
                        alloc = FocusAllocator(max(args.budgets), tail_tokens=tail,
                                               scorer=oracle, expand_threshold=1e8)
                    else:
                        alloc = FocusAllocator(int(b), tail_tokens=tail,
                                               scorer=oracle if name == "fill" else "recency")
                    t0 = time.perf_counter()
                    positions = PositionRule(rule, local=args.local)
                    with MemoryLM(lm, compressor, alloc, levels=args.levels,
                                  gist_dtype="float16", refocus_every=32,
                                  gistnet_digest=digest, rope=rope,
                                  positions=positions) as mem:
                        mem.feed(ids)
                        out = mem.generate(list(question), int(pk.max_new_tokens), stop=stop)
                        wc = mem.context
                        levels = np.asarray(wc.levels)
                        k = int(np.searchsorted(wc.starts, start, side="right")) - 1
                    text = tok.decode(out)
                    row = {"length": length, "depth": depth, "trial": trial, "key": key,
                           "condition": cond, "entries": len(wc),
                           "gist_entries": int((levels > 0).sum()),
                           "needle_raw": bool(levels[k] == 0), "answer": text,
                           "extent": float(mem.read_positions.max() - mem.read_positions.min() + 1),
                           "correct": answer_is(text, key),
                           "seconds": round(time.perf_counter() - t0, 2)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)

    print("\n| condition | " + " | ".join(str(n) for n in args.lengths) +
          " | gist entries (mean) |\n|---|" + "--:|" * (len(args.lengths) + 1))
    table = {}
    for cond in conditions:
        cells = []
        for length in args.lengths:
            r = [x for x in rows if x["condition"] == cond and x["length"] == length]
            cells.append(f"{sum(x['correct'] for x in r)}/{len(r)}")
        g = [x["gist_entries"] for x in rows if x["condition"] == cond] or [0]
        table[cond] = cells
        print(f"| {cond} | " + " | ".join(cells) + f" | {np.mean(g):.0f} |")
    result = {"compressor": args.compressor, "rope_scaling": args.rope,
              "auto_kind": args.auto_kind, "factor": args.factor, "rows": rows, "table": table,
              "positions": args.positions, "local": args.local, "override": args.override,
              "split": args.split, "templates": {k: cfg.passkey[k]
                                                 for k in ("intro", "needle", "question")},
              "lengths": args.lengths, "depths": args.depths, "budgets": args.budgets}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
        plot(result, args.out.with_suffix(".png"))
    return result


def plot(result: dict, path: Path) -> None:
    """Accuracy per condition (rows) × length and depth (columns), one cell per
    (length, depth) with its count of right answers."""
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


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
