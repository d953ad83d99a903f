"""Which windows make a recovery number? Per level-1 window of the evaluation (eval.yaml's
layout and count): its document, the NLL gap that full context closes over truncation, what
the gists and the content-free constant close of it — sorted by gap — then the documents'
shares of windows and of the gap. ``recovery`` is a ratio of means, so windows with large gaps
and documents with many windows (windows are spaced evenly over the split's tokens) weigh most.

    .venv/bin/python scripts/window_breakdown.py COMPRESSOR [--split test] [--windows 24]
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from probe_setup import level1_windows

from megacontext.evaluation.substitutability import score_level
from megacontext.gistnet import ConstantGist


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compressor")
    parser.add_argument("--split", default="test", choices=["test", "validation"])
    parser.add_argument("--windows", type=int, default=24)
    args = parser.parse_args(argv)
    probe = level1_windows("eval", args.windows, args.split, args.compressor)
    lm, net, corpus, windows = probe.lm, probe.net, probe.corpus, probe.windows
    constant = ConstantGist(lm.model.embed_tokens.weight.detach().float().mean(0))
    with torch.inference_mode():
        scores = score_level(lm, corpus, windows, 1, net, {"constant": constant},
                             probe.sub_cfg)
    m = {k: v.mean(axis=1) for k, v in scores.nll.items()}
    gap = m["truncated"] - m["full"]
    gist = m["truncated"] - m["gist"]
    const = m["truncated"] - m["constant"]
    names = [corpus.names[w.doc] for w in windows]
    print("| document | offset | gap (truncated − full) | gists close | constant closes |\n"
          "|---|--:|--:|--:|--:|")
    for i in sorted(range(len(windows)), key=lambda i: gap[i]):
        print(f"| {names[i]} | {windows[i].offset} | {gap[i]:.3f} | {gist[i]:+.3f} | "
              f"{const[i]:+.3f} |")
    print(f"\n{len(windows)} windows, {len(set(names))} documents; recovery "
          f"{gist.mean() / gap.mean():+.3f} (constant {const.mean() / gap.mean():+.3f}); "
          f"mean gap {gap.mean():.3f}")
    share = Counter(names)
    for name, n in share.most_common(3):
        sel = [i for i in range(len(names)) if names[i] == name]
        print(f"  {name}: {n} windows, {gap[sel].sum() / gap.sum():.0%} of the gap, "
              f"recovery on its windows {gist[sel].sum() / gap[sel].sum():+.3f}")
    big = share.most_common(1)[0][0]
    keep = [i for i in range(len(names)) if names[i] != big]
    print(f"  without {big}'s windows: recovery {gist[keep].sum() / gap[keep].sum():+.3f}")
    top = int(gap.argmax())
    rest = [i for i in range(len(names)) if i != top]
    print(f"  without the largest-gap window ({names[top]}, gap {gap[top]:.3f}): recovery "
          f"{gist[rest].sum() / gap[rest].sum():+.3f}")


if __name__ == "__main__":
    main()
