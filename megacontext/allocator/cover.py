"""Cover arithmetic: tiling ``[0, cursor)`` with aligned, existing tree nodes.

Axes: ``w`` entries of the cut, ``s`` span (32).

A *cut* is a set of entries ``(level, index)`` that tiles ``[0, cursor)``. The coarsest legal
cover tiles ``[0, cursor − tail)`` greedily by the largest aligned node that starts at each
point, fits and exists (the base-``s`` digits of the covered length: aligned intervals nest,
so this is also the fewest entries possible), then the raw tail. ``carry_over`` makes a
previous refocus's cut legal for a new cursor. Node arithmetic is :mod:`megacontext.spans`.
"""

from __future__ import annotations

import itertools

import numpy as np

from megacontext.spans import is_aligned, node_index, node_size
from megacontext.working_context import WorkingContext


def greedy_counts(counts: list[int], s: int, a: int, b: int) -> list[int]:
    """Entries per level (top first, tokens last) of the greedy aligned cover of ``[a, b)``,
    ``a`` a multiple of ``s^top``, counted without listing them."""
    top = len(counts) - 1
    out, p = [], a
    for k in range(top, 0, -1):
        size = node_size(k, s)
        n = max(0, min((b - p) // size, counts[k] - p // size))
        out.append(n)
        p += n * size
    out.append(b - p)
    return out


def greedy_cover(counts: list[int], s: int, a: int, b: int, top: int | None = None):
    """The fewest aligned, existing nodes (level <= ``top``) tiling ``[a, b)``, in order:
    at each point the largest node that starts there, fits, and exists."""
    top = len(counts) - 1 if top is None else top
    p = a
    while p < b:
        k = top
        while k > 0 and (not is_aligned(k, p, s) or p + node_size(k, s) > b
                         or node_index(k, p, s) >= counts[k]):
            k -= 1
        yield (k, node_index(k, p, s))
        p += node_size(k, s)


def with_tokens(keys: np.ndarray, born: np.ndarray, a: int, b: int):
    """``(keys [w, 2], born [w])`` with raw tokens ``[a, b)`` appended (born −1)."""
    t = np.arange(a, max(a, b), dtype=np.int64)
    tokens = np.stack([np.zeros_like(t), t], axis=1)  # [n, 2]
    return np.concatenate([keys, tokens]), np.concatenate([born, np.full(t.size, -1)])


def carry_over(previous: WorkingContext, counts: list[int], s: int, cursor: int,
               tail: int) -> tuple[np.ndarray, np.ndarray]:
    """``previous``'s entries made legal for the new cursor: ``(keys [w, 2], born [w])``.

    Entries past the cursor go; a node reaching into the new raw tail (the cursor moved back
    or the tail grew) is replaced by its greedy cover and raw tokens; tokens the cursor
    advanced over enter raw. Nothing is folded here: the budget decides that.
    """
    lv, st, en, born = previous.levels, previous.starts, previous.ends, previous.born
    edge = cursor - tail
    keep = (st < cursor) & ((lv == 0) | (en <= edge))
    keys = np.stack([lv[keep], previous.indices[keep]], axis=1)  # [w, 2]
    born = born[keep]
    for j in np.flatnonzero(~keep & (st < cursor)).tolist():
        a, b = int(st[j]), int(en[j])
        cover = np.array(list(greedy_cover(counts, s, a, min(b, edge), int(lv[j]) - 1)),
                         dtype=np.int64).reshape(-1, 2)
        keys, born = with_tokens(np.concatenate([keys, cover]),
                                 np.concatenate([born, np.full(len(cover), -1)]),
                                 max(a, edge), min(b, cursor))
    return with_tokens(keys, born, previous.cursor, cursor)


def entry_arrays(entries: dict[tuple[int, int], int]) -> tuple[np.ndarray, np.ndarray]:
    """The cut's keys as int64 ``[w, 2]`` (level, index) and their ``born`` stamps ``[w]``."""
    n = len(entries)
    keys = np.fromiter(itertools.chain.from_iterable(entries), dtype=np.int64, count=2 * n)
    return keys.reshape(n, 2), np.fromiter(entries.values(), dtype=np.int64, count=n)


def minimum_message(budget: int, tail_tokens: int, per_level: list[int], tail: int,
                    cursor: int, counts: list[int]) -> str:
    """Why ``budget`` cannot hold the coarsest legal cover, with the minimum and the fixes."""
    top = len(counts) - 1
    minimum = sum(per_level) + tail
    parts = [f"{n} L{top - i} nodes" for i, n in enumerate(per_level[:-1]) if n]
    parts.append(f"{per_level[-1] + tail} tokens ({tail} of them the raw tail)")
    return (
        f"budget {budget} is too small for cursor {cursor}: the coarsest legal cover "
        f"needs at least {minimum} entries ({', '.join(parts)}). Raise the budget to >= "
        f"{minimum}, lower tail_tokens (now {tail_tokens}), or build the tree with more "
        f"levels (it has {top}; the {per_level[0]} top-level nodes each take a slot)"
    )

