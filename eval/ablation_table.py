"""The ablation table: one row per arm of ``scripts/ablate.sh``, read from its outputs.

    python eval/ablation_table.py outputs/ablation [--sort recovery_l1]
    python eval/ablation_table.py outputs/ablation --eval eval_test     # scripts/ablate_report.sh
    python eval/ablation_table.py outputs/ablation --eval eval_foreign

Each arm folder holds ``arm.json`` (name, overrides, wall times), ``train/.hydra/config.yaml``
and ``eval/substitutability.json`` (the validation pass of ``scripts/ablate.sh``; ``--eval``
reads another evaluation folder of the arm, e.g. the test and foreign-corpus passes of
``scripts/ablate_report.sh``); the table gives, per level scored, recovery and content
recovery with their 95% bootstrap intervals, the gist's gain over the sink baseline, and the
training wall time per optimizer step (setup and validation included).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf


def _ci(block: dict, key: str, digits: int = 3) -> str:
    value, ci = block.get(key), (block.get("ci95") or {}).get(key)
    if value is None:
        return "n/a"
    text = f"{value:+.{digits}f}"
    return text + (f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else "")


def arm_row(folder: Path, evaluation: str = "eval") -> dict | None:
    """The numbers of one arm, or None if it has not finished (or lacks that evaluation)."""
    results = folder / evaluation / "substitutability.json"
    meta = folder / "arm.json"
    if not results.is_file() or not meta.is_file():
        return None
    arm, r = json.loads(meta.read_text()), json.loads(results.read_text())
    cfg = OmegaConf.load(folder / "train" / ".hydra" / "config.yaml")
    steps = int(cfg.trainer.max_steps)
    row = {"name": arm["name"], "overrides": arm["overrides"], "steps": steps,
           "s_per_step": arm["train_seconds"] / steps, "split": r["split"]["label"],
           "levels": {}}
    for key, block in r.items():
        if key[:1] == "l" and key[1:].isdigit():
            row["levels"][key] = block
    return row


def table(rows: list[dict]) -> str:
    levels = sorted({k for row in rows for k in row["levels"]})
    head = "| arm | steps | s/step |"
    rule = "|---|--:|--:|"
    for k in levels:
        head += f" recovery {k} | content recovery {k} | gain vs sink {k} |"
        rule += "--:|--:|--:|"
    lines = [head, rule]
    for row in rows:
        line = f"| {row['name']} | {row['steps']} | {row['s_per_step']:.2f} |"
        for k in levels:
            b = row["levels"].get(k)
            if b is None:
                line += " — | — | — |"
                continue
            line += (f" {_ci(b, f'recovery_{k}')} | {_ci(b, f'content_recovery_{k}')} | "
                     f"{_ci(b, f'gain_gist_vs_sink_{k}')} |")
        lines.append(line)
    splits = sorted({row["split"] for row in rows})
    lines += ["", f"Scored on: {'; '.join(splits)}. Overrides per arm:", ""]
    lines += [f"- `{row['name']}`: `{row['overrides']}`" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the folder holding one folder per arm")
    parser.add_argument("--sort", default=None, help="sort by this key of the l1 block")
    parser.add_argument("--eval", default="eval", dest="evaluation",
                        help="the evaluation folder of each arm to read (default: eval)")
    args = parser.parse_args()
    if not args.root.is_dir():
        raise SystemExit(f"{args.root}: no such folder")
    rows = [r for r in (arm_row(p, args.evaluation) for p in sorted(args.root.iterdir())
                        if p.is_dir()) if r]
    if not rows:
        raise SystemExit(f"{args.root}: no finished arm (each needs arm.json and "
                         f"{args.evaluation}/substitutability.json)")
    if args.sort:
        rows.sort(key=lambda r: -(r["levels"].get("l1", {}).get(args.sort) or float("-inf")))
    print(table(rows))


if __name__ == "__main__":
    main()
