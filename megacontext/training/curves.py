"""A callback that keeps the training history and plots it, whatever logger is configured."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import lightning as L


class TrainingCurves(L.Callback):
    """Records ``train/loss`` each step and the ``val/*`` metrics at each validation; writes
    ``history.json`` after every validation (an interrupted long run keeps its curve so far)
    and again, with ``training_curves.png`` (loss, and validation NLLs against the
    full-context and truncated baselines), into ``directory`` when fit ends. The history's
    ``seconds_per_step`` is the median wall time of a training batch (validation excluded;
    the first ``WARMUP`` batches of a fit, which pay for allocation and compilation, too)."""

    WARMUP = 5  # batches of each fit left out of seconds_per_step

    figure = "training_curves.png"  # written by ``plot`` when fit ends

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.train: list[tuple[int, float]] = []
        self.val: list[dict[str, float]] = []
        self.step_seconds: list[float] = []
        self._started: float | None = None
        self._batches = 0

    @property
    def seconds_per_step(self) -> float | None:
        return statistics.median(self.step_seconds) if self.step_seconds else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._started is not None:
            self._batches += 1
            if self._batches > self.WARMUP:
                self.step_seconds.append(time.perf_counter() - self._started)
            self._started = None
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self.train.append((trainer.global_step, float(loss)))

    def on_train_start(self, trainer, pl_module) -> None:
        """A resumed run continues the history its directory holds (up to the checkpoint)."""
        path = self.directory / "history.json"
        if trainer.global_step > 0 and path.is_file() and not (self.train or self.val):
            old = json.loads(path.read_text())
            self.train = [tuple(x) for x in old.get("train_loss", [])
                          if x[0] <= trainer.global_step]
            self.val = [r for r in old.get("val", []) if r["step"] <= trainer.global_step]

    def on_validation_end(self, trainer, pl_module) -> None:
        # not on_validation_epoch_end: callbacks run before the module's hook that logs val/*
        if trainer.sanity_checking:
            return
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.val.append({"step": trainer.global_step, **row})
        if trainer.global_rank == 0:
            self.write_history()

    def write_history(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / "history.json.tmp"
        tmp.write_text(json.dumps({"train_loss": self.train, "val": self.val,
                                   "seconds_per_step": self.seconds_per_step}, indent=1))
        tmp.replace(self.directory / "history.json")

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        self.write_history()
        self.plot(self.directory / self.figure)

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
        if self.train:
            steps, losses = zip(*self.train, strict=True)
            ax_loss.plot(steps, losses, lw=0.6, alpha=0.4, label="per step")
            k = max(1, len(losses) // 20)
            smooth = [sum(losses[max(0, i - k):i + 1]) / len(losses[max(0, i - k):i + 1])
                      for i in range(len(losses))]
            ax_loss.plot(steps, smooth, lw=2, label=f"running mean ({k + 1} steps)")
        ax_loss.set(title="training loss (NLL of the horizon with gists)", xlabel="step",
                    ylabel="nats / token")
        ax_loss.legend()
        steps = [r["step"] for r in self.val]
        for level in ("l1", "l2"):
            if not any(f"val/nll_gist_{level}" in r for r in self.val):
                continue
            rows = [r for r in self.val if f"val/nll_gist_{level}" in r]
            s = [r["step"] for r in rows]
            line = ax_val.plot(s, [r[f"val/nll_gist_{level}"] for r in rows], "o-",
                               label=f"gists {level.upper()}")[0]
            ax_val.axhline(rows[-1][f"val/nll_full_{level}"], ls="--", color=line.get_color(),
                           alpha=0.6, label=f"full context {level.upper()}")
            ax_val.axhline(rows[-1][f"val/nll_truncated_{level}"], ls=":",
                           color=line.get_color(), alpha=0.8,
                           label=f"truncated {level.upper()}")
        ax_val.set(title="held-out NLL of the horizon", xlabel="step", ylabel="nats / token")
        if steps:
            ax_val.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
