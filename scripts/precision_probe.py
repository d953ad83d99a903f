"""Does bfloat16 ingest (``megacontext ingest --precision bfloat16``) cost substitutability?
Recovery of the evaluation's level-1 windows with the gists computed in float32 (what the
evaluation and a default ingest compute) and under bfloat16 autocast (what the option
stores), on the same windows, paired; also the gists' relative difference. Windows and split
are eval_quick's (validation).

    .venv/bin/python scripts/precision_probe.py COMPRESSOR [--windows 48] [--out probe.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from probe_setup import level1_windows
from torch import nn

from megacontext.evaluation.stats import recovery, resample, summarize
from megacontext.evaluation.substitutability import score_level


class Autocast(nn.Module):
    """The compressor under bfloat16 autocast, as ``Ingestor(precision="bfloat16")`` runs it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.inner(x, level).float()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compressor")
    parser.add_argument("--windows", type=int, default=48)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    probe = level1_windows("eval_quick", args.windows, "validation", args.compressor)
    cfg, lm, net, corpus = probe.cfg, probe.lm, probe.net, probe.corpus
    with torch.inference_mode():
        scores = score_level(lm, corpus, probe.windows, 1, net, {"bfloat16": Autocast(net)},
                             probe.sub_cfg)
        # the gists themselves, float32 against bfloat16, on the first windows' spans
        x = lm.embed(torch.as_tensor(corpus.ids[:32 * 512].astype("int64"))[None])[0].float()
        a, b = net.compress(x, 1), Autocast(net)(x.reshape(-1, 32, x.shape[1]), 1)
    per_window = {k: v.mean(axis=1) for k, v in scores.nll.items()}
    stats = {"float32": lambda m: recovery(m["truncated"], m["gist"], m["full"]),
             "bfloat16": lambda m: recovery(m["truncated"], m["bfloat16"], m["full"]),
             "bfloat16 - float32 (nats/token)": lambda m: m["bfloat16"] - m["gist"]}
    idx = resample(len(per_window["full"]), 1000, int(cfg.seed), "precision")
    summary = summarize(per_window, stats, idx)
    rel = float((a - b).norm() / a.norm())
    print(f"{len(probe.windows)} validation windows; gists' relative difference {rel:.2e} "
          f"(float16 storage rounds {float((a - a.half().float()).norm() / a.norm()):.2e})")
    for name, s in summary.items():
        lo, hi = s["ci95"] or (float("nan"), float("nan"))
        print(f"{name}: {s['value']:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    result = {"compressor": args.compressor, "windows": len(probe.windows),
              "gist_relative_difference": rel, "summary": summary}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
