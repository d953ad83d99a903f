"""Evaluate gists: ``python eval/eval.py compressor=<train run>/gistnet [key=value ...]`` (Hydra).

``compressor=mean`` (the default) measures the mean-pooling baseline instead. The work is done by
:func:`megacontext.evaluation.evaluate`; this file composes ``configs/eval.yaml`` with the
command-line overrides and prints the results table.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from megacontext.evaluation import evaluate


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    results = evaluate(cfg)
    print(Path(cfg.output_dir, "substitutability.md").read_text())
    print(f"results: {Path(cfg.output_dir).resolve()}")
    return (results.get("l1") or {}).get("recovery_l1")  # what a Hydra sweeper would optimise


if __name__ == "__main__":
    main()
