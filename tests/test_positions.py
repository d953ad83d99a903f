"""Read-time position rules (megacontext.positions): order kept, the local window and every raw
run exact, the extent bounded by the trained length at any memory size, deterministic; and the
memory runtime's KV cache exact under them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megacontext.allocator import FocusAllocator
from megacontext.allocator.cover import greedy_cover
from megacontext.base import BaseLM
from megacontext.gistnet import GistNet, GistNetConfig
from megacontext.positions import POSITION_RULES, PositionRule
from megacontext.runtime import MemoryLM
from megacontext.spans import node_size
from megacontext.working_context import WorkingContext

TRAINED = 8192
TAIL = 64


def coarsest(cursor: int, levels: int, *, needle: int | None = None) -> WorkingContext:
    """The coarsest cover of ``[0, cursor)`` (raw tail of ``TAIL``), optionally with the L1
    node holding token ``needle`` expanded into its 32 raw tokens (an oracle's needle)."""
    counts = [cursor] + [cursor // node_size(k) for k in range(1, levels + 1)]
    entries = list(greedy_cover(counts, 32, 0, cursor - TAIL))
    if needle is not None:
        entries = _expanded(cursor - TAIL, levels, needle, counts)
    entries += [(0, t) for t in range(cursor - TAIL, cursor)]
    return WorkingContext.from_entries([k for k, _ in entries], [i for _, i in entries], cursor)


def _expanded(stop: int, levels: int, needle: int, counts: list[int]) -> list[tuple[int, int]]:
    """The coarsest cover of ``[0, stop)`` in which no node above level 0 holds ``needle``."""
    out = []
    for k, i in greedy_cover(counts, 32, 0, stop):
        lo, hi = i * node_size(k), (i + 1) * node_size(k)
        if k == 0 or not lo <= needle < hi:
            out.append((k, i))
            continue
        out += _expanded_node(k, i, needle)
    return out


def _expanded_node(k: int, i: int, needle: int) -> list[tuple[int, int]]:
    if k == 0:
        return [(0, i)]
    out = []
    for c in range(i * 32, i * 32 + 32):
        lo, hi = c * node_size(k - 1), (c + 1) * node_size(k - 1)
        out += _expanded_node(k - 1, c, needle) if lo <= needle < hi else [(k - 1, c)]
    return out


def test_rules_are_checked():
    assert PositionRule.of(None) == PositionRule("exact")
    assert PositionRule.of({"kind": "compact", "local": 512}).local == 512
    with pytest.raises(ValueError, match="positions='rank'"):
        PositionRule("rank")
    with pytest.raises(ValueError, match="quantum=2048 exceeds positions.local=1024"):
        PositionRule("compact", local=1024, quantum=2048)
    with pytest.raises(ValueError, match=r"positions.local=0"):
        PositionRule("compact", local=0)
    with pytest.raises(ValueError, match="unknown key"):
        PositionRule.of({"kind": "compact", "window": 3})


@pytest.mark.parametrize("kind", POSITION_RULES)
def test_within_the_local_window_every_rule_is_exact(kind):
    wc = coarsest(3000, 2)
    pos, nxt = PositionRule(kind, local=4096).place(wc.positions, wc.starts, wc.cursor,
                                                    max_position=TRAINED)
    np.testing.assert_array_equal(pos, wc.positions)
    assert nxt == 3000


@pytest.mark.parametrize("kind", ["compact", "grouped", "single"])
@pytest.mark.parametrize("cursor,levels", [(20_000, 2), (1_000_003, 4), (1_000_000_007, 5)])
def test_order_local_window_raw_runs_and_extent(kind, cursor, levels):
    needle = cursor // 3
    wc = coarsest(cursor, levels, needle=needle)
    rule = PositionRule(kind, local=4096, quantum=1024)
    pos, nxt = rule.place(wc.positions, wc.starts, wc.cursor, max_position=TRAINED)
    b = rule.boundary(cursor)
    assert 0 < b <= cursor - 4096 + 1024 and b % 1024 == 0
    local = wc.starts >= b
    # local window exact: every distance equals the true one, the cursor included
    np.testing.assert_array_equal(pos[local] - pos[local][0],
                                  wc.positions[local] - wc.positions[local][0])
    assert nxt - pos[-1] == cursor - wc.positions[-1]
    # the whole context inside the trained length, with no scaling
    assert nxt - pos.min() <= TRAINED
    if kind == "single":
        assert (pos[~local] == pos[0]).all() and pos[local].min() > pos[0]
        return
    if kind == "grouped":  # Self-Extend: G neighbouring far tokens share a position
        assert (np.diff(pos) >= 0).all()
        return
    assert (np.diff(pos) > 0).all()  # order kept, no two entries at one position
    if kind == "compact":
        # the needle's raw run is contiguous text: consecutive tokens, consecutive positions
        run = np.flatnonzero((wc.levels == 0) & (wc.starts // 32 == needle // 32))
        assert run.size == 32
        np.testing.assert_array_equal(np.diff(pos[run]), 1.0)
        assert nxt - pos.min() <= len(wc) + 4096


def test_the_same_context_gets_the_same_positions():
    rule = PositionRule("compact", local=2048)
    a = coarsest(123_456, 3, needle=50_000)
    b = coarsest(123_456, 3, needle=50_000)
    pa, na = rule.place(a.positions, a.starts, a.cursor, max_position=TRAINED)
    pb, nb = rule.place(b.positions, b.starts, b.cursor, max_position=TRAINED)
    np.testing.assert_array_equal(pa, pb)
    assert na == nb


def test_grouped_is_self_extend_floor_grouping():
    wc = coarsest(100_000, 2)
    rule = PositionRule("grouped", local=4096)
    pos, _ = rule.place(wc.positions, wc.starts, wc.cursor, max_position=TRAINED)
    far = wc.starts < rule.boundary(wc.cursor)
    group = 1 << int(np.ceil(np.log2(rule.boundary(wc.cursor) / (TRAINED - 4096 - 1))))
    np.testing.assert_array_equal(pos[far], np.floor(wc.positions[far] / group))


def test_a_context_that_cannot_fit_is_an_error_naming_the_numbers():
    wc = coarsest(2_000_000, 2)  # ~1,900 L2 gists: more entries than 8,192 − local
    with pytest.raises(ValueError, match=r"local=7000 spans .* more than the trained length 8192"):
        PositionRule("compact", local=7000).place(wc.positions, wc.starts, wc.cursor,
                                                  max_position=TRAINED)


# -- the memory runtime -------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return BaseLM.load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def gistnet(lm):
    torch.manual_seed(0)
    net = GistNet(GistNetConfig(hidden_size=lm.config.hidden_size, width=16, levels=2))
    net.set_output_prior(lm.model.embed_tokens.weight.mean(0))
    return net.eval()


TEXT = "".join(f"row {i}: {i * 53 % 97} apples and {i * 29 % 89} pears.\n" for i in range(300))


@pytest.mark.parametrize("kind", ["compact", "grouped"])
def test_kv_cache_under_a_moving_boundary_equals_recomputing(lm, gistnet, kind):
    ids = lm.tokenizer.encode(TEXT)
    memory, continuation = ids[:2500], ids[2500:2600]
    rule = PositionRule(kind, local=256, quantum=64)  # the boundary steps every 64 tokens
    out, stats = {}, {}
    for use_cache in (True, False):
        with MemoryLM(lm, gistnet, FocusAllocator(budget=160, tail_tokens=32),
                      refocus_every=8, positions=rule, use_cache=use_cache) as mem:
            mem.feed(memory)
            out[use_cache] = mem.score(continuation)
            stats[use_cache] = dict(mem.stats)
            assert mem.read_positions.max() - mem.read_positions.min() < 160 + 8 + 256 + 64
    torch.testing.assert_close(out[True], out[False], atol=1e-4, rtol=0)
    assert stats[True]["entries_reused"] > 0 and stats[True]["position_moves"] > 0
    assert stats[True]["entries_computed"] < stats[False]["entries_computed"]


def test_compact_within_the_local_window_is_the_exact_runtime(lm, gistnet):
    ids = lm.tokenizer.encode(TEXT)[:1200]
    out = {}
    for positions in ("exact", "compact"):
        with MemoryLM(lm, gistnet, FocusAllocator(budget=160, tail_tokens=32),
                      positions=positions) as mem:
            mem.feed(ids[:1100])
            out[positions] = mem.score(ids[1100:])
    torch.testing.assert_close(out["compact"], out["exact"], atol=0, rtol=0)
