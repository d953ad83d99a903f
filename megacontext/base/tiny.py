"""``tiny-random``: a preset for a small random Llama with a byte-level tokenizer, made locally.

It exists so that tests, the ``smoke`` experiment and examples run in seconds with the same
code paths as the real model (a model directory with ``config.json``, safetensors and a
``tokenizer.json``). Its outputs mean nothing.

The preset is data, not a model: :func:`tiny_config` is its :class:`BaseConfig`,
:func:`tiny_weights` draws its weights from the config's parameter shapes, and
:func:`write_tiny_model` writes the directory that :meth:`BaseLM.load` reads like any other.
So this module depends only on the config, and loading (which makes the directory on demand
for the name ``tiny-random``) never reaches back to the model class.
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

TINY_NAME = "tiny-random"


def byte_vocab() -> dict[str, int]:
    """The byte-level vocabulary: every byte one token (GPT-2's byte alphabet), then ``<eos>``."""
    from tokenizers import pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    return vocab


def tiny_config(hidden_size: int = 32, num_hidden_layers: int = 2,
                **overrides) -> BaseConfig:
    """The ``tiny-random`` architecture (``overrides`` replace any :class:`BaseConfig` field)."""
    fields = dict(family="llama", hidden_size=hidden_size, intermediate_size=48,
                  num_hidden_layers=num_hidden_layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=len(byte_vocab()),
                  max_position_embeddings=512, tie_word_embeddings=True,
                  name=f"tiny-random-{hidden_size}")
    return BaseConfig(**(fields | overrides))


def tiny_weights(config: BaseConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights far from init (matrices N(0, 0.25), vectors U(0.8, 1.2)), drawn in the
    model's parameter order so a seed always gives the same model."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in config.parameter_shapes().items():
        if len(shape) > 1:
            weights[name] = torch.randn(shape, generator=generator) * 0.5
        else:
            weights[name] = 0.8 + 0.4 * torch.rand(shape, generator=generator)
    return weights


def write_tiny_model(directory: str | os.PathLike, hidden_size: int = 32,
                     num_hidden_layers: int = 2, seed: int = 0) -> Path:
    """Write a random llama-family model directory: ``config.json``, ``model.safetensors`` and
    a byte-level BPE ``tokenizer.json`` without merges (every byte one token, then ``<eos>``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = byte_vocab()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(directory / "tokenizer.json"))
    config = tiny_config(hidden_size, num_hidden_layers)
    hf = config.to_hf() | {"eos_token_id": vocab["<eos>"]}
    (directory / "config.json").write_text(json.dumps(hf, indent=2))
    state = {k: v.contiguous() for k, v in tiny_weights(config, seed).items()}
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
