"""GistNet variants that read the frozen base model: contextual level-1 inputs.

Axes: ``B`` spans, ``s`` span (32), ``c`` hidden size.

A light GistNet reads each span's token input embeddings. A contextual one
(``GistNetConfig.input_layer = K > 0``) reads the base model's hidden states after its first
``K`` layers instead, computed causally over each span alone: a span's states depend on its
own 32 tokens only, so ingest stays streaming (no left context to carry) and a gist is the same
whichever batch or chunk its span arrives in. This module joins ``base`` and ``gistnet`` (the
layer of ``ingest``); both below it stay unaware of each other.

Cost: the first ``K`` of the base model's layers over every ingested token (for SmolLM2,
K/30 of a forward pass), on top of the GistNet itself (docs/gistnet.md).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from megacontext.gistnet import Compressor, GistNet


@torch.no_grad()
def span_states(lm, embeds: torch.Tensor, layers: int, chunk: int = 256) -> torch.Tensor:
    """Hidden states after the first ``layers`` base layers, each span read causally alone.

    Args:
        lm: the frozen :class:`~megacontext.base.BaseLM`.
        embeds: ``[..., s, c]`` token input embeddings, one row per span.
        layers: K, 1 … the model's number of layers.
        chunk: spans per pass (memory only; the result does not depend on it).

    Returns:
        ``[..., s, c]`` float32 states (no gradient: the base model is frozen and its inputs
        are token embeddings).
    """
    total = len(lm.model.layers)
    if not 1 <= layers <= total:
        raise ValueError(f"input_layer={layers} is outside 1..{total} (the base model's layers)")
    lead, (s, c) = embeds.shape[:-2], embeds.shape[-2:]
    x = rearrange(embeds, "... s c -> (...) s c")
    positions = torch.arange(s, dtype=torch.int64)  # only differences matter to RoPE
    out = [lm.hidden_states(x[i:i + chunk], positions, layers=layers).float()
           for i in range(0, x.shape[0], chunk)]
    states = torch.cat(out) if out else x.new_zeros((0, s, c))
    return states.reshape(*lead, s, c)


class ContextualCompressor(nn.Module):
    """A contextual GistNet with the base model that feeds it: the :data:`Compressor` that
    ingest, evaluation, training and the runtime call (level 1 from token embeddings).

    Args:
        lm: the frozen base model (not a submodule: never saved, never optimised).
        gistnet: a GistNet with ``cfg.input_layer > 0``.
    """

    def __init__(self, lm, gistnet: GistNet) -> None:
        super().__init__()
        if not gistnet.cfg.input_layer:
            raise ValueError("ContextualCompressor needs a GistNet with input_layer > 0")
        if gistnet.cfg.hidden_size != lm.config.hidden_size:
            raise ValueError(f"GistNet hidden_size {gistnet.cfg.hidden_size} != the base "
                             f"model's {lm.config.hidden_size}")
        object.__setattr__(self, "lm", lm)  # frozen, outside the module tree
        self.gistnet = gistnet
        self.cfg = gistnet.cfg  # what callers read (levels, span)

    @property
    def training_record(self):
        return self.gistnet.training_record

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        if level != 1:
            return self.gistnet(x, level)
        states = span_states(self.lm, x, self.cfg.input_layer)
        if not bool(self.gistnet.input_calibrated):
            raise ValueError("this contextual GistNet was never calibrated "
                             "(GistNet.calibrate_inputs): train it first")
        return self.gistnet(states, 1)

    def compress(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """`[n, c]` → `[n/32, c]` or `[b, n, c]` → `[b, n/32, c]`, as `GistNet.compress`."""
        span = self.cfg.span
        if x.shape[-2] % span:
            raise ValueError(f"compress needs n divisible by span {span}, got n={x.shape[-2]}")
        return self(rearrange(x, "... (g s) c -> ... g s c", s=span), level)

    def config_dict(self) -> dict:
        return self.gistnet.config_dict()


def compressor_for(model: nn.Module, lm) -> Compressor:
    """What to call for gists: a contextual GistNet wrapped with ``lm``; anything else as is."""
    if isinstance(model, GistNet) and model.cfg.input_layer:
        return ContextualCompressor(lm, model)
    return model


__all__ = ["ContextualCompressor", "compressor_for", "span_states"]
