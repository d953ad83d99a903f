"""Benchmark: refocus latency of the focus allocator, from 1e5 to 1e8 tokens.

    python -m megacontext.bench.refocus [--tokens 1e5 1e6 1e7 1e8] [--budget 2048]
        [--repeats 50] [--warmup 5] [--scorers recency similarity lens] [--hidden 576]
        [--lens EXPORT] [--positions exact compact] [--trained 8192]

For each tree size and scorer: one refocus from scratch, ``--warmup`` refocuses, then
``--repeats`` timed ones; each moves the cursor 32 tokens on and passes the previous working
context (the runtime's steady state). The query for ``similarity`` drifts a little every
refocus; ``lens`` reads a 16-token query (token embeddings, drifting likewise) and uses the
LensNet at ``--lens`` or, without one, a randomly initialised LensNet of the default shape
(its cost does not depend on its weights). Reported: median and 90th-percentile latency, the
from-scratch latency, and per refocus the nodes scored, gists read and changes (the work the
allocator does, which must not grow with the tree); for ``lens`` also its FLOPs per refocus
(nodes scored × ``flops_per_node``).

With ``--positions``, each refocus is also placed by each read-time position rule
(``megacontext.positions``, trained length ``--trained``), and the entries a runtime would
recompute are counted: those after the common prefix of the previous and the new context, or
after the first kept entry the rule moved (what ``MemoryLM``'s KV cache does); reported as the
median per refocus and the largest extent of the placed context.

The tree is synthetic (``SyntheticTree``): a count per level and gists generated on demand,
deterministically from the node index, so a 1e8-token tree costs no disk and no RAM. It
measures the allocator, not the disk: a real tree serves the same reads from memory maps.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import numpy as np
import torch

from megacontext.allocator import FocusAllocator, LensConfig, LensNet, load_lens
from megacontext.lens import flops_per_node
from megacontext.positions import PositionRule
from megacontext.spans import SPAN, level_centers, node_size


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, vectorized: a well-spread hash of uint64 ``x``."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class SyntheticTree:
    """A duck-typed ``MegaContextTree`` of any size, with nothing stored per node.

    ``count(k) = num_tokens // span^k``; ``levels`` defaults to the fewest for which the top
    level has fewer than ``span`` nodes (so the coarsest cover is at most ``(span−1)·levels``
    entries plus the tail). Gist ``(k, i)`` is row ``hash(k, i) mod rows`` of a fixed random
    table (float32 ``[rows, c]``), token ``p`` is ``hash(p) mod vocab``: deterministic, O(1)
    memory, cheap to read.
    """

    def __init__(self, num_tokens: int, levels: int | None = None, *, hidden_size: int = 64,
                 span: int = SPAN, vocab_size: int = 49152, table_rows: int = 4096,
                 seed: int = 0) -> None:
        if levels is None:
            levels = 1
            while num_tokens // node_size(levels, span) >= span:
                levels += 1
        self.num_tokens, self.levels, self.span = int(num_tokens), int(levels), int(span)
        self.hidden_size, self.vocab_size = int(hidden_size), int(vocab_size)
        rng = np.random.default_rng(seed)
        self._table = rng.standard_normal((table_rows, hidden_size)).astype(np.float32)
        self._seed = np.uint64(seed)

    def count(self, level: int) -> int:
        if not 0 <= level <= self.levels:
            raise ValueError(f"level {level} is out of range [0, {self.levels}]")
        return self.num_tokens // node_size(level, self.span)

    def _check(self, level: int, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.count(level):
            raise ValueError(f"range [{start}, {stop}) is out of bounds for level {level}, "
                             f"which has {self.count(level)} records")

    def tokens(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stop = self.num_tokens if stop is None else stop
        self._check(0, start, stop)
        h = _mix(np.arange(start, stop, dtype=np.uint64) + self._seed)
        return torch.from_numpy((h % np.uint64(self.vocab_size)).astype(np.int64))

    def gists(self, level: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        if level < 1:
            raise ValueError(f"level {level}: level 0 is tokens")
        stop = self.count(level) if stop is None else stop
        self._check(level, start, stop)
        key = np.arange(start, stop, dtype=np.uint64) * np.uint64(64) + np.uint64(level)
        rows = _mix(key + self._seed) % np.uint64(self._table.shape[0])
        return torch.from_numpy(self._table[rows.astype(np.int64)])  # [g, c]

    def centers(self, level: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stop = self.count(level) if stop is None else stop
        self._check(level, start, stop)
        return torch.from_numpy(level_centers(level, start, stop, self.span))


QUERY_TOKENS = 16  # the lens scorer's query length


def run_one(tokens: int, scorer: str, *, budget: int, repeats: int, warmup: int,
            hidden: int, seed: int = 0, lens: LensNet | None = None,
            positions: tuple[str, ...] = (), trained: int = 8192) -> dict:
    """Time ``warmup + repeats`` incremental refocuses after one from scratch; count what
    each rule of ``positions`` makes a KV cache recompute."""
    tree = SyntheticTree(tokens, hidden_size=hidden, seed=seed)
    options = {}
    if scorer == "lens":
        if lens is None:
            torch.manual_seed(seed)
            lens = LensNet(LensConfig(hidden_size=hidden))
        options = {"lens": lens}
    alloc = FocusAllocator(budget, scorer=scorer, scorer_options=options)
    rng = np.random.default_rng(seed + 1)
    q = rng.standard_normal((QUERY_TOKENS, hidden) if scorer == "lens" else hidden)
    query = (lambda: q) if scorer in ("similarity", "lens") else (lambda: None)
    cursor = tokens - 32 * (warmup + repeats)
    gc.collect()  # do not bill the last configuration's garbage to this one
    t0 = time.perf_counter()
    wc = alloc.assemble(tree, cursor, query())
    scratch = time.perf_counter() - t0
    times, scored, read, changes = [], [], [], []
    rules = {k: PositionRule(k) for k in positions}
    placed = {k: rule.place(wc.positions, wc.starts, wc.cursor, max_position=trained)[0]
              for k, rule in rules.items()}
    recompute: dict[str, list[int]] = {k: [] for k in rules}
    extent: dict[str, float] = {k: 0.0 for k in rules}
    for r in range(warmup + repeats):
        cursor += 32
        q = q + 0.2 * rng.standard_normal(q.shape)  # a drifting query
        t0 = time.perf_counter()
        new = alloc.assemble(tree, cursor, query(), previous=wc)
        dt = time.perf_counter() - t0
        prefix = new.common_prefix(wc)
        for k, rule in rules.items():
            pos, nxt = rule.place(new.positions, new.starts, new.cursor, max_position=trained)
            moved = np.flatnonzero(pos[:prefix] != placed[k][:prefix])
            keep = int(moved[0]) if moved.size else prefix
            placed[k] = pos
            if r >= warmup:
                recompute[k].append(len(new) - keep)
                extent[k] = max(extent[k], nxt - float(pos.min()))
        wc = new
        if r >= warmup:
            st = alloc.last_stats
            times.append(dt)
            scored.append(st.nodes_scored)
            read.append(st.nodes_read)
            changes.append(st.swaps + st.forced)
    times.sort()
    return {
        "tokens": tokens, "levels": tree.levels, "scorer": scorer, "entries": len(wc),
        "median_ms": 1e3 * statistics.median(times),
        "p90_ms": 1e3 * times[min(len(times) - 1, int(0.9 * len(times)))],
        "scratch_ms": 1e3 * scratch, "nodes_scored": max(scored), "nodes_read": max(read),
        "changes": max(changes),
        "mflops": (max(scored) * flops_per_node(lens.cfg, QUERY_TOKENS) / 1e6
                   if scorer == "lens" else None),
        "recompute": {k: statistics.median(v) for k, v in recompute.items()},
        "recompute_max": {k: max(v) for k, v in recompute.items()},
        "extent": extent,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, nargs="+", default=[1e5, 1e6, 1e7, 1e8])
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--scorers", nargs="+", default=["recency", "similarity", "lens"])
    parser.add_argument("--hidden", type=int, default=576, help="gist width (SmolLM2: 576)")
    parser.add_argument("--lens", default=None,
                        help="a LensNet export for the lens scorer (default: random weights)")
    parser.add_argument("--positions", nargs="*", default=[],
                        help="read-time position rules whose KV-cache recomputation to count")
    parser.add_argument("--trained", type=int, default=8192,
                        help="the base model's trained length (SmolLM2: 8,192)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    lens = load_lens(args.lens) if args.lens else None
    if lens is not None and lens.cfg.hidden_size != args.hidden:
        parser.error(f"--lens reads gists of width {lens.cfg.hidden_size}, --hidden is "
                     f"{args.hidden}")

    rows = [run_one(int(n), s, budget=args.budget, repeats=args.repeats, warmup=args.warmup,
                    hidden=args.hidden, lens=lens, positions=tuple(args.positions),
                    trained=args.trained) for s in args.scorers for n in args.tokens]
    print(f"budget {args.budget}, cursor +32 tokens per refocus, previous passed; "
          f"median of {args.repeats} after {args.warmup} warm-up; gist width {args.hidden}")
    head = ("| tokens | levels | scorer | median ms | p90 ms | from scratch ms | entries "
            "| nodes scored | gists read | changes | MFLOPs |")
    print(head)
    print("|" + "---|" * head.count(" | ") + "---|")
    for r in rows:
        print(f"| {r['tokens']:.0e} | {r['levels']} | {r['scorer']} | {r['median_ms']:.2f} | "
              f"{r['p90_ms']:.2f} | {r['scratch_ms']:.2f} | {r['entries']} | "
              f"{r['nodes_scored']} | {r['nodes_read']} | {r['changes']} | "
              f"{'n/a' if r['mflops'] is None else format(r['mflops'], '.1f')} |")
    if args.positions:
        print("\n| tokens | scorer | rule | entries recomputed per refocus (median / max) "
              "| extent (max) |\n|---|---|---|---|---|")
        for r in rows:
            for k in args.positions:
                print(f"| {r['tokens']:.0e} | {r['scorer']} | {k} | {r['recompute'][k]:.0f} / "
                      f"{r['recompute_max'][k]} | {r['extent'][k]:,.0f} |")
    for s in args.scorers:
        mine = [r for r in rows if r["scorer"] == s]
        lo = min(mine, key=lambda r: r["tokens"])
        hi = max(mine, key=lambda r: r["tokens"])
        print(f"{s}: {hi['tokens']:.0e} / {lo['tokens']:.0e} median = "
              f"{hi['median_ms'] / lo['median_ms']:.2f}x")
    return rows


if __name__ == "__main__":
    main()
