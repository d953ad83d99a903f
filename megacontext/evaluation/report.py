"""The evaluation's human-readable outputs: a markdown table and PNG plots.

Everything here reads the JSON-ready results only (``substitutability.json``,
``passkey.json``), so a figure can be redrawn from a finished run without the model.
Plots use a ``Figure`` with an Agg canvas (no pyplot: no global backend, no open figures).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

CONDITION_COLORS = {"truncated": "tab:red", "mean_pool": "tab:gray", "gist": "tab:blue",
                    "full": "black", "mixed": "tab:green"}


def _f(x, digits: int = 3, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _ci(value, ci, digits: int = 3, sign: bool = False) -> str:
    text = _f(value, digits, sign)
    if ci:
        text += f" [{_f(ci[0], digits, sign)}, {_f(ci[1], digits, sign)}]"
    return text


def _levels(results: dict) -> list[int]:
    return sorted(int(k[1:]) for k in results if k[:1] == "l" and k[1:].isdigit())


def _layout(entry: dict) -> str:
    return " + ".join(f"{v:g} {k}" for k, v in entry["entries_by_level"].items())


def markdown(results: dict, passkey: dict | None = None) -> str:
    """The results as markdown tables (printed at the end of a run and saved)."""
    h = results["horizon"]
    lines = [
        f"## Substitutability: {results['model']}, gists by `{results['compressor']}`",
        "",
        f"Held-out windows of `{results['corpus']}` (val_fraction {results['val_fraction']}, "
        f"split seed {results['split_seed']}; against the training run's split: "
        f"{results.get('training_split', 'unknown')}); NLL in nats/token on the same {h} scored "
        f"tokens per window ({results['num_tokens_scored']:,} per condition, "
        f"{results['num_documents']} documents); [95% bootstrap interval over windows]; "
        f"gists at `{results['position_mode']}` positions, gist RoPE "
        f"`{results['gist_rope']}`.",
        "",
        "| level | windows | context | full | truncated | mean-pool | gist | ΔNLL gist "
        "| recovery gist | recovery mean-pool |",
        "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for k in _levels(results):
        b = results[f"l{k}"]
        ci = b["ci95"]
        lines.append(
            f"| L{k} | {b['num_windows']} | {b['num_gists']}×{32 ** k} tok → "
            f"{b['num_gists']} gist{'s' if b['num_gists'] > 1 else ''} | "
            f"{_f(b['nll_full'])} | {_f(b['nll_truncated'])} | "
            f"{_f(b['nll_mean_pool'])} | {_f(b[f'nll_gist_l{k}'])} | "
            f"{_ci(b[f'delta_nll_l{k}'], ci[f'delta_nll_l{k}'], sign=True)} | "
            f"{_ci(b[f'recovery_l{k}'], ci[f'recovery_l{k}'])} | "
            f"{_ci(b['recovery_mean_pool'], ci['recovery_mean_pool'], 2)} |")
    horizons = results.get("horizons", [h])
    if len(horizons) > 1:
        lines += ["", "By horizon (the first H of the scored tokens):", "",
                  "| level | H | full | truncated | gist | ΔNLL gist | recovery gist |",
                  "|---|--:|--:|--:|--:|--:|--:|"]
        for k in _levels(results):
            for hh, b in results[f"l{k}"]["by_horizon"].items():
                lines.append(f"| L{k} | {hh} | {_f(b['nll_full'])} | {_f(b['nll_truncated'])} "
                             f"| {_f(b[f'nll_gist_l{k}'])} | "
                             f"{_ci(b[f'delta_nll_l{k}'], b['ci95'][f'delta_nll_l{k}'], sign=True)}"
                             f" | {_ci(b[f'recovery_l{k}'], b['ci95'][f'recovery_l{k}'])} |")
    mixed = [(k, results[f"l{k}"]) for k in _levels(results) if "mixed" in results[f"l{k}"]]
    if mixed:
        lines += ["", f"Mixed-level working contexts chosen by the focus allocator "
                      f"(scorer `{results['mixed_scorer']}`); budget W = entries for old "
                      f"context + tail:", "",
                  "| level | W | entries | NLL | ΔNLL | recovery |", "|---|--:|---|--:|--:|--:|"]
        for k, b in mixed:
            lines.append(f"| L{k} | {b['num_gists'] + b['tail_tokens']} (coarsest) | "
                         f"{b['num_gists']} L{k} + {b['tail_tokens']} L0 | "
                         f"{_f(b[f'nll_gist_l{k}'])} | {_f(b[f'delta_nll_l{k}'], sign=True)} | "
                         f"{_f(b[f'recovery_l{k}'])} |")
            for m in b["mixed"]:
                lines.append(f"| L{k} | {m['budget']} | {_layout(m)} | {_f(m['nll'])} | "
                             f"{_ci(m['delta_nll'], m['ci95']['delta_nll'], sign=True)} | "
                             f"{_ci(m['recovery'], m['ci95']['recovery'])} |")
            lines.append(f"| L{k} | {b['context_tokens'] + b['tail_tokens']} (all raw) | "
                         f"{b['context_tokens'] + b['tail_tokens']} L0 | {_f(b['nll_full'])} "
                         f"| +0.000 | 1.000 |")
    if results.get("variants"):
        lines += ["", "Variants of the gist condition (same windows):", "",
                  "| variant | level | full | truncated | gist | ΔNLL | recovery |",
                  "|---|---|--:|--:|--:|--:|--:|"]
        main = f"positions={results['position_mode']} gist_rope={results['gist_rope']} (main)"
        for k in _levels(results):
            b = results[f"l{k}"]
            lines.append(f"| {main} | L{k} | {_f(b['nll_full'])} | {_f(b['nll_truncated'])} | "
                         f"{_f(b[f'nll_gist_l{k}'])} | "
                         f"{_ci(b[f'delta_nll_l{k}'], b['ci95'][f'delta_nll_l{k}'], sign=True)}"
                         f" | {_ci(b[f'recovery_l{k}'], b['ci95'][f'recovery_l{k}'])} |")
        for v in results["variants"]:
            for k in _levels(results):
                b = v.get(f"l{k}")
                if b is None:
                    continue
                lines.append(f"| {v['name']} | L{k} | {_f(b['nll_full'])} | "
                             f"{_f(b['nll_truncated'])} | {_f(b['nll_gist'])} | "
                             f"{_ci(b['delta_nll'], b['ci95']['delta_nll'], sign=True)} | "
                             f"{_ci(b['recovery'], b['ci95']['recovery'])} |")
    dist = results.get("distance")
    if dist:
        lines += ["", f"By distance (L1, {dist['num_windows']} windows): one group of spans "
                      f"replaced by gists, or dropped, the rest raw; distance = tokens from "
                      f"the group's center to the first scored token:", "",
                  "| spans | distance | ΔNLL gists | ΔNLL dropped | recovery |",
                  "|---|--:|--:|--:|--:|"]
        for r in dist["buckets"]:
            ci = r["ci95"]
            lines.append(f"| {r['spans'][0]}–{r['spans'][1]} | {r['distance']:.0f} | "
                         f"{_ci(r['delta_nll_gist'], ci['delta_nll_gist'], sign=True)} | "
                         f"{_ci(r['delta_nll_dropped'], ci['delta_nll_dropped'], sign=True)} | "
                         f"{_ci(r['recovery'], ci['recovery'], 2)} |")
    if passkey:
        lines += ["", passkey_markdown(passkey)]
    return "\n".join(lines) + "\n"


def passkey_markdown(p: dict) -> str:
    depths = p["depths"]
    lines = [f"Passkey retrieval ({p['trials']} keys per cell, {p['digits']} digits; memory "
             f"budget W = {p['budget']}, scorer `{p['scorer']}` with the question as query; "
             f"truncated = the last {p['budget']} tokens only):",
             "", "| condition | memory tokens | " + " | ".join(f"depth {d:g}" for d in depths)
             + " | mean |", "|---|--:|" + "--:|" * (len(depths) + 1)]
    for cond in p["conditions"]:
        for i, n in enumerate(p["lengths"]):
            row = p[cond]["accuracy"][i]
            cells = " | ".join("n/a" if a is None else f"{a:.2f}" for a in row)
            valid = [a for a in row if a is not None]
            mean = f"{np.mean(valid):.2f}" if valid else "n/a"
            lines.append(f"| {cond} | {n:,} | {cells} | {mean} |")
    return "\n".join(lines)


# -- plots ---------------------------------------------------------------------------------

def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _err(value, ci):
    if not ci or value is None:
        return [[0.0], [0.0]]
    return [[max(value - ci[0], 0.0)], [max(ci[1] - value, 0.0)]]


def plot_levels(results: dict, path: Path) -> Path:
    """ΔNLL against the full context, per level, for truncation, mean pooling and gists."""
    levels = _levels(results)
    fig, (ax,) = _figure(1.6 + 2.4 * len(levels), 4.2)
    gists = "GistNet gists" if results["compressor"] != "mean" else "gists (mean pooling)"
    conds = [("truncated", "truncated (spans dropped)", "delta_nll_truncated"),
             ("mean_pool", "mean-pooled spans", "delta_nll_mean_pool"),
             ("gist", gists, None)]
    width = 0.26
    for j, (cond, label, key) in enumerate(conds):
        for i, k in enumerate(levels):
            b = results[f"l{k}"]
            name = key or f"delta_nll_l{k}"
            value, ci = b[name], b["ci95"][name]
            x = i + (j - 1) * width
            ax.bar(x, value, width, color=CONDITION_COLORS[cond], label=label if i == 0 else None,
                   yerr=_err(value, ci), capsize=3, ecolor="black")
            # the label clears the error bar: above it for a loss, below it for a gain
            end = (ci[1] if value >= 0 else ci[0]) if ci else value
            ax.annotate(f"{value:+.2f}", (x, end), ha="center", fontsize=8,
                        va="bottom" if value >= 0 else "top", xytext=(0, 2 if value >= 0 else -2),
                        textcoords="offset points")
    ax.axhline(0, color="black", lw=1, label="full context (ΔNLL = 0)")
    ax.margins(y=0.12)
    ax.set_xticks(range(len(levels)))
    ax.set_xticklabels([f"L{k}: {results[f'l{k}']['num_gists']} × {32 ** k} tokens\n"
                        f"({results[f'l{k}']['num_windows']} windows)" for k in levels],
                       fontsize=8)
    ax.set_ylabel(f"ΔNLL vs full context (nats/token, H = {results['horizon']})")
    ax.set_title(f"Substitutability by level: {results['compressor']} (95% bootstrap CI)",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=130)
    return path


def plot_distance(results: dict, path: Path) -> Path:
    """ΔNLL when one group of spans at a given distance is replaced by gists, or dropped."""
    dist = results["distance"]
    rows = dist["buckets"]
    fig, (ax,) = _figure(6.4, 4.2)
    x = np.array([r["distance"] for r in rows])
    for key, label, color in (("delta_nll_dropped", "group dropped", "tab:red"),
                              ("delta_nll_gist", "group replaced by gists", "tab:blue")):
        y = np.array([r[key] for r in rows])
        lo = np.array([r["ci95"][key][0] if r["ci95"][key] else r[key] for r in rows])
        hi = np.array([r["ci95"][key][1] if r["ci95"][key] else r[key] for r in rows])
        ax.errorbar(x, y, yerr=[np.maximum(y - lo, 0), np.maximum(hi - y, 0)], marker="o",
                    capsize=3, color=color, label=label)
    ax.axhline(0, color="black", lw=1, label="full context")
    ax.set_xlabel("distance from the group's center to the first scored token (tokens)")
    ax.set_ylabel("ΔNLL vs full context (nats/token)")
    ax.set_title(f"Substitutability by distance (L1, {dist['num_windows']} windows, "
                 f"95% CI)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=130)
    return path


def plot_budget(results: dict, path: Path) -> Path:
    """NLL of mixed-level working contexts against the budget, with the baselines as lines."""
    levels = [k for k in _levels(results) if "mixed" in results[f"l{k}"]]
    fig, axes = _figure(5.2 * len(levels), 4.2, ncols=len(levels))
    for ax, k in zip(axes, levels, strict=True):
        b = results[f"l{k}"]
        lowest = b["num_gists"] + b["tail_tokens"]
        everything = b["context_tokens"] + b["tail_tokens"]
        xs = [lowest] + [m["budget"] for m in b["mixed"]] + [everything]
        ys = [b[f"nll_gist_l{k}"]] + [m["nll"] for m in b["mixed"]] + [b["nll_full"]]
        order = np.argsort(xs, kind="stable")
        ax.plot(np.array(xs)[order], np.array(ys)[order], color=CONDITION_COLORS["mixed"],
                marker="o", label="allocator's mixed context")
        for m in b["mixed"]:
            ci = m["ci95"]["nll"]
            if ci:
                ax.errorbar(m["budget"], m["nll"], yerr=_err(m["nll"], ci), capsize=3,
                            color=CONDITION_COLORS["mixed"])
            ax.annotate(_layout(m), (m["budget"], m["nll"]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        for value, label, color, style in (
                (b["nll_full"], "full context", "black", "-"),
                (b["nll_truncated"], "truncated (old context dropped)", "tab:red", "--"),
                (b[f"nll_gist_l{k}"], f"all L{k} gists (coarsest cover)", "tab:blue", ":")):
            ax.axhline(value, color=color, ls=style, lw=1, label=f"{label}: {value:.3f}")
        ax.set_xscale("log")
        ax.set_xlabel("budget W: working-context entries before the scored tokens (log)")
        ax.set_ylabel(f"NLL (nats/token, H = {results['horizon']})")
        ax.set_title(f"L{k} windows: {b['context_tokens']} old + {b['tail_tokens']} tail "
                     f"tokens ({b['num_windows']} windows)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.savefig(path, dpi=130)
    return path


def plot_passkey(p: dict, path: Path) -> Path:
    """Accuracy by memory length × key depth, one heatmap per condition."""
    conds = p["conditions"]
    fig, axes = _figure(1.5 + 3.2 * len(conds), 1.6 + 0.6 * len(p["lengths"]), ncols=len(conds))
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad="lightgray")
    image = None
    for ax, cond in zip(axes, conds, strict=True):
        grid = np.array([[np.nan if a is None else a for a in row]
                         for row in p[cond]["accuracy"]], dtype=np.float64)
        image = ax.imshow(np.ma.masked_invalid(grid), vmin=0, vmax=1, cmap=cmap, aspect="auto")
        for (i, j), a in np.ndenumerate(grid):
            ax.text(j, i, "n/a" if np.isnan(a) else f"{a:.2f}", ha="center", va="center",
                    fontsize=8, color="white" if not np.isnan(a) and a < 0.6 else "black")
        ax.set_xticks(range(len(p["depths"])))
        ax.set_xticklabels([f"{d:g}" for d in p["depths"]])
        ax.set_yticks(range(len(p["lengths"])))
        ax.set_yticklabels([f"{n:,}" for n in p["lengths"]])
        ax.set_xlabel("key depth (0 = oldest, 1 = newest)")
        ax.set_ylabel("memory (tokens)")
        ax.set_title(p[cond]["title"], fontsize=9)
    fig.colorbar(image, ax=list(axes), label="accuracy")
    fig.savefig(path, dpi=130)
    return path


def plot_all(results: dict, out: Path) -> list[Path]:
    """Every plot the results support, into ``out``."""
    paths = [plot_levels(results, out / "delta_nll_by_level.png")]
    if results.get("distance"):
        paths.append(plot_distance(results, out / "delta_nll_by_distance.png"))
    if any("mixed" in results[f"l{k}"] for k in _levels(results)):
        paths.append(plot_budget(results, out / "nll_vs_budget.png"))
    return paths
