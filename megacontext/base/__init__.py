"""The frozen base-model runtime: a Llama-family decoder over embeddings and float positions.

Modules, each importing only those before it: ``config`` (the architecture), ``tokenizer``,
``tiny`` (the ``tiny-random`` preset), ``loading`` (files -> config, tokenizer, weights),
``cache`` (the KV cache), ``model`` (the decoder; ``BaseLM.load`` reads through ``loading``).
"""

from megacontext.base.cache import KVCache
from megacontext.base.config import BaseConfig
from megacontext.base.model import BaseLM, load_base_lm
from megacontext.base.tokenizer import Tokenizer

__all__ = ["BaseConfig", "BaseLM", "KVCache", "Tokenizer", "load_base_lm"]
