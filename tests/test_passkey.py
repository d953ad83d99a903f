"""Passkey retrieval (megacontext.evaluation.passkey): templates, examples, the JSON, and the
positive control: a memory with room for everything answers exactly like the full context."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import random_text  # tests/ is on sys.path under pytest
from hydra import compose, initialize_config_dir

from megacontext.allocator import FocusAllocator
from megacontext.base import BaseLM
from megacontext.data import load_corpus
from megacontext.evaluation import passkey as passkey_module
from megacontext.evaluation.checks import check_config
from megacontext.evaluation.config import MemoryConfig, PasskeyConfig
from megacontext.evaluation.passkey import (
    INTRO,
    NEEDLE,
    QUESTION,
    answer_is,
    make_example,
    run_passkey,
)
from megacontext.gistnet import MeanPoolGist

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TEMPLATES = {"intro": INTRO, "needle": NEEDLE}


@pytest.fixture(scope="module")
def lm(tiny_model_dir) -> BaseLM:
    return BaseLM.load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def corpus(lm, random_text_corpus):
    return random_text_corpus(lm.tokenizer, "passkey", [700 + 50 * i for i in range(3)], seed=10)


def passkey(lm, corpus, cfg: PasskeyConfig, budget: int, tail: int = 64,
            scorer: str = "similarity", **kwargs) -> dict:
    return run_passkey(lm, MeanPoolGist(32).eval(), corpus, np.arange(len(corpus.names)), cfg,
                       allocator=lambda: FocusAllocator(budget=budget, tail_tokens=tail,
                                                        scorer=scorer),
                       memory=MemoryConfig(), seed=1234, **kwargs)


# -- the templates ---------------------------------------------------------------------------

def test_default_templates_are_the_classic_wording_in_code_and_config():
    cfg = PasskeyConfig()
    assert (cfg.intro, cfg.needle, cfg.question) == (INTRO, NEEDLE, QUESTION)
    assert NEEDLE.format(key="12345") == \
        "\nThe pass key is 12345. Remember it. 12345 is the pass key.\n"
    assert QUESTION == "\nWhat is the pass key? The pass key is"
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        for name in ("eval", "eval_full"):
            p = compose(name).passkey
            assert (p.intro, p.needle, p.question) == (INTRO, NEEDLE, QUESTION), name


@pytest.mark.parametrize("field, value, named", [
    ("needle", "The pass key is hidden here.", "does not contain {key}"),
    ("question", "What is the pass key? It is {key}", "must not contain the key"),
    ("intro", "Remember {key}.\n", "the key belongs in the needle only"),
    ("needle", "The {what} is {key}.", "the field(s) {what}"),
    ("needle", "The pass key is {}.", "the field(s) {}"),
    ("needle", "The pass key is {key.real}.", "the field(s) {key.real}"),
    ("question", "What is the pass {key", "is not a str.format template"),
    ("intro", "a lone } brace", "is not a str.format template"),
    ("question", "  \n", "expected a question"),
    ("needle", 12345, "expected a str.format template"),
])
def test_bad_templates_are_refused_naming_the_value(field, value, named):
    with pytest.raises(ValueError, match="PasskeyConfig") as e:
        PasskeyConfig(**{field: value})
    assert f"{field}={value!r}" in str(e.value)
    assert named in str(e.value)


def test_good_templates_and_literal_braces_are_accepted():
    cfg = PasskeyConfig(intro="{{memo}}\n", needle="Code {key}; again {key:>5}.",
                        question="Code {{?}}:")
    assert cfg.intro.format() == "{memo}\n" and cfg.question.format() == "Code {?}:"
    assert PasskeyConfig.template_fields(cfg.needle) == ["key", "key"]


def test_a_bad_template_in_the_eval_config_is_named_before_loading():
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("eval", overrides=["passkey.question='What is {key}?'",
                                         "passkey.needle='no key here'"])
    with pytest.raises(ValueError) as e:
        check_config(cfg)
    assert "question='What is {key}?'" in str(e.value)
    assert "needle='no key here' does not contain {key}" in str(e.value)


def test_eval_configs_size_the_grids():
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        small_cfg, full_cfg = compose("eval"), compose("eval_full")
    small, full = PasskeyConfig(**small_cfg.passkey), PasskeyConfig(**full_cfg.passkey)
    assert (small.lengths, len(small.depths), small.trials) == ((4096, 16384), 3, 2)
    assert full.lengths == (4096, 16384, 65536)
    assert len(full.depths) >= 5 and full.trials >= 4 and full.full_context
    # the memory and its allocator are eval.yaml's
    for key in ("allocator", "memory", "model", "compressor", "seed"):
        assert full_cfg[key] == small_cfg[key], key


# -- examples --------------------------------------------------------------------------------

def test_passkey_example_holds_the_key_at_its_depth(lm):
    tok = lm.tokenizer
    filler = np.asarray(tok.encode(random_text(5000, 1)), dtype=np.int64)
    needle = len(tok.encode(NEEDLE.format(key="12345")))
    intro = len(tok.encode(INTRO))
    for depth in (0.0, 0.25, 1.0):
        ids, start = make_example(tok, filler, 1000, depth, "12345", offset=4990, **TEMPLATES)
        assert ids.size == 1000
        assert start == intro + round(depth * (1000 - intro - needle))
        assert tok.decode(ids[start:start + needle].tolist()) == NEEDLE.format(key="12345")
        assert tok.decode(ids[:intro].tolist()) == INTRO
    # filler is read cyclically from the offset
    ids, start = make_example(tok, filler, 1000, 1.0, "12345", offset=4990, **TEMPLATES)
    assert ids[intro:intro + 10].tolist() == filler[4990:5000].tolist()
    assert ids[intro + 10] == filler[0]
    with pytest.raises(ValueError, match="cannot hold"):
        make_example(tok, filler, 50, 0.5, "12345", 0, **TEMPLATES)
    assert answer_is(" 12345. It", "12345") and not answer_is(" 1234 5", "12345")
    assert not answer_is(" no number", "12345")


CUSTOM = {"intro": "Memo {{internal}}.\n",
          "needle": "\nThe vault code is {key}; the code for the vault is {key}.\n",
          "question": "\nQ: what is the vault code?\nA: The vault code is"}


def test_custom_templates_are_what_the_model_reads(lm, corpus, monkeypatch, capsys):
    from megacontext import runtime

    fed: list[list[int]] = []
    real_feed = runtime.MemoryLM.feed

    def feed(self, ids):
        fed.append([int(t) for t in ids])
        return real_feed(self, ids)

    read: list[tuple[list[int], int]] = []
    real_greedy = passkey_module.greedy

    def greedy(lm_, ids, first_position, *args):
        read.append(([int(t) for t in ids], first_position))
        return real_greedy(lm_, ids, first_position, *args)

    monkeypatch.setattr(runtime.MemoryLM, "feed", feed)
    monkeypatch.setattr(passkey_module, "greedy", greedy)
    cfg = PasskeyConfig(lengths=(200,), depths=(0.5,), trials=1, max_new_tokens=6,
                        full_context=True, **CUSTOM)
    r = passkey(lm, corpus, cfg, budget=96, tail=16, progress_bar=True)
    tok = lm.tokenizer
    (e,) = r["examples"]
    key, start = e["key"], e["needle_start"]
    memory, question = (tok.decode(ids) for ids in fed)  # the memory, then the question
    needle = CUSTOM["needle"].format(key=key)
    assert memory.startswith("Memo {internal}.\n") and len(fed[0]) == 200
    assert memory.count(needle) == 1 and tok.decode(fed[0][start:]).startswith(needle)
    assert "pass key" not in memory and key not in question
    assert question == CUSTOM["question"]
    # streaming, truncation and the full context read the same text: memory + question
    (streaming, at), (truncated, first), (full, zero) = read
    assert tok.decode(full) == memory + question and zero == 0
    assert full[first:] == truncated and len(truncated) == 96
    # streaming: the first 4 tokens and the last 92, at cache ranks 0 … 95
    assert streaming == full[:4] + full[-92:] and at == 0 and r["sink_tokens"] == 4
    assert r["templates"] == CUSTOM
    # the bar counts trials on stderr (the default: on)
    err = capsys.readouterr().err
    assert "passkey" in err and "1/1" in err


# -- the JSON --------------------------------------------------------------------------------

def test_json_has_rows_grids_and_per_length_summaries(lm, corpus, capsys):
    # 480 + question + answer exceed the tiny model's 512 positions: no full context there
    cfg = PasskeyConfig(lengths=(200, 480), depths=(0.2, 0.9), trials=2, max_new_tokens=6,
                        full_context=True)
    lines: list[str] = []
    r = passkey(lm, corpus, cfg, budget=96, tail=16, progress=lines.append,
                progress_bar=False)
    assert capsys.readouterr().err == ""  # no bar
    assert len(lines) == 8 and lines[0].startswith("passkey 200 tokens, depth 0.2, trial 0")
    q = len(lm.tokenizer.encode(QUESTION))
    assert r["full_max_length"] == 512 - q - 6
    assert r["templates"] == {"intro": INTRO, "needle": NEEDLE, "question": QUESTION}
    assert r["max_new_tokens"] == 6
    assert r["conditions"] == ["memory", "streaming", "truncated", "full"]
    rows = r["examples"]
    assert len(rows) == 8
    assert [(e["length"], e["depth"], e["trial"]) for e in rows] == \
        [(n, d, t) for n in (200, 480) for d in (0.2, 0.9) for t in (0, 1)]
    for e in rows:
        full = ("full",) if e["length"] == 200 else ()
        for cond in ("memory", "streaming", "truncated") + full:
            assert e[f"{cond}_answer"] == lm.tokenizer.decode(e[f"{cond}_answer_ids"])
            assert e[f"{cond}_correct"] == answer_is(e[f"{cond}_answer"], e["key"])
            assert 1 <= len(e[f"{cond}_answer_ids"]) <= 6
        assert ("full_answer" in e) == (e["length"] == 200)
    for cond in r["conditions"]:
        c = r[cond]
        for i, n in enumerate((200, 480)):
            hits = [e[f"{cond}_correct"] for e in rows if e["length"] == n
                    and f"{cond}_correct" in e]
            expected = float(np.mean(hits)) if hits else None
            assert c["accuracy_by_length"][i] == expected
            for j, d in enumerate((0.2, 0.9)):
                cell = [e[f"{cond}_correct"] for e in rows if e["length"] == n
                        and e["depth"] == d and f"{cond}_correct" in e]
                assert c["accuracy"][i][j] == (float(np.mean(cell)) if cell else None)
        answered = [e[f"{cond}_correct"] for e in rows if f"{cond}_correct" in e]
        assert c["num_answered"] == len(answered)
        assert c["mean_accuracy"] == float(np.mean(answered))
        assert len(c["accuracy_by_depth"]) == 2
    assert r["full"]["accuracy"][1] == [None, None]
    assert r["full"]["accuracy_by_length"][1] is None and r["full"]["num_answered"] == 4


def test_the_lexical_focus_puts_the_needle_raw_where_recency_does_not(lm, corpus):
    """The question shares the needle's tokens, and the filler (random letters: one token a
    character) holds none of them: the lexical scorer expands the needle's spans to raw tokens
    at every depth, while recency leaves the old ones as gists (whatever the tiny model then
    answers)."""
    cfg = PasskeyConfig(lengths=(1200,), depths=(0.1, 0.5), trials=2, max_new_tokens=6,
                        intro="", needle=" #@%# {key} #@%# ", question=" #@%# #@%#")
    raw = {s: passkey(lm, corpus, cfg, budget=160, tail=16, scorer=s,
                      progress_bar=False)["key_raw_in_memory_context"]
           for s in ("lexical", "recency")}
    assert raw["lexical"] == [[1.0, 1.0]]
    assert raw["recency"] == [[0.0, 0.0]]


# -- positive control ------------------------------------------------------------------------

def test_a_memory_with_room_for_everything_answers_like_the_full_context(lm, corpus, capsys):
    """Budget >= memory + question + answer: every token raw at its own position, so the
    memory's greedy answer is the full context's, token for token."""
    cfg = PasskeyConfig(lengths=(260, 466), depths=(0.0, 0.5, 1.0), trials=1,
                        max_new_tokens=8, full_context=True)
    r = passkey(lm, corpus, cfg, budget=512, progress_bar=False)
    assert capsys.readouterr().err == ""
    rows = r["examples"]
    assert len(rows) == 6 and len({e["key"] for e in rows}) == 6
    for e in rows:
        assert e["memory_answer_ids"] == e["full_answer_ids"], e
        assert e["key_level_in_memory_context"] == 0
    # not vacuous: the answers depend on the memory
    assert len({tuple(e["full_answer_ids"]) for e in rows}) > 1
    assert r["memory"]["accuracy"] == r["full"]["accuracy"]
    assert r["key_raw_in_memory_context"] == [[1.0] * 3] * 2


FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again. " * 3 + "A farmer walked to the market with a basket of apples. The river ran "
          "slowly past the old mill. Children played in the square while the baker opened his "
          "shop. Clouds gathered over the hills in the afternoon, and by evening it began to "
          "rain. ")


@pytest.mark.slow
def test_smollm2_memory_with_room_for_everything_retrieves_the_key(tmp_path):
    """SmolLM2-135M-Instruct finds the key in ~400-600 tokens of plain filler with every token
    in context; a memory with a budget covering everything must find it too."""
    lm = BaseLM.load("smollm2-135m")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "filler.txt").write_text(FILLER)
    corpus = load_corpus(tmp_path / "docs", lm.tokenizer, cache_dir=tmp_path / "cache",
                         progress=False)
    cfg = PasskeyConfig(lengths=(400, 600), depths=(0.25, 0.75), trials=1, full_context=True)
    r = passkey(lm, corpus, cfg, budget=1024, progress_bar=False)
    rows = r["examples"]
    assert len(rows) == 4 and all("full_answer" in e for e in rows)
    for e in rows:
        assert e["full_correct"], e  # the model retrieves at this length
        assert e["memory_correct"], e  # ... and so does the memory holding every token
        assert e["key_level_in_memory_context"] == 0
    assert r["memory"]["mean_accuracy"] == r["full"]["mean_accuracy"] == 1.0


def test_memory_rope_scaling_defaults_to_auto_and_is_checked():
    assert MemoryConfig().rope_scaling == "auto"
    with pytest.raises(ValueError, match=r"rope_scaling='ntk' \(expected auto or none\)"):
        MemoryConfig(rope_scaling="ntk")


def test_greedy_reads_with_the_rope_it_is_given(lm):
    """``greedy(..., rope=R)`` continues as a no-cache argmax loop rotated by R does, and R
    matters here (the default rotation continues differently), so the test can fail."""
    import dataclasses

    import torch

    from megacontext.evaluation.passkey import greedy

    rope = dataclasses.replace(lm.config.rope, scaling="ntk", factor=64.0)
    ids = np.random.default_rng(3).integers(0, lm.config.vocab_size, 40)
    first = 3000

    def reference(r) -> list[int]:
        seq = [int(t) for t in ids]
        with torch.inference_mode():
            for _ in range(6):
                x = torch.tensor([seq])
                pos = torch.arange(first, first + len(seq))
                logits = lm(lm.embed(x), pos, rope=r, num_logits=1)[0, -1]
                seq.append(int(logits.argmax()))
        return seq[len(ids):]

    scaled, own = reference(rope), reference(lm.config.rope)
    assert scaled != own  # the rotation changes the answer: not vacuous
    assert greedy(lm, ids, first, 6, rope=rope) == scaled
    assert greedy(lm, ids, first, 6) == own
