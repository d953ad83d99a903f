"""Throughput of GistNet on this machine: `python -m megacontext.bench.gistnet [--sweep]`.

Compresses batches of random spans (float32, torch.inference_mode) at level 1 and level 2 and
prints the median tokens/s over several runs after warm-up, next to the FLOPs per input vector
and their ratio to the base model's forward cost.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megacontext.gistnet import GistNet, GistNetConfig, MeanPoolGist, flops_per_child

# SmolLM2-135M: 30 layers, hidden 576, MLP 1536, 9 query and 3 key/value heads of dim 64.
SMOLLM2_LAYERS, SMOLLM2_HIDDEN, SMOLLM2_MLP, SMOLLM2_KV = 30, 576, 1536, 192
SMOLLM2_NON_EMBEDDING = SMOLLM2_LAYERS * (
    2 * SMOLLM2_HIDDEN * SMOLLM2_HIDDEN  # q, o
    + 2 * SMOLLM2_HIDDEN * SMOLLM2_KV  # k, v
    + 3 * SMOLLM2_HIDDEN * SMOLLM2_MLP  # gate, up, down
    + 2 * SMOLLM2_HIDDEN  # norms
)
BASE_FLOPS_PER_TOKEN = 2 * SMOLLM2_NON_EMBEDDING  # ≈ 212 MFLOP (no attention scores, no head)


def _median_seconds(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(model: torch.nn.Module, hidden: int, spans: int, warmup: int, repeats: int,
          levels: tuple[int, ...] = (1, 2), bf16: bool = False) -> dict[int, float]:
    """Median input vectors per second for each level, compressing `spans` spans per call
    (under bfloat16 autocast with ``bf16``, as ``megacontext ingest --precision bfloat16``)."""
    gen = torch.Generator().manual_seed(0)
    x = 0.05 * torch.randn(spans, 32, hidden, generator=gen)  # token-embedding-like scale
    out = {}
    with torch.inference_mode():
        for level in levels:
            def run(lv=level):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    return model(x, lv)

            sec = _median_seconds(run, warmup, repeats)
            out[level] = spans * 32 / sec
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--hidden", type=int, default=SMOLLM2_HIDDEN)
    p.add_argument("--width", type=int, default=None, help="default: GistNetConfig's")
    p.add_argument("--layers", type=int, default=None, help="default: GistNetConfig's")
    p.add_argument("--spans", type=int, default=1024, help="spans per call (batch)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--chunk-spans", type=int, default=None,
                   help="GistNet.chunk_spans (spans per internal batch; 0 = none)")
    p.add_argument("--sweep", action="store_true", help="also time widths 64…256, 2 layers")
    p.add_argument("--precision", choices=["float32", "bfloat16"], nargs="+",
                   default=["float32"], help="compute precisions to time (bfloat16: autocast)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    kw = {k: v for k, v in [("width", args.width), ("num_layers", args.layers)] if v is not None}
    cfg = GistNetConfig(hidden_size=args.hidden, **kw)
    chunk = GistNet(cfg).chunk_spans if args.chunk_spans is None else args.chunk_spans
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{' and '.join(args.precision)}, "
          f"{args.spans} spans/call (chunk_spans {chunk}), "
          f"median of {args.repeats} after {args.warmup} warm-up")
    print(f"base model (SmolLM2-135M) forward: {BASE_FLOPS_PER_TOKEN / 1e6:.1f} MFLOP/token")

    configs = [cfg]
    if args.sweep:
        configs += [GistNetConfig(hidden_size=args.hidden, width=w, num_layers=n)
                    for w, n in [(64, 1), (96, 1), (128, 1), (192, 1), (256, 1), (128, 2)]
                    if (w, n) != (cfg.width, cfg.num_layers)]
    print(f"{'model':<28}{'MFLOP/tok':>10}{'vs base':>9}{'L1 tok/s':>12}{'L2 in/s':>12}"
          f"{'params':>10}")
    for c in configs:
        model = GistNet(c).eval()
        if args.chunk_spans is not None:
            model.chunk_spans = args.chunk_spans
        for precision in args.precision:
            rate = bench(model, args.hidden, args.spans, args.warmup, args.repeats,
                         bf16=precision == "bfloat16")
            f = flops_per_child(c)
            n_params = sum(t.numel() for t in model.parameters())
            name = f"GistNet w={c.width} L={c.num_layers}" + (
                " bf16" if precision == "bfloat16" else "")
            print(f"{name:<28}{f / 1e6:>10.3f}{f / BASE_FLOPS_PER_TOKEN:>9.2%}"
                  f"{rate[1]:>12,.0f}{rate[2]:>12,.0f}{n_params:>10,}")
    rate = bench(MeanPoolGist(), args.hidden, args.spans, args.warmup, args.repeats, (1,))
    print(f"{'MeanPoolGist':<28}{'~0':>10}{'~0':>9}{rate[1]:>12,.0f}{'':>12}{0:>10}")
    print("L2 in/s counts level-1 gists read per second; each stands for 32 tokens, so the L2 "
          "pass adds 1/32 of the L1 cost per token.")


if __name__ == "__main__":
    main()
