"""A thin, offline wrapper over a ``tokenizer.json`` (the HF ``tokenizers`` format)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    """Text <-> token ids, without special tokens (the memory stores raw text ids).

    Args:
        path: a ``tokenizer.json`` file.
        bos_id, eos_id: special ids, recorded for generation; never added by :meth:`encode`.
    """

    def __init__(self, path: str | Path, bos_id: int | None = None,
                 eos_id: int | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        self.path = path
        self._tok = _HFTokenizer.from_file(str(path))
        self.bos_id, self.eos_id = bos_id, eos_id
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_words(self, text: str) -> tuple[list[int], list[int], list[int | None]]:
        """``encode(text)`` with, per token, the character offset in ``text`` where it starts
        and the index of the pre-tokenizer word it comes from (for cutting a long text where
        its tokens cannot change: ``megacontext.textio.exact_segments``)."""
        e = self._tok.encode(text, add_special_tokens=False)
        return e.ids, [start for start, _ in e.offsets], e.word_ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of several texts at once (parallel in the Rust tokenizer)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; special tokens are kept so nothing is silently dropped."""
        return self._tok.decode(list(map(int, ids)), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer({self.path}, vocab_size={self.vocab_size})"
