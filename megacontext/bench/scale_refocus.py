"""Benchmark: refocus latency on built scale trees, interleaved in one process.

    python -m megacontext.bench.scale_refocus TREE_DIR [TREE_DIR ...] [--rounds 5]
        [--repeats 50] [--budget 2048] [--scorers recency similarity] [--lens EXPORT]

``eval/scale.py`` times refocus once per tree, in the run that built it, so two trees' numbers
come from two processes and whatever else the machine did meanwhile. This repeats that
measurement (``megacontext.evaluation.scale.refocus_latency``: ``--repeats`` incremental
refocuses at the end of the memory, budget ``--budget``) for every tree and scorer in turn,
``--rounds`` times, in one process: a slow stretch of the host then hits every tree alike.
Reported per scorer and tree: the median over rounds of each round's median, each round's
median, and the ratio to the first tree (the issue's "10^9 within 1.2x of 10^6").
The similarity query is a random unit-scale matrix (the allocator reads only its mean).

``--lens EXPORT`` adds the scorer ``lens`` with that LensNet, bound to each tree whatever
GistNet made it: a measurement of its cost per refocus, not of its choices (a lens trained on
another GistNet's gists scores these trees' gists without meaning).

Its numbers (10^6, 2.5·10^8 and 10^9 tokens, before and after each allocator change) are in
docs/scaling.md ("10^9 tokens": the refocus at the end).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence

import torch

from megacontext.evaluation.scale import refocus_latency
from megacontext.tree import MegaContextTree


def interleaved(trees: Sequence, scorers: Sequence[str], budget: int = 2048,
                repeats: int = 50, rounds: int = 5, lens=None, seed: int = 0) -> dict:
    """Refocus latency of every tree under every scorer, round after round (each round: tree
    after tree, scorer after scorer).

    Returns:
        ``{scorer: [{"tokens", "rounds_ms": [each round's median], "median_ms": their
        median, "ratio": median_ms / the first tree's}, ...one per tree]}``.
    """
    query = torch.randn(12, trees[0].hidden_size, generator=torch.Generator().manual_seed(seed))
    times = {(i, s): [] for i in range(len(trees)) for s in scorers}
    for _ in range(rounds):
        for i, tree in enumerate(trees):
            for s in scorers:
                if s == "lens":
                    lens.gistnet_digest = tree.gistnet_digest  # for its cost (module docstring)
                r = refocus_latency(tree, s, budget, repeats,
                                    None if s == "recency" else query,
                                    {"lens": lens} if s == "lens" else {})
                times[i, s].append(r["median_ms"])
    out = {}
    for s in scorers:
        first = statistics.median(times[0, s])
        out[s] = [{"tokens": int(tree.num_tokens), "rounds_ms": times[i, s],
                   "median_ms": statistics.median(times[i, s]),
                   "ratio": statistics.median(times[i, s]) / first}
                  for i, tree in enumerate(trees)]
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="+", help="tree folders (eval/scale.py's <run>/tree)")
    parser.add_argument("--scorers", nargs="+", default=["recency", "similarity"])
    parser.add_argument("--budget", type=int, default=2048, help="working-context entries")
    parser.add_argument("--repeats", type=int, default=50,
                        help="timed incremental refocuses per tree, scorer and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lens", default=None, help="a LensNet export: also time `lens`")
    args = parser.parse_args(argv)
    lens, scorers = None, list(args.scorers)
    if args.lens:
        from megacontext.allocator import load_lens

        lens = load_lens(args.lens)
        scorers.append("lens")
    trees = [MegaContextTree.open(t) for t in args.trees]
    result = interleaved(trees, scorers, args.budget, args.repeats, args.rounds, lens)
    for s, rows in result.items():
        for r in rows:
            print(f"{s:<11} {r['tokens']:>14,} tokens: median {r['median_ms']:6.2f} ms "
                  f"(rounds: {', '.join(f'{t:.2f}' for t in r['rounds_ms'])}), "
                  f"{r['ratio']:.2f}x the first tree")
    return result


if __name__ == "__main__":
    main()
