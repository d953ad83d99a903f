"""Long-range evaluation (megacontext.evaluation.long_range) with the tiny random model."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megacontext import substitution
from megacontext.allocator import FocusAllocator, Query
from megacontext.base import BaseLM
from megacontext.base.tiny import write_tiny_model
from megacontext.evaluation.config import LongRangePlan
from megacontext.evaluation.long_range import (
    long_range_markdown,
    plot_long_range,
    run_long_range,
    window_starts,
)
from megacontext.gistnet import GistNet, GistNetConfig

TRAINED = 2048  # the tiny model's trained length here: 1,024-token windows fit, 2,048 do not
TAIL, HORIZON = 16, 16
SHORT, LONG = 1024 + TAIL + HORIZON, 2048 + TAIL + HORIZON
BUDGET = 1024 + TAIL  # everything raw at 1,024 old tokens; a real mix at 2,048


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> BaseLM:
    directory = write_tiny_model(tmp_path_factory.mktemp("tiny-long"))
    config = json.loads((directory / "config.json").read_text())
    config["max_position_embeddings"] = TRAINED
    (directory / "config.json").write_text(json.dumps(config))
    return BaseLM.load(str(directory))


@pytest.fixture(scope="module")
def corpus(lm, random_text_corpus):
    return random_text_corpus(lm.tokenizer, "long", [500 + 97 * i for i in range(8)], seed=7)


@pytest.fixture(scope="module")
def compressor() -> GistNet:
    torch.manual_seed(0)
    return GistNet(GistNetConfig(hidden_size=32, width=16, num_heads=2, levels=2)).eval()


@pytest.fixture(scope="module")
def docs(corpus) -> np.ndarray:
    return np.arange(corpus.num_docs)[::-1].copy()  # any order: the stream follows it


@pytest.fixture(scope="module")
def plan() -> LongRangePlan:
    return LongRangePlan(context_tokens=(1024, 2048), num_windows=2, tail_tokens=TAIL,
                         horizon=HORIZON, levels=(1, 2), mixed_budget=BUDGET,
                         full_max_tokens=10**6)


@pytest.fixture(scope="module")
def run(lm, compressor, corpus, docs, plan):
    """One run with every call to ``horizon_nll`` recorded (its targets and RoPE)."""
    calls: list[tuple[torch.Tensor, object]] = []
    real = substitution.horizon_nll

    def spy(lm_, embeds, positions, targets, *args, **kwargs):
        calls.append((targets.clone(), kwargs.get("rope")))
        return real(lm_, embeds, positions, targets, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(substitution, "horizon_nll", spy)
        section = run_long_range(lm, compressor, corpus, docs, plan, seed=3, bootstrap=200)
    return {"section": section, "calls": calls}


def stream_of(corpus, docs, separator) -> np.ndarray:
    """The stream rebuilt independently: documents in order, the separator between them."""
    parts = []
    for i, d in enumerate(docs):
        if i and separator is not None:
            parts.append(np.array([separator], dtype=np.int64))
        parts.append(np.asarray(corpus.doc(int(d)), dtype=np.int64))
    return np.concatenate(parts)


def hand_rope(lm, length: int):
    """``auto`` by hand: NTK with factor = the next power of two of length / trained length
    above it (2 for these windows, just over the trained length), else none."""
    if length <= TRAINED:
        return lm.config.rope
    return dataclasses.replace(lm.config.rope, scaling="ntk",
                               factor=2.0 ** math.ceil(math.log2(length / TRAINED)))


# -- windows -------------------------------------------------------------------------------------

def test_windows_are_evenly_spaced_deterministic_and_disjoint_when_possible():
    assert window_starts(10_000, 1000, 4) == window_starts(10_000, 1000, 4)
    starts = window_starts(10_000, 1000, 4)
    assert starts == [750, 3250, 5750, 8250]
    assert all(b - a >= 1000 for a, b in zip(starts, starts[1:], strict=False))
    crowded = window_starts(2500, 1000, 3)  # 3 windows cannot be disjoint in 2,500 tokens
    assert crowded[0] == 0 and crowded[-1] == 1500 and crowded == sorted(crowded)
    assert window_starts(1000, 1000, 2) == [0, 0]


def test_a_stream_shorter_than_a_window_is_named(lm, compressor, corpus, plan):
    short = np.array([0])  # one document of ~500 tokens
    with pytest.raises(ValueError, match=r"has \d+ tokens, shorter than one long-range window "
                                         rf"of {LONG} tokens"):
        run_long_range(lm, compressor, corpus, short, plan, seed=0, bootstrap=0)


def test_a_compressor_without_level_2_is_refused(lm, corpus, docs, plan):
    net = GistNet(GistNetConfig(hidden_size=32, width=16, num_heads=2, levels=1))
    with pytest.raises(ValueError, match="serves levels 1..1, the plan needs level 2"):
        run_long_range(lm, net, corpus, docs, plan, seed=0, bootstrap=0)


# -- the scores ----------------------------------------------------------------------------------

def test_every_condition_scores_the_same_horizon_tokens_under_one_rope(run, lm, corpus, docs):
    section, calls = run["section"], run["calls"]
    assert section["separator"] == lm.tokenizer.eos_id is not None
    stream = stream_of(corpus, docs, section["separator"])
    assert section["stream_tokens"] == stream.size and section["documents"] == len(docs)
    ends = np.concatenate([[0], np.cumsum(corpus.doc_lengths[docs] + 1)])  # doc d: [e_i, e_i+1 − 1)
    i = 0
    for block in section["by_length"]:
        length = block["window_tokens"]
        assert block["conditions"] == ["truncated", "sink", "gist_l1", "gist_l2",
                                       f"streaming@{BUDGET}", f"recent@{BUDGET}",
                                       f"mixed@{BUDGET}", "full"]
        for start, names in block["windows"]:
            want = torch.from_numpy(stream[start + length - HORIZON:start + length])
            spanned = [corpus.names[int(d)] for j, d in enumerate(docs)
                       if ends[j] < start + length and ends[j + 1] - 1 > start]
            assert names == spanned
            for cond in block["conditions"]:
                targets, rope = calls[i]
                i += 1
                assert torch.equal(targets[0], want), (block["context_tokens"], start, cond)
                if cond.startswith("streaming@"):  # cache ranks under the model's own RoPE
                    assert rope == lm.config.rope, cond
                else:  # one RoPE for every other condition of the window
                    assert rope == calls[i - 1 - block["conditions"].index(cond)][1], cond
    assert i == len(calls)
    short, long = section["by_length"]
    assert short["windows"][1][0] - short["windows"][0][0] >= SHORT  # disjoint
    assert long["windows"][1][0] - long["windows"][0][0] >= LONG


def test_auto_rope_is_ntk_beyond_the_trained_length_and_none_within(run, lm):
    short, long = run["section"]["by_length"]
    assert short["rope"] == {"scaling": "none", "factor": 1.0}
    assert long["rope"]["scaling"] == "ntk"
    assert 1 < LONG / TRAINED <= 2 and long["rope"]["factor"] == 2.0
    calls = run["calls"]  # the RoPE each pass really used: 8 conditions × 2 windows per length
    assert len(calls) == 32
    assert all(rope.scaling == "none" for _, rope in calls[:16])
    names = long["conditions"] * 2
    assert all(rope.scaling == "ntk" and rope.factor == 2.0
               for (_, rope), c in zip(calls[16:], names, strict=True)
               if not c.startswith("streaming@"))
    # streaming reads its cache at ranks < W + H: the model's own RoPE, unscaled
    assert all(rope == lm.config.rope for (_, rope), c in zip(calls[16:], names, strict=True)
               if c.startswith("streaming@"))


def test_sink_equals_a_hand_built_forward_under_the_resolved_scaling(run, lm, corpus, docs):
    section = run["section"]
    stream = stream_of(corpus, docs, section["separator"])
    for block in section["by_length"]:
        context, length = block["context_tokens"], block["window_tokens"]
        for w, (start, _) in enumerate(block["windows"]):
            ids = torch.from_numpy(stream[start:start + length])
            keep = torch.cat([torch.arange(4), torch.arange(context, length)])
            with torch.no_grad():
                embeds = lm.embed(ids[keep][None])
                nll = {}
                for name, rope in (("resolved", hand_rope(lm, length)),
                                   ("unscaled", lm.config.rope)):
                    logits = lm(embeds, keep, rope=rope)[0, -HORIZON - 1:-1]  # [H, vocab]
                    logp = F.log_softmax(logits.double(), dim=-1)
                    nll[name] = float(-logp[torch.arange(HORIZON), ids[-HORIZON:]].mean())
            assert block["nll_per_window"]["sink"][w] == pytest.approx(nll["resolved"], abs=1e-5)
            if length > TRAINED:  # the scaling really changed the pass
                assert abs(nll["resolved"] - nll["unscaled"]) > 1e-4


def test_mixed_with_room_for_everything_equals_full(run):
    short, long = run["section"]["by_length"]
    mixed = f"mixed@{BUDGET}"
    assert short["entries"][mixed] == 1024 + TAIL == short["entries"]["full"]
    assert short["mixed_layout"] == {"L0": 1024 + TAIL}
    np.testing.assert_allclose(short["nll_per_window"][mixed], short["nll_per_window"]["full"],
                               atol=1e-5, rtol=0)
    # at 2,048 old tokens the same budget forces gists, and never exceeds the budget
    assert long["entries"][mixed] <= BUDGET
    assert set(long["mixed_layout"]) - {"L0"}


def test_summary_follows_from_the_per_window_nlls(run):
    for b in run["section"]["by_length"]:
        m = {c: np.mean(v) for c, v in b["nll_per_window"].items()}
        assert b["num_windows"] == 2 and b["window_tokens"] in (SHORT, LONG)
        for c in b["conditions"]:
            assert b[f"nll_{c}"] == pytest.approx(m[c])
            assert len(b["ci95"][f"nll_{c}"]) == 2
            if c != "truncated":
                assert b[f"gain_{c}_vs_truncated"] == pytest.approx(m["truncated"] - m[c])
            if c not in ("truncated", "sink"):
                assert b[f"gain_{c}_vs_sink"] == pytest.approx(m["sink"] - m[c])
            if c not in ("truncated", "full"):
                assert b[f"recovery_{c}"] == pytest.approx(
                    (m["truncated"] - m[c]) / (m["truncated"] - m["full"]))
        assert b["entries"]["truncated"] == TAIL and b["entries"]["sink"] == TAIL + 4
        assert b["entries"]["gist_l1"] == b["context_tokens"] // 32 + TAIL
        assert b["entries"]["gist_l2"] == b["context_tokens"] // 1024 + TAIL
        assert set(b["seconds"]) == set(b["conditions"])
    json.dumps(run["section"], allow_nan=False)


def test_full_is_skipped_beyond_full_max_tokens_and_mixed_when_off(lm, compressor, corpus, docs):
    plan = LongRangePlan(context_tokens=(1024,), num_windows=1, tail_tokens=TAIL,
                         horizon=HORIZON, levels=(2,), mixed_budget=0, full_max_tokens=SHORT - 1)
    b = run_long_range(lm, compressor, corpus, docs, plan, seed=0, bootstrap=0)["by_length"][0]
    assert b["conditions"] == ["truncated", "sink", "gist_l2"]
    assert not any(k.startswith("recovery_") for k in b)
    assert b["ci95"]["nll_gist_l2"] is None


# -- outputs -------------------------------------------------------------------------------------

def test_markdown_and_plot_are_written(run, tmp_path):
    section = run["section"]
    text = long_range_markdown(section)
    assert "| 1,024 |" in text and "| 2,048 |" in text and "ntk ×2.00" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 2 * 8  # the header, then 8 conditions × 2 lengths
    assert f"W = {BUDGET:,}" in text and "vs streaming@" in text  # the verdict lines
    path = plot_long_range(section, tmp_path / "long_range.png")
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 300


def test_the_mixed_contexts_take_the_configured_scorer(lm, compressor, corpus, docs, plan,
                                                       monkeypatch):
    """``scorer`` reaches the allocator of the mixed@W contexts (and the record); the other
    conditions do not read it."""
    with pytest.raises(ValueError, match=r"scorer='lens' \(expected one of"):
        LongRangePlan(scorer="lens")
    seen = []
    real = FocusAllocator.assemble

    def spy(self, tree, cursor=None, query=None, previous=None):
        seen.append((self.scorer, query))
        return real(self, tree, cursor=cursor, query=query, previous=previous)

    monkeypatch.setattr(FocusAllocator, "assemble", spy)
    lexical = dataclasses.replace(plan, scorer="lexical", context_tokens=(2048,),
                                  num_windows=1, full_max_tokens=0)
    section = run_long_range(lm, compressor, corpus, docs, lexical, seed=3, bootstrap=0)
    assert section["scorer"] == "lexical" and seen
    assert all(s == "lexical" and isinstance(q, Query) and q.ids.size == 64 for s, q in seen)
    b = section["by_length"][0]
    assert b["entries"][f"mixed@{BUDGET}"] <= BUDGET
