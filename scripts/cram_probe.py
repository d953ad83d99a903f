"""Does a gist that HOLDS its span help the continuation? Each old-context span of the
evaluation's level-1 windows gets its own gist vector, optimised alone (the frozen decoder,
everything else fixed) to regenerate the span's 32 tokens teacher-forced from ``[vector,
tokens]`` — the reconstruction objective, and the setting in which Kuratov et al. (2025) cram
~80 tokens into one input vector of a ~160M model. Then the windows are scored with those
vectors in the gist slots, against the trained GistNet they started from. If crammed vectors
recover much more than the GistNet, an encoder that learns to hold its span is the way up;
if not, holding the tokens is not what the continuation needs from a gist with this frozen
decoder (docs/training.md, "What a gist that holds its span is worth").
Windows and split are eval_quick's (validation); nothing here looks at the scored tokens
while optimising.

    .venv/bin/python scripts/cram_probe.py --gistnet <export> [--windows 8] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from probe_setup import ids_of, level1_windows, recovery_table

from megacontext.evaluation.substitutability import WindowDataset, batches, score_level


class Lookup(torch.nn.Module):
    """Level-1 gists looked up by their span's token ids (matched from the embeddings)."""

    def __init__(self, table: torch.Tensor, vectors: dict[tuple, torch.Tensor]) -> None:
        super().__init__()
        self.table, self.vectors = table, vectors

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        lead, c = x.shape[:-2], x.shape[-1]
        out = torch.stack([self.vectors[tuple(r.tolist())] for r in ids_of(x, self.table)])
        return out.reshape(*lead, c).to(x.dtype)


def cram(lm, spans: torch.Tensor, init: torch.Tensor, steps: int, lr: float) -> tuple:
    """Optimise one vector per span ``[n, s]`` from ``init [n, c]`` to regenerate the span
    from ``[vector, tokens]`` (gist at position 0); return the vectors and the per-token NLL
    and accuracy before and after."""
    embeds = lm.embed(spans).detach()
    vec = torch.nn.Parameter(init.clone().float())
    opt = torch.optim.Adam([vec], lr=lr)
    positions = torch.arange(spans.shape[1], dtype=torch.float64)

    def nll_acc() -> tuple[torch.Tensor, torch.Tensor]:
        entries = torch.cat([vec[:, None].to(embeds.dtype), embeds[:, :-1]], dim=1)
        logits = lm(entries, positions)
        loss = F.cross_entropy(rearrange(logits, "n s v -> (n s) v"), spans.reshape(-1))
        return loss, (logits.argmax(-1) == spans).float().mean()

    with torch.no_grad():
        before = [float(t) for t in nll_acc()]
    t0 = time.perf_counter()
    for step in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, acc = nll_acc()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step}: reconstruction NLL {loss.item():.3f}, accuracy "
                  f"{acc.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    with torch.no_grad():
        after = [float(t) for t in nll_acc()]
    return vec.detach(), before, after


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gistnet", required=True, help="the GistNet export to start from")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    probe = level1_windows("eval_quick", args.windows, "validation", args.gistnet)
    sub_cfg, lm, corpus, net = probe.sub_cfg, probe.lm, probe.corpus, probe.net
    for p in lm.model.parameters():
        p.requires_grad_(False)
    window = sub_cfg.windows.layout(1)
    dataset = WindowDataset(corpus, sub_cfg.windows.spec(1), probe.windows)
    ids = torch.cat([b["ids"] for b in batches(dataset, range(len(dataset)), 8)])
    spans = rearrange(ids[:, :window.context], "b (g s) -> (b g) s", s=32)
    with torch.no_grad():
        init = net(lm.embed(spans)[:, None], 1)[:, 0].float()
    print(f"{spans.shape[0]} spans of {len(probe.windows)} validation windows; "
          f"{args.steps} Adam steps at lr {args.lr}")
    vectors, before, after = cram(lm, spans, init, args.steps, args.lr)
    table = lm.model.embed_tokens.weight.detach().float()
    crammed = Lookup(table, {tuple(s.tolist()): v for s, v in zip(spans, vectors, strict=True)})
    conds = {"GistNet (the start)": net, "crammed": crammed}
    with torch.inference_mode():
        scores = score_level(lm, corpus, probe.windows, 1, net, conds, sub_cfg)
    print(f"\nreconstruction NLL {before[0]:.3f} -> {after[0]:.3f} nats/token, accuracy "
          f"{before[1]:.3f} -> {after[1]:.3f}; the continuation:")
    result = {"spans": int(spans.shape[0]), "steps": args.steps, "lr": args.lr,
              "reconstruction": {"before": before, "after": after},
              **recovery_table(probe, scores, list(conds), "cram")}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
