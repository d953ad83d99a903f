"""Text in: files, JSONL records and stdin read as decoded text in pieces, and the cutting of a
long text into segments that tokenize exactly as the whole text does.

Both the ingest pipeline (:mod:`megacontext.ingest`) and the corpus cache
(:mod:`megacontext.data`) read text here. The module imports nothing of the project: a
tokenizer is anything with the two methods of :class:`megacontext.base.tokenizer.Tokenizer`
used below, ``encode(text) -> ids`` and ``encode_words(text) -> (ids, starts, words)``.

**Exact segments.** A long text is read in pieces of about 1 MiB, but tokenizing each piece on
its own is not the same as tokenizing the whole text: a byte-level BPE tokenizer's
pre-tokenizer can join the end of one piece with the start of the next (``"\\n"`` then
``"    return"`` is one ``"\\n   "`` word and one ``" return"`` word, not ``"\\n"`` and
``"    return"``; likewise ``"\\r" + "\\n"``, runs of spaces, digits, a word or an added
token cut in two). :func:`exact_segments` regroups the pieces into segments whose separate
tokenizations, concatenated, are the tokenizer's ids for the whole text. It keeps the end of
what it has read uncommitted and cuts only where the cut can no longer change:

- at the start of a pre-tokenizer word (a token whose word index differs from the previous
  token's: BPE never merges across words), or at any token boundary when the tokenizer does
  not split text into words at all (the byte-level test tokenizer);
- at least ``HOLD_CHARS`` characters before the end of the text read so far, so that no text
  still to come can join the word before the cut (a pre-tokenizer looks ahead a few
  characters; added tokens are shorter than that);
- at least ``RESYNC_CHARS`` characters after the start of the re-tokenized window (the window
  starts at an arbitrary character; the pre-tokenizer's words agree with the whole text's
  within a few characters);
- and only if the comparison holds: the window's ids equal the ids of its part before the
  cut followed by the ids of its part after it.

Finding a cut re-tokenizes a window of a few KiB per piece, 1–2 % of the work of tokenizing
the piece. A text without any such cut for ``FORCE_CHARS`` characters (a single
multi-megabyte word) is emitted whole as a segment, with a warning: the only case where the
result can differ from one-shot tokenization. (A tokenizer that treats the start of a text
specially, as SentencePiece's prepended "▁" does, passes no comparison, so its text would be
cut only there; the byte-level BPE tokenizers of SmolLM2, Llama 3 and Qwen do not.)
``tests/test_ingest.py`` compares with one-shot tokenization on multi-megabyte inputs, with
SmolLM2's tokenizer and the byte-level test tokenizer.

:func:`split_exact` cuts a segment further, by the same rule, into parts for a batch encoder
that runs them in parallel (ingest's token stream does; the ids stay the whole text's).
"""

from __future__ import annotations

import codecs
import json
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".tex", ".html", ".json", ".csv", ".c", ".h",
                 ".js", ".ts", ".java", ".rs", ".go", ".cpp", ".hpp", ".yaml", ".yml", ".toml"}
READ_BYTES = 1 << 20  # text is read and decoded in pieces of this many bytes

HOLD_CHARS = 256  # the end of the text read so far that is never cut
RESYNC_CHARS = 256  # no cut this close to the start of a re-tokenized window
WINDOW_CHARS = 4096  # first window re-tokenized to find a cut (doubled while none is found)
MAX_TRIES = 8  # candidate cuts compared per window
FORCE_CHARS = 4 * READ_BYTES  # uncut text beyond this is emitted whole (see the module doc)
PART_CHARS = 1 << 17  # split_exact: parts of about this many characters for a batch encode


class SegmentTokenizer(Protocol):
    """What :func:`exact_segments` needs of a tokenizer."""

    def encode(self, text: str) -> list[int]: ...

    def encode_words(self, text: str) -> tuple[list[int], list[int], list[int | None]]: ...


# -- reading -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One input: a text file, a JSONL file (one document per record), or stdin."""

    path: Path | None  # None for stdin
    kind: str  # "text" | "jsonl" | "stdin"
    label: str | None = None  # the name errors give (stdin read back from a spool file)

    @property
    def name(self) -> str:
        if self.label is not None:
            return self.label
        return "<stdin>" if self.path is None else str(self.path)


def read_text_pieces(source: Source, errors: str = "strict") -> Iterator[str]:
    """Decoded text of a file or stdin, in pieces of about ``READ_BYTES`` bytes (anywhere:
    pass them through :func:`exact_segments` before tokenizing).

    Decoding is strict UTF-8 by default: a bad byte raises ValueError naming the file and the
    absolute byte offset. ``errors="replace"`` substitutes U+FFFD instead. A character split
    between two reads is completed by the next read.
    """
    stream = sys.stdin.buffer if source.path is None else open(source.path, "rb")  # noqa: SIM115
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    offset = 0
    try:
        while True:
            raw = stream.read(READ_BYTES)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                # e.start counts from the bytes the decoder still held from the last read
                at = offset - len(decoder.getstate()[0]) + e.start
                raise ValueError(f"{source.name}: invalid UTF-8 at byte offset {at} "
                                 f"({e.reason}); pass errors='replace' (--errors replace) to "
                                 f"substitute U+FFFD") from None
            offset += len(raw)
            if text:
                yield text
            if not raw:
                return
    finally:
        if source.path is not None:
            stream.close()


def read_jsonl_texts(source: Source, field_name: str = "text") -> Iterator[str]:
    """The ``field_name`` of each JSON line; a bad line raises naming file and line number."""
    with open(source.path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{source.name}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field_name), str):
                raise ValueError(f"{source.name}:{lineno}: expected an object with a string "
                                 f"{field_name!r} field")
            yield record[field_name]


# -- exact segments ----------------------------------------------------------------------------

def exact_segments(pieces: Iterable[str], tokenizer: SegmentTokenizer) -> Iterator[str]:
    """The text of ``pieces`` regrouped into segments such that
    ``sum((tokenizer.encode(s) for s in segments), [])`` equals
    ``tokenizer.encode("".join(pieces))`` (see the module docstring for the rule and its one
    exception). A text of one piece is one segment, untouched; otherwise each piece is cut
    near its end once the next one is read, so segments are about as long as pieces."""
    held = ""  # text read but not yet emitted
    splits_words: bool | None = None
    for piece in pieces:
        if not piece:
            continue
        if not held:
            held = piece
            continue
        text = held + piece
        if splits_words is None:
            splits_words = splits_words_of(tokenizer)
        # Near the end of what was held (the new piece gives it right context), else anywhere.
        cut = (safe_cut(text, tokenizer, splits_words, before=len(held))
               or safe_cut(text, tokenizer, splits_words))
        if cut:
            yield text[:cut]
            held = text[cut:]
        elif len(text) > FORCE_CHARS:
            warnings.warn(f"no safe place to cut {len(text):,} characters of text for the "
                          f"tokenizer; tokenizing them as one segment (the ids may differ from "
                          f"one-shot tokenization at its end)", stacklevel=2)
            yield text
            held = ""
        else:
            held = text
    if held:
        yield held


def split_exact(text: str, tokenizer: SegmentTokenizer, part_chars: int = PART_CHARS,
                splits_words: bool | None = None) -> list[str]:
    """``text`` cut into parts of about ``part_chars`` characters whose separate tokenizations,
    concatenated, are ``tokenizer.encode(text)`` (cuts by :func:`safe_cut`'s rule, as
    :func:`exact_segments` makes them), so that a batch encoder tokenizes them in parallel
    (``python -m megacontext.bench.tokenize``). A text shorter than two parts, or without a
    cut, stays whole.
    """
    if len(text) < 2 * part_chars:
        return [text]
    if splits_words is None:
        splits_words = splits_words_of(tokenizer)
    parts, a = [], 0
    while len(text) - a >= 2 * part_chars:
        # the window ends HOLD_CHARS past the cut: the right context safe_cut needs
        b = safe_cut(text[a:a + part_chars + HOLD_CHARS], tokenizer, splits_words)
        if not b:
            break
        parts.append(text[a:a + b])
        a += b
    parts.append(text[a:])
    return parts


def splits_words_of(tokenizer: SegmentTokenizer) -> bool:
    """Whether the tokenizer's pre-tokenizer cuts text into words (byte-level BPE does; a
    tokenizer without a pre-tokenizer sees one word)."""
    _, _, words = tokenizer.encode_words("a b\nc, d")
    return len(set(words)) > 1


def safe_cut(text: str, tokenizer: SegmentTokenizer, splits_words: bool = True,
             before: int | None = None) -> int:
    """A character offset ``0 < b <= len(text) - HOLD_CHARS`` (and ``<= before``) at which
    ``text``, and any text that follows it, can be cut without changing its tokens; the
    largest one found near that limit, or 0 if there is none."""
    limit = len(text) - HOLD_CHARS if before is None else min(before, len(text) - HOLD_CHARS)
    stop = min(len(text), limit + HOLD_CHARS)  # the window's end: right context for the cut
    width = WINDOW_CHARS
    while limit > 0:
        start = max(0, stop - width)
        window = text[start:stop]
        ids, starts, words = tokenizer.encode_words(window)
        lowest = RESYNC_CHARS if start else 1
        tries = 0
        for i in range(len(ids) - 1, 0, -1):
            b = starts[i]
            if b < lowest or tries >= MAX_TRIES:
                break
            if start + b > limit or b <= starts[i - 1]:
                continue
            if splits_words and words[i] == words[i - 1]:
                continue
            tries += 1
            if tokenizer.encode(window[:b]) + tokenizer.encode(window[b:]) == ids:
                return start + b
        if start == 0:
            return 0
        width *= 4
    return 0
