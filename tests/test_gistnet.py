import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from megacontext.gistnet import (
    ConstantGist,
    GistNet,
    GistNetConfig,
    MeanPoolGist,
    flops_per_child,
    gistnet_digest,
    load_gistnet,
    save_gistnet,
    untrained_levels,
    with_levels,
)

C = 32  # hidden size
FP = {"name": "tiny-llama", "hidden_size": C, "vocab_size": 100}


def make(seed: int = 0, **kw) -> GistNet:
    torch.manual_seed(seed)
    cfg = GistNetConfig(hidden_size=C, width=16, num_layers=2, num_heads=4, **kw)
    return GistNet(cfg, init_output=torch.randn(C)).eval()


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 1, scale: float = 0.2) -> torch.nn.Module:
    """Move every parameter away from its initialisation so outputs depend on inputs."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def spans(*lead: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(*lead, 32, C, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("share_levels", [False, True])
def test_untrained_output_is_the_prior_then_learns(share_levels):
    model = make(share_levels=share_levels)
    prior = model.cores[0].up.bias.detach().clone()
    for level in (1, 2):
        out = model(spans(3, 5), level)
        assert torch.equal(out, prior.expand(3, 5, C))

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = spans(4, 8)
    loss = (model(x, 1) - x.sum(dim=-2)).square().mean()  # a toy loss that needs the input
    loss.backward()
    opt.step()
    with torch.no_grad():
        a, b = model(spans(2, seed=3), 1), model(spans(2, seed=4), 1)
    assert (a - b).abs().max() > 1e-4


def test_gate_adds_the_children_mean():
    model = make()
    prior = model.cores[0].up.bias.detach().clone()
    with torch.no_grad():
        model.gate.copy_(torch.tensor([0.5, -2.0]))
    x = spans(6)
    assert_close(model(x, 1), prior + 0.5 * x.mean(dim=-2))
    assert_close(model(x, 2), prior - 2.0 * x.mean(dim=-2))


def test_rescale_output_to_target_norm():
    torch.manual_seed(0)
    cfg = GistNetConfig(hidden_size=C, width=16, rescale_output=True)
    prior = torch.randn(C)
    with pytest.raises(ValueError, match="target_norm"):
        GistNet(cfg, init_output=prior)(spans(2), 1)
    model = GistNet(cfg, init_output=prior, target_norm=3.0)
    assert_close(model(spans(2), 1), (3.0 * prior / prior.norm()).expand(2, C))
    perturb(model)
    assert_close(model(spans(5), 2).norm(dim=-1), torch.full((5,), 3.0))


def test_bidirectional_and_offsets_matter():
    model = perturb(make())
    x = spans(4)
    y = x.clone()
    y[:, -1] += 1.0  # change only the LAST child
    encoded = []
    hook = model.cores[0].norm_out.register_forward_hook(lambda m, i, o: encoded.append(o))
    with torch.no_grad():
        gx, gy = model(x, 1), model(y, 1)
    hook.remove()
    assert (gx - gy).abs().min() > 1e-5
    # A causal mask would leave the first child's encoding untouched by the last child.
    assert (encoded[0][:, 0] - encoded[1][:, 0]).abs().max() > 1e-4

    with torch.no_grad():  # same children, other order: offsets must make a difference
        g_rev = model(x.flip(dims=[1]), 1)
    assert (gx - g_rev).abs().min() > 1e-5


def test_chunking_independence_and_determinism():
    model = perturb(make())
    x = spans(64, seed=5).reshape(64 * 32, C)
    with torch.inference_mode():
        whole = model.compress(x, 1)
        parts = torch.cat([model.compress(x[i : i + 8 * 32], 1) for i in range(0, 64 * 32, 256)])
        again = model.compress(x, 1)
        model.chunk_spans = 5  # the internal batching must not matter either
        inner = model.compress(x, 1)
        batched = model.compress(x.reshape(4, 16 * 32, C), 1)
    assert whole.shape == (64, C)
    assert_close(parts, whole, atol=1e-6, rtol=1e-6)
    assert torch.equal(again, whole)
    assert_close(inner, whole, atol=1e-6, rtol=1e-6)
    assert_close(batched.reshape(64, C), whole, atol=1e-6, rtol=1e-6)


def test_compress_matches_forward_and_checks_n():
    model = perturb(make())
    x = spans(3, 2, seed=6).reshape(3, 2 * 32, C)
    assert_close(model.compress(x, 2), model(x.reshape(3, 2, 32, C), 2))
    with pytest.raises(ValueError, match="n=65"):
        model.compress(torch.randn(65, C), 1)
    with pytest.raises(ValueError, match=r"\[\.\.\., 32, 32\]"):
        model(torch.randn(2, 16, C), 1)
    with pytest.raises(ValueError, match="level=3"):
        model(spans(1), 3)


@pytest.mark.parametrize("share_levels", [False, True])
def test_levels_differ(share_levels):
    model = perturb(make(share_levels=share_levels))
    x = spans(5)
    with torch.no_grad():
        model.gate.zero_()  # the difference must come from the per-level weights or tables
        assert (model(x, 1) - model(x, 2)).abs().min() > 1e-5


def test_save_load_round_trip_and_digest(tmp_path):
    model = perturb(make())
    save_gistnet(model, tmp_path / "ck", FP)
    meta = json.loads((tmp_path / "ck" / "gistnet.json").read_text())
    assert meta["base_fingerprint"] == FP and meta["config"]["width"] == 16
    loaded = load_gistnet(tmp_path / "ck", expect_fingerprint=FP)
    x = spans(7)
    with torch.no_grad():
        assert torch.equal(loaded(x, 1), model(x, 1))
        assert torch.equal(loaded(x, 2), model(x, 2))
    digest = gistnet_digest(model)
    assert gistnet_digest(loaded) == digest == meta["digest"]
    with torch.no_grad():
        loaded.cores[1].blocks[0].fc1.weight[0, 0] += 1e-3
    assert gistnet_digest(loaded) != digest
    assert gistnet_digest(make(share_levels=True)) != gistnet_digest(make())


def test_load_errors(tmp_path):
    model = perturb(make())
    d = save_gistnet(model, tmp_path / "ck", FP)
    with pytest.raises(ValueError, match=r"vocab_size 100, this model has 200") as e:
        load_gistnet(d, expect_fingerprint={**FP, "vocab_size": 200, "name": "other"})
    assert "name 'tiny-llama', this model has 'other'" in str(e.value)
    with pytest.raises(ValueError, match="hidden_size 32, this model has 64"):
        load_gistnet(d, expect_fingerprint={"hidden_size": 64})
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_gistnet(tmp_path / "nowhere")

    tensors = load_file(str(d / "gistnet.safetensors"))
    good = dict(tensors)
    tensors["cores.0.down.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(d / "gistnet.safetensors"))
    with pytest.raises(ValueError, match=r"cores\.0\.down\.weight: \(3, 3\), expected \(16, 32\)"):
        load_gistnet(d)
    save_file({**good, "stray": torch.zeros(1)}, str(d / "gistnet.safetensors"))
    with pytest.raises(ValueError, match="extra \\['stray'\\]"):
        load_gistnet(d)
    del good["gate"]
    save_file(good, str(d / "gistnet.safetensors"))
    with pytest.raises(ValueError, match="missing \\['gate'\\]"):
        load_gistnet(d)
    save_file({**good, "gate": torch.ones(2)}, str(d / "gistnet.safetensors"))
    with pytest.raises(ValueError, match="digest"):
        load_gistnet(d)
    (d / "gistnet.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="gistnet.safetensors"):
        load_gistnet(d)
    with pytest.raises(ValueError, match="hidden_size 64 != GistNet hidden_size 32"):
        save_gistnet(model, tmp_path / "x", {"hidden_size": 64})


def test_config_validation_names_every_problem():
    with pytest.raises(ValueError) as e:
        GistNetConfig(hidden_size=32, width=30, num_heads=4, span=16, levels=0, mlp_ratio=True)
    msg = str(e.value)
    for part in ("width=30 is not divisible by num_heads=4", "span=16", "levels=0",
                 "mlp_ratio=True"):
        assert part in msg
    assert GistNetConfig(hidden_size=32, span=16, allow_any_span=True).span == 16
    with pytest.raises(ValueError, match="hidden_size=0"):
        GistNetConfig(hidden_size=0)


def test_mean_pool_gist():
    x = spans(3, 4)
    explicit = torch.stack([x[..., i, :] for i in range(32)]).sum(dim=0) / 32
    assert_close(MeanPoolGist()(x, 1), explicit)
    assert_close(MeanPoolGist().compress(x.reshape(3, 4 * 32, C), 2), explicit)
    rescaled = MeanPoolGist(target_norm=2.5)(x, 1)
    assert_close(rescaled, 2.5 * explicit / explicit.norm(dim=-1, keepdim=True))
    with pytest.raises(ValueError, match="n=33"):
        MeanPoolGist().compress(torch.randn(33, C), 1)


@pytest.mark.parametrize("layers", [0, 1, 2])
def test_flops_per_child_matches_torch_flop_counter(layers):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = GistNetConfig(hidden_size=96, width=32, num_layers=layers, num_heads=4, mlp_ratio=3)
    model = GistNet(cfg)
    # The counter skips the CPU flash-attention kernel; the math backend is plain bmm's.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 3, 32, 96), 1)
    assert flops_per_child(cfg) == pytest.approx(counter.get_total_flops() / (2 * 3 * 32))


UNTRAINED = {"trained": False, "steps": 0, "windows": 0}


def test_training_record_round_trip_and_untrained_levels(tmp_path):
    model = perturb(make(levels=3))
    assert model.training_record == {1: UNTRAINED, 2: UNTRAINED, 3: UNTRAINED}
    assert untrained_levels(model, [1, 2, 3]) == [1, 2, 3]
    digest = gistnet_digest(model)
    model.training_record[1] = {"trained": True, "steps": 300, "windows": 1200}
    model.training_record[3] = {"trained": True, "steps": 7, "windows": 28}
    assert gistnet_digest(model) == digest  # bookkeeping, not weights
    save_gistnet(model, tmp_path / "ck", FP)
    meta = json.loads((tmp_path / "ck" / "gistnet.json").read_text())
    assert meta["training"] == {"1": {"trained": True, "steps": 300, "windows": 1200},
                                "2": {"trained": False, "steps": 0, "windows": 0},
                                "3": {"trained": True, "steps": 7, "windows": 28}}
    assert meta["digest"] == digest
    loaded = load_gistnet(tmp_path / "ck")
    assert loaded.training_record == model.training_record
    assert untrained_levels(loaded, [1, 2, 3]) == [2]
    assert untrained_levels(loaded, (3, 2, 1, 2)) == [2]  # given order, no repeats
    assert untrained_levels(loaded, [1, 3]) == []
    with pytest.raises(ValueError, match="level=4"):
        untrained_levels(loaded, [1, 4])
    # baselines have nothing to train, at any level
    assert untrained_levels(MeanPoolGist(), [1, 2, 5]) == []
    assert untrained_levels(ConstantGist(torch.randn(C)), [1, 2]) == []
    with pytest.raises(TypeError, match="Linear"):
        untrained_levels(torch.nn.Linear(2, 2), [1])


def test_export_without_a_record_loads_as_untrained(tmp_path):
    """Exports written before the record existed: every level untrained, counts unknown."""
    model = perturb(make())
    model.training_record[1] = {"trained": True, "steps": 5, "windows": 20}
    d = save_gistnet(model, tmp_path / "ck", FP)
    meta = json.loads((d / "gistnet.json").read_text())
    del meta["training"]
    (d / "gistnet.json").write_text(json.dumps(meta))
    loaded = load_gistnet(d)
    assert loaded.training_record == {k: {"trained": False, "steps": None, "windows": None}
                                      for k in (1, 2)}
    assert untrained_levels(loaded, [1, 2]) == [1, 2]
    assert gistnet_digest(loaded) == gistnet_digest(model)  # the weights are the same
    # a record without counts round-trips as such, and so does a GistNet without a record
    save_gistnet(loaded, tmp_path / "again", FP)
    assert load_gistnet(tmp_path / "again").training_record == loaded.training_record
    del model.training_record  # e.g. unpickled from before the record existed
    save_gistnet(model, tmp_path / "none", FP)
    assert load_gistnet(tmp_path / "none").training_record == loaded.training_record


@pytest.mark.parametrize("record, named", [
    ({"1": {"trained": True, "steps": 3, "windows": 6}}, r"levels \[1\] \(expected 1\.\.2\)"),
    ({"1": {"trained": "yes", "steps": 3, "windows": 6},
      "2": {"trained": False, "steps": 0, "windows": 0}}, "level 1"),
    ({"1": {"trained": True, "steps": 0, "windows": 0},
      "2": {"trained": False, "steps": 0, "windows": 0}}, "trained needs steps >= 1"),
    ({"1": {"trained": False, "steps": -1, "windows": 0},
      "2": {"trained": False, "steps": 0, "windows": 0}}, "level 1"),
    ({"x": {"trained": False, "steps": 0, "windows": 0},
      "2": {"trained": False, "steps": 0, "windows": 0}}, "level key 'x'"),
])
def test_bad_training_records_are_refused(tmp_path, record, named):
    model = make()
    d = save_gistnet(model, tmp_path / "ck", FP)
    meta = json.loads((d / "gistnet.json").read_text())
    (d / "gistnet.json").write_text(json.dumps({**meta, "training": record}))
    with pytest.raises(ValueError, match="bad training record: .*" + named):
        load_gistnet(d)
    model.training_record = {int(k): v for k, v in record.items() if k.isdigit()}
    with pytest.raises(ValueError, match="bad training record"):
        save_gistnet(model, tmp_path / "out", FP)


def test_with_levels_keeps_trained_levels_and_adds_untrained_ones(tmp_path):
    model = perturb(make(levels=2))
    model.training_record = {1: {"trained": True, "steps": 5, "windows": 20},
                             2: {"trained": False, "steps": 0, "windows": 0}}
    prior = torch.randn(C)
    deep = with_levels(model, 4, prior)
    assert deep.cfg.levels == 4 and untrained_levels(deep, [1, 2, 3, 4]) == [2, 3, 4]
    x = spans(3, seed=5)
    for level in (1, 2):  # the old levels compute exactly what they did
        assert torch.equal(deep(x, level), model(x, level))
    for level in (3, 4):  # the added ones emit the prior whatever they read
        assert torch.equal(deep(x, level), prior.expand(3, C))
    assert deep.training_record[1] == {"trained": True, "steps": 5, "windows": 20}
    assert deep.extended_from == gistnet_digest(model) != gistnet_digest(deep)
    # a fixed init: the same extension has the same digest (a resumed build checks it)
    assert gistnet_digest(with_levels(model, 4, prior)) == gistnet_digest(deep)
    back = load_gistnet(save_gistnet(deep, tmp_path / "g", FP), expect_fingerprint=FP)
    assert untrained_levels(back, [1, 2, 3, 4]) == [2, 3, 4]
    with pytest.raises(ValueError, match="serves 2 levels, asked for 1"):
        with_levels(model, 1, prior)
    with pytest.raises(ValueError, match="share_levels"):
        with_levels(make(share_levels=True), 3, prior)


@pytest.mark.parametrize("rescale", [False, True])
def test_from_ids_equals_the_embedding_path_to_float_rounding(rescale):
    """Ingest's level 1 (down-projection looked up per id) against forward on embeddings:
    the same sums in another order, so equal to float32 rounding, and float16 gists within
    one ulp. Contextual GistNets (hidden-state inputs) have no token table."""
    torch.manual_seed(3)
    vocab = 50
    embedding = torch.randn(vocab, C)
    model = perturb(make(rescale_output=rescale))
    if rescale:
        model.target_norm.fill_(2.0)
    with torch.no_grad():
        model.gate.fill_(0.3)
        ids = torch.randint(0, vocab, (7, 32))
        table = model.token_table(embedding)
        assert table.shape == (vocab, model.cfg.width)
        got, want = model.from_ids(ids, embedding, table), model(embedding[ids], 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got.half().float() - want.half().float()).abs().max() <= 2e-3 * want.abs().max()
    with pytest.raises(ValueError, match=r"\[B, 32\] ids"):
        model.from_ids(ids[:, :16], embedding, table)
    contextual = GistNet(GistNetConfig(hidden_size=C, width=16, num_heads=4, input_layer=2))
    assert contextual.token_table(embedding) is None


def test_anchored_gist_starts_as_its_first_child_and_learns_which_to_mix():
    """``anchor=True``: untrained, the gist is ~99% the first child (softmax of 8·one-hot)
    whatever the output prior; the mix weights follow the children's content once learned."""
    model = make(anchor=True)
    x = spans(3, 5)
    with torch.no_grad():
        out = model(x, 1)
    weights = torch.full((32,), 1.0).index_fill(0, torch.tensor([0]), torch.e ** 8)
    weights = weights / weights.sum()  # exactly what ANCHOR_SCALE · one-hot gives
    assert_close(out, torch.einsum("s,bgsc->bgc", weights, x), rtol=1e-5, atol=1e-6)
    assert (out - x[..., 0, :]).norm() / x[..., 0, :].norm() < 0.05
    with torch.no_grad():  # a content score moves the mix: another child can win
        model.cores[0].anchor_query.normal_(generator=torch.Generator().manual_seed(5))
        model.cores[0].anchor_query.mul_(20.0)
        moved = model(x, 1)
    assert (moved - out).abs().max() > 1e-2
    assert model.variant == "light-anchor w16x2" and model.config_dict()["anchor"] is True
    assert "anchor" not in make().config_dict()  # off: the light export (and digest) as before


def test_anchor_is_refused_with_contextual_inputs():
    with pytest.raises(ValueError, match="anchor=True with input_layer"):
        GistNetConfig(hidden_size=C, anchor=True, input_layer=2)
    with pytest.raises(ValueError, match="anchor=1"):
        GistNetConfig(hidden_size=C, anchor=1)


def test_anchored_export_round_trip_and_from_ids(tmp_path):
    torch.manual_seed(3)
    embedding = torch.randn(50, C)
    model = perturb(make(anchor=True))
    save_gistnet(model, tmp_path / "ck", FP)
    loaded = load_gistnet(tmp_path / "ck", expect_fingerprint=FP)
    assert loaded.cfg.anchor and gistnet_digest(loaded) == gistnet_digest(model)
    ids = torch.randint(0, 50, (7, 32))
    with torch.no_grad():
        for level in (1, 2):
            assert torch.equal(loaded(embedding[ids], level), model(embedding[ids], level))
        got = loaded.from_ids(ids, embedding, loaded.token_table(embedding))
    assert_close(got, model(embedding[ids], 1).detach(), rtol=1e-5, atol=1e-6)
