"""Node arithmetic of the memory tree: sizes, starts, centers, alignment, levels (the one home).

Axes: ``w`` entries of mixed levels, ``g`` nodes of one level, ``s`` span (32).

Level 0 is tokens; a level-k node stands for ``s^k`` tokens. Node ``i`` of level ``k`` covers
tokens ``[i·s^k, (i+1)·s^k)`` and sits at RoPE position ``i·s^k + (s^k − 1)/2``, the center of
its span (a token sits at its index: the same formula with ``k = 0``). A level-k node exists
exactly when all ``s`` of its level-(k−1) children do, so a level holding ``n`` records has
``n // s`` parents. Every module that lays out, stores, allocates or scores nodes uses these
functions, so the tree's stored centers, the working context's positions, the windows of
training and evaluation and the allocator's scorers agree bit for bit.

Exactness: every center is an integer or a half-integer, and every term below is exact in
float64 while the position stays under 2^52, so no rounding ever happens (``verify`` demands
bit equality of the stored centers, tested at positions beyond 2^40).

Imports nothing of the project (numpy only), so anything may import it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SPAN = 32  # children per node; the design fixes 32


def node_size(level: int, span: int = SPAN) -> int:
    """Tokens one node of ``level`` covers: ``span ** level`` (1 for a token)."""
    return int(span) ** int(level)


def node_sizes(levels: Any, span: int = SPAN) -> np.ndarray:
    """``[w]`` int64 ``span ** levels``, elementwise."""
    return np.power(np.int64(span), np.asarray(levels).astype(np.int64))


def node_starts(level: int, indices: Any, span: int = SPAN) -> np.ndarray:
    """``[g]`` int64 first token of nodes ``indices`` of ``level``: ``i·s^k``."""
    return np.asarray(indices, dtype=np.int64) * np.int64(node_size(level, span))


def node_index(level: int, start: Any, span: int = SPAN) -> Any:
    """Node index of the level-``level`` node starting at token ``start`` (int or array)."""
    return start // node_size(level, span)


def is_aligned(level: int, start: Any, span: int = SPAN) -> Any:
    """Whether ``start`` (int or array) is the first token of a level-``level`` node."""
    return start % node_size(level, span) == 0


def centers(level: int, indices: Any, span: int = SPAN) -> np.ndarray:
    """``[g]`` float64 RoPE positions of nodes ``indices`` of ``level``: ``i·s^k + (s^k − 1)/2``.

    Level 0 gives the token indices themselves. Exact below 2^52 (module docstring).
    """
    size = node_size(level, span)
    return node_starts(level, indices, span).astype(np.float64) + (size - 1) / 2


def center(level: int, index: int, span: int = SPAN) -> float:
    """The RoPE position of one node: ``index·s^k + (s^k − 1)/2``."""
    return float(centers(level, [index], span)[0])


def level_centers(level: int, start: int, stop: int, span: int = SPAN) -> np.ndarray:
    """``[stop − start]`` float64 centers of consecutive nodes ``[start, stop)`` of ``level``."""
    return centers(level, np.arange(start, stop, dtype=np.int64), span)


def entry_positions(levels: Any, starts: Any, span: int = SPAN) -> np.ndarray:
    """``[w]`` float64 positions of entries of mixed levels given their first tokens:
    ``start`` for a token, ``start + (s^k − 1)/2`` for a level-k node (its center).

    Args:
        levels: ``[w]`` int levels.
        starts: ``[w]`` int first tokens, each a multiple of ``span ** level``.
    """
    sizes = node_sizes(levels, span)  # [w]
    return np.asarray(starts).astype(np.float64) + (sizes - 1).astype(np.float64) / 2


def parents(count: int, span: int = SPAN) -> int:
    """Complete parents of ``count`` consecutive nodes from index 0: ``count // span``."""
    return int(count) // int(span)


def max_level(span: int = SPAN) -> int:
    """The highest level whose node size keeps token arithmetic inside int64 (``s^k <= 2^60``;
    12 for span 32)."""
    return 60 // max(1, int(math.log2(span)))
