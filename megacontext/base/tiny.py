"""``tiny-random``: a small random Llama with a byte-level tokenizer, made locally.

It exists so that tests, the ``smoke`` experiment and examples run in seconds with the same
code paths as the real model (a model directory with ``config.json``, safetensors and a
``tokenizer.json``). Its outputs mean nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from megacontext.base.config import BaseConfig
from megacontext.base.model import BaseLM

TINY_NAME = "tiny-random"


def write_tiny_model(directory: str | os.PathLike, hidden_size: int = 32,
                     num_hidden_layers: int = 2, seed: int = 0) -> Path:
    """Write a random llama-family model directory: ``config.json``, ``model.safetensors`` and
    a byte-level BPE ``tokenizer.json`` without merges (every byte one token, then ``<eos>``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(directory / "tokenizer.json"))
    config = BaseConfig(family="llama", hidden_size=hidden_size, intermediate_size=48,
                        num_hidden_layers=num_hidden_layers, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=len(vocab),
                        max_position_embeddings=512, tie_word_embeddings=True,
                        name=f"tiny-random-{hidden_size}")
    generator = torch.Generator().manual_seed(seed)
    model = BaseLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
            else:
                p.copy_(0.8 + 0.4 * torch.rand(p.shape, generator=generator))
    hf = config.to_hf() | {"eos_token_id": vocab["<eos>"]}
    (directory / "config.json").write_text(json.dumps(hf, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(directory / "model.safetensors"))
    return directory


def ensure_tiny_model(root: Path) -> Path:
    """The cached ``tiny-random`` directory under ``root``, written once (atomically)."""
    target = root / f"{TINY_NAME}-v1"
    if (target / "model.safetensors").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root))
    try:
        write_tiny_model(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
