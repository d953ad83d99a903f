"""The gist lane: adapters that fire only at gist rows, the raw path exactly the frozen model."""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import pytest
import torch

from megacontext.allocator import FocusAllocator
from megacontext.base import BaseLM
from megacontext.gistnet import (
    GistLane,
    GistNet,
    GistNetConfig,
    LaneConfig,
    gistnet_digest,
    lane_of,
    load_gistnet,
    save_gistnet,
)
from megacontext.runtime import MemoryLM
from megacontext.substitution import Window, gist_rows, score_window
from megacontext.training.train import train
from megacontext.tree import MegaContextTree
from tests.test_training import smoke  # the smoke experiment's config


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return BaseLM.load(str(tiny_model_dir))


def make_lane(lm, seed: int = 0, scale: float = 0.3, **settings) -> GistLane:
    """A lane whose B is not zero (an untrained lane is exactly no lane)."""
    torch.manual_seed(seed)
    lane = GistLane(LaneConfig.for_base(lm.config, **settings))
    with torch.no_grad():
        for p in lane.up.values():
            p.normal_(0.0, scale)
    return lane


def make_gistnet(lm, lane: GistLane | None = None, seed: int = 0) -> GistNet:
    torch.manual_seed(seed)
    net = GistNet(GistNetConfig(hidden_size=lm.config.hidden_size, width=16, levels=2))
    net.set_output_prior(lm.model.embed_tokens.weight.mean(0))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net.attach_lane(lane).eval()


def test_lane_config_refuses_bad_values_naming_them(lm):
    with pytest.raises(ValueError, match=r"rank=0"):
        LaneConfig.for_base(lm.config, rank=0)
    with pytest.raises(ValueError, match=r"targets=\['q', 'x'\]"):
        LaneConfig.for_base(lm.config, targets=["q", "x"])
    with pytest.raises(ValueError, match=r"layers=\[5\]"):
        LaneConfig.for_base(lm.config, layers=[5])
    with pytest.raises(ValueError, match="dropout=1.5"):
        LaneConfig.for_base(lm.config, dropout=1.5)
    cfg = LaneConfig.for_base(lm.config, layers="last_half")
    assert cfg.layer_indices() == [1]  # two layers


def test_no_gist_rows_is_bit_identical_to_no_lane(lm):
    lane = make_lane(lm)
    x = lm.embed(torch.tensor([list(range(3, 40))]))
    pos = torch.arange(37)
    plain = lm(x, pos)
    assert lane.at(torch.zeros(37, dtype=torch.bool)) is None  # nothing to adapt
    assert lane.at(None) is None
    assert torch.equal(lm(x, pos, lane=lane.at(torch.zeros(37, dtype=torch.bool))), plain)


def test_an_untrained_lane_is_exactly_no_lane(lm):
    lane = GistLane(LaneConfig.for_base(lm.config))  # B = 0
    x = lm.embed(torch.tensor([list(range(3, 40))]))
    rows = torch.arange(37) % 3 == 0
    assert torch.equal(lm(x, torch.arange(37), lane=lane.at(rows)), lm(x, torch.arange(37)))


def test_gist_rows_change_and_raw_rows_own_projections_do_not(lm):
    lane = make_lane(lm)
    torch.manual_seed(1)
    x = torch.randn(2, 9, lm.config.hidden_size)
    rows = torch.tensor([False, True, False, True, True, False, False, True, False])
    bound = lane.at(rows)
    proj = lm.model.layers[0].self_attn.q_proj
    y = proj(x)
    out = bound.adapt(0, "q", x, y)
    assert torch.equal(out[:, ~rows], y[:, ~rows])  # raw rows: the frozen projection itself
    assert not torch.isclose(out[:, rows], y[:, rows]).any()

    # In the model: entries before the first gist never see it (causal): bit-identical; the
    # gist rows and the raw rows after them (which attend to its adapted keys/values) change.
    ids = torch.tensor([list(range(3, 35))])
    e = lm.embed(ids)
    rows = torch.zeros(32, dtype=torch.bool)
    rows[[10, 11, 20]] = True
    plain, laned = lm(e, torch.arange(32)), lm(e, torch.arange(32), lane=lane.at(rows))
    assert torch.equal(laned[:, :10], plain[:, :10])
    assert (laned[:, 10:] - plain[:, 10:]).abs().amax(-1).min() > 1e-4


def test_the_in_place_read_equals_the_autograd_read(lm):
    """Without autograd the update goes into the projection's output in place; with it, out of
    place. Same values, and the in-place read leaves the raw rows of ``y`` as they were."""
    lane = make_lane(lm)
    e = lm.embed(torch.tensor([list(range(3, 35))]))
    rows = torch.arange(32) % 4 == 1
    with_grad = lm(e, torch.arange(32), lane=lane.at(rows))
    assert with_grad.requires_grad
    with torch.inference_mode():
        in_place = lm(e, torch.arange(32), lane=lane.at(rows))
    torch.testing.assert_close(in_place, with_grad.detach(), atol=1e-5, rtol=1e-5)
    x = torch.randn(1, 32, lm.config.hidden_size)
    proj = lm.model.layers[0].self_attn.k_proj
    with torch.no_grad():
        y = proj(x)
        frozen = y.clone()
        out = lane.at(rows).adapt(0, "k", x, y)
    assert torch.equal(out[:, ~rows], frozen[:, ~rows])
    assert not torch.isclose(out[:, rows], frozen[:, rows]).any()


def merged_model(lm, lane: GistLane) -> BaseLM:
    """The frozen model with every adapted weight replaced by ``W + s·B·A`` (explicit)."""
    merged = copy.deepcopy(lm)
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
             "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
             "down": "mlp.down_proj"}
    with torch.no_grad():
        for key in lane.down:
            layer, target = key.split("_")
            linear = merged.model.layers[int(layer)].get_submodule(names[target])
            linear.weight += lane.scale * lane.up[key] @ lane.down[key]
    return merged


@pytest.mark.parametrize("targets", [["q", "k", "v", "o"], ["q", "v", "gate", "up", "down"]])
def test_all_gist_rows_equal_the_merged_weights_model(lm, targets):
    """A context of gists only, read through the lane, is the model whose weights are
    W + s·B·A: the low-rank update written out as a weight matrix."""
    lane = make_lane(lm, targets=targets)
    e = lm.embed(torch.tensor([list(range(5, 29))]))
    rows = torch.ones(24, dtype=torch.bool)
    laned, merged = lm(e, torch.arange(24), lane=lane.at(rows)), merged_model(lm, lane)(
        e, torch.arange(24))
    torch.testing.assert_close(laned, merged, atol=2e-4, rtol=1e-4)  # float32 sum order
    assert (lm(e, torch.arange(24)) - merged).abs().max() > 0.1  # the lane matters here


def test_gradient_reaches_only_the_lane_and_gistnet(lm):
    net = make_gistnet(lm, make_lane(lm)).train()
    ids = torch.randint(3, 200, (2, 4 * 32 + 8 + 8))
    window = Window(level=1, num_gists=4, tail=8, horizon=8)
    loss = score_window(lm, ids, window, "gist", compressor=net)
    loss.backward()
    assert all(p.grad is None for p in lm.parameters())
    last = lm.config.num_hidden_layers - 1
    for key, b in net.lane.up.items():
        a, moved = net.lane.down[key], b.grad is not None and bool(b.grad.abs().sum() > 0)
        # The last layer's gist-row query and output reach only the gist rows' own outputs,
        # which nothing reads: no gradient (and rank·(i + o) parameters that cannot learn).
        assert moved == (key not in (f"{last}_q", f"{last}_o")), key
        assert a.grad is not None and (a.grad.abs().sum() > 0) == moved, key
    others = [p for n, p in net.named_parameters() if not n.startswith("lane.")]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in others)


def test_the_gist_condition_reads_through_the_compressors_lane(lm):
    ids = torch.randint(3, 200, (2, 4 * 32 + 16))
    window = Window(level=1, num_gists=4, tail=8, horizon=8)
    plain_net = make_gistnet(lm)
    laned = make_gistnet(lm, make_lane(lm))
    assert lane_of(laned) is laned.lane and lane_of(plain_net) is None
    with torch.no_grad():
        a = score_window(lm, ids, window, "gist", compressor=plain_net, reduction="none")
        b = score_window(lm, ids, window, "gist", compressor=laned, reduction="none")
        c = score_window(lm, ids, window, "gist", compressor=laned, reduction="none", lane=None)
    assert torch.equal(a, c)  # lane=None: the gists read by the frozen model
    assert not torch.allclose(a, b)
    assert gist_rows(window).tolist() == [True] * 4 + [False] * 16


# Written by the GistNet code before the lane existed (same seed, same config): an export
# without a lane is the same bytes, and its digest the same, as it always was.
GOLDEN_DIGEST = "6071955bdbb5fe9acc776b182244340a1a42e93f3ca04684f244cc081306aaf0"
GOLDEN_WEIGHTS = "d201f6dd43cc2aa9ca1b9ca36427f4cdd83bdec113e430111e90d50771f52bcb"
GOLDEN_META = "50c224528ee4d4873ff55328fb7c401963cb795a4d72f70494cfad832267901c"


def test_an_export_without_a_lane_is_byte_for_byte_what_it_was(tmp_path):
    torch.manual_seed(0)
    m = GistNet(GistNetConfig(hidden_size=32, levels=2), init_output=torch.linspace(-1, 1, 32),
                target_norm=2.0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_gistnet(m, tmp_path, {"name": "tiny"})
    sha = {f: hashlib.sha256((tmp_path / f).read_bytes()).hexdigest()
           for f in ("gistnet.safetensors", "gistnet.json")}
    assert gistnet_digest(m) == GOLDEN_DIGEST
    assert sha == {"gistnet.safetensors": GOLDEN_WEIGHTS, "gistnet.json": GOLDEN_META}


def test_export_round_trip_keeps_the_lane_under_the_digest(lm, tmp_path):
    net = make_gistnet(lm, make_lane(lm, rank=4, targets=["q", "v"], layers=[1]))
    save_gistnet(net, tmp_path / "x", lm.fingerprint)
    meta = json.loads((tmp_path / "x" / "gistnet.json").read_text())
    assert meta["config"]["lane"]["rank"] == 4 and meta["config"]["lane"]["layers"] == [1]
    loaded = load_gistnet(tmp_path / "x", expect_fingerprint=lm.fingerprint)
    assert gistnet_digest(loaded) == gistnet_digest(net) == meta["digest"]
    assert loaded.lane.cfg == net.lane.cfg
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # the digest covers the lane: another lane, another digest
    other = make_gistnet(lm, make_lane(lm, seed=5, rank=4, targets=["q", "v"], layers=[1]))
    assert gistnet_digest(other) != gistnet_digest(net)
    assert gistnet_digest(make_gistnet(lm)) != gistnet_digest(net)
    # a lane that does not fit the recorded shape is refused with the file named
    meta["config"]["lane"]["rank"] = 0
    (tmp_path / "x" / "gistnet.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"gistnet.json: bad gist lane .*rank=0"):
        load_gistnet(tmp_path / "x")


def test_a_tree_built_with_one_lane_refuses_another_naming_both_digests(lm, tmp_path):
    net = make_gistnet(lm, make_lane(lm, seed=1))
    other = make_gistnet(lm, make_lane(lm, seed=2))
    MegaContextTree.create(tmp_path / "t", hidden_size=lm.config.hidden_size,
                           vocab_size=lm.config.vocab_size, rope=lm.config.rope,
                           fingerprint=lm.fingerprint, levels=2,
                           gistnet_digest=gistnet_digest(net)).close()
    with MegaContextTree.open(tmp_path / "t", expect_gistnet_digest=gistnet_digest(net)):
        pass
    with pytest.raises(ValueError, match=(f"gistnet_digest '{gistnet_digest(net)}', this "
                                          f"GistNet has '{gistnet_digest(other)}'")):
        MegaContextTree.open(tmp_path / "t", expect_gistnet_digest=gistnet_digest(other))


TEXT = "".join(f"item {i}: the {('red', 'blue', 'green')[i % 3]} box holds {i * 37 % 101} "
               f"marbles.\n" for i in range(120))


def test_memory_reads_gists_through_the_lane_and_reuses_its_kv_cache(lm):
    ids = lm.tokenizer.encode(TEXT[:2400])
    memory, continuation = ids[:2000], ids[2000:2100]
    laned, plain = make_gistnet(lm, make_lane(lm)), make_gistnet(lm)

    def score(net, use_cache):
        with MemoryLM(lm, net, FocusAllocator(budget=256, tail_tokens=64),
                      refocus_every=16, use_cache=use_cache) as mem:
            mem.feed(memory)
            nll = mem.score(continuation)
            assert (mem.context.levels > 0).any()  # gists in the context
            return nll, dict(mem.stats)

    cached, stats = score(laned, True)
    fresh, _ = score(laned, False)
    torch.testing.assert_close(cached, fresh, atol=1e-4, rtol=1e-5)
    assert stats["entries_reused"] > 0
    without, _ = score(plain, True)
    assert not torch.allclose(cached, without, atol=1e-3)


def test_a_lane_lowers_the_training_loss_below_gistnet_alone(lm):
    """Equal steps, equal windows, equal seeds: GistNet + lane fits better than GistNet alone."""
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (8, 6 * 32 + 8 + 16))
    window = Window(level=1, num_gists=6, tail=8, horizon=16)

    def fit(lane: bool) -> float:
        net = make_gistnet(lm, GistLane(LaneConfig.for_base(lm.config, rank=4)) if lane
                           else None, seed=3).train()
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        for _ in range(40):
            opt.zero_grad()
            score_window(lm, ids, window, "gist", compressor=net).backward()
            opt.step()
        with torch.no_grad():
            return float(score_window(lm, ids, window, "gist", compressor=net.eval()))

    alone, with_lane = fit(False), fit(True)
    assert np.isfinite(alone) and with_lane < alone - 0.02


def test_training_with_a_lane_exports_it_and_gives_it_its_own_rate(tmp_path):
    lane = "module.lane={rank: 4, alpha: 8, targets: [q, k, v, o], layers: all}"
    _, objects = train(smoke(tmp_path / "a", lane, "module.lane_lr=0.01",
                             "module.lane_weight_decay=0.0"))
    module = objects["module"]
    groups = objects["trainer"].optimizers[0].param_groups
    lane_ids = {id(p) for p in module.gistnet.lane.parameters()}
    (group,) = [g for g in groups if {id(p) for p in g["params"]} == lane_ids]
    assert group["initial_lr"] == 0.01 and group["weight_decay"] == 0.0
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in
                                                            module.gistnet.parameters()}
    assert any(b.abs().sum() > 0 for b in module.gistnet.lane.up.values())  # it trained
    export = load_gistnet(objects["export_dir"])
    assert export.lane.cfg.rank == 4 and gistnet_digest(export) == gistnet_digest(module.gistnet)

    # a lane added to an export that has none: GistNet starts from the export, the lane at 0
    train(smoke(tmp_path / "b", "data.window.l2_share=0.0"))
    cfg = smoke(tmp_path / "c", f"init_from={tmp_path / 'b' / 'gistnet'}", lane,
                "trainer.max_steps=1")
    _, objects = train(cfg)
    assert objects["module"].gistnet.lane.cfg.rank == 4
    # and an export's own lane goes on training when started from (module.lane ignored)
    cfg = smoke(tmp_path / "d", f"init_from={tmp_path / 'a' / 'gistnet'}", "trainer.max_steps=1")
    _, objects = train(cfg)
    assert objects["module"].gistnet.lane.cfg.alpha == 8
