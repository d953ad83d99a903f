"""Which windows make a recovery number? Level-1 recovery broken down by window and document.

Per level-1 evaluation window: its document, the NLL gap that the full context closes over
truncation, and what the gists and the content-free constant (the untrained GistNet's output
prior) close of it; then the documents' shares of windows and of the gap. ``recovery`` is a
ratio of means, so windows with large gaps and documents with many windows (windows are spaced
evenly over the split's tokens) weigh most; the breakdown shows how much one document or one
window moves it.

The entry point is ``eval/window_breakdown.py``; what it found on the pystdlib test split is in
docs/training.md ("What the test split's number is made of").
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from megacontext.evaluation.config import SubstitutabilityConfig
from megacontext.evaluation.substitutability import score_level
from megacontext.gistnet import Compressor, ConstantGist


def _ratio(closed: np.ndarray, gap: np.ndarray, sel) -> float:
    return float(closed[sel].sum() / gap[sel].sum())


@torch.inference_mode()
def window_breakdown(lm, corpus, windows: list, compressor: Compressor,
                     cfg: SubstitutabilityConfig, top: int = 3) -> dict:
    """Score the level-1 ``windows`` (``evaluation_windows(...)[1]``) with ``compressor`` and
    the constant, and break level-1 recovery down.

    Returns:
        ``windows`` (one row per window, sorted by gap: ``document``, ``offset``, ``gap`` =
        NLL(truncated) − NLL(full), ``gists_close`` and ``constant_closes`` = NLL(truncated) −
        NLL(condition), nats/token over the horizon), ``num_windows``, ``num_documents``,
        ``mean_gap``, ``recovery`` and ``constant_recovery`` (ratios of the means),
        ``documents`` (the ``top`` documents with most windows: ``windows``, ``gap_share``,
        ``recovery`` on their windows), ``without_document`` (recovery without the first of
        them) and ``without_largest_gap`` (its ``document``, ``gap`` and recovery without it).
    """
    constant = ConstantGist.prior(lm.model.embed_tokens.weight.detach().float())
    scores = score_level(lm, corpus, windows, 1, compressor, {"constant": constant}, cfg)
    m = {k: v.mean(axis=1) for k, v in scores.nll.items()}  # per window
    gap = m["truncated"] - m["full"]
    gist = m["truncated"] - m["gist"]
    const = m["truncated"] - m["constant"]
    names = [corpus.names[w.doc] for w in windows]
    every = np.arange(len(windows))
    share = Counter(names)
    documents = []
    for name, n in share.most_common(top):
        sel = np.array([x == name for x in names])
        documents.append({"document": name, "windows": n,
                          "gap_share": float(gap[sel].sum() / gap.sum()),
                          "recovery": _ratio(gist, gap, sel)})
    big = documents[0]["document"]
    largest = int(gap.argmax())
    return {
        "windows": [{"document": names[i], "offset": int(windows[i].offset),
                     "gap": float(gap[i]), "gists_close": float(gist[i]),
                     "constant_closes": float(const[i])}
                    for i in sorted(every, key=lambda i: gap[i])],
        "num_windows": len(windows), "num_documents": len(share),
        "mean_gap": float(gap.mean()), "recovery": _ratio(gist, gap, every),
        "constant_recovery": _ratio(const, gap, every), "documents": documents,
        "without_document": {"document": big, "recovery": _ratio(
            gist, gap, np.array([x != big for x in names]))},
        "without_largest_gap": {"document": names[largest], "gap": float(gap[largest]),
                                "recovery": _ratio(gist, gap, every != largest)},
    }


def render_breakdown(r: dict) -> str:
    """The per-window table (sorted by gap) and the summary lines, as markdown."""
    lines = ["| document | offset | gap (truncated − full) | gists close | constant closes |",
             "|---|--:|--:|--:|--:|"]
    lines += [f"| {w['document']} | {w['offset']} | {w['gap']:.3f} | {w['gists_close']:+.3f} | "
              f"{w['constant_closes']:+.3f} |" for w in r["windows"]]
    lines += ["", f"{r['num_windows']} windows, {r['num_documents']} documents; recovery "
              f"{r['recovery']:+.3f} (constant {r['constant_recovery']:+.3f}); mean gap "
              f"{r['mean_gap']:.3f}"]
    lines += [f"  {d['document']}: {d['windows']} windows, {d['gap_share']:.0%} of the gap, "
              f"recovery on its windows {d['recovery']:+.3f}" for d in r["documents"]]
    w, g = r["without_document"], r["without_largest_gap"]
    lines += [f"  without {w['document']}'s windows: recovery {w['recovery']:+.3f}",
              f"  without the largest-gap window ({g['document']}, gap {g['gap']:.3f}): "
              f"recovery {g['recovery']:+.3f}"]
    return "\n".join(lines)
