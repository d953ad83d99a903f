"""Which windows make a recovery number? Per level-1 window of the evaluation (eval.yaml's
layout and count): its document, the NLL gap that full context closes over truncation, what
the gists and the content-free constant close of it — sorted by gap — then the documents'
shares of windows and of the gap. ``recovery`` is a ratio of means, so windows with large gaps
and documents with many windows (windows are spaced evenly over the split's tokens) weigh most.

    .venv/bin/python scripts/window_breakdown.py COMPRESSOR [--split test] [--windows 24]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megacontext.base import BaseLM  # noqa: E402
from megacontext.data import load_corpus  # noqa: E402
from megacontext.dtypes import TORCH_DTYPES  # noqa: E402
from megacontext.evaluation.checks import check_config  # noqa: E402
from megacontext.evaluation.evaluate import evaluation_documents, load_compressor  # noqa: E402
from megacontext.evaluation.substitutability import evaluation_windows, score_level  # noqa: E402
from megacontext.gistnet import ConstantGist  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compressor")
    parser.add_argument("--split", default="test", choices=["test", "validation"])
    parser.add_argument("--windows", type=int, default=24)
    args = parser.parse_args(argv)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("eval", overrides=[
            "output_dir=unused", f"substitutability.windows.num_windows={args.windows}"])
    sub_cfg = check_config(cfg)[0]
    lm = BaseLM.load(cfg.model.name, dtype=TORCH_DTYPES[cfg.model.dtype])
    net = load_compressor(args.compressor, lm, 1)
    corpus = load_corpus(cfg.data.corpus, lm.tokenizer, progress=False)
    docs, _ = evaluation_documents(corpus, cfg.data, args.split, args.compressor)
    windows = evaluation_windows(corpus, docs, sub_cfg.windows)[1]
    constant = ConstantGist(lm.model.embed_tokens.weight.detach().float().mean(0))
    with torch.inference_mode():
        scores = score_level(lm, corpus, windows, 1, net, {"constant": constant}, sub_cfg)
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
