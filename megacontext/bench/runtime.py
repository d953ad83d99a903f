"""Benchmark: our BaseLM runtime against transformers' own model on SmolLM2-135M.

    python -m megacontext.bench.runtime [--tokens 2048] [--repeats 5]

Both models hold the same dequantized weights (ours from the local cache, transformers' from
the GGUF through its own loader), run in this process with the same thread count, one forward
of 1 × N tokens under ``torch.inference_mode``, full logits for both. The two are timed in
alternation after a warm-up, so background load on a shared machine hits both alike; the
script prints each median and the ratio ours / transformers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers import AutoModelForCausalLM

    from megacontext.base import BaseLM
    from megacontext.base.loading import embedded_gguf

    ours = BaseLM.load("smollm2-135m")
    path = embedded_gguf("smollm2-135m")
    theirs = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32,
        attn_implementation="sdpa").eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, args.tokens),
                        generator=torch.Generator().manual_seed(0))
    positions = torch.arange(args.tokens)

    def run_ours():
        return ours(ours.embed(ids), positions)

    def run_theirs():
        return theirs(input_ids=ids, use_cache=False).logits

    times: dict[str, list[float]] = {"megacontext": [], "transformers": []}
    with torch.inference_mode():
        diff = (run_ours() - run_theirs()).abs().max().item()  # warm-up + sanity check
        for _ in range(args.repeats):
            for name, fn in (("megacontext", run_ours), ("transformers", run_theirs)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["megacontext"] / med["transformers"]
    print(f"SmolLM2-135M forward, 1 x {args.tokens} tokens, float32, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    for name, value in med.items():
        print(f"  {name:<13} {value:7.3f} s   (all: {', '.join(f'{t:.3f}' for t in times[name])})")
    print(f"  ratio megacontext / transformers = {ratio:.3f}  (max |logit diff| {diff:.2e})")
    return {"median_s": med, "ratio": ratio, "max_abs_logit_diff": diff}


if __name__ == "__main__":
    main()
