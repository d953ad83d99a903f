"""Means over windows and paired 95% bootstrap intervals.

Axes: ``n`` windows, ``B`` bootstrap resamples, ``H`` scored tokens.

The unit of resampling is the window: its tokens are neighbours in one document and far from
independent, so resampling tokens would understate the uncertainty. One set of resampled
window indices serves every statistic of a level (paired resampling): a difference such as
ΔNLL = NLL(gists) − NLL(full) is resampled as a difference of the same windows, which is much
tighter than the two NLLs' separate intervals suggest.

Document-balanced statistics (``..._doc``) weigh every document once: the per-window means
are first averaged within each document (:func:`by_document`), then the same statistics are
taken over documents, and the bootstrap resamples documents (docs/evaluation.md,
"Document-balanced numbers"). A document holding many windows then cannot dominate a mean.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from megacontext.substitution import recovery  # the one definition, vectorized

__all__ = ["Statistic", "by_document", "recovery", "resample", "summarize"]

Statistic = Callable[[Mapping[str, np.ndarray]], np.ndarray]


def resample(n: int, num: int, seed: int, key: str) -> np.ndarray:
    """``[B, n]`` window indices drawn with replacement, a function of (seed, key, n) only."""
    if num == 0 or n == 0:
        return np.zeros((0, n), dtype=np.int64)
    digest = [ord(ch) for ch in key]
    return np.random.default_rng([seed, n, *digest]).integers(0, n, size=(num, n))


def summarize(per_window: Mapping[str, np.ndarray], statistics: Mapping[str, Statistic],
              indices: np.ndarray) -> dict[str, dict]:
    """Point estimates and 95% percentile intervals.

    Args:
        per_window: condition → ``[n]`` per-window mean NLL (nats/token).
        statistics: name → function of a mapping condition → mean over windows (a float, or
            ``[B]`` resampled means); it must work elementwise.
        indices: ``[B, n]`` resampled window indices (``resample``); B = 0 gives no interval.

    Returns:
        name → ``{"value": float, "ci95": [lo, hi] | None}``.
    """
    means = {k: float(np.mean(v)) for k, v in per_window.items()}
    boot = {k: np.asarray(v, dtype=np.float64)[indices].mean(axis=1)  # [B]
            for k, v in per_window.items()} if indices.size else {}
    out = {}
    for name, fn in statistics.items():
        value = float(fn(means))
        ci = None
        if boot:
            samples = np.asarray(fn(boot), dtype=np.float64)  # [B]
            finite = samples[np.isfinite(samples)]
            if finite.size >= max(2, samples.size // 2):
                lo, hi = np.percentile(finite, [2.5, 97.5])
                ci = [float(lo), float(hi)]
        out[name] = {"value": value, "ci95": ci}
    return out


def by_document(per_window: Mapping[str, np.ndarray], docs) -> dict[str, np.ndarray]:
    """condition → ``[D]`` mean of the per-window values of each document, in the order of
    the documents' first windows (``docs [n]``: the document of each window).

    Raises:
        ValueError: ``docs`` and a condition's values differ in length.
    """
    docs = np.asarray(docs).reshape(-1)
    _, first, inverse = np.unique(docs, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # documents in order of appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    group = rank[inverse]  # [n] document index of each window, 0 .. D-1
    counts = np.bincount(group, minlength=order.size).astype(np.float64)
    out = {}
    for name, values in per_window.items():
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if v.size != docs.size:
            raise ValueError(f"{name}: {v.size} values for {docs.size} windows")
        out[name] = np.bincount(group, weights=v, minlength=order.size) / counts
    return out
