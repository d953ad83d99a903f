"""The memory runtime loop: exactness, KV-cache reuse, relative distances end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megacontext.allocator import FocusAllocator
from megacontext.base import BaseLM
from megacontext.gistnet import GistNet, GistNetConfig
from megacontext.rope import RopeConfig
from megacontext.runtime import MemoryLM
from megacontext.working_context import materialize

TEXT = "".join(f"item {i}: the {('red', 'blue', 'green')[i % 3]} box holds {i * 37 % 101} "
               f"marbles.\n" for i in range(200))


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return BaseLM.load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def gistnet(lm):
    torch.manual_seed(0)
    net = GistNet(GistNetConfig(hidden_size=lm.config.hidden_size, width=16, levels=2))
    net.set_output_prior(lm.model.embed_tokens.weight.mean(0))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net.eval()


def full_context_nll(lm, ids: list[int], start: int) -> torch.Tensor:
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = lm(lm.embed(x), torch.arange(len(ids)))[0]
    return F.cross_entropy(logits[start - 1:-1], x[0, start:], reduction="none")


def test_budget_covering_everything_is_exactly_the_base_model(lm, gistnet):
    ids = lm.tokenizer.encode(TEXT[:1500])
    memory, continuation = ids[:1200], ids[1200:1300]
    with MemoryLM(lm, gistnet, FocusAllocator(budget=4096, tail_tokens=64),
                  refocus_every=16) as mem:
        mem.feed(memory)
        nll = mem.score(continuation)
        assert set(np.unique(mem.context.levels)) == {0}
    expected = full_context_nll(lm, memory + continuation, len(memory))
    assert abs(nll.mean().item() - expected.mean().item()) <= 1e-5  # ΔNLL = 0
    torch.testing.assert_close(nll, expected, atol=1e-4, rtol=1e-5)  # float32 sum order


@pytest.mark.parametrize("gist_rope", ["point", "span"])
def test_kv_cache_reuse_equals_recomputing_everything(lm, gistnet, gist_rope):
    ids = lm.tokenizer.encode(TEXT)
    memory, continuation = ids[:3000], ids[3000:3080]
    results = {}
    for use_cache in (True, False):
        alloc = FocusAllocator(budget=160, tail_tokens=32)
        with MemoryLM(lm, gistnet, alloc, refocus_every=8, gist_rope=gist_rope,
                      use_cache=use_cache) as mem:
            mem.feed(memory)
            results[use_cache] = mem.score(continuation)
            stats = dict(mem.stats)
            assert (mem.context.levels > 0).any()  # gists are in play
        if use_cache:
            assert stats["entries_reused"] > stats["entries_computed"]
    torch.testing.assert_close(results[True], results[False], atol=1e-4, rtol=0)


@pytest.mark.parametrize("rope", [
    None,
    RopeConfig(8, 10000.0, scaling="ntk", factor=4.0),
    RopeConfig(8, 10000.0, scaling="yarn", factor=4.0, original_max_position=512),
])
def test_same_context_at_offset_two_to_the_thirty_gives_the_same_logits(lm, gistnet, rope):
    ids = lm.tokenizer.encode(TEXT)
    with MemoryLM(lm, gistnet, FocusAllocator(budget=200, tail_tokens=32)) as mem:
        mem.feed(ids[:5000])
        wc = mem.allocator.assemble(mem.tree)
        m = materialize(wc, mem.tree, lambda x: lm.embed(x[None])[0], rope=rope or lm.config.rope,
                        gist_rope="span")
    assert {0, 1, 2} <= set(np.unique(wc.levels).tolist())  # tokens, L1 and L2 gists
    with torch.no_grad():
        near = lm(m.embeddings[None], m.positions, m.attenuation, rope=m.rope)
        far = lm(m.embeddings[None], m.positions + 2.0**30, m.attenuation, rope=m.rope)
    torch.testing.assert_close(far, near, atol=1e-4, rtol=0)


def test_generate_appends_to_memory_and_refuses_an_empty_one(lm, gistnet):
    with MemoryLM(lm, gistnet, FocusAllocator(budget=128, tail_tokens=32),
                  refocus_every=4) as mem:
        with pytest.raises(ValueError, match="memory is empty"):
            mem.score([1, 2, 3])
        mem.feed(TEXT[:2000])
        before = mem.cursor
        prompt = lm.tokenizer.encode("item 7: the")
        out = mem.generate(prompt, max_new_tokens=10)
        assert len(out) == 10 and all(0 <= t < lm.config.vocab_size for t in out)
        assert mem.cursor == before + len(prompt) + 10  # prompt and output join the memory
        assert len(mem.context) <= 128
        assert mem.stats["refocuses"] >= 3


def test_oracle_judge_measures_real_delta_nll_and_drives_the_allocator(lm, gistnet):
    from megacontext.runtime import OracleJudge
    from megacontext.working_context import WorkingContext

    ids = lm.tokenizer.encode(TEXT)
    memory, continuation = ids[:2048], ids[2048:2064]
    with MemoryLM(lm, gistnet, FocusAllocator(budget=128, tail_tokens=32)) as mem:
        mem.feed(memory)
        judge = OracleJudge(lm, mem.tree, continuation)
        raw = WorkingContext.raw(len(memory))
        coarse = FocusAllocator(budget=128, tail_tokens=32).assemble(mem.tree)
        # the judge's NLL of the all-raw context is the base model's own
        expected = full_context_nll(lm, memory + continuation, len(memory)).mean().item()
        assert judge.nll(raw) == pytest.approx(expected, abs=1e-5)
        assert judge.delta_nll(coarse, coarse) == 0.0
        assert judge.delta_nll(coarse, raw) == pytest.approx(judge.nll(raw) - judge.nll(coarse))
        oracle = FocusAllocator(budget=128, tail_tokens=32, scorer="oracle",
                                scorer_options={"judge": judge})
        wc = oracle.assemble(mem.tree)
        wc.validate(mem.tree, tail_tokens=32, budget=128)
        assert len(wc) <= 128 and oracle.last_stats.nodes_scored > 0


def test_auto_rope_keeps_the_cache_within_a_step_and_rebuilds_it_once_at_the_next(lm, gistnet):
    """``auto`` resolves to a power-of-two factor: the trained length is 512, so extents
    513…1024 share factor 2 and the cache grows one entry per token; the first refocus past
    1024 (factor 4) recomputes every entry once, and then the cache is reused again."""
    ids = lm.tokenizer.encode(TEXT)
    memory, continuation = ids[:1000], ids[1000:1048]
    auto = RopeConfig(8, 10000.0, scaling="auto", original_max_position=512)
    results = {}
    for use_cache in (True, False):
        calls = []  # (entries the base model ran on, factor) per pass
        with MemoryLM(lm, gistnet, FocusAllocator(budget=4096, tail_tokens=64),
                      refocus_every=16, rope=auto, use_cache=use_cache) as mem:
            def spy(module, args, kwargs, calls=calls):
                calls.append((args[0].shape[1], kwargs["rope"].factor))

            hook = lm.register_forward_pre_hook(spy, with_kwargs=True)
            try:
                mem.feed(memory)
                results[use_cache] = mem.score(continuation)
            finally:
                hook.remove()
            stats = dict(mem.stats)
        assert stats["entries_computed"] == sum(w for w, _ in calls)
        if not use_cache:
            continue
        # Refocuses at cursors 1000, 1016 (factor 2) and 1032, 1048 (factor 4).
        assert calls[0] == (1000, 2.0)
        first4 = next(i for i, (_, f) in enumerate(calls) if f == 4.0)
        assert all(w == 1 and f == 2.0 for w, f in calls[1:first4])  # reused within the step
        assert calls[first4] == (1032, 4.0)  # rebuilt once, at the first refocus past 1024
        assert all(w == 1 and f == 4.0 for w, f in calls[first4 + 1:])  # and reused again
        assert len(calls) == 1 + len(continuation)  # the first refocus, then one per token
        assert stats["rope_changes"] == 1
        assert stats["entries_computed"] == 1000 + 1032 + len(continuation) - 1
    torch.testing.assert_close(results[True], results[False], atol=1e-4, rtol=0)
