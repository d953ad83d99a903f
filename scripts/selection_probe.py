"""Can a real token stand in for its span? The NLL of the evaluation's level-1 windows with each
gist slot holding the input embedding of ONE token chosen from the span it replaces — the
rarest (by its count over the whole corpus), the first, the last — or the mean of the k
rarest, against the constant
placeholder and (with ``--gistnet``) a trained GistNet. A selected token is in the model's
input distribution and carries some of its span's content for free: if it beats the constant,
real embeddings are a cheaper starting point for gists than the mean embedding
(docs/training.md, "Gists that start as a token"). Windows and split are eval_quick's (validation).

    .venv/bin/python scripts/selection_probe.py [--windows 48] [--gistnet <export>]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from probe_setup import ids_of, level1_windows, recovery_table

from megacontext.evaluation.substitutability import score_level
from megacontext.gistnet import ConstantGist


class SelectGist(torch.nn.Module):
    """Level-1 gist = a function of the span's own token embeddings, chosen by token id.

    The evaluation hands compressors embeddings, not ids: each row is matched back to its id
    (``probe_setup.ids_of``)."""

    def __init__(self, table: torch.Tensor, rank: torch.Tensor, rule: str, k: int = 1) -> None:
        super().__init__()
        self.table, self.rank, self.rule, self.k = table, rank, rule, k

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        if level != 1:
            raise ValueError("SelectGist serves level 1 only")
        lead, c = x.shape[:-2], x.shape[-1]
        ids = ids_of(x, self.table)
        emb = self.table[ids]  # [B, s, c]
        if self.rule == "first":
            out = emb[:, 0]
        elif self.rule == "last":
            out = emb[:, -1]
        else:  # the k rarest (lowest corpus count first), averaged
            order = self.rank[ids].argsort(dim=-1, stable=True)[:, : self.k]
            out = torch.gather(emb, 1, order[..., None].expand(-1, -1, c)).mean(1)
        return out.reshape(*lead, c).to(x.dtype)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=48)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--gistnet", default=None, help="a GistNet export to score beside")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    probe = level1_windows("eval_quick", args.windows, args.split, args.gistnet)
    sub_cfg, lm, corpus = probe.sub_cfg, probe.lm, probe.corpus
    table = lm.model.embed_tokens.weight.detach().float()
    counts = np.bincount(np.asarray(corpus.ids, dtype=np.int64), minlength=table.shape[0])
    rank = torch.from_numpy(counts).double()  # ascending: rarest first
    conds = {"constant (mean token embedding)": ConstantGist(table.mean(0)),
             "first token": SelectGist(table, rank, "first"),
             "last token": SelectGist(table, rank, "last"),
             "rarest token": SelectGist(table, rank, "rarest", 1),
             "mean of the 2 rarest": SelectGist(table, rank, "rarest", 2),
             "mean of the 4 rarest": SelectGist(table, rank, "rarest", 4)}
    if probe.net is not None:
        conds["GistNet"] = probe.net
    with torch.inference_mode():
        scores = score_level(lm, corpus, probe.windows, 1, conds["first token"], conds, sub_cfg)
    result = {"split": args.split, **recovery_table(probe, scores, list(conds), "selection")}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
