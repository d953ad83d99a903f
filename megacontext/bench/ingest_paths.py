"""Benchmark: a GistNet's level 1 in ingest, from embeddings vs from ids (``GistNet.from_ids``).

    python -m megacontext.bench.ingest_paths [--tokens 4e5] [--repeats 3] [--gistnet EXPORT]

The same pre-tokenized stdlib tokens go through ``Ingestor.feed`` + ``commit`` into a fresh
tree per run, the two paths interleaved ``--repeats`` times in one process (tokenization and
model loading excluded); reported: the median tokens/s of each path, their ratio, and whether
the stored level-1 gists are byte-identical (they agree to float32 rounding by construction;
float16 storage usually hides even that).
"""

from __future__ import annotations

import argparse
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from megacontext.base.loading import load_token_embeddings
from megacontext.gistnet import GistNet, GistNetConfig, gistnet_digest, load_gistnet
from megacontext.ingest import Ingestor
from megacontext.tree import MegaContextTree


def stdlib_ids(tokenizer, tokens: int) -> np.ndarray:
    out, total = [], 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            ids = tokenizer.encode(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        out.append(np.asarray(ids, dtype=np.int64))
        total += len(ids)
        if total >= tokens:
            break
    return np.concatenate(out)[:tokens]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, default=4e5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gistnet", default=None, help="a GistNet export (default: the light "
                        "default config, untrained: the cost does not depend on the weights)")
    args = parser.parse_args(argv)
    config, tokenizer, embedding = load_token_embeddings("smollm2-135m")
    net = (load_gistnet(args.gistnet) if args.gistnet
           else GistNet(GistNetConfig(hidden_size=config.hidden_size))).eval()
    ids = stdlib_ids(tokenizer, int(args.tokens))
    rates: dict[str, list[float]] = {"embeddings": [], "ids": []}
    first: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory(prefix="megacontext-bench-") as tmp:
        for r in range(args.repeats):
            for path in rates:
                tree = MegaContextTree.create(
                    Path(tmp) / f"{path}{r}", hidden_size=config.hidden_size,
                    vocab_size=config.vocab_size, rope=config.rope,
                    fingerprint=config.fingerprint(tokenizer.sha256), levels=net.cfg.levels,
                    gist_dtype="float16", gistnet_digest=gistnet_digest(net))
                with tree:
                    worker = Ingestor(tree, embedding, net)
                    if path == "embeddings":
                        worker.token_table = None  # the compressor reads embeddings
                    t0 = time.perf_counter()
                    worker.feed(ids)
                    worker.commit()
                    rates[path].append(ids.size / (time.perf_counter() - t0))
                    first.setdefault(path, tree.gists(1, 0, tree.count(1)).clone())
    med = {k: statistics.median(v) for k, v in rates.items()}
    same = torch.equal(first["embeddings"], first["ids"])
    for k, v in rates.items():
        print(f"{k:>10}: median {med[k]:,.0f} tok/s (runs: "
              + ", ".join(f"{x:,.0f}" for x in v) + ")")
    print(f"ids / embeddings: {med['ids'] / med['embeddings']:.2f}x; level-1 gists "
          f"({first['ids'].shape[0]:,}) byte-identical: {same}")
    return {"tokens": int(ids.size), "rates": rates, "median": med, "identical": same}


if __name__ == "__main__":
    main()
