"""Train GistNet: ``python train/train.py [experiment=cpu] [key=value ...]`` (Hydra).

The work is done by :func:`megacontext.training.train.train`; this file only composes the
config from ``configs/train.yaml`` and the command-line overrides.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from megacontext.training.train import train


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    return metrics.get("val/recovery_l1")  # what a Hydra sweeper would optimise


if __name__ == "__main__":
    main()
