"""The base runtime against transformers' own implementations, on tiny random models."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import transformers
from safetensors.torch import save_file

from megacontext.base import BaseConfig, BaseLM
from megacontext.base.loading import unpermute_qk
from megacontext.base.model import load_base_lm, load_state
from megacontext.rope import RopeConfig, span_attenuation

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-6)

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 16}),
}


def hf_model(family: str, tie: bool = False, rope_parameters: dict | None = None, seed: int = 0,
             **overrides):
    """A random transformers model whose weights are far from init (so errors would show)."""
    config_cls, model_cls, extra = FAMILIES[family]
    rope = {"rope_type": "default", "rope_theta": 10000.0} | (rope_parameters or {})
    config = config_cls(**(TINY | extra | overrides), tie_word_embeddings=tie,
                        rope_parameters=rope, attn_implementation="eager")
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn_like(p) * 0.3)
            else:  # norm weights and biases: around 1 and around 0 would both do; keep it simple
                p.copy_(1.0 + torch.randn_like(p) * 0.2)
    return model


def ours_from(hf) -> BaseLM:
    ours = BaseLM(BaseConfig.from_hf(hf.config.to_dict()))
    load_state(ours, hf.state_dict())
    return ours


def cached_in_pieces(ours, emb, pos, cache, first: int, singles_end: int):
    """The model over ``emb`` fed through ``cache`` in pieces: entries ``[0, first)`` at once,
    then one at a time up to ``singles_end``, then the rest at once; the outputs joined."""
    parts = [ours(emb[:, :first], pos[:first], cache=cache)]
    parts += [ours(emb[:, i:i + 1], pos[i:i + 1], cache=cache) for i in range(first, singles_end)]
    parts.append(ours(emb[:, singles_end:], pos[singles_end:], cache=cache))
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_transformers(family, tie):
    hf = hf_model(family, tie=tie)
    ours = ours_from(hf)
    torch.manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (3, 40))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ours.embed(ids), torch.arange(40))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_logits_match_with_per_row_positions(family):
    """Different integer positions per batch row, through position_ids. Offsets stay small:
    transformers computes angles in float32, which drifts by ~1e-4 rad per 1000 positions, so
    far-away positions are checked by shift invariance below rather than against it."""
    hf = hf_model(family)
    ours = ours_from(hf)
    ids = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(3))
    positions = torch.stack([torch.arange(24) + 13, torch.arange(24) + 5])
    with torch.no_grad():
        expected = hf(input_ids=ids, position_ids=positions).logits
        got = ours(ours.embed(ids), positions)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("offset", [1000, 2**30, 2**40 + 7])
def test_logits_are_shift_invariant_far_from_zero(offset):
    """Only relative distances reach attention: the same context at positions 0.. and at
    offset.. (tokens and half-integer gist centers alike) gives the same logits."""
    ours = ours_from(hf_model("llama"))
    ids = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(24, dtype=torch.float64) * 1.5  # integers and half-integers
    with torch.no_grad():
        near = ours(ours.embed(ids), positions)
        far = ours(ours.embed(ids), positions + offset)
    torch.testing.assert_close(far, near, atol=1e-4, rtol=0)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
])
def test_scaled_rope_logits_match_transformers(rope):
    # A short trained length so that 80 positions run past it (dynamic scaling engages) while
    # staying where transformers' float32 angles are still exact to ~1e-6.
    hf = hf_model("llama", rope_parameters=rope, max_position_embeddings=32)
    ours = ours_from(hf)
    assert ours.config.rope.scaling == rope["rope_type"]
    n = 80
    ids = torch.randint(0, TINY["vocab_size"], (1, n), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ours.embed(ids), torch.arange(n))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_rope_override_changes_the_pass_and_num_logits_slices():
    hf = hf_model("llama")
    ours = ours_from(hf)
    ids = torch.randint(0, TINY["vocab_size"], (1, 30), generator=torch.Generator().manual_seed(5))
    emb, pos = ours.embed(ids), torch.arange(30)
    with torch.no_grad():
        plain = ours(emb, pos)
        ntk = ours(emb, pos, rope=RopeConfig(16, 10000.0, scaling="ntk", factor=4.0))
        last = ours(emb, pos, num_logits=5)
    assert (plain - ntk).abs().max() > 1e-3
    torch.testing.assert_close(last, plain[:, -5:])


def test_attenuation_of_ones_is_identity_and_other_values_matter():
    ours = ours_from(hf_model("llama"))
    ids = torch.randint(0, TINY["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(6))
    emb, pos = ours.embed(ids), torch.arange(20, dtype=torch.float64) + 0.5
    with torch.no_grad():
        plain = ours(emb, pos)
        ones = ours(emb, pos, torch.ones(20, 8, dtype=torch.float64))
        att = torch.ones(20, 8, dtype=torch.float64)
        att[3] = span_attenuation(32, ours.config.rope)
        damped = ours(emb, pos, att)
    torch.testing.assert_close(ones, plain)
    assert (damped - plain)[:, 3:].abs().max() > 1e-4  # entries after the gist see it changed
    torch.testing.assert_close(damped[:, :3], plain[:, :3])  # causal: earlier ones do not


def test_weights_are_frozen_but_gradients_reach_inputs():
    ours = ours_from(hf_model("qwen2"))
    assert not any(p.requires_grad for p in ours.parameters())
    emb = ours.embed(torch.tensor([[1, 2, 3, 4]])).clone().requires_grad_(True)
    ours(emb, torch.arange(4)).logsumexp(-1).sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_hf_directory_round_trip_including_shards(tmp_path):
    hf = hf_model("qwen3")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    keys = sorted(state)
    shards = {"model-1.safetensors": keys[: len(keys) // 2],
              "model-2.safetensors": keys[len(keys) // 2:]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(tmp_path / name))
    index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    ours = load_base_lm(tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(ours(ours.embed(ids), torch.arange(16)),
                                   hf(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_unpermute_inverts_llama_cpp_permutation():
    # llama.cpp's convert_hf_to_gguf.py permutes rows per head as reshape(h, 2, d/2) ->
    # swap -> flatten; written out here as an explicit index map.
    heads, d, cols = 3, 8, 5
    w = torch.randn(heads * d, cols).numpy()
    permuted = w.copy()
    for h in range(heads):
        for i in range(d // 2):
            for j in range(2):
                permuted[h * d + 2 * i + j] = w[h * d + j * (d // 2) + i]
    assert (unpermute_qk(permuted, heads) == w).all()


# -- bad input ---------------------------------------------------------------------------------

def test_bad_inputs_name_the_values():
    ours = ours_from(hf_model("llama"))
    with pytest.raises(ValueError, match=r"\[batch, entries, 64\].*\(1, 5, 32\)"):
        ours(torch.zeros(1, 5, 32), torch.arange(5))
    with pytest.raises(ValueError, match=r"positions must have shape.*\(6,\)"):
        ours(torch.zeros(1, 5, 64), torch.arange(6))
    with pytest.raises(ValueError, match=r"attenuation must have shape.*\(5, 4\)"):
        ours(torch.zeros(1, 5, 64), torch.arange(5), torch.ones(5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="token id 128 is outside the vocabulary"):
        ours.embed(torch.tensor([[1, 128]]))
    with pytest.raises(TypeError, match="integer"):
        ours.embed(torch.tensor([[1.0]]))


def test_missing_model_path_and_bad_configs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        BaseLM.load(str(tmp_path / "no-such-model"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        load_base_lm(tmp_path)
    with pytest.raises(ValueError, match="num_attention_heads=6 is not a multiple of "
                                         "num_key_value_heads=4"):
        BaseConfig(family="llama", hidden_size=48, intermediate_size=8, num_hidden_layers=1,
                   num_attention_heads=6, num_key_value_heads=4, vocab_size=10,
                   max_position_embeddings=8)


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    hf = hf_model("llama")
    state = hf.state_dict()
    state.pop("model.layers.1.mlp.up_proj.weight")
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing.*layers.1.mlp.up_proj.weight"):
        load_base_lm(tmp_path)


def test_gguf_of_unsupported_architecture_is_refused(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "tiny-gpt2.gguf"
    writer = GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        load_base_lm(path, cache_dir=tmp_path / "cache")


def test_kv_cache_reuse_equals_one_pass_and_truncation_recomputes():
    from megacontext.base.model import KVCache

    ours = ours_from(hf_model("qwen3"))
    emb = ours.embed(torch.randint(0, TINY["vocab_size"], (2, 40),
                                   generator=torch.Generator().manual_seed(8)))
    pos = torch.arange(40, dtype=torch.float64) * 2.5  # gist-like gaps and half-integers
    with torch.no_grad():
        full = ours(emb, pos)
        cache = KVCache()
        torch.testing.assert_close(cached_in_pieces(ours, emb, pos, cache, 25, 30), full,
                                   atol=1e-4, rtol=0)
        assert len(cache) == 40
        # a refocus changed entry 12 onwards: keep 12, recompute the rest with new content
        changed = emb.clone()
        changed[:, 12:20] = emb[:, 20:28]
        cache.truncate(12)
        again = ours(changed[:, 12:], pos[12:], cache=cache)
        torch.testing.assert_close(again, ours(changed, pos)[:, 12:], atol=1e-4, rtol=0)
        with pytest.raises(ValueError, match="truncate the cache"):
            ours(emb[:, :1], pos[:1], cache=cache, rope=RopeConfig(16, 10000.0, "ntk", 2.0))
        with pytest.raises(ValueError, match="depends on the context's length"):
            ours(emb[:, :1], pos[:1], cache=KVCache(),
                 rope=RopeConfig(16, 10000.0, "dynamic", 2.0, original_max_position=8))


def test_tiny_random_is_a_known_name(tmp_path):
    lm = BaseLM.load("tiny-random", cache_dir=tmp_path)
    ids = lm.tokenizer.encode("hello, memory")
    assert lm.tokenizer.decode(ids) == "hello, memory"
    assert lm.config.vocab_size == lm.tokenizer.vocab_size == 257
    with torch.no_grad():
        assert torch.isfinite(lm(lm.embed(torch.tensor([ids])), torch.arange(len(ids)))).all()


# -- the package's layering ---------------------------------------------------------------------

def test_base_modules_import_each_other_without_a_cycle():
    """config <- tokenizer, tiny <- loading <- model: loading and the tiny preset never reach
    back to the model class (imports inside functions count too)."""
    import ast
    from pathlib import Path

    import megacontext.base as base

    root = Path(base.__file__).parent
    graph = {}
    for path in root.glob("*.py"):
        name = f"megacontext.base.{path.stem}"
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {m for m in found if m.startswith("megacontext.base.")}
    assert "megacontext.base.model" not in graph["megacontext.base.loading"]
    assert "megacontext.base.model" not in graph["megacontext.base.tiny"]
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module, path):
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*path, dep])}"
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tie", [False, True])
def test_parameter_shapes_list_the_model_weights_in_order(family, tie):
    config = BaseConfig.from_hf(hf_model(family, tie=tie).config.to_dict())
    model = BaseLM(config)
    own = [(k, tuple(p.shape)) for k, p in model.named_parameters()]
    assert own == list(config.parameter_shapes().items())


def test_tiny_preset_is_a_config_and_seeded_weights(tmp_path):
    from megacontext.base.tiny import tiny_config, tiny_weights, write_tiny_model

    config = tiny_config()
    assert (config.family, config.hidden_size, config.vocab_size) == ("llama", 32, 257)
    assert tiny_config(48).hidden_size == 48
    weights = tiny_weights(config, seed=3)
    assert {k: tuple(v.shape) for k, v in weights.items()} == config.parameter_shapes()
    assert all(torch.equal(v, tiny_weights(config, seed=3)[k]) for k, v in weights.items())
    lm = BaseLM.load(str(write_tiny_model(tmp_path / "tiny", seed=3)))
    assert lm.config == config
    state = lm.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())


# -- the KV cache ---------------------------------------------------------------------------------

def test_kv_cache_matches_uncached_logits_over_many_single_token_steps():
    from megacontext.base import KVCache

    ours = ours_from(hf_model("llama"))
    n, first = 300, 20
    ids = torch.randint(0, TINY["vocab_size"], (1, n), generator=torch.Generator().manual_seed(9))
    pos = torch.arange(n, dtype=torch.float64) + 1000.5
    cache = KVCache()
    with torch.no_grad():
        full = ours(ours.embed(ids), pos)
        steps = [ours(ours.embed(ids[:, :first]), pos[:first], cache=cache)]
        capacities = [cache.capacity]
        for i in range(first, n):
            steps.append(ours(ours.embed(ids[:, i:i + 1]), pos[i:i + 1], cache=cache))
            capacities.append(cache.capacity)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)
    assert len(cache) == n
    # The buffers doubled: 20 -> 40 -> 80 -> 160 -> 320, one allocation each, not one per token.
    assert sorted(set(capacities)) == [20, 40, 80, 160, 320]
    assert cache.reallocations == 5 <= 1 + math.ceil(math.log2(n / first))
    torch.testing.assert_close(cache.positions[0], pos)
    # Truncation only moves the end: refilling reuses the buffers.
    cache.truncate(100)
    with torch.no_grad():
        again = ours(ours.embed(ids[:, 100:]), pos[100:], cache=cache)
    torch.testing.assert_close(again, full[:, 100:], atol=1e-4, rtol=0)
    assert cache.reallocations == 5 and len(cache) == n


def test_kv_cache_under_autograd_gives_the_uncached_gradients():
    from megacontext.base import KVCache

    ours = ours_from(hf_model("llama"))
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(12)

    def grads(cached: bool) -> torch.Tensor:
        emb = ours.embed(ids).clone().requires_grad_(True)
        if cached:
            cache = KVCache()
            parts = [ours(emb[:, :6], pos[:6], cache=cache)]
            parts += [ours(emb[:, i:i + 1], pos[i:i + 1], cache=cache) for i in range(6, 12)]
            logits = torch.cat(parts, dim=1)
        else:
            logits = ours(emb, pos)
        logits.logsumexp(-1).sum().backward()
        return emb.grad

    torch.testing.assert_close(grads(True), grads(False), atol=1e-4, rtol=1e-4)


# -- sliding-window attention ---------------------------------------------------------------------

@pytest.mark.parametrize("family,window_kw", [
    ("mistral", {"sliding_window": 8}),
    # Qwen2: only layers from max_window_layers on use the window.
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
])
def test_sliding_window_logits_match_transformers(family, window_kw):
    hf = hf_model(family, **window_kw)
    ours = ours_from(hf)
    assert ours.config.sliding_window == 8
    assert [ours.config.layer_window(i) for i in range(2)] == (
        [8, 8] if family == "mistral" else [None, 8])
    ids = torch.randint(0, TINY["vocab_size"], (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ours.embed(ids), torch.arange(40))
        unwindowed = BaseLM(dataclasses.replace(ours.config, sliding_window=None,
                                                layer_types=None))
        load_state(unwindowed, hf.state_dict())
        plain = unwindowed(ours.embed(ids), torch.arange(40))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(got[:, :8], plain[:, :8], atol=1e-5, rtol=0)  # within the window
    assert (got[:, 8:] - plain[:, 8:]).abs().max() > 1e-3  # beyond it the window matters


def test_sliding_window_through_the_cache_and_at_float_positions():
    from megacontext.base import KVCache

    hf = hf_model("mistral", sliding_window=8)
    ours = ours_from(hf)
    ids = torch.randint(0, TINY["vocab_size"], (2, 30), generator=torch.Generator().manual_seed(4))
    emb = ours.embed(ids)
    with torch.no_grad():
        for pos in (torch.arange(30) + 2**30, torch.arange(30, dtype=torch.float64) * 1.5):
            full = ours(emb, pos)
            torch.testing.assert_close(cached_in_pieces(ours, emb, pos, KVCache(), 10, 20), full,
                                       atol=1e-4, rtol=0)
    # The window is in positions: entries 1.5 apart see those less than 8 positions back.
    spread = torch.arange(30, dtype=torch.float64) * 1.5
    mask, causal = BaseLM._mask(spread, 0, 8, None)
    want = torch.tensor([[0 <= 1.5 * (i - j) < 8 for j in range(30)] for i in range(30)])
    assert not causal and torch.equal(mask, want) and mask[29].nonzero().flatten().tolist() == [
        24, 25, 26, 27, 28, 29]
    assert BaseLM._mask(torch.arange(8), 0, 8, None) == (None, True)  # within it: plain causal


def test_sliding_window_settings_are_checked():
    with pytest.raises(ValueError, match="sliding_window=0"):
        BaseConfig.from_hf(hf_model("mistral").config.to_dict() | {"sliding_window": 0})
    raw = {k: v for k, v in hf_model("qwen2").config.to_dict().items() if k != "layer_types"}
    cfg = BaseConfig.from_hf(raw | {"use_sliding_window": True, "sliding_window": 8,
                                    "max_window_layers": 1})  # layer_types as transformers
    assert cfg.layer_types == ("full_attention", "sliding_attention")
    assert BaseConfig.from_hf(cfg.to_hf()) == cfg  # round trip through config.json
    off = hf_model("qwen2").config.to_dict() | {"use_sliding_window": False, "sliding_window": 8}
    assert BaseConfig.from_hf(off).sliding_window is None  # transformers ignores it too


# -- GGUF RoPE scaling ----------------------------------------------------------------------------

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def llama_cpp_rope_freqs(theta: float, dim: int, factor: float, low: float, high: float,
                         old: int):
    """llama.cpp's convert_hf_to_gguf.py for Llama 3 (float32 tensors, as it computes them)."""
    import numpy as np

    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(float(1 / ((1 - smooth) / factor + smooth)))
    return np.array(out, dtype=np.float32)


def write_llama_gguf(path, hf, rope_freqs=None, metadata=(), extra_tensors=()):
    """A float32 llama GGUF of a transformers model, laid out as llama.cpp writes one."""
    from gguf import GGUFWriter

    cfg = hf.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    for key, value in dict(metadata).items():
        add = {str: writer.add_string, int: writer.add_uint32, float: writer.add_float32}
        add[type(value)](key, value)

    def permute(w, n):  # llama.cpp's Q/K row order
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    blocks = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for key, value in hf.state_dict().items():
        w = value.numpy().astype("float32")
        if key in names:
            writer.add_tensor(names[key], w)
            continue
        _, _, layer, *rest = key.split(".")
        module = ".".join(rest[:-1])
        if module == "self_attn.q_proj":
            w = permute(w, heads)
        elif module == "self_attn.k_proj":
            w = permute(w, kv_heads)
        writer.add_tensor(f"blk.{layer}.{blocks[module]}.{rest[-1]}", w)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    for name, w in extra_tensors:
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama3_hf():
    return hf_model("llama", rope_parameters=LLAMA3, head_dim=32, max_position_embeddings=256)


@pytest.mark.parametrize("source", ["rope_freqs", "metadata", "both"])
def test_gguf_llama3_scaling_is_read_and_matches_transformers(tmp_path, source):
    from megacontext.base.loading import read_gguf

    hf = llama3_hf()
    freqs = llama_cpp_rope_freqs(10000.0, 32, 8.0, 1.0, 4.0, 64)
    assert 1.0 < freqs[2] < freqs[4] < 8.0  # three divisors in the smooth band
    meta = {"llama.rope.scaling.type": "llama3", "llama.rope.scaling.factor": 8.0,
            "llama.rope.scaling.original_context_length": 64,
            "llama.rope.scaling.low_freq_factor": 1.0, "llama.rope.scaling.high_freq_factor": 4.0}
    path = write_llama_gguf(tmp_path / "llama3.gguf", hf,
                            rope_freqs=None if source == "metadata" else freqs,
                            metadata=() if source == "rope_freqs" else meta)
    config, state, _ = read_gguf(path)
    assert config.rope_scaling == LLAMA3
    assert config.rope == BaseConfig.from_hf(hf.config.to_dict()).rope
    ours = BaseLM(config)
    load_state(ours, state)
    ids = torch.randint(0, TINY["vocab_size"], (1, 80), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(ours.embed(ids), torch.arange(80)),
                                   hf(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_gguf_rope_scaling_that_cannot_be_represented_is_refused(tmp_path):
    import numpy as np

    from megacontext.base.loading import read_gguf

    hf = llama3_hf()
    odd = np.linspace(1.0, 3.0, 16, dtype=np.float32)[::-1].copy()  # decreasing: not llama3
    path = write_llama_gguf(tmp_path / "odd.gguf", hf, rope_freqs=odd)
    with pytest.raises(ValueError, match=r"odd\.gguf: rope_freqs.weight .* match no llama3"):
        read_gguf(path)
    freqs = llama_cpp_rope_freqs(10000.0, 32, 8.0, 1.0, 4.0, 64)
    path = write_llama_gguf(tmp_path / "clash.gguf", hf, rope_freqs=freqs, metadata={
        "llama.rope.scaling.type": "llama3", "llama.rope.scaling.factor": 8.0,
        "llama.rope.scaling.original_context_length": 64,
        "llama.rope.scaling.low_freq_factor": 1.0, "llama.rope.scaling.high_freq_factor": 2.0})
    with pytest.raises(ValueError, match=r"clash\.gguf: the llama3 scaling .* disagrees"):
        read_gguf(path)
    path = write_llama_gguf(tmp_path / "bare.gguf", hf, metadata={
        "llama.rope.scaling.type": "llama3", "llama.rope.scaling.factor": 8.0})
    with pytest.raises(ValueError, match=r"bare\.gguf: .*original_context_length.*no "
                                         r"rope_freqs.weight"):
        read_gguf(path)
    path = write_llama_gguf(tmp_path / "yarn.gguf", hf, rope_freqs=freqs, metadata={
        "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0})
    with pytest.raises(ValueError, match=r"yarn\.gguf: .*cannot be represented"):
        read_gguf(path)
    path = write_llama_gguf(tmp_path / "extra.gguf", hf,
                            extra_tensors=[("blk.0.attn_rot_embd", np.ones(4, np.float32))])
    with pytest.raises(ValueError, match=r"extra\.gguf: tensors \['blk.0.attn_rot_embd'\]"):
        read_gguf(path)
    # factors of one are no scaling at all
    path = write_llama_gguf(tmp_path / "ones.gguf", hf, rope_freqs=np.ones(16, np.float32))
    assert read_gguf(path)[0].rope_scaling is None


def test_llama3_parameters_are_recovered_from_llama_3_1_rope_freqs():
    """Llama 3.1 8B's own settings (head_dim 128, theta 500000, factor 8, 8192 / 1 / 4)."""
    from megacontext.base.loading import llama3_from_rope_freqs

    freqs = llama_cpp_rope_freqs(500000.0, 128, 8.0, 1.0, 4.0, 8192)
    got = llama3_from_rope_freqs(freqs, 128, 500000.0)
    assert got == {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192,
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    for factor in (32.0, 16.0):  # Llama 3.2's factor 32; another band
        freqs = llama_cpp_rope_freqs(500000.0, 64, factor, 1.0, 4.0, 8192)
        assert llama3_from_rope_freqs(freqs, 64, 500000.0)["factor"] == factor


def test_gguf_sliding_window_makes_a_mistral(tmp_path):
    from megacontext.base.loading import read_gguf

    hf = hf_model("mistral", sliding_window=8)
    path = write_llama_gguf(tmp_path / "mistral.gguf", hf,
                            metadata={"llama.attention.sliding_window": 8})
    config, state, _ = read_gguf(path)
    assert (config.family, config.sliding_window, config.layer_types) == ("mistral", 8, None)
    assert BaseConfig.from_hf(config.to_hf()) == config  # what the conversion cache stores
    ours = BaseLM(config)
    load_state(ours, state)
    ids = torch.randint(0, TINY["vocab_size"], (2, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours(ours.embed(ids), torch.arange(30)),
                                   hf(input_ids=ids).logits, atol=1e-4, rtol=0)
