"""Benchmark: what the gist lane costs when the base model reads a working context.

    python -m megacontext.bench.lane [--entries 1024] [--gists 960] [--rank 8] [--repeats 7]

One forward of a ``1 × entries`` working context (``gists`` gist rows first, the rest raw, as
the allocator lays out a long memory) through SmolLM2-135M, scoring the last 64 entries
(``num_logits=64``, as evaluation does), under ``torch.inference_mode``: without a lane, and with
a rank-``rank`` lane on q, k, v, o of every layer (and, with ``--mlp``, on the MLP too). The
settings are timed in alternation after a warm-up, so background load on a shared machine hits
both alike; the script prints each median and the ratio to the lane-free pass, and the lane's
parameter count.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megacontext.base import BaseLM
from megacontext.gistnet import GistLane, LaneConfig


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--entries", type=int, default=1024)
    p.add_argument("--gists", type=int, default=960, help="gist rows among the entries")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--mlp", action="store_true", help="also a lane on gate, up and down")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    if not 0 <= args.gists <= args.entries:
        raise SystemExit(f"--gists={args.gists} must be in [0, --entries={args.entries}]")
    lm = BaseLM.load(args.model)
    targets = ["q", "k", "v", "o"] + (["gate", "up", "down"] if args.mlp else [])
    torch.manual_seed(0)
    lane = GistLane(LaneConfig.for_base(lm.config, rank=args.rank, targets=targets))
    with torch.no_grad():  # a trained lane's B is not zero; the cost does not depend on it
        for b in lane.up.values():
            b.normal_(0.0, 1e-3)
    gen = torch.Generator().manual_seed(0)
    x = lm.embed(torch.randint(0, lm.config.vocab_size, (1, args.entries), generator=gen))
    positions = torch.arange(args.entries)
    rows = torch.arange(args.entries) < args.gists
    runs = {"no lane": lambda: lm(x, positions, num_logits=64),
            f"lane r{args.rank} {'+'.join(targets)}":
                lambda: lm(x, positions, num_logits=64, lane=lane.at(rows))}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():
            run()  # warm-up
        for _ in range(args.repeats):
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {lm.config.name}: "
          f"one pass over {args.entries} entries ({args.gists} gist rows), 64 logits; median "
          f"of {args.repeats} alternated runs after a warm-up; lane parameters "
          f"{lane.num_parameters:,}")
    base = statistics.median(times["no lane"])
    result = {"parameters": lane.num_parameters}
    for name, ts in times.items():
        med = statistics.median(ts)
        result[name] = med
        print(f"  {name:<32}{med * 1e3:>9.1f} ms{med / base:>8.2f}x")
    return result


if __name__ == "__main__":
    main()
