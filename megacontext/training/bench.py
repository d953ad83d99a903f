"""Seconds per GistNet training step on this machine: `python -m megacontext.training.bench`.

Times one optimizer step of :class:`~megacontext.training.module.GistTrainingModule` (forward,
backward through the frozen base model, AdamW) on random token windows, for each recipe
setting in turn, interleaved over several rounds so that a noisy shared machine slows every
setting alike. Prints the median seconds per step and its ratio to the first setting (the
baseline: float32, the `cpu` experiment's window).

    python -m megacontext.training.bench                      # SmolLM2, the default settings
    python -m megacontext.training.bench --settings base bf16 tail16 bf16+tail16 recon kl
    python -m megacontext.training.bench --model tiny-random --rounds 2   # seconds, a smoke run

Settings (combine with ``+``): ``base`` (float32, tail 64), ``bf16`` (bfloat16 autocast, as
``trainer.precision=bf16-mixed``), ``tail16`` (``data.window.tail_tokens=16``), ``recon``
(``module.recon_weight=1``), ``kl`` (``module.kl_weight=1``: a gradient-free full-context pass
per step), ``contextual`` (``gistnet=contextual``: the first ``--input-layer`` (4) base layers over
every span, fewer on a smaller model), ``lane`` (a gist lane of rank ``--lane-rank`` (8) on q, k,
v, o of every layer: ``module.lane``), ``lanemlp`` (the lane on the MLP's projections too).

    python -m megacontext.training.bench --settings bf16+tail16 bf16+tail16+lane
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from functools import partial

import torch

from megacontext.base import BaseLM
from megacontext.gistnet import GistNetConfig
from megacontext.training.module import GistTrainingModule

FLAGS = ("base", "bf16", "tail16", "recon", "kl", "contextual", "lane", "lanemlp")


def parse_setting(name: str) -> set[str]:
    flags = set(name.split("+"))
    unknown = flags - set(FLAGS)
    if unknown:
        raise SystemExit(f"unknown setting flag(s) {sorted(unknown)} in {name!r}; "
                         f"combine {FLAGS} with '+'")
    return flags - {"base"}


class Step:
    """One setting: its module, optimizer and a fixed random batch."""

    def __init__(self, lm: BaseLM, flags: set[str], batch: int, spans: int, tail: int,
                 horizon: int, seed: int, input_layer: int = 4, lane_rank: int = 8) -> None:
        tail = 16 if "tail16" in flags else tail
        layers = min(input_layer, lm.config.num_hidden_layers) if "contextual" in flags else 0
        cfg = GistNetConfig(hidden_size=lm.config.hidden_size, levels=1, input_layer=layers)
        lane = None
        if flags & {"lane", "lanemlp"}:
            targets = ["q", "k", "v", "o"] + (["gate", "up", "down"] if "lanemlp" in flags
                                              else [])
            lane = {"rank": lane_rank, "targets": targets}
        self.module = GistTrainingModule(
            lm, cfg, partial(torch.optim.AdamW, lr=1e-3),
            kl_weight=1.0 if "kl" in flags else 0.0, full_every=0,
            recon_weight=1.0 if "recon" in flags else 0.0, round_to="float16", lane=lane)
        self.module.log = lambda *a, **k: None  # no trainer attached: metrics go nowhere
        self.optimizer = torch.optim.AdamW(self.module.gistnet.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(seed)
        vocab = lm.config.vocab_size
        length = spans * 32 + tail + horizon
        self.batch = {"ids": torch.randint(0, vocab, (batch, length), generator=gen),
                      "level": 1, "num_spans": spans, "tail": tail, "horizon": horizon}
        self.bf16 = "bf16" in flags

    def __call__(self) -> None:
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16
                    else contextlib.nullcontext())
        with autocast:
            loss = self.module.training_step(self.batch, 0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--settings", nargs="+",
                   default=["base", "bf16", "tail16", "bf16+tail16", "recon", "kl"])
    p.add_argument("--batch", type=int, default=4, help="windows per step (data.batch_size)")
    p.add_argument("--spans", type=int, default=14, help="old-context spans per window")
    p.add_argument("--tail", type=int, default=64)
    p.add_argument("--horizon", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="timed steps per setting")
    p.add_argument("--input-layer", type=int, default=4,
                   help="K: base layers the contextual setting runs over every span")
    p.add_argument("--lane-rank", type=int, default=8, help="rank of the lane settings")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = BaseLM.load(args.model)
    for param in lm.model.parameters():
        param.requires_grad_(False)
    steps = {name: Step(lm, parse_setting(name), args.batch, args.spans, args.tail,
                        args.horizon, seed=0, input_layer=args.input_layer,
                        lane_rank=args.lane_rank)
             for name in args.settings}
    for step in steps.values():  # warm-up (and contextual calibration)
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {lm.config.name}, "
          f"batch {args.batch} x ({args.spans} spans of 32 -> gists, tail {args.tail}, horizon "
          f"{args.horizon}); median of {args.rounds} interleaved rounds after 1 warm-up")
    base = statistics.median(times[args.settings[0]])
    print(f"{'setting':<24}{'s/step':>10}{'vs ' + args.settings[0]:>14}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<24}{med:>10.3f}{med / base:>14.2f}x")


if __name__ == "__main__":
    main()
