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

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from megacontext.base.config import BaseConfig
from megacontext.rope import RopeConfig, apply_rotary, rotary_tables


class KVCache:
    """Rotated keys and values of a prefix of working-context entries, one pair per layer.

    Entries are appended by passing the cache to :meth:`BaseLM.forward`; :meth:`truncate`
    drops everything from the first entry that changed (a refocus), so the unchanged prefix is
    never recomputed. Keys are stored rotated, so the cache is tied to one RoPE configuration:
    a pass with another one is refused until the cache is emptied.
    """

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []    # per layer [b, k, p, d]
        self.values: list[torch.Tensor] = []  # per layer [b, k, p, d]
        self.rope: RopeConfig | None = None

    def __len__(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` entries."""
        if not 0 <= length <= len(self):
            raise ValueError(f"cannot truncate a cache of {len(self)} entries to {length}")
        if length == 0:
            self.keys, self.values, self.rope = [], [], None
            return
        self.keys = [k[:, :, :length] for k in self.keys]
        self.values = [v[:, :, :length] for v in self.values]

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append this pass's keys/values for ``layer``; return all keys/values so far."""
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        q = rearrange(self.q_proj(x), "b w (h d) -> b h w d", d=self.head_dim)
        k = rearrange(self.k_proj(x), "b w (k d) -> b k w d", d=self.head_dim)
        v = rearrange(self.v_proj(x), "b w (k d) -> b k w d", d=self.head_dim)
        if hasattr(self, "q_norm"):  # qwen3 normalises each head before rotating it
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # cos/sin: [b, 1, w, d]
        past = cache.keys[layer].shape[2] if cache is not None and len(cache.keys) > layer else 0
        if cache is not None:
            k, v = cache.extend(layer, k, v)  # [b, k, past + w, d]
        w = q.shape[2]
        # Causal over entries; with a cached prefix, new entry i also sees all `past` entries.
        mask = None if past == 0 or w == 1 else torch.ones(
            w, past + w, dtype=torch.bool, device=q.device).tril(diagonal=past)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=past == 0,
            enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(rearrange(out, "b h w d -> b w (h d)"))


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, cfg: BaseConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BaseConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


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

        See :func:`megacontext.base.loading.load_base_lm`.
        """
        from megacontext.base.loading import load_base_lm

        return load_base_lm(name_or_path, dtype=dtype, cache_dir=cache_dir)

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
                num_logits: int | None = None, cache: KVCache | None = None) -> torch.Tensor:
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

        Returns:
            ``[b, w, v]`` logits (``[b, num_logits, v]`` if given), float32.
        """
        hidden = self.hidden_states(inputs_embeds, positions, attenuation, rope=rope, cache=cache)
        if num_logits is not None:
            hidden = hidden[:, hidden.shape[1] - num_logits:]
        return self.lm_head(hidden).float()

    def hidden_states(self, inputs_embeds: torch.Tensor, positions: torch.Tensor,
                      attenuation: torch.Tensor | None = None, *,
                      rope: RopeConfig | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """Final-norm hidden states ``[b, w, c]``; arguments as in :meth:`forward`."""
        rope = rope or self.config.rope
        if cache is not None:
            if rope.scaling in ("dynamic", "auto"):
                raise ValueError(f"scaling {rope.scaling!r} depends on the context's length, so "
                                 f"cached keys would disagree with new ones; resolve a static "
                                 f"scaling once per refocus (megacontext.rope.resolve)")
            if len(cache) and cache.rope != rope:
                raise ValueError(f"the KV cache holds keys rotated with {cache.rope}, this pass "
                                 f"uses {rope}; truncate the cache to 0 first")
            cache.rope = rope
        cos, sin = self._rotary(inputs_embeds, positions, attenuation, rope)
        x = inputs_embeds.to(self.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, cache, i)
        return self.model.norm(x)

    def _rotary(self, inputs_embeds, positions, attenuation, rope):
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
        cos, sin = rotary_tables(positions.to(self.device), rope, attenuation=attenuation,
                                 span=extent)
        if cos.ndim == 2:  # [w, d] -> [1, w, d]
            cos, sin = cos[None], sin[None]
        # One table for every head: [b, 1, w, d] broadcasts against q/k's [b, h, w, d].
        return (cos[:, None].to(self.dtype), sin[:, None].to(self.dtype))
