"""Build a memory of N tokens and measure it: ``python eval/scale.py tokens=1e7 [key=value ...]``.

The work is done by :func:`megacontext.evaluation.scale.run_scale`; this file composes
``configs/scale.yaml`` with the command-line overrides and prints the summary.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from megacontext.evaluation.scale import run_scale


@hydra.main(version_base="1.3", config_path="../configs", config_name="scale")
def main(cfg: DictConfig) -> None:
    run_scale(cfg)
    print(Path(cfg.output_dir, "scale.md").read_text())


if __name__ == "__main__":
    main()
