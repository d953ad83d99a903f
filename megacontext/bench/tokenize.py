"""Benchmark: the ingest token stream (exact segments of the text, encoded by the Rust
tokenizer) with each segment encoded whole or as a batch of parts (``split_exact``).

    python -m megacontext.bench.tokenize [--tokens 1e6] [--repeats 5] [--parts none 131072]

SmolLM2's tokenizer over a text file of about ``--tokens`` tokens (the running Python's
standard library, as ``megacontext.bench.ingest`` writes it), ``token_stream`` with each
``--parts`` setting (``none``: whole segments, one encode each; a number: parts of about that
many characters, one ``encode_batch`` per segment), interleaved ``--repeats`` times in one
process; prints the median seconds and tokens/s of each and checks that the ids are equal.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from megacontext.base.loading import load_token_embeddings
from megacontext.bench.ingest import write_corpus
from megacontext.ingest import expand_inputs, token_stream


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, default=1e6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parts", nargs="+", default=["none", "131072"],
                        help="'none' or characters per part, each timed in turn")
    args = parser.parse_args(argv)
    _, tokenizer, _ = load_token_embeddings("smollm2-135m")
    settings = {p: None if p == "none" else int(p) for p in args.parts}
    with tempfile.TemporaryDirectory(prefix="megacontext-bench-") as tmp:
        path = Path(tmp) / "corpus.txt"
        write_corpus(path, int(args.tokens), tokenizer)
        sources = expand_inputs([str(path)])
        times = {p: [] for p in settings}
        ids = {}
        for _ in range(args.repeats):
            for name, part_chars in settings.items():
                t0 = time.perf_counter()
                out = np.concatenate(list(token_stream(sources, tokenizer,
                                                       part_chars=part_chars)))
                times[name].append(time.perf_counter() - t0)
                ids[name] = out
    first = next(iter(ids.values()))
    same = all(np.array_equal(first, v) for v in ids.values())
    result = {}
    for name, t in times.items():
        sec = statistics.median(t)
        result[name] = {"median_s": sec, "tokens_per_s": first.size / sec, "runs_s": t}
        print(f"parts {name:>8}: {first.size:,} tokens, median {sec:.2f} s "
              f"({first.size / sec:,.0f} tok/s; runs {', '.join(f'{x:.2f}' for x in t)})")
    print(f"ids identical across settings: {same}")
    if not same:
        raise SystemExit("the settings gave different ids")
    return result


if __name__ == "__main__":
    main()
