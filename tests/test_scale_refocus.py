"""megacontext.bench.scale_refocus: the trees are timed interleaved, round after round, and
the report is the median of the round medians with its ratio to the first tree."""

from __future__ import annotations

import statistics

import pytest
import torch

from megacontext.bench import scale_refocus
from megacontext.rope import RopeConfig
from megacontext.tree import MegaContextTree

HIDDEN, VOCAB = 8, 64


def make_tree(path, tokens: int, seed: int) -> MegaContextTree:
    g = torch.Generator().manual_seed(seed)
    t = MegaContextTree.create(path, hidden_size=HIDDEN, vocab_size=VOCAB,
                               rope=RopeConfig(8, 10000.0), fingerprint={"name": "bench"},
                               levels=2, gist_dtype="float16")
    t.append_tokens(torch.randint(0, VOCAB, (tokens,), generator=g))
    for k in (1, 2):
        t.append_gists(k, torch.randn(t.appended_count(k - 1) // 32, HIDDEN, generator=g))
    t.commit()
    return t


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale-refocus")
    out = [make_tree(root / f"t{n}", n, seed=n) for n in (4096, 40960)]
    yield out
    for t in out:
        t.close()


def test_rounds_interleave_the_trees_and_the_report_is_their_median(trees, monkeypatch):
    calls = []
    fake = iter([5.0, 1.0, 9.0, 3.0, 4.0, 2.0, 7.0, 8.0, 6.0, 2.5, 6.5, 1.5])

    def latency(tree, scorer, budget, repeats, query, options):
        calls.append((tree.num_tokens, scorer, budget, repeats, query is None))
        return {"median_ms": next(fake)}

    monkeypatch.setattr(scale_refocus, "refocus_latency", latency)
    r = scale_refocus.interleaved(trees, ["recency", "similarity"], budget=256, repeats=3,
                                  rounds=3)
    one_round = [(4096, "recency", 256, 3, True), (4096, "similarity", 256, 3, False),
                 (40960, "recency", 256, 3, True), (40960, "similarity", 256, 3, False)]
    assert calls == one_round * 3
    assert r["recency"][0]["rounds_ms"] == [5.0, 4.0, 6.0]
    assert r["recency"][1]["rounds_ms"] == [9.0, 7.0, 6.5]
    assert r["similarity"][1]["rounds_ms"] == [3.0, 8.0, 1.5]
    assert [x["median_ms"] for x in r["recency"]] == [5.0, 7.0]
    assert [x["ratio"] for x in r["recency"]] == [1.0, 7.0 / 5.0]
    assert [x["ratio"] for x in r["similarity"]] == [1.0, 3.0 / 2.0]
    assert [x["tokens"] for x in r["similarity"]] == [4096, 40960]


def test_real_trees_are_timed_from_their_folders(trees, capsys):
    r = scale_refocus.main([str(t.path) for t in trees] + ["--rounds", "2", "--repeats", "3",
                                                            "--budget", "256"])
    for s in ("recency", "similarity"):
        rows = r[s]
        assert [x["tokens"] for x in rows] == [4096, 40960]
        for x in rows:
            assert len(x["rounds_ms"]) == 2 and all(t > 0 for t in x["rounds_ms"])
            assert x["median_ms"] == statistics.median(x["rounds_ms"])
        assert rows[0]["ratio"] == 1.0
    assert capsys.readouterr().out.count("tokens: median") == 4
