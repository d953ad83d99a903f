"""Train LensNet, the learned focus scorer, on a GistNet's memories (Hydra):

    python train/train_lens.py compressor=<train run>/gistnet [experiment=...] [key=value ...]

The work is done by :func:`megacontext.training.lens.train_lens`; this file composes the
config from ``configs/train_lens.yaml`` and the command-line overrides.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from megacontext.training.lens import train_lens


@hydra.main(version_base="1.3", config_path="../configs", config_name="train_lens")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train_lens(cfg)
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
