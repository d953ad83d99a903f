"""Plot docs/lane-mixture.png from docs/lane-mixture.json: per arm, the long range's paired
mixed@W − streaming@W gain with its 95% interval (docs/training.md, "A mixture of window shapes").

    .venv/bin/python scripts/plot_lane_mixture.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"


def main() -> None:
    d = json.loads((DOCS / "lane-mixture.json").read_text())
    arms = {"A: 14 gists": d["cmp_ab_A_long_range"],
            "B: 14 + 128 gists": d["cmp_ab_B_long_range"],
            "C: 14 + 128 gists + L2": d["cmp_ac_B_long_range"]}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained", sharey=True)
    colors = ["tab:gray", "tab:green", "tab:blue"]
    for ax, w in zip(axes, (1024, 2048), strict=True):
        key = f"gain_mixed@{w}_vs_streaming@{w}"
        for i, (name, blocks) in enumerate(arms.items()):
            for j, b in enumerate(blocks):
                v, (lo, hi) = b[key], b["ci95"][key]
                x = j + (i - 1) * 0.25
                ax.errorbar(x, v, yerr=[[v - lo], [hi - v]], fmt="o", capsize=4,
                            color=colors[i], label=name if j == 0 else None)
                ax.annotate(f"{v:+.3f}", (x, v), xytext=(4, 0), textcoords="offset points",
                            fontsize=7)
        ax.axhline(0, color="tab:brown", lw=1, ls="--", label="streaming@W (0)")
        ax.set_xticks([0, 1], [f"{b['context_tokens']:,} old tokens\n{b['num_windows']} windows"
                               for b in blocks])
        ax.set_title(f"mixed@{w} − streaming@{w} gain (nats/token, paired 95% CI)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("NLL(streaming) − NLL(mixed): > 0 beats streaming")
    axes[1].legend(fontsize=8, loc="lower left")
    fig.suptitle("Long range under compact positions: the lane trained on a mixture of window "
                 "shapes (150 steps each, validation)", fontsize=9)
    fig.savefig(DOCS / "lane-mixture.png", dpi=120)


if __name__ == "__main__":
    main()
