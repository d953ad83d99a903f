"""A frozen Llama-family decoder that reads input embeddings at float positions.

Axes: ``b`` batch, ``w`` working-context entries, ``c`` hidden size, ``h`` query heads,
``k`` key/value heads, ``d`` head dim, ``v`` vocabulary.

The decoder is the transformers Llama/Mistral/Qwen2/Qwen3 architecture, written out so that it
can take what a working context provides and transformers' models cannot: ``inputs_embeds``
that mix token embeddings with gists, positions that are float64 (gists sit at half-integer
span centers, up to 2^30 and beyond) and a per-entry RoPE attenuation for gists. Parameter names
match transformers' exactly, so a transformers state dict loads as is.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from megacontext.base.cache import KVCache
from megacontext.base.config import BaseConfig
from megacontext.base.loading import read_model
from megacontext.rope import RopeConfig, apply_rotary, rotary_tables

__all__ = ["BaseLM", "KVCache", "load_base_lm", "load_state"]

# An attention mask as scaled_dot_product_attention takes it: (bool mask or None, is_causal).
Mask = tuple[torch.Tensor | None, bool]


class Lane(Protocol):
    """What ``lane=`` takes: the gist lane bound to one pass's gist rows
    (:meth:`megacontext.gistnet.GistLane.at`). ``adapt(layer, target, x, y)`` returns the
    projection ``target`` (``q k v o gate up down``) of layer ``layer``: ``y`` (the frozen
    weights' output for ``x``) at raw rows, ``y`` plus the lane's update at gist rows; it may
    write into ``y`` (each projection's fresh output, used nowhere else)."""

    def adapt(self, layer: int, target: str, x: torch.Tensor,
              y: torch.Tensor) -> torch.Tensor: ...


def _project(linear: nn.Linear, x: torch.Tensor, lane: Lane | None, layer: int,
             target: str) -> torch.Tensor:
    y = linear(x)
    return y if lane is None else lane.adapt(layer, target, x, y)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like transformers' LlamaRMSNorm."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE applied from precomputed cos/sin."""

    def __init__(self, cfg: BaseConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        # transformers' Llama biases o_proj too when attention_bias is set; Qwen2 never does.
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size,
                                bias=bias and cfg.family != "qwen2")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Mask,
                cache: KVCache | None = None, layer: int = 0,
                lane: Lane | None = None) -> torch.Tensor:
        q = rearrange(_project(self.q_proj, x, lane, layer, "q"), "b w (h d) -> b h w d",
                      d=self.head_dim)
        k = rearrange(_project(self.k_proj, x, lane, layer, "k"), "b w (k d) -> b k w d",
                      d=self.head_dim)
        v = rearrange(_project(self.v_proj, x, lane, layer, "v"), "b w (k d) -> b k w d",
                      d=self.head_dim)
        if hasattr(self, "q_norm"):  # qwen3 normalises each head before rotating it
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # cos/sin: [b, 1, w, d]
        if cache is not None:
            k, v = cache.extend(layer, k, v)  # [b, k, past + w, d]
        attn_mask, is_causal = mask
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            enable_gqa=self.num_kv_heads != self.num_heads)
        return _project(self.o_proj, rearrange(out, "b h w d -> b w (h d)"), lane, layer, "o")


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, cfg: BaseConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, lane: Lane | None = None, layer: int = 0) -> torch.Tensor:
        if lane is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        h = (F.silu(_project(self.gate_proj, x, lane, layer, "gate"))
             * _project(self.up_proj, x, lane, layer, "up"))
        return _project(self.down_proj, h, lane, layer, "down")


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BaseConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Mask,
                cache: KVCache | None = None, layer: int = 0,
                lane: Lane | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, lane)
        return x + self.mlp(self.post_attention_layernorm(x), lane, layer)


class Decoder(nn.Module):
    """The transformer body; named ``model`` inside :class:`BaseLM` as in transformers."""

    def __init__(self, cfg: BaseConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class BaseLM(nn.Module):
    """A frozen Llama-family language model over input embeddings and float positions.

    Build one with :meth:`BaseLM.load` (``"smollm2-135m"``, a transformers directory or a
    GGUF file) or directly from a :class:`BaseConfig` with random weights (tests). All weights
    are frozen (``requires_grad=False``); gradients still flow to ``inputs_embeds``, which is
    how GistNet is trained through it.
    """

    def __init__(self, config: BaseConfig, tokenizer=None) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.freeze()

    def freeze(self) -> BaseLM:
        """Stop gradients to every weight and switch to eval mode (the base model never trains)."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    @classmethod
    def load(cls, name_or_path: str, *, dtype: torch.dtype = torch.float32,
             cache_dir: str | None = None) -> BaseLM:
        """Load a model by name (``"smollm2-135m"``), transformers directory or GGUF file.

        Args:
            name_or_path: an embedded name (``"smollm2-135m"``; ``"tiny-random"`` for a small
                random model made locally, for tests and smoke runs), a transformers directory
                (``config.json`` + ``model.safetensors`` or a sharded index), or a ``.gguf``
                file.
            dtype: parameter dtype (float32 by default; bfloat16 halves memory).
            cache_dir: where GGUF conversions are cached
                (see :func:`megacontext.base.loading.cache_root`).

        Raises:
            FileNotFoundError: the name is unknown and no such path exists.
            ValueError: the files describe an unsupported architecture or do not match the
                config.
        """
        config, tokenizer, state = read_model(name_or_path, cache_dir)
        model = cls(config, tokenizer=tokenizer)
        load_state(model, state)
        return model.to(dtype).freeze()

    @property
    def fingerprint(self) -> dict:
        """What a tree or a GistNet checkpoint records to recognise this model."""
        return self.config.fingerprint(getattr(self.tokenizer, "sha256", None))

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[b, n]`` (int) -> input embeddings ``[b, n, c]``."""
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor, got dtype {ids.dtype}")
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} is outside the vocabulary "
                                 f"[0, {self.config.vocab_size})")
        return self.model.embed_tokens(ids)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor,
                attenuation: torch.Tensor | None = None, *, rope: RopeConfig | None = None,
                num_logits: int | None = None, cache: KVCache | None = None,
                lane: Lane | None = None) -> torch.Tensor:
        """Logits for a causal pass over a working context.

        Args:
            inputs_embeds: ``[b, w, c]`` token embeddings and/or gists, in sequence order.
            positions: ``[b, w]`` or ``[w]`` RoPE positions, int64 or float64 (token index or
                span center). Anything else is cast to float64 first, which loses whole tokens
                for float32 positions above 2^24: pass int64/float64.
            attenuation: optional per-entry RoPE attenuation ``[b, w, d/2]`` or ``[w, d/2]``
                (1 for tokens; ``span_attenuation`` for gists).
            rope: RoPE override for this pass (e.g. an NTK-scaled one); default: the model's.
            num_logits: only compute logits for the last ``num_logits`` entries (saves the
                ``w × vocab`` head when only a continuation is scored).
            cache: a :class:`KVCache` holding the entries before these ones (their keys and
                values are reused, and these entries' are appended to it).
            lane: the gist lane bound to these entries' gist rows
                (``gistnet.lane.at(rows)``, :class:`megacontext.gistnet.GistLane`): the
                projections of gist rows get its low-rank updates, raw rows are computed by
                the frozen weights exactly. None = no lane (bit-identical to a pass without).

        Returns:
            ``[b, w, v]`` logits (``[b, num_logits, v]`` if given), float32.
        """
        hidden = self.hidden_states(inputs_embeds, positions, attenuation, rope=rope, cache=cache,
                                    lane=lane)
        if num_logits is not None:
            hidden = hidden[:, hidden.shape[1] - num_logits:]
        return self.lm_head(hidden).float()

    def hidden_states(self, inputs_embeds: torch.Tensor, positions: torch.Tensor,
                      attenuation: torch.Tensor | None = None, *,
                      rope: RopeConfig | None = None,
                      cache: KVCache | None = None, layers: int | None = None,
                      lane: Lane | None = None) -> torch.Tensor:
        """Final-norm hidden states ``[b, w, c]``; arguments as in :meth:`forward`.

        With ``layers = K`` the pass stops after the first K layers and returns their output
        without the final norm (transformers' ``hidden_states[K]``; contextual GistNet inputs).
        """
        total = self.config.num_hidden_layers
        if layers is not None and not (isinstance(layers, int) and 1 <= layers <= total):
            raise ValueError(f"layers={layers!r} is outside 1..{total}")
        if layers is not None and cache is not None and layers < total:
            raise ValueError("a partial pass (layers < all) cannot fill a KV cache")
        rope = rope or self.config.rope
        if cache is not None:
            if rope.scaling in ("dynamic", "auto"):
                raise ValueError(f"scaling {rope.scaling!r} depends on the context's length, so "
                                 f"cached keys would disagree with new ones; resolve a static "
                                 f"scaling once per refocus (megacontext.rope.resolve)")
            if len(cache) and cache.rope != rope:
                raise ValueError(f"the KV cache holds keys rotated with {cache.rope}, this pass "
                                 f"uses {rope}; truncate the cache to 0 first")
        positions, cos, sin = self._rotary(inputs_embeds, positions, attenuation, rope)
        past = 0
        if cache is not None:
            past = cache.begin(positions, inputs_embeds.shape[0])
            cache.rope = rope
        masks = {window: self._mask(positions, past, window, cache)
                 for window in {self.config.layer_window(i)
                                for i in range(self.config.num_hidden_layers)}}
        x = inputs_embeds.to(self.dtype)
        for i, layer in enumerate(self.model.layers[:layers]):
            x = layer(x, cos, sin, masks[self.config.layer_window(i)], cache, i, lane)
        if cache is not None:
            cache.end()
        return x if layers is not None and layers < total else self.model.norm(x)

    @staticmethod
    def _mask(positions: torch.Tensor, past: int, window: int | None,
              cache: KVCache | None) -> Mask:
        """The attention mask of ``w`` new entries after ``past`` cached ones.

        Causal over entries in sequence order (new entry i sees every cached entry and new
        entries up to itself); with a sliding ``window``, also only entries whose position is
        less than ``window`` below its own — transformers' ``kv_idx > q_idx − window`` with
        positions for indices, which is the same thing for tokens at consecutive positions.
        """
        w = positions.shape[-1]
        device = positions.device
        band = None
        if window is not None and w:
            q = positions.to(torch.float64)  # [w] or [b, w]
            k = cache.pending_positions() if cache is not None else q  # [b, past + w] or q
            if float(q.max() - k.min()) >= window:  # some visible pair is out of the window
                band = (q[..., :, None] - k[..., None, :]) < window  # [(b,) w, past + w]
        if band is None:
            if past == 0:
                return None, True
            if w == 1:
                return None, False
        causal = torch.ones(w, past + w, dtype=torch.bool, device=device).tril(diagonal=past)
        if band is None:
            return causal, False
        allowed = causal & band
        return (allowed[:, None] if allowed.ndim == 3 else allowed), False  # [b, 1, w, p + w]

    def _rotary(self, inputs_embeds, positions, attenuation, rope):
        """``(positions on the device, int64 or float64; cos; sin)``, cos/sin ``[b, 1, w, d]``."""
        cfg = self.config
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
            raise ValueError(f"inputs_embeds must be [batch, entries, {cfg.hidden_size}], got "
                             f"shape {tuple(inputs_embeds.shape)}")
        b, w, _ = inputs_embeds.shape
        if positions.shape not in ((w,), (b, w)):
            raise ValueError(f"positions must have shape ({w},) or ({b}, {w}) to match "
                             f"inputs_embeds {tuple(inputs_embeds.shape)}, got "
                             f"{tuple(positions.shape)}")
        if attenuation is not None and attenuation.shape not in (
                (w, cfg.head_dim // 2), (b, w, cfg.head_dim // 2)):
            raise ValueError(f"attenuation must have shape ({w}, {cfg.head_dim // 2}) or "
                             f"({b}, {w}, {cfg.head_dim // 2}), got {tuple(attenuation.shape)}")
        if positions.dtype not in (torch.int64, torch.float64):
            positions = positions.to(torch.float64)
        # Positional extent of the context: what dynamic NTK scaling keys on.
        extent = int(positions.max() - positions.min()) + 1 if w else 0
        positions = positions.to(self.device)
        cos, sin = rotary_tables(positions, rope, attenuation=attenuation, span=extent)
        if cos.ndim == 2:  # [w, d] -> [1, w, d]
            cos, sin = cos[None], sin[None]
        # One table for every head: [b, 1, w, d] broadcasts against q/k's [b, h, w, d].
        return positions, cos[:, None].to(self.dtype), sin[:, None].to(self.dtype)


def load_base_lm(name_or_path, *, dtype: torch.dtype = torch.float32,
                 cache_dir=None) -> BaseLM:
    """Load a frozen :class:`BaseLM`; the same as :meth:`BaseLM.load`."""
    return BaseLM.load(name_or_path, dtype=dtype, cache_dir=cache_dir)


def load_state(model: BaseLM, state: dict[str, torch.Tensor]) -> None:
    """Copy a transformers-named state dict into ``model``, checking names and shapes."""
    if model.config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    own = model.state_dict()
    if model.config.tie_word_embeddings:
        own.pop("lm_head.weight")
    # Some checkpoints carry buffers transformers recomputes (rotary inv_freq); ignore those.
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own.keys() & state.keys() if state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"weights do not match the {model.config.family} config: "
                         f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}, "
                         f"wrong shapes {wrong[:5]}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
