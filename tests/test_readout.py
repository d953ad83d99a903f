"""The oracle read-out (megacontext.evaluation.readout, eval/readout.py): the oracle holds the
needle raw where recency does not, a context with room for everything answers exactly like the
full context, and the entry point writes what the docs quote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megacontext.base import BaseLM
from megacontext.data.needles import filler_stream
from megacontext.evaluation.config import PasskeyConfig
from megacontext.evaluation.readout import condition_names, run_readout
from megacontext.evaluation.substitutability import variant_rope
from megacontext.gistnet import MeanPoolGist
from megacontext.spans import node_size

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lm(tiny_model_dir) -> BaseLM:
    return BaseLM.load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def filler(lm, random_text_corpus) -> np.ndarray:
    corpus = random_text_corpus(lm.tokenizer, "readout", [700 + 50 * i for i in range(3)],
                                seed=20)
    return filler_stream(corpus, np.arange(len(corpus.names)))


def readout(lm, filler, pk: PasskeyConfig, **kwargs) -> dict:
    return run_readout(lm, MeanPoolGist(32).eval(), filler, pk, tail_tokens=16, seed=7,
                       progress=None, **kwargs)


def test_condition_names_per_budget_and_rule():
    assert condition_names(["fill", "minimal", "full", "truncated"], [64, 128],
                           ["exact", "compact"]) == [
        "fill@64|exact", "fill@64|compact", "fill@128|exact", "fill@128|compact",
        "minimal|exact", "minimal|compact", "full", "truncated@64", "truncated@128"]
    with pytest.raises(ValueError, match="'oracle'"):
        condition_names(["oracle"], [64], ["exact"])


def test_room_for_everything_answers_like_the_full_context(lm, filler):
    """Budget >= memory + question + answer: fill and recency read every token raw at its own
    position, so their greedy answer is the full context's, token for token."""
    pk = PasskeyConfig(lengths=(260,), depths=(0.0, 0.5, 1.0), trials=1, max_new_tokens=6)
    r = readout(lm, filler, pk, budgets=[512], levels=1,
                conditions=["fill", "recency", "minimal", "full"])
    assert r["conditions"] == ["fill@512|exact", "recency@512|exact", "minimal|exact", "full"]
    rows = {(x["depth"], x["condition"]): x for x in r["rows"]}
    assert len(rows) == 12
    for d in pk.depths:
        full = rows[d, "full"]
        assert full["entries"] == 260 + len(lm.tokenizer.encode(pk.question))
        for cond in ("fill@512|exact", "recency@512|exact"):
            assert rows[d, cond]["answer"] == full["answer"], (d, cond)
            assert rows[d, cond]["gist_entries"] == 0 and rows[d, cond]["needle_raw"]
        assert rows[d, "minimal|exact"]["needle_raw"]
    # not vacuous: the answers depend on the memory
    assert len({rows[d, "full"]["answer"] for d in pk.depths}) > 1


def test_the_oracle_holds_the_needle_raw_where_recency_does_not(lm, filler):
    """A 1,500-token memory, budget W = 192: fill and minimal hold the needle raw at every depth,
    minimal with the fewest gists (only the needle's path is expanded, so no level-2 node
    is split into its 32 level-1 children but the needle's); recency leaves an
    old needle as a gist. The truncated baselines keep the last W tokens and hold the needle
    only where it lies in them; truncated-ntk reads them under the NTK factor auto resolves
    the memory's extent to (the smallest power of two covering it)."""
    W = 192
    pk = PasskeyConfig(lengths=(1500,), depths=(0.1, 0.5, 1.0), trials=2, max_new_tokens=6)
    auto = variant_rope(lm.config.rope, {"scaling": "auto", "auto_kind": "ntk"},
                        lm.config.max_position)
    r = readout(lm, filler, pk, budgets=[W], levels=2, rope=auto,
                conditions=["fill", "minimal", "recency", "truncated", "truncated-ntk"],
                positions=["exact", "compact"], local=64)
    rows = r["rows"]
    assert len(rows) == 3 * 2 * 8
    q = len(lm.tokenizer.encode(pk.question))
    for x in rows:
        name = x["condition"].partition("|")[0].partition("@")[0]
        if name in ("fill", "minimal"):
            assert x["needle_raw"], x
        if name == "recency" and x["depth"] < 0.9:
            assert not x["needle_raw"], x
        if name.startswith("truncated"):
            assert x["entries"] == W and x["gist_entries"] == 0
            needle = len(lm.tokenizer.encode(pk.needle.format(key=x["key"])))
            start = round(x["depth"] * (1500 - len(lm.tokenizer.encode(pk.intro)) - needle)) \
                + len(lm.tokenizer.encode(pk.intro))
            assert x["needle_raw"] == (start >= 1500 + q - W), x
            assert x["rope_factor"] == (4.0 if name == "truncated-ntk" else None)
        if name in ("fill", "recency"):
            assert x["entries"] <= W
    for rule in ("exact", "compact"):
        for d in pk.depths:
            for t in range(2):
                def one(c, d=d, t=t):
                    return next(x for x in rows if x["condition"] == c and x["depth"] == d
                                and x["trial"] == t)
                assert 0 < one(f"minimal|{rule}")["gist_entries"] <= \
                    one(f"fill@{W}|{rule}")["gist_entries"]
        # compact places the context inside the trained length; exact spans the memory
        assert max(x["extent"] for x in rows if x["condition"] == f"fill@{W}|{rule}") \
            <= (lm.config.max_position if rule == "compact" else 1500 + q + 6)
    assert min(x["extent"] for x in rows if x["condition"] == f"fill@{W}|exact") \
        > node_size(1, 32) * 30
    for cond, cells in r["table"].items():
        hits = [x["correct"] for x in rows if x["condition"] == cond]
        assert cells == [f"{sum(hits)}/{len(hits)}"]


def test_entry_point_writes_the_json_table_and_plot(tiny_model_dir, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"doc{i}.txt").write_text(("lorem ipsum dolor sit amet " * 60)[i:])
    out = tmp_path / "readout.json"
    cmd = [sys.executable, str(ROOT / "eval" / "readout.py"), "mean", "--lengths", "300",
           "--depths", "0.5", "--trials", "1", "--budgets", "64", "--levels", "1",
           "--conditions", "fill", "truncated", "--positions", "exact", "compact",
           "--out", str(out), "--override", f"model.name={tiny_model_dir}", "data=folder",
           f"data.corpus={docs}", f"+data.cache_dir={tmp_path / 'cache'}",
           "data.val_fraction=0.3", "passkey.max_new_tokens=6", "allocator.tail_tokens=16"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    r = json.loads(out.read_text())
    assert r["conditions"] == ["fill@64|exact", "fill@64|compact", "truncated@64"]
    assert [x["condition"] for x in r["rows"]] == r["conditions"]
    assert {x["key"] for x in r["rows"]} == {r["rows"][0]["key"]}
    assert r["compressor"] == "mean" and r["split"] == "validation"
    assert r["templates"]["needle"] == PasskeyConfig.needle
    assert all(x["needle_raw"] for x in r["rows"][:2])
    assert "| fill@64|compact | " + r["table"]["fill@64|compact"][0] in done.stdout
    assert out.with_suffix(".png").stat().st_size > 0
    helped = subprocess.run([sys.executable, str(ROOT / "eval" / "readout.py"), "--help"],
                            capture_output=True, text=True)
    assert helped.returncode == 0 and "docs/focus.md" in helped.stdout
