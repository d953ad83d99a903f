"""Means over windows and paired 95% bootstrap intervals.

Axes: ``n`` windows, ``B`` bootstrap resamples, ``H`` scored tokens.

The unit of resampling is the window: its tokens are neighbours in one document and far from
independent, so resampling tokens would understate the uncertainty. One set of resampled
window indices serves every statistic of a level (paired resampling): a difference such as
ΔNLL = NLL(gists) − NLL(full) is resampled as a difference of the same windows, which is much
tighter than the two NLLs' separate intervals suggest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from megacontext.substitution import recovery  # the one definition, vectorized

__all__ = ["Statistic", "recovery", "resample", "summarize"]

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
