"""Tests for megacontext.working_context: invariants, helpers and materialize."""

import dataclasses
import re

import numpy as np
import pytest
import torch

from megacontext.rope import RopeConfig, span_attenuation
from megacontext.tree import MegaContextTree
from megacontext.working_context import Materialized, WorkingContext, materialize

ROPE = RopeConfig(8, 10000.0)
HIDDEN, VOCAB = 8, 500
FP = {"name": "wc-test", "hidden_size": HIDDEN, "vocab_size": VOCAB}


def build_tree(path, n_tokens=3000, levels=2, seed=0):
    """A real tree: random ids and random gists (float16) at every level, committed."""
    g = torch.Generator().manual_seed(seed)
    tree = MegaContextTree.create(path, hidden_size=HIDDEN, vocab_size=VOCAB, rope=ROPE,
                                  fingerprint=FP, levels=levels, gist_dtype="float16")
    tree.append_tokens(torch.randint(0, VOCAB, (n_tokens,), generator=g))
    for k in range(1, levels + 1):
        n = tree.appended_count(k - 1) // 32
        tree.append_gists(k, torch.randn(n, HIDDEN, generator=g))
    tree.commit()
    return tree


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    t = build_tree(tmp_path_factory.mktemp("wc") / "tree")
    yield t
    t.close()


@pytest.fixture(scope="module")
def table():
    return torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(1))


def mixed(cursor=3000):
    """L2 nodes 0–1, L1 nodes 64–92, then tokens 2976… to the cursor: a valid mixed context."""
    levels = [2, 2] + [1] * 29
    idx = [0, 1] + list(range(64, 93))
    tail = list(range(93 * 32, cursor))
    return WorkingContext.from_entries(levels + [0] * len(tail), idx + tail, cursor)


# ----------------------------------------------------------------------------------------
# the dataclass


def test_from_entries_positions_and_helpers():
    wc = WorkingContext.from_entries([2, 1, 1, 0, 0, 0], [0, 32, 33, 1088, 1089, 1090], 1091)
    assert wc.starts.tolist() == [0, 1024, 1056, 1088, 1089, 1090]
    assert wc.ends.tolist() == [1024, 1056, 1088, 1089, 1090, 1091]
    assert wc.positions.tolist() == [511.5, 1039.5, 1071.5, 1088.0, 1089.0, 1090.0]
    assert wc.positions.dtype == np.float64 and wc.levels.dtype == np.int64
    assert len(wc) == 6 and wc.tokens_covered == 1091
    assert wc.render() == "L2×1 L1×2 L0×3"
    assert wc.counts() == {2: 1, 1: 2, 0: 3}
    assert wc.indices.tolist() == [0, 32, 33, 1088, 1089, 1090]
    assert wc.entries()[:2] == [(2, 0), (1, 32)]
    assert wc.born.tolist() == [-1] * 6
    wc.validate([1091, 34, 1])
    assert "L2×1 L1×2 L0×3" in repr(wc)


def test_render_truncates_long_run_lists():
    levels = [k for _ in range(10) for k in [1] + [0] * 32]
    idx = [i for j in range(10) for i in [2 * j, *range(64 * j + 32, 64 * j + 64)]]
    wc = WorkingContext.from_entries(levels, idx, 640).validate()
    assert wc.render(max_runs=4) == "L1×1 L0×32 …(16 runs)… L1×1 L0×32"
    assert wc.render().count("L1×1 L0×32") == 10


def test_raw_and_common_prefix():
    a = WorkingContext.raw(100)
    a.validate([100])
    assert a.render() == "L0×100" and a.positions.tolist() == list(range(100))
    b = WorkingContext.from_entries([1] + [0] * 68, [0] + list(range(32, 100)), 100)
    c = WorkingContext.from_entries([1, 1] + [0] * 36, [0, 1] + list(range(64, 100)), 100)
    assert b.common_prefix(c) == 1 and c.common_prefix(b) == 1
    assert a.common_prefix(b) == 0 and b.common_prefix(b) == 69
    assert WorkingContext.raw(50).common_prefix(a) == 50


def test_constructor_rejects_bad_arrays():
    with pytest.raises(ValueError, match="1-D of one length"):
        WorkingContext(np.zeros(3, np.int64), np.zeros(2, np.int64), np.zeros(3, np.int64),
                       np.zeros(3), 3)
    with pytest.raises(TypeError, match="integer array"):
        WorkingContext(np.zeros(2), np.arange(2), np.arange(1, 3), np.arange(2.0), 2)
    with pytest.raises(TypeError, match="cursor must be an int"):
        WorkingContext(np.zeros(2, np.int64), np.arange(2), np.arange(1, 3), np.arange(2.0), 2.0)


# ----------------------------------------------------------------------------------------
# validate: each invariant, named at the first bad entry


def broken(wc, **changes):
    fields = {f.name: getattr(wc, f.name) for f in dataclasses.fields(wc)}
    for k, v in changes.items():
        fields[k] = v
    return WorkingContext(**fields)


@pytest.mark.parametrize("mutate, message", [
    (lambda wc: broken(wc, starts=np.r_[wc.starts[:5], wc.starts[5:] + 1],
                       ends=np.r_[wc.ends[:5], wc.ends[5:] + 1]),
     r"entry 5 .* not aligned|entry 5 .*gap"),
    (lambda wc: broken(wc, ends=np.r_[wc.ends[:3], wc.ends[3] + 1, wc.ends[4:]]),
     r"entry 3 .*covers 33 tokens, a level-1 entry covers 32"),
    (lambda wc: broken(wc, positions=np.r_[wc.positions[:7], wc.positions[7] + 0.5,
                                          wc.positions[8:]]),
     r"entry 7 .*position .*expected"),
    (lambda wc: WorkingContext.from_entries(wc.levels[[0, 2, 1, *range(3, len(wc))]],
                                            wc.indices[[0, 2, 1, *range(3, len(wc))]],
                                            wc.cursor),
     r"entry 1 .*gap"),
    (lambda wc: WorkingContext.from_entries(np.r_[wc.levels[:4], wc.levels[5:]],
                                            np.r_[wc.indices[:4], wc.indices[5:]], wc.cursor),
     r"entry 4 .*gap after the previous entry"),
    (lambda wc: broken(wc, cursor=wc.cursor + 1), r"ends at 3000, not at the cursor 3001"),
    (lambda wc: WorkingContext.from_entries(wc.levels, np.r_[0, 0, wc.indices[2:]], wc.cursor),
     r"entry 1 .*overlaps the previous entry, which ends at 1024"),
])
def test_validate_names_the_first_bad_entry(mutate, message):
    good = mixed()
    good.validate([3000, 93, 2])
    with pytest.raises(ValueError, match=message):
        mutate(good).validate()


def test_validate_against_the_tree_tail_and_budget(tree):
    mixed().validate(tree, tail_tokens=24, budget=55)
    with pytest.raises(ValueError, match=r"entry 30 .*gist inside the raw tail \(the last 25"):
        mixed().validate(tail_tokens=25)
    # level 2 has 2 nodes; a third does not exist even though it is aligned and in range
    wc = WorkingContext.from_entries([2, 2, 2] + [0] * 24, [0, 1, 2] + list(range(3072, 3096)),
                                     3096)
    with pytest.raises(ValueError, match=r"entry 2 .*level-2 node 2 does not exist, level 2 "
                                         r"has 2 committed records"):
        wc.validate([3096, 96, 2])
    with pytest.raises(ValueError, match=r"entry 3000 .*beyond the tree: token"):
        WorkingContext.raw(3001).validate(tree)
    with pytest.raises(ValueError, match="level above the tree's top level 2"):
        WorkingContext.from_entries([3] + [0] * 10, [0] + list(range(32768, 32778)),
                                    32778).validate(tree)
    tail_gist = WorkingContext.from_entries([2, 2] + [1] * 30 + [0] * 24, [0, 1] +
                                            list(range(64, 94)) + list(range(3008, 3032)), 3032)
    with pytest.raises(ValueError, match=r"entry 31 .*gist inside the raw tail \(the last 40"):
        tail_gist.validate(tail_tokens=40)
    with pytest.raises(ValueError, match="55 entries, over the budget 50"):
        mixed().validate(budget=50)


# ----------------------------------------------------------------------------------------
# materialize


def test_materialize_rows_equal_tree_reads_and_embeddings(tree, table):
    wc = mixed()
    m = materialize(wc, tree, lambda ids: table[ids], rope=ROPE)
    assert isinstance(m, Materialized)
    assert m.embeddings.dtype == torch.float32 and m.embeddings.shape == (len(wc), HIDDEN)
    assert m.positions.dtype == torch.float64
    assert m.positions.tolist() == wc.positions.tolist()
    assert m.attenuation is None and m.rope == ROPE
    # explicit loop over entries, one tree read each
    for j, (k, i) in enumerate(wc.entries()):
        want = table[tree.tokens(i, i + 1)][0] if k == 0 else tree.gists(k, i, i + 1)[0]
        torch.testing.assert_close(m.embeddings[j], want, rtol=0, atol=0)
    assert m.extent == 3000 - 1 - 511.5 + 1
    inputs = m.inputs()
    assert inputs["inputs_embeds"].shape == (1, len(wc), HIDDEN) and inputs["rope"] == ROPE


def test_materialize_reads_one_run_at_a_time(tree, table):
    calls = []

    class Spy:
        levels, span, hidden_size = tree.levels, tree.span, tree.hidden_size

        def count(self, k):
            return tree.count(k)

        def tokens(self, a, b):
            calls.append(("tokens", a, b))
            return tree.tokens(a, b)

        def gists(self, k, a, b):
            calls.append(("gists", k, a, b))
            return tree.gists(k, a, b)

    materialize(mixed(), Spy(), lambda ids: table[ids], rope=ROPE)
    assert calls == [("tokens", 2976, 3000), ("gists", 2, 0, 2), ("gists", 1, 64, 93)]


def test_exact_context_materializes_to_the_token_embeddings(tree, table):
    wc = WorkingContext.raw(700)
    m = materialize(wc, tree, lambda ids: table[ids], rope=ROPE, gist_rope="span")
    torch.testing.assert_close(m.embeddings, table[tree.tokens(0, 700)], rtol=0, atol=0)
    assert m.positions.tolist() == list(range(700)) and m.attenuation is None


@pytest.mark.parametrize("kind", ["span", "gaussian"])
def test_attenuation_rows(tree, table, kind):
    wc = mixed()
    m = materialize(wc, tree, lambda ids: table[ids], rope=ROPE, gist_rope=kind)
    assert m.attenuation.dtype == torch.float64 and m.attenuation.shape == (len(wc), 4)
    for j, k in enumerate(wc.levels.tolist()):
        want = torch.ones(4, dtype=torch.float64) if k == 0 else span_attenuation(32**k, ROPE, kind)
        torch.testing.assert_close(m.attenuation[j], want, rtol=0, atol=0)
    assert not torch.equal(m.attenuation[0], m.attenuation[2])  # L2 and L1 differ


def test_auto_scaling_resolves_from_the_extent(tree, table):
    auto = RopeConfig(8, 10000.0, scaling="auto", original_max_position=1000)
    m = materialize(mixed(), tree, lambda ids: table[ids], rope=auto)
    extent = 2999 - 511.5 + 1
    assert m.extent == extent
    # the factor steps in powers of two: extent / trained length = 2.49 -> 4
    assert m.rope.scaling == "ntk" and m.rope.factor == 4.0
    # max_position overrides the trained length; within it no scaling at all
    m = materialize(mixed(), tree, lambda ids: table[ids], rope=auto, max_position=4096)
    assert m.rope.scaling == "none" and m.rope.factor == 1.0
    m = materialize(mixed(), tree, lambda ids: table[ids], rope=auto, max_position=500)
    assert m.rope.factor == 8.0  # 4.98 -> 8
    # the attenuation uses the resolved (scaled) frequencies
    m = materialize(mixed(), tree, lambda ids: table[ids], rope=auto, gist_rope="span")
    torch.testing.assert_close(m.attenuation[0], span_attenuation(1024, m.rope, "span"))
    assert not torch.allclose(m.attenuation[0], span_attenuation(1024, ROPE, "span"))
    # non-auto configs pass through untouched
    lin = RopeConfig(8, 10000.0, scaling="linear", factor=2.0)
    assert materialize(mixed(), tree, lambda ids: table[ids], rope=lin).rope is lin


def test_materialize_bad_input(tree, table):
    embed = lambda ids: table[ids]  # noqa: E731
    with pytest.raises(ValueError, match=r"gist_rope='spam' \(expected one of point, span"):
        materialize(mixed(), tree, embed, rope=ROPE, gist_rope="spam")
    beyond = WorkingContext.from_entries([2, 2, 2], [0, 1, 2], 3072)
    with pytest.raises(ValueError, match=r"entry 2 .*level-2 node 2 does not exist"):
        materialize(beyond, tree, embed, rope=ROPE)
    with pytest.raises(ValueError, match=r"entry 3000 .*beyond the tree: token"):
        materialize(WorkingContext.raw(3001), tree, embed, rope=ROPE)
    with pytest.raises(ValueError, match="max_position=0"):
        materialize(mixed(), tree, embed, rope=ROPE, max_position=0)
    with pytest.raises(ValueError, match=r"embed must map ids \[20\] to \[20, c\]"):
        materialize(WorkingContext.raw(20), tree, lambda ids: table[ids][:-1], rope=ROPE)
    with pytest.raises(TypeError, match="rope must be a RopeConfig"):
        materialize(mixed(), tree, embed, rope=ROPE.to_dict())


# ----------------------------------------------------------------------------------------
# picture


@pytest.mark.parametrize("scale", ["log", "linear"])
def test_plot_writes_a_png(tmp_path, scale):
    out = mixed().plot(tmp_path / f"wc-{scale}.png", scale=scale, tail_tokens=64)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (11 * 150, round(3.6 * 150))
    with pytest.raises(ValueError, match=re.escape("scale='sqrt'")):
        mixed().plot(tmp_path / "x.png", scale="sqrt")
