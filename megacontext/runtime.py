"""The memory runtime loop: a frozen base model reading a memory tree through the allocator.

Axes: ``w`` working-context entries, ``c`` hidden size, ``v`` vocabulary.

Text goes into a :class:`MegaContextTree` through the ingest pipeline (gists are made as spans
complete). Every ``refocus_every`` tokens the :class:`FocusAllocator` reassembles the working
context under its budget; between refocuses each new token joins the context as a raw entry.
The KV cache keeps the keys and values of the working context's entries; after a refocus only
the entries from the first changed one onwards are recomputed (``WorkingContext.common_prefix``).
Between refocuses the context holds up to ``budget + refocus_every − 1`` entries.

The RoPE is resolved once per refocus (``materialize`` -> ``rope.resolve``). With
``scaling="auto"`` its factor is a power of two of the extent over the trained length, so it
changes only when the extent crosses a step (L, 2L, 4L …): within one step the cache is
reused; at a step every entry is recomputed once (``stats["rope_changes"]`` counts those).

With a read-time position rule other than ``exact`` (``positions=``, ``megacontext.positions``)
the context stays inside the trained length and no scaling is needed. Those rules move the
far entries' positions when the context changes, so the reused prefix is the common one whose
positions are also unchanged (the local boundary steps once every ``quantum`` tokens; between
steps the far ranks before a change stay put): the cache stays exact, never re-rotated.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from megacontext.allocator import FocusAllocator, Query
from megacontext.base import BaseLM
from megacontext.base.cache import KVCache
from megacontext.encoders import compressor_for
from megacontext.gistnet import Compressor, GistLane, lane_of
from megacontext.ingest import Ingestor
from megacontext.positions import PositionRule
from megacontext.rope import RopeConfig
from megacontext.tree import MegaContextTree
from megacontext.working_context import WorkingContext, materialize


def with_raw_token(wc: WorkingContext) -> WorkingContext:
    """``wc`` plus one raw entry for token ``wc.cursor``."""
    t = wc.cursor
    return WorkingContext(np.append(wc.levels, 0), np.append(wc.starts, t),
                          np.append(wc.ends, t + 1), np.append(wc.positions, float(t)),
                          t + 1, span=wc.span, born=np.append(wc.born, wc.step), step=wc.step)


class OracleJudge:
    """What the allocator's ``oracle`` scorer asks: the real ΔNLL of a change of context.

    ``delta_nll(before, after)`` materializes both working contexts from ``tree``, appends the
    known ``continuation`` (token ids that follow the cursor) as raw tokens, and returns
    ``NLL(after) − NLL(before)`` on it, in nats per token. One base-model pass per context
    (cached per context), so it is slow: for research, and as labels for a learned scorer.

    Use: ``FocusAllocator(budget, scorer="oracle", scorer_options={"judge": judge})``;
    ``lane``: the gist lane the reader reads gists through (the GistNet's, if it has one).
    """

    def __init__(self, lm: BaseLM, tree: MegaContextTree, continuation: Sequence[int], *,
                 gist_rope: str = "point", rope: RopeConfig | None = None,
                 lane: GistLane | None = None,
                 positions: PositionRule | str | None = None) -> None:
        if len(continuation) < 1:
            raise ValueError("the oracle needs at least one continuation token to score")
        self.lm, self.tree, self.gist_rope = lm, tree, gist_rope
        self.rope, self.lane = rope or lm.config.rope, lane
        self.positions = PositionRule.of(positions)
        self.targets = torch.tensor([list(continuation)])  # [1, H]
        self._nll: dict[tuple, float] = {}

    @torch.no_grad()
    def nll(self, wc: WorkingContext) -> float:
        key = (wc.levels.tobytes(), wc.starts.tobytes())
        if key not in self._nll:
            m = materialize(wc, self.tree, lambda ids: self.lm.embed(ids[None])[0],
                            rope=self.rope, gist_rope=self.gist_rope,
                            max_position=self.lm.config.max_position,
                            positions=self.positions)
            h = self.targets.shape[1]
            emb = torch.cat([m.embeddings, self.lm.embed(self.targets)[0].float()])[None]
            pos = torch.cat([m.positions,
                             m.next_position + torch.arange(h, dtype=torch.float64)])
            att = m.attenuation
            if att is not None:
                att = torch.cat([att, torch.ones(h, att.shape[1], dtype=att.dtype)])
            lane = None if self.lane is None else self.lane.at(
                torch.cat([m.gist_rows, torch.zeros(h, dtype=torch.bool)]))
            logits = self.lm(emb, pos, att, rope=m.rope, num_logits=h + 1, lane=lane)[0, :-1]
            self._nll[key] = F.cross_entropy(logits.float(), self.targets[0]).item()
        return self._nll[key]

    def delta_nll(self, before: WorkingContext, after: WorkingContext) -> float:
        return self.nll(after) - self.nll(before)


class MemoryLM:
    """Feed text into a memory of any length; score or generate from it under a fixed budget.

    Args:
        lm: the frozen base model.
        compressor: GistNet (``load_gistnet``; a contextual one is wrapped with ``lm``) or
            ``MeanPoolGist``.
        allocator: chooses the working context at each refocus.
        tree: an existing tree opened for append (built for ``lm``); default: a new one.
        tree_dir: where to create the new tree (default: a temporary directory).
        levels, gist_dtype: of a new tree.
        refocus_every: tokens between refocuses.
        gist_rope: ``point`` | ``span`` | ``gaussian``.
        rope: the run's RoPE (e.g. ``scaling="auto"``: a power-of-two factor, re-resolved at
            each refocus); default the model's own.
        use_cache: reuse the KV cache of the unchanged prefix (False recomputes everything:
            slower, for checking).
        positions: the read-time position rule (``exact``, the default; ``compact``,
            ``grouped``, ``single``; a ``PositionRule`` for its ``local`` and ``quantum``).

    A GistNet with a gist lane is read through it: the gist rows of every working context go
    through the lane, raw tokens through the frozen model (cached keys and values of gist
    rows are the lane's, so the KV cache is reused across refocuses as without one).
    """

    def __init__(self, lm: BaseLM, compressor: Compressor, allocator: FocusAllocator, *,
                 tree: MegaContextTree | None = None, tree_dir: str | None = None,
                 levels: int = 2, gist_dtype: str = "float16", refocus_every: int = 32,
                 gist_rope: str = "point", rope: RopeConfig | None = None,
                 use_cache: bool = True, gistnet_digest: str | None = None,
                 positions: PositionRule | str | dict | None = None) -> None:
        if refocus_every < 1:
            raise ValueError(f"refocus_every={refocus_every} must be >= 1")
        self.lm, self.allocator = lm, allocator
        self._tmp = None
        if tree is None:
            if tree_dir is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="megacontext-memory-")
                tree_dir = self._tmp.name + "/tree"
            tree = MegaContextTree.create(
                tree_dir, hidden_size=lm.config.hidden_size, vocab_size=lm.config.vocab_size,
                rope=lm.config.rope, fingerprint=lm.fingerprint, levels=levels,
                gist_dtype=gist_dtype, gistnet_digest=gistnet_digest)
        self.tree = tree
        embedding = lm.model.embed_tokens.weight.detach().float()
        # a contextual GistNet reads the base model's first layers: wrap it with this model
        self.ingestor = Ingestor(tree, embedding, compressor_for(compressor, lm),
                                 commit_every=1 << 62)
        self.lane = lane_of(compressor)
        self.refocus_every, self.gist_rope = refocus_every, gist_rope
        self.rope, self.use_cache = rope or lm.config.rope, use_cache
        self.positions = PositionRule.of(positions)
        self._placed: torch.Tensor | None = None  # read-time positions of the cached entries
        self._shift = 0.0  # exact − read-time position of the local entries since the refocus
        self.cache = KVCache()
        self.cached: WorkingContext | None = None  # the context the model last read
        self._inputs: list = []  # without the cache: embeddings, positions, attenuation, rows
        self._rope: RopeConfig | None = None  # the RoPE resolved at the last refocus
        self.context: WorkingContext | None = None  # the allocator's last choice
        self._logits: torch.Tensor | None = None  # next-token logits at the cursor
        self._since_refocus = 0
        # entries_computed: entries the base model ran on; entries_reused: cached entries those
        # passes read instead of recomputing; rope_changes: refocuses whose resolved RoPE
        # differed from the cache's, so that everything was recomputed; position_moves:
        # refocuses where the position rule moved an entry of the kept prefix (recomputed from
        # that entry on).
        self.stats = {"refocuses": 0, "entries_computed": 0, "entries_reused": 0,
                      "rope_changes": 0, "position_moves": 0}

    # -- memory ----------------------------------------------------------------------------

    @property
    def cursor(self) -> int:
        """Tokens in the memory, including those appended since the last commit."""
        return self.tree.appended_count(0)

    @property
    def read_positions(self) -> torch.Tensor | None:
        """``[w]`` float64: where the model read each entry of the current context (the
        position rule's positions; None before the first refocus)."""
        return self._placed

    def feed(self, ids: Sequence[int] | np.ndarray | str) -> None:
        """Append text or token ids to the memory (gists are made as spans complete)."""
        if isinstance(ids, str):
            ids = self.lm.tokenizer.encode(ids)
        self.ingestor.feed(np.asarray(ids, dtype=np.int64))
        self.ingestor.commit()
        self._logits = None  # the next prediction needs a refocus

    def query_vector(self, ids: Sequence[int] | str) -> torch.Tensor:
        """A similarity query ``[c]``: the mean input embedding of ``ids`` (or text)."""
        return self.query_tokens(ids).mean(0)

    def query(self, ids: Sequence[int] | str) -> Query:
        """A query every scorer reads: the token ids of ``ids`` (or text; ``lexical`` reads
        them) and their input embeddings ``[q, c]`` (``similarity``, ``lens``)."""
        if isinstance(ids, str):
            ids = self.lm.tokenizer.encode(ids)
        return Query(ids=np.asarray(list(ids), dtype=np.int64),
                     embeddings=self.query_tokens(ids))

    def query_tokens(self, ids: Sequence[int] | str) -> torch.Tensor:
        """A query as token embeddings ``[q, c]`` of ``ids`` (or text): what the ``lens``
        scorer reads; ``similarity`` reads their mean."""
        if isinstance(ids, str):
            ids = self.lm.tokenizer.encode(ids)
        if len(ids) == 0:
            raise ValueError("a query needs at least one token")
        with torch.no_grad():
            return self.lm.embed(torch.tensor([list(ids)]))[0].float()

    # -- the loop --------------------------------------------------------------------------

    @torch.no_grad()
    def refocus(self, query: torch.Tensor | Query | None = None) -> torch.Tensor:
        """Commit, reassemble the working context, and return the next-token logits ``[v]``."""
        self.ingestor.commit()
        wc = self.allocator.assemble(self.tree, cursor=self.cursor, query=query,
                                     previous=self.context)
        self.context = wc
        self._since_refocus = 0
        self.stats["refocuses"] += 1
        m = materialize(wc, self.tree, lambda ids: self.lm.embed(ids[None])[0],
                        rope=self.rope, gist_rope=self.gist_rope,
                        max_position=self.lm.config.max_position, positions=self.positions)
        previous, self.cached = self.cached, wc
        placed, self._placed = self._placed, m.positions
        self._shift = wc.cursor - m.next_position
        self._rope = m.rope
        entries = [m.embeddings, m.positions, m.attenuation, m.gist_rows]
        if not self.use_cache:  # keep the inputs: every step recomputes all of them
            self._inputs = entries
            return self._forward(entries, 0)
        keep = 0
        if previous is not None:
            if self.cache.rope == m.rope:
                keep = min(wc.common_prefix(previous), len(wc) - 1)  # recompute >= 1 entry
                moved = torch.nonzero(placed[:keep] != m.positions[:keep])
                if moved.numel():  # the rule moved a kept entry: recompute from there
                    keep = int(moved[0, 0])
                    self.stats["position_moves"] += 1
            else:  # keys rotated with another RoPE (auto crossed a step): rebuild the cache
                self.stats["rope_changes"] += 1
        return self._forward([None if x is None else x[keep:] for x in entries], keep)

    @torch.no_grad()
    def _advance(self, token: int, query: torch.Tensor | Query | None) -> torch.Tensor:
        """Append ``token`` to the memory and the context; return the next logits."""
        self.ingestor.feed(np.array([token], dtype=np.int64))
        self._since_refocus += 1
        if self._since_refocus >= self.refocus_every:
            return self.refocus(query)
        # Between refocuses the token joins the context raw, at its own index, unattenuated.
        self.cached = with_raw_token(self.cached)
        token_index = self.cached.cursor - 1
        assert token_index == self.cursor - 1, "context and memory disagree on the cursor"
        emb = self.lm.embed(torch.tensor([[token]]))[0].float()  # [1, c]
        pos = torch.tensor([token_index - self._shift], dtype=torch.float64)
        self._placed = torch.cat([self._placed, pos])
        if self.use_cache:  # only the new entry runs; the cache holds the rest
            return self._forward([emb, pos, None, None], len(self.cached) - 1)
        old_emb, old_pos, att, rows = self._inputs
        if att is not None:
            att = torch.cat([att, torch.ones(1, att.shape[1], dtype=att.dtype)])
        self._inputs = [torch.cat([old_emb, emb]), torch.cat([old_pos, pos]), att,
                        torch.cat([rows, torch.zeros(1, dtype=torch.bool)])]
        return self._forward(self._inputs, 0)

    def _forward(self, entries: list, start: int) -> torch.Tensor:
        """Run ``entries`` (embeddings, positions, attenuation or None, gist rows or None), the
        context's entries from index ``start`` on, after the cache's first ``start``; keep the
        next logits."""
        emb, pos, att, rows = entries
        cache = None
        if self.use_cache:
            cache = self.cache
            cache.truncate(start)
        lane = None if self.lane is None or rows is None else self.lane.at(rows)
        logits = self.lm(emb[None], pos, att, rope=self._rope, num_logits=1, cache=cache,
                         lane=lane)
        self.stats["entries_computed"] += emb.shape[0]
        self.stats["entries_reused"] += start
        self._logits = logits[0, -1]
        return self._logits

    def _next_logits(self, query: torch.Tensor | Query | None) -> torch.Tensor:
        if self.cursor == 0:
            raise ValueError("the memory is empty: feed() some text before scoring or "
                             "generating")
        return self._logits if self._logits is not None else self.refocus(query)

    @torch.no_grad()
    def score(self, ids: Sequence[int] | str,
              query: torch.Tensor | Query | None = None) -> torch.Tensor:
        """NLL (nats) of each token of a continuation, ``[n]``; the tokens join the memory."""
        if isinstance(ids, str):
            ids = self.lm.tokenizer.encode(ids)
        nll = []
        logits = self._next_logits(query)
        for t in ids:
            nll.append(F.cross_entropy(logits.float()[None], torch.tensor([int(t)])))
            logits = self._advance(int(t), query)
        return torch.stack(nll) if nll else torch.zeros(0)

    @torch.no_grad()
    def generate(self, prompt: Sequence[int] | str, max_new_tokens: int,
                 query: torch.Tensor | Query | None = None, stop: Sequence[int] = ()) -> list[int]:
        """Greedy continuation of the memory plus ``prompt`` (both stay in the memory)."""
        if isinstance(prompt, str):
            prompt = self.lm.tokenizer.encode(prompt)
        if prompt:
            self.feed(prompt)
        out: list[int] = []
        logits = self._next_logits(query)
        for _ in range(max_new_tokens):
            token = int(logits.argmax())
            out.append(token)
            if token in stop:
                break
            logits = self._advance(token, query)
        return out

    def close(self) -> None:
        self.tree.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> MemoryLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
