"""The base runtime against transformers' own implementations, on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

from megacontext.base import BaseConfig, BaseLM
from megacontext.base.loading import load_base_lm, load_state, unpermute_qk
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
    config = config_cls(**(TINY | overrides), **extra, tie_word_embeddings=tie,
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
        parts = [ours(emb[:, :25], pos[:25], cache=cache)]
        parts += [ours(emb[:, i:i + 1], pos[i:i + 1], cache=cache) for i in range(25, 30)]
        parts.append(ours(emb[:, 30:], pos[30:], cache=cache))
        torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=0)
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
