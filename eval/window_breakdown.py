"""Which windows make a recovery number? Level-1 recovery by window and by document.

    python eval/window_breakdown.py COMPRESSOR [--split test] [--windows 24] [--out X.json]
        [--override data=folder data.corpus=outputs/prose ...]

COMPRESSOR is a ``<train run>/gistnet`` export (or ``mean``). The windows are eval.yaml's
level-1 layout, ``--windows`` of them over the ``--split`` documents (checked against the
export's training run as eval/eval.py checks them). Prints, per window sorted by the gap
that full context closes over truncation, what the gists and the content-free constant close
of it, then the documents' shares and the recovery without the largest document and without
the largest-gap window (:mod:`megacontext.evaluation.breakdown`). What it found is in
docs/training.md ("What the test split's number is made of").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hydra import compose, initialize_config_dir

from megacontext.base import BaseLM
from megacontext.data import load_corpus
from megacontext.dtypes import TORCH_DTYPES
from megacontext.evaluation import (
    check_config,
    evaluation_documents,
    evaluation_windows,
    load_compressor,
)
from megacontext.evaluation.breakdown import render_breakdown, window_breakdown

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("compressor", help="a GistNet export (<train run>/gistnet) or 'mean'")
    p.add_argument("--split", default="test", choices=["test", "validation", "all"],
                   help="the documents the windows are drawn from")
    p.add_argument("--windows", type=int, default=24, help="level-1 windows")
    p.add_argument("--override", nargs="*", default=[],
                   help="Hydra overrides of configs/eval.yaml (e.g. data=folder "
                        "data.corpus=outputs/prose)")
    p.add_argument("--out", type=Path, default=None, help="write the breakdown as JSON")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("eval", overrides=[
            "output_dir=unused", f"compressor={args.compressor}",
            f"substitutability.windows.num_windows={args.windows}", *args.override])
    sub_cfg = check_config(cfg).substitutability
    lm = BaseLM.load(cfg.model.name, dtype=TORCH_DTYPES[cfg.model.dtype])
    net = load_compressor(args.compressor, lm, 1)
    data = cfg.data  # opened as eval/eval.py opens it
    corpus = load_corpus(data.corpus, lm.tokenizer, min_tokens=data.get("min_tokens"),
                         cache_dir=data.get("cache_dir"), text_field=data.get("text_field", "text"),
                         source=data.get("source"), progress=False)
    docs, _ = evaluation_documents(corpus, data, args.split, args.compressor)
    windows = evaluation_windows(corpus, docs, sub_cfg.windows)[1]
    result = {"compressor": args.compressor, "split": args.split,
              **window_breakdown(lm, corpus, windows, net, sub_cfg)}
    print(render_breakdown(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
