"""LensNet: the learned focus scorer — how much would seeing this node in detail help?

The allocator asks a scorer, for nodes of the memory tree, how useful it is to see them
expanded (docs/allocator.md). LensNet answers from what the allocator already holds: the
node's stored gist, its level, its distance to the cursor, and the query — the token
embeddings of what the reader is looking at (a question, or the recent raw tokens). It is
trained to predict the *full-detail value* of a node, the NLL saved on what follows when the
node is replaced by its raw tokens, measured by the frozen base model itself
(:mod:`megacontext.lens.data`); docs/focus.md has the recipe and the measurements.

Axes: ``b`` examples, ``n`` candidate nodes, ``q`` query tokens, ``c`` hidden size of the
base model, ``d`` LensNet width, ``f`` node features.

Shape of the net: gists and query tokens are standardised per vector (middle-of-the-road
scales differ by orders of magnitude between gists and token embeddings) and projected to
``d``; a node's vector gets its level's embedding and its features added; ``layers``
cross-attention blocks let each node read the query (plus a learned "no query" slot, so a
query-less refocus still works); one linear head gives the score. Nodes are scored
independently given the query, so a refocus scores exactly the nodes it would score with any
other scorer: the allocator's work bound holds unchanged.

Exported like GistNet: ``lens.safetensors`` + ``lens.json`` (config, base-model fingerprint,
the digest of the GistNet whose gists it read in training, a digest of its own weights); a
mismatch on load or use is a clear error. The allocator's scorer ``lens`` that runs it is
:class:`~megacontext.lens.scorer.LensScorer`; :func:`ranking_loss` is what training fits.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from megacontext.exports import export_fingerprint, load_weights, read_export, state_digest
from megacontext.spans import SPAN, centers, node_size

FORMAT_VERSION = 1
WEIGHTS_FILE = "lens.safetensors"
META_FILE = "lens.json"
NUM_FEATURES = 4
LOG_DISTANCE_SCALE = 40.0  # log2 distances up to 2^40 tokens map into [0, 1]


def node_features(level: int, indices: np.ndarray, cursor: int, gists: np.ndarray,
                  span: int = SPAN) -> np.ndarray:
    """``[n, f]`` float32 features of level-``level`` nodes ``indices`` seen from ``cursor``.

    ``log2(1 + distance from the node's center to the cursor) / 40``, the node's depth in the
    memory (distance / cursor, 0 = at the cursor, 1 = the oldest token), ``log2(size) / 40``,
    and the log of the gist's RMS (gists carry information in their norm).
    """
    indices = np.asarray(indices, dtype=np.int64)
    dist = np.maximum(float(cursor) - centers(level, indices, span), 0.0)  # [n]
    rms = np.sqrt(np.mean(np.square(gists.astype(np.float64)), axis=1)) + 1e-12  # [n]
    size = np.full(indices.shape, math.log2(node_size(level, span)) / LOG_DISTANCE_SCALE)
    return np.stack([np.log2(1.0 + dist) / LOG_DISTANCE_SCALE, dist / max(cursor, 1), size,
                     np.log(rms) / 4.0], axis=1).astype(np.float32)


@dataclass(frozen=True)
class LensConfig:
    """LensNet's shape.

    Attributes:
        hidden_size: c, the base model's width (of its gists and token embeddings).
        width: d, LensNet's width.
        heads: attention heads (``width % heads == 0``).
        layers: cross-attention blocks (each: the node attends to the query, then an MLP).
        max_level: the highest gist level it can score.
        span: the tree's span (children per node).
    """

    hidden_size: int
    width: int = 128
    heads: int = 4
    layers: int = 2
    max_level: int = 8
    span: int = SPAN

    def __post_init__(self) -> None:
        bad = [f"{k}={getattr(self, k)!r}" for k in ("hidden_size", "width", "heads", "layers",
                                                     "max_level", "span")
               if not isinstance(getattr(self, k), int) or getattr(self, k) < 1]
        if not bad and self.width % self.heads:
            bad.append(f"width={self.width} (not divisible by heads={self.heads})")
        if bad:
            raise ValueError("invalid LensConfig: " + "; ".join(bad) + " (expected positive "
                             "ints)")


class _CrossBlock(nn.Module):
    """Nodes attend to the query tokens, then an MLP; pre-norm residual."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, h: torch.Tensor, kv: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(kv)
        a, _ = self.attn(self.norm_q(h), kv, kv, key_padding_mask=pad, need_weights=False)
        h = h + a
        return h + self.mlp(self.norm_mlp(h))


def _standardize(x: torch.Tensor) -> torch.Tensor:
    """Per vector: zero mean, unit RMS (scale-free; the RMS itself is a node feature)."""
    x = x - x.mean(-1, keepdim=True)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-12)


class LensNet(nn.Module):
    """Scores memory nodes: the NLL a reader would save by seeing each one in detail."""

    def __init__(self, cfg: LensConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, d = cfg.hidden_size, cfg.width
        self.node_in = nn.Linear(c, d)
        self.query_in = nn.Linear(c, d)
        self.level = nn.Embedding(cfg.max_level + 1, d)
        self.features = nn.Linear(NUM_FEATURES, d)
        self.no_query = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.blocks = nn.ModuleList(_CrossBlock(d, cfg.heads) for _ in range(cfg.layers))
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 1))
        # Bookkeeping (not weights): the GistNet whose gists it learned on, and how.
        self.gistnet_digest: str | None = None
        self.training_info: dict = {}

    def forward(self, gists: torch.Tensor, levels: torch.Tensor, features: torch.Tensor,
                query: torch.Tensor | None = None,
                query_pad: torch.Tensor | None = None) -> torch.Tensor:
        """Scores ``[b, n]`` (higher: expanding helps more).

        Args:
            gists: ``[b, n, c]`` the nodes' stored gists.
            levels: ``[b, n]`` int64 levels (1 … max_level).
            features: ``[b, n, f]`` from :func:`node_features`.
            query: ``[b, q, c]`` token embeddings, or None (no query).
            query_pad: ``[b, q]`` bool, True where ``query`` is padding.
        """
        if gists.ndim != 3 or gists.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"gists must be [b, n, {self.cfg.hidden_size}], got "
                             f"{tuple(gists.shape)}")
        if int(levels.min()) < 1 or int(levels.max()) > self.cfg.max_level:
            raise ValueError(f"levels must lie in [1, {self.cfg.max_level}], got "
                             f"[{int(levels.min())}, {int(levels.max())}]")
        p = self.node_in.weight
        h = (self.node_in(_standardize(gists.to(p.dtype))) + self.level(levels)
             + self.features(features.to(p.dtype)))  # [b, n, d]
        b = h.shape[0]
        slot = self.no_query.expand(b, 1, -1)  # [b, 1, d]
        pad_slot = torch.zeros(b, 1, dtype=torch.bool, device=h.device)
        if query is None:
            kv, pad = slot, pad_slot
        else:
            if query.ndim != 3 or query.shape[-1] != self.cfg.hidden_size or query.shape[0] != b:
                raise ValueError(f"query must be [{b}, q, {self.cfg.hidden_size}], got "
                                 f"{tuple(query.shape)}")
            kv = torch.cat([slot, self.query_in(_standardize(query.to(p.dtype)))], 1)
            qpad = (torch.zeros(query.shape[:2], dtype=torch.bool, device=h.device)
                    if query_pad is None else query_pad.to(torch.bool))
            pad = torch.cat([pad_slot, qpad], 1)  # [b, 1 + q]
        for block in self.blocks:
            h = block(h, kv, pad)
        return self.head(h)[..., 0]


def flops_per_node(cfg: LensConfig, query_tokens: int) -> int:
    """Multiply-adds × 2 that scoring one node costs (the query's own projection, paid once
    per scorer call, is not included): input projections, then per block the attention
    query and output projections, attention over ``1 + query_tokens`` keys and the MLP."""
    c, d, q = cfg.hidden_size, cfg.width, query_tokens + 1
    block = 2 * (2 * d * d + 2 * q * d + 8 * d * d)
    return 2 * (c * d + NUM_FEATURES * d) + cfg.layers * block + 2 * d


def lens_digest(model: LensNet) -> str:
    """sha256 hex of the config and every tensor (sorted by name, with dtype and shape)."""
    return state_digest(dataclasses.asdict(model.cfg), model.state_dict())


def save_lens(model: LensNet, directory: str | Path, base_fingerprint: dict) -> Path:
    """Write ``lens.safetensors`` and ``lens.json`` into ``directory`` (created if needed).

    ``base_fingerprint``: JSON scalars describing the base model (as for ``save_gistnet``);
    the GistNet digest and the training info come from the model's bookkeeping.
    """
    fp = export_fingerprint(base_fingerprint, model.cfg.hidden_size, "LensNet")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(directory / WEIGHTS_FILE))
    meta = {"format": "megacontext-lens", "format_version": FORMAT_VERSION,
            "config": dataclasses.asdict(model.cfg), "base_fingerprint": fp,
            "gistnet_digest": model.gistnet_digest, "digest": lens_digest(model),
            "training": model.training_info}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return directory


def load_lens(directory: str | Path, expect_fingerprint: dict | None = None,
              expect_gistnet_digest: str | None = None) -> LensNet:
    """Load a LensNet written by :func:`save_lens` (safetensors only, never pickle).

    Raises:
        FileNotFoundError: a path is missing (named).
        ValueError: a base-model fingerprint field or the GistNet digest differs from the
            expected one (both values named), bad metadata, tensors that do not fit the
            config, or weights that do not match the recorded digest.
    """
    directory = Path(directory)
    meta = read_export(directory, META_FILE, WEIGHTS_FILE, "lens", FORMAT_VERSION,
                       expect_fingerprint)
    if expect_gistnet_digest is not None and meta.get("gistnet_digest") != expect_gistnet_digest:
        raise ValueError(f"lens at {directory} was trained on the gists of GistNet "
                         f"{meta.get('gistnet_digest')!r}, not {expect_gistnet_digest!r}: "
                         "retrain the lens for this GistNet")
    fields = {f.name for f in dataclasses.fields(LensConfig)}
    if not isinstance(meta.get("config"), dict) or set(meta["config"]) - fields:
        raise ValueError(f"{directory / META_FILE}: bad config {meta.get('config')!r}")
    model = LensNet(LensConfig(**meta["config"]))
    load_weights(model, directory / WEIGHTS_FILE)
    if lens_digest(model) != meta.get("digest"):
        raise ValueError(f"{directory}: weights do not match the recorded digest")
    model.gistnet_digest = meta.get("gistnet_digest")
    model.training_info = meta.get("training") or {}
    return model.eval()


def ranking_loss(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                 temperature: float = 0.1, sign_weight: float = 0.2) -> torch.Tensor:
    """Listwise softmax cross-entropy to ``softmax(labels / temperature)`` per example, plus a
    logistic loss on the sign of each label (positive: expanding helps) weighted ``sign_weight``.

    Args:
        scores, labels: ``[b, n]``; labels in nats per token (the NLL seeing the node saves).
        mask: ``[b, n]`` bool, True for real candidates.
    """
    neg = torch.finfo(scores.dtype).min
    target = torch.softmax(labels.masked_fill(~mask, neg) / temperature, dim=-1)
    logp = torch.log_softmax(scores.masked_fill(~mask, neg), dim=-1)
    listwise = -(target * logp.masked_fill(~mask, 0.0)).sum(-1).mean()
    sign = F.binary_cross_entropy_with_logits(scores[mask], (labels[mask] > 0).to(scores.dtype))
    return listwise + sign_weight * sign


__all__ = ["LensConfig", "LensNet", "flops_per_node", "load_lens", "node_features", "ranking_loss",
           "save_lens"]
