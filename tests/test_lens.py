"""LensNet, the learned focus scorer: its net, export, legality in the allocator, its labels
(against the runtime's oracle judge) and an end-to-end planted fact that ``recency`` misses."""

from __future__ import annotations

import json
import random
import string

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from megacontext.allocator import FocusAllocator, LensConfig, LensNet, load_lens, save_lens
from megacontext.base import BaseLM
from megacontext.bench.refocus import SyntheticTree
from megacontext.gistnet import MeanPoolGist, gistnet_digest
from megacontext.ingest import Ingestor
from megacontext.lens import node_features, ranking_loss
from megacontext.lens.data import (
    HELD_OUT_FACT,
    TRAIN_FACTS,
    LensDataConfig,
    build_examples,
    full_detail_values,
    generated_fact,
    load_examples,
    save_examples,
)
from megacontext.runtime import OracleJudge
from megacontext.training.lens import (
    LensExamples,
    LensModule,
    collate_examples,
    ranking_metrics,
    split_examples,
    train_lens,
)
from megacontext.tree import MegaContextTree
from megacontext.working_context import WorkingContext
from tests.test_training import CONFIGS

FINGERPRINT = {"name": "tiny", "hidden_size": 64}


@pytest.fixture(scope="module")
def lm(tiny_model_dir) -> BaseLM:
    return BaseLM.load(str(tiny_model_dir))


def filler(lm: BaseLM, n: int, seed: int) -> np.ndarray:
    """Random letters (no digits): the planted facts' values stand out."""
    rng = random.Random(seed)
    text = "".join(rng.choice(string.ascii_letters + "      \n") for _ in range(n))
    return np.asarray(lm.tokenizer.encode(text), dtype=np.int64)


def memory_tree(lm: BaseLM, path, ids: np.ndarray, digest: str | None = None):
    """A 2-level tree of ``ids`` with mean-pooled gists, committed and open."""
    tree = MegaContextTree.create(path, hidden_size=lm.config.hidden_size,
                                  vocab_size=lm.config.vocab_size, rope=lm.config.rope,
                                  fingerprint=lm.fingerprint, levels=2, gistnet_digest=digest)
    ingest = Ingestor(tree, lm.model.embed_tokens.weight.float(), MeanPoolGist())
    ingest.feed(ids)
    ingest.commit()
    return tree


def small_lens(hidden: int = 64, seed: int = 0) -> LensNet:
    torch.manual_seed(seed)
    return LensNet(LensConfig(hidden_size=hidden, width=32, heads=2, layers=1))


# -- the net and its export ------------------------------------------------------------------

def test_lens_scores_and_rejects_bad_shapes():
    lens = small_lens(16)
    g, lv, f = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.int64), torch.randn(2, 5, 4)
    q = torch.randn(2, 3, 16)
    s = lens(g, lv, f, q)
    assert s.shape == (2, 5) and torch.isfinite(s).all()
    # the query matters, padding is ignored: a padded query scores like the unpadded one
    assert not torch.allclose(s, lens(g, lv, f, None))
    padded = torch.cat([q, torch.randn(2, 2, 16)], 1)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[:, 3:] = True
    torch.testing.assert_close(lens(g, lv, f, padded, pad), s)
    with pytest.raises(ValueError, match=r"gists must be \[b, n, 16\], got \(2, 5, 8\)"):
        lens(torch.randn(2, 5, 8), lv, f)
    with pytest.raises(ValueError, match=r"levels must lie in \[1, 8\], got \[0, 1\]"):
        lens(g, torch.tensor([[0, 1, 1, 1, 1]] * 2), f)
    with pytest.raises(ValueError, match=r"query must be \[2, q, 16\]"):
        lens(g, lv, f, torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="width=30 .not divisible by heads=4"):
        LensConfig(hidden_size=8, width=30)


def test_node_features_by_hand():
    g = np.full((2, 4), 2.0, dtype=np.float32)
    f = node_features(1, np.array([0, 3]), 128, g)
    # node 0 of level 1 is centred at 15.5, node 3 at 111.5: 112.5 and 16.5 tokens back
    np.testing.assert_allclose(f[:, 0], np.log2(1 + np.array([112.5, 16.5])) / 40, rtol=1e-6)
    np.testing.assert_allclose(f[:, 1], np.array([112.5, 16.5]) / 128, rtol=1e-6)
    np.testing.assert_allclose(f[:, 2], 5 / 40)
    np.testing.assert_allclose(f[:, 3], np.log(2.0) / 4, rtol=1e-6)


def test_export_round_trip_and_every_mismatch_is_named(tmp_path):
    lens = small_lens()
    lens.gistnet_digest = "a" * 64
    lens.training_info = {"steps": 3}
    save_lens(lens, tmp_path / "lens", FINGERPRINT)
    back = load_lens(tmp_path / "lens", FINGERPRINT, "a" * 64)
    args = (torch.randn(1, 4, 64), torch.full((1, 4), 2), torch.randn(1, 4, 4),
            torch.randn(1, 3, 64))
    torch.testing.assert_close(back(*args), lens.eval()(*args), rtol=0, atol=0)
    assert back.gistnet_digest == "a" * 64 and back.training_info == {"steps": 3}
    with pytest.raises(ValueError, match=r"trained for hidden_size 64, this model has 48"):
        load_lens(tmp_path / "lens", {"hidden_size": 48})
    with pytest.raises(ValueError, match=r"gists of GistNet 'aaaa.*not 'bbbb.*retrain"):
        load_lens(tmp_path / "lens", expect_gistnet_digest="b" * 64)
    with pytest.raises(FileNotFoundError, match="path not found: .*nowhere"):
        load_lens(tmp_path / "nowhere")
    meta = json.loads((tmp_path / "lens" / "lens.json").read_text())
    meta["config"]["layers"] = 2  # weights no longer fit the config
    (tmp_path / "lens" / "lens.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not fit its config"):
        load_lens(tmp_path / "lens")
    meta["config"]["layers"] = 1
    meta["digest"] = "0" * 64
    (tmp_path / "lens" / "lens.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not match the recorded digest"):
        load_lens(tmp_path / "lens")


def test_ranking_loss_prefers_the_labels_order():
    labels = torch.tensor([[1.0, 0.0, -0.5, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    good = ranking_loss(torch.tensor([[3.0, 0.0, -3.0, 99.0]]), labels, mask)
    bad = ranking_loss(torch.tensor([[-3.0, 0.0, 3.0, -99.0]]), labels, mask)
    assert good < bad
    # the masked candidate's score does not matter
    again = ranking_loss(torch.tensor([[3.0, 0.0, -3.0, -5.0]]), labels, mask)
    torch.testing.assert_close(good, again)


# -- in the allocator --------------------------------------------------------------------------

@pytest.mark.parametrize("query_rows", [None, 1, 7])
def test_lens_scorer_keeps_the_allocator_legal_and_bounded(query_rows):
    tree = SyntheticTree(10**6, hidden_size=64)
    lens = small_lens()
    alloc = FocusAllocator(600, tail_tokens=64, scorer="lens", scorer_options={"lens": lens})
    rng = np.random.default_rng(0)
    query = None if query_rows is None else rng.standard_normal((query_rows, 64))
    wc = alloc.assemble(tree, query=query)
    wc.validate(tree, tail_tokens=64, budget=600)
    assert alloc.last_stats.nodes_read <= 8 * 600  # bounded by the budget, not the tree
    recency = FocusAllocator(600, tail_tokens=64).assemble(tree)
    assert wc.levels.tolist() != recency.levels.tolist() or \
        wc.starts.tolist() != recency.starts.tolist()  # it does choose differently
    for step in range(3):  # incremental refocuses stay legal too
        wc = alloc.assemble(tree, cursor=10**6 - 1000 + 300 * step, query=query, previous=wc)
        wc.validate(tree, tail_tokens=64, budget=600)


def test_similarity_reads_a_token_matrix_query_as_its_mean():
    tree = SyntheticTree(200_000, hidden_size=64)
    q = np.random.default_rng(1).standard_normal((5, 64))
    a = FocusAllocator(300, scorer="similarity").assemble(tree, query=q)
    b = FocusAllocator(300, scorer="similarity").assemble(tree, query=q.mean(0))
    assert a.levels.tolist() == b.levels.tolist() and a.starts.tolist() == b.starts.tolist()
    with pytest.raises(ValueError, match=r"or matrix \[q, c\], got shape \(2, 2, 64\)"):
        FocusAllocator(300, scorer="similarity").assemble(tree, query=np.ones((2, 2, 64)))
    with pytest.raises(ValueError, match="non-finite"):
        FocusAllocator(300, scorer="similarity").assemble(tree, query=np.full((2, 64), np.nan))


def test_lens_refuses_a_tree_of_another_gistnet(lm, tmp_path):
    with memory_tree(lm, tmp_path / "t", filler(lm, 3000, 0),
                     gistnet_digest(MeanPoolGist())) as tree:
        lens = small_lens(lm.config.hidden_size)
        lens.gistnet_digest = "f" * 64
        alloc = FocusAllocator(200, scorer="lens", scorer_options={"lens": lens})
        with pytest.raises(ValueError, match=r"learned on the gists of GistNet ffff"):
            alloc.assemble(tree)


# -- labels ----------------------------------------------------------------------------------

def test_full_detail_values_equal_the_oracle_judge(lm, tmp_path):
    """The batched labeller against the runtime's OracleJudge, one context at a time."""
    ids = filler(lm, 2100, 3)
    memory, cont = ids[:2048], ids[2048:2064]
    with memory_tree(lm, tmp_path / "t", memory) as tree:
        wc = FocusAllocator(160, tail_tokens=32).assemble(tree)
        gists = np.flatnonzero(wc.levels >= 1)
        entries = [int(gists[0]), int(gists[len(gists) // 2]), int(gists[-1])]
        assert 2 in wc.levels[entries].tolist() or 1 in wc.levels[entries].tolist()
        base, values = full_detail_values(lm, tree, wc, entries, cont, scored=len(cont),
                                          batch=2)
        judge = OracleJudge(lm, tree, cont.tolist())
        assert base == pytest.approx(judge.nll(wc), abs=1e-5)
        for j, v in zip(entries, values, strict=True):
            k, i = int(wc.levels[j]), int(wc.indices[j])
            size = 32 ** k
            lv = np.concatenate([wc.levels[:j], np.zeros(size, np.int64), wc.levels[j + 1:]])
            ix = np.concatenate([wc.indices[:j], np.arange(i * size, (i + 1) * size),
                                 wc.indices[j + 1:]])
            raw = WorkingContext.from_entries(lv, ix, wc.cursor)
            assert v == pytest.approx(judge.nll(wc) - judge.nll(raw), abs=1e-4)


def test_examples_round_trip_and_refuse_a_broken_file(lm, tmp_path):
    cfg = LensDataConfig(examples=4, lengths=(512, 1024), budgets=(128,), candidates=4)
    data = build_examples(lm, MeanPoolGist(), filler(lm, 20_000, 4), cfg)
    assert len(data["kind"]) == 4 and data["gists"].shape == (len(data["labels"]),
                                                              lm.config.hidden_size)
    assert np.all(np.bincount(data["example"]) <= 4)
    save_examples(data, str(tmp_path / "ex.safetensors"), {"made by": [1, "x"]})
    back = load_examples(str(tmp_path / "ex.safetensors"))
    for k, v in data.items():
        assert np.array_equal(back[k], v) if isinstance(v, np.ndarray) else back[k] == v
    assert back["about"] == {"made by": [1, "x"]}
    assert not (tmp_path / "ex.safetensors.tmp").exists()
    from safetensors.numpy import save_file
    save_file({"labels": data["labels"]}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="not a lens example file"):
        load_examples(str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="lengths=.*budget"):
        LensDataConfig(lengths=(200,), budgets=(128,))
    assert HELD_OUT_FACT not in TRAIN_FACTS


def test_generated_wordings_are_valid_varied_and_keep_the_held_out_words_out(lm):
    """``wordings: generated``: every composed fact is a template the passkey test accepts
    (the needle uses ``{key}``, intro and question no field), the draws are a function of the
    seed, vary (hundreds of wordings), and none uses the words of the held-out wordings."""
    from megacontext.evaluation.config import PasskeyConfig

    def draw(seed: int) -> list:
        return [generated_fact(np.random.default_rng([seed, i])) for i in range(300)]

    facts = draw(0)
    assert facts == draw(0) and facts != draw(1)
    assert len({(f.needle, f.question, f.intro) for f in facts}) > 200
    for f in facts:
        PasskeyConfig(intro=f.intro, needle=f.needle, question=f.question)  # its own checks
        assert set(PasskeyConfig.template_fields(f.needle)) == {"key"}
        text = (f.intro + f.needle + f.question).lower()
        for word in ("pass key", "secret number", "berth", "ferry"):
            assert word not in text, (word, f)
        assert "12345" in f.needle.format(key="12345")
    cfg = LensDataConfig(examples=6, retrieval_share=1.0, lengths=(512,), budgets=(128,),
                         candidates=4, wordings="generated")
    data = build_examples(lm, MeanPoolGist(), filler(lm, 20_000, 4), cfg)
    assert data["is_fact"].any() and len(data["kind"]) == 6
    with pytest.raises(ValueError, match="wordings='mixed'"):
        LensDataConfig(wordings="mixed")


# -- training and end to end -----------------------------------------------------------------

def test_lens_learns_to_find_a_planted_fact_that_recency_misses(lm, tmp_path):
    """Retrieval-shaped examples labelled by construction (1 for the entry holding the fact, 0
    otherwise: a random tiny model's NLL carries no retrieval signal); the trained lens must
    rank the fact first far more often than at the start, and in a new memory with the
    held-out wording its allocator must bring a whole copy of the value in raw where recency
    leaves the fact compressed."""
    torch.manual_seed(0)
    cfg = LensDataConfig(examples=64, retrieval_share=1.0, lengths=(1024, 2048),
                         budgets=(128,), candidates=16, seed=5)
    data = build_examples(lm, MeanPoolGist(), filler(lm, 40_000, 6), cfg)
    data["labels"] = data["is_fact"].astype(np.float32)
    train_ids, val_ids = split_examples(data["kind"], 0.25, seed=0)
    module = LensModule(LensConfig(hidden_size=lm.config.hidden_size, width=32, heads=2,
                                   layers=1), lr=3e-3, total_steps=150)
    batches = torch.utils.data.DataLoader(LensExamples(data, train_ids), batch_size=8,
                                          shuffle=True, collate_fn=collate_examples)
    val = collate_examples([LensExamples(data, val_ids)[i] for i in range(len(val_ids))])
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)

    def val_top1() -> float:
        with torch.no_grad():
            return ranking_metrics(module._scores(val), val["labels"], val["mask"],
                                   val["is_fact"], val["kind"])["fact_top1"]

    before = val_top1()
    for _ in range(25):
        for batch in batches:
            loss = ranking_loss(module._scores(batch), batch["labels"], batch["mask"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = val_top1()
    assert after >= 0.8 and after > before + 0.3, (before, after)

    lens = module.lens.eval()
    key, start = "48151", 1500
    text = HELD_OUT_FACT.needle.format(key=key)
    needle = np.asarray(lm.tokenizer.encode(text), dtype=np.int64)  # bytes: 1 token a char
    ids = filler(lm, 5000, 99)[:2048].copy()
    ids[start:start + needle.size] = needle
    question = np.asarray(lm.tokenizer.encode(HELD_OUT_FACT.question), dtype=np.int64)
    with memory_tree(lm, tmp_path / "t", ids) as tree:
        query = lm.embed(torch.as_tensor(question)[None])[0].float()
        chosen = FocusAllocator(192, scorer="lens", scorer_options={"lens": lens}).assemble(
            tree, query=query)
        recency = FocusAllocator(192).assemble(tree)

    def raw(wc, a: int, b: int) -> np.ndarray:
        j = np.searchsorted(wc.starts, np.arange(start + a, start + b), side="right") - 1
        return wc.levels[j] == 0

    copies = [text.find(key), text.rfind(key)]
    assert any(raw(chosen, c, c + len(key)).all() for c in copies)
    assert not raw(recency, 0, len(text)).any()


def test_train_lens_runs_from_its_hydra_config(lm, tiny_model_dir, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(5):
        rng = random.Random(i)
        (docs / f"d{i}.txt").write_text("".join(rng.choice(string.ascii_letters + "    \n")
                                                for _ in range(5000)))
    from megacontext.gistnet import GistNet, GistNetConfig, save_gistnet
    net = GistNet(GistNetConfig(hidden_size=lm.config.hidden_size, width=16, num_heads=2,
                                levels=2))
    export = save_gistnet(net, tmp_path / "gistnet", lm.fingerprint)
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train_lens", overrides=[
            f"model.name={tiny_model_dir}", f"compressor={export}", f"corpus={docs}",
            f"output_dir={tmp_path / 'out'}", "logger=csv", "examples.examples=8",
            "examples.lengths=[512,1024]", "examples.budgets=[128]", "trainer.max_steps=6",
            "trainer.val_check_interval=3", "batch_size=4", "progress_bar=false",
            "lensnet.width=16", "lensnet.heads=2", "val_fraction=0", "test_fraction=0"])
    metrics, objs = train_lens(cfg)
    out = tmp_path / "out"
    lens = load_lens(out / "lens", lm.fingerprint, gistnet_digest(net))
    assert lens.training_info["steps"] == 6 and "val/loss" in metrics
    history = json.loads((out / "history.json").read_text())
    assert len(history["train_loss"]) == 6 and len(history["val"]) == 2
    assert (out / "lens_curves.png").stat().st_size > 0
    # a rerun reuses the labelled examples (the slow part); other settings make new ones
    stamp = (out / "examples.safetensors").stat().st_mtime_ns
    train_lens(cfg)
    assert (out / "examples.safetensors").stat().st_mtime_ns == stamp
    cfg.examples.candidates = 3
    cfg.export_dir = str(tmp_path / "elsewhere")
    train_lens(cfg)
    load_lens(tmp_path / "elsewhere", lm.fingerprint, gistnet_digest(net))
    assert (out / "examples.safetensors").stat().st_mtime_ns != stamp
    assert np.bincount(load_examples(str(out / "examples.safetensors"))["example"]).max() <= 3


def test_passkey_wordings_are_the_ones_training_used_and_held_out(tmp_path):
    """The default passkey wording is among the training facts; eval_passkey_held_out asks
    with HELD_OUT_FACT, which training never saw; both configs pass the evaluation's checks."""
    from megacontext.evaluation.checks import check_config
    from megacontext.evaluation.config import PasskeyConfig

    default = PasskeyConfig()
    assert TRAIN_FACTS[0] == type(TRAIN_FACTS[0])(default.intro, default.needle,
                                                   default.question)
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        held = compose("eval_passkey_held_out", overrides=["compressor=mean",
                                                           f"output_dir={tmp_path}"])
        plain = compose("eval_passkey", overrides=["compressor=mean", f"output_dir={tmp_path}",
                                                   "allocator.scorer=lens"])
    assert (held.passkey.intro, held.passkey.needle, held.passkey.question) == (
        HELD_OUT_FACT.intro, HELD_OUT_FACT.needle, HELD_OUT_FACT.question)
    check_config(held)
    with pytest.raises(ValueError, match=r"allocator.scorer=lens needs lens=<a LensNet export>"):
        check_config(plain)


def test_passkey_table_reads_the_experiment_folders(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("passkey_table",
                                                  CONFIGS.parent / "eval" / "passkey_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    for scorer, wording, right in (("lens", "held_out", 2), ("recency", "default", 0)):
        d = tmp_path / f"passkey_{scorer}_{wording}"
        d.mkdir()
        examples = [{"length": 4096, "key_level_in_memory_context": 0 if i < right else 1}
                    for i in range(4)]
        (d / "passkey.json").write_text(json.dumps({
            "lengths": [4096], "budget": 1024, "levels": 2, "examples": examples,
            "memory": {"accuracy_by_length": [right / 4]},
            "truncated": {"accuracy_by_length": [0.25]}}))
    table.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "| lens | held_out | 4,096 | 1024 | 2 | 4 | 50% | 50% | 25% |" in out
    assert "| recency | default | 4,096 | 1024 | 2 | 4 | 0% | 0% | 25% |" in out


def test_flops_per_node_match_torchs_flop_counter():
    """Per node: the count torch's FlopCounterMode gives for one more node (the query's
    projection, paid once per call, cancels out), plus the attention itself — scores and
    weighted values, 2 · 2 · (q + 1) · d per block — which the counter does not see on this
    path (it counts only the linear layers, ``aten.addmm``)."""
    from torch.utils.flop_counter import FlopCounterMode

    from megacontext.lens import flops_per_node

    lens = LensNet(LensConfig(hidden_size=40, width=16, heads=2, layers=3))
    q = torch.randn(1, 5, 40)

    def flops(n: int) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            lens(torch.randn(1, n, 40), torch.ones(1, n, dtype=torch.int64),
                 torch.randn(1, n, 4), q)
        return counter.get_total_flops()

    attention = 3 * 2 * 2 * (5 + 1) * 16
    assert flops(3) - flops(2) == flops(2) - flops(1) == flops_per_node(lens.cfg, 5) - attention


def test_child_pool_scores_a_parent_by_its_best_child():
    tree = SyntheticTree(200_000, hidden_size=64)
    lens = small_lens()
    pooled = FocusAllocator(500, scorer="lens",
                            scorer_options={"lens": lens, "child_pool": True})
    wc = pooled.assemble(tree, query=np.ones((3, 64)))
    wc.validate(tree, tail_tokens=64, budget=500)
    assert pooled.last_stats.nodes_read <= 40 * 500  # 32 children per upper-level node scored
    scorer = pooled._scorer

    class Ctx:  # what a refocus offers a scorer
        span, cursor, query, query_tokens = 32, 200_000, None, np.ones((3, 64), np.float32)

        def __init__(self):
            self.tree = tree

        def read_gists(self, level, indices):
            return tree.gists(level, 0, tree.count(level))[torch.as_tensor(indices)].numpy()

    ctx = Ctx()
    parents = np.array([0, 5, 100])
    kids = scorer._score(ctx, 1, (parents[:, None] * 32 + np.arange(32)).reshape(-1))
    np.testing.assert_array_equal(scorer.score(ctx, 2, parents), kids.reshape(3, 32).max(1))
    plain = FocusAllocator(500, scorer="lens", scorer_options={"lens": lens})._scorer
    assert not np.array_equal(plain.score(ctx, 2, parents), scorer.score(ctx, 2, parents))
