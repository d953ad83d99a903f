"""GistNet: the compressor that turns 32 vectors into one gist, level after level.

Level 1 reads 32 token input embeddings; level k ≥ 2 reads 32 gists of level k − 1. Either way
the output is one vector in the base model's input-embedding space.

Axis legend:
    b  batch (any leading dims)        g  spans, one gist each
    s  span, the 32 children of a gist  c  hidden size of the base model
    w  GistNet width (the bottleneck)   h  heads, d head dim (w = h·d)
    B  spans flattened (b·g)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from megacontext.exports import blank_training_record
from megacontext.gistnet.lane import GistLane

# What makes gists: a GistNet, MeanPoolGist, ConstantGist or any callable of this shape.
Compressor = Callable[[torch.Tensor, int], torch.Tensor]  # [..., s, c], level -> [..., c]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class GistNetConfig:
    """Shape of a GistNet.

    Args:
        hidden_size: the base model's hidden size `c` (input and output width).
        span: children per gist; 32 everywhere in this project (see `allow_any_span`).
        width: bottleneck width `w` of the encoder; 128 is the measured default (docs/gistnet.md).
        num_layers: bidirectional encoder layers over the children (0 = pooling only).
        num_heads: attention heads of the encoder and of the pooling query.
        mlp_ratio: encoder MLP hidden size as a multiple of `width`.
        levels: gist levels served (1 … levels).
        share_levels: False = separate weights per level; True = one set of weights and a
            per-level table of offset embeddings and pooling queries (a level embedding).
        rescale_output: rescale every gist to the L2 norm `target_norm` given to
            `GistNet.set_output_prior`.
        allow_any_span: permit span != 32 (the tree format assumes 32).
        norm_eps: LayerNorm epsilon.
        anchor: False = an untrained gist is the output prior (a constant, normally the mean
            token embedding) and a learned vector is added to it; True = the gist is a learned
            softmax mix of its own 32 children, starting (almost all) on the first, plus the
            learned vector (its bias then starts at zero). Untrained, it emits (~99%) the first
            child: a real token, read as text, where every constant costs more than dropping
            the text (docs/training.md, "Gists that start as a token"). Not contextual.
        input_layer: 0 = level 1 reads the tokens' input embeddings (the light variant);
            K > 0 = it reads the frozen base model's hidden states after its first K layers,
            computed causally over each span alone (:class:`megacontext.encoders.
            ContextualCompressor` runs them; ingest runs them too), standardised per
            dimension with statistics calibrated once on training data (middle-layer states
            have a few huge outlier dimensions).
    """

    hidden_size: int
    span: int = 32
    width: int = 128
    num_layers: int = 1
    num_heads: int = 4
    mlp_ratio: int = 2
    levels: int = 2
    share_levels: bool = False
    rescale_output: bool = False
    allow_any_span: bool = False
    norm_eps: float = 1e-5
    input_layer: int = 0
    anchor: bool = False

    def __post_init__(self) -> None:
        problems = []
        for name, low in [("hidden_size", 1), ("span", 2), ("width", 1), ("num_layers", 0),
                          ("num_heads", 1), ("mlp_ratio", 1), ("levels", 1),
                          ("input_layer", 0)]:
            v = getattr(self, name)
            if not _is_int(v) or v < low:
                problems.append(f"{name}={v!r} (expected an int >= {low})")
        if _is_int(self.width) and _is_int(self.num_heads) and self.num_heads >= 1 \
                and self.width % self.num_heads:
            problems.append(f"width={self.width} is not divisible by num_heads={self.num_heads}")
        if self.span != 32 and not self.allow_any_span:
            problems.append(f"span={self.span!r} (expected 32; set allow_any_span=True to change)")
        for name in ("share_levels", "rescale_output", "allow_any_span", "anchor"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}={getattr(self, name)!r} (expected a bool)")
        if not isinstance(self.norm_eps, float) or not 0 < self.norm_eps < 1:
            problems.append(f"norm_eps={self.norm_eps!r} (expected a float in (0, 1))")
        if self.anchor is True and _is_int(self.input_layer) and self.input_layer > 0:
            problems.append("anchor=True with input_layer > 0 (the anchor mixes children as "
                            "input embeddings; contextual inputs are hidden states)")
        if problems:
            raise ValueError("invalid GistNetConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


def flops_per_child(cfg: GistNetConfig) -> float:
    """Forward matmul FLOPs (2 per multiply-add) per input vector, i.e. per level-1 token."""
    c, w, s, h, r = cfg.hidden_size, cfg.width, cfg.span, cfg.num_heads, cfg.mlp_ratio
    layer = 2 * (4 * w * w) + 2 * (2 * r * w * w) + 2 * (2 * s * w)  # qkv+proj, mlp, QKᵀ and AV
    per_span = 2 * w * w + 2 * w * c  # value and up-projection, once per gist
    return 2 * c * w + cfg.num_layers * layer + 2 * (2 * h * w) + per_span / s


def _offset_table(span: int, width: int) -> torch.Tensor:
    """Sinusoidal embedding of the child offsets `i − (span−1)/2` (child units): [s, w]."""
    offsets = torch.arange(span, dtype=torch.float64) - (span - 1) / 2  # −15.5 … 15.5
    freqs = (span * 2.0) ** (-torch.arange(0, width // 2, dtype=torch.float64) / max(width // 2, 1))
    angles = offsets[:, None] * freqs[None, :] * (math.pi / 2)
    table = torch.zeros(span, width, dtype=torch.float64)
    table[:, 0 : 2 * (width // 2) : 2] = angles.sin()
    table[:, 1 : 2 * (width // 2) : 2] = angles.cos()
    return table.float()


ANCHOR_SCALE = 8.0  # anchor logits = 8 · (offset table + content score): 99% on the first child


class _Block(nn.Module):
    """Pre-norm transformer encoder layer, bidirectional: every child attends to every child."""

    def __init__(self, cfg: GistNetConfig) -> None:
        super().__init__()
        w, eps = cfg.width, cfg.norm_eps
        self.heads = cfg.num_heads
        self.norm1, self.norm2 = nn.LayerNorm(w, eps=eps), nn.LayerNorm(w, eps=eps)
        # No biases inside (as in Llama): on CPU each bias costs a pass over the output.
        self.qkv, self.proj = nn.Linear(w, 3 * w, bias=False), nn.Linear(w, w, bias=False)
        self.fc1 = nn.Linear(w, cfg.mlp_ratio * w, bias=False)
        self.fc2 = nn.Linear(cfg.mlp_ratio * w, w, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, s, w]
        q, k, v = rearrange(self.qkv(self.norm1(x)), "B s (t h d) -> t B h s d", t=3, h=self.heads)
        a = F.scaled_dot_product_attention(q, k, v)  # no mask: the span is read both ways
        x = x + self.proj(rearrange(a, "B h s d -> B s (h d)"))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class _Core(nn.Module):
    """Down-projection, offset embedding, encoder, learned-query pooling, up-projection."""

    def __init__(self, cfg: GistNetConfig, tables: int) -> None:
        super().__init__()
        w, h, d = cfg.width, cfg.num_heads, cfg.head_dim
        self.down = nn.Linear(cfg.hidden_size, w, bias=False)
        self.norm_in = nn.LayerNorm(w, eps=cfg.norm_eps)  # L1 embeddings and L2 gists alike
        self.offset = nn.Parameter(_offset_table(cfg.span, w).expand(tables, -1, -1).clone())
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.num_layers))
        self.norm_out = nn.LayerNorm(w, eps=cfg.norm_eps)
        # A learned query against projected keys, q·(W_k x) = (W_kᵀq)·x, folds into one vector
        # per head; values are projected after pooling (linear, so the order is free) so the
        # value cost is per gist, not per child.
        self.query = nn.Parameter(0.02 * torch.randn(tables, h, w))
        self.value = nn.Parameter(torch.empty(h, d, w).uniform_(-(w**-0.5), w**-0.5))
        self.up = nn.Linear(w, cfg.hidden_size)
        nn.init.zeros_(self.up.weight)  # start harmless: the gist is the bias (the prior)
        nn.init.zeros_(self.up.bias)
        if cfg.anchor:  # which children the gist mixes: by offset (first child) and content
            first = torch.zeros(tables, cfg.span)
            first[:, 0] = 1.0
            self.anchor = nn.Parameter(first)
            self.anchor_query = nn.Parameter(torch.zeros(tables, w))
        else:
            self.anchor = self.anchor_query = None

    def forward(self, x: torch.Tensor, table: int) -> torch.Tensor:  # [B, s, c] -> [B, c]
        y, mix = self.encode(self.down(x), table)
        return y if mix is None else y + einsum(mix, x, "B s, B s c -> B c")

    def encode(self, z: torch.Tensor, table: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Everything after the down-projection (``z``: the children already projected):
        the learned vector ``[B, c]`` and, for an anchored core, the weights ``[B, s]`` with
        which the gist mixes its children (the caller adds that mix); else None."""
        z = self.norm_in(z) + self.offset[table]
        for block in self.blocks:
            z = block(z)
        z = self.norm_out(z)
        attn = einsum(z, self.query[table], "B s w, h w -> B h s").softmax(dim=-1)
        pooled = einsum(attn, z, "B h s, B s w -> B h w")
        v = einsum(pooled, self.value, "B h w, h d w -> B h d")
        y = self.up(rearrange(v, "B h d -> B (h d)"))
        if self.anchor is None:
            return y, None
        score = einsum(z, self.anchor_query[table], "B s w, w -> B s") * z.shape[-1] ** -0.5
        return y, (ANCHOR_SCALE * (self.anchor[table] + score)).softmax(dim=-1)


def _split_spans(x: torch.Tensor, span: int) -> torch.Tensor:
    if x.ndim not in (2, 3):
        raise ValueError(f"compress expects [n, c] or [b, n, c], got shape {tuple(x.shape)}")
    n = x.shape[-2]
    if n % span:
        raise ValueError(f"compress needs n divisible by span {span}, got n={n}")
    return rearrange(x, "... (g s) c -> ... g s c", s=span)


def _check_level(level: object, levels: int | None) -> None:
    if not _is_int(level) or level < 1 or (levels is not None and level > levels):
        served = f"1..{levels}" if levels is not None else ">= 1"
        raise ValueError(f"level={level!r} is not served (expected an int in {served})")


class GistNet(nn.Module):
    """32 children → 1 gist: bidirectional encoder over the span, learned-query pooling.

    The children's offsets from the span center (child index − 15.5, in child units, which at
    level k is 32^(k−1) tokens) enter through a per-level learned embedding initialised
    sinusoidally; the span is always exactly 32 aligned children, so a table over the 32 slots
    is as expressive as any relative scheme and needs nothing from `megacontext.rope`.

    Untrained, it emits exactly the output prior (the up-projection is zero and the residual
    gate is 0), an in-distribution vector such as the mean token embedding; anchored, ~99% its
    first child.

    ``training_record`` says, per level ``1 … cfg.levels``, whether that level was trained
    and on how many optimizer steps and windows: ``{1: {"trained": True, "steps": 300,
    "windows": 1200}, 2: {"trained": False, "steps": 0, "windows": 0}}``. It is plain
    bookkeeping, outside the state dict and the digest; ``save_gistnet`` writes it and
    ``load_gistnet`` restores it (see ``untrained_levels``).

    Args:
        cfg: the shape.
        init_output: optional prior `[c]`, see `set_output_prior`.
        target_norm: optional gist norm, see `set_output_prior`.
    """

    def __init__(self, cfg: GistNetConfig, init_output: torch.Tensor | None = None,
                 target_norm: float | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.share_levels:
            self.cores = nn.ModuleList([_Core(cfg, tables=cfg.levels)])
        else:
            self.cores = nn.ModuleList(_Core(cfg, tables=1) for _ in range(cfg.levels))
        self.chunk_spans = 64  # spans per internal batch (speed only; 0 = no chunking)
        self.gate = nn.Parameter(torch.zeros(cfg.levels))  # residual from the children's mean
        self.register_buffer("target_norm", torch.zeros(()))  # 0 = not set
        if cfg.input_layer:  # contextual inputs: their per-dimension standardisation
            c = cfg.hidden_size
            self.register_buffer("input_shift", torch.zeros(c))
            self.register_buffer("input_scale", torch.ones(c))
            self.register_buffer("input_calibrated", torch.zeros((), dtype=torch.bool))
        # Not a buffer: bookkeeping must not change the digest of the weights.
        self.training_record = blank_training_record(cfg.levels)
        # The gist lane (docs/design.md): None = none, and the state dict and digest of a
        # GistNet without one are what they always were.
        self.register_module("lane", None)
        if init_output is not None:
            self.set_output_prior(init_output, target_norm)
        elif target_norm is not None:
            raise ValueError("target_norm needs init_output as well")

    @torch.no_grad()
    def set_output_prior(self, mean_embedding: torch.Tensor,
                         target_norm: float | None = None) -> None:
        """Set the up-projection bias of every level to the prior vector.

        Args:
            mean_embedding: `[c]`, normally the base model's mean token input embedding.
            target_norm: the L2 norm that gists are rescaled to when `cfg.rescale_output`;
                normally the mean norm of real token embeddings.
        """
        c = self.cfg.hidden_size
        if tuple(mean_embedding.shape) != (c,) or not torch.isfinite(mean_embedding).all():
            raise ValueError(f"output prior must be a finite [{c}] vector, "
                             f"got shape {tuple(mean_embedding.shape)}")
        if not self.cfg.anchor:  # an anchored gist starts as its first child, bias zero
            for core in self.cores:
                core.up.bias.copy_(mean_embedding)
        if target_norm is not None:
            if not math.isfinite(target_norm) or target_norm <= 0:
                raise ValueError(f"target_norm={target_norm!r} (expected a finite float > 0)")
            self.target_norm.fill_(target_norm)

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """Compress spans.

        Args:
            x: `[b, g, s, c]` (any leading dims): the 32 children of each span, in order.
            level: 1 if the children are token embeddings, k if they are level-(k−1) gists.

        Returns:
            `[b, g, c]` gists in the base model's input-embedding space (module dtype).
        """
        cfg = self.cfg
        _check_level(level, cfg.levels)
        if x.ndim < 3 or tuple(x.shape[-2:]) != (cfg.span, cfg.hidden_size):
            raise ValueError(f"GistNet expects [..., {cfg.span}, {cfg.hidden_size}], "
                             f"got shape {tuple(x.shape)}")
        if cfg.rescale_output and self.target_norm.item() <= 0:
            raise ValueError("rescale_output needs set_output_prior(..., target_norm=...) first")
        lead = x.shape[:-2]
        x = rearrange(x, "... s c -> (...) s c").to(self.gate.dtype)
        if cfg.input_layer and level == 1:
            x = (x - self.input_shift) / self.input_scale
        core, table = self._core(level)
        y = self._chunked(lambda a, b: core(x[a:b], table), x.shape[0])
        return self._finish(y, x.mean(dim=1), level).reshape(*lead, cfg.hidden_size)

    def _core(self, level: int) -> tuple[_Core, int]:
        return (self.cores[0], level - 1) if self.cfg.share_levels else (self.cores[level - 1], 0)

    def _chunked(self, run: Callable[[int, int], torch.Tensor], n: int) -> torch.Tensor:
        # Spans never interact: chunks that stay in cache only buy speed (~1.5x on CPU).
        step = self.chunk_spans if self.chunk_spans > 0 else max(n, 1)
        chunks = [run(i, i + step) for i in range(0, n, step)]
        return torch.cat(chunks) if chunks else run(0, 0)  # an empty batch gives [0, c]

    def _finish(self, y: torch.Tensor, mean: torch.Tensor, level: int) -> torch.Tensor:
        y = y + self.gate[level - 1] * mean  # [B, c]: the residual from the children's mean
        if self.cfg.rescale_output:
            y = y * (self.target_norm / y.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        return y

    @torch.no_grad()
    def token_table(self, embedding: torch.Tensor) -> torch.Tensor | None:
        """``[vocab, w]``: level 1's down-projection of each row of ``embedding [vocab, c]``
        (for :meth:`from_ids`); None for contextual inputs, which read hidden states."""
        down = self._core(1)[0].down.weight
        return None if self.cfg.input_layer else embedding.to(down.dtype) @ down.T

    def from_ids(self, ids: torch.Tensor, embedding: torch.Tensor,
                 table: torch.Tensor) -> torch.Tensor:
        """Level-1 gists ``[B, c]`` of token spans ``ids [B, s]``: ``self(embedding[ids], 1)``
        with the down-projection looked up in ``table`` (:meth:`token_table`) and the mean
        by ``embedding_bag``: equal to float32 rounding (the same sums in another order)."""
        if table is None or ids.ndim != 2 or ids.shape[1] != self.cfg.span:
            raise ValueError(f"from_ids needs a token table and [B, {self.cfg.span}] ids, got "
                             f"{tuple(ids.shape)}")
        core, t = self._core(1)
        embedding = embedding.to(self.gate.dtype)

        def run(a: int, b: int) -> torch.Tensor:
            y, mix = core.encode(table[ids[a:b]], t)
            if mix is None:
                return y
            mix = mix.to(embedding.dtype)
            return y + F.embedding_bag(ids[a:b], embedding, per_sample_weights=mix, mode="sum")

        y = self._chunked(run, ids.shape[0])
        mean = F.embedding_bag(ids, embedding, mode="mean")  # no [B, s, c]
        return self._finish(y, mean, 1)

    def compress(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """`[n, c]` → `[n/32, c]` or `[b, n, c]` → `[b, n/32, c]`; n must divide by 32."""
        return self(_split_spans(x, self.cfg.span), level)

    def config_dict(self) -> dict:
        d = dataclasses.asdict(self.cfg)
        for key in ("input_layer", "anchor"):  # off: exports (and digests) as before
            if not d[key]:
                del d[key]
        if self.lane is not None:
            d["lane"] = self.lane.config_dict()
        return d

    def attach_lane(self, lane: GistLane | None) -> GistNet:
        """Give this GistNet a gist lane (or remove it with None); returns self."""
        if lane is not None and not isinstance(lane, GistLane):
            raise TypeError(f"a lane must be a GistLane, got {type(lane).__name__}")
        if lane is not None and lane.cfg.hidden_size != self.cfg.hidden_size:
            raise ValueError(f"the lane is for hidden size {lane.cfg.hidden_size}, the GistNet "
                             f"for {self.cfg.hidden_size}")
        self.lane = lane
        return self

    @property
    def variant(self) -> str:
        """``light`` (input embeddings) or ``contextual-L{K}`` (base hidden states after K
        layers), with the encoder's width and depth."""
        cfg = self.cfg
        kind = f"contextual-L{cfg.input_layer}" if cfg.input_layer else "light"
        return f"{kind}{'-anchor' if cfg.anchor else ''} w{cfg.width}x{cfg.num_layers}"

    @torch.no_grad()
    def calibrate_inputs(self, states: torch.Tensor) -> None:
        """Fix the per-dimension standardisation of contextual level-1 inputs from a sample
        of hidden states ``[..., c]`` (their mean and standard deviation); once."""
        if not self.cfg.input_layer:
            raise ValueError("calibrate_inputs is for contextual GistNets (input_layer > 0)")
        x = states.detach().reshape(-1, states.shape[-1]).double()
        if x.shape[0] < 2 or not torch.isfinite(x).all():
            raise ValueError(f"calibration needs >= 2 finite states, got {x.shape[0]}")
        self.input_shift.copy_(x.mean(0).float())
        self.input_scale.copy_(x.std(0).clamp_min(1e-6).float())
        self.input_calibrated.fill_(True)


class MeanPoolGist(nn.Module):
    """Baseline (`--gistnet mean`): the mean of the 32 children, optionally rescaled.

    Args:
        span: children per gist.
        target_norm: if given, every gist is rescaled to this L2 norm.
    """

    def __init__(self, span: int = 32, target_norm: float | None = None) -> None:
        super().__init__()
        if not _is_int(span) or span < 2:
            raise ValueError(f"span={span!r} (expected an int >= 2)")
        if target_norm is not None and (not math.isfinite(target_norm) or target_norm <= 0):
            raise ValueError(f"target_norm={target_norm!r} (expected a finite float > 0)")
        self.span = span
        self.register_buffer("target_norm", torch.tensor(float(target_norm or 0.0)))

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """`[b, g, s, c]` → `[b, g, c]`; `level` is checked and otherwise unused."""
        _check_level(level, None)
        if x.ndim < 3 or x.shape[-2] != self.span:
            raise ValueError(f"MeanPoolGist expects [..., {self.span}, c], "
                             f"got shape {tuple(x.shape)}")
        y = x.mean(dim=-2)
        if self.target_norm.item() > 0:
            y = y * (self.target_norm / y.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        return y

    def compress(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """`[n, c]` → `[n/32, c]` or `[b, n, c]` → `[b, n/32, c]`; n must divide by 32."""
        return self(_split_spans(x, self.span), level)

    def config_dict(self) -> dict:
        return {"span": self.span}


class ConstantGist(nn.Module):
    """Baseline: one content-free vector for every span, at every level.

    With the base model's mean token embedding (`ConstantGist.prior(embedding)`) this is exactly
    what an untrained GistNet emits (its output prior), so a gist's gain over this baseline is
    what its *content* buys beyond merely having an entry at the span's center.

    Args:
        vector: `[c]` the placeholder.
    """

    def __init__(self, vector: torch.Tensor) -> None:
        super().__init__()
        if vector.ndim != 1 or not torch.isfinite(vector).all():
            raise ValueError(f"ConstantGist needs a finite [c] vector, got shape "
                             f"{tuple(vector.shape)}")
        self.register_buffer("vector", vector.detach().clone().float())

    @classmethod
    def prior(cls, embedding: torch.Tensor) -> ConstantGist:
        """The untrained GistNet's output: the mean of the embedding matrix `[vocab, c]`."""
        return cls(embedding.detach().float().mean(0))

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """`[..., s, c]` → `[..., c]`, every row the placeholder."""
        _check_level(level, None)
        if x.ndim < 3 or x.shape[-1] != self.vector.shape[0]:
            raise ValueError(f"ConstantGist expects [..., s, {self.vector.shape[0]}], "
                             f"got shape {tuple(x.shape)}")
        return self.vector.to(x.dtype).expand(*x.shape[:-2], -1)

    def config_dict(self) -> dict:
        return {"hidden_size": int(self.vector.shape[0])}


def untrained_levels(model: nn.Module, levels: Iterable[int]) -> list[int]:
    """The levels of ``levels`` that ``model`` was never trained on, in the given order.

    A GistNet answers from its ``training_record`` (an export without one counts as
    untrained at every level); ``MeanPoolGist`` and ``ConstantGist`` are baselines with
    nothing to train, so they answer ``[]``.

    Raises:
        ValueError: a level the GistNet does not serve.
        TypeError: a model that is none of these and has no ``training_record``.
    """
    levels = list(levels)
    for level in levels:
        _check_level(level, model.cfg.levels if isinstance(model, GistNet) else None)
    if isinstance(model, MeanPoolGist | ConstantGist):
        return []
    record = getattr(model, "training_record", None)
    if record is None:
        raise TypeError(f"untrained_levels needs a GistNet, MeanPoolGist or ConstantGist, "
                        f"got {type(model).__name__}")
    out: list[int] = []
    for level in levels:
        entry = record.get(level, record.get(str(level)))
        if (entry is None or not entry.get("trained")) and level not in out:
            out.append(level)
    return out
