"""Train LensNet, the learned focus scorer: ``train/train_lens.py compressor=<gistnet export>``.

:func:`train_lens` makes (or reuses) labelled examples with the run's GistNet
(:mod:`megacontext.lens.data`: full-detail values measured by the frozen base model on plain
text and on retrieval-shaped memories), splits them by example into training and validation,
fits :class:`~megacontext.lens.model.LensNet` with the listwise ranking loss
(:func:`~megacontext.lens.model.ranking_loss`) under Lightning, and exports it to
``<output_dir>/lens`` (or ``export_dir``) with the base model's fingerprint and the GistNet's
digest. Validation reports the loss, the share of retrieval examples whose planted fact scores
first among their candidates (``val/fact_top1``) and the mean label of the top-scored candidate
against the best and a random one (``val/regret``). ``history.json`` and ``lens_curves.png``
hold the curves.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from megacontext.lens import LensConfig, LensNet, ranking_loss, save_lens
from megacontext.training.curves import TrainingCurves

log = logging.getLogger(__name__)


class LensExamples(torch.utils.data.Dataset):
    """The examples ``ids`` of a :func:`~megacontext.lens.data.load_examples` dict, one item
    per example: its candidates, their labels and the query."""

    def __init__(self, data: dict, ids: np.ndarray) -> None:
        self.data, self.ids = data, np.asarray(ids, dtype=np.int64)
        order = np.argsort(data["example"], kind="stable")
        bounds = np.searchsorted(data["example"][order], np.arange(len(data["kind"]) + 1))
        self.rows = [order[bounds[e]:bounds[e + 1]] for e in range(len(data["kind"]))]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        e = int(self.ids[i])
        r, d = self.rows[e], self.data
        return {"gists": torch.from_numpy(d["gists"][r].astype(np.float32)),
                "levels": torch.from_numpy(d["levels"][r]),
                "features": torch.from_numpy(d["features"][r]),
                "labels": torch.from_numpy(d["labels"][r]),
                "is_fact": torch.from_numpy(d["is_fact"][r]),
                "query": torch.from_numpy(d["query"][e].astype(np.float32)),
                "query_pad": torch.from_numpy(d["query_pad"][e]),
                "kind": torch.tensor(int(d["kind"][e]))}


def collate_examples(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad the candidates to the longest example (``mask`` marks the real ones)."""
    n = max(x["labels"].shape[0] for x in items)
    b, c = len(items), items[0]["gists"].shape[1]
    out = {"gists": torch.zeros(b, n, c), "levels": torch.ones(b, n, dtype=torch.int64),
           "features": torch.zeros(b, n, items[0]["features"].shape[1]),
           "labels": torch.zeros(b, n), "is_fact": torch.zeros(b, n, dtype=torch.bool),
           "mask": torch.zeros(b, n, dtype=torch.bool)}
    for i, x in enumerate(items):
        k = x["labels"].shape[0]
        for key in ("gists", "levels", "features", "labels", "is_fact"):
            out[key][i, :k] = x[key]
        out["mask"][i, :k] = True
    out["query"] = torch.stack([x["query"] for x in items])
    out["query_pad"] = torch.stack([x["query_pad"] for x in items])
    out["kind"] = torch.stack([x["kind"] for x in items])
    return out


class LensModule(L.LightningModule):
    """LensNet under the listwise ranking loss; AdamW with a cosine schedule."""

    def __init__(self, lens: LensConfig, lr: float = 1e-3, weight_decay: float = 0.01,
                 total_steps: int = 1000, temperature: float = 0.1,
                 sign_weight: float = 0.2) -> None:
        super().__init__()
        self.lens = LensNet(lens)
        self.lr, self.weight_decay, self.total_steps = lr, weight_decay, total_steps
        self.temperature, self.sign_weight = temperature, sign_weight

    def _scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.lens(batch["gists"], batch["levels"], batch["features"], batch["query"],
                         batch["query_pad"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = ranking_loss(self._scores(batch), batch["labels"], batch["mask"],
                            self.temperature, self.sign_weight)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        s = self._scores(batch)
        m = batch["mask"]
        self.log("val/loss", ranking_loss(s, batch["labels"], m, self.temperature,
                                          self.sign_weight), prog_bar=True)
        for name, value in ranking_metrics(s, batch["labels"], m, batch["is_fact"],
                                           batch["kind"]).items():
            self.log(f"val/{name}", value, prog_bar=name == "fact_top1")

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.lens.parameters(), lr=self.lr,
                                weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, self.total_steps),
                                                           eta_min=0.1 * self.lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def ranking_metrics(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                    is_fact: torch.Tensor, kind: torch.Tensor) -> dict[str, float]:
    """``fact_top1``: share of the retrieval examples with the fact among their candidates (it
    may sit in the raw part of the context) whose top-scored candidate holds it;
    ``top1_label`` / ``best_label`` / ``mean_label``: the label of the top-scored candidate,
    of the best one and the mean one (nats per token), averaged over examples."""
    s = scores.masked_fill(~mask, -torch.inf)
    top = s.argmax(-1)  # [b]
    rows = torch.arange(s.shape[0])
    out = {"top1_label": float(labels[rows, top].mean()),
           "best_label": float(labels.masked_fill(~mask, -torch.inf).max(-1).values.mean()),
           "mean_label": float(((labels * mask).sum(-1) / mask.sum(-1)).mean())}
    retrieval = (kind == 1) & (is_fact & mask).any(-1)
    if retrieval.any():
        out["fact_top1"] = float(is_fact[rows, top][retrieval].float().mean())
    return out


def split_examples(kinds: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray,
                                                                                np.ndarray]:
    """Example ids for training and validation: ``val_fraction`` of each kind, at random."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for k in np.unique(kinds):
        ids = rng.permutation(np.flatnonzero(kinds == k))
        n = int(round(val_fraction * ids.size))
        val.append(ids[:n])
        train.append(ids[n:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


class LensCurves(TrainingCurves):
    """``history.json`` and ``lens_curves.png``: training loss per step; validation loss,
    fact top-1 and the top-scored candidate's label at each validation (the recording and
    the history file are :class:`TrainingCurves`'; only the figure differs)."""

    figure = "lens_curves.png"

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        if self.train:
            steps, losses = zip(*self.train, strict=True)
            a.plot(steps, losses, lw=0.6, alpha=0.5, label="training")
        if self.val:
            a.plot([r["step"] for r in self.val], [r.get("val/loss") for r in self.val], "o-",
                   label="validation")
            st = [r["step"] for r in self.val]
            for key, label in (("val/top1_label", "top-scored candidate"),
                               ("val/best_label", "best candidate (oracle)"),
                               ("val/mean_label", "average candidate")):
                b.plot(st, [r.get(key) for r in self.val], "o-", label=label)
            if any("val/fact_top1" in r for r in self.val):
                b2 = b.twinx()
                b2.plot(st, [r.get("val/fact_top1") for r in self.val], "s--", color="k",
                        label="fact ranked first (right axis)")
                b2.set(ylim=(0, 1.05), ylabel="share of retrieval examples")
                b2.legend(loc="lower right", fontsize=8)
        a.set(title="ranking loss", xlabel="step", ylabel="loss")
        a.legend()
        b.set(title="validation: full-detail value of the chosen node", xlabel="step",
              ylabel="nats / target token saved")
        b.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def train_lens(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Make or reuse the examples, train LensNet, export it; return metrics and objects."""
    from hydra.utils import instantiate
    from tqdm import tqdm

    from megacontext.base import BaseLM
    from megacontext.data import load_corpus
    from megacontext.data.needles import filler_stream
    from megacontext.dtypes import TORCH_DTYPES
    from megacontext.evaluation.evaluate import load_compressor
    from megacontext.gistnet import gistnet_digest
    from megacontext.lens.data import (
        HELD_OUT_FACT,
        LensDataConfig,
        build_examples,
        load_examples,
        save_examples,
    )

    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_cfg = LensDataConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in
                                 OmegaConf.to_container(cfg.examples, resolve=True).items()})
    lm = BaseLM.load(cfg.model.name, dtype=TORCH_DTYPES[cfg.model.dtype])
    compressor = load_compressor(cfg.compressor, lm, data_cfg.levels)
    digest = gistnet_digest(compressor)
    path = out / "examples.safetensors"
    about = {"examples": {k: list(v) if isinstance(v, tuple) else v
                          for k, v in data_cfg.__dict__.items()},
             "corpus": str(cfg.corpus), "split": [cfg.val_fraction, cfg.test_fraction, cfg.seed],
             "model": lm.fingerprint, "gistnet_digest": digest}
    about = json.loads(json.dumps(about))  # as stored: tuples become lists
    data = load_examples(str(path)) if path.exists() else None
    if data is not None and data["about"] != about:
        log.warning("%s was made with other settings (GistNet, model, corpus or examples.*); "
                    "making new examples", path)
        data = None
    if data is None:
        corpus = load_corpus(cfg.corpus, lm.tokenizer, progress=False)
        train_docs, _, _ = corpus.split(cfg.val_fraction, cfg.seed, cfg.test_fraction)
        filler = filler_stream(corpus, train_docs)
        bar = tqdm(total=data_cfg.examples, desc="lens examples", unit="ex",
                   disable=not cfg.progress_bar)
        with bar, torch.inference_mode():
            def progress(done: int, total: int, row: dict) -> None:
                bar.set_postfix(kind=row["kind"], best=f"{row['best']:.2f}", refresh=False)
                bar.update(1)
            data = build_examples(lm, compressor, filler, data_cfg, progress=progress)
        save_examples(data, str(path), about)
        log.info("wrote %d examples (%d candidates) to %s", len(data["kind"]),
                 len(data["labels"]), path)
    train_ids, val_ids = split_examples(data["kind"], cfg.lens_val_fraction, cfg.seed)
    loader = torch.utils.data.DataLoader
    train_dl = loader(LensExamples(data, train_ids), batch_size=cfg.batch_size, shuffle=True,
                      collate_fn=collate_examples)
    val_dl = loader(LensExamples(data, val_ids), batch_size=64, collate_fn=collate_examples)
    lens_cfg = instantiate(cfg.lensnet, hidden_size=lm.config.hidden_size)
    module = LensModule(lens_cfg, lr=cfg.lr, weight_decay=cfg.weight_decay,
                        total_steps=cfg.trainer.max_steps, temperature=cfg.temperature,
                        sign_weight=cfg.sign_weight)
    loggers = [instantiate(cfg.logger)] if cfg.get("logger") else []
    curves = LensCurves(out)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=[curves],
                                     default_root_dir=str(out))
    trainer.fit(module, train_dl, val_dl)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    lens = module.lens.eval()
    lens.gistnet_digest = digest
    lens.training_info = {"examples": int(len(data["kind"])), "train_examples": len(train_ids),
                          "val_examples": len(val_ids), "steps": int(trainer.global_step),
                          "held_out_fact": HELD_OUT_FACT.__dict__, "metrics": metrics,
                          "examples_config": {k: list(v) if isinstance(v, tuple) else v
                                              for k, v in data_cfg.__dict__.items()}}
    export = Path(cfg.get("export_dir") or out / "lens")
    save_lens(lens, export, lm.fingerprint)
    (out / "lens_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    log.info("lens exported to %s: %s", export,
             ", ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items())))
    return metrics, {"trainer": trainer, "module": module, "data": data,
                     "export_dir": export, "history": curves}


__all__ = ["LensCurves", "LensExamples", "LensModule", "collate_examples", "ranking_metrics",
           "split_examples", "train_lens"]
