"""Read-time positions: where the base model sees each working-context entry.

Axes: ``w`` working-context entries.

``exact`` is the design's rule (docs/design.md, "Positions"): a token at its index, a gist at
its span's center; past the trained length it needs RoPE scaling. The other rules keep the
working context inside the model's trained length at any memory size, with no scaling
(docs/design.md, "Read-time positions"). All of them split the context at a **local
boundary** ``b``: the entries that start at or after ``b`` (the raw tail and the last
``local`` tokens) keep their exact relative distances; the far entries before it are moved:

- ``compact``: far entries at their ranks ``0, 1, 2 …`` (order kept, one position each, as
  StreamingLLM's cache ranks); the local ones follow, the token at ``b`` one past the last
  rank. A raw run of tokens among far entries stays contiguous (consecutive ranks are
  consecutive tokens), so an expanded needle reads as the text it is.
- ``grouped``: far positions grouped Self-Extend style, ``floor(p / G)`` with the smallest
  power of two ``G`` that fits them under the trained length.
- ``single``: every far entry at one position just before the local window (InfLLM's memory
  units, all at one distance).

The boundary ``b`` is ``cursor − local`` rounded *up* to a multiple of ``quantum`` (never
below 0): the local window holds at most ``local`` tokens, and the boundary moves only once
every ``quantum`` tokens, so between those steps a refocus that keeps a prefix of the context
keeps its positions too (the KV cache of that prefix stays exact). A context whose cursor is
within ``local`` is entirely local: every rule is then ``exact``.

    rule = PositionRule("compact", local=4096)
    pos, next_pos = rule.place(wc.positions, wc.starts, wc.cursor, max_position=8192)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

POSITION_RULES = ("exact", "compact", "grouped", "single")


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"positions.{name}={value!r} (expected an int >= {low})")
    return int(value)


@dataclass(frozen=True)
class PositionRule:
    """A read-time position rule (see the module docstring).

    Attributes:
        kind: ``exact`` | ``compact`` | ``grouped`` | ``single``.
        local: tokens before the cursor whose entries keep exact relative distances.
        quantum: the local boundary moves in steps of this many tokens (``<= local``;
            None: ``min(1024, local)``).
    """

    kind: str = "exact"
    local: int = 4096
    quantum: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in POSITION_RULES:
            raise ValueError(f"positions={self.kind!r} (expected one of "
                             f"{', '.join(POSITION_RULES)})")
        object.__setattr__(self, "local", _int("local", self.local, 1))
        quantum = min(1024, self.local) if self.quantum is None else self.quantum
        object.__setattr__(self, "quantum", _int("quantum", quantum, 1))
        if self.quantum > self.local:
            raise ValueError(f"positions.quantum={self.quantum} exceeds positions.local="
                             f"{self.local}: the local window would not hold the boundary")

    @classmethod
    def of(cls, value: PositionRule | str | dict | None) -> PositionRule:
        """A rule from a rule, a kind name, a mapping of the fields, or None (``exact``)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, dict) or hasattr(value, "items"):
            fields = {f.name for f in dataclasses.fields(cls)}
            extra = sorted(set(value) - fields)
            if extra:
                raise ValueError(f"positions: unknown key(s) {extra} (expected "
                                 f"{sorted(fields)})")
            return cls(**dict(value))
        raise TypeError(f"positions must be a rule name, a mapping or a PositionRule, got "
                        f"{type(value).__name__}")

    def as_dict(self) -> dict:
        """What results record: ``{"kind", "local", "quantum"}``."""
        return dataclasses.asdict(self)

    def boundary(self, cursor: int) -> int:
        """The first token of the local window for a context covering ``[0, cursor)``."""
        if self.kind == "exact" or cursor <= self.local:
            return 0
        q = self.quantum
        return -(-(cursor - self.local) // q) * q

    def place(self, positions: np.ndarray, starts: np.ndarray, cursor: int, *,
              max_position: int | None = None) -> tuple[np.ndarray, float]:
        """The read-time positions of a working context's entries.

        Args:
            positions: ``[w]`` float64 exact positions (token index or node center), in order.
            starts: ``[w]`` int64 first token of each entry.
            cursor: tokens the context covers (the next token is ``cursor``).
            max_position: the model's trained length: ``grouped`` fits its far entries under
                it, and a rule other than ``exact`` whose context would still span more is an
                error (lower ``local`` or the budget).

        Returns:
            ``(positions [w] float64, next_position)``: where each entry is read, and where
            the token at ``cursor`` goes (a continuation at ``next_position + i``).
        """
        exact = np.asarray(positions, dtype=np.float64)
        starts = np.asarray(starts)
        if exact.shape != starts.shape or exact.ndim != 1:
            raise ValueError(f"positions {exact.shape} and starts {starts.shape} must both be "
                             f"[w]")
        b = self.boundary(int(cursor))
        if b == 0:
            return exact.copy(), float(cursor)
        far = starts < b  # [w] (entries are in order: a prefix)
        f = int(far.sum())
        if far[f:].any():
            raise ValueError("positions: the entries are not in token order")
        out = np.empty_like(exact)
        if self.kind == "compact":
            out[:f] = np.arange(f, dtype=np.float64)
            offset = float(f)
        elif self.kind == "single":
            out[:f] = 0.0
            offset = 1.0
        else:  # grouped
            room = (max_position or 0) - self.local - 1
            if max_position is None or room < 1:
                raise ValueError(f"positions=grouped needs max_position > local + 1 (local="
                                 f"{self.local}, max_position={max_position})")
            group = 1 << max(0, math.ceil(math.log2(b / room)))
            out[:f] = np.floor(exact[:f] / group)
            offset = math.floor((b - 1) / group) + 1.0
        out[f:] = exact[f:] - b + offset
        next_position = float(cursor - b + offset)
        if max_position is not None and next_position > max_position:
            raise ValueError(
                f"positions={self.kind}: a context of {exact.shape[0]} entries with local="
                f"{self.local} spans {next_position:.0f} positions, more than the trained "
                f"length {max_position}; lower positions.local or the budget")
        return out, next_position
