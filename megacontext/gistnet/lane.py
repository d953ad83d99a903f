"""The gist lane: low-rank adapters of the base model's projections that fire only at gist rows.

The base model's weights never change and raw tokens are always computed by them. At the rows of
a working context that hold gists, each adapted projection ``W`` of each adapted layer computes
``W·x + s·B(A(x))`` instead (``A`` ``[r, in]``, ``B`` ``[out, r]``, ``s = alpha / r``; ``B`` starts
at zero, so an untrained lane is exactly no lane). Raw rows read the gist rows' adapted keys and
values through attention, and that is the only way the lane reaches them. This is the
conditional LoRA of Compressed Context Memory (Kim et al., 2024) and the per-row projections of
Activation Beacon (Zhang et al., 2024), see docs/design.md, "The gist lane".

The lane is part of the compressor: :class:`~megacontext.gistnet.GistNet` holds it as
``gistnet.lane`` (``None`` = no lane), its export saves it and its digest covers it. It is used
when the base model *reads* gists (``BaseLM.forward(..., lane=gistnet.lane.at(rows))``), never
when GistNet makes them, so ingest costs what it did.

Axis legend: ``b`` batch, ``w`` working-context entries, ``i``/``o`` a projection's input and
output width, ``r`` the rank.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

ATTENTION = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")
TARGETS = ATTENTION + MLP
LAYER_SETS = ("all", "first_half", "last_half")
LANE_SETTINGS = ("rank", "alpha", "targets", "layers", "dropout")  # the rest: the base's shape


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class LaneConfig:
    """Shape of a gist lane.

    Args:
        rank: ``r`` of every adapter.
        alpha: scale numerator: the update is ``alpha / rank · B(A(x))``.
        targets: the adapted projections, of ``q k v o`` (attention) and ``gate up down``
            (MLP).
        layers: the adapted decoder layers: ``all``, ``first_half``, ``last_half`` or a list of
            layer indices.
        dropout: dropout on the adapters' input while training.
        num_layers, hidden_size, q_size, kv_size, intermediate_size: the base model's shape
            (``LaneConfig.for_base`` fills them from a base config).
    """

    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: list(ATTENTION))
    layers: str | list[int] = "all"
    dropout: float = 0.0
    num_layers: int = 0
    hidden_size: int = 0
    q_size: int = 0
    kv_size: int = 0
    intermediate_size: int = 0

    def __post_init__(self) -> None:
        self.targets = list(self.targets)
        if not isinstance(self.layers, str):
            self.layers = [int(i) if _is_int(i) else i for i in self.layers]
        problems = []
        for name in ("rank", "num_layers", "hidden_size", "q_size", "kv_size",
                     "intermediate_size"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                problems.append(f"{name}={v!r} (expected an int >= 1)")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not 0 < self.alpha < 1e6:
            problems.append(f"alpha={self.alpha!r} (expected a number in (0, 1e6))")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0 <= self.dropout < 1:
            problems.append(f"dropout={self.dropout!r} (expected a number in [0, 1))")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            problems.append(f"targets={self.targets!r} (expected distinct names of "
                            f"{', '.join(TARGETS)})")
        if isinstance(self.layers, str):
            if self.layers not in LAYER_SETS:
                problems.append(f"layers={self.layers!r} (expected one of "
                                f"{', '.join(LAYER_SETS)} or a list of layer indices)")
        elif (not self.layers or len(set(self.layers)) != len(self.layers)
              or not all(_is_int(i) and 0 <= i < max(1, self.num_layers) for i in self.layers)):
            problems.append(f"layers={self.layers!r} (expected distinct layer indices in "
                            f"0..{self.num_layers - 1})")
        if problems:
            raise ValueError("invalid LaneConfig: " + "; ".join(problems))

    @classmethod
    def for_base(cls, base_config, **settings) -> LaneConfig:
        """A lane for a :class:`megacontext.base.BaseConfig` (or anything with its fields)."""
        c = base_config
        return cls(**settings, num_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
                   q_size=c.num_attention_heads * c.head_dim,
                   kv_size=c.num_key_value_heads * c.head_dim,
                   intermediate_size=c.intermediate_size)

    def layer_indices(self) -> list[int]:
        n = self.num_layers
        if self.layers == "all":
            return list(range(n))
        if self.layers == "first_half":
            return list(range(n // 2))
        if self.layers == "last_half":
            return list(range(n // 2, n))
        return sorted(self.layers)

    def widths(self, target: str) -> tuple[int, int]:
        """``(in, out)`` of a target projection."""
        c, q, kv, m = self.hidden_size, self.q_size, self.kv_size, self.intermediate_size
        return {"q": (c, q), "k": (c, kv), "v": (c, kv), "o": (q, c),
                "gate": (c, m), "up": (c, m), "down": (m, c)}[target]

    def matches(self, base_config) -> list[str]:
        """What differs from a base config's shape, one ``name: lane vs model`` each."""
        other = LaneConfig.for_base(base_config, targets=self.targets)
        return [f"{k}: lane {getattr(self, k)} vs model {getattr(other, k)}"
                for k in ("num_layers", "hidden_size", "q_size", "kv_size", "intermediate_size")
                if getattr(self, k) != getattr(other, k)]


class GistLane(nn.Module):
    """The adapters, one ``(A, B)`` pair per adapted (layer, projection), named ``{layer}_{proj}``.

    ``A`` is initialised like a Linear layer's weight (Kaiming uniform), ``B`` at zero.
    """

    def __init__(self, cfg: LaneConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.scale = float(cfg.alpha) / cfg.rank
        self.layer_set = frozenset(cfg.layer_indices())
        self.down = nn.ParameterDict()  # A [r, i]
        self.up = nn.ParameterDict()  # B [o, r]
        for layer in sorted(self.layer_set):
            for target in cfg.targets:
                i, o = cfg.widths(target)
                a = torch.empty(cfg.rank, i)
                nn.init.kaiming_uniform_(a, a=5 ** 0.5)
                self.down[f"{layer}_{target}"] = nn.Parameter(a)
                self.up[f"{layer}_{target}"] = nn.Parameter(torch.zeros(o, cfg.rank))
        self.dropout = nn.Dropout(cfg.dropout)

    def config_dict(self) -> dict:
        return asdict(self.cfg)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def at(self, rows: torch.Tensor | None) -> LaneRows | None:
        """The lane bound to the gist rows of one pass: ``rows`` bool ``[b, w]`` or ``[w]``.

        None (no gist row, or no rows given) means the base model runs exactly as without a
        lane.
        """
        if rows is None:
            return None
        if rows.dtype != torch.bool:
            raise TypeError(f"gist rows must be a bool tensor, got dtype {rows.dtype}")
        if not bool(rows.any()):
            return None
        return LaneRows(self, rows)


class LaneRows:
    """A lane and the rows it fires at, as ``BaseLM.forward(lane=...)`` takes it.

    ``adapt(layer, target, x, y)`` returns ``y`` (the frozen projection of ``x``) where a row is
    raw and ``y + s·B(A(x))`` where it holds a gist, in one fused ``addmm``: the rank-``r``
    activations ``A(x)`` are multiplied by a per-row factor (``s`` at gist rows, ``0`` at raw
    rows) before ``B``, so a raw row adds an exact zero and keeps the frozen value of ``y``
    (``torch.equal``; only a ``-0.0`` can turn ``+0.0``). Without autograd ``y`` is consumed:
    the update is written into its storage (``BaseLM`` passes each projection's fresh output;
    a caller that keeps ``y`` passes a copy). Selecting with ``torch.where`` gave the same
    values with three more full passes over every adapted projection's output: over a
    1,024-entry context 1.39x the lane-free pass under load against 1.25x fused (both ~1.0x on
    an idle machine; ``python -m megacontext.bench.lane``, docs/training.md, "The read,
    fused").
    """

    def __init__(self, lane: GistLane, rows: torch.Tensor) -> None:
        self.lane, self.rows = lane, rows
        self._factor: dict[tuple, torch.Tensor] = {}

    def factor(self, y: torch.Tensor) -> torch.Tensor:
        """``[b·w, 1]``: ``s`` at gist rows, ``0`` at raw rows, for a projection output ``y``
        ``[b, w, o]`` (cached per batch size, device and dtype)."""
        b, w = y.shape[0], y.shape[-2]
        key = (b, y.device, y.dtype)
        if key not in self._factor:
            rows = self.rows
            if rows.shape[-1] != w:
                raise ValueError(f"the lane's gist rows cover {rows.shape[-1]} entries, this "
                                 f"pass has {w}")
            rows = rows.to(y.device).expand(b, w)
            self._factor[key] = (rows.reshape(-1, 1).to(y.dtype) * self.lane.scale)
        return self._factor[key]

    def adapt(self, layer: int, target: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        key = f"{layer}_{target}"
        if layer not in self.lane.layer_set or key not in self.lane.down:
            return y
        a, b = self.lane.down[key].to(x.dtype), self.lane.up[key].to(y.dtype)
        y2 = y.reshape(-1, y.shape[-1])
        h = (self.lane.dropout(x).reshape(-1, x.shape[-1]) @ a.T) * self.factor(y)  # [b·w, r]
        if torch.is_grad_enabled() and (y.requires_grad or h.requires_grad):
            return torch.addmm(y2, h.to(y.dtype), b.T).view_as(y)
        # Reading without autograd: ``y`` is this projection's fresh output and nothing else
        # holds it, so the update goes in place (out of place, addmm first copies ``y``).
        return y2.addmm_(h.to(y.dtype), b.T).view_as(y)


def lane_of(compressor) -> GistLane | None:
    """The gist lane of a compressor: a GistNet's ``lane``, or that of the GistNet a wrapper
    (``.gistnet``, e.g. the contextual compressor) holds; None for baselines and no lane."""
    for obj in (compressor, getattr(compressor, "gistnet", None)):
        lane = getattr(obj, "lane", None)
        if isinstance(lane, GistLane):
            return lane
    return None
