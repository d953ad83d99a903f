"""Shared fixtures: tiny random base models on disk, with a byte-level tokenizer."""

from __future__ import annotations

import random
import string
from pathlib import Path

import pytest

from megacontext.base.tiny import write_tiny_model
from megacontext.data import load_corpus


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_model_dir_48(tmp_path_factory) -> Path:
    """Another base model (hidden 48): trees built for one must refuse the other."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model-48"), hidden_size=48)


def random_text(n: int, seed: int) -> str:
    """ASCII letters, spaces and newlines (no digits): the tiny models' byte tokenizer gives
    one token per character."""
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters + "      \n") for _ in range(n))


@pytest.fixture(scope="session")
def random_text_corpus(tmp_path_factory):
    """``make(tokenizer, name, lengths, seed)``: a corpus of random-text documents
    ``doc0.txt …`` of those lengths (document i drawn with seed ``seed + i``)."""
    def make(tokenizer, name: str, lengths: list[int], seed: int):
        root = tmp_path_factory.mktemp(f"{name}-docs")
        for i, n in enumerate(lengths):
            (root / f"doc{i}.txt").write_text(random_text(n, seed=seed + i))
        return load_corpus(root, tokenizer, cache_dir=tmp_path_factory.mktemp(f"{name}-cache"),
                           progress=False)
    return make
