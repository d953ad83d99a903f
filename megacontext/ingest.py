"""Streaming ingest: text -> token ids -> embeddings -> GistNet level by level -> tree appends.

Axes: ``n`` tokens, ``g`` spans (one gist each), ``s`` span (32), ``c`` hidden size.

Text is read in pieces and regrouped into segments that tokenize exactly as the whole
document does (:func:`megacontext.textio.exact_segments`): the stored ids are the tokenizer's
ids for each document, whatever the read size.

Gists are computed in **chunks** of ``CHUNK_SPANS`` (64) spans aligned on the node index
(chunk ``j`` of level ``k`` holds nodes ``64j … 64j + 63``), each by a compressor call of
exactly ``[64, 32, c]`` (or by GistNet's own inner call of that shape: see ``_gists``),
whatever the feeds and commits. A chunk is computed when its 64 spans are complete, and at a
commit if some of its spans are complete then (padded with zeros to 64: spans never interact,
and the new rows are appended); when the rest of it completes, the whole chunk is computed
again and only the rows not yet stored are appended. So every gist comes from a call of the
same shape, at the same row, on the same inputs: float summation order never depends on how
the stream was chunked, committed or interrupted, and a resumed ingest writes the same bytes
as an uninterrupted one (on the same machine and torch build; ``tests/test_ingest.py`` checks
it byte for byte).

A GistNet's level 1 reads ids, not embeddings (``GistNet.from_ids``): its down-projection
of every vocabulary row is computed once per ingest and looked up per token, which saves a
third of its work and agrees with the embedding path to float32 rounding (stored float16
gists: within one ulp); the rule above holds for that path as for the other.

Gists feed the next level *as stored* (rounded to the tree's gist dtype), so a level-2 gist is
the same whether its children were just computed or read back from disk after a restart. RAM
holds at most one chunk's children per level (the tail of each level past its last complete
chunk); everything else goes straight to the tree. After every commit
``count(k) == count(k−1) // 32``.

Resume: each commit records in the tree header an ``ingest`` note — a digest of the inputs
and the token count when this ingest started. Re-running an interrupted ingest over the same
inputs skips the tokens already committed and carries on.

Idempotence: the final commit records every input streamed (path, size, SHA-256, token
range, time) in the tree's inputs log (:func:`plan_inputs`); a later run skips inputs the
record holds and refuses changed ones, unless asked (``again``, ``append_changed``).

Token index: a tree that has one (``<tree>/lexicon/``, ``megacontext index``) has it extended
after the final commit (:func:`extend_token_index`: one segment for the spans added), a tree
without one gets none. The index is derived data outside the tree's commits: a run killed
before or during the extension leaves it behind (readers scan the spans past it, with the
scan's scores), and the next ingest, or ``megacontext index``, adds them.
"""

from __future__ import annotations

import copy
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from megacontext.base.tokenizer import Tokenizer
from megacontext.dtypes import TORCH_DTYPES
from megacontext.gistnet import Compressor
from megacontext.ingest_plan import InputPlan, inputs_digest, plan_inputs
from megacontext.textio import (
    PART_CHARS,
    TEXT_SUFFIXES,
    Source,
    exact_segments,
    read_jsonl_texts,
    read_text_pieces,
    split_exact,
    splits_words_of,
)
from megacontext.tree import MegaContextTree
from megacontext.tree.format import HEADER_NAME
from megacontext.tree.format import utc_now as fmt_now
from megacontext.tree.lexicon import Lexicon, build_lexicon, lexicon_dir

__all__ = ["CHUNK_SPANS", "PRECISIONS", "TEXT_SUFFIXES", "IngestStats", "Ingestor", "InputPlan",
           "Source", "TokenRanges", "expand_inputs", "extend_token_index", "ingest",
           "inputs_digest", "marked_stream", "plan_inputs", "read_jsonl_texts",
           "read_text_pieces", "token_stream"]

CHUNK_SPANS = 64  # spans per compressor call, aligned on the node index (see above)
GROUP_SPANS = 16 * CHUNK_SPANS  # spans whose children are gathered at once (RAM: 75 MB at c=576)
PRECISIONS = ("float32", "bfloat16")  # what the compressor computes in (Ingestor's precision=)


# -- reading inputs ----------------------------------------------------------------------------

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


def token_stream(sources: list[Source], tokenizer: Tokenizer, *, errors: str = "strict",
                 separator: int | None = None, leading_separator: bool = False,
                 text_field: str = "text",
                 on_bytes: Callable[[int], None] | None = None,
                 part_chars: int | None = PART_CHARS) -> Iterator[np.ndarray]:
    """Token ids of all sources in order, as int64 arrays; ``separator`` between documents
    (and before the first one if ``leading_separator``: appending to a non-empty tree).

    Each document's ids are exactly ``tokenizer.encode(document)``: its text is read in
    pieces and regrouped by :func:`megacontext.textio.exact_segments`. The stream is a
    deterministic function of the inputs, which is what makes resuming an interrupted ingest
    exact. Each segment is encoded as one batch of parts of about ``part_chars`` characters
    (:func:`~megacontext.textio.split_exact`; None: whole), which the tokenizer runs in
    parallel; the ids are the same either way.
    """
    for _, ids, _ in marked_stream(sources, tokenizer, errors=errors, separator=separator,
                                   leading_separator=leading_separator,
                                   text_field=text_field, on_bytes=on_bytes,
                                   part_chars=part_chars):
        if ids is not None:
            yield ids


def marked_stream(sources: list[Source], tokenizer: Tokenizer, *, errors: str = "strict",
                  separator: int | None = None, leading_separator: bool = False,
                  text_field: str = "text",
                  on_bytes: Callable[[int], None] | None = None,
                  part_chars: int | None = PART_CHARS
                  ) -> Iterator[tuple[int, np.ndarray | None, bool]]:
    """:func:`token_stream` with its sources marked: ``(i, None, False)`` where source ``i``
    starts, then ``(i, ids, is_separator)`` for its arrays (the separator before a document
    is an array of its own). The ids are token_stream's, in the same order."""
    first = not leading_separator
    words = splits_words_of(tokenizer)
    for i, source in enumerate(sources):
        yield i, None, False
        documents = ([read_text_pieces(source, errors)] if source.kind != "jsonl" else
                     ([text] for text in read_jsonl_texts(source, text_field)))
        for pieces in documents:
            if not first and separator is not None:
                yield i, np.array([separator], dtype=np.int64), True
            first = False
            for segment in exact_segments(pieces, tokenizer):
                if on_bytes is not None:
                    on_bytes(len(segment.encode("utf-8", errors="surrogatepass")))
                # Parts of the segment cut where their tokens cannot change, encoded as one
                # batch: the Rust tokenizer runs them on every core (2.2 s -> 1.2 s per 10^6
                # tokens on 2 cores: megacontext.bench.tokenize), and releases the GIL
                # meanwhile (a prefetch thread tokenizes while GistNet computes). Same ids.
                parts = ([segment] if part_chars is None else
                         split_exact(segment, tokenizer, part_chars, splits_words=words))
                ids = np.fromiter(itertools.chain.from_iterable(tokenizer.encode_batch(parts)),
                                  dtype=np.int64)
                if ids.size:
                    yield i, ids, False


class TokenRanges:
    """Follows a :func:`marked_stream` and gives each source the tokens ``[a, b)`` it produced
    (global tree indices, the separator before it excluded)."""

    def __init__(self, start: int) -> None:
        self.pos = start  # tree index of the next token of the stream
        self.ranges: dict[int, list[int]] = {}
        self.done: list[int] = []  # sources whose last token has been counted, in order
        self._open: int | None = None
        self._seen = False

    def see(self, i: int, ids: np.ndarray | None, is_separator: bool) -> None:
        if ids is None:
            self.close()
            self._open, self._seen = i, False
            self.ranges[i] = [self.pos, self.pos]
            return
        self.pos += int(ids.size)
        if is_separator and not self._seen:
            self.ranges[i][0] = self.pos  # the separator before the source is not its own
        else:
            self._seen = True
        self.ranges[i][1] = self.pos

    def close(self) -> None:
        if self._open is not None:
            self.done.append(self._open)
            self._open = None


def prefetched(items: Iterable, depth: int = 4) -> Iterator:
    """``items``, produced by a background thread up to ``depth`` ahead (``depth=0``: in this
    thread). Ingest reads its token stream so: the tokenizer (``encode_batch``, which runs
    without the GIL) then works while GistNet does. An exception in the producer re-raises here, in
    order; leaving the loop early stops the producer."""
    if depth <= 0:
        yield from items
        return
    box: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        box.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            box.put((done, None))
        except BaseException as e:  # noqa: BLE001 — handed to the consumer, raised there
            box.put((done, e))

    worker = threading.Thread(target=produce, name="megacontext-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, error = box.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                box.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.05)


# -- the pipeline ------------------------------------------------------------------------------

@dataclass
class IngestStats:
    tokens: int = 0
    gists: dict[int, int] = field(default_factory=dict)
    skipped: int = 0  # tokens of an interrupted run that were already committed
    held: list[tuple[dict, dict]] = field(default_factory=list)  # inputs the tree held
    inputs: list[dict] = field(default_factory=list)  # the records this run committed
    index: dict | None = None  # the token index's extension (extend_token_index), None: none


class Ingestor:
    """Appends token ids to a tree and makes its gists, in aligned chunks of ``CHUNK_SPANS``
    spans per level (see the module docstring): a gist is stored once its chunk is complete,
    or at the next commit, whichever comes first.

    Args:
        tree: a tree opened for append.
        embedding: the base model's input-embedding matrix ``[vocab, c]``.
        compressor: GistNet (or the mean-pool baseline): ``[g, s, c], level -> [g, c]``; it is
            called with ``g = CHUNK_SPANS`` (a multiple of it for GistNet, see ``_gists``) and
            must compress each span on its own (GistNet, MeanPoolGist, ConstantGist and the
            contextual compressor do).
        commit_every: commit after about this many tokens (a commit costs a few fsyncs).
        batch_spans: ignored (calls are always ``CHUNK_SPANS`` spans); kept so that older
            callers still run.
        device: where the compressor runs (e.g. ``"cuda"``; default: the CPU), on copies of
            it and of the embedding matrix; gists come back to the CPU, rounded to the tree's
            dtype, before they are stored or read by the next level. Another device's kernels
            sum in another order, so its gists may differ from the CPU's within the stored
            dtype's rounding (the resume rule above holds per device).
        precision: ``float32`` (exact: the gists the evaluation computes) or ``bfloat16``:
            the compressor runs under bfloat16 autocast — the numerics GistNet trains with
            (``trainer.precision=bf16-mixed``), ~1.2x faster end to end on a CPU with
            AVX512-BF16 — whose gists differ from float32's by ~0.2% (relative), more than
            float16 storage rounds (~0.02%). The resume rule holds per precision.
    """

    def __init__(self, tree: MegaContextTree, embedding: torch.Tensor, compressor: Compressor,
                 *, commit_every: int = 1 << 18, batch_spans: int | None = None,
                 device: str | torch.device | None = None,
                 precision: str = "float32") -> None:
        if embedding.shape != (tree.vocab_size, tree.hidden_size):
            raise ValueError(f"embedding matrix has shape {tuple(embedding.shape)}, tree at "
                             f"{tree.path} needs ({tree.vocab_size}, {tree.hidden_size})")
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} (expected one of {PRECISIONS})")
        self.precision = precision
        self.device = torch.device(device if device is not None else "cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r}: torch {torch.__version__} sees no CUDA "
                             f"device here; ingest on the CPU (the default) instead")
        if self.device.type != "cpu":
            embedding = embedding.to(self.device)
            if isinstance(compressor, torch.nn.Module):  # a copy: the caller's stays put
                compressor = copy.deepcopy(compressor).to(self.device)
        self.tree, self.embedding, self.compressor = tree, embedding, compressor
        # Level 1 from ids: a GistNet looks its down-projection up per token id (from_ids)
        # instead of computing it per token; other compressors read the embeddings.
        make_table = getattr(compressor, "token_table", None)
        self.token_table = make_table(embedding.float()) if callable(make_table) else None
        self.commit_every = commit_every
        self.span = tree.span
        self.dtype = TORCH_DTYPES[tree.gist_dtype]
        # Per level k (index k − 1): the children of its chunk in progress (token ids for
        # level 1, level-(k−1) gists as stored for k >= 2), and how many of that chunk's gists
        # the tree already holds (stored by a commit before the chunk was complete). Rebuilt
        # from what the tree has committed.
        self.children: list[np.ndarray | torch.Tensor] = []
        self.stored: list[int] = []
        for level in range(1, tree.levels + 1):
            first = tree.count(level) // CHUNK_SPANS * CHUNK_SPANS  # the chunk's first node
            start, stop = first * self.span, tree.count(level - 1)
            self.children.append(tree.tokens(start, stop).numpy() if level == 1
                                 else tree.gists(level - 1, start, stop))
            self.stored.append(tree.count(level) - first)
        self.uncommitted = 0
        self.stats = IngestStats(gists={k: 0 for k in range(1, tree.levels + 1)})

    def feed(self, ids: np.ndarray, note: dict | None = None) -> None:
        """Append ``ids`` (int64 ``[n]``) and the gists of every chunk they complete; commit
        periodically."""
        ids = np.asarray(ids)
        if ids.size == 0:
            return
        self.tree.append_tokens(ids)
        self.stats.tokens += ids.size
        self.children[0] = np.concatenate([self.children[0], ids.astype(np.int64)])
        self._advance(flush=False)
        self.uncommitted += ids.size
        if self.uncommitted >= self.commit_every:
            self.commit(note)

    @torch.inference_mode()
    def _advance(self, flush: bool) -> None:
        """Compute every complete chunk, level by level (each level's new gists are children
        of the next); with ``flush``, also the complete spans of each chunk in progress."""
        per_chunk = CHUNK_SPANS * self.span  # children per chunk
        for k in range(self.tree.levels):
            kids, stored = self.children[k], self.stored[k]
            full = kids.shape[0] // per_chunk * per_chunk  # children of complete chunks
            spans = (kids.shape[0] - full) // self.span  # complete spans after them
            take = full + (spans * self.span if flush and spans > (stored if not full else 0)
                           else 0)
            if not take:
                continue
            gists = self._gists(kids[:take], k + 1)  # [take / 32, c]
            new = gists[stored:]  # the first rows of the first chunk may be stored already
            self.children[k] = kids[full:]
            self.stored[k] = spans if take > full else 0
            self.tree.append_gists(k + 1, new)
            self.stats.gists[k + 1] += new.shape[0]
            if k + 1 < self.tree.levels:
                self.children[k + 1] = torch.cat([self.children[k + 1], new])

    def _gists(self, kids: np.ndarray | torch.Tensor, level: int) -> torch.Tensor:
        """Gists ``[g, c]`` of the spans of ``kids`` (whose first span starts a chunk), as if
        computed by one compressor call of exactly ``CHUNK_SPANS`` spans per chunk (the last
        one padded with zeros); rounded to the tree's dtype and back to float32, as the next
        level reads them. Children are gathered ``GROUP_SPANS`` spans at a time (bounded RAM).

        A compressor that itself runs its spans in chunks of ``chunk_spans`` dividing
        ``CHUNK_SPANS`` (GistNet: 64) gets a whole group per call: its inner calls are then
        the same, and it saves a call's overhead per chunk (on a busy CPU, each of its small
        operations can cost milliseconds)."""
        inner = getattr(self.compressor, "chunk_spans", None)
        step = (GROUP_SPANS if isinstance(inner, int) and inner > 0 and CHUNK_SPANS % inner == 0
                else CHUNK_SPANS)
        out = []
        for start in range(0, kids.shape[0], GROUP_SPANS * self.span):
            part = kids[start:start + GROUP_SPANS * self.span]
            if level == 1 and self.token_table is not None:
                x = rearrange(torch.from_numpy(part).to(self.device), "(g s) -> g s",
                              s=self.span)
                run = self._from_ids
            else:
                x = (self.embedding[torch.from_numpy(part).to(self.device)] if level == 1
                     else part.to(self.device)).float()
                x = rearrange(x, "(g s) c -> g s c", s=self.span)
                run = self.compressor
            g = x.shape[0]
            if g % CHUNK_SPANS:
                x = torch.cat([x, x.new_zeros(CHUNK_SPANS - g % CHUNK_SPANS, *x.shape[1:])])
            with torch.autocast(self.device.type, dtype=torch.bfloat16,
                                enabled=self.precision == "bfloat16"):
                y = torch.cat([run(x[i:i + step], level).float()
                               for i in range(0, x.shape[0], step)])
            out.append(y[:g].to(self.dtype).float().cpu())
        return torch.cat(out)

    def _from_ids(self, ids: torch.Tensor, level: int) -> torch.Tensor:
        return self.compressor.from_ids(ids, self.embedding, self.token_table)

    def adopt(self, shard: MegaContextTree, level: int, rows: int = 8192) -> None:
        """Append a shard ingested elsewhere (distributed ingest): its tokens and its gists of
        levels ``1 … level`` as they are; the levels above are computed here from its
        level-``level`` gists. The shard must start where this tree ends, on a multiple of
        ``CHUNK_SPANS · 32^level`` tokens, and hold a multiple of that many: its gists then
        came from the same calls, on the same inputs, as this ingest would make (the module
        docstring), so they are the very bytes a serial ingest stores. Read ``rows`` at a time.
        """
        unit = CHUNK_SPANS * self.span ** level
        at, n = self.tree.appended_count(0), shard.count(0)
        pending = [int(self.children[k].shape[0]) for k in range(level)]
        if not 1 <= level <= min(shard.levels, self.tree.levels) or at % unit or n % unit \
                or any(pending):
            raise ValueError(f"cannot adopt a {n}-token shard of level {level} at token {at}: "
                             f"both must be multiples of {unit} (CHUNK_SPANS x 32^level), the "
                             f"level within both trees, and no chunk in progress below it "
                             f"(children pending per level: {pending})")
        for a in range(0, n, rows * self.span):
            ids = shard.tokens(a, min(n, a + rows * self.span))
            self.tree.append_tokens(ids)
            self.stats.tokens += ids.numel()
        for k in range(1, level + 1):
            for a in range(0, shard.count(k), rows):
                g = shard.gists(k, a, min(shard.count(k), a + rows))
                self.tree.append_gists(k, g)
                self.stats.gists[k] += g.shape[0]
                if k == level and k < self.tree.levels:  # children of the next level
                    self.children[k] = torch.cat([self.children[k], g])
                    self._advance(flush=False)
        self.uncommitted += n

    def commit(self, note: dict | None = None) -> None:
        """Store the gists of every complete span (of chunks in progress too), then commit."""
        self._advance(flush=True)
        self.tree.commit(extra={"ingest": note} if note is not None else None)
        self.uncommitted = 0


def ingest(tree: MegaContextTree, sources: list[Source], tokenizer: Tokenizer,
           embedding: torch.Tensor, compressor: Compressor, *, errors: str = "strict",
           separator: int | None = None, commit_every: int = 1 << 18,
           progress: Callable[[int, int], None] | None = None,
           device: str | torch.device | None = None, prefetch: int = 0,
           precision: str = "float32", again: bool = False,
           append_changed: bool = False, index: bool = True) -> IngestStats:
    """Stream ``sources`` into ``tree``: skip inputs it holds, resume an interrupted run of
    them, record each one ingested (:func:`plan_inputs`, ``MegaContextTree.inputs``).

    Args:
        progress: called as ``progress(bytes_read, tokens_appended)`` increments.
        device: where the compressor runs (:class:`Ingestor`; default the CPU).
        prefetch: token arrays tokenized ahead by a background thread (0: none, the
            default: measured slower on 2 cores, docs/ingest.md).
        precision: ``float32`` or ``bfloat16`` (:class:`Ingestor`); recorded in the tree's
            ingest note, and a resume must use the interrupted run's.
        again: append inputs the tree holds already (another copy), and changed ones.
        append_changed: append inputs whose content changed since they were ingested.
        index: extend the tree's token index, when it has one, after the final commit (also
            when nothing was appended: it catches up on an earlier run's spans); False leaves
            it behind (``--no-index``).

    Returns:
        the stats; ``held`` names the inputs skipped, ``inputs`` the records committed,
        ``index`` the token index's extension (:func:`extend_token_index`).

    Raises:
        ValueError: a changed input (without ``append_changed``); another run's interrupted
            ingest (without ``again``); resuming with another precision. Nothing is written.
    """
    plan = plan_inputs(tree, sources, again=again, append_changed=append_changed)
    try:
        stats = _ingest_planned(tree, plan, tokenizer, embedding, compressor, errors=errors,
                                separator=separator, commit_every=commit_every,
                                progress=progress, device=device, prefetch=prefetch,
                                precision=precision, again=again)
    finally:
        plan.cleanup()
    if index:  # after the final commit: a crash before or during it leaves the index behind
        stats.index = extend_token_index(tree)
    return stats


def extend_token_index(tree: MegaContextTree) -> dict | None:
    """Extend ``tree``'s token index, when it has one (``lexicon/header.json``), over every
    committed span: ``build_lexicon``'s incremental build (one segment for the spans added
    since, merged past its limit; crash-safe). Writes only under ``<tree>/lexicon/``; a tree
    without an index is left without one (one ``stat``).

    Returns:
        None without an index; else ``{"spans": covered, "added": spans added, "seconds":
        s}``, or ``{"problem": why}`` when it could not be extended (a refused index, another
        build holding its lock, a failed write): the tree's commit stands, the index stays as
        it was (behind: readers scan past it) until ``megacontext index`` succeeds.
    """
    if not (lexicon_dir(tree.path) / HEADER_NAME).is_file():
        return None
    start = time.perf_counter()
    try:
        old = Lexicon.open(tree)
        if old is None:  # removed since we looked
            return None
        have = old.spans
        del old
        spans = build_lexicon(tree, progress=False).spans
    except (ValueError, RuntimeError, OSError) as e:
        return {"problem": str(e)}
    return {"spans": spans, "added": max(spans - have, 0),
            "seconds": time.perf_counter() - start}


def _ingest_planned(tree: MegaContextTree, plan: InputPlan, tokenizer: Tokenizer,
                    embedding: torch.Tensor, compressor: Compressor, *, errors: str,
                    separator: int | None, commit_every: int,
                    progress: Callable[[int, int], None] | None,
                    device: str | torch.device | None, prefetch: int, precision: str,
                    again: bool) -> IngestStats:
    digest = plan.key
    previous = (tree.header.get("extra") or {}).get("ingest") or {}
    resume = (digest is not None and previous.get("inputs") == digest
              and not previous.get("done", True))
    if resume and previous.get("precision", "float32") != precision:
        raise ValueError(f"{tree.path} holds an interrupted ingest of these inputs made with "
                         f"precision {previous.get('precision', 'float32')!r}; resume it with "
                         f"that precision, not {precision!r} (its gists would mix both)")
    partial = tree.num_tokens - previous.get("start_tokens", tree.num_tokens)
    if not resume and not previous.get("done", True) and partial > 0 and not again \
            and plan.sources:
        names = ", ".join(previous.get("names") or ["(inputs not named: an older ingest)"])
        raise ValueError(f"tree at {tree.path} holds an interrupted ingest of other inputs "
                         f"({names}; {partial:,} of its tokens committed from token "
                         f"{previous['start_tokens']:,}): rerun that command to finish it, or "
                         f"pass --again to keep its partial text and append these inputs "
                         f"after it; nothing was appended")
    if not plan.sources:  # everything held (or no input at all): append nothing
        return IngestStats(gists={k: 0 for k in range(1, tree.levels + 1)}, held=plan.held)
    start = previous["start_tokens"] if resume else tree.num_tokens
    skip = tree.num_tokens - start  # tokens of this stream already committed
    note = {"inputs": digest, "start_tokens": start, "done": False, "precision": precision,
            "names": [r["path"] for r in plan.records[:5]]
            + ([f"and {len(plan.records) - 5} more"] if len(plan.records) > 5 else [])}
    worker = Ingestor(tree, embedding, compressor, commit_every=commit_every, device=device,
                      precision=precision)
    worker.stats.skipped, worker.stats.held = skip, plan.held
    lock, read = threading.Lock(), [0]  # bytes tokenized, counted by the prefetch thread

    def on_bytes(n: int) -> None:
        with lock:
            read[0] += n

    def report(tokens: int) -> None:  # progress is called from this thread only
        if progress:
            with lock:
                nbytes, read[0] = read[0], 0
            progress(nbytes, tokens)

    stream = marked_stream(plan.sources, tokenizer, errors=errors, separator=separator,
                           leading_separator=start > 0, on_bytes=on_bytes)
    ranges, finished = TokenRanges(start), {}
    for i, ids, is_separator in prefetched(stream, prefetch):
        ranges.see(i, ids, is_separator)
        for j in ranges.done[len(finished):]:
            finished[j] = fmt_now()
        if ids is None:
            continue
        if skip:
            take = min(skip, ids.size)
            ids, skip = ids[take:], skip - take
        if ids.size:
            worker.feed(ids, note)
        report(int(ids.size))
    ranges.close()
    records = [{**plan.records[j], "tokens": ranges.ranges[j],
                "ingested": finished.get(j) or fmt_now()} for j in ranges.done]
    # The records ride in the final commit's header replacement: an interrupted run never
    # records an input, a finished one records them all.
    tree.append_inputs(records)
    worker.commit({**note, "done": True})
    worker.stats.inputs = records
    report(0)
    return worker.stats
