"""Streaming ingest: text -> token ids -> embeddings -> GistNet level by level -> tree appends.

Axes: ``n`` tokens, ``g`` spans (one gist each), ``s`` span (32), ``c`` hidden size.

The pipeline keeps at most ``span − 1`` pending children per level in RAM (the tail of each
level that does not yet fill a span); everything else goes straight to the tree. A level-k gist
is made as soon as its 32 children exist, so after every commit ``count(k) == count(k−1) // 32``.

Gists feed the next level *as stored* (rounded to the tree's gist dtype), so a level-2 gist is
the same whether its children were just computed or read back from disk after a restart: any
chunking of a stream, and any interruption and resume, yields the same tree.

Resume: each commit records in the tree header an ``ingest`` note — a digest of the inputs
and the token count when this ingest started. Re-running an interrupted ingest over the same
inputs skips the tokens already committed and carries on; any other run appends.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from megacontext.base.tokenizer import Tokenizer
from megacontext.substitution import Compressor
from megacontext.tree import MegaContextTree

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".tex", ".html", ".json", ".csv", ".c", ".h",
                 ".js", ".ts", ".java", ".rs", ".go", ".cpp", ".hpp", ".yaml", ".yml", ".toml"}
READ_BYTES = 1 << 20  # text is read, decoded and tokenized in pieces of about this size
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}



# -- reading inputs ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One input document: a file, a JSONL record set, or stdin."""

    path: Path | None  # None for stdin
    kind: str  # "text" | "jsonl" | "stdin"

    @property
    def name(self) -> str:
        return "<stdin>" if self.path is None else str(self.path)


def expand_inputs(inputs: Iterable[str]) -> list[Source]:
    """Files, directories (recursively, text suffixes, sorted), JSONL files, and ``-``."""
    sources: list[Source] = []
    for item in inputs:
        if item == "-":
            sources.append(Source(None, "stdin"))
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and (
                p.suffix.lower() in TEXT_SUFFIXES or p.suffix.lower() == ".jsonl"))
            sources.extend(Source(p, "jsonl" if p.suffix.lower() == ".jsonl" else "text")
                           for p in files)
        elif path.is_file():
            sources.append(Source(path, "jsonl" if path.suffix.lower() == ".jsonl" else "text"))
        else:
            raise FileNotFoundError(f"input {item!r} does not exist")
    return sources


def inputs_digest(sources: list[Source]) -> str | None:
    """Identifies a set of inputs for resuming (names, sizes, mtimes); None if stdin is one."""
    if any(s.path is None for s in sources):
        return None
    blob = json.dumps([(str(s.path.resolve()), s.path.stat().st_size, s.path.stat().st_mtime_ns)
                       for s in sources])
    return hashlib.sha256(blob.encode()).hexdigest()


def read_text_pieces(source: Source, errors: str = "strict") -> Iterator[str]:
    """Decoded text of a file or stdin, in pieces split after a newline where possible.

    Decoding is strict UTF-8 by default: a bad byte raises ValueError naming the file and the
    absolute byte offset. ``errors="replace"`` substitutes U+FFFD instead.
    """
    stream = sys.stdin.buffer if source.path is None else open(source.path, "rb")  # noqa: SIM115
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    offset, carry = 0, ""
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
            text = carry + text
            if not raw:
                if text:
                    yield text
                return
            cut = text.rfind("\n") + 1
            if cut == 0 and len(text) < 4 * READ_BYTES:
                carry = text  # keep growing until a newline (or the piece gets too large)
                continue
            cut = cut or len(text)
            carry = text[cut:]
            yield text[:cut]
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


def token_stream(sources: list[Source], tokenizer: Tokenizer, *, errors: str = "strict",
                 separator: int | None = None, leading_separator: bool = False,
                 text_field: str = "text",
                 on_bytes: Callable[[int], None] | None = None) -> Iterator[np.ndarray]:
    """Token ids of all sources in order, as int64 arrays; ``separator`` between documents
    (and before the first one if ``leading_separator``: appending to a non-empty tree).

    The stream is a deterministic function of the inputs (the same pieces are tokenized the
    same way every time), which is what makes resuming an interrupted ingest exact.
    """
    first = not leading_separator
    for source in sources:
        documents = ([read_text_pieces(source, errors)] if source.kind != "jsonl" else
                     ([text] for text in read_jsonl_texts(source, text_field)))
        for pieces in documents:
            if not first and separator is not None:
                yield np.array([separator], dtype=np.int64)
            first = False
            for piece in pieces:
                if on_bytes is not None:
                    on_bytes(len(piece.encode("utf-8", errors="surrogatepass")))
                ids = tokenizer.encode(piece)
                if ids:
                    yield np.asarray(ids, dtype=np.int64)


# -- the pipeline ------------------------------------------------------------------------------

@dataclass
class IngestStats:
    tokens: int = 0
    gists: dict[int, int] = field(default_factory=dict)
    skipped: int = 0  # tokens of an interrupted run that were already committed


class Ingestor:
    """Appends token ids to a tree and makes every gist as soon as its children are complete.

    Args:
        tree: a tree opened for append.
        embedding: the base model's input-embedding matrix ``[vocab, c]``.
        compressor: GistNet (or the mean-pool baseline): ``[g, s, c], level -> [g, c]``.
        batch_spans: spans per GistNet call.
        commit_every: commit after about this many tokens (a commit costs a few fsyncs).
    """

    def __init__(self, tree: MegaContextTree, embedding: torch.Tensor, compressor: Compressor,
                 *, batch_spans: int = 1024, commit_every: int = 1 << 18) -> None:
        if embedding.shape != (tree.vocab_size, tree.hidden_size):
            raise ValueError(f"embedding matrix has shape {tuple(embedding.shape)}, tree at "
                             f"{tree.path} needs ({tree.vocab_size}, {tree.hidden_size})")
        self.tree, self.embedding, self.compressor = tree, embedding, compressor
        self.batch_spans, self.commit_every = batch_spans, commit_every
        self.span = tree.span
        self.dtype = TORCH_DTYPES[tree.gist_dtype]
        # Pending children per level, rebuilt from what the tree has committed: tokens past
        # the last complete L1 span, and gists of level k−1 past the last complete level-k span.
        self.pending: list[np.ndarray | torch.Tensor] = [
            tree.tokens(tree.count(1) * self.span, tree.num_tokens).numpy()]
        for level in range(2, tree.levels + 1):
            self.pending.append(tree.gists(level - 1, tree.count(level) * self.span,
                                           tree.count(level - 1)))
        self.uncommitted = 0
        self.stats = IngestStats(gists={k: 0 for k in range(1, tree.levels + 1)})

    def feed(self, ids: np.ndarray, note: dict | None = None) -> None:
        """Append ``ids`` (int64 ``[n]``) and every gist they complete; commit periodically."""
        ids = np.asarray(ids)
        if ids.size == 0:
            return
        self.tree.append_tokens(ids)
        self.stats.tokens += ids.size
        buffered = np.concatenate([self.pending[0], ids])
        full = buffered.size // self.span * self.span
        self.pending[0] = buffered[full:]
        children = buffered[:full]
        if full:
            self._make_gists(torch.from_numpy(children.astype(np.int64)))
        self.uncommitted += ids.size
        if self.uncommitted >= self.commit_every:
            self.commit(note)

    @torch.inference_mode()
    def _make_gists(self, ids: torch.Tensor) -> None:
        """Level 1 from complete token spans, then cascade upwards as spans complete."""
        spans = rearrange(ids, "(g s) -> g s", s=self.span)
        new = torch.cat([self._compress(self.embedding[spans[i:i + self.batch_spans]], 1)
                         for i in range(0, spans.shape[0], self.batch_spans)])
        self._append(1, new)
        for level in range(2, self.tree.levels + 1):
            buffered = torch.cat([self.pending[level - 1], new])
            full = buffered.shape[0] // self.span * self.span
            self.pending[level - 1] = buffered[full:]
            if not full:
                break
            children = rearrange(buffered[:full], "(g s) c -> g s c", s=self.span)
            new = torch.cat([self._compress(children[i:i + self.batch_spans], level)
                             for i in range(0, children.shape[0], self.batch_spans)])
            self._append(level, new)

    def _compress(self, children: torch.Tensor, level: int) -> torch.Tensor:
        gists = self.compressor(children.float(), level)  # [g, c]
        # Round to the stored dtype now, so the next level reads exactly what disk holds.
        return gists.to(self.dtype).float()

    def _append(self, level: int, gists: torch.Tensor) -> None:
        self.tree.append_gists(level, gists)
        self.stats.gists[level] += gists.shape[0]

    def commit(self, note: dict | None = None) -> None:
        self.tree.commit(extra={"ingest": note} if note is not None else None)
        self.uncommitted = 0


def ingest(tree: MegaContextTree, sources: list[Source], tokenizer: Tokenizer,
           embedding: torch.Tensor, compressor: Compressor, *, errors: str = "strict",
           separator: int | None = None, batch_spans: int = 1024, commit_every: int = 1 << 18,
           progress: Callable[[int, int], None] | None = None) -> IngestStats:
    """Stream ``sources`` into ``tree``; resume if the tree holds an interrupted run of them.

    Args:
        progress: called as ``progress(bytes_read, tokens_appended)`` increments.
    """
    digest = inputs_digest(sources)
    previous = (tree.header.get("extra") or {}).get("ingest") or {}
    resume = (digest is not None and previous.get("inputs") == digest
              and not previous.get("done", True))
    start = previous["start_tokens"] if resume else tree.num_tokens
    skip = tree.num_tokens - start  # tokens of this stream already committed
    note = {"inputs": digest, "start_tokens": start, "done": False}
    worker = Ingestor(tree, embedding, compressor, batch_spans=batch_spans,
                      commit_every=commit_every)
    worker.stats.skipped = skip
    on_bytes = (lambda n: progress(n, 0)) if progress else None
    for ids in token_stream(sources, tokenizer, errors=errors, separator=separator,
                            leading_separator=start > 0, on_bytes=on_bytes):
        if skip:
            take = min(skip, ids.size)
            ids, skip = ids[take:], skip - take
        if ids.size:
            worker.feed(ids, note)
            if progress:
                progress(0, ids.size)
    worker.commit({**note, "done": True})
    return worker.stats

