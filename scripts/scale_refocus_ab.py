"""Refocus latency on built scale trees, interleaved in one process (``eval/scale.py``'s
measurement, repeated): ``python scripts/scale_refocus_ab.py TREE_DIR... [--rounds 5]``.

Each round times, for every tree and scorer in turn, ``--repeats`` incremental refocuses at
the end of the memory (budget 2,048; the similarity query is a random unit-scale matrix, as
the allocator only reads its mean); prints the median over rounds of each round's median,
and the ratio to the first tree.

``--lens EXPORT`` adds the scorer ``lens`` with that LensNet, bound to each tree whatever
GistNet made it: a measurement of its cost per refocus, not of its choices (a lens trained on
another GistNet's gists scores these trees' gists without meaning).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from megacontext.evaluation.scale import refocus_latency
from megacontext.tree import MegaContextTree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+")
    parser.add_argument("--scorers", nargs="+", default=["recency", "similarity"])
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lens", default=None, help="a LensNet export: also time `lens`")
    args = parser.parse_args()
    lens = None
    if args.lens:
        from megacontext.allocator import load_lens

        lens = load_lens(args.lens)
        args.scorers = [*args.scorers, "lens"]
    trees = [MegaContextTree.open(t) for t in args.trees]
    query = torch.randn(12, trees[0].hidden_size, generator=torch.Generator().manual_seed(0))
    times = {(i, s): [] for i in range(len(trees)) for s in args.scorers}
    for _ in range(args.rounds):
        for i, tree in enumerate(trees):
            for s in args.scorers:
                if s == "lens":
                    lens.gistnet_digest = tree.gistnet_digest  # for its cost (docstring)
                r = refocus_latency(tree, s, args.budget, args.repeats,
                                    None if s == "recency" else query,
                                    {"lens": lens} if s == "lens" else {})
                times[i, s].append(r["median_ms"])
    for s in args.scorers:
        base = statistics.median(times[0, s])
        for i, tree in enumerate(trees):
            m = statistics.median(times[i, s])
            print(f"{s:<11} {tree.num_tokens:>14,} tokens: median {m:6.2f} ms "
                  f"(rounds: {', '.join(f'{t:.2f}' for t in times[i, s])}), "
                  f"{m / base:.2f}x the first tree")


if __name__ == "__main__":
    main()
