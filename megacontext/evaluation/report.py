"""The evaluation's human-readable outputs: a markdown table and PNG plots.

Everything here reads the JSON-ready results only (``substitutability.json``,
``passkey.json``), so a figure can be redrawn from a finished run without the model.
Plots use a ``Figure`` with an Agg canvas (no pyplot: no global backend, no open figures;
the helpers shared with ``long_range`` are in ``render``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megacontext.evaluation.long_range import long_range_markdown, plot_long_range, verdict_lines
from megacontext.evaluation.render import error_bar, figure, interval, number, verdict
from megacontext.spans import node_size

CONDITION_COLORS = {"truncated": "tab:red", "mean_pool": "tab:gray", "gist": "tab:blue",
                    "full": "black", "mixed": "tab:green", "sink": "tab:orange",
                    "constant": "tab:purple", "mean_pool_rescaled": "silver",
                    "streaming": "tab:brown", "recent": "tab:olive"}


def _levels(results: dict) -> list[int]:
    return sorted(int(k[1:]) for k in results if k[:1] == "l" and k[1:].isdigit())


def _layout(entry: dict) -> str:
    return " + ".join(f"{v:g} {k}" for k, v in entry["entries_by_level"].items())


CONDITION_LABELS = {
    "full": "full context",
    "truncated": "truncated (old context dropped)",
    "sink": "sink: truncated + first {sink} tokens",
    "mean_pool": "mean pool",
    "mean_pool_rescaled": "mean pool, rescaled",
    "constant": "constant (content-free placeholder)",
    "gist": "**gist**",
}

ROW_COLUMNS = ["level", "condition", "entries", "nll", "nll_lo", "nll_hi", "delta_nll",
               "delta_nll_lo", "delta_nll_hi", "recovery", "recovery_lo", "recovery_hi"]


def _keys(cond: str, k: int) -> tuple[str, str | None, str | None]:
    """(NLL key, ΔNLL key, recovery key) of ``cond`` in an ``lK`` block."""
    return {"full": ("nll_full", None, None),
            "truncated": ("nll_truncated", "delta_nll_truncated", None),
            "sink": ("nll_sink", "delta_nll_sink", f"recovery_sink_l{k}"),
            "mean_pool": ("nll_mean_pool", "delta_nll_mean_pool", "recovery_mean_pool"),
            "mean_pool_rescaled": ("nll_mean_pool_rescaled", "delta_nll_mean_pool_rescaled",
                                   "recovery_mean_pool_rescaled"),
            "constant": ("nll_constant", "delta_nll_constant", f"recovery_constant_l{k}"),
            "gist": (f"nll_gist_l{k}", f"delta_nll_l{k}", f"recovery_l{k}")}[cond]


def _cell(block: dict, key: str | None, default: float | None = None) -> list:
    if key is None:
        return [default, None, None]
    ci = block.get("ci95", {}).get(key) or [None, None]
    return [block.get(key), *ci]


def condition_rows(results: dict) -> tuple[list[str], list[list]]:
    """One row per (level, condition): entries before the scored tokens, NLL, ΔNLL vs full and
    recovery vs truncated, each with its 95% interval (None where there is none). The mixed
    working contexts and their streaming baselines come after each level's fixed conditions."""
    rows = []
    sink = results.get("sink_tokens", 4)
    for k in _levels(results):
        b = results[f"l{k}"]
        g, tail = b["num_gists"], b["tail_tokens"]
        entries = {"full": b["context_tokens"] + tail, "truncated": tail,
                   "sink": min(sink, b["context_tokens"]) + tail}
        for cond in CONDITION_LABELS:
            nll, delta, rec = _keys(cond, k)
            if nll not in b:
                continue
            fixed = {"full": (0.0, 1.0), "truncated": (None, 0.0)}.get(cond, (None, None))
            rows.append([k, cond, entries.get(cond, g + tail), *_cell(b, nll),
                         *_cell(b, delta, fixed[0]), *_cell(b, rec, fixed[1])])
        for m in b.get("mixed", []):
            w = m["budget"]
            rows.append([k, f"mixed@{w}", m["entries"], *_cell(m, "nll"),
                         *_cell(m, "delta_nll"), *_cell(m, "recovery")])
            for base in ("streaming", "recent"):
                if f"nll_{base}" in m:
                    rows.append([k, f"{base}@{w}", w, *_cell(m, f"nll_{base}"),
                                 *_cell(m, f"delta_nll_{base}"), *_cell(m, f"recovery_{base}")])
            if "nll_compare" in m:
                rows.append([k, f"mixed[{results.get('mixed_compare')}]@{w}",
                             m.get("entries_compare", w),
                             *_cell(m, "nll_compare"), None, None, None, None, None, None])
    return ROW_COLUMNS, rows


def _level_title(results: dict, k: int) -> str:
    b = results[f"l{k}"]
    mark = " — **untrained level** (allow_untrained_levels)" \
        if k in (results.get("untrained_levels") or []) else ""
    return (f"L{k}: {b['num_gists']} × {node_size(k)} old tokens → {b['num_gists']} "
            f"gist{'s' if b['num_gists'] > 1 else ''} + {b['tail_tokens']} raw tail "
            f"({b['num_windows']} windows, {b['num_documents']} documents){mark}")


def verdicts(results: dict, passkey: dict | None = None) -> list[str]:
    """One line per budget: the memory (``mixed@W``) against StreamingLLM at the same number
    of entries, the paired gain [95% CI] in nats/token and its verdict in words; the same
    document-balanced, and against ``recent@W``; then long range and passkey."""
    out = []
    for k in _levels(results):
        b = results[f"l{k}"]
        for m in b.get("mixed", []):
            if "gain_vs_streaming" not in m:
                continue
            ci = m["ci95"]
            g, gd = m["gain_vs_streaming"], m.get("gain_vs_streaming_doc")
            line = (f"- **L{k}, W = {m['budget']}: {verdict(g, ci['gain_vs_streaming'])}** "
                    f"than streaming@{m['budget']} — gain "
                    f"{interval(g, ci['gain_vs_streaming'], sign=True)} nats/token over "
                    f"{b['num_windows']} windows")
            if gd is not None:
                line += (f"; document-balanced ({b['num_documents']} documents) "
                         f"{interval(gd, ci.get('gain_vs_streaming_doc'), sign=True)}: "
                         f"{verdict(gd, ci.get('gain_vs_streaming_doc'))}")
            if "gain_vs_recent" in m:
                line += (f"; vs recent@{m['budget']} "
                         f"{interval(m['gain_vs_recent'], ci['gain_vs_recent'], sign=True)}")
            out.append(line.replace("tie** than", "tie** with"))
    section = results.get("long_range")
    if section:
        out += [line.replace("- ", "- Long range, ", 1) for line in verdict_lines(section)]
    if passkey and "streaming" in passkey.get("conditions", []):
        for i, n in enumerate(passkey["lengths"]):
            rates = {c: passkey[c]["accuracy_by_length"][i] for c in ("memory", "streaming")}
            if None in rates.values():
                continue
            word = ("memory better" if rates["memory"] > rates["streaming"] else
                    "memory worse" if rates["memory"] < rates["streaming"] else "tie")
            out.append(f"- Passkey, {n:,} tokens, W = {passkey['budget']}: **{word}** — memory "
                       f"{rates['memory']:.2f}, streaming {rates['streaming']:.2f} "
                       f"({passkey['trials'] * len(passkey['depths'])} keys; no interval)")
    return out


def markdown(results: dict, passkey: dict | None = None) -> str:
    """The results as markdown tables (printed at the end of a run and saved), led by the
    verdicts against streaming at equal entries."""
    h = results["horizon"]
    split = results.get("split") or {}
    where = split.get("label", "held-out documents")
    if split.get("split") in ("test", "validation"):
        where += (f" (split by document hash: val_fraction {split.get('val_fraction')}, "
                  f"test_fraction {split.get('test_fraction')}, seed {split.get('seed')})")
    lines = [
        f"## Substitutability: {results['model']}, gists by `{results['compressor']}`",
        "",
        f"Windows of `{results['corpus']}`: {where}. NLL in nats/token on the same {h} scored "
        f"tokens per window ({results['num_tokens_scored']:,} per condition, "
        f"{results['num_documents']} documents); [95% bootstrap interval over windows, paired]; "
        f"gists at `{results['position_mode']}` positions, gist RoPE "
        f"`{results['gist_rope']}`. Recovery = (truncated − X) / (truncated − full); content "
        f"recovery = (constant − gist) / (constant − full), what the gist's content buys "
        f"beyond a placeholder at the same positions.",
    ]
    lead = verdicts(results, passkey)
    if lead:
        lines += ["", "### Memory vs streaming at equal entries", "",
                  "Gain = NLL(streaming@W) − NLL(memory's mixed@W), paired over the same "
                  "windows; > 0: the memory is better. Streaming@W = the first "
                  f"{results.get('sink_tokens', 4)} tokens + the most recent ones, W entries at "
                  "cache ranks (StreamingLLM); recent@W = the last W tokens.", "", *lead]
    if split.get("cross_domain"):
        lines += ["", f"**Cross-domain**: GistNet was trained on `{split['training_corpus']}`; "
                      f"every document of `{results['corpus']}` is evaluated."]
    columns, rows = condition_rows(results)
    for k in _levels(results):
        b = results[f"l{k}"]
        ci = b["ci95"]
        sink = results.get("sink_tokens", 4)
        lines += ["", f"### {_level_title(results, k)}", "",
                  "| condition | entries | NLL | ΔNLL vs full | recovery |",
                  "|---|--:|--:|--:|--:|"]
        for r in rows:
            if r[0] != k:
                continue
            label = CONDITION_LABELS.get(r[1], r[1]).format(sink=sink)
            lines.append(f"| {label} | {r[2]:g} | {interval(r[3], r[4:6])} | "
                         f"{interval(r[6], r[7:9] if r[7] is not None else None, sign=True)} | "
                         f"{interval(r[9], r[10:12] if r[10] is not None else None)} |")
        content, gain = f"content_recovery_l{k}", f"gain_gist_vs_sink_l{k}"
        lines += ["", f"Content recovery L{k}: {interval(b[content], ci[content])}; gist gain "
                      f"over sink: {interval(b[gain], ci[gain], sign=True)} nats/token."]
        rec = f"recovery_l{k}"
        if f"{rec}_doc" in b:
            lines += ["", f"Document-balanced ({b['num_documents']} documents weigh once; "
                          f"bootstrap over documents): recovery "
                          f"{interval(b[rec + '_doc'], ci[rec + '_doc'])}, content recovery "
                          f"{interval(b[content + '_doc'], ci[content + '_doc'])}."]
    horizons = results.get("horizons", [h])
    if len(horizons) > 1:
        lines += ["", "By horizon (the first H of the scored tokens):", "",
                  "| level | H | full | truncated | gist | ΔNLL gist | recovery gist |",
                  "|---|--:|--:|--:|--:|--:|--:|"]
        for k in _levels(results):
            for hh, b in results[f"l{k}"]["by_horizon"].items():
                d, r = f"delta_nll_l{k}", f"recovery_l{k}"
                lines.append(f"| L{k} | {hh} | {number(b['nll_full'])} | "
                             f"{number(b['nll_truncated'])} | {number(b[f'nll_gist_l{k}'])} | "
                             f"{interval(b[d], b['ci95'][d], sign=True)}"
                             f" | {interval(b[r], b['ci95'][r])} |")
    if any("mixed" in results[f"l{k}"] for k in _levels(results)):
        lines += ["", f"`mixed@W`: the working context the focus allocator (scorer "
                      f"`{results['mixed_scorer']}`) builds under a budget of W entries for old "
                      f"context + tail; `streaming@W`: the first {results.get('sink_tokens', 4)}"
                      f" tokens + the most recent raw tokens, W entries in all."]
        compare = results.get("mixed_compare")
        for k in _levels(results) if compare else ():
            for m in results[f"l{k}"].get("mixed", []):
                gain = interval(m["gain_vs_compare"], m["ci95"]["gain_vs_compare"], sign=True)
                lines.append(f"- L{k}, W = {m['budget']}: NLL under `{compare}` − under "
                             f"`{results['mixed_scorer']}` = {gain} (paired over the same "
                             f"windows; > 0: `{results['mixed_scorer']}` is better)")
    if results.get("variants"):
        lines += ["", "Variants of the gist condition (same windows):", "",
                  "| variant | level | full | truncated | gist | ΔNLL | recovery |",
                  "|---|---|--:|--:|--:|--:|--:|"]
        main = f"positions={results['position_mode']} gist_rope={results['gist_rope']} (main)"
        for k in _levels(results):
            b = results[f"l{k}"]
            d, r = f"delta_nll_l{k}", f"recovery_l{k}"
            lines.append(f"| {main} | L{k} | {number(b['nll_full'])} | "
                         f"{number(b['nll_truncated'])} | {number(b[f'nll_gist_l{k}'])} | "
                         f"{interval(b[d], b['ci95'][d], sign=True)}"
                         f" | {interval(b[r], b['ci95'][r])} |")
        for v in results["variants"]:
            for k in _levels(results):
                b = v.get(f"l{k}")
                if b is None:
                    continue
                lines.append(f"| {v['name']} | L{k} | {number(b['nll_full'])} | "
                             f"{number(b['nll_truncated'])} | {number(b['nll_gist'])} | "
                             f"{interval(b['delta_nll'], b['ci95']['delta_nll'], sign=True)} | "
                             f"{interval(b['recovery'], b['ci95']['recovery'])} |")
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
                         f"{interval(r['delta_nll_gist'], ci['delta_nll_gist'], sign=True)} | "
                         f"{interval(r['delta_nll_dropped'], ci['delta_nll_dropped'], sign=True)}"
                         " | "
                         f"{interval(r['recovery'], ci['recovery'], 2)} |")
    if results.get("long_range"):
        lines += ["", long_range_markdown(results["long_range"])]
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

def plot_levels(results: dict, path: Path) -> Path:
    """ΔNLL against the full context, per level, for truncation, mean pooling and gists."""
    levels = _levels(results)
    fig, (ax,) = figure(2.4 + 3.4 * len(levels), 4.4)
    gists = "GistNet gists" if results["compressor"] != "mean" else "gists (mean pooling)"
    conds = [("truncated", "truncated (spans dropped)", "delta_nll_truncated"),
             ("sink", f"sink ({results.get('sink_tokens', 4)} first tokens kept)",
              "delta_nll_sink"),
             ("constant", "constant placeholder", "delta_nll_constant"),
             ("mean_pool_rescaled", "mean pool, rescaled", "delta_nll_mean_pool_rescaled"),
             ("gist", gists, None)]
    width = 0.8 / len(conds)
    for j, (cond, label, key) in enumerate(conds):
        for i, k in enumerate(levels):
            b = results[f"l{k}"]
            name = key or f"delta_nll_l{k}"
            value, ci = b[name], b["ci95"][name]
            x = i + (j - (len(conds) - 1) / 2) * width
            ax.bar(x, value, width, color=CONDITION_COLORS[cond], label=label if i == 0 else None,
                   yerr=error_bar(value, ci), capsize=3, ecolor="black")
            # the label clears the error bar: above it for a loss, below it for a gain
            end = (ci[1] if value >= 0 else ci[0]) if ci else value
            ax.annotate(f"{value:+.2f}", (x, end), ha="center", fontsize=8,
                        va="bottom" if value >= 0 else "top", xytext=(0, 2 if value >= 0 else -2),
                        textcoords="offset points")
    ax.axhline(0, color="black", lw=1, label="full context (ΔNLL = 0)")
    ax.margins(y=0.12)
    ax.set_xticks(range(len(levels)))
    ax.set_xticklabels([f"L{k}: {results[f'l{k}']['num_gists']} × {node_size(k)} tokens\n"
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
    fig, (ax,) = figure(6.4, 4.2)
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
    fig, axes = figure(5.2 * len(levels), 4.2, ncols=len(levels))
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
                ax.errorbar(m["budget"], m["nll"], yerr=error_bar(m["nll"], ci), capsize=3,
                            color=CONDITION_COLORS["mixed"])
            ax.annotate(_layout(m), (m["budget"], m["nll"]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        for base, label, marker in (("streaming", "streaming: sinks + recent, at ranks", "s"),
                                    ("recent", "recent: last W tokens", "^")):
            pts = [(m["budget"], m[f"nll_{base}"]) for m in b["mixed"] if f"nll_{base}" in m]
            if pts:
                sx, sy = zip(*sorted(pts), strict=True)
                ax.plot(sx, sy, color=CONDITION_COLORS[base], marker=marker, ls="--",
                        label=label)
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
    fig, axes = figure(1.5 + 3.2 * len(conds), 1.6 + 0.6 * len(p["lengths"]), ncols=len(conds))
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
    if results.get("long_range"):
        paths.append(plot_long_range(results["long_range"], out / "long_range.png"))
    return paths
