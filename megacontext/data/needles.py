"""Needles in filler: plant a fact in a token stream at a chosen depth, check an answer.

Used by the passkey evaluation (:mod:`megacontext.evaluation.passkey`) and by the focus
scorer's retrieval-shaped training data (:mod:`megacontext.lens.data`).
"""

from __future__ import annotations

import re

import numpy as np

from megacontext.data.token_cache import TokenCorpus


def filler_stream(corpus: TokenCorpus, docs: np.ndarray) -> np.ndarray:
    """Token ids of the documents ``docs``, back to back (int64)."""
    if len(docs) == 0:
        raise ValueError("passkey filler needs at least one held-out document")
    return np.concatenate([np.asarray(corpus.doc(int(d)), dtype=np.int64) for d in docs])


def make_example(tokenizer, filler: np.ndarray, length: int, depth: float, key: str,
                 offset: int, *, intro: str, needle: str) -> tuple[np.ndarray, int]:
    """A memory of exactly ``length`` tokens with the needle at ``depth``.

    Args:
        filler: the filler stream; read cyclically from ``offset``.
        intro, needle: ``str.format`` templates (``needle`` with ``{key}``), as in
            :class:`PasskeyConfig`.

    Returns:
        ``(ids [length] int64, needle_start)``: the needle's first token index.

    Raises:
        ValueError: ``length`` cannot hold the intro and the needle.
    """
    intro = np.asarray(tokenizer.encode(intro.format()), dtype=np.int64)
    needle = np.asarray(tokenizer.encode(needle.format(key=key)), dtype=np.int64)
    room = length - intro.size - needle.size
    if room < 0:
        raise ValueError(f"a passkey memory of {length} tokens cannot hold the intro "
                         f"({intro.size}) and the needle ({needle.size} tokens)")
    before = int(round(depth * room))
    take = np.take(filler, np.arange(offset, offset + room), mode="wrap")
    ids = np.concatenate([intro, take[:before], needle, take[before:]])
    assert ids.size == length, (ids.size, length)
    return ids, intro.size + before


def answer_is(text: str, key: str) -> bool:
    """The answer's first number is the key."""
    match = re.search(r"\d+", text)
    return match is not None and match.group(0) == key
