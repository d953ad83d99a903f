"""The ruler (issue: memory against streaming at equal entries): the sliding-window baselines
can lose and win, document-balanced statistics weigh each document once, and the disk cache of
the GistNet-independent arms is invalidated by any change of what it was computed from.

The win/lose cases use ``KeyLM``, a test double of the base model whose prediction depends on
one fact: it predicts the answer token with near certainty wherever the key token has been
read (an entry whose embedding carries the key's one-hot coordinate above a threshold), and
is uniform otherwise. So a context either holds the key or it does not, and each condition's
NLL says which — memory (gists), streaming (sinks + recent, at ranks) or recent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from megacontext import substitution as sub
from megacontext.data import WindowKey, WindowLayout
from megacontext.evaluation import evaluate
from megacontext.evaluation.arms import ArmCache, model_identity, windows_digest
from megacontext.evaluation.config import (
    DistancePlan,
    MixedPlan,
    SubstitutabilityConfig,
    WindowPlan,
)
from megacontext.evaluation.render import verdict
from megacontext.evaluation.stats import by_document
from megacontext.evaluation.substitutability import mixed_window, score_batch
from megacontext.evaluation.summary import LevelScores, summarize_level
from megacontext.gistnet import ConstantGist, MeanPoolGist
from megacontext.rope import RopeConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VOCAB, KEY, ANSWER, FILLER = 64, 1, 2, 5
THRESHOLD = 0.02  # one key among 32 children: 1/32, above; the mean embedding: 1/64, below
CONTEXT_SPANS, TAIL, HORIZON, BUDGET = 3, 8, 8, 20
WINDOW = WindowLayout(level=1, num_gists=CONTEXT_SPANS, tail=TAIL, horizon=HORIZON, span=32)


class KeyLM(torch.nn.Module):
    """One-hot embeddings (hidden = vocab); logits favour ``ANSWER`` by 12 nats at every entry
    at or after the first one that carries the key."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(rope=RopeConfig(head_dim=8, theta=1e4), hidden_size=VOCAB,
                                      vocab_size=VOCAB, max_position=4096, name="key-lm")
        self.model = SimpleNamespace(embed_tokens=torch.nn.Embedding.from_pretrained(
            torch.eye(VOCAB)))
        self.fingerprint = {"name": "key-lm", "hidden_size": VOCAB, "vocab_size": VOCAB}

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def forward(self, embeds, positions, attenuation=None, *, rope=None, num_logits=None,
                cache=None):
        seen = torch.cummax(embeds[..., KEY] > THRESHOLD, dim=1).values  # [b, w]
        logits = torch.zeros(*embeds.shape[:2], VOCAB)
        logits[..., ANSWER] = 12.0 * seen
        return logits[:, -(num_logits or embeds.shape[1]):]


def window_ids(key_at: int) -> torch.Tensor:
    """Filler, the key at ``key_at``, and a horizon of answers."""
    ids = torch.full((WINDOW.length,), FILLER, dtype=torch.int64)
    ids[key_at] = KEY
    ids[-HORIZON:] = ANSWER
    return ids


def scores_for(compressor, key_positions: list[int]) -> LevelScores:
    """Every condition of the windows (one per key position), one document per window."""
    lm = KeyLM()
    plan = MixedPlan(budgets=(BUDGET,), levels=(1,), scorer="recency")
    cfg = SubstitutabilityConfig(windows=WindowPlan(context_spans=CONTEXT_SPANS,
                                                    tail_tokens=TAIL, horizon=HORIZON,
                                                    horizons=(HORIZON,)), mixed=plan,
                                 distance=DistancePlan(num_windows=0))
    nll: dict[str, list] = {}
    layouts = []
    for at in key_positions:
        ids = window_ids(at)
        baselines = {"mean_pool": MeanPoolGist(32), "mean_pool_rescaled": MeanPoolGist(32, 1.0),
                     "constant": ConstantGist.prior(torch.eye(VOCAB))}
        row = {k: v[0] for k, v in score_batch(lm, ids[None], WINDOW, compressor, baselines,
                                               cfg, mixed=True).items()}
        mixed, lay = mixed_window(lm, ids, WINDOW, compressor, plan)
        row.update(mixed)
        layouts.append(lay)
        for k, v in row.items():
            nll.setdefault(k, []).append(v.double().numpy())
    keys = [WindowKey(doc=i, offset=0, level=1) for i in range(len(key_positions))]
    scores = LevelScores(1, WINDOW, keys, {k: np.stack(v) for k, v in nll.items()},
                         np.stack([window_ids(a)[-HORIZON:].numpy() for a in key_positions]))
    scores.layouts = {f"mixed@{BUDGET}": {1: float(CONTEXT_SPANS), 0: float(TAIL)}}
    scores.cfg = cfg
    return scores


def mixed_block(scores: LevelScores) -> dict:
    corpus = SimpleNamespace(names=[f"doc{i}" for i in range(len(scores.keys))])
    block = summarize_level(scores, scores.cfg, corpus, seed=0)
    (m,) = block["mixed"]
    return m


def test_memory_beats_streaming_when_the_fact_lies_in_the_middle():
    # the key in the second span: streaming keeps the 4 first and the 16 last tokens and
    # misses it; the memory's mean-pooled gist of that span carries it
    m = mixed_block(scores_for(MeanPoolGist(32), [36, 40, 44, 50, 55, 60]))
    assert m["nll"] < 0.01 and m["nll_streaming"] > 4.0 and m["nll_recent"] > 4.0
    assert m["gain_vs_streaming"] > 4.0 and m["ci95"]["gain_vs_streaming"][0] > 0
    assert verdict(m["gain_vs_streaming"], m["ci95"]["gain_vs_streaming"]) == "memory better"
    assert verdict(m["gain_vs_recent"], m["ci95"]["gain_vs_recent"]) == "memory better"
    assert verdict(m["gain_vs_streaming_doc"], m["ci95"]["gain_vs_streaming_doc"]) == \
        "memory better"


def test_streaming_beats_memory_when_the_fact_is_a_sink_and_the_gists_are_empty():
    # the key among the first 4 tokens: streaming keeps it as a sink; content-free gists lose
    # it; recent@W (no sinks) loses it too and ties the memory
    constant = ConstantGist.prior(torch.eye(VOCAB))  # the mean embedding: 1/64 per coordinate
    m = mixed_block(scores_for(constant, [0, 1, 2, 3, 1, 2]))
    assert m["nll_streaming"] < 0.01 and m["nll"] > 4.0
    assert m["ci95"]["gain_vs_streaming"][1] < 0
    assert verdict(m["gain_vs_streaming"], m["ci95"]["gain_vs_streaming"]) == "memory worse"
    assert m["gain_vs_recent"] == pytest.approx(0.0, abs=1e-9)
    assert verdict(m["gain_vs_recent"], m["ci95"]["gain_vs_recent"]) == "tie"


def test_streaming_reads_at_cache_ranks_and_recent_at_true_positions():
    seen = {}

    def spy(lm, embeds, positions, targets, *args, **kwargs):
        seen.setdefault("positions", []).append(positions.clone())
        return real(lm, embeds, positions, targets, *args, **kwargs)

    real = sub.horizon_nll
    ids = window_ids(40)[None]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sub, "horizon_nll", spy)
        for cond in ("streaming", "recent"):
            sub.score_window(KeyLM(), ids, WINDOW, cond, entries=BUDGET, reduction="none")
    streaming, recent = seen["positions"]
    assert torch.equal(streaming, torch.arange(BUDGET + HORIZON))
    cursor = WINDOW.context + WINDOW.tail
    assert torch.equal(recent, torch.arange(cursor - BUDGET, WINDOW.length))
    # streaming keeps the sinks, then the most recent tokens
    kept = sub.kept_tokens(WINDOW, "streaming", sink_tokens=4, entries=BUDGET)
    assert kept[:4].tolist() == [0, 1, 2, 3] and kept[4].item() == cursor - (BUDGET - 4)


def test_document_balanced_means_weigh_every_document_once():
    per_window = {"x": np.array([1.0, 1.0, 1.0, 1.0, 5.0])}  # doc 0 holds four windows
    assert np.mean(per_window["x"]) == pytest.approx(1.8)
    balanced = by_document(per_window, np.array([0, 0, 0, 0, 1]))
    assert balanced["x"].tolist() == [1.0, 5.0] and balanced["x"].mean() == 3.0


def test_level_block_has_document_balanced_keys_with_intervals():
    scores = scores_for(MeanPoolGist(32), [36, 40, 44, 50, 55, 60])
    scores.keys = [WindowKey(doc=d, offset=0, level=1) for d in (0, 0, 0, 0, 1, 2)]
    corpus = SimpleNamespace(names=["a", "b", "c"])
    block = summarize_level(scores, scores.cfg, corpus, seed=0)
    for k in ("recovery_l1_doc", "content_recovery_l1_doc", "nll_full_doc"):
        assert k in block and k in block["ci95"]
    assert block["num_documents"] == 3
    per_doc = by_document({"g": scores.nll["gist"].mean(1)}, [0, 0, 0, 0, 1, 2])["g"]
    assert block["nll_gist_l1_doc"] == pytest.approx(per_doc.mean())


# -- the cache -----------------------------------------------------------------------------------

ARM = {"condition": "streaming", "entries": 128, "sink_tokens": 4, "layout": WINDOW,
       "rope": RopeConfig(head_dim=8, theta=1e4), "corpus": "c", "split": {"split": "test"},
       "windows_sha256": windows_digest(np.arange(12).reshape(3, 4))}
MODEL = {"fingerprint": {"name": "m"}, "dtype": "torch.float32", "weights_sha256": "0" * 64}


def test_cache_round_trip_and_every_key_part_changes_the_entry(tmp_path):
    cache = ArmCache(tmp_path, MODEL)
    nll = np.random.default_rng(0).random((3, 8))
    path = cache.put(ARM, nll)
    assert path.is_file() and np.array_equal(cache.get(ARM, (3, 8)), nll) and cache.hits == 1
    changes = {"condition": "recent", "entries": 256, "sink_tokens": 2,
               "layout": WindowLayout(level=1, num_gists=4, tail=TAIL, horizon=HORIZON),
               "rope": RopeConfig(head_dim=8, theta=1e4, scaling="ntk", factor=2.0,
                                  original_max_position=512),
               "corpus": "other", "split": {"split": "validation"},
               "windows_sha256": windows_digest(np.arange(12).reshape(3, 4) + 1)}
    for part, value in changes.items():
        assert cache.get({**ARM, part: value}, (3, 8)) is None, part
    other_model = ArmCache(tmp_path, {**MODEL, "weights_sha256": "1" * 64})
    assert other_model.get(ARM, (3, 8)) is None
    assert ArmCache(tmp_path, {**MODEL, "dtype": "torch.bfloat16"}).get(ARM) is None
    assert cache.rejected == 0  # different keys are plain misses


def test_a_wrong_or_torn_entry_is_detected_and_recomputed(tmp_path, caplog):
    cache = ArmCache(tmp_path, MODEL)
    nll = np.ones((3, 8))
    other = {**ARM, "entries": 256}
    cache.path(ARM).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(cache.put(other, nll * 2), cache.path(ARM))  # another arm's file, this key
    assert cache.get(ARM, (3, 8)) is None and cache.rejected == 1
    assert "stored for another arm" in caplog.text
    cache.put(ARM, nll)
    path = cache.path(ARM)
    with np.load(path) as f:  # the array edited, its digest kept
        parts = {k: np.array(f[k]) for k in f.files}
    parts["nll"][0, 0] = 7.0
    np.savez(path, **parts)
    assert cache.get(ARM, (3, 8)) is None and "does not match its stored digest" in caplog.text
    assert cache.get(other, (4, 8)) is None and "shape" in caplog.text  # wrong shape
    path.write_bytes(b"not an npz")
    assert cache.get(ARM) is None and "unreadable" in caplog.text
    assert cache.rejected == 4


def test_model_identity_sees_a_changed_weight(tiny_model_dir):
    from megacontext.base import BaseLM

    lm = BaseLM.load(str(tiny_model_dir))
    before = model_identity(lm)
    with torch.no_grad():
        lm.model.embed_tokens.weight[3, 0] += 1e-3
    after = model_identity(lm)
    assert before["fingerprint"] == after["fingerprint"]
    assert before["weights_sha256"] != after["weights_sha256"]


def test_a_second_evaluation_reads_the_cache_and_gives_the_same_results(tiny_model_dir,
                                                                         tmp_path):
    from conftest import random_text

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"doc{i:02d}.txt").write_text(random_text(700 + 60 * i, seed=40 + i))
    root = tmp_path / "arms"

    def run(out: str, *extra: str) -> tuple[dict, dict]:
        overrides = [
            f"model.name={tiny_model_dir}", "data=folder", f"data.corpus={docs}",
            "data.val_fraction=0.3", "data.test_fraction=0.3", f"+data.cache_dir={tmp_path}/c",
            f"output_dir={tmp_path / out}",
            f"cache_dir={root}", "progress_bar=false", "long_range.enabled=false",
            "passkey.enabled=false", "plots=false", "substitutability.windows.context_spans=3",
            "substitutability.windows.tail_tokens=8", "substitutability.windows.horizon=8",
            "substitutability.windows.horizons=[8]", "substitutability.windows.num_windows=4",
            "substitutability.windows.num_l2_windows=0", "substitutability.mixed.budgets=[20]",
            "substitutability.distance.num_windows=0", "substitutability.variants=[]",
            "substitutability.bootstrap=50", *extra]
        with initialize_config_dir(str(CONFIGS), version_base="1.3"):
            results = evaluate(compose("eval", overrides=overrides))
        return results, json.loads((tmp_path / out / "timing.json").read_text())["cache"]

    first, c1 = run("a")
    assert c1["hits"] == 0 and c1["misses"] == 8  # full truncated sink 3 baselines streaming recent
    second, c2 = run("b")
    assert c2["hits"] == 8 and c2["misses"] == 0
    assert (tmp_path / "a" / "substitutability.json").read_text() == \
        (tmp_path / "b" / "substitutability.json").read_text()
    _, c3 = run("c", "substitutability.sink_tokens=2")  # every arm names its sink tokens
    assert c3["hits"] == 0
    _, c4 = run("d", "substitutability.mixed.budgets=[24]")  # only streaming/recent change
    assert c4["hits"] == 6 and c4["misses"] == 2
    _, c5 = run("e", "substitutability.windows.num_windows=3")  # other windows
    assert c5["hits"] == 0

