"""Recovery, content recovery and the paired bootstrap, checked against numbers worked out by
hand (megacontext.evaluation.stats, megacontext.evaluation.substitutability summaries)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from megacontext.data import WindowKey
from megacontext.evaluation.config import (
    DistancePlan,
    MixedPlan,
    SubstitutabilityConfig,
    WindowPlan,
)
from megacontext.evaluation.stats import recovery, resample, summarize
from megacontext.evaluation.substitutability import LevelScores, summarize_level
from megacontext.substitution import Window

# Per-window mean NLL of three windows (nats/token). Means over windows, by hand:
# full 3.0, truncated 13/3, gist 3.5, constant 4.5, sink 4.0, mean pools 5.0 / 4.8.
PER_WINDOW = {
    "full": [2.0, 3.0, 4.0],
    "truncated": [3.0, 4.0, 6.0],
    "gist": [2.5, 3.8, 4.2],
    "constant": [3.5, 4.5, 5.5],
    "sink": [3.0, 4.0, 5.0],
    "mean_pool": [5.0, 5.0, 5.0],
    "mean_pool_rescaled": [4.8, 4.8, 4.8],
    "mixed@40": [2.2, 3.2, 4.6],
    "streaming@40": [2.9, 3.9, 5.2],
}


def test_recovery_by_hand():
    assert recovery(4.0, 3.5, 3.0) == pytest.approx(0.5)
    assert recovery(4.0, 4.5, 3.0) == pytest.approx(-0.5)  # worse than dropping the text
    assert recovery(4.0, 3.0, 3.0) == pytest.approx(1.0)
    assert np.isnan(recovery(3.0, 2.0, 3.0))  # no gap to recover
    np.testing.assert_allclose(recovery([4.0, 5.0], [3.5, 4.0], [3.0, 3.0]), [0.5, 0.5])


def test_bootstrap_interval_by_hand():
    per = {k: np.array(v) for k, v in PER_WINDOW.items()}
    # Two resamples: all window 0, all window 2. Recovery on them: (3 - 2.5)/(3 - 2) = 0.5
    # and (6 - 4.2)/(6 - 4) = 0.9; numpy's linear percentiles of {0.5, 0.9}: 0.51 and 0.89.
    idx = np.array([[0, 0, 0], [2, 2, 2]])
    out = summarize(per, {"recovery": lambda m: recovery(m["truncated"], m["gist"], m["full"]),
                          "delta": lambda m: m["gist"] - m["full"]}, idx)
    assert out["recovery"]["value"] == pytest.approx((13 / 3 - 3.5) / (13 / 3 - 3))  # 0.625
    assert out["recovery"]["ci95"] == pytest.approx([0.51, 0.89])
    # ΔNLL: 0.5 on window 0, 0.2 on window 2 -> [0.2075, 0.4925]
    assert out["delta"]["value"] == pytest.approx(0.5)
    assert out["delta"]["ci95"] == pytest.approx([0.2075, 0.4925])
    assert summarize(per, {"d": lambda m: m["gist"]}, resample(3, 0, 0, "x"))["d"]["ci95"] is None


def test_resampling_is_a_function_of_seed_key_and_size():
    a = resample(5, 4, seed=1, key="l1")
    assert a.shape == (4, 5) and a.min() >= 0 and a.max() <= 4
    assert np.array_equal(a, resample(5, 4, seed=1, key="l1"))
    assert not np.array_equal(a, resample(5, 4, seed=1, key="l2"))
    assert not np.array_equal(a, resample(5, 4, seed=2, key="l1"))


def test_level_block_by_hand():
    """The lK block of substitutability.json from known per-token NLLs (H = 2 tokens per
    window, each window's two tokens straddling its mean by ±0.1)."""
    n, horizon = 3, 2
    nll = {k: np.stack([np.array(v) - 0.1, np.array(v) + 0.1], axis=1)
           for k, v in PER_WINDOW.items()}
    window = Window(level=1, num_gists=3, tail=8, horizon=horizon)
    scores = LevelScores(1, window, [WindowKey(i, 0, 1) for i in range(n)], nll=nll,
                         targets=np.zeros((n, horizon), dtype=np.int64),
                         layouts={"mixed@40": {1: 2.0, 0: 38.0}})
    cfg = SubstitutabilityConfig(windows=WindowPlan(context_spans=3, tail_tokens=8,
                                                    horizon=horizon, horizons=(2,)),
                                 mixed=MixedPlan(budgets=(40,), levels=(1,)),
                                 distance=DistancePlan(num_windows=0), bootstrap=0)
    b = summarize_level(scores, cfg, SimpleNamespace(names=["a", "b", "c"]), seed=0)
    t = 13 / 3
    assert b["nll_full"] == pytest.approx(3.0)
    assert b["nll_truncated"] == pytest.approx(t)
    assert b["nll_gist_l1"] == pytest.approx(3.5)
    assert b["delta_nll_l1"] == pytest.approx(0.5)
    assert b["recovery_l1"] == pytest.approx(0.625)
    # content recovery: (constant − gist) / (constant − full) = (4.5 − 3.5) / 1.5
    assert b["content_recovery_l1"] == pytest.approx(2 / 3)
    assert b["recovery_constant_l1"] == pytest.approx((t - 4.5) / (t - 3.0))  # -0.125
    assert b["recovery_sink_l1"] == pytest.approx((t - 4.0) / (t - 3.0))  # 0.25
    assert b["gain_gist_vs_sink_l1"] == pytest.approx(0.5)
    assert b["recovery_mean_pool"] == pytest.approx((t - 5.0) / (t - 3.0))  # -0.5
    assert b["recovery_mean_pool_rescaled"] == pytest.approx((t - 4.8) / (t - 3.0))  # -0.35
    assert b["delta_nll_sink"] == pytest.approx(1.0)
    (m,) = b["mixed"]
    assert m["nll"] == pytest.approx(10 / 3)
    assert m["recovery"] == pytest.approx((t - 10 / 3) / (t - 3.0))  # 0.75
    assert m["nll_streaming"] == pytest.approx(4.0)
    assert m["recovery_streaming"] == pytest.approx((t - 4.0) / (t - 3.0))  # 0.25
    assert m["gain_vs_streaming"] == pytest.approx(4.0 - 10 / 3)
    assert m["entries"] == 40.0 and b["windows"] == [["a", 0], ["b", 0], ["c", 0]]
