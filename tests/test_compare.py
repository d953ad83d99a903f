"""Paired A/B between GistNet exports (megacontext.evaluation.compare, eval/compare.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from megacontext.base import BaseLM
from megacontext.data import WindowKey, WindowLayout
from megacontext.evaluation.compare import (
    compare,
    gistnet_dependent,
    paired_differences,
    split_argv,
)
from megacontext.evaluation.summary import LevelScores
from megacontext.gistnet import GistNet, GistNetConfig, gistnet_digest, load_gistnet, save_gistnet
from tests.conftest import random_text

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TAIL, HORIZON = 8, 8


# -- the pure part on synthetic scores ---------------------------------------------------------

def synthetic(seed: int = 0, n: int = 40, docs: int = 8, h: int = 4) -> LevelScores:
    """A level of ``n`` windows over ``docs`` documents with every condition the comparison
    reads; the gist sits between truncated and full."""
    rng = np.random.default_rng(seed)
    base = rng.normal(3.0, 0.3, size=(n, 1)) + rng.normal(0, 0.05, size=(n, h))
    nll = {"full": base, "truncated": base + 1.0, "sink": base + 0.9, "constant": base + 0.8,
           "streaming@16": base + 0.6, "recent@16": base + 0.7,
           "gist": base + 0.5 + rng.normal(0, 0.1, size=(n, h)),
           "mixed@16": base + 0.4 + rng.normal(0, 0.1, size=(n, h)),
           "consecutive|gist": base + 0.55 + rng.normal(0, 0.1, size=(n, h))}
    keys = [WindowKey(doc=i % docs, offset=100 * i, level=1) for i in range(n)]
    return LevelScores(1, WindowLayout(level=1, num_gists=3, tail=TAIL, horizon=h), keys, nll)


def long_section(gist: np.ndarray, truncated: np.ndarray) -> dict:
    return {"by_length": [{"context_tokens": 1024, "num_windows": gist.size,
                           "windows": [[i, ["doc"]] for i in range(gist.size)],
                           "nll_per_window": {"truncated": truncated.tolist(),
                                              "streaming@48": (truncated - 0.1).tolist(),
                                              "gist_l1": gist.tolist()}}]}


def shifted(scores: LevelScores, by: float, noise: float = 0.0, seed: int = 1) -> LevelScores:
    """The same windows, every GistNet-dependent condition moved by ``by`` (+ noise)."""
    rng = np.random.default_rng(seed)
    nll = {c: v + by + rng.normal(0, noise, size=v.shape) if gistnet_dependent(c) else v.copy()
           for c, v in scores.nll.items()}
    return LevelScores(scores.level, scores.window, list(scores.keys), nll)


def rows_of(block: dict) -> dict[str, dict]:
    return {r["statistic"]: r for r in block["rows"]}


def test_gistnet_dependent_conditions():
    assert all(map(gistnet_dependent, ["gist", "mixed@128", "mixed_similarity@128",
                                       "consecutive|gist"]))
    assert not any(map(gistnet_dependent, ["full", "truncated", "sink", "constant", "mean_pool",
                                           "mean_pool_rescaled", "streaming@128", "recent@128",
                                           "ntk|full", "ntk|truncated"]))


def test_a_better_b_gives_the_exact_paired_difference_and_an_interval_below_zero():
    a = synthetic()
    b = shifted(a, -0.2)
    t = np.arange(a.nll["gist"].shape[0], dtype=np.float64)
    out = paired_differences({"levels": {1: a}, "long_range": long_section(3 + t, 4 + t)},
                             {"levels": {1: b}, "long_range": long_section(2.9 + t, 4 + t)},
                             seed=3, bootstrap=300)
    block = out["levels"]["l1"]
    rows = rows_of(block)
    gist_a, gist_b = a.nll["gist"].mean(), b.nll["gist"].mean()
    r = rows["nll_gist_l1"]
    assert r["a"] == pytest.approx(gist_a, abs=1e-12) and r["b"] == pytest.approx(gist_b,
                                                                                   abs=1e-12)
    assert r["diff"] == pytest.approx(gist_b - gist_a, abs=1e-12)
    assert r["diff"] == pytest.approx(-0.2, abs=1e-9)
    # a constant shift: every resample of the paired difference is -0.2, so the interval is
    assert r["ci95"] == pytest.approx([-0.2, -0.2], abs=1e-9) and r["verdict"] == "B better"
    full, trunc, const = (a.nll[c].mean() for c in ("full", "truncated", "constant"))
    rec = rows["recovery_l1"]
    assert rec["a"] == pytest.approx((trunc - gist_a) / (trunc - full), abs=1e-12)
    assert rec["diff"] == pytest.approx(0.2 / (trunc - full), abs=1e-9)
    assert rec["ci95"][0] > 0 and rec["verdict"] == "B better"  # higher recovery is better
    content = rows["content_recovery_l1"]
    assert content["b"] == pytest.approx((const - gist_b) / (const - full), abs=1e-12)
    assert content["verdict"] == "B better"
    assert rows["nll_consecutive|gist"]["verdict"] == "B better"
    # document-balanced twins: per-document means first, each document weighs once
    docs = np.array([k.doc for k in a.keys])
    per_doc = lambda s: np.mean([s.nll["gist"][docs == d].mean() for d in range(8)])  # noqa: E731
    assert rows["nll_gist_l1_doc"]["diff"] == pytest.approx(per_doc(b) - per_doc(a), abs=1e-12)
    assert rows["recovery_l1_doc"]["verdict"] == "B better"
    (budget,) = block["mixed"]
    assert budget["budget"] == 16
    mixed = rows_of(budget)
    assert mixed["nll_mixed"]["diff"] == pytest.approx(-0.2, abs=1e-9)
    gain = mixed["gain_vs_streaming"]
    assert gain["a"] == pytest.approx(a.nll["streaming@16"].mean() - a.nll["mixed@16"].mean())
    assert gain["diff"] == pytest.approx(0.2, abs=1e-9) and gain["verdict"] == "B better"
    assert set(mixed) == {"nll_mixed", "gain_vs_streaming", "nll_mixed_doc",
                          "gain_vs_streaming_doc"}
    (long,) = out["long_range"]
    (lr,) = long["rows"]  # gist_l1 only: truncated and streaming do not read the GistNet
    assert lr["statistic"] == "nll_gist_l1" and lr["diff"] == pytest.approx(-0.1, abs=1e-9)
    assert lr["verdict"] == "B better"
    worse = paired_differences({"levels": {1: b}}, {"levels": {1: a}}, seed=3, bootstrap=300)
    assert rows_of(worse["levels"]["l1"])["recovery_l1"]["verdict"] == "B worse"


def test_equal_exports_tie_and_noise_without_a_shift_ties():
    a = synthetic()
    same = paired_differences({"levels": {1: a}}, {"levels": {1: shifted(a, 0.0)}},
                              seed=3, bootstrap=300)
    block = same["levels"]["l1"]
    for r in block["rows"] + block["mixed"][0]["rows"]:
        assert r["diff"] == pytest.approx(0.0, abs=1e-12), r["statistic"]
        assert r["ci95"] == pytest.approx([0.0, 0.0], abs=1e-12)
        assert r["verdict"] == "tie", r["statistic"]
    noisy = shifted(a, 0.0, noise=0.3, seed=5)
    rows = rows_of(paired_differences({"levels": {1: a}}, {"levels": {1: noisy}}, seed=3,
                                      bootstrap=300)["levels"]["l1"])
    lo, hi = rows["nll_gist_l1"]["ci95"]
    assert lo < 0 < hi and rows["nll_gist_l1"]["verdict"] == "tie"


def test_a_disagreeing_gistnet_independent_arm_is_refused():
    a = synthetic()
    b = shifted(a, -0.2)
    b.nll["full"] = b.nll["full"].copy()
    b.nll["full"][3, 1] += 1e-3
    with pytest.raises(ValueError, match="level 1: the GistNet-independent condition 'full' "
                                         "differs .* not scored on the same windows"):
        paired_differences({"levels": {1: a}}, {"levels": {1: b}}, seed=0, bootstrap=10)
    b.nll["full"][3, 1] -= 1e-3 - 1e-7  # below the tolerance: fine
    paired_differences({"levels": {1: a}}, {"levels": {1: b}}, seed=0, bootstrap=10)
    b.nll["streaming@16"] = b.nll["streaming@16"] + 0.01
    with pytest.raises(ValueError, match="'streaming@16' differs"):
        paired_differences({"levels": {1: a}}, {"levels": {1: b}}, seed=0, bootstrap=10)
    t = np.arange(4.0)
    lr_b = long_section(t, 4 + t)
    lr_b["by_length"][0]["nll_per_window"]["streaming@48"][0] += 0.5
    with pytest.raises(ValueError, match="long range, 1024 old tokens: .* 'streaming@48'"):
        paired_differences({"levels": {}, "long_range": long_section(t, 4 + t)},
                           {"levels": {}, "long_range": lr_b}, seed=0, bootstrap=10)
    moved = LevelScores(1, a.window, [k._replace(offset=k.offset + 1) for k in a.keys],
                        dict(a.nll))
    with pytest.raises(ValueError, match="different windows"):
        paired_differences({"levels": {1: a}}, {"levels": {1: moved}}, seed=0, bootstrap=10)


def test_command_line_split():
    assert split_argv(["runs/a/gistnet", "runs/b/gistnet", "split=validation",
                       "--config-name", "eval_quick", "seed=3"]) == (
        "runs/a/gistnet", ["runs/b/gistnet"], "eval_quick", ["split=validation", "seed=3"])
    assert split_argv(["a", "--config-name=eval_full", "b"])[2:] == ("eval_full", [])
    assert split_argv(["a", "b"])[2] == "eval"
    assert split_argv(["a", "b", "seed=3", "c", "d"])[:2] == ("a", ["b", "c", "d"])
    with pytest.raises(ValueError, match="expected two or more GistNet exports"):
        split_argv(["a", "seed=3"])


# -- end to end on the tiny model --------------------------------------------------------------

@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare-corpus")
    for i in range(20):
        (root / f"doc{i:02d}.txt").write_text(random_text(700 + 110 * i, seed=300 + i))
    return root


def config(docs_dir: Path, model: Path, tmp: Path, *overrides: str, out: str = "out"):
    base = [f"model.name={model}", "data=folder", f"data.corpus={docs_dir}",
            "data.val_fraction=0.3", "data.test_fraction=0.3", f"+data.cache_dir={tmp / 'tok'}",
            f"output_dir={tmp / out}", "progress_bar=false", f"cache_dir={tmp / 'arms'}",
            "substitutability.windows.context_spans=3",
            f"substitutability.windows.tail_tokens={TAIL}",
            f"substitutability.windows.horizon={HORIZON}", "substitutability.windows.horizons=[8]",
            "substitutability.windows.num_windows=6", "substitutability.windows.num_l2_windows=2",
            f"substitutability.mixed.budgets=[{3 + TAIL},48]", "substitutability.bootstrap=100",
            "substitutability.distance.num_windows=0",
            "substitutability.variants=[{position_mode: consecutive}]",
            "long_range.enabled=true", "long_range.context_tokens=[1024]",
            "long_range.num_windows=2", f"long_range.tail_tokens={TAIL}",
            f"long_range.horizon={HORIZON}", "long_range.mixed_budget=[48]"]
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("eval", overrides=base + list(overrides))


def export(lm_fingerprint: dict, path: Path, seed: int, hidden: int = 32) -> Path:
    torch.manual_seed(seed)
    net = GistNet(GistNetConfig(hidden_size=hidden, width=16, num_heads=2))
    with torch.no_grad():
        for core in net.cores:  # a gist that depends on its span, different per seed
            core.up.weight.normal_(0, 0.5)
    net.training_record = {k: {"trained": True, "steps": 10, "windows": 40} for k in (1, 2)}
    return save_gistnet(net, path, lm_fingerprint)


def test_exports_for_two_base_models_are_refused_naming_both(docs_dir, tiny_model_dir,
                                                             tiny_model_dir_48, tmp_path):
    fp32 = BaseLM.load(str(tiny_model_dir)).fingerprint
    fp48 = BaseLM.load(str(tiny_model_dir_48)).fingerprint
    a = export(fp32, tmp_path / "a" / "gistnet", 0)
    b = export(fp48, tmp_path / "b" / "gistnet", 0, hidden=48)
    cfg = config(docs_dir, tiny_model_dir, tmp_path)
    with pytest.raises(ValueError, match="different base models") as e:
        compare(cfg, str(a), str(b))
    text = str(e.value)
    assert str(a) in text and str(b) in text
    assert "name: A 'tiny-random-32', B 'tiny-random-48'" in text
    assert "hidden_size: A 32, B 48" in text and "config_sha256" in text
    assert "vocab_size" not in text  # only the fields that differ
    # one base model, but not the configured one: each export must fit the model in use
    b32 = export(fp48, tmp_path / "c" / "gistnet", 1, hidden=48)
    with pytest.raises(ValueError, match="cannot serve base model 'tiny-random-32'"):
        compare(config(docs_dir, tiny_model_dir, tmp_path), str(b), str(b32))
    assert not (tmp_path / "out" / "compare.json").exists()


def test_end_to_end_writes_the_paired_table(docs_dir, tiny_model_dir, tmp_path):
    lm = BaseLM.load(str(tiny_model_dir))
    a = export(lm.fingerprint, tmp_path / "a" / "gistnet", 0)
    b = export(lm.fingerprint, tmp_path / "b" / "gistnet", 1)
    report = compare(config(docs_dir, tiny_model_dir, tmp_path), str(a), str(b))
    out = tmp_path / "out"
    assert json.loads((out / "compare.json").read_text()) == report
    assert report["a"]["path"] == str(a) and report["b"]["path"] == str(b)
    assert report["a"]["digest"] == gistnet_digest(load_gistnet(a))
    assert report["b"]["digest"] == gistnet_digest(load_gistnet(b)) != report["a"]["digest"]
    assert report["model"] == "tiny-random-32" and report["seed"] == 1234
    assert report["num_windows"] == {"l1": 6, "l2": 2, "long_range": {"1024": 2}}
    assert report["split"]["split"] == "test" and report["bootstrap"] == 100
    subs = {s: json.loads((out / s / "substitutability.json").read_text()) for s in "AB"}
    for key in ("l1", "l2"):
        block = report["levels"][key]
        rows = rows_of(block)
        assert {f"nll_gist_{key}", f"recovery_{key}", f"content_recovery_{key}",
                "nll_positions=consecutive|gist", f"recovery_{key}_doc"} <= set(rows)
        for side, s in (("a", "A"), ("b", "B")):  # the same numbers as each export's own
            assert rows[f"recovery_{key}"][side] == pytest.approx(subs[s][key][f"recovery_{key}"],
                                                                  abs=1e-12)
            assert rows[f"nll_gist_{key}_doc"][side] == pytest.approx(
                subs[s][key][f"nll_gist_{key}_doc"], abs=1e-12)
        for r in rows.values():
            assert r["diff"] == pytest.approx(r["b"] - r["a"], abs=1e-9)
            assert r["verdict"] in ("B better", "B worse", "tie")
        assert [m["budget"] for m in block["mixed"]] == [3 + TAIL, 48]
        for m in block["mixed"]:
            assert {r["statistic"] for r in m["rows"]} == {
                "nll_mixed", "gain_vs_streaming", "nll_mixed_doc", "gain_vs_streaming_doc"}
    # the coarsest budget is the gist condition exactly, for A and for B
    coarsest = rows_of(report["levels"]["l1"]["mixed"][0])["nll_mixed"]
    gist = rows_of(report["levels"]["l1"])["nll_gist_l1"]
    assert coarsest["a"] == pytest.approx(gist["a"], abs=1e-5)
    assert coarsest["b"] == pytest.approx(gist["b"], abs=1e-5)
    (long,) = report["long_range"]
    assert {r["statistic"] for r in long["rows"]} == {"nll_gist_l1", "nll_gist_l2", "nll_mixed@48"}
    assert long["rows"][0]["a"] == pytest.approx(
        subs["A"]["long_range"]["by_length"][0]["nll_gist_l1"], abs=1e-12)
    table = (out / "compare.md").read_text()
    assert "### L1 (6 windows" in table and "### L2 (2 windows" in table
    assert "W = 48: `gain_vs_streaming`" in table and "### Long range: 1,024 old tokens" in table
    assert "passkey retrieval is not compared" in table
    # deterministic: a second comparison (the independent arms now from the cache) is the same
    again = compare(config(docs_dir, tiny_model_dir, tmp_path, out="o2"),
                    str(a), str(b))
    assert (tmp_path / "o2" / "compare.json").read_bytes() == (out / "compare.json").read_bytes()
    assert again == report


def test_several_arms_each_equal_their_own_two_export_comparison(docs_dir, tiny_model_dir,
                                                                 tmp_path):
    lm = BaseLM.load(str(tiny_model_dir))
    a, b, c = (export(lm.fingerprint, tmp_path / n / "gistnet", seed)
               for n, seed in (("a", 0), ("b", 1), ("c", 2)))
    arms = compare(config(docs_dir, tiny_model_dir, tmp_path, out="arms"), str(a), str(b), str(c))
    out = tmp_path / "arms"
    assert json.loads((out / "compare.json").read_text()) == arms
    alone = [compare(config(docs_dir, tiny_model_dir, tmp_path, out=f"pair{i}"), str(a), str(x))
             for i, x in enumerate((b, c))]
    assert arms["arms"] == alone  # A scored once, every arm as if compared alone
    for label, report in zip(("B1", "B2"), alone, strict=True):
        assert json.loads((out / label / "compare.json").read_text()) == report
        assert (out / label / "substitutability.json").is_file()
    assert alone[0]["b"]["digest"] != alone[1]["b"]["digest"]
    table = (out / "compare.md").read_text()
    assert "| statistic | A | B1 − A | B2 − A |" in table
    assert f"- B2: `{c}`" in table and "### Long range: 1,024 old tokens" in table
    recovery = [rows_of(r["levels"]["l1"])["recovery_l1"] for r in alone]
    line = next(x for x in table.splitlines() if x.startswith("| `recovery_l1` |"))
    for r in recovery:  # each arm's difference and interval, bold when it excludes 0
        cell = f"{r['diff']:+.2f} [{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}]"
        assert (f"**{cell}**" if r["verdict"] != "tie" else cell) in line
