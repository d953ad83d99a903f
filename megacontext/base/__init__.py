"""The frozen base-model runtime: a Llama-family decoder over embeddings and float positions."""

from megacontext.base.config import BaseConfig
from megacontext.base.loading import load_base_lm
from megacontext.base.model import BaseLM
from megacontext.base.tokenizer import Tokenizer

__all__ = ["BaseConfig", "BaseLM", "Tokenizer", "load_base_lm"]
