"""The window breakdown (megacontext.evaluation.breakdown, eval/window_breakdown.py): its
recovery is eval/eval.py's on the same windows, and every share and leave-out follows from the
per-window rows it prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import random_text  # tests/ is on sys.path under pytest
from hydra import compose, initialize_config_dir

from megacontext.evaluation import evaluate

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["data=folder", "data.val_fraction=0.3", "data.test_fraction=0.3",
            "long_range.enabled=false", "passkey.enabled=false", "plots=false",
            "cache_dir=null", "substitutability.windows.context_spans=3",
            "substitutability.windows.tail_tokens=8", "substitutability.windows.horizon=8",
            "substitutability.windows.horizons=[8]", "substitutability.windows.num_l2_windows=0",
            "substitutability.mixed.budgets=[]", "substitutability.distance.num_windows=0",
            "substitutability.variants=[]", "substitutability.bootstrap=50"]


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """The breakdown of 10 test windows by the entry point, and eval/eval.py's evaluation of
    the same windows (mean pooling, level 1)."""
    root = tmp_path_factory.mktemp("breakdown")
    docs = root / "docs"
    docs.mkdir()
    for i in range(12):  # lengths 400 … 3,700: the longer documents hold more windows
        (docs / f"doc{i:02d}.txt").write_text(random_text(400 + 300 * i, seed=300 + i))
    overrides = [f"model.name={tiny_model_dir}", f"data.corpus={docs}",
                 f"+data.cache_dir={root / 'cache'}", *SETTINGS]
    out = root / "breakdown.json"
    done = subprocess.run([sys.executable, str(ROOT / "eval" / "window_breakdown.py"), "mean",
                           "--windows", "10", "--out", str(out), "--override", *overrides],
                          capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("eval", overrides=[*overrides, f"output_dir={root / 'eval'}",
                                         "split=test", "substitutability.windows.num_windows=10",
                                         "progress_bar=false"])
    return {"breakdown": json.loads(out.read_text()), "stdout": done.stdout,
            "eval": evaluate(cfg)["l1"]}


def test_recovery_is_the_evaluations_on_the_same_windows(setup):
    b, ev = setup["breakdown"], setup["eval"]
    assert b["num_windows"] == 10 == len(b["windows"])
    assert b["recovery"] == pytest.approx(ev["recovery_l1"], rel=1e-6)
    assert b["constant_recovery"] == pytest.approx(ev["recovery_constant_l1"], rel=1e-6)
    assert b["mean_gap"] == pytest.approx(ev["nll_truncated"] - ev["nll_full"], rel=1e-6)
    assert b["recovery"] != pytest.approx(b["constant_recovery"])  # two different conditions


def test_shares_and_leave_outs_follow_from_the_rows(setup):
    b = setup["breakdown"]
    rows = b["windows"]
    gap = np.array([w["gap"] for w in rows])
    closed = np.array([w["gists_close"] for w in rows])
    names = [w["document"] for w in rows]
    assert list(gap) == sorted(gap)
    assert b["recovery"] == pytest.approx(closed.sum() / gap.sum())
    assert b["constant_recovery"] == pytest.approx(
        sum(w["constant_closes"] for w in rows) / gap.sum())
    assert b["num_documents"] == len(set(names)) > 1
    counts = sorted((names.count(n) for n in set(names)), reverse=True)
    assert [d["windows"] for d in b["documents"]] == counts[:3]
    for d in b["documents"]:
        sel = np.array([n == d["document"] for n in names])
        assert d["gap_share"] == pytest.approx(gap[sel].sum() / gap.sum())
        assert d["recovery"] == pytest.approx(closed[sel].sum() / gap[sel].sum())
    big = b["documents"][0]["document"]
    assert b["without_document"]["document"] == big
    keep = np.array([n != big for n in names])
    assert b["without_document"]["recovery"] == pytest.approx(closed[keep].sum()
                                                              / gap[keep].sum())
    top = b["without_largest_gap"]
    assert top["gap"] == gap[-1] and top["document"] == names[-1]
    assert top["recovery"] == pytest.approx(closed[:-1].sum() / gap[:-1].sum())
    assert f"recovery {b['recovery']:+.3f}" in setup["stdout"]
    assert setup["stdout"].count("\n| doc") == 10
