"""Passkey accuracy by focus scorer, wording and memory length, from scripts/lens_experiment.sh:

    python eval/passkey_table.py outputs/lens

Reads every ``passkey_<scorer>_<wording>/passkey.json`` under the folder and prints a markdown
table: per row, the accuracy from memory, how often the key was raw in the memory's working
context (the allocator found it), and truncation to the same budget, with the trial counts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

WORDINGS = ("default", "held_out")


def rows(folder: Path) -> list[dict]:
    """One row per (scorer, wording, length) found under ``folder``."""
    out = []
    for path in sorted(folder.glob("passkey_*_*/passkey.json")):
        name = path.parent.name.removeprefix("passkey_")
        wording = next((w for w in WORDINGS if name.endswith("_" + w)), None)
        if wording is None:
            continue
        scorer = name.removesuffix("_" + wording)
        r = json.loads(path.read_text())
        for i, length in enumerate(r["lengths"]):
            trials = [e for e in r["examples"] if e["length"] == length]
            raw = [e["key_level_in_memory_context"] == 0 for e in trials]
            out.append({"scorer": scorer, "wording": wording, "length": length,
                        "budget": r["budget"], "levels": r["levels"], "trials": len(trials),
                        "memory": r["memory"]["accuracy_by_length"][i],
                        "key_raw": sum(raw) / len(raw) if raw else None,
                        "truncated": r["truncated"]["accuracy_by_length"][i]})
    return out


def markdown(table: list[dict]) -> str:
    head = ("| scorer | wording | memory tokens | budget | levels | trials | memory accuracy "
            "| key raw in context | truncated accuracy |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in sorted(table, key=lambda r: (r["wording"], r["length"], r["scorer"])):
        def pct(x):
            return "n/a" if x is None else f"{100 * x:.0f}%"
        lines.append(f"| {r['scorer']} | {r['wording']} | {r['length']:,} | {r['budget']} | "
                     f"{r['levels']} | {r['trials']} | {pct(r['memory'])} | {pct(r['key_raw'])} "
                     f"| {pct(r['truncated'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    table = rows(args.folder)
    if not table:
        raise SystemExit(f"{args.folder}: no passkey_<scorer>_<wording>/passkey.json found")
    print(markdown(table), end="")


if __name__ == "__main__":
    main()
