"""Shared fixtures: a tiny random base model on disk, with a byte-level tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from megacontext.base import BaseConfig, BaseLM


def write_tiny_model(directory: Path, hidden_size: int = 32, seed: int = 0) -> Path:
    """A random llama-family model directory: config.json, model.safetensors and a byte-level
    BPE tokenizer.json with no merges (every byte is one token; ids 0..255, then <eos>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    directory.mkdir(parents=True, exist_ok=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(directory / "tokenizer.json"))
    config = BaseConfig(family="llama", hidden_size=hidden_size, intermediate_size=48,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        vocab_size=len(vocab), max_position_embeddings=512,
                        tie_word_embeddings=True, name=f"tiny-{hidden_size}")
    torch.manual_seed(seed)
    model = BaseLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5) if p.ndim > 1 else p.uniform_(0.8, 1.2)
    hf = config.to_hf() | {"eos_token_id": vocab["<eos>"]}
    (directory / "config.json").write_text(json.dumps(hf))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(directory / "model.safetensors"))
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_model_dir_48(tmp_path_factory) -> Path:
    """Another base model (hidden 48): trees built for one must refuse the other."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model-48"), hidden_size=48)
