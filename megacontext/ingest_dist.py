"""Distributed ingest on ``torch.distributed``: ranks compute disjoint aligned shards, rank 0
merges them into one tree that equals a single-process ingest of the same stream.

    torchrun --standalone --nproc_per_node=R -m megacontext.cli ingest TREE INPUT... [flags]
    torchrun --nnodes=N --node_rank=i --rdzv_endpoint=HOST:PORT --nproc_per_node=R \\
        -m megacontext.cli ingest TREE INPUT... [flags]      # several machines, a shared disk

(gloo: the ranks meet only at barriers; the compute is each rank's CPU ingest.) Nodes of
``32^k`` tokens are independent, so the stream is cut into **shards** of
``CHUNK_SPANS · 32^K`` tokens (``K = --shard-level``, default 2: 65,536 tokens) aligned on
the tree's global token index. Three phases, separated by barriers, all in the work folder
``TREE.shards/`` beside the tree:

1. rank 0 tokenizes the inputs exactly as the serial ingest does (the same
   :func:`~megacontext.ingest.token_stream`) into ``tokens.bin`` and writes ``plan.json``
   (where the stream starts in the tree, its length, the shard size);
2. every rank ingests its shards (shard ``i`` goes to rank ``i mod R``) into shard trees of
   ``K`` levels, ``shard-<i>/``, with the serial ingest's own :class:`Ingestor`: a shard
   starts on a multiple of ``CHUNK_SPANS · 32^K`` tokens, so its gists of levels ``1 … K`` come
   from the same compressor calls, on the same inputs, as in a serial ingest — the same bytes;
3. rank 0 appends, in order, the tokens before the first shard boundary (through its own
   Ingestor), each shard (:meth:`Ingestor.adopt`: tokens and levels ``1 … K`` as stored, the
   levels above computed from them) and the tail after the last complete shard, then removes
   the work folder and extends the tree's token index, when it has one (as the serial ingest
   does: :func:`~megacontext.ingest.extend_token_index`).

Crash safety: every shard tree and the merged tree commit atomically (docs/tree-format.md); a
rerun of the same command finds ``tokens.bin`` complete (its ``tokens.json``), skips shards
that are complete, resumes incomplete ones from their last commit, and resumes the merge from
the tree's committed token count. Memory per process is bounded by the ingest's chunking, not
by the stream's length.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from megacontext.gistnet import Compressor
from megacontext.ingest import (
    CHUNK_SPANS,
    Ingestor,
    IngestStats,
    Source,
    TokenRanges,
    extend_token_index,
    marked_stream,
    plan_inputs,
)
from megacontext.tree import MegaContextTree
from megacontext.tree.format import utc_now

TOKENS_FILE, TOKENS_META, PLAN_FILE = "tokens.bin", "tokens.json", "plan.json"


def work_dir(tree_dir: str | Path) -> Path:
    """The distributed ingest's work folder: ``TREE.shards`` beside the tree."""
    p = Path(tree_dir)
    return p.parent / (p.name + ".shards")


@dataclass(frozen=True)
class ShardPlan:
    """Where the stream goes: tokens ``[base, base + total)`` of the tree, shards of ``size``.

    Shard ``i`` (global index) covers tokens ``[i·size, (i+1)·size)``; the shards are those
    wholly inside the stream. The part before the first and after the last is fed serially.
    """

    base: int
    total: int
    size: int
    level: int

    @property
    def first(self) -> int:
        return -(-self.base // self.size)

    @property
    def shards(self) -> range:
        return range(self.first, max(self.first, (self.base + self.total) // self.size))

    def bounds(self, i: int) -> tuple[int, int]:
        return i * self.size, (i + 1) * self.size

    def serial_parts(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Token ranges fed serially (global): before the first shard and after the last (a
        stream without a whole shard is all head)."""
        end = self.base + self.total
        if not self.shards:
            return (self.base, end), (end, end)
        return (self.base, self.bounds(self.shards[0])[0]), (self.bounds(self.shards[-1])[1], end)


def shard_size(level: int, span: int = 32) -> int:
    """Tokens per shard of ``level``: ``CHUNK_SPANS · span^level``."""
    return CHUNK_SPANS * span ** level


def tokenize(sources: list[Source], tokenizer, work: Path, *, leading_separator: bool,
             errors: str, separator: int | None, digest: str | None,
             on_bytes: Callable[[int], None] | None = None) -> tuple[int, list]:
    """Rank 0: the stream's token ids into ``work/tokens.bin`` (int64), done when
    ``tokens.json`` names its count, the inputs' digest and each source's token range
    ``[a, b)`` within the stream; reused when it matches. Returns ``(count, ranges)``."""
    meta = work / TOKENS_META
    if meta.is_file():
        m = json.loads(meta.read_text())
        if m.get("inputs") == digest and digest is not None and "ranges" in m and \
                (work / TOKENS_FILE).stat().st_size == 8 * m["count"]:
            return int(m["count"]), m["ranges"]
    work.mkdir(parents=True, exist_ok=True)
    count, ranges = 0, TokenRanges(0)
    with open(work / TOKENS_FILE, "wb") as f:
        for i, ids, is_separator in marked_stream(sources, tokenizer, errors=errors,
                                                  separator=separator,
                                                  leading_separator=leading_separator,
                                                  on_bytes=on_bytes):
            ranges.see(i, ids, is_separator)
            if ids is not None:
                f.write(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
                count += ids.size
        f.flush()
        os.fsync(f.fileno())
    ranges.close()
    spans = [ranges.ranges[i] for i in range(len(sources))]
    tmp = meta.with_suffix(".tmp")
    tmp.write_text(json.dumps({"count": count, "inputs": digest, "ranges": spans}))
    os.replace(tmp, meta)
    return count, spans


def read_tokens(work: Path, count: int) -> np.ndarray:
    return np.memmap(work / TOKENS_FILE, dtype=np.int64, mode="r", shape=(count,))


def ingest_shard(work: Path, i: int, plan: ShardPlan, tokens: np.ndarray, template: dict,
                 embedding: torch.Tensor, compressor: Compressor,
                 commit_every: int = 1 << 18) -> bool:
    """Ingest shard ``i`` into ``work/shard-<i>`` (resuming a partial one); False if it was
    complete already."""
    path = work / f"shard-{i:08d}"
    a, b = plan.bounds(i)
    if (path / "header.json").is_file():
        tree = MegaContextTree.open(path, mode="a")
    else:
        tree = MegaContextTree.create(path, **template, levels=plan.level)
    with tree:
        done = tree.num_tokens
        if done == plan.size:
            return False
        worker = Ingestor(tree, embedding, compressor, commit_every=commit_every)
        lo = a - plan.base + done
        for start in range(lo, b - plan.base, commit_every):
            worker.feed(np.asarray(tokens[start:min(b - plan.base, start + commit_every)]))
        worker.commit()
    return True


def merge(tree: MegaContextTree, work: Path, plan: ShardPlan, tokens: np.ndarray,
          embedding: torch.Tensor, compressor: Compressor, note: dict, *,
          commit_every: int = 1 << 18,
          progress: Callable[[int], None] | None = None,
          records: list[dict] | None = None) -> IngestStats:
    """Rank 0: the serial head, the shards in order, the serial tail; resumes from the tree's
    committed token count. ``records`` (the inputs' records) ride in the final commit."""
    worker = Ingestor(tree, embedding, compressor, commit_every=commit_every)
    head, tail = plan.serial_parts()

    def feed(a: int, b: int) -> None:
        for s in range(max(a, tree.num_tokens), b, commit_every):
            ids = np.asarray(tokens[s - plan.base:min(b, s + commit_every) - plan.base])
            worker.feed(ids, note)
            if progress:
                progress(ids.size)

    feed(*head)
    for i in plan.shards:
        a, b = plan.bounds(i)
        if tree.num_tokens >= b:
            continue  # merged before an interruption
        if tree.num_tokens > a:  # an interrupted serial ingest of this stream got this far
            feed(a, b)
            continue
        with MegaContextTree.open(work / f"shard-{i:08d}") as shard:
            if shard.num_tokens != plan.size:
                raise ValueError(f"shard {i} at {work} holds {shard.num_tokens} tokens, "
                                 f"expected {plan.size}: its rank did not finish")
            worker.adopt(shard, plan.level)
        worker.commit(note)
        if progress:
            progress(plan.size)
    feed(*tail)
    if records:
        tree.append_inputs(records)
        worker.stats.inputs = records
    worker.commit({**note, "done": True})
    return worker.stats


def tree_template(tree: MegaContextTree) -> dict:
    """What a shard tree copies from the tree it will be merged into."""
    return {"hidden_size": tree.hidden_size, "vocab_size": tree.vocab_size, "rope": tree.rope,
            "fingerprint": tree.fingerprint, "gist_dtype": tree.gist_dtype,
            "gistnet_digest": tree.gistnet_digest}


def distributed_ingest(tree_dir: str | Path, sources: list[Source], tokenizer,
                       embedding: torch.Tensor, compressor: Compressor, *, shard_level: int = 2,
                       errors: str = "strict", separator: int | None = None,
                       commit_every: int = 1 << 18,
                       progress: Callable[[str, int], None] | None = None,
                       again: bool = False, append_changed: bool = False,
                       index: bool = True) -> IngestStats | None:
    """Run one rank of a distributed ingest into the existing tree at ``tree_dir`` (module
    docstring). ``torch.distributed`` must be initialised. Returns rank 0's stats (None on
    the other ranks). ``progress(phase, n)`` reports tokens done per phase.

    Inputs are planned as in the serial ingest (:func:`~megacontext.ingest.plan_inputs`:
    inputs the tree holds are skipped, changed ones refused, unless ``again`` or
    ``append_changed``), on rank 0, whose verdict every rank gets before any work: a refusal
    raises the same ValueError on every rank. Standard input is refused (rank 0 alone could
    read it). The records ride in the merge's final commit. With ``index``, rank 0 then
    extends the tree's token index when it has one (also when every input was held), as the
    serial ingest does."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    work = work_dir(tree_dir)
    verdict: list = [None]  # rank 0's refusal, or "held" when there is nothing to ingest
    inputs_plan, held = None, []
    if rank == 0:
        try:
            if any(s.path is None for s in sources):
                raise ValueError("input '-': distributed ingest reads files; pipe standard "
                                 "input into a serial ingest instead")
            with MegaContextTree.open(tree_dir) as tree:
                if not 1 <= shard_level <= tree.levels:
                    raise ValueError(f"--shard-level {shard_level} must lie in [1, "
                                     f"{tree.levels}] (the tree's levels)")
                inputs_plan = plan_inputs(tree, sources, again=again,
                                          append_changed=append_changed)
                note = (tree.header.get("extra") or {}).get("ingest") or {}
            held = inputs_plan.held
            if not inputs_plan.sources:
                verdict = ["held"]
                if work.exists() and note.get("done"):
                    # A run killed after the merge's final commit, before it removed its
                    # work folder: the tree holds all of it, so the folder is leftovers.
                    shutil.rmtree(work)
        except ValueError as e:
            verdict = [str(e)]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] == "held":
        if rank != 0:
            return None
        stats = IngestStats(held=held)
        if index:  # catch up on spans an earlier run committed but did not index
            with MegaContextTree.open(tree_dir) as tree:
                stats.index = extend_token_index(tree)
        return stats
    if verdict[0] is not None:
        raise ValueError(verdict[0])
    if rank == 0:
        sources, digest = inputs_plan.sources, inputs_plan.key
        with MegaContextTree.open(tree_dir, mode="a") as tree:
            previous = (tree.header.get("extra") or {}).get("ingest") or {}
            resume = (digest is not None and previous.get("inputs") == digest
                      and not previous.get("done", True))
            base = previous["start_tokens"] if resume else tree.num_tokens
            if not resume:
                if work.exists():
                    shutil.rmtree(work)  # the leftovers of another stream
                # Say what is under way before any work: a rerun then resumes it.
                tree.commit(extra={"ingest": {"inputs": digest, "start_tokens": base,
                                              "done": False}})
            span = tree.span
        total, spans = tokenize(sources, tokenizer, work, leading_separator=base > 0,
                                errors=errors, separator=separator, digest=digest)
        records = [{**r, "tokens": [base + a, base + b], "ingested": None}
                   for r, (a, b) in zip(inputs_plan.records, spans, strict=True)]
        plan = ShardPlan(base, total, shard_size(shard_level, span), shard_level)
        old = work / PLAN_FILE
        if old.is_file() and {k: v for k, v in json.loads(old.read_text()).items()
                              if k != "world"} != asdict(plan):
            for stale in work.glob("shard-*"):  # shards of another shape: start them over
                shutil.rmtree(stale)
        (work / PLAN_FILE).write_text(json.dumps({**asdict(plan), "world": world}))
    dist.barrier()
    meta = json.loads((work / PLAN_FILE).read_text())
    plan = ShardPlan(meta["base"], meta["total"], meta["size"], meta["level"])
    with MegaContextTree.open(tree_dir) as tree:
        template = tree_template(tree)
    tokens = read_tokens(work, plan.total)
    for i in plan.shards:
        if i % world == rank:
            ingest_shard(work, i, plan, tokens, template, embedding, compressor, commit_every)
            if progress:
                progress("shards", plan.size)
    dist.barrier()
    stats = None
    if rank == 0:
        note = {"inputs": digest, "start_tokens": plan.base, "done": False,
                "distributed": {"world": world, "shard_level": plan.level},
                "names": [r["path"] for r in records[:5]]}
        with MegaContextTree.open(tree_dir, mode="a") as tree:
            stats = merge(tree, work, plan, tokens, embedding, compressor, note,
                          commit_every=commit_every,
                          progress=(lambda n: progress("merge", n)) if progress else None,
                          records=[{**r, "ingested": utc_now()} for r in records])
            stats.held = held
        del tokens
        shutil.rmtree(work)
        if index:  # after the final commit: a crash here leaves the index behind, not wrong
            with MegaContextTree.open(tree_dir) as tree:
                stats.index = extend_token_index(tree)
    dist.barrier()
    return stats


__all__ = ["ShardPlan", "distributed_ingest", "ingest_shard", "merge", "shard_size", "tokenize",
           "work_dir"]
