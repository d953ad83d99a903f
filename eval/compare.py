"""Paired A/B between GistNet exports: ``python eval/compare.py A B [C ...] [key=value ...]``.

A and B are ``<train run>/gistnet`` folders; the overrides are eval/eval.py's
(``--config-name eval_quick`` or ``eval_full`` picks another eval config). Both are scored on the
same windows; ``compare.json`` and ``compare.md`` (printed) hold B − A with its paired 95%
interval per condition and budget. With more exports (an ablation against the reference A) A is
scored once and each other export is paired with it: ``B1/``, ``B2/``, ... hold each arm's
table, the printed ``compare.md`` all arms side by side. The work is done by
:func:`megacontext.evaluation.compare.compare`; this file only composes the config.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from megacontext.evaluation.compare import compare, split_argv

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def main(argv: list[str]) -> None:
    a, others, name, overrides = split_argv(argv)
    if not any(o.split("=", 1)[0].lstrip("+~") == "output_dir" for o in overrides):
        overrides.append(f"output_dir=outputs/compare/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose(name, overrides=overrides)
    compare(cfg, a, *others)
    print(Path(cfg.output_dir, "compare.md").read_text())
    print(f"results: {Path(cfg.output_dir).resolve()}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    main(sys.argv[1:])
