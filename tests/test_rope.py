"""Tests for megacontext.rope: against transformers, mpmath and explicit loops."""

import json
import math

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from megacontext.rope import (
    RopeConfig,
    angles,
    apply_rotary,
    auto_factor,
    inv_freq,
    phases,
    resolve,
    rotary_tables,
    rotate,
    span_attenuation,
)

TWO_PI = 2 * math.pi
COMBOS = [(64, 100000.0), (128, 500000.0)]


def hf_config(head_dim, theta, max_position, **rope_parameters):
    """A tiny LlamaConfig carrying transformers 5.x ``rope_parameters``."""
    rope_parameters = {"rope_type": "default", "rope_theta": theta, **rope_parameters}
    return LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=max_position,
        rope_parameters=rope_parameters,
    )


def mp_angle(p, theta):
    """(p·θ) mod 2π at 60 digits, θ taken as its float64 value, p an int or float."""
    with mpmath.workdps(60):
        return mpmath.fmod(mpmath.mpf(p) * mpmath.mpf(theta), 2 * mpmath.pi) % (2 * mpmath.pi)


def mp_freqs(theta, d):
    """base^(−2j/d) correctly rounded to float64, via mpmath at 60 digits."""
    with mpmath.workdps(60):
        return [float(mpmath.mpf(theta) ** (-mpmath.mpf(2 * j) / d)) for j in range(d // 2)]


def circular_error(ours, reference):
    """Largest |ours − reference| on the circle (both in radians)."""
    diff = (torch.as_tensor(ours, dtype=torch.float64) - reference + math.pi) % TWO_PI - math.pi
    return diff.abs().max().item()


# 1. Frequencies -----------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim,theta", COMBOS)
def test_none_and_ntk_frequencies_match_closed_forms(head_dim, theta):
    d = head_dim
    want = torch.tensor([theta ** (-2 * j / d) for j in range(d // 2)], dtype=torch.float64)
    got, scale = inv_freq(RopeConfig(d, theta))
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    assert scale == 1.0
    # Bit for bit the correctly rounded value, so phases are reproducible on any machine.
    assert got.tolist() == mp_freqs(theta, d)
    alpha = 4.0
    base = theta * alpha ** (d / (d - 2))
    want = torch.tensor([base ** (-2 * j / d) for j in range(d // 2)], dtype=torch.float64)
    got, scale = inv_freq(RopeConfig(d, theta, scaling="ntk", factor=alpha))
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    # The lowest frequency pair lands exactly on "positions divided by alpha".
    assert got[-1].item() == pytest.approx(theta ** (-(d - 2) / d) / alpha, rel=1e-12)


# (our kwargs, transformers rope_parameters, max_position_embeddings, seq_len)
HF_CASES = [
    (dict(scaling="linear", factor=4.0), dict(rope_type="linear", factor=4.0), 2048, None),
    *[
        (
            dict(scaling="dynamic", factor=2.0, original_max_position=2048),
            dict(rope_type="dynamic", factor=2.0),
            2048,
            seq,
        )
        for seq in (1000, 2048, 8192, 100000)
    ],
    (
        dict(scaling="yarn", factor=4.0, original_max_position=2048),
        dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=2048),
        8192,
        None,
    ),
    (
        dict(scaling="yarn", factor=16.0, original_max_position=4096, beta_fast=16.0,
             beta_slow=2.0, mscale=0.707, mscale_all_dim=1.0, truncate=False),
        dict(rope_type="yarn", factor=16.0, original_max_position_embeddings=4096,
             beta_fast=16.0, beta_slow=2.0, mscale=0.707, mscale_all_dim=1.0, truncate=False),
        65536,
        None,
    ),
    (
        dict(scaling="yarn", factor=8.0, original_max_position=4096, attention_factor=1.5),
        dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=4096,
             attention_factor=1.5),
        32768,
        None,
    ),
    (
        dict(scaling="llama3", factor=8.0, original_max_position=8192),
        dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
             original_max_position_embeddings=8192),
        131072,
        None,
    ),
    (
        dict(scaling="llama3", factor=4.0, original_max_position=2048, low_freq_factor=2.0,
             high_freq_factor=8.0),
        dict(rope_type="llama3", factor=4.0, low_freq_factor=2.0, high_freq_factor=8.0,
             original_max_position_embeddings=2048),
        8192,
        None,
    ),
]


@pytest.mark.parametrize("head_dim,theta", COMBOS)
@pytest.mark.parametrize("ours,theirs,max_position,seq_len", HF_CASES)
def test_scaled_frequencies_match_transformers(head_dim, theta, ours, theirs, max_position,
                                               seq_len):
    config = hf_config(head_dim, theta, max_position, **theirs)
    want, want_scale = ROPE_INIT_FUNCTIONS[theirs["rope_type"]](config, seq_len=seq_len)
    cfg = RopeConfig(head_dim, theta, **ours)
    got, scale = inv_freq(cfg, span=seq_len)
    assert got.dtype == torch.float64 and got.shape == (head_dim // 2,)
    # transformers computes in float32, so agreement is to float32 rounding.
    torch.testing.assert_close(got, want.double(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(want_scale, rel=1e-12)
    if theirs["rope_type"] != "linear":  # the scaled variants really differ from the base
        base, _ = inv_freq(RopeConfig(head_dim, theta))
        assert (got != base).any() or (seq_len is not None and seq_len <= max_position)
    again = RopeConfig.from_transformers(config.rope_parameters, head_dim, max_position)
    torch.testing.assert_close(inv_freq(again, span=seq_len)[0], got, rtol=1e-15, atol=0)


def test_dynamic_is_unscaled_within_the_trained_length():
    cfg = RopeConfig(64, 10000.0, scaling="dynamic", factor=4.0, original_max_position=1024)
    base, _ = inv_freq(RopeConfig(64, 10000.0))
    for span in (None, 1, 1024):
        torch.testing.assert_close(inv_freq(cfg, span=span)[0], base, rtol=0, atol=0)
    assert (inv_freq(cfg, span=1025)[0][1:] < base[1:]).all()


# 2. Rotation against transformers ----------------------------------------------------------


@pytest.mark.parametrize(
    "ours,theirs,max_position,offset",
    [
        (dict(), dict(), 2048, 0),
        (dict(scaling="linear", factor=2.0), dict(rope_type="linear", factor=2.0), 2048, 5),
        (dict(scaling="yarn", factor=4.0, original_max_position=512),
         dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=512), 2048, 0),
        (dict(scaling="llama3", factor=8.0, original_max_position=64),
         dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64), 512, 3),
    ],
)
def test_rotation_matches_transformers(ours, theirs, max_position, offset):
    torch.manual_seed(0)
    b, h, w, d = 2, 4, 48, 64
    config = hf_config(d, 10000.0, max_position, **theirs)
    q, k = torch.randn(b, h, w, d), torch.randn(b, h, w, d)
    position_ids = torch.arange(w).repeat(b, 1) + torch.tensor([[0], [offset]])  # [b, w]
    cos_hf, sin_hf = LlamaRotaryEmbedding(config)(q, position_ids)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)

    cfg = RopeConfig(d, 10000.0, **ours)
    cos, sin = rotary_tables(position_ids[:, None, :], cfg)  # [b, 1, w, d]
    assert cos.dtype == torch.float32 and cos.shape == (b, 1, w, d)
    torch.testing.assert_close(cos[:, 0], cos_hf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apply_rotary(q, cos, sin), q_hf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rotate(k, position_ids[:, None, :], cfg), k_hf, rtol=1e-5,
                               atol=1e-5)
    # Float positions give the same result as int positions.
    as_float = position_ids[:, None, :].double()
    torch.testing.assert_close(rotate(k, as_float, cfg), k_hf, rtol=1e-5, atol=1e-5)


def test_dynamic_rotation_matches_transformers_past_the_trained_length():
    torch.manual_seed(1)
    d, w = 64, 80
    config = hf_config(d, 10000.0, 48, rope_type="dynamic", factor=2.0)
    q = torch.randn(1, 2, w, d)
    position_ids = torch.arange(w)[None]
    cos_hf, sin_hf = LlamaRotaryEmbedding(config)(q, position_ids)  # rescales for seq_len 80
    q_hf, _ = apply_rotary_pos_emb(q, q, cos_hf, sin_hf)
    cfg = RopeConfig(d, 10000.0, scaling="dynamic", factor=2.0, original_max_position=48)
    got = rotate(q, position_ids[:, None, :], cfg, span=w)
    torch.testing.assert_close(got, q_hf, rtol=1e-5, atol=1e-5)


def test_heads_axis_broadcasts_and_dtype_is_kept():
    torch.manual_seed(2)
    cfg = RopeConfig(32, 10000.0)
    x = torch.randn(2, 3, 5, 32)
    pos = torch.tensor([[0.0, 1.5, 7.0, 15.5, 100.0], [3.0, 4.0, 5.0, 6.0, 1e6 + 0.5]],
                       dtype=torch.float64)
    together = rotate(x, pos[:, None, :], cfg)
    for head in range(3):
        torch.testing.assert_close(together[:, head], rotate(x[:, head], pos, cfg))
    half = rotate(x.bfloat16(), pos[:, None, :], cfg)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), together, rtol=2e-2, atol=2e-2)
    # A rotation keeps norms (no attenuation, no attention scale).
    torch.testing.assert_close(together.norm(dim=-1), x.norm(dim=-1))


# 3. Shift invariance ------------------------------------------------------------------------

SHIFT_CONFIGS = [
    (RopeConfig(64, 100000.0), None),
    (RopeConfig(64, 100000.0, scaling="linear", factor=4.0), None),
    (RopeConfig(64, 100000.0, scaling="ntk", factor=4.0), None),
    (RopeConfig(64, 100000.0, scaling="dynamic", factor=2.0, original_max_position=2048), 8192),
    (RopeConfig(64, 100000.0, scaling="yarn", factor=4.0, original_max_position=2048), None),
    (RopeConfig(128, 500000.0, scaling="llama3", factor=8.0, original_max_position=8192), None),
]


def scores(cfg, span, q, k, m, n, reference=None):
    """q rotated to m against k rotated to n, per row, in q's dtype. q, k [N, d]."""
    q_rot = rotate(q, m, cfg, reference=reference, span=span)
    k_rot = rotate(k, n, cfg, reference=reference, span=span)
    return (q_rot.double() * k_rot.double()).sum(-1)


@pytest.mark.parametrize("cfg,span", SHIFT_CONFIGS)
@pytest.mark.parametrize("halves", [False, True])
def test_scores_depend_only_on_distance(cfg, span, halves):
    gen = torch.Generator().manual_seed(3)
    n_pairs = 64
    q = torch.randn(n_pairs, cfg.head_dim, generator=gen)
    k = torch.randn(n_pairs, cfg.head_dim, generator=gen)
    m = torch.randint(0, 4096, (n_pairs,), generator=gen).double()
    n = torch.randint(0, 4096, (n_pairs,), generator=gen).double()
    if halves:
        m, n = m + 0.5, n + 15.5
    scale = q.norm(dim=-1).double() * k.norm(dim=-1).double()
    if cfg.scaling == "yarn":
        scale = scale * inv_freq(cfg)[1] ** 2
    # float32 rotation (the runtime's) to 1e-5; float64 rotation to 1e-9, which a plain
    # float64 p·θ misses already at 10^9 (~2e-8) and at 2^40 (~2e-6).
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-9)):
        qd, kd = q.to(dtype), k.to(dtype)
        near = scores(cfg, span, qd, kd, m, n)
        for delta in (2**24 + 1, 10**9, 2**40, 2**51 + 1):
            far = scores(cfg, span, qd, kd, m + delta, n + delta)  # absolute angles
            assert ((far - near).abs() / scale).max() <= tol, (dtype, delta)
            rebased = scores(cfg, span, qd, kd, m + delta, n + delta, reference=delta - 1000)
            assert ((rebased - near).abs() / scale).max() <= tol, (dtype, delta)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(-(2**20), 2**20),
    n=st.integers(-(2**20), 2**20),
    m_half=st.booleans(),
    n_half=st.booleans(),
    delta=st.one_of(st.integers(-(2**24), 2**24), st.integers(2**40, 2**51),
                    st.integers(-(2**51), -(2**40))),
    which=st.integers(0, len(SHIFT_CONFIGS) - 1),
)
def test_shift_invariance_property(m, n, m_half, n_half, delta, which):
    cfg, span = SHIFT_CONFIGS[which]
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, cfg.head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(1, cfg.head_dim, generator=gen, dtype=torch.float64)
    scale = (q.norm() * k.norm()).item() * inv_freq(cfg, span)[1] ** 2
    pm = torch.tensor([m + 0.5 * m_half], dtype=torch.float64)
    pn = torch.tensor([n + 0.5 * n_half], dtype=torch.float64)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-9)):
        near = scores(cfg, span, q.to(dtype), k.to(dtype), pm, pn)
        far = scores(cfg, span, q.to(dtype), k.to(dtype), pm + delta, pn + delta)
        assert abs((far - near).item()) / scale <= tol, dtype


# 4. Exact reduction -------------------------------------------------------------------------

FLOAT_POSITIONS = [2**40 + 0.5, 10**9 + 3, -(2**33), 2**52 + 1, 2**62, -12345.75, 0.3, 1e15 + 0.125]
INT_POSITIONS = [2**62 - 1, -(2**62), 10**18 + 7, 2**63 - 1, -(2**63), 0, 1]


@pytest.mark.parametrize(
    "cfg",
    [RopeConfig(64, 100000.0), RopeConfig(64, 10000.0, scaling="yarn", factor=4.0,
                                          original_max_position=2048)],
)
def test_angles_are_exact_against_mpmath(cfg):
    freqs, _ = inv_freq(cfg)
    for positions in (torch.tensor(FLOAT_POSITIONS, dtype=torch.float64),
                      torch.tensor(INT_POSITIONS, dtype=torch.int64)):
        got = angles(positions, freqs)
        assert got.dtype == torch.float64 and got.shape == (len(positions), len(freqs))
        assert ((got >= 0) & (got < TWO_PI)).all()
        exact_positions = [int(p) if not positions.is_floating_point() else p
                           for p in positions.tolist()]
        want = torch.tensor([[float(mp_angle(p, t)) for t in freqs.tolist()]
                             for p in exact_positions], dtype=torch.float64)
        assert circular_error(got, want) <= 1e-9
    # A naive float64 product loses ~1e-4 rad here, so the test above can tell the difference.
    naive = torch.fmod(torch.tensor(FLOAT_POSITIONS[:1], dtype=torch.float64)[:, None] * freqs,
                       TWO_PI)
    want = torch.tensor([[float(mp_angle(FLOAT_POSITIONS[0], t)) for t in freqs.tolist()]],
                        dtype=torch.float64)
    assert circular_error(naive, want) > 1e-7


def test_reference_is_subtracted_exactly():
    freqs, _ = inv_freq(RopeConfig(64, 100000.0))
    positions = torch.tensor([2**40 + 0.5, 2**40 + 17.0, 2**40 - 3.5], dtype=torch.float64)
    reference = 2**40 - 100
    got = angles(positions, freqs, reference=reference)
    want = torch.tensor([[float(mp_angle(p - reference, t)) for t in freqs.tolist()]
                         for p in positions.tolist()], dtype=torch.float64)
    assert circular_error(got, want) <= 1e-9
    with pytest.raises(ValueError, match="overflow"):
        angles(torch.tensor([2**62]), freqs, reference=-(2**62))


# 5. Span attenuation ------------------------------------------------------------------------


@pytest.mark.parametrize("length", [32, 1024])
@pytest.mark.parametrize(
    "cfg",
    [RopeConfig(64, 100000.0),
     RopeConfig(64, 10000.0, scaling="yarn", factor=4.0, original_max_position=2048)],
)
def test_span_key_scores_the_mean_over_its_span(length, cfg):
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, cfg.head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(1, cfg.head_dim, generator=gen, dtype=torch.float64)
    q, k = q / q.norm(), k / k.norm()
    index = 12345
    center = index * length + (length - 1) / 2  # the DESIGN position rule for a span node
    reference = index * length
    att = span_attenuation(length, cfg)
    at_center = torch.tensor([center], dtype=torch.float64)
    k_span = rotate(k, at_center, cfg, attenuation=att[None], reference=reference)
    k_points = []  # k as a point at each of the span's positions, one at a time
    for t in range(length):
        p = torch.tensor([center - (length - 1) / 2 + t], dtype=torch.float64)
        k_points.append(rotate(k, p, cfg, reference=reference))
    for m in (center + 3.5, center - 5000.5, center + 40000.5, float(reference)):
        q_rot = rotate(q, torch.tensor([m], dtype=torch.float64), cfg, reference=reference)
        span_score = (q_rot * k_span).sum().item()
        mean = sum((q_rot * k_rot).sum().item() for k_rot in k_points) / length
        assert span_score == pytest.approx(mean, abs=1e-6)


def test_gaussian_point_and_limits():
    cfg = RopeConfig(64, 10000.0, scaling="linear", factor=2.0)
    freqs = [10000.0 ** (-2 * j / 64) / 2.0 for j in range(32)]  # the scaled frequencies
    for length in (2, 32, 1024):
        sigma2 = (length**2 - 1) / 12
        want = torch.tensor([math.exp(-(t**2) * sigma2 / 2) for t in freqs], dtype=torch.float64)
        got = span_attenuation(length, cfg, kind="gaussian")
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-300)
        with mpmath.workdps(30):
            want = torch.tensor(
                [float(mpmath.sin(length * t / 2) / (length * mpmath.sin(t / 2))) for t in freqs],
                dtype=torch.float64,
            )
        torch.testing.assert_close(span_attenuation(length, cfg), want, rtol=1e-10, atol=1e-12)
    assert (span_attenuation(32, cfg, kind="point") == 1).all()
    assert (span_attenuation(1, cfg) == 1).all()
    assert (span_attenuation(1, cfg, kind="gaussian") == 1).all()
    # θ → 0: the limit is 1, not 0/0.
    slow = span_attenuation(32768, RopeConfig(64, 1e40))
    assert torch.isfinite(slow).all() and slow[-1].item() == pytest.approx(1.0, abs=1e-12)
    assert slow.dtype == torch.float64 and slow.shape == (32,)


# 6. Phases ----------------------------------------------------------------------------------


def test_phases_use_unscaled_frequencies_and_are_exact():
    cfg = RopeConfig(64, 100000.0, scaling="yarn", factor=4.0, original_max_position=2048)
    centers = [0.0, 15.5, 511.5, 10**9 + 15.5, 10**9 + 16383.5, 2**40 + 511.5, 2**40 + 15.5]
    got = phases(torch.tensor(centers, dtype=torch.float64), cfg)
    assert got.dtype == torch.float32 and got.shape == (len(centers), 32)
    assert ((got >= 0) & (got < TWO_PI)).all()
    unscaled = mp_freqs(100000.0, 64)
    want = torch.tensor([[float(mp_angle(c, t)) for t in unscaled] for c in centers])
    assert circular_error(got, want) <= 1e-5


# 7. resolve / auto --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ntk", "linear", "yarn", "llama3", "dynamic"])
def test_auto_resolves_from_the_extent(kind):
    auto = RopeConfig(64, 10000.0, scaling="auto", original_max_position=2048, auto_kind=kind)
    for extent in (100, 2048):
        assert resolve(auto, extent) == RopeConfig(64, 10000.0, original_max_position=2048)
    four = resolve(auto, 4 * 2048)
    assert four == RopeConfig(64, 10000.0, scaling=kind, factor=4.0, original_max_position=2048)
    f_auto, s_auto = inv_freq(auto, span=8192)
    f_four, s_four = inv_freq(four, span=8192)
    torch.testing.assert_close(f_auto, f_four, rtol=0, atol=0)
    assert s_auto == s_four
    assert (f_four != inv_freq(RopeConfig(64, 10000.0))[0]).any()
    plain = RopeConfig(64, 10000.0, scaling="ntk", factor=2.0)
    assert resolve(plain, 10**9) is plain
    with pytest.raises(ValueError, match="auto"):
        inv_freq(auto)


def test_auto_factor_changes_only_in_power_of_two_steps():
    auto = RopeConfig(64, 10000.0, scaling="auto", original_max_position=2048)
    steps = {1: 1.0, 2048: 1.0, 2049: 2.0, 3000.5: 2.0, 4096: 2.0, 4096.5: 4.0, 8192: 4.0,
             8193: 8.0, 3 * 2**20: 2048.0, 2**40: 2.0**29, 2**62 + 2**40: 2.0**52}
    for extent, factor in steps.items():
        assert auto_factor(extent, 2048) == factor, extent
        assert resolve(auto, extent).factor == factor, extent
    # exact at the edges: a ratio that rounds to 2.0 in float64 is still above it
    assert auto_factor(2**53 + 3, 2**52 + 1) == 4.0
    assert auto_factor(2.0**53 + 2.0, 2**52 + 1) == 2.0
    # within one step every extent resolves to the same config (one KV cache survives)
    assert len({resolve(auto, e) for e in range(4097, 8193, 97)}) == 1
    assert resolve(auto, 4096) != resolve(auto, 4097)


# 8. Config round trip and bad input ---------------------------------------------------------


def test_config_round_trips_through_json():
    cfg = RopeConfig(128, 500000, scaling="yarn", factor=4, original_max_position=8192,
                     mscale=1.0, mscale_all_dim=1.0)
    back = RopeConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and isinstance(back.theta, float)
    with pytest.raises(ValueError, match="rope_thta"):
        RopeConfig.from_dict({**cfg.to_dict(), "rope_thta": 1.0})


@pytest.mark.parametrize(
    "kwargs,fragments",
    [
        (dict(head_dim=63, theta=1e4), ["head_dim=63"]),
        (dict(head_dim=64, theta=1e4, scaling="ntk-aware"), ["'ntk-aware'", "yarn", "llama3"]),
        (dict(head_dim=64, theta=1e4, scaling="yarn", factor=4.0), ["original_max_position"]),
        (dict(head_dim=64, theta=1e4, scaling="linear", factor=0.5), ["factor=0.5", ">= 1"]),
        (dict(head_dim=64, theta=1e4, scaling="auto", auto_kind="longrope",
              original_max_position=4), ["'longrope'"]),
        (dict(head_dim=64, theta=1e4, scaling="llama3", factor=8.0, original_max_position=64,
              low_freq_factor=4.0, high_freq_factor=2.0), ["high_freq_factor=2.0"]),
        (dict(head_dim=64, theta=1e4, attention_factor=2.0), ["attention_factor=2.0"]),
        # every problem is reported at once
        (dict(head_dim=-3, theta=-1.0, scaling="bogus"), ["head_dim=-3", "theta=-1.0", "bogus"]),
    ],
)
def test_bad_configs_name_the_value(kwargs, fragments):
    with pytest.raises(ValueError) as info:
        RopeConfig(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_bad_inputs_name_the_value():
    cfg = RopeConfig(64, 10000.0)
    x = torch.randn(2, 4, 8, 64)
    with pytest.raises(ValueError, match=r"\(3, 8\)"):
        rotate(x, torch.zeros(3, 8, dtype=torch.int64), cfg)
    with pytest.raises(TypeError, match="float32"):
        rotate(x, torch.arange(8.0), cfg)  # float32 positions already lost precision
    with pytest.raises(ValueError, match="head_dim=64"):
        rotate(torch.randn(8, 32), torch.arange(8), cfg)
    with pytest.raises(ValueError, match="nan"):
        rotate(x, torch.tensor([0.0, 1.0, float("nan")] + [0.0] * 5, dtype=torch.float64), cfg)
    with pytest.raises(ValueError, match="inf"):
        angles(torch.tensor([float("inf")], dtype=torch.float64), inv_freq(cfg)[0])
    with pytest.raises(ValueError, match=r"\(5,\)"):
        rotate(x, torch.arange(8), cfg, attenuation=torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="'box'"):
        span_attenuation(32, cfg, kind="box")
    with pytest.raises(ValueError, match="1.5"):
        angles(torch.arange(3), inv_freq(cfg)[0], reference=1.5)
    with pytest.raises(ValueError, match="length=0"):
        span_attenuation(0, cfg)
