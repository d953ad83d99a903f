"""What the evaluation probes in scripts/ share: an eval config composed with a window count,
the base model, a GistNet export (or none), the corpus and the level-1 windows of one split;
and the table of recovery per condition that most of them print.

    from probe_setup import level1_windows   # scripts/ is on sys.path when a script runs
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megacontext.base import BaseLM  # noqa: E402
from megacontext.data import load_corpus  # noqa: E402
from megacontext.dtypes import TORCH_DTYPES  # noqa: E402
from megacontext.evaluation.checks import check_config  # noqa: E402
from megacontext.evaluation.evaluate import evaluation_documents, load_compressor  # noqa: E402
from megacontext.evaluation.stats import recovery, resample, summarize  # noqa: E402
from megacontext.evaluation.substitutability import evaluation_windows  # noqa: E402


@dataclass
class Probe:
    cfg: Any  # the composed config
    sub_cfg: Any  # its checked substitutability settings
    lm: BaseLM
    net: Any  # the GistNet (level 1), or None
    corpus: Any
    windows: list  # level-1 windows of the split


def level1_windows(config: str, windows: int, split: str,
                   compressor: str | None = None) -> Probe:
    """``configs/<config>.yaml`` with ``windows`` level-1 windows of ``split``; the split's
    documents are checked against ``compressor``'s training run as eval.py checks them."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config, overrides=[
            "output_dir=unused", f"substitutability.windows.num_windows={windows}"])
    sub_cfg = check_config(cfg)[0]
    lm = BaseLM.load(cfg.model.name, dtype=TORCH_DTYPES[cfg.model.dtype])
    net = None if compressor is None else load_compressor(compressor, lm, 1)
    corpus = load_corpus(cfg.data.corpus, lm.tokenizer, progress=False)
    docs, _ = evaluation_documents(corpus, cfg.data, split, compressor or "mean")
    return Probe(cfg, sub_cfg, lm, net, corpus, evaluation_windows(corpus, docs,
                                                                   sub_cfg.windows)[1])


def ids_of(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The token ids ``[B, s]`` of token input embeddings ``x [..., s, c]``: each row matched
    to its exact row of the embedding ``table`` (distance 0), in chunks of 512 rows. For
    probes whose compressors are handed embeddings but choose by id."""
    s, c = x.shape[-2:]
    rows = x.reshape(-1, c).float()
    return torch.cat([torch.cdist(rows[i:i + 512], table).argmin(-1)
                      for i in range(0, rows.shape[0], 512)]).reshape(-1, s)


def recovery_table(probe: Probe, scores: Any, names: list[str], tag: str,
                   extra: dict[str, dict[str, str]] | None = None) -> dict:
    """Each condition of ``names`` in ``scores`` (a ``score_level`` result): its mean NLL and
    its recovery with the paired bootstrap interval over windows (resampling seeded by the
    config's seed and ``tag``), printed as a markdown table with the full and truncated
    references; ``extra`` adds per-row columns (``{name: {column: text}}``).

    Returns:
        ``{"windows", "full", "truncated", "rows": {name: {"nll", "value", "ci95", …}}}``.
    """
    per_window = {k: v.mean(axis=1) for k, v in scores.nll.items()}
    stats = {n: (lambda m, n=n: recovery(m["truncated"], m[n], m["full"])) for n in names}
    summary = summarize(per_window, stats, resample(len(per_window["full"]), 1000,
                                                    int(probe.cfg.seed), tag))
    full, trunc = (float(per_window[k].mean()) for k in ("full", "truncated"))
    print(f"{len(probe.windows)} windows: full {full:.3f}, truncated {trunc:.3f} nats/token\n")
    cols = list(next(iter((extra or {}).values()), {}))
    print("| condition | " + "".join(f"{c} | " for c in cols) + "NLL | recovery [95% CI] |\n|---|"
          + "--:|" * (len(cols) + 2))
    rows = {}
    for name in names:
        s = summary[name]
        lo, hi = s["ci95"] or (float("nan"), float("nan"))
        rows[name] = {"nll": float(per_window[name].mean()), **s}
        cells = "".join(f"{(extra or {})[name][c]} | " for c in cols)
        print(f"| {name} | {cells}{rows[name]['nll']:.3f} | {s['value']:+.3f} "
              f"[{lo:+.3f}, {hi:+.3f}] |")
    return {"windows": len(probe.windows), "full": full, "truncated": trunc, "rows": rows}
