"""RoPE math: frequencies and their scaling variants, exact rotation at any position, span
attenuation and per-gist phases. Imports nothing of the project.

Axes: ``b`` batch, ``h`` heads, ``w`` working-context entries (one position each), ``d`` head
dim, ``j`` frequency pairs (d/2), ``k`` 8-bit chunks of a position.

Conventions (docs/rope.md has the long form):

- Half-split layout, as HF Llama: dimension ``i`` pairs with ``i + d/2`` and both turn by
  ``θ_i``; tables are ``cat([a, a])`` of the d/2 angles and ``rotate_half(x) = cat(-x2, x1)``.
- Angles are ``(p·θ_j) mod 2π`` in ``[0, 2π)``, reduced *exactly* (error ~1e-11 rad) for any
  |p| < 2^63, so a score depends only on the distance between positions even at 2^40. Only the
  finished cos/sin are cast to float32.
- Positions are int64 or float64 (token ``p`` at ``p``, a gist at its half-integer center).
"""

from __future__ import annotations

import dataclasses
import decimal
import functools
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

import torch
from einops import rearrange, repeat

SCALINGS = ("none", "linear", "ntk", "dynamic", "yarn", "llama3", "auto")
AUTO_KINDS = ("linear", "ntk", "dynamic", "yarn", "llama3")
ATTENUATION_KINDS = ("span", "gaussian", "point")

# 2π to 76 significant digits, exact as a Fraction: the chunk tables below need
# (2^64·θ) mod 2π, whose quotient is ~2^64, so 2π must be known far past float64's 16 digits.
_TWO_PI_EXACT = Fraction(
    "6.283185307179586476925286766559005768394338798750211641949889184615632812572418"
)
_TWO_PI = 2.0 * math.pi
_CHUNK_BITS = 8
_NUM_CHUNKS = 64 // _CHUNK_BITS
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class RopeConfig:
    """A RoPE: base frequencies plus an optional context-extension scaling.

    Field names follow transformers' ``rope_parameters`` where one exists (``factor``,
    ``low_freq_factor``, ``beta_fast``, ``attention_factor``, ``mscale``, ...); ``theta`` is
    ``rope_theta`` and ``original_max_position`` is ``original_max_position_embeddings`` (for
    ``dynamic``: transformers' ``max_position_embeddings``, the trained length).

    Attributes:
        head_dim: d, even.
        theta: the base, > 0.
        scaling: one of ``SCALINGS``. ``auto`` picks a power-of-two factor per refocus
            (see ``resolve``).
        factor: the extension factor (>= 1) for linear/ntk/dynamic/yarn/llama3; 1.0 otherwise.
        original_max_position: the trained length; required by dynamic, yarn, llama3, auto.
        low_freq_factor, high_freq_factor: llama3's wavelength band.
        beta_fast, beta_slow: yarn's ramp bounds, in rotations.
        attention_factor: yarn's cos/sin scale; None derives it from factor and mscale.
        mscale, mscale_all_dim: yarn's (DeepSeek) attention-factor parameters.
        truncate: yarn rounds its correction range to whole dimensions (transformers' default).
        auto_kind: the concrete scaling ``auto`` resolves to.
    """

    head_dim: int
    theta: float
    scaling: str = "none"
    factor: float = 1.0
    original_max_position: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    auto_kind: str = "ntk"

    def __post_init__(self) -> None:
        problems: list[str] = []

        def number(name: str, low: float | None = None, optional: bool = False) -> float | None:
            value = getattr(self, name)
            if value is None and optional:
                return None
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or (low is not None and value <= low):
                bound = f" > {low:g}" if low is not None else ""
                problems.append(f"{name}={value!r} (expected a finite number{bound})")
                return None
            object.__setattr__(self, name, float(value))  # JSON and hashing see one type
            return float(value)

        d = self.head_dim
        if isinstance(d, bool) or not isinstance(d, int) or d < 2 or d % 2:
            problems.append(f"head_dim={d!r} (expected a positive even int)")
        theta = number("theta", low=0.0)
        if self.scaling not in SCALINGS:
            problems.append(f"scaling={self.scaling!r} (expected one of {', '.join(SCALINGS)})")
        if self.auto_kind not in AUTO_KINDS:
            problems.append(f"auto_kind={self.auto_kind!r} (expected one of {AUTO_KINDS})")
        kind = self.auto_kind if self.scaling == "auto" else self.scaling

        factor = number("factor")
        if factor is not None:
            if self.scaling in AUTO_KINDS and factor < 1.0:
                problems.append(f"factor={factor!r} (expected >= 1 for scaling={self.scaling!r})")
            if self.scaling in ("none", "auto") and factor != 1.0:
                why = "derived from the extent" if self.scaling == "auto" else "unused"
                problems.append(
                    f"factor={factor!r} (expected 1.0: it is {why} with scaling={self.scaling!r})"
                )
        omp = self.original_max_position
        if omp is None:
            if self.scaling in ("dynamic", "yarn", "llama3", "auto"):
                problems.append(
                    f"original_max_position=None (scaling={self.scaling!r} needs the trained "
                    "length)"
                )
        elif isinstance(omp, bool) or not isinstance(omp, int) or omp < 1:
            problems.append(f"original_max_position={omp!r} (expected a positive int)")

        if kind in ("ntk", "dynamic") and isinstance(d, int) and d == 2:
            problems.append(f"head_dim=2 (expected >= 4 for {kind!r}: its exponent is d/(d-2))")
        if kind == "yarn" and theta is not None and theta <= 1.0:
            problems.append(f"theta={theta!r} (expected > 1 for yarn: it divides by log(theta))")
        low_ff, high_ff = number("low_freq_factor", 0.0), number("high_freq_factor", 0.0)
        if low_ff is not None and high_ff is not None and high_ff <= low_ff:
            problems.append(
                f"high_freq_factor={high_ff!r} (expected > low_freq_factor={low_ff!r})"
            )
        slow, fast = number("beta_slow", 0.0), number("beta_fast", 0.0)
        if slow is not None and fast is not None and fast <= slow:
            problems.append(f"beta_fast={fast!r} (expected > beta_slow={slow!r})")
        for name in ("attention_factor", "mscale", "mscale_all_dim"):
            if number(name, 0.0, optional=True) is not None and kind != "yarn":
                problems.append(f"{name}={getattr(self, name)!r} (only yarn uses it, not {kind!r})")
        if not isinstance(self.truncate, bool):
            problems.append(f"truncate={self.truncate!r} (expected a bool)")
        if problems:
            raise ValueError("invalid RopeConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """All fields as JSON-friendly values (the tree stores this in its header)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RopeConfig:
        """Inverse of ``to_dict``; unknown keys are an error, not silently dropped."""
        if not isinstance(data, Mapping):
            raise TypeError(f"RopeConfig.from_dict expects a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown RopeConfig keys {unknown} (known: {sorted(known)})")
        missing = [k for k in ("head_dim", "theta") if k not in data]
        if missing:
            raise ValueError(f"RopeConfig.from_dict is missing required keys {missing}")
        return cls(**data)

    @classmethod
    def from_transformers(
        cls, rope_parameters: Mapping[str, Any], head_dim: int, max_position_embeddings: int
    ) -> RopeConfig:
        """Build from a transformers 5.x ``config.rope_parameters`` dict."""
        p = dict(rope_parameters)
        kind = {"default": "none"}.get(p.get("rope_type", "default"), p.get("rope_type"))
        if kind not in ("none", "linear", "dynamic", "yarn", "llama3"):
            raise ValueError(f"rope_type={p.get('rope_type')!r} (expected default, linear, "
                             "dynamic, yarn or llama3)")
        kw: dict[str, Any] = {"head_dim": head_dim, "theta": p["rope_theta"], "scaling": kind}
        if kind != "none":
            kw["factor"] = p.get("factor")
        # dynamic's trained length is transformers' max_position_embeddings.
        kw["original_max_position"] = (max_position_embeddings if kind == "dynamic"
                                       else p.get("original_max_position_embeddings"))
        if kind == "yarn":
            if kw["factor"] is None:  # transformers' DeepSeek-V3 fallback
                kw["factor"] = max_position_embeddings / kw["original_max_position"]
            kw.update({k: p.get(k) for k in ("attention_factor", "mscale", "mscale_all_dim")})
            kw.update(beta_fast=p.get("beta_fast") or 32.0, beta_slow=p.get("beta_slow") or 1.0,
                      truncate=p.get("truncate", True))
        if kind == "llama3":
            kw.update(low_freq_factor=p["low_freq_factor"], high_freq_factor=p["high_freq_factor"])
        return cls(**kw)


def resolve(cfg: RopeConfig, extent: float) -> RopeConfig:
    """The concrete config for a context of positional extent ``extent``.

    For ``scaling="auto"``: ``auto_kind`` with ``factor = auto_factor(extent, L)``, the smallest
    power of two at least ``extent / L`` (L = ``original_max_position``): ``"none"`` up to L,
    factor 2 up to 2L, 4 up to 4L, and so on. The factor changes only in steps, so a memory
    whose extent grows keeps one RoPE, and its KV cache, for as long as the extent stays within
    one step. Other configs come back unchanged. Call it once per refocus, so one KV cache never
    mixes two scalings.
    """
    if cfg.scaling != "auto":
        return cfg
    _check_extent(extent, "extent")
    factor = auto_factor(extent, cfg.original_max_position)
    if factor == 1.0:
        return dataclasses.replace(
            cfg, scaling="none", auto_kind="ntk", attention_factor=None, mscale=None,
            mscale_all_dim=None,
        )
    return dataclasses.replace(cfg, scaling=cfg.auto_kind, factor=factor, auto_kind="ntk")


def auto_factor(extent: float, trained: int) -> float:
    """The smallest power of two ``f >= 1`` with ``f·trained >= extent`` (exact: no rounding
    of ``extent / trained`` can pick the step below)."""
    ratio = Fraction(extent) / trained
    factor = 1
    while factor < ratio:
        factor *= 2
    return float(factor)


def inv_freq(cfg: RopeConfig, span: float | None = None) -> tuple[torch.Tensor, float]:
    """Frequencies θ_j and the attention scale, in float64, as transformers defines them.

    Args:
        cfg: the RoPE.
        span: positional extent of the context. ``dynamic`` rescales only when it exceeds
            ``original_max_position`` (None: not, as transformers at init); ``auto`` needs it.

    Returns:
        ``(inv_freq [j] float64, attention_scale)``; the scale is 1.0 except for yarn.
    """
    if cfg.scaling == "auto":
        if span is None:
            raise ValueError(
                "scaling='auto' needs span= (the context's extent), or resolve() first"
            )
        cfg = resolve(cfg, span)
    d, base, kind = cfg.head_dim, cfg.theta, cfg.scaling
    if kind == "ntk":
        base = base * cfg.factor ** (d / (d - 2))
    elif kind == "dynamic" and span is not None:
        _check_extent(span, "span")
        seq = max(float(span), cfg.original_max_position)
        stretch = cfg.factor * seq / cfg.original_max_position - (cfg.factor - 1)
        base = base * stretch ** (d / (d - 2))
    freqs = torch.tensor(_powers(float(base), d), dtype=torch.float64)  # [j]
    if kind == "linear":
        return freqs / cfg.factor, 1.0
    if kind == "yarn":
        return _yarn(freqs, cfg)
    if kind == "llama3":
        return _llama3(freqs, cfg), 1.0
    return freqs, 1.0


@functools.lru_cache(maxsize=256)
def _powers(base: float, d: int) -> tuple[float, ...]:
    """``base^(−2j/d)`` for j < d/2, correctly rounded to float64 (via 40-digit decimals).

    Why not ``torch.pow``: its last bit may differ between devices and libm builds, and at
    p = 2^40 one ulp of θ_j moves the phase by ~1e-4 rad; a stored phase must be reproducible.
    """
    with decimal.localcontext() as ctx:
        ctx.prec = 40
        log_base = Decimal(base).ln()
        return tuple(float((-(Decimal(2 * j) / d) * log_base).exp()) for j in range(d // 2))


def _yarn(freqs: torch.Tensor, cfg: RopeConfig) -> tuple[torch.Tensor, float]:
    """transformers' ``_compute_yarn_parameters``, in float64."""
    d, f, omp = cfg.head_dim, cfg.factor, cfg.original_max_position

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if cfg.attention_factor is not None:
        scale = cfg.attention_factor
    elif cfg.mscale and cfg.mscale_all_dim:
        scale = get_mscale(f, cfg.mscale) / get_mscale(f, cfg.mscale_all_dim)
    else:
        scale = get_mscale(f)

    def correction_dim(rotations: float) -> float:
        return d * math.log(omp / (rotations * 2 * math.pi)) / (2 * math.log(cfg.theta))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    # ramp 0: fast pairs keep their frequency (extrapolate); ramp 1: slow pairs are divided.
    return freqs / f * ramp + freqs * (1 - ramp), float(scale)


def _llama3(freqs: torch.Tensor, cfg: RopeConfig) -> torch.Tensor:
    """transformers' ``_compute_llama3_parameters``, in float64."""
    f, omp = cfg.factor, cfg.original_max_position
    lo, hi = cfg.low_freq_factor, cfg.high_freq_factor
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > omp / lo, freqs / f, freqs)
    smooth = (omp / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / f + smooth * scaled
    medium = (wavelen >= omp / hi) & (wavelen <= omp / lo)
    return torch.where(medium, smoothed, scaled)


@functools.lru_cache(maxsize=64)
def _chunk_table(freqs: tuple[float, ...]) -> torch.Tensor:
    """``[k + 1, j]`` float64: row k is ``(2^(8k)·θ_j) mod 2π``; the last is ``(−2^64·θ_j) mod 2π``.

    Computed with exact rationals (θ_j is the float64 value, 2π to 76 digits) and rounded once.
    """
    theta = [Fraction(t) for t in freqs]
    rows = [[(Fraction(1 << (_CHUNK_BITS * k)) * t) % _TWO_PI_EXACT for t in theta]
            for k in range(_NUM_CHUNKS)]
    rows.append([(-Fraction(1 << 64) * t) % _TWO_PI_EXACT for t in theta])
    return torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)


def _as_positions(positions: Any) -> torch.Tensor:
    """Validated positions as int64 or float64 (finite, |p| < 2^63)."""
    t = positions if isinstance(positions, torch.Tensor) else torch.as_tensor(positions)
    if not isinstance(positions, torch.Tensor) and t.is_floating_point():
        t = torch.as_tensor(positions, dtype=torch.float64)  # not torch's float32 default
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"positions must be int64 or float64, got {t.dtype}")
    if t.is_floating_point() and t.dtype != torch.float64:
        # float32 holds half-integers exactly only below 2^23: refuse rather than rotate a
        # gist to a position already rounded away from its center.
        raise TypeError(f"positions must be int64 or float64, got {t.dtype}")
    if not t.is_floating_point():
        return t.to(torch.int64)
    bad = ~torch.isfinite(t) | (t.abs() >= 2.0**63)
    if bool(bad.any()):
        raise ValueError(
            f"positions contain {int(bad.sum())} non-finite or out-of-range value(s), first "
            f"{t[bad][0].item()!r} (expected finite positions with |p| < 2^63)"
        )
    return t


def _as_reference(reference: Any) -> int:
    if reference is None:
        return 0
    if isinstance(reference, torch.Tensor):
        reference = reference.item()
    ok = isinstance(reference, numbers.Real) and not isinstance(reference, bool)
    if not ok or not math.isfinite(reference) or reference != int(reference):
        raise ValueError(f"reference={reference!r} (expected an integer or None)")
    return int(reference)


def _broadcast(a: torch.Size, b: torch.Size) -> torch.Size | None:
    """The broadcast of two shapes, or None where they do not broadcast."""
    try:
        return torch.broadcast_shapes(a, b)
    except RuntimeError:
        return None


def _check_extent(extent: Any, name: str) -> None:
    ok = isinstance(extent, numbers.Real) and not isinstance(extent, bool)
    if not ok or not math.isfinite(extent) or extent <= 0:
        raise ValueError(f"{name}={extent!r} (expected a positive finite number)")


def _angles(pos: torch.Tensor, freqs: torch.Tensor, ref: int) -> torch.Tensor:
    """``angles`` on validated inputs: pos int64/float64 ``[...]`` → float64 ``[..., j]``."""
    if pos.is_floating_point():
        whole = torch.floor(pos)
        rest = pos - whole  # exact: x − floor(x) never rounds; in [0, 1)
        n = whole.to(torch.int64)
    else:
        n, rest = pos, None
    if ref:
        # Rebase exactly in int64; refuse the one way it can go wrong (overflow).
        lo, hi = (_INT64_MIN + ref, _INT64_MAX) if ref > 0 else (_INT64_MIN, _INT64_MAX + ref)
        if n.numel() and (int(n.min()) < lo or int(n.max()) > hi):
            raise ValueError(f"positions minus reference={ref} overflow int64")
        n = n - ref
    # Why chunks: p·θ in float64 rounds to ulp(p·θ) (1e-4 rad at p = 2^40) before any mod, and
    # fmod by float64 2π adds p·θ/2π times 2π's own 2.4e-16 error. Instead write n in two's
    # complement as 8 unsigned bytes c_k (n = Σ c_k·2^(8k) − 2^64·[n<0]), take each 2^(8k)·θ_j
    # mod 2π exactly from a cached table, and sum: 9 terms < 256·2π each, so the float64 sum
    # and the final fmod (exact) stay within ~1e-11 rad. Bytes rather than 16-bit chunks keep
    # each product c_k·R_kj small enough that its rounding stays far below 1e-10.
    table = _chunk_table(tuple(freqs.tolist())).to(n.device)  # [k + 1, j]
    shifts = torch.arange(0, 64, _CHUNK_BITS, device=n.device)  # [k]
    chunks = (rearrange(n, "... -> ... 1") >> shifts) & (2**_CHUNK_BITS - 1)  # [..., k]
    negative = rearrange((n < 0).to(torch.float64), "... -> ... 1")
    total = chunks.to(torch.float64) @ table[:-1] + negative * table[-1]  # [..., j]
    if rest is not None:
        half = (rest >= 0.5).to(torch.float64)
        frac = rest - 0.5 * half  # exact; in [0, 0.5)
        freqs = freqs.to(n.device)
        # θ/2 is exact in float64 and frac·θ < θ/2, so these add only rounding-level error.
        total = total + rearrange(half, "... -> ... 1") * (freqs / 2)
        total = total + rearrange(frac, "... -> ... 1") * freqs
    return torch.fmod(total, _TWO_PI)  # every term is >= 0, so this lands in [0, 2π)


def angles(positions: Any, inv_freq: torch.Tensor, reference: int | None = None) -> torch.Tensor:
    """Exact rotation angles ``((p − reference)·θ_j) mod 2π`` in ``[0, 2π)``.

    Exact to ~1e-11 rad for any |p| < 2^63 (θ_j taken as its float64 value), so the result
    depends on ``reference`` only through the absolute phase ``reference·θ_j``.

    Args:
        positions: ``[..., w]`` int64 or float64 (any float: the part that is not a multiple of
            0.5 is added as a small float product).
        inv_freq: ``[j]`` frequencies θ_j (float64 from ``inv_freq``).
        reference: integer subtracted (exactly, in int64) from every position; None means 0.

    Returns:
        ``[..., w, j]`` float64.
    """
    freqs = torch.as_tensor(inv_freq, dtype=torch.float64)
    if freqs.dim() != 1:
        raise ValueError(f"inv_freq must be 1-D [d/2], got shape {tuple(freqs.shape)}")
    return _angles(_as_positions(positions), freqs, _as_reference(reference))


def rotary_tables(
    positions: Any,
    cfg: RopeConfig,
    attenuation: torch.Tensor | None = None,
    reference: int | None = None,
    span: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables in HF Llama's half-split layout, scale and attenuation folded in.

    Args:
        positions: ``[..., w]`` int64 or float64.
        cfg: the RoPE (``auto`` needs ``span``; better, ``resolve`` it once per refocus).
        attenuation: ``[..., w, d/2]`` per-pair factors (see ``span_attenuation``), broadcast
            against the angles; None for none. Folding it here leaves attention unchanged.
        reference: integer subtracted from positions before the (exact) reduction.
        span: the context's positional extent, for ``dynamic`` and ``auto`` (see ``inv_freq``).
        dtype: output dtype; the math is float64 and this cast comes last.

    Returns:
        ``(cos, sin)``, each ``[..., w, d]``.
    """
    freqs, scale = inv_freq(cfg, span)
    pos = _as_positions(positions)
    a = _angles(pos, freqs.to(pos.device), _as_reference(reference))  # [..., w, j]
    cos, sin = torch.cos(a) * scale, torch.sin(a) * scale
    if attenuation is not None:
        att = torch.as_tensor(attenuation, device=a.device).to(torch.float64)
        if att.dim() == 0 or att.shape[-1] != a.shape[-1] or _broadcast(att.shape, a.shape) is None:
            raise ValueError(
                f"attenuation shape {tuple(att.shape)} does not fit angles [..., w, d/2] = "
                f"{tuple(a.shape)} (expected [..., w, {a.shape[-1]}])"
            )
        if not bool(torch.isfinite(att).all()):
            raise ValueError("attenuation contains non-finite values")
        cos, sin = cos * att, sin * att
    # Half-split layout: both halves of the head dim turn by the same d/2 angles.
    cos = repeat(cos, "... j -> ... (r j)", r=2)  # [..., w, d]
    sin = repeat(sin, "... j -> ... (r j)", r=2)  # [..., w, d]
    return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF's ``rotate_half``: ``cat(−x2, x1)`` over the halves of the last axis."""
    x1, x2 = rearrange(x, "... (r j) -> r ... j", r=2)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x·cos + rotate_half(x)·sin`` (HF's convention).

    Args:
        x: ``[..., w, d]`` any float dtype, e.g. ``[b, h, w, d]``.
        cos, sin: ``[..., w, d]`` broadcastable to x without enlarging it; for a heads axis
            pass ``[b, 1, w, d]`` (HF's ``unsqueeze_dim=1``).

    Returns:
        x rotated, x's shape and dtype. The arithmetic runs in the wider of x's and the
        tables' dtypes (bf16 x with float32 tables is rotated in float32, then cast back).
    """
    if not x.is_floating_point():
        raise TypeError(f"x must be a float tensor, got {x.dtype}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos shape {tuple(cos.shape)} != sin shape {tuple(sin.shape)}")
    if _broadcast(x.shape, cos.shape) != x.shape or cos.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"cos/sin shape {tuple(cos.shape)} does not broadcast to x shape {tuple(x.shape)}"
        )
    work = torch.promote_types(x.dtype, cos.dtype)
    xw = x.to(work)
    return (xw * cos.to(work) + rotate_half(xw) * sin.to(work)).to(x.dtype)


def rotate(
    x: torch.Tensor,
    positions: Any,
    cfg: RopeConfig,
    attenuation: torch.Tensor | None = None,
    reference: int | None = None,
    span: float | None = None,
) -> torch.Tensor:
    """Rotate x to its positions: ``apply_rotary(x, *rotary_tables(...))``.

    Args:
        x: ``[..., w, d]`` with d = ``cfg.head_dim``, any float dtype.
        positions: ``[..., w]`` int64 or float64, broadcastable to ``x.shape[:-1]`` (for
            ``x [b, h, w, d]`` pass ``[b, 1, w]`` or ``[w]``).
        cfg, attenuation, reference, span: as in ``rotary_tables``.

    Returns:
        x rotated, same shape and dtype. Tables are float64 for float64 x, else float32.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a float tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 1 or x.shape[-1] != cfg.head_dim:
        raise ValueError(f"x shape {tuple(x.shape)} (expected last dim head_dim={cfg.head_dim})")
    pos = _as_positions(positions).to(x.device)
    if _broadcast(pos.shape, x.shape[:-1]) != x.shape[:-1]:
        raise ValueError(
            f"positions shape {tuple(pos.shape)} does not broadcast to x's leading shape "
            f"{tuple(x.shape[:-1])} (x is {tuple(x.shape)})"
        )
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = rotary_tables(pos, cfg, attenuation, reference, span, dtype=dtype)
    return apply_rotary(x, cos, sin)


def span_attenuation(
    length: int, cfg: RopeConfig, kind: str = "span", span: float | None = None
) -> torch.Tensor:
    """Per-pair factors that make one rotated gist stand for its ``length`` positions.

    ``span``: ``D_L(θ) = sin(Lθ/2) / (L·sin(θ/2))``, the exact mean of ``e^{iθ(p−c)}`` over
    the L positions centered on c, so a query's score against the attenuated key at c equals
    the mean of its point scores over the span. ``gaussian``: ``exp(−θ²σ²/2)``, σ² = (L²−1)/12
    (the same variance, smooth). ``point``: ones.

    Args:
        length: L >= 1, the number of tokens the gist covers.
        cfg: the RoPE whose (scaled) frequencies are used.
        kind: one of ``ATTENUATION_KINDS``.
        span: the context's positional extent, for ``dynamic``/``auto`` (as in ``inv_freq``).

    Returns:
        ``[d/2]`` float64.
    """
    if kind not in ATTENUATION_KINDS:
        raise ValueError(f"kind={kind!r} (expected one of {', '.join(ATTENUATION_KINDS)})")
    if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 1:
        raise ValueError(f"length={length!r} (expected an int >= 1)")
    freqs, _ = inv_freq(cfg, span)
    L = int(length)
    if kind == "point" or L == 1:
        return torch.ones_like(freqs)
    if kind == "gaussian":
        return torch.exp(-(freqs**2) * ((L * L - 1) / 12) / 2)
    half = freqs / 2
    s = torch.sin(half)
    # Where sin(θ/2) vanishes (θ → 0, or θ at a multiple of 2π) use the L'Hôpital limit,
    # cos(Lθ/2)/cos(θ/2), which is 1 as θ → 0.
    small = s.abs() < 1e-12
    ratio = torch.sin(L * half) / (L * torch.where(small, torch.ones_like(s), s))
    return torch.where(small, torch.cos(L * half) / torch.cos(half), ratio)


def phases(centers: Any, cfg: RopeConfig) -> torch.Tensor:
    """Per-gist phase metadata ``φ_j = (c·θ_j) mod 2π`` for the *unscaled* RoPE.

    Scaling is ignored (the tree records its declared base RoPE; under scaling the runtime
    recomputes from the center). Reduced exactly in float64, then cast.

    Args:
        centers: ``[n]`` float64 (half-integer) centers, or int64.
        cfg: the RoPE; only ``head_dim`` and ``theta`` are read.

    Returns:
        ``[n, d/2]`` float32 in ``[0, 2π)``.
    """
    freqs, _ = inv_freq(RopeConfig(cfg.head_dim, cfg.theta))
    a = angles(centers, freqs).to(torch.float32)
    # float32(2π) is above 2π, so an angle just below 2π can round onto it; wrap to 0.
    return torch.where(a >= torch.tensor(_TWO_PI, dtype=torch.float32), torch.zeros_like(a), a)
