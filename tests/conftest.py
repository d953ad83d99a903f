"""Shared fixtures: tiny random base models on disk, with a byte-level tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from megacontext.base.tiny import write_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_model_dir_48(tmp_path_factory) -> Path:
    """Another base model (hidden 48): trees built for one must refuse the other."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model-48"), hidden_size=48)
