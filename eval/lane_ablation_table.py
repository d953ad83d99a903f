"""The lane ablation's table and plot, from the multi-arm comparison of scripts/lane_ablation.sh.

    python eval/lane_ablation_table.py NAME=<compare dir>/<Bi> ... \
        --reference rank8=<compare dir>/A [--times <OUT>/times.txt] --out docs/lane-ablation
    # writes docs/lane-ablation.json, docs/lane-ablation.md (printed) and docs/lane-ablation.png

Per arm: the paired B_i − A of the headline statistics (level-1 and level-2 recovery, the
mixed@W gain over streaming, long-range NLLs; bold where the 95% interval excludes 0) and,
plotted, each arm's own mixed@W − streaming@W gain in the long range with its 95% interval.
Each ``NAME=DIR`` is one arm's folder of eval/compare.py's multi-arm output: ``DIR/compare.json``
(the arm against the reference) and ``DIR/substitutability.json`` (its own results); the
reference's folder holds its ``substitutability.json``. The recipe and what it is for are in
docs/training.md ("The lane's ablation").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (label, section, statistic): the headline rows of compare.json, B − A
PAIRED = [
    ("recovery_l1", ("levels", "l1", None), "recovery_l1"),
    ("content_recovery_l1", ("levels", "l1", None), "content_recovery_l1"),
    ("recovery_l2", ("levels", "l2", None), "recovery_l2"),
    ("L1 mixed@128 gain vs streaming", ("levels", "l1", 128), "gain_vs_streaming"),
    ("L1 mixed@256 gain vs streaming", ("levels", "l1", 256), "gain_vs_streaming"),
    ("16k mixed@2048 NLL", ("long_range", 16384, None), "nll_mixed@2048"),
    ("32k mixed@2048 NLL", ("long_range", 32768, None), "nll_mixed@2048"),
    ("16k gist_l2 only NLL", ("long_range", 16384, None), "nll_gist_l2"),
]
LONG = [(16384, 1024), (16384, 2048), (32768, 1024), (32768, 2048)]


def _rows(report: dict, where: tuple) -> list[dict]:
    kind, key, budget = where
    if kind == "levels":
        block = report["levels"][key]
        if budget is None:
            return block["rows"]
        return next(m["rows"] for m in block["mixed"] if m["budget"] == budget)
    return next(b["rows"] for b in report["long_range"] if b["context_tokens"] == key)


def _own_gains(sub: dict) -> dict:
    """``{"16384@1024": [gain, lo, hi], ...}``: NLL(streaming@W) − NLL(mixed@W), paired."""
    out = {}
    for block in sub["long_range"]["by_length"]:
        for w in (1024, 2048):
            key = f"gain_mixed@{w}_vs_streaming@{w}"
            if key in block:
                lo, hi = block["ci95"][key]
                out[f"{block['context_tokens']}@{w}"] = [block[key], lo, hi]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arms", nargs="+", help="NAME=DIR of each arm (DIR holds compare.json)")
    ap.add_argument("--reference", required=True, help="NAME=DIR of the reference's results")
    ap.add_argument("--times", help="a times.txt of 'NAME SECONDS s [note]' lines (training wall)")
    ap.add_argument("--out", default="docs/lane-ablation")
    args = ap.parse_args(argv)
    ref_name, ref_dir = args.reference.split("=", 1)
    times = {}
    if args.times:
        for line in Path(args.times).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "s":  # "NAME SECONDS s [(jobs=2)]"
                times[parts[0]] = int(parts[1])
    ref = json.loads(Path(ref_dir, "substitutability.json").read_text())
    result = {"reference": {"name": ref_name, "digest": ref["compressor_digest"],
                            "own_gain_vs_streaming": _own_gains(ref)}, "arms": []}
    for spec in args.arms:
        name, folder = spec.split("=", 1)
        report = json.loads(Path(folder, "compare.json").read_text())
        sub = json.loads(Path(folder, "substitutability.json").read_text())
        paired = {}
        for label, where, stat in PAIRED:
            row = next((r for r in _rows(report, where) if r["statistic"] == stat), None)
            if row is not None:
                paired[label] = {k: row[k] for k in ("a", "b", "diff", "ci95", "verdict")}
        result["arms"].append({"name": name, "digest": report["b"]["digest"],
                               "train_seconds": times.get(name), "paired": paired,
                               "own_gain_vs_streaming": _own_gains(sub)})
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")

    names = [a["name"] for a in result["arms"]]
    lines = ["| B_i − " + ref_name + " [95% CI] | " + " | ".join(names) + " |",
             "|---|" + "--:|" * len(names)]
    for label, _, _ in PAIRED:
        cells = []
        for a in result["arms"]:
            r = a["paired"].get(label)
            if r is None:
                cells.append("n/a")
                continue
            d = 2 if "recovery" in label else 3
            text = f"{r['diff']:+.{d}f} [{r['ci95'][0]:+.{d}f}, {r['ci95'][1]:+.{d}f}]"
            cells.append(f"**{text}**" if r["verdict"] != "tie" else text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| training wall (s) | " + " | ".join(
        str(a["train_seconds"]) if a["train_seconds"] else "n/a" for a in result["arms"]) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    fig, axes = plt.subplots(1, len(LONG), figsize=(13, 4), layout="constrained", sharey=True)
    everyone = [(ref_name, result["reference"]["own_gain_vs_streaming"])] + [
        (a["name"], a["own_gain_vs_streaming"]) for a in result["arms"]]
    for ax, (length, w) in zip(axes, LONG, strict=True):
        for i, (_, gains) in enumerate(everyone):
            g = gains.get(f"{length}@{w}")
            if g is None:
                continue
            v, lo, hi = g
            ax.errorbar(i, v, yerr=[[v - lo], [hi - v]], fmt="o", capsize=3,
                        color="tab:blue" if i else "black")
        ax.axhline(0, color="tab:brown", lw=1, ls="--")
        ax.set_xticks(range(len(everyone)), [n for n, _ in everyone], rotation=45, fontsize=8)
        ax.set_title(f"{length:,} old tokens, W = {w:,}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("NLL(streaming@W) − NLL(mixed@W)\n> 0: memory beats streaming")
    fig.suptitle("Lane ablation (150 steps per arm from one export; validation, compact "
                 "positions): each arm's long-range gain over streaming, paired 95% CI",
                 fontsize=9)
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)
    return result


if __name__ == "__main__":
    main()
