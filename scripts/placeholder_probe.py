"""What does a content-free placeholder cost? The NLL of the evaluation's level-1 windows with
every gist slot holding one constant vector — the mean token embedding (what an untrained
GistNet emits, the evaluation's `constant` baseline), zero, the unigram-weighted mean, or the
embedding of one token — against dropping the old context (recovery < 0: the placeholders
hurt). It asks whether a better output prior could start GistNet nearer to harmless
(docs/training.md, "Negative results"). Windows and split are eval_quick's (validation).

    .venv/bin/python scripts/placeholder_probe.py [--windows 48] [--tokens $'\\n' . ...]

Each of ``--tokens`` that is one token is tried (pass real characters: bash's $'\\n').
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from probe_setup import level1_windows, recovery_table

from megacontext.evaluation.substitutability import score_level
from megacontext.gistnet import ConstantGist


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=48)
    parser.add_argument("--tokens", nargs="+", default=["\n", " ", ".", ",", "\n\n", "    ",
                                                       "#", "the", "...", "_"])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    probe = level1_windows("eval_quick", args.windows, "validation")
    sub_cfg, lm, corpus = probe.sub_cfg, probe.lm, probe.corpus
    table = lm.model.embed_tokens.weight.detach().float()  # [vocab, c]
    counts = np.bincount(np.asarray(corpus.ids, dtype=np.int64), minlength=table.shape[0])
    vectors = {"mean token embedding (the prior)": table.mean(0),
               "zero": torch.zeros(table.shape[1]),
               "unigram-weighted mean": torch.from_numpy(counts / counts.sum()).float() @ table}
    for tok, name in ((lm.tokenizer.bos_id, "bos"), (lm.tokenizer.eos_id, "eos")):
        if tok is not None:
            vectors[f"{name} token"] = table[tok]
    for text in args.tokens:
        ids = lm.tokenizer.encode(text)
        if len(ids) == 1:
            vectors[f"token {text!r}"] = table[ids[0]]
    baselines = {name: ConstantGist(v) for name, v in vectors.items()}
    with torch.inference_mode():
        scores = score_level(lm, corpus, probe.windows, 1, baselines["zero"], baselines, sub_cfg)
    norms = {name: {"norm": f"{float(v.norm()):.2f}"} for name, v in vectors.items()}
    result = recovery_table(probe, scores, list(vectors), "placeholder", norms)
    for name, v in vectors.items():
        result["rows"][name]["norm"] = float(v.norm())
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
