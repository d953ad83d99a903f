"""megacontext.spans: node sizes, starts, centers and alignment, checked against exact rationals."""

from fractions import Fraction

import numpy as np
import pytest

from megacontext import spans


@pytest.mark.parametrize("level", [0, 1, 2, 3, 6])
def test_centers_are_exact_far_out(level):
    size = 32**level
    top = (2**50) // size  # positions beyond 2^49
    idx = np.array([0, 1, 2, 31, top - 1], dtype=np.int64)
    got = spans.centers(level, idx)
    assert got.dtype == np.float64
    for i, c in zip(idx.tolist(), got.tolist(), strict=True):
        assert Fraction(c) == Fraction(i * size) + Fraction(size - 1, 2)
        assert spans.center(level, i) == c
    np.testing.assert_array_equal(spans.level_centers(level, 3, 7),
                                  spans.centers(level, range(3, 7)))


def test_entry_positions_of_mixed_levels_match_the_centers():
    levels = np.array([2, 1, 1, 0, 0])
    starts = np.array([0, 1024, 1056, 1088, 1089])
    want = [spans.center(2, 0), spans.center(1, 32), spans.center(1, 33), 1088.0, 1089.0]
    assert spans.entry_positions(levels, starts).tolist() == want
    assert spans.node_sizes(levels).tolist() == [1024, 32, 32, 1, 1]


def test_sizes_starts_alignment_and_levels():
    assert [spans.node_size(k) for k in range(3)] == [1, 32, 1024]
    assert spans.node_starts(2, [0, 3]).tolist() == [0, 3072]
    assert spans.node_index(1, 96) == 3 and spans.is_aligned(1, 96) and not spans.is_aligned(2, 96)
    assert spans.parents(1055) == 32
    assert spans.max_level() == 12 and 32 ** spans.max_level() == 2**60
    assert spans.max_level(2) == 60


def test_the_tree_and_the_working_context_use_these_centers():
    from megacontext.rope import RopeConfig
    from megacontext.tree import format as fmt
    from megacontext.working_context import WorkingContext

    meta = fmt.node_metadata(2, 5, 9, RopeConfig(8, 10000.0))
    np.testing.assert_array_equal(meta["center"], spans.level_centers(2, 5, 9))
    wc = WorkingContext.from_entries([2, 1, 0], [0, 32, 1056], 1057)
    assert wc.positions.tolist() == [spans.center(2, 0), spans.center(1, 32), 1056.0]
