"""The base model's architecture description, read from a transformers ``config.json`` or GGUF.

Field names follow transformers' configs (``hidden_size``, ``num_attention_heads``,
``rope_theta`` …) so a ``config.json`` maps onto :class:`BaseConfig` field for field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from megacontext.rope import RopeConfig

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class BaseConfig:
    """Architecture of a Llama-family decoder.

    Args:
        family: one of ``llama``, ``mistral``, ``qwen2`` (q/k/v bias), ``qwen3`` (q/k RMSNorm).
        hidden_size: model width ``c``.
        intermediate_size: SwiGLU inner width.
        num_hidden_layers: decoder layers.
        num_attention_heads: query heads ``h``.
        num_key_value_heads: key/value heads (grouped-query attention).
        head_dim: per-head width ``d``; defaults to ``hidden_size // num_attention_heads``.
        vocab_size: rows of the embedding matrix.
        max_position_embeddings: the trained context length.
        rope_theta: RoPE base.
        rope_scaling: transformers-style scaling dict (``rope_type``, ``factor`` …) or None.
        rms_norm_eps: RMSNorm epsilon.
        tie_word_embeddings: whether the output head shares the embedding matrix.
        attention_bias: q/k/v projections carry a bias (qwen2).
        sliding_window: attention window in positions (Mistral; Qwen2/3 with
            ``use_sliding_window``): an entry sees an earlier one only when their positions
            are less than ``sliding_window`` apart, as transformers' sliding-window mask does
            with token indices. None: full causal attention.
        layer_types: per layer ``"sliding_attention"`` or ``"full_attention"`` (transformers'
            name), when only some layers use the window; None: every layer does (if a window is
            set).
        name: a human-readable name recorded in fingerprints.
    """

    family: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    head_dim: int | None = None
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False, compare=True)
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = field(default=None, hash=False, compare=True)
    name: str = "unnamed"

    def __post_init__(self) -> None:
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family={self.family!r} is not one of {FAMILIES}")
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size", "max_position_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                problems.append(f"{key}={value!r} must be a positive integer")
        if not problems:
            if self.head_dim is None:
                if self.hidden_size % self.num_attention_heads:
                    problems.append(f"hidden_size={self.hidden_size} is not divisible by "
                                    f"num_attention_heads={self.num_attention_heads}; "
                                    f"give head_dim")
                else:
                    head_dim = self.hidden_size // self.num_attention_heads
                    object.__setattr__(self, "head_dim", head_dim)
            if self.num_attention_heads % self.num_key_value_heads:
                problems.append(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                                f"of num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim is not None and (self.head_dim <= 0 or self.head_dim % 2):
            problems.append(f"head_dim={self.head_dim} must be a positive even integer")
        if not self.rope_theta > 0:
            problems.append(f"rope_theta={self.rope_theta!r} must be > 0")
        window = self.sliding_window
        if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                                   or window < 1):
            problems.append(f"sliding_window={window!r} must be a positive integer or None")
        if self.layer_types is not None:
            types = tuple(self.layer_types)
            object.__setattr__(self, "layer_types", types)  # a list from JSON hashes badly
            bad = sorted({t for t in types if t not in LAYER_TYPES})
            if bad:
                problems.append(f"layer_types has {bad}; expected each of {LAYER_TYPES}")
            if len(types) != self.num_hidden_layers:
                problems.append(f"layer_types has {len(types)} entries for "
                                f"num_hidden_layers={self.num_hidden_layers}")
            if window is None and "sliding_attention" in types:
                problems.append("layer_types names sliding_attention layers but "
                                "sliding_window is None")
        if problems:
            raise ValueError("invalid base model config: " + "; ".join(problems))
        self.rope  # noqa: B018 — build the RoPE config now so bad scaling fails here

    @property
    def qk_norm(self) -> bool:
        """Whether q and k pass through a per-head RMSNorm before RoPE (qwen3)."""
        return self.family == "qwen3"

    def layer_window(self, layer: int) -> int | None:
        """The attention window of decoder layer ``layer`` (None: full causal attention)."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight's transformers name and shape, in :class:`BaseLM`'s parameter order
        (``lm_head.weight`` left out when tied): what a checkpoint of this config holds."""
        c, d, inner = self.hidden_size, self.head_dim, self.intermediate_size
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, c)}
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (c,)
            for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                shapes[f"{p}self_attn.{name}.weight"] = (rows, c)
                if self.attention_bias:
                    shapes[f"{p}self_attn.{name}.bias"] = (rows,)
            shapes[p + "self_attn.o_proj.weight"] = (c, q)
            if self.attention_bias and self.family != "qwen2":
                shapes[p + "self_attn.o_proj.bias"] = (c,)
            if self.qk_norm:
                shapes[p + "self_attn.q_norm.weight"] = (d,)
                shapes[p + "self_attn.k_norm.weight"] = (d,)
            shapes[p + "post_attention_layernorm.weight"] = (c,)
            shapes[p + "mlp.gate_proj.weight"] = (inner, c)
            shapes[p + "mlp.up_proj.weight"] = (inner, c)
            shapes[p + "mlp.down_proj.weight"] = (c, inner)
        shapes["model.norm.weight"] = (c,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, c)
        return shapes

    @property
    def max_position(self) -> int:
        """The trained context length (docs/design.md public name)."""
        return self.max_position_embeddings

    @property
    def rope(self) -> RopeConfig:
        """The model's own RoPE, as a :class:`megacontext.rope.RopeConfig`."""
        params = dict(self.rope_scaling or {})
        params.setdefault("rope_type", params.pop("type", "default"))
        if params["rope_type"] in ("yarn", "llama3"):
            params.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        params["rope_theta"] = float(self.rope_theta)
        return RopeConfig.from_transformers(params, self.head_dim, self.max_position_embeddings)

    # -- conversions -------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str | None = None) -> BaseConfig:
        """Build from a transformers ``config.json`` dict (llama, mistral, qwen2, qwen3)."""
        family = hf.get("model_type")
        if family not in FAMILIES:
            raise ValueError(f"model_type {family!r} is not supported; supported: {FAMILIES}")
        # transformers >= 5 nests rope settings under rope_parameters.
        rope_params = dict(hf.get("rope_parameters") or {})
        theta = rope_params.pop("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or (rope_params if rope_params.get(
            "rope_type", "default") != "default" else None)
        if hf.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported (no Llama-family checkpoint we "
                             "target uses it)")
        heads = hf["num_attention_heads"]
        window, layer_types = _sliding_window(hf, family)
        return cls(
            family=family,
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            vocab_size=hf["vocab_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", family == "qwen2")),
            sliding_window=window,
            layer_types=layer_types,
            name=name or hf.get("_name_or_path") or family,
        )

    def to_hf(self) -> dict[str, Any]:
        """A transformers-style ``config.json`` dict (what the local cache stores)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("family", "name")}
        out["model_type"] = self.family
        out["_name_or_path"] = self.name
        out["hidden_act"] = "silu"
        # Absent rather than null, so that models without them keep their digest.
        for key in ("rope_scaling", "sliding_window", "layer_types"):
            if out[key] is None:
                out.pop(key)
        if self.layer_types is not None:
            out["layer_types"] = list(self.layer_types)
        if self.sliding_window is not None and self.family in ("qwen2", "qwen3"):
            out["use_sliding_window"] = True
        return out

    def fingerprint(self, tokenizer_sha256: str | None = None) -> dict[str, Any]:
        """What a tree or a GistNet export records to recognise this model and tokenizer."""
        return {"name": self.name, "family": self.family, "hidden_size": self.hidden_size,
                "vocab_size": self.vocab_size, "config_sha256": self.digest(),
                "tokenizer_sha256": tokenizer_sha256}

    def digest(self) -> str:
        """sha256 of the architecture (used in fingerprints)."""
        blob = json.dumps(self.to_hf(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def _sliding_window(hf: dict[str, Any], family: str) -> tuple[int | None, tuple | None]:
    """``(sliding_window, layer_types)`` of a transformers config, normalised: no window when
    no layer uses one, and ``layer_types`` None when every layer does."""
    if family == "mistral":
        window = hf.get("sliding_window")
    elif family in ("qwen2", "qwen3"):
        # transformers ignores Qwen's sliding_window unless use_sliding_window is set.
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    else:
        window = None  # transformers' Llama has no sliding window
    if window is None:
        return None, None
    types = hf.get("layer_types")
    if types is None and family in ("qwen2", "qwen3"):
        first = hf.get("max_window_layers", 28)  # transformers' default
        types = ["sliding_attention" if i >= first else "full_attention"
                 for i in range(hf["num_hidden_layers"])]
    if types is not None:
        if all(t == "full_attention" for t in types):
            return None, None
        if all(t == "sliding_attention" for t in types):
            types = None
    return window, None if types is None else tuple(types)
