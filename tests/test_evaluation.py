"""Evaluation (megacontext.evaluation, eval/eval.py): substitutability and passkey retrieval."""

from __future__ import annotations

import importlib
import json
import math
import random
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from megacontext import substitution
from megacontext.base import BaseLM
from megacontext.data import load_corpus
from megacontext.evaluation import compose as compose_entries
from megacontext.evaluation import evaluate
from megacontext.evaluation.stats import recovery, resample, summarize
from megacontext.evaluation.substitutability import distance_buckets
from megacontext.gistnet import (
    GistNet,
    GistNetConfig,
    MeanPoolGist,
    gistnet_digest,
    load_gistnet,
    save_gistnet,
)
from megacontext.substitution import Window, score_window
from megacontext.training import GistDataModule, WindowSpec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# the module (the package's `evaluate` attribute is the function of the same name)
evaluation_module = importlib.import_module("megacontext.evaluation.evaluate")

# Tiny layout: L1 windows = 3 spans (96 tokens) + tail 8 + horizon 8; L2 = 1024 + 16.
CONTEXT_SPANS, TAIL, HORIZON = 3, 8, 8
L1_MIN = CONTEXT_SPANS + TAIL  # the coarsest L1 working context: 3 gists + the raw tail
L1_ALL = CONTEXT_SPANS * 32 + TAIL  # a budget covering every token
L2_MIN, L2_ALL = 1 + TAIL, 1024 + TAIL


def random_text(n: int, seed: int) -> str:
    """ASCII: the byte tokenizer gives one token per character."""
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters + "      \n") for _ in range(n))


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval-corpus")
    for i in range(24):
        (root / f"doc{i:02d}.txt").write_text(random_text(600 + 90 * i, seed=100 + i))
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval-cache")


def eval_config(docs_dir: Path, model: Path, cache: Path, out: Path, *overrides: str):
    base = [
        f"model.name={model}", "data=folder", f"data.corpus={docs_dir}",
        "data.val_fraction=0.3", "data.test_fraction=0.3", f"+data.cache_dir={cache}",
        f"output_dir={out}", "progress_bar=false", "long_range.enabled=false",
        f"cache_dir={cache / 'arms'}",
        f"substitutability.windows.context_spans={CONTEXT_SPANS}",
        f"substitutability.windows.tail_tokens={TAIL}",
        f"substitutability.windows.horizon={HORIZON}",
        "substitutability.windows.horizons=[4,8]",
        "substitutability.windows.num_windows=6", "substitutability.windows.num_l2_windows=2",
        f"substitutability.mixed.budgets=[{L1_MIN},48,{L2_ALL}]",
        "substitutability.distance.num_windows=3", "substitutability.distance.buckets=3",
        "substitutability.bootstrap=200",
        "substitutability.variants=[{position_mode: consecutive}, {gist_rope: span}, "
        "{rope: {scaling: ntk, factor: 2.0}}]",
        "passkey.lengths=[300]", "passkey.depths=[0.2,0.8]", "passkey.trials=1",
        "allocator.budget=96", "allocator.tail_tokens=16", "passkey.max_new_tokens=6",
    ]
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("eval", overrides=base + list(overrides))


# A long-range section on the tiny model: 1,024 and 2,048 old tokens, full scored.
LONG_RANGE = ("long_range.enabled=true", "long_range.context_tokens=[1024,2048]",
              f"long_range.tail_tokens={TAIL}", f"long_range.horizon={HORIZON}",
              "long_range.mixed_budget=48", "long_range.full_max_tokens=4096")


@pytest.fixture(scope="module")
def run(docs_dir, tiny_model_dir, cache, tmp_path_factory):
    """One evaluation with the mean-pool compressor, every scored target recorded."""
    out = tmp_path_factory.mktemp("eval-run")
    calls: list[torch.Tensor] = []
    real = substitution.horizon_nll

    long_range = {"inside": False}
    real_long_range = evaluation_module.run_long_range

    def spy(lm, embeds, positions, targets, *args, **kwargs):
        if not long_range["inside"]:  # the long-range windows are checked in their own tests
            calls.append(targets.clone())
        return real(lm, embeds, positions, targets, *args, **kwargs)

    def long_range_spy(*args, **kwargs):
        long_range["inside"] = True
        try:
            return real_long_range(*args, **kwargs)
        finally:
            long_range["inside"] = False

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(substitution, "horizon_nll", spy)
        mp.setattr(evaluation_module, "run_long_range", long_range_spy)
        results = evaluate(eval_config(docs_dir, tiny_model_dir, cache, out, "logger=csv",
                                       *LONG_RANGE))
    return {"results": results, "out": out, "calls": calls}


@pytest.fixture(scope="module")
def lm(tiny_model_dir) -> BaseLM:
    return BaseLM.load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def corpus(run, lm, docs_dir, cache):
    return load_corpus(docs_dir, lm.tokenizer, cache_dir=cache, progress=False)


def window_ids(corpus, name: str, offset: int, length: int) -> torch.Tensor:
    doc = corpus.names.index(name)
    return torch.from_numpy(corpus.doc(doc)[offset:offset + length].astype(np.int64))


# -- the JSON ------------------------------------------------------------------------------------

def test_json_has_the_public_keys_with_finite_values(run):
    on_disk = json.loads((run["out"] / "substitutability.json").read_text())
    for key in ("horizon", "num_documents", "num_tokens_scored"):
        assert isinstance(on_disk[key], int) and on_disk[key] > 0
    assert on_disk["horizon"] == HORIZON
    assert on_disk["num_tokens_scored"] == (6 + 2) * HORIZON
    for k in (1, 2):
        block = on_disk[f"l{k}"]
        for key in ("nll_full", "nll_truncated", "nll_mean_pool", f"nll_gist_l{k}",
                    f"delta_nll_l{k}", f"recovery_l{k}"):
            assert math.isfinite(block[key]), (k, key, block[key])
            lo, hi = block["ci95"][key]
            assert lo <= block[key] + 1e-9 and block[key] <= hi + 1e-9, (key, lo, hi)
    assert {p.name for p in run["out"].iterdir()} >= {
        "substitutability.json", "substitutability.md", "delta_nll_by_level.png",
        "delta_nll_by_distance.png", "nll_vs_budget.png", "passkey.json", "passkey.png"}


def test_recovery_and_delta_follow_from_the_nlls(run):
    r = run["results"]
    for k in (1, 2):
        b = r[f"l{k}"]
        t, g, f = b["nll_truncated"], b[f"nll_gist_l{k}"], b["nll_full"]
        assert b[f"recovery_l{k}"] == pytest.approx((t - g) / (t - f), rel=1e-9)
        assert b[f"recovery_l{k}"] == pytest.approx(substitution.recovery(t, g, f), rel=1e-9)
        assert b[f"delta_nll_l{k}"] == pytest.approx(g - f, abs=1e-12)
        assert b["recovery_mean_pool"] == pytest.approx((t - b["nll_mean_pool"]) / (t - f))
        for h in b["by_horizon"].values():
            assert h[f"recovery_l{k}"] == pytest.approx(
                (h["nll_truncated"] - h[f"nll_gist_l{k}"]) / (h["nll_truncated"] - h["nll_full"]))
        for m in b["mixed"]:
            assert m["recovery"] == pytest.approx((t - m["nll"]) / (t - f))
    # The main horizon's block is the last prefix: the same numbers.
    assert r["l1"]["by_horizon"][str(HORIZON)]["nll_full"] == r["l1"]["nll_full"]


def test_every_baseline_has_its_keys_intervals_and_recoveries(run):
    r = run["results"]
    for k in (1, 2):
        b = r[f"l{k}"]
        t, f = b["nll_truncated"], b["nll_full"]
        for key in ("nll_constant", "nll_sink", "nll_mean_pool_rescaled",
                    f"recovery_constant_l{k}", f"recovery_sink_l{k}", f"content_recovery_l{k}"):
            assert key in b and len(b["ci95"][key]) == 2, key
        assert b[f"recovery_sink_l{k}"] == pytest.approx((t - b["nll_sink"]) / (t - f))
        c, g = b["nll_constant"], b[f"nll_gist_l{k}"]
        assert b[f"content_recovery_l{k}"] == pytest.approx((c - g) / (c - f))
        # the rescaled mean pool is a different vector from the raw one
        assert b["nll_mean_pool_rescaled"] != pytest.approx(b["nll_mean_pool"], abs=1e-6)
        for m in b["mixed"]:
            assert m["recovery_streaming"] == pytest.approx((t - m["nll_streaming"]) / (t - f))
    # the streaming window with room for every token is the full context
    (everything,) = [m for m in r["l1"]["mixed"] if m["budget"] >= L1_ALL]
    assert everything["nll_streaming"] == pytest.approx(r["l1"]["nll_full"], abs=1e-5)


def test_constant_baseline_is_the_untrained_gistnet(lm, corpus, run):
    """The placeholder is exactly what a fresh GistNet emits: its output prior."""
    embedding = lm.model.embed_tokens.weight.detach().float()
    fresh = GistNet(GistNetConfig(hidden_size=32, width=16, num_heads=2),
                    init_output=embedding.mean(0)).eval()
    window = Window(level=1, num_gists=CONTEXT_SPANS, tail=TAIL, horizon=HORIZON)
    b = run["results"]["l1"]
    ids = torch.stack([window_ids(corpus, n, o, window.length) for n, o in b["windows"]])
    want = score_window(lm, ids, window, "gist", compressor=fresh)
    assert b["nll_constant"] == pytest.approx(want.item(), abs=1e-5)


def test_long_range_section_is_written_and_logged(run):
    lr = run["results"]["long_range"]
    assert [b["context_tokens"] for b in lr["by_length"]] == [1024, 2048]
    for b in lr["by_length"]:
        assert {"truncated", "sink", "gist_l1", "gist_l2", "full"} <= set(b["conditions"])
        assert "recovery_gist_l1" in b  # full was scored, so recovery is defined
    assert "Long range" in (run["out"] / "substitutability.md").read_text()
    assert (run["out"] / "long_range.png").stat().st_size > 0


def test_table_and_logger_carry_the_json_numbers(run):
    r = run["results"]
    table = (run["out"] / "substitutability.md").read_text()
    for k in (1, 2):
        assert f"{r[f'l{k}']['nll_full']:.3f}" in table
        assert f"{r[f'l{k}'][f'recovery_l{k}']:.3f}" in table
    assert "Passkey retrieval" in table
    rows = (run["out"] / "csv").rglob("metrics.csv")
    text = next(rows).read_text()
    assert "eval/recovery_l1" in text and "eval/nll_full_l2" in text
    assert "eval/content_recovery_l1" in text and "eval/long_range/1024/nll_gist_l1" in text
    assert "eval/passkey/memory/300_depth0.2" in text
    (table_csv,) = (run["out"] / "csv").rglob("substitutability_table.csv")
    lines = table_csv.read_text().splitlines()
    assert lines[0].startswith("level,condition,entries,nll")
    gist = [line for line in lines if line.startswith("1,gist,")]
    assert gist and f"{r['l1']['nll_gist_l1']:.6f}"[:6] in gist[0]


# -- conditions ----------------------------------------------------------------------------------

def test_mixed_context_with_room_for_everything_equals_full(run):
    for k, everything in ((1, L1_ALL), (2, L2_ALL)):
        b = run["results"][f"l{k}"]
        full = [m for m in b["mixed"] if m["budget"] >= everything]
        assert full, "the config must include a budget covering every token"
        assert full[0]["nll"] == pytest.approx(b["nll_full"], abs=1e-5)
        assert full[0]["entries_by_level"] == {"L0": everything}


def test_mixed_context_at_the_coarsest_budget_equals_the_gist_condition(run):
    """Tree, allocator and materialize reproduce the plain gist condition exactly."""
    b = run["results"]["l1"]
    coarsest = next(m for m in b["mixed"] if m["budget"] == L1_MIN)
    assert coarsest["entries_by_level"] == {"L1": CONTEXT_SPANS, "L0": TAIL}
    assert coarsest["nll"] == pytest.approx(b["nll_gist_l1"], abs=1e-5)
    middle = next(m for m in b["mixed"] if m["budget"] == 48)
    assert middle["entries_by_level"] == {"L1": CONTEXT_SPANS - 1, "L0": 32 + TAIL}


def test_truncated_differs_from_full_by_the_dropped_context_only(run, lm, corpus):
    """Recomputed by hand: full = every token; truncated = the same continuation with the old
    context simply absent (shifted to position 0, which RoPE must not notice)."""
    b = run["results"]["l1"]
    context = CONTEXT_SPANS * 32
    full, trunc = [], []
    for name, offset in b["windows"]:
        ids = window_ids(corpus, name, offset, context + TAIL + HORIZON)[None]
        for seq, out in ((ids, full), (ids[:, context:], trunc)):
            logits = lm(lm.embed(seq), torch.arange(seq.shape[1]))[0, -HORIZON - 1:-1]
            out.append(torch.nn.functional.cross_entropy(logits, seq[0, -HORIZON:]).item())
    assert b["nll_full"] == pytest.approx(np.mean(full), abs=1e-5)
    assert b["nll_truncated"] == pytest.approx(np.mean(trunc), abs=1e-5)
    assert b["nll_truncated"] != pytest.approx(b["nll_full"], abs=1e-3)


def test_every_condition_scores_the_same_tokens(run, corpus):
    r = run["results"]
    want = {}
    for k in (1, 2):
        length = r[f"l{k}"]["window_tokens"]
        for name, offset in r[f"l{k}"]["windows"]:
            want[tuple(window_ids(corpus, name, offset, length)[-HORIZON:].tolist())] = 0
    for targets in run["calls"]:
        for row in targets.tolist():
            assert tuple(row) in want, "a condition scored tokens that are no window's horizon"
            want[tuple(row)] += 1
    # full, truncated, sink, gist, mean pool (raw, rescaled), constant; 3 variants (+2 for the
    # RoPE one); 3 mixed budgets and their 3 streaming windows
    assert min(want.values()) >= 7 + 3 + 2 + 3 + 3
    l1_counts = [want[tuple(window_ids(corpus, n, o, r["l1"]["window_tokens"])[-HORIZON:]
                            .tolist())] for n, o in r["l1"]["windows"]]
    assert len(set(l1_counts[3:])) == 1  # windows outside the distance subset: equal counts


def test_compose_reproduces_the_three_plain_conditions(lm):
    torch.manual_seed(0)
    window = Window(level=1, num_gists=3, tail=5, horizon=6)
    ids = torch.randint(0, lm.config.vocab_size, (2, window.length))
    embeds = lm.embed(ids)
    pool = MeanPoolGist()
    gists = substitution.make_gists(embeds[:, :window.context], window, pool)
    rope = lm.config.rope
    for state, condition in (("raw", "full"), ("gist", "gist"), ("drop", "truncated")):
        for gist_rope in ("point", "span"):
            entries, pos, att = compose_entries(embeds, gists, window, [state] * 3, rope=rope,
                                                gist_rope=gist_rope)
            got = substitution.horizon_nll(lm, entries, pos, ids[:, -6:], att, rope=rope)
            want = score_window(lm, ids, window, condition, compressor=pool, rope=rope,
                                gist_rope=gist_rope)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # one span replaced: the other two raw tokens keep their true positions
    _, pos, _ = compose_entries(embeds, gists, window, ["raw", "gist", "raw"], rope=rope)
    assert pos[:34].tolist() == list(range(32)) + [47.5, 64.0]


def test_distance_buckets_partition_the_spans_nearest_first(run):
    window = Window(level=1, num_gists=14, tail=64, horizon=64)
    groups = distance_buckets(window, 4)
    assert sorted(np.concatenate(groups).tolist()) == list(range(14))
    assert [g.max() for g in groups] == sorted([g.max() for g in groups], reverse=True)
    dist = run["results"]["distance"]
    distances = [b["distance"] for b in dist["buckets"]]
    assert distances == sorted(distances) and len(distances) == 3
    # one span per bucket: span 2 (the nearest) is 96 + 8 − 15.5 tokens from the first target
    assert dist["buckets"][0]["spans"] == [2, 2]
    assert distances[0] == pytest.approx(CONTEXT_SPANS * 32 + TAIL - (2 * 32 + 15.5))


def test_variants_rescore_baselines_only_when_the_rope_changes(run):
    r = run["results"]
    by_name = {v["name"]: v for v in r["variants"]}
    consecutive = by_name["positions=consecutive"]["l1"]
    assert consecutive["nll_full"] == r["l1"]["nll_full"]
    assert consecutive["nll_gist"] != pytest.approx(r["l1"]["nll_gist_l1"], abs=1e-6)
    ntk = by_name["rope=scaling:ntk,factor:2.0"]["l1"]
    assert ntk["nll_full"] != pytest.approx(r["l1"]["nll_full"], abs=1e-6)


# -- the split -----------------------------------------------------------------------------------

def test_evaluation_windows_come_from_test_documents_only(run, docs_dir, tiny_model_dir,
                                                         cache):
    spec = WindowSpec(context_spans=CONTEXT_SPANS, tail_tokens=TAIL, horizon=HORIZON)
    dm = GistDataModule(str(docs_dir), model=str(tiny_model_dir), window=spec,
                        val_fraction=0.3, test_fraction=0.3, max_val_windows=6, seed=1234,
                        cache_dir=cache)
    dm.setup("fit")
    names = dm.corpus.names
    train, val = {names[d] for d in dm.train_docs}, {names[d] for d in dm.val_docs}
    test = {names[d] for d in dm.test_docs}
    r = run["results"]
    used = {name for k in (1, 2) for name, _ in r[f"l{k}"]["windows"]}
    assert used and used <= test and not used & (train | val)
    assert r["split"]["split"] == "test" and r["evaluated_documents"] == len(test)
    # and the training side never reads them
    drawn = {names[int(d)] for b in dm.train_dataloader() for d in b["doc"]}
    assert drawn and not drawn & test
    assert not {names[w.doc] for w in dm.val_windows} & test


def test_another_corpus_is_evaluated_whole_and_labelled_cross_domain(lm, docs_dir,
                                                                     tiny_model_dir, cache,
                                                                     tmp_path):
    run_dir = tmp_path / "train-run"
    export = save_gistnet(GistNet(GistNetConfig(hidden_size=32, width=16, num_heads=2)),
                          run_dir / "gistnet", lm.fingerprint)
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text(
        "data:\n  corpus: pystdlib\n  val_fraction: 0.1\n  test_fraction: 0.1\n  seed: 1\n")
    r = evaluate(eval_config(docs_dir, tiny_model_dir, cache, tmp_path / "out",
                             f"compressor={export}", "allow_untrained_levels=true",
                             "passkey.enabled=false", "substitutability.mixed.budgets=[]",
                             "substitutability.variants=[]",
                             "substitutability.distance.num_windows=0"))
    assert r["split"]["cross_domain"] and r["split"]["split"] == "all"
    assert r["evaluated_documents"] == 24
    table = (tmp_path / "out" / "substitutability.md").read_text()
    assert "Cross-domain" in table and "pystdlib" in table


# -- determinism ---------------------------------------------------------------------------------

def test_two_runs_with_one_seed_give_identical_results(run, docs_dir, tiny_model_dir, cache,
                                                       tmp_path):
    evaluate(eval_config(docs_dir, tiny_model_dir, cache, tmp_path, *LONG_RANGE))
    for name in ("substitutability.json", "passkey.json"):
        assert (tmp_path / name).read_bytes() == (run["out"] / name).read_bytes(), name


def test_another_seed_changes_the_intervals_and_keys_not_the_windows(run, docs_dir,
                                                                     tiny_model_dir, cache,
                                                                     tmp_path):
    other = evaluate(eval_config(docs_dir, tiny_model_dir, cache, tmp_path, "seed=7",
                                 "data.seed=1234", "substitutability.mixed.budgets=[]",
                                 "substitutability.distance.num_windows=0",
                                 "substitutability.variants=[]"))
    r = run["results"]
    assert other["l1"]["windows"] == r["l1"]["windows"]
    assert other["l1"]["nll_full"] == r["l1"]["nll_full"]
    assert other["l1"]["ci95"]["nll_full"] != r["l1"]["ci95"]["nll_full"]
    keys = lambda p: [e["key"] for e in p["examples"]]  # noqa: E731
    assert keys(other["passkey"]) != keys(r["passkey"])


# -- bad inputs ----------------------------------------------------------------------------------

def test_missing_compressor_path_is_named(docs_dir, tiny_model_dir, cache, tmp_path):
    missing = tmp_path / "no-such-run" / "gistnet"
    with pytest.raises(ValueError, match="no-such-run"):
        evaluate(eval_config(docs_dir, tiny_model_dir, cache, tmp_path, f"compressor={missing}"))


def test_a_gistnet_for_another_model_is_refused(docs_dir, tiny_model_dir, tiny_model_dir_48,
                                                cache, tmp_path):
    other = BaseLM.load(str(tiny_model_dir_48))
    export = save_gistnet(GistNet(GistNetConfig(hidden_size=48, width=16, num_heads=2)),
                          tmp_path / "gistnet", other.fingerprint)
    with pytest.raises(ValueError, match="hidden_size 48, this model has 32"):
        evaluate(eval_config(docs_dir, tiny_model_dir, cache, tmp_path / "out",
                             f"compressor={export}"))


def test_a_gistnet_export_is_scored_as_saved(lm, corpus, docs_dir, tiny_model_dir, cache,
                                             tmp_path):
    torch.manual_seed(0)
    net = GistNet(GistNetConfig(hidden_size=32, width=16, num_heads=2))
    with torch.no_grad():
        for core in net.cores:  # leave the harmless start: a gist that depends on its span
            core.up.weight.normal_(0, 0.5)
    net.training_record = {k: {"trained": True, "steps": 10, "windows": 40} for k in (1, 2)}
    export = save_gistnet(net, tmp_path / "gistnet", lm.fingerprint)
    r = evaluate(eval_config(docs_dir, tiny_model_dir, cache, tmp_path / "out",
                             f"compressor={export}", "passkey.enabled=false",
                             "substitutability.mixed.budgets=[]", "substitutability.variants=[]",
                             "substitutability.distance.num_windows=0"))
    assert r["compressor_digest"] == gistnet_digest(load_gistnet(export))
    b = r["l1"]
    assert b["nll_gist_l1"] != pytest.approx(b["nll_mean_pool"], abs=1e-4)
    window = Window(level=1, num_gists=CONTEXT_SPANS, tail=TAIL, horizon=HORIZON)
    ids = torch.stack([window_ids(corpus, n, o, window.length) for n, o in b["windows"]])
    want = score_window(lm, ids, window, "gist", compressor=load_gistnet(export).eval())
    assert b["nll_gist_l1"] == pytest.approx(want.item(), abs=1e-5)


def test_a_training_run_with_another_split_is_refused(lm, docs_dir, tiny_model_dir, cache,
                                                      tmp_path):
    run_dir = tmp_path / "train-run"
    net = GistNet(GistNetConfig(hidden_size=32, width=16, num_heads=2))
    net.training_record = {k: {"trained": True, "steps": 5, "windows": 20} for k in (1, 2)}
    export = save_gistnet(net, run_dir / "gistnet", lm.fingerprint)
    (run_dir / ".hydra").mkdir()
    config = (f"seed: 99\ndata:\n  corpus: {docs_dir}\n  val_fraction: 0.3\n"
              f"  test_fraction: 0.3\n  seed: ${{seed}}\n")
    (run_dir / ".hydra" / "config.yaml").write_text(config)
    with pytest.raises(ValueError, match="data.seed=99; .* data.seed=1234"):
        evaluate(eval_config(docs_dir, tiny_model_dir, cache, tmp_path / "out",
                             f"compressor={export}"))
    (run_dir / ".hydra" / "config.yaml").write_text(config.replace("test_fraction: 0.3",
                                                                   "test_fraction: 0.2"))
    with pytest.raises(ValueError, match="data.test_fraction=0.2, .* data.test_fraction=0.3"):
        evaluate(eval_config(docs_dir, tiny_model_dir, cache, tmp_path / "out",
                             f"compressor={export}"))
    (run_dir / ".hydra" / "config.yaml").write_text(config.replace("99", "1234"))
    r = evaluate(eval_config(docs_dir, tiny_model_dir, cache, tmp_path / "out",
                             f"compressor={export}", "passkey.enabled=false",
                             "substitutability.mixed.budgets=[]", "substitutability.variants=[]",
                             "substitutability.distance.num_windows=0"))
    assert r["split"]["relation"] == "training corpus" and r["split"]["split"] == "test"
    assert r["untrained_levels"] == []


def test_an_untrained_level_is_refused_unless_allowed_and_then_marked(lm, docs_dir,
                                                                      tiny_model_dir, cache,
                                                                      tmp_path):
    net = GistNet(GistNetConfig(hidden_size=32, width=16, num_heads=2))
    net.training_record = {1: {"trained": True, "steps": 7, "windows": 28},
                           2: {"trained": False, "steps": 0, "windows": 0}}
    export = save_gistnet(net, tmp_path / "gistnet", lm.fingerprint)
    quick = ("passkey.enabled=false", "substitutability.mixed.budgets=[]",
             "substitutability.variants=[]", "substitutability.distance.num_windows=0")
    with pytest.raises(ValueError, match=r"level\(s\) \[2\] were never trained \(level 2: 0 "
                                         r"optimizer steps\)"):
        evaluate(eval_config(docs_dir, tiny_model_dir, cache, tmp_path / "out",
                             f"compressor={export}", *quick))
    # level 1 alone is fine
    r = evaluate(eval_config(docs_dir, tiny_model_dir, cache, tmp_path / "out",
                             f"compressor={export}", "substitutability.windows.num_l2_windows=0",
                             *quick))
    assert "l2" not in r and r["untrained_levels"] == []
    r = evaluate(eval_config(docs_dir, tiny_model_dir, cache, tmp_path / "out",
                             f"compressor={export}", "allow_untrained_levels=true", *quick))
    assert r["untrained_levels"] == [2]
    table = (tmp_path / "out" / "substitutability.md").read_text()
    (l2_title,) = [line for line in table.splitlines() if line.startswith("### L2")]
    assert "untrained" in l2_title
    assert not any("untrained" in line for line in table.splitlines()
                   if line.startswith("### L1"))


def test_a_gistnet_with_too_few_levels_is_refused(lm, docs_dir, tiny_model_dir, cache,
                                                  tmp_path):
    net = GistNet(GistNetConfig(hidden_size=32, width=16, num_heads=2, levels=1))
    net.training_record[1] = {"trained": True, "steps": 3, "windows": 12}
    export = save_gistnet(net, tmp_path / "g1", lm.fingerprint)
    with pytest.raises(ValueError, match="serves 1 gist level"):
        evaluate(eval_config(docs_dir, tiny_model_dir, cache, tmp_path / "out",
                             f"compressor={export}"))
    # added untrained on request: scored, and named untrained
    r = evaluate(eval_config(docs_dir, tiny_model_dir, cache, tmp_path / "out",
                             f"compressor={export}", "upper_levels=untrained",
                             "allow_untrained_levels=true"))
    assert r["untrained_levels"] == [2] and "l2" in r
    with pytest.raises(ValueError, match="upper_levels='sometimes'"):
        evaluate(eval_config(docs_dir, tiny_model_dir, cache, tmp_path / "out",
                             f"compressor={export}", "upper_levels=sometimes"))


@pytest.mark.parametrize("override, named", [
    ("substitutability.windows.horizons=[4,16]", "horizons entry 16 is larger than the "
                                                  "window's horizon 8"),
    ("substitutability.mixed.budgets=[5]", "budgets entry 5 is below"),
    ("substitutability.distance.buckets=9", "distance.buckets=9 exceeds"),
    ("substitutability.variants=[{gist_rope: spiral}]", "gist_rope='spiral'"),
    ("passkey.depths=[1.5]", "depths entry 1.5"),
    ("allocator.budget=0", "budget=0"),
    ("memory.gist_rope=spiral", "gist_rope='spiral'"),
    ("data.test_fraction=1.5", "data.test_fraction=1.5"),
    ("split=train", "split='train'"),
    ("allow_untrained_levels=maybe", "allow_untrained_levels='maybe'"),
    ("long_range.context_tokens=[1000]", "context_tokens entry 1000"),
])
def test_bad_settings_fail_before_loading_naming_the_value(override, named, docs_dir,
                                                           tiny_model_dir, cache, tmp_path):
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("(", r"\(")):
        evaluate(eval_config(docs_dir, tiny_model_dir, cache, tmp_path, override))


def test_a_window_longer_than_every_held_out_document_is_named(docs_dir, tiny_model_dir,
                                                               cache, tmp_path):
    with pytest.raises(ValueError, match="no evaluated document .* fits a level-1 window of "
                                         "2200 tokens"):
        evaluate(eval_config(docs_dir, tiny_model_dir, cache, tmp_path,
                             "substitutability.windows.horizon=2096",
                             "substitutability.windows.horizons=[2096]"))


# -- pieces --------------------------------------------------------------------------------------

def test_bootstrap_is_paired_deterministic_and_brackets_the_mean():
    rng = np.random.default_rng(0)
    full = rng.normal(3.0, 0.5, 40)
    per = {"full": full, "gist": full + 0.1 + rng.normal(0, 0.01, 40), "truncated": full + 0.5}
    idx = resample(40, 500, seed=3, key="l1")
    assert np.array_equal(idx, resample(40, 500, seed=3, key="l1"))
    stats = summarize(per, {"delta": lambda m: m["gist"] - m["full"],
                            "gist": lambda m: m["gist"],
                            "recovery": lambda m: recovery(m["truncated"], m["gist"],
                                                           m["full"])}, idx)
    lo, hi = stats["delta"]["ci95"]
    assert lo < 0.1 < hi and hi - lo < 0.02  # paired: the windows' spread cancels
    glo, ghi = stats["gist"]["ci95"]
    assert ghi - glo > 10 * (hi - lo)
    assert stats["recovery"]["value"] == pytest.approx(0.8, abs=0.01)
    assert np.isnan(recovery(1.0, 2.0, 1.0))


def test_passkey_results_are_complete(run):
    p = run["results"]["passkey"]
    assert p["conditions"] == ["memory", "streaming", "truncated"]
    for cond in p["conditions"]:
        grid = p[cond]["accuracy"]
        assert len(grid) == 1 and len(grid[0]) == 2
        assert all(0.0 <= a <= 1.0 for a in grid[0])
    assert {e["depth"] for e in p["examples"]} == {0.2, 0.8}
    # the truncation window (96 tokens of 300 + question) cannot see a key at depth 0.2
    assert not next(e for e in p["examples"] if e["depth"] == 0.2)["key_within_truncation"]


@pytest.mark.slow
def test_smollm2_mean_pooling_is_worse_than_dropping_the_text(tmp_path):
    """The known calibration, on a few pystdlib windows: truncation costs something, mean
    pooled spans cost far more."""
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("eval", overrides=[
            f"output_dir={tmp_path}", "passkey.enabled=false",
            "substitutability.windows.num_windows=3", "substitutability.windows.num_l2_windows=0",
            "substitutability.mixed.budgets=[]", "substitutability.distance.num_windows=0",
            "substitutability.variants=[]"])
    r = evaluate(cfg)["l1"]
    assert r["nll_full"] < r["nll_truncated"] < r["nll_mean_pool"]
    assert r["recovery_mean_pool"] < -1


def test_lens_scorer_in_mixed_contexts_and_passkey(docs_dir, tiny_model_dir, cache, lm,
                                                    tmp_path):
    """``mixed.scorer=lens`` with ``compare=recency``: paired NLLs on the same windows (equal
    where both scorers must choose the same context: nothing or everything expanded), and the
    passkey test with ``allocator.scorer=lens``; a lens for another GistNet is refused."""
    from megacontext.allocator import LensConfig, LensNet, save_lens
    from megacontext.gistnet import MeanPoolGist, gistnet_digest

    torch.manual_seed(0)
    lens = LensNet(LensConfig(hidden_size=lm.config.hidden_size, width=16, heads=2, layers=1))
    lens.gistnet_digest = gistnet_digest(MeanPoolGist())
    save_lens(lens, tmp_path / "lens", lm.fingerprint)
    cfg = eval_config(docs_dir, tiny_model_dir, cache, tmp_path / "out", "compressor=mean",
                      f"lens={tmp_path / 'lens'}", "substitutability.mixed.scorer=lens",
                      "substitutability.mixed.compare=recency",
                      "substitutability.windows.num_l2_windows=0",
                      "substitutability.mixed.levels=[1]", "substitutability.variants=[]",
                      "substitutability.distance.num_windows=0", "allocator.scorer=lens",
                      "+allocator.scorer_options.child_pool=true")
    r = evaluate(cfg)
    rows = {m["budget"]: m for m in r["l1"]["mixed"]}
    # nothing to choose (the coarsest cover) or everything raw: both scorers agree exactly
    for budget in (L1_MIN, L2_ALL):
        assert rows[budget]["gain_vs_compare"] == pytest.approx(0.0, abs=1e-6)
        assert rows[budget]["nll_compare"] == pytest.approx(rows[budget]["nll"], abs=1e-6)
    assert rows[L2_ALL]["nll"] == pytest.approx(r["l1"]["nll_full"], abs=1e-5)
    assert rows[L1_MIN]["entries_compare"] == rows[L1_MIN]["entries"] == L1_MIN
    for m in rows.values():
        assert m["ci95"]["gain_vs_compare"][0] <= m["gain_vs_compare"] <= \
            m["ci95"]["gain_vs_compare"][1]
    assert r["mixed_compare"] == "recency" and r["passkey"]["scorer"] == "lens"
    assert "NLL under `recency` − under `lens`" in (tmp_path / "out" /
                                                    "substitutability.md").read_text()
    lens.gistnet_digest = "0" * 64
    save_lens(lens, tmp_path / "other", lm.fingerprint)
    cfg = eval_config(docs_dir, tiny_model_dir, cache, tmp_path / "out2", "compressor=mean",
                      f"lens={tmp_path / 'other'}", "allocator.scorer=lens")
    with pytest.raises(ValueError, match="retrain the lens for this GistNet"):
        evaluate(cfg)
