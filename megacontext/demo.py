"""What ``make run`` runs for now: the most complete real path that exists.

    python -m megacontext.demo [--model smollm2-135m] [--tokens 2048] [--documents 2]

It loads the embedded SmolLM2-135M (converting its GGUF once into the cache), checks a greedy
continuation, and scores built-in documents (long source files of the running Python's
standard library, read offline) under several RoPE treatments of the same tokens:

- positions 0 … n−1 (the model as trained);
- positions shifted by 2^30 — relative distances are preserved, so the NLL must not move;
- NTK-aware, linear, YaRN scaling at factor 2 — within the trained length these cost a
  little; they matter when a working context's positions reach past it.

It prints a table and writes it as JSON under ``outputs/demo/``.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from megacontext.base import BaseLM
from megacontext.rope import RopeConfig


def stdlib_documents(tokenizer, count: int, min_tokens: int) -> list[tuple[str, list[int]]]:
    """The ``count`` first (alphabetically) stdlib modules with at least ``min_tokens`` tokens."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.glob("*.py")):
        if path.stat().st_size < 6 * min_tokens:  # cheap pre-filter: ~3-4 bytes per token
            continue
        ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
        if len(ids) >= min_tokens:
            docs.append((path.name, ids[:min_tokens]))
        if len(docs) == count:
            break
    return docs


def mean_nll(lm: BaseLM, ids: list[int], positions: torch.Tensor, rope: RopeConfig | None,
             scored: int) -> float:
    """Mean NLL (nats/token) of the last ``scored`` tokens given everything before them."""
    x = torch.tensor([ids])
    with torch.inference_mode():
        logits = lm(lm.embed(x), positions, rope=rope, num_logits=scored + 1)[0, :-1]
    return F.cross_entropy(logits, x[0, -scored:]).item()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Load the base model and check RoPE variants.")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per document")
    parser.add_argument("--scored", type=int, default=512, help="last tokens scored")
    parser.add_argument("--documents", type=int, default=2)
    parser.add_argument("--out", default="outputs/demo")
    args = parser.parse_args(argv)
    console = Console()

    start = time.perf_counter()
    lm = BaseLM.load(args.model)
    console.print(f"loaded [bold]{lm.config.name}[/] ({lm.config.family}, "
                  f"{lm.config.num_hidden_layers} layers, hidden {lm.config.hidden_size}, "
                  f"trained length {lm.config.max_position}) "
                  f"in {time.perf_counter() - start:.1f} s")

    prompt = "The capital of Italy is"
    ids = lm.tokenizer.encode(prompt)
    with torch.inference_mode():
        for _ in range(8):
            logits = lm(lm.embed(torch.tensor([ids])), torch.arange(len(ids)), num_logits=1)
            ids.append(int(logits[0, -1].argmax()))
    console.print(f"greedy: {prompt!r} -> {lm.tokenizer.decode(ids[-8:])!r}")

    base = lm.config.rope
    variants = {
        "positions 0..n-1": (0, None),
        "positions + 2^30": (2**30, None),
        "NTK-aware x2": (0, RopeConfig(base.head_dim, base.theta, scaling="ntk", factor=2.0)),
        "linear x2": (0, RopeConfig(base.head_dim, base.theta, scaling="linear", factor=2.0)),
        "YaRN x2": (0, RopeConfig(base.head_dim, base.theta, scaling="yarn", factor=2.0,
                                  original_max_position=lm.config.max_position)),
    }
    docs = stdlib_documents(lm.tokenizer, args.documents, args.tokens)
    results: dict[str, dict[str, float]] = {}
    with console.status("scoring") as status:
        for name, (offset, rope) in variants.items():
            results[name] = {}
            for doc, doc_ids in docs:
                status.update(f"scoring {doc} with {name}")
                positions = torch.arange(len(doc_ids), dtype=torch.int64) + offset
                results[name][doc] = mean_nll(lm, doc_ids, positions, rope, args.scored)

    table = Table(title=f"NLL (nats/token) of the last {args.scored} of {args.tokens} tokens")
    table.add_column("RoPE")
    for doc, _ in docs:
        table.add_column(doc, justify="right")
    table.add_column("mean", justify="right")
    for name, row in results.items():
        values = list(row.values())
        table.add_row(name, *(f"{v:.4f}" for v in values), f"{sum(values) / len(values):.4f}")
    console.print(table)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": lm.config.name, "tokens": args.tokens, "scored": args.scored,
              "nll": results}
    (out / "rope_variants.json").write_text(json.dumps(report, indent=2))
    console.print(f"wrote {out / 'rope_variants.json'}")
    return report


if __name__ == "__main__":
    main()
