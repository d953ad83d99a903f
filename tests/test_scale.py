"""eval/scale.py on the tiny model: the corpus stream, planted needles at exact depths, a
resumed build equal to an uninterrupted one, and the reports."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from megacontext.evaluation.scale import Needle, corpus_stream, plant, run_scale, skip
from megacontext.tree import MegaContextTree, verify
from tests.test_training import CONFIGS


class Docs:
    def __init__(self, lengths):
        self.docs = [np.arange(n, dtype=np.int64) + 1000 * i for i, n in enumerate(lengths)]
        self.num_docs = len(lengths)

    def doc(self, i):
        return self.docs[i]


def test_stream_cycles_with_a_fresh_shuffle_and_needles_land_exactly():
    corpus = Docs([5, 7, 3])
    stream = corpus_stream(corpus, np.arange(3), seed=0, separator=-1)
    first = [next(stream) for _ in range(6)]
    cycle0 = sorted(tuple(x.tolist()) for x in first[:3])
    cycle1 = sorted(tuple(x.tolist()) for x in first[3:])
    assert cycle0 == cycle1 and all(x[-1] == -1 for x in first)  # each doc once per cycle
    needles = [Needle(10, "1", np.array([-7, -7])), Needle(25, "2", np.array([-9]))]
    total = 40
    ids = np.concatenate(list(plant(corpus_stream(corpus, np.arange(3), 0, -1), total,
                                    needles)))
    assert ids.size == total
    assert ids[total - 10:total - 8].tolist() == [-7, -7] and ids[total - 25] == -9
    plain = np.concatenate(list(plant(corpus_stream(corpus, np.arange(3), 0, -1), total, [])))
    rest = ids[(ids != -7) & (ids != -9)]
    assert rest.tolist() == plain[:rest.size].tolist()  # the stream shifts around the needles
    again = np.concatenate(list(skip(plant(corpus_stream(corpus, np.arange(3), 0, -1), total,
                                           needles), 13)))
    assert again.tolist() == ids[13:].tolist()
    with pytest.raises(ValueError, match="overlap"):
        list(plant(iter([np.arange(50)]), 40, [Needle(10, "a", np.arange(5)),
                                              Needle(8, "b", np.arange(3))]))
    with pytest.raises(ValueError, match="overlap"):  # two at the same depth
        list(plant(iter([np.arange(50)]), 40, [Needle(10, "a", np.arange(5)),
                                              Needle(10, "b", np.arange(3))]))


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale-docs")
    for i in range(4):
        rng = random.Random(i)
        (root / f"d{i}.txt").write_text("".join(rng.choice(string.ascii_letters + " \n")
                                                for _ in range(3000)))
    return root


def scale_config(model: Path, docs: Path, out: Path, *extra: str):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("scale", overrides=[
            f"model.name={model}", f"corpus={docs}", f"output_dir={out}", "tokens=20000",
            "chunk_tokens=4096", "needles.depths=[1000,12000,50000]", "refocus.budget=256",
            "refocus.repeats=3", "progress_bar=false", *extra])


def test_scale_builds_measures_and_resumes(tiny_model_dir, docs, tmp_path, monkeypatch):
    torch.manual_seed(0)
    # the tiny model's trained length is 512: a local window inside it
    r = run_scale(scale_config(tiny_model_dir, docs, tmp_path / "a",
                               "positions={kind: compact, local: 256, quantum: 64}"))
    assert r["counts"][0] == 20000 and r["levels"] == 2 and r["built_tokens"] == 20000
    assert [n["depth"] for n in r["needles"]] == [1000, 12000]  # 50,000 > the memory
    assert all(n["stored_exact"] for n in r["needles"])
    assert all(isinstance(n["correct"], bool) for n in r["needles"])
    assert [n["question"] for n in r["needles"]] == ["\nWhat is pass key number 1? Pass key "
                                                     "number 1 is", "\nWhat is pass key number "
                                                     "2? Pass key number 2 is"]
    assert {x["scorer"] for x in r["refocus"]} == {"recency", "similarity", "lexical"}
    assert r["positions"]["kind"] == "compact" and r["answer_scorer"] == "lexical"
    assert r["lexicon"]["spans"] == 20000 // 32 and r["lexicon"]["bytes"] > 0
    # the lexical focus (through the index) brings both needles in raw; recency not the deep one
    assert [n["level_in_context"] for n in r["needles"]] == [0, 0]
    c = run_scale(scale_config(tiny_model_dir, docs, tmp_path / "c", "answer_scorer=recency",
                               "lexicon=false", "refocus.scorers=[recency]", "plots=false",
                               "positions={kind: compact, local: 256, quantum: 64}"))
    assert c["lexicon"] is None and c["needles"][1]["level_in_context"] > 0
    assert r["far_end_max_abs"] < 1e-4 and r["peak_rss_mib"] > 0
    header = r["bytes_total"] - 20000 * sum(r["bytes_per_token_by_level"].values())
    assert 0 <= header < 10_000  # the levels' files, and the header
    saved = json.loads((tmp_path / "a" / "scale.json").read_text())
    assert saved["tokens"] == 20000 and (tmp_path / "a" / "scale.png").stat().st_size > 0
    assert "stored span exact" in (tmp_path / "a" / "scale.md").read_text()
    # interrupted after two chunks, then resumed: the same tree as the uninterrupted build
    import megacontext.evaluation.scale as scale

    real, calls = scale.Ingestor.commit, {"n": 0}

    def commit(self, note=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, note)

    monkeypatch.setattr(scale.Ingestor, "commit", commit)
    with pytest.raises(KeyboardInterrupt):
        run_scale(scale_config(tiny_model_dir, docs, tmp_path / "b", "answer=false"))
    monkeypatch.undo()
    assert verify(tmp_path / "b" / "tree") == []
    with pytest.raises(ValueError, match="built with other settings.*seed"):
        run_scale(scale_config(tiny_model_dir, docs, tmp_path / "b", "answer=false", "seed=7"))
    r2 = run_scale(scale_config(tiny_model_dir, docs, tmp_path / "b", "answer=false"))
    assert 4096 * 2 <= r2["resumed_from"] < 20000  # two chunks of >= 4,096 tokens committed
    assert r2["built_tokens"] == 20000 - r2["resumed_from"]
    with MegaContextTree.open(tmp_path / "a" / "tree") as x, \
            MegaContextTree.open(tmp_path / "b" / "tree") as y:
        assert torch.equal(x.tokens(), y.tokens())
        for k in (1, 2):
            assert torch.equal(x.gists(k), y.gists(k))


def test_distinct_needles_each_take_their_own_wording(tiny_model_dir, docs, tmp_path):
    from megacontext.base import BaseLM
    cfg = scale_config(tiny_model_dir, docs, tmp_path / "d", "needles=distinct", "answer=false",
                       "lexicon=false", "refocus.scorers=[recency]", "plots=false",
                       "needles.depths=[1000,6000,12000]")
    r = run_scale(cfg)
    questions = [n["question"] for n in r["needles"]]
    assert questions == list(cfg.needles.question[:3]) and len(set(questions)) == 3
    tok = BaseLM.load(str(tiny_model_dir)).tokenizer
    planted = json.loads((tmp_path / "d" / "build.json").read_text())["needles"]
    for (depth, key, ids), template in zip(planted, cfg.needles.needle, strict=False):
        assert tok.decode(ids) == template.format(key=key), depth  # the i-th wording, exactly
    bad = scale_config(tiny_model_dir, docs, tmp_path / "e", "needles=distinct",
                       "needles.question=[only one]")
    with pytest.raises(ValueError, match="5 wordings and needles.question 1"):
        run_scale(bad)


def test_scale_refuses_or_extends_a_gistnet_with_too_few_levels(tiny_model_dir, docs, tmp_path):
    """A tree deeper than the GistNet's levels: an error naming the levels, or with
    upper_levels=untrained the added levels are built and named untrained in scale.json."""
    from megacontext.base import BaseLM
    from megacontext.gistnet import GistNet, GistNetConfig, save_gistnet

    lm = BaseLM.load(str(tiny_model_dir))
    net = GistNet(GistNetConfig(hidden_size=lm.config.hidden_size, width=16, num_heads=2,
                                levels=2))
    net.training_record[1] = {"trained": True, "steps": 3, "windows": 12}
    export = save_gistnet(net, tmp_path / "g", lm.fingerprint)
    extra = (f"compressor={export}", "levels=3", "answer=false", "needles.depths=[]",
             "refocus.scorers=[recency]", "plots=false")
    with pytest.raises(ValueError, match="serves 2 gist level.*needs 3"):
        run_scale(scale_config(tiny_model_dir, docs, tmp_path / "a", *extra))
    # a lens trained on the 2-level GistNet serves the extended one (whose digest differs)
    from megacontext.allocator import LensConfig, LensNet, save_lens
    from megacontext.gistnet import gistnet_digest

    lens = LensNet(LensConfig(hidden_size=lm.config.hidden_size, width=32, heads=2, layers=1))
    lens.gistnet_digest = gistnet_digest(net)
    save_lens(lens, tmp_path / "lens", lm.fingerprint)
    r = run_scale(scale_config(tiny_model_dir, docs, tmp_path / "b", *extra,
                               "upper_levels=untrained", f"lens={tmp_path / 'lens'}",
                               "refocus.scorers=[recency,lens]"))
    assert r["levels"] == 3 and r["untrained_levels"] == [2, 3]
    assert [x["scorer"] for x in r["refocus"]] == ["recency", "lens"]
    assert "untrained levels: 2, 3" in (tmp_path / "b" / "scale.md").read_text()
