"""Benchmark: refocus latency of the ``lexical`` scorer with the token index, 1e6 to 1e8 tokens,
against the scan at 1e6.

    python -m megacontext.bench.lexical [--tokens 1e6 1e7 1e8] [--scan-tokens 1e6]
        [--budget 2048] [--repeats 50] [--warmup 5] [--firsts 5] [--dir DIR]

The tree is synthetic (``ZipfTree``, a ``bench.refocus.SyntheticTree`` whose token ids follow
a Zipf-like law, ``id = ⌊v^u⌋ − 1`` for a hashed uniform ``u``, so common ids fill most spans as
in text and rare ones few), with a 24-token needle of rare ids at depth 0.5. Its index is
built with ``build_lexicon`` into a temporary directory (``--dir``; the build is timed and
reported). The query: 16 distinct ids, the needle's 8 and 8 of the commonest.

Per size and path: ``1 + --firsts`` refocuses from scratch, each by a new allocator (a new
scorer: a new query, looked up in the index or scanned from the memory); the first of them
("cold") also opens the index just built (its pages in the page cache, not yet mapped), the
others find it open on the tree (``tree.lexicon()`` keeps it). Then one allocator's
``--warmup`` + ``--repeats`` refocuses, each moving the cursor 32 tokens on and passing
``previous`` (the runtime's steady state). Reported: the medians, nodes scored, and the
ratio of each size's medians to the smallest size's (the target: at most 1.3x). ``recency``
rows time the allocator with the recency scorer on the same trees: its own cost, which grows a
little with the levels (more gist entries to score in the same budget), whatever the scorer.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from megacontext.allocator import FocusAllocator, Query
from megacontext.bench.refocus import SyntheticTree, _mix
from megacontext.tree.lexicon import Lexicon, build_lexicon, open_lexicon

NEEDLE = 24
QUERY_RARE = 8


class ZipfTree(SyntheticTree):
    """A synthetic tree with Zipf-like token ids, a needle at ``depth``, and a directory
    (``path``) for its token index; duck-typed for ``build_lexicon`` and ``Lexicon.open``."""

    def __init__(self, num_tokens: int, path: Path, *, depth: float = 0.5, **kwargs) -> None:
        super().__init__(num_tokens, **kwargs)
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.fingerprint = {"name": "bench-zipf", "vocab_size": self.vocab_size}
        self.header = {"created": f"synthetic {num_tokens} tokens seed {int(self._seed)}"}
        self.needle_at = int(num_tokens * depth)
        v = self.vocab_size
        self.needle = np.array([v - 1 - 3 * j for j in range(QUERY_RARE)] * 3)  # [24] rare
        self._lexicon: dict = {}

    def tokens(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stop = self.num_tokens if stop is None else stop
        self._check(0, start, stop)
        u = (_mix(np.arange(start, stop, dtype=np.uint64) + self._seed) >> np.uint64(11)
             ).astype(np.float64) / float(1 << 53)  # [n] uniform in [0, 1)
        ids = np.minimum(np.floor(self.vocab_size ** u).astype(np.int64) - 1, self.vocab_size - 1)
        a, b = max(start, self.needle_at), min(stop, self.needle_at + NEEDLE)
        if a < b:
            ids[a - start:b - start] = self.needle[a - self.needle_at:b - self.needle_at]
        return torch.from_numpy(ids)

    def lexicon(self) -> Lexicon | None:
        return open_lexicon(self, self._lexicon)


def run_one(tree: ZipfTree, path: str, *, budget: int, repeats: int, warmup: int,
            firsts: int) -> dict:
    """Time one path: ``index`` or ``scan`` (the lexical scorer), or ``recency`` (the
    allocator's own cost at this size, for comparison)."""
    query = Query(ids=np.concatenate([tree.needle[:QUERY_RARE], np.arange(QUERY_RARE)]))
    scorer, options = ("recency", {}) if path == "recency" else \
        ("lexical", {"use_index": path == "index"})
    if path == "recency":
        query = None
    cursor0 = tree.num_tokens - 32 * (warmup + repeats)
    first = []
    for _ in range(firsts + 1):  # the first of them opens the index: cold
        alloc = FocusAllocator(budget, scorer=scorer, scorer_options=options)
        gc.collect()
        t0 = time.perf_counter()
        wc = alloc.assemble(tree, cursor0, query)
        first.append(time.perf_counter() - t0)
    first_scored = alloc.last_stats.nodes_scored
    raw = {int(a) for k, a in zip(wc.levels, wc.starts, strict=True) if k == 0}
    found = set(range(tree.needle_at, tree.needle_at + NEEDLE)) <= raw
    times, scored, cursor = [], [], cursor0
    for r in range(warmup + repeats):
        cursor += 32
        t0 = time.perf_counter()
        wc = alloc.assemble(tree, cursor, query, previous=wc)
        if r >= warmup:
            times.append(time.perf_counter() - t0)
            scored.append(alloc.last_stats.nodes_scored)
    return {"tokens": tree.num_tokens, "levels": tree.levels, "path": path,
            "cold_ms": 1e3 * first[0], "first_ms": 1e3 * statistics.median(first[1:]),
            "steady_ms": 1e3 * statistics.median(times),
            "p90_ms": 1e3 * sorted(times)[min(len(times) - 1, int(0.9 * len(times)))],
            "first_scored": first_scored, "nodes_scored": max(scored), "needle_raw": found}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    parser.add_argument("--scan-tokens", type=float, nargs="*", default=[1e6],
                        help="sizes also timed with the scan (no index)")
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--firsts", type=int, default=5, help="from-scratch refocuses timed")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary (SmolLM2's)")
    parser.add_argument("--no-recency", dest="recency", action="store_false",
                        help="skip the recency rows (the allocator's own cost per size)")
    parser.add_argument("--dir", default=None, help="where the indexes are built (a temporary "
                                                    "directory, removed after)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.firsts < 1:
        parser.error("--repeats and --firsts must be >= 1, --warmup >= 0")
    root = Path(tempfile.mkdtemp(prefix="lexicon-bench-", dir=args.dir))
    rows, builds = [], []
    try:
        for n in sorted({int(x) for x in args.tokens} | {int(x) for x in args.scan_tokens}):
            tree = ZipfTree(n, root / f"{n}", vocab_size=args.vocab)
            common = dict(budget=args.budget, repeats=args.repeats, warmup=args.warmup,
                          firsts=args.firsts)
            if n in {int(x) for x in args.scan_tokens}:
                rows.append(run_one(tree, "scan", **common))
            if n in {int(x) for x in args.tokens}:
                t0 = time.perf_counter()
                lex = build_lexicon(tree, progress=False)
                info = lex.info()
                builds.append((n, time.perf_counter() - t0, info["postings"], info["bytes"]))
                del lex
                rows.append(run_one(tree, "index", **common))
                shutil.rmtree(tree.path / "lexicon")
                if args.recency:
                    rows.append(run_one(tree, "recency", **common))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"lexical scorer, budget {args.budget}, query of 16 ids (8 rare: the needle's); "
          f"first = median of {args.firsts} from-scratch refocuses by new allocators (cold: "
          f"the one before them, opening the index); steady = "
          f"median of {args.repeats} after {args.warmup} warm-up, cursor +32, previous passed")
    print("| tokens | levels | path | cold first ms | first ms | steady ms | steady p90 ms "
          "| nodes scored (first / steady) | needle raw |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']:.0e} | {r['levels']} | {r['path']} | {r['cold_ms']:.2f} | "
              f"{r['first_ms']:.2f} | "
              f"{r['steady_ms']:.2f} | {r['p90_ms']:.2f} | {r['first_scored']} / "
              f"{r['nodes_scored']} | "
              f"{'yes' if r['needle_raw'] else 'no'} |")
    print("\n| tokens | index build s | postings | index bytes |\n|---|---|---|---|")
    for n, seconds, postings, nbytes in builds:
        print(f"| {n:.0e} | {seconds:.1f} | {postings:,} | {nbytes:,} |")
    index = sorted((r for r in rows if r["path"] == "index"), key=lambda r: r["tokens"])
    for path in ("index", "recency"):
        mine = sorted((r for r in rows if r["path"] == path), key=lambda r: r["tokens"])
        for r in mine[1:]:
            print(f"{path}: {r['tokens']:.0e} / {mine[0]['tokens']:.0e}: cold first "
                  f"{r['cold_ms'] / mine[0]['cold_ms']:.2f}x, first "
                  f"{r['first_ms'] / mine[0]['first_ms']:.2f}x, steady "
                  f"{r['steady_ms'] / mine[0]['steady_ms']:.2f}x")
    if index:
        for r in rows:
            if r["path"] == "scan":
                same = [x for x in index if x["tokens"] == r["tokens"]]
                if same:
                    print(f"scan / index at {r['tokens']:.0e}: first "
                          f"{r['first_ms'] / same[0]['first_ms']:.2f}x, steady "
                          f"{r['steady_ms'] / same[0]['steady_ms']:.2f}x")
    return rows


if __name__ == "__main__":
    main()
