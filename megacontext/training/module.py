"""The LightningModule that trains GistNet against a frozen base model.

Loss: the base model's NLL on a window's horizon when its old context is replaced by gists
(``megacontext.substitution``), optionally plus ``kl_weight`` × KL(full-context distribution ‖
gist-context distribution) on the same horizon. Only GistNet is a submodule: the base model is
held outside the module tree, so it is neither optimised nor checkpointed nor counted.

The module also counts, per GistNet level, the optimizer steps that trained it and the
windows those steps saw (``GistNet.training_record``, written into the export).
"""

from __future__ import annotations

import copy
import math
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from einops import rearrange

from megacontext.base import BaseLM
from megacontext.dtypes import TORCH_DTYPES
from megacontext.encoders import compressor_for, span_states
from megacontext.gistnet import (
    GistLane,
    GistNet,
    GistNetConfig,
    LaneConfig,
    check_training_record,
    save_gistnet,
)
from megacontext.substitution import Window, recovery, score_window


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int,
                    total_steps: int, min_ratio: float = 0.1):
    """Linear warm-up, then cosine decay to ``min_ratio`` × the peak learning rate."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _top_level_only(compressor, top: int, x: torch.Tensor, level: int) -> torch.Tensor:
    """``compressor(x, level)``, gradient-free below level ``top``."""
    if level < top:
        with torch.no_grad():
            return compressor(x, level)
    return compressor(x, level)


class GistTrainingModule(L.LightningModule):
    """Trains a :class:`GistNet`; the frozen :class:`BaseLM` is given, not owned.

    Args:
        base: the frozen base model (kept out of the state dict and the optimizer).
        gistnet: GistNet config (its ``hidden_size`` must match the base model).
        optimizer: a partial optimizer constructor (Hydra ``_partial_: true``), called with
            GistNet's parameters.
        warmup_steps, total_steps, min_lr_ratio: the cosine schedule (per optimizer step).
        kl_weight: weight of KL(full ‖ gist) on the horizon (0 = NLL only).
        full_every: without KL, also score the full context (gradient-free) every this many
            steps to log ``train/delta_nll_lK`` (0 = never).
        gist_rope: ``point`` | ``span`` | ``gaussian`` rotation of gists.
        nll_weight: weight of the continuation NLL of the horizon (the gist condition).
        recon_weight: weight of the reconstruction NLL (:meth:`reconstruction_nll`; 0 = off).
        recon_spans: old-context spans reconstructed per batch.
        recon_only_steps: a first stage of this many optimizer steps trained on
            reconstruction alone, then every weighted loss.
        round_to: round gists to this storage dtype (``float16`` as the memory tree stores
            them; the gradient passes straight through the cast), or None.
        joint_levels: True = a level-k window trains levels 1 … k together (the gradient
            flows through the lower levels' gists); False = only level k, the lower levels'
            gists computed gradient-free (frozen in those batches, trained by their own;
            the residual gates then get no weight decay, which would move frozen levels).
        ema_decay: 0 = off; else validation and the export use an exponential moving
            average of GistNet's weights (``gistnet_ema``, a checkpointed copy the optimizer
            never sees), updated after every optimizer step with decay
            ``min(ema_decay, (1 + n) / (10 + n))`` at its n-th update.
        child_kl_weight: level >= 2 windows add this × KL(teacher || student) on the horizon,
            the teacher reading the old context as its children's gists (``child_kl``).
        curriculum_steps: 0 = off; else a curriculum over the number of gists: level-1
            windows keep only their newest ``k`` old-context spans as gists (the older ones
            dropped), ``k`` growing linearly from ``curriculum_start`` at step 0 to the
            window's own count at this step (the scored tokens are the same).
        curriculum_start: the number of gists the curriculum starts from (>= 1).
        export_dir: where the GistNet export (safetensors + JSON) is written at the end of
            fit and after each validation.

    Trained-level bookkeeping: a level-k window trains levels 1 … k (level k reads the
    level-(k−1) gists, so the gradient reaches every level below), or level k alone with
    ``share_levels`` (one core serves every level; a level counts as trained when its
    batches were seen) or ``joint_levels=False``. Each optimizer step adds 1 to the steps of
    every level that one of its accumulated batches trained, and those batches' windows to
    the level's windows (summed over ranks). The counts live in
    ``gistnet.training_record``, survive a checkpoint resume and are written by ``export``.
    """

    CHECKPOINT_KEY = "gistnet_training_record"

    def __init__(self, base: BaseLM, gistnet: GistNetConfig,
                 optimizer: Callable[..., torch.optim.Optimizer],
                 warmup_steps: int = 20, total_steps: int = 300, min_lr_ratio: float = 0.1,
                 kl_weight: float = 0.0, gist_rope: str = "point", full_every: int = 25,
                 export_dir: str | None = None, nll_weight: float = 1.0,
                 recon_weight: float = 0.0, recon_spans: int = 16, recon_only_steps: int = 0,
                 round_to: str | None = None, joint_levels: bool = True,
                 ema_decay: float = 0.0, child_kl_weight: float = 0.0,
                 curriculum_steps: int = 0, curriculum_start: int = 1,
                 lane: dict | None = None, lane_lr: float | None = None,
                 lane_weight_decay: float | None = None) -> None:
        super().__init__()
        if gistnet.hidden_size != base.config.hidden_size:
            raise ValueError(f"gistnet.hidden_size={gistnet.hidden_size} but the base model "
                             f"{base.config.name} has hidden_size {base.config.hidden_size}")
        object.__setattr__(self, "base", base)  # not a submodule: frozen, never checkpointed
        embeddings = base.model.embed_tokens.weight.detach().float()
        self.gistnet = GistNet(gistnet, init_output=embeddings.mean(0),
                               target_norm=embeddings.norm(dim=-1).mean().item())
        if lane:  # the gist lane: trained with GistNet, saved in its export
            self.gistnet.attach_lane(GistLane(LaneConfig.for_base(base.config, **lane)))
        self.lane_lr, self.lane_weight_decay = lane_lr, lane_weight_decay
        # what makes gists: the GistNet itself, or (contextual inputs) it with the base model
        object.__setattr__(self, "compressor", compressor_for(self.gistnet, base))
        self.optimizer_factory = optimizer
        self.warmup_steps, self.total_steps, self.min_lr_ratio = (warmup_steps, total_steps,
                                                                  min_lr_ratio)
        self.kl_weight, self.gist_rope, self.full_every = kl_weight, gist_rope, full_every
        self.export_dir = export_dir
        problems = [f"{k}={v!r} must be >= 0" for k, v in
                    (("nll_weight", nll_weight), ("recon_weight", recon_weight),
                     ("kl_weight", kl_weight), ("recon_only_steps", recon_only_steps),
                     ("child_kl_weight", child_kl_weight))
                    if not v >= 0]
        if curriculum_steps < 0 or curriculum_start < 1:
            problems.append(f"curriculum_steps={curriculum_steps!r} must be >= 0 and "
                            f"curriculum_start={curriculum_start!r} >= 1")
        if recon_spans < 1:
            problems.append(f"recon_spans={recon_spans!r} must be >= 1")
        if round_to not in (None, *TORCH_DTYPES):
            problems.append(f"round_to={round_to!r} (expected null or one of "
                            f"{list(TORCH_DTYPES)})")
        for name, v in (("lane_lr", lane_lr), ("lane_weight_decay", lane_weight_decay)):
            if v is not None and not (isinstance(v, (int, float)) and 0 <= v < 1e3):
                problems.append(f"{name}={v!r} (expected null or a number >= 0)")
        if not 0.0 <= ema_decay < 1.0:
            problems.append(f"ema_decay={ema_decay!r} must be in [0, 1)")
        if recon_only_steps and not recon_weight:
            problems.append("recon_only_steps > 0 needs recon_weight > 0")
        if nll_weight == 0 and recon_weight == 0 and kl_weight == 0 and child_kl_weight == 0:
            problems.append("every loss weight is 0: nothing to train")
        if problems:
            raise ValueError("invalid GistTrainingModule settings: " + "; ".join(problems))
        self.nll_weight, self.recon_weight, self.recon_spans = nll_weight, recon_weight, recon_spans
        self.recon_only_steps = recon_only_steps
        self.curriculum_steps, self.curriculum_start = curriculum_steps, curriculum_start
        self.round_to = TORCH_DTYPES[round_to] if round_to else None
        self.joint_levels = bool(joint_levels)
        self.ema_decay = float(ema_decay)
        self.child_kl_weight = float(child_kl_weight)
        self.gistnet_ema: GistNet | None = None
        if self.ema_decay:  # a submodule: checkpointed and resumed with the rest
            self.gistnet_ema = copy.deepcopy(self.gistnet).requires_grad_(False)
        self._ema_updates = 0
        self._val: dict[str, list[float]] = defaultdict(list)
        self._baselines: dict[tuple, tuple[float, float]] = {}  # frozen base: compute once
        self._tick: float | None = None
        self._pending: dict[int, int] = {}  # level -> windows since the last optimizer step

    # -- helpers --------------------------------------------------------------------------

    @staticmethod
    def window_of(batch: dict) -> Window:
        return Window(level=int(batch["level"]), num_gists=int(batch["num_spans"]),
                      tail=int(batch["tail"]), horizon=int(batch["horizon"]))

    def on_fit_start(self) -> None:
        self.base.to(self.device)

    @property
    def eval_gistnet(self) -> GistNet:
        """The weights validation scores and the export writes: the EMA copy when on."""
        return self.gistnet if self.gistnet_ema is None else self.gistnet_ema

    @property
    def eval_compressor(self):
        if self.gistnet_ema is None:
            return self.compressor
        return compressor_for(self.gistnet_ema, self.base)

    @torch.no_grad()
    def update_ema(self) -> None:
        """Move the EMA copy toward the current weights (its buffers, e.g. the contextual
        input calibration, are copied)."""
        decay = min(self.ema_decay, (1 + self._ema_updates) / (10 + self._ema_updates))
        for ema, live in zip(self.gistnet_ema.parameters(), self.gistnet.parameters(),
                             strict=True):
            ema.lerp_(live, 1.0 - decay)
        for ema, live in zip(self.gistnet_ema.buffers(), self.gistnet.buffers(), strict=True):
            ema.copy_(live)
        self._ema_updates += 1

    def optimizer_step(self, *args, **kwargs) -> None:
        # here, not in on_train_batch_end: checkpoint callbacks run before the module's hooks
        super().optimizer_step(*args, **kwargs)
        if self.gistnet_ema is not None:
            self.update_ema()

    def on_validation_start(self) -> None:
        self.base.to(self.device)

    # -- trained-level bookkeeping --------------------------------------------------------

    def levels_trained_by(self, level: int) -> range:
        """The GistNet levels whose parameters a level-``level`` window trains."""
        alone = self.gistnet.cfg.share_levels or not self.joint_levels
        return range(level, level + 1) if alone else range(1, level + 1)

    def training_compressor(self, level: int):
        """What compresses a level-``level`` training window: the compressor, or with
        ``joint_levels=False`` one whose lower levels run gradient-free."""
        if self.joint_levels or level == 1:
            return self.compressor
        return partial(_top_level_only, self.compressor, level)

    def _commit_step(self) -> None:
        """One optimizer step: credit the levels the accumulated batches trained."""
        levels = self.gistnet.cfg.levels
        windows = [self._pending.get(k, 0) for k in range(1, levels + 1)]
        self._pending.clear()
        if self._trainer is not None and self.trainer.world_size > 1:
            # every rank's batches went into this step (the gradients were all-reduced)
            t = torch.tensor(windows, dtype=torch.float64, device=self.device)
            windows = [round(v) for v in self.trainer.strategy.reduce(t, reduce_op="sum")
                       .tolist()]
        record = self.gistnet.training_record
        for k, n in zip(range(1, levels + 1), windows, strict=True):
            if n > 0:
                entry = record[k]
                entry["steps"] = (entry["steps"] or 0) + 1
                entry["windows"] = (entry["windows"] or 0) + n
                entry["trained"] = True

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # plain ints only: checkpoints are loaded with weights_only=True
        checkpoint["gistnet_ema_updates"] = int(self._ema_updates)
        checkpoint[self.CHECKPOINT_KEY] = {
            int(k): {"trained": bool(e["trained"]), "steps": int(e["steps"] or 0),
                     "windows": int(e["windows"] or 0)}
            for k, e in self.gistnet.training_record.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._ema_updates = int(checkpoint.get("gistnet_ema_updates", 0))
        # runs before the state dict is loaded: let EMA be switched on or off across a resume
        state = checkpoint.get("state_dict", {})
        has_ema = any(k.startswith("gistnet_ema.") for k in state)
        if self.gistnet_ema is not None and not has_ema:  # start the average at the weights
            state.update({"gistnet_ema." + k.removeprefix("gistnet."): v.clone()
                          for k, v in list(state.items()) if k.startswith("gistnet.")})
            self._ema_updates = 0
        elif self.gistnet_ema is None and has_ema:
            for k in [k for k in state if k.startswith("gistnet_ema.")]:
                del state[k]
        record = checkpoint.get(self.CHECKPOINT_KEY)
        if record is not None:  # a checkpoint from before the bookkeeping starts at 0
            self.gistnet.training_record = check_training_record(record,
                                                                 self.gistnet.cfg.levels)
        self._pending.clear()

    # -- training ---------------------------------------------------------------------------

    def reconstruction_nll(self, ids: torch.Tensor, window: Window) -> torch.Tensor:
        """Teacher-forced NLL of regenerating L1 spans from their gist alone.

        ``recon_spans`` spans of the batch's old context (the same choice on every rank for a
        given step) are each read as ``[gist, its 32 tokens]`` by the frozen model, the gist at
        position 0 and the tokens at 1 … 32 (relative positions are all RoPE sees), and every
        token is a target: dense supervision at 33 positions per span.
        """
        span = window.span
        spans = rearrange(ids[:, :window.context], "b (g s) -> (b g) s", s=span)  # [B, s]
        g = torch.Generator().manual_seed(int(self.global_step))
        pick = torch.randperm(spans.shape[0], generator=g)[:self.recon_spans]
        spans = spans[pick.to(spans.device)]  # [n, s]
        embeds = self.base.embed(spans)  # [n, s, c]
        gists = self.compressor(embeds[:, None], 1)  # [n, 1, c]
        if self.round_to is not None:
            gists = gists.to(self.round_to).to(embeds.dtype)
        entries = torch.cat([gists.to(embeds.dtype), embeds[:, :-1]], dim=1)  # [n, s, c]
        positions = torch.arange(span, dtype=torch.float64)
        lane = self.gistnet.lane  # the gist (row 0) is read through the lane, if any
        rows = torch.arange(span) == 0
        logits = self.base(entries, positions, lane=None if lane is None else lane.at(rows))
        return F.cross_entropy(rearrange(logits, "n s v -> (n s) v"), spans.reshape(-1))

    def calibrate(self, ids: torch.Tensor, window: Window) -> None:
        """Contextual inputs: fix their standardisation from this batch's old-context spans,
        once (the statistics are buffers: checkpointed, exported, restored on resume)."""
        spans = rearrange(ids[:, :window.context], "b (g s) -> (b g) s", s=window.span)
        states = span_states(self.base, self.base.embed(spans), self.gistnet.cfg.input_layer)
        self.gistnet.calibrate_inputs(states)

    def curriculum(self, ids: torch.Tensor, window: Window) -> tuple[torch.Tensor, Window]:
        """The batch as this step of the curriculum over the number of gists trains on: a
        level-1 window keeps its newest ``k`` old-context spans (``curriculum_steps``)."""
        n = window.num_gists
        if window.level != 1 or self.global_step >= self.curriculum_steps:
            return ids, window
        k = min(n, self.curriculum_start + (n - self.curriculum_start) * self.global_step
                // self.curriculum_steps)
        drop = (n - k) * window.span
        return ids[:, drop:], Window(level=1, num_gists=k, tail=window.tail,
                                     horizon=window.horizon)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        ids, window = self.curriculum(batch["ids"], self.window_of(batch))
        level = f"l{window.level}"
        if self.gistnet.cfg.input_layer and not bool(self.gistnet.input_calibrated):
            self.calibrate(ids, window)
        # reconstruction trains level 1 in every batch, whatever the window's level
        levels = set(self.levels_trained_by(window.level)) | ({1} if self.recon_weight else set())
        for k in sorted(levels):
            self._pending[k] = self._pending.get(k, 0) + ids.shape[0]
        recon = None
        if self.recon_weight > 0:
            recon = self.reconstruction_nll(ids, window)
            self.log("train/recon_nll", recon.detach(), prog_bar=True)
        if self.global_step < self.recon_only_steps:  # stage 1: reconstruction alone
            self.log("train/loss", recon.detach(), prog_bar=True)
            return self.recon_weight * recon
        want_full = self.kl_weight > 0 or (self.full_every > 0
                                           and self.global_step % self.full_every == 0)
        nll_gist, logits = score_window(self.base, ids, window, "gist",
                                        compressor=self.training_compressor(window.level),
                                        gist_rope=self.gist_rope, return_logits=True,
                                        round_to=self.round_to, lane=self.gistnet.lane)
        loss = self.nll_weight * nll_gist
        if recon is not None:
            loss = loss + self.recon_weight * recon
        if want_full:
            with torch.no_grad():
                nll_full, full_logits = score_window(self.base, ids, window, "full",
                                                     return_logits=True)
            self.log(f"train/delta_nll_{level}", nll_gist.detach() - nll_full)
            if self.kl_weight > 0:
                kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(full_logits, -1),
                              log_target=True, reduction="batchmean") / window.horizon
                loss = loss + self.kl_weight * kl
                self.log("train/kl", kl)
        if self.child_kl_weight > 0 and window.level >= 2:
            kl = self.child_kl(ids, window, logits)
            loss = loss + self.child_kl_weight * kl
            self.log(f"train/child_kl_{level}", kl.detach())
        self.log("train/loss", loss, prog_bar=True)
        self.log(f"train/nll_gist_{level}", nll_gist.detach())
        now = time.perf_counter()
        if self._tick is not None:
            self.log("train/tokens_per_s", ids.numel() / (now - self._tick))
        self._tick = now
        return loss

    def child_kl(self, ids: torch.Tensor, window: Window, logits: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student) per horizon token, for a level-k window (k >= 2): the
        teacher reads the old context as the level-(k−1) gists of its children (gradient-free,
        the current weights), the student (``logits``) as its level-k gists. A target one
        level closer than the full context, in the gists' own language."""
        child = Window(level=window.level - 1, num_gists=window.num_gists * self.gistnet.cfg.span,
                       tail=window.tail, horizon=window.horizon)
        with torch.no_grad():
            _, teacher = score_window(self.base, ids, child, "gist", compressor=self.compressor,
                                      gist_rope=self.gist_rope, return_logits=True,
                                      round_to=self.round_to)
        return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher, -1), log_target=True,
                        reduction="batchmean") / window.horizon

    def on_before_optimizer_step(self, optimizer) -> None:
        self._commit_step()
        norms = [p.grad.norm() for p in self.gistnet.parameters() if p.grad is not None]
        if norms:
            self.log("train/grad_norm", torch.stack(norms).norm())

    def configure_optimizers(self):
        lane = self.gistnet.lane
        lane_params = [] if lane is None else list(lane.parameters())
        own = {id(p) for p in lane_params}
        params = [p for p in self.gistnet.parameters() if id(p) not in own]
        groups = [{"params": params}]
        if not self.joint_levels:  # one gate tensor holds every level's gate: decaying it
            gate = self.gistnet.gate  # would move a level that this batch leaves frozen
            groups = [{"params": [p for p in params if p is not gate]},
                      {"params": [gate], "weight_decay": 0.0}]
        if lane_params:  # its own rate and decay when set (the optimizer's otherwise)
            group = {"params": lane_params}
            if self.lane_lr is not None:
                group["lr"] = float(self.lane_lr)
            if self.lane_weight_decay is not None:
                group["weight_decay"] = float(self.lane_weight_decay)
            groups.append(group)
        params = groups if len(groups) > 1 else params
        optimizer = self.optimizer_factory(params=params)
        scheduler = cosine_schedule(optimizer, self.warmup_steps, self.total_steps,
                                    self.min_lr_ratio)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- validation -------------------------------------------------------------------------

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        ids, window = batch["ids"], self.window_of(batch)
        key = (batch_idx, window.level, tuple(batch["doc"].tolist()),
               tuple(batch["offset"].tolist()))
        if key not in self._baselines:
            self._baselines[key] = (score_window(self.base, ids, window, "full").item(),
                                    score_window(self.base, ids, window, "truncated").item())
        full, truncated = self._baselines[key]
        gist = score_window(self.base, ids, window, "gist", compressor=self.eval_compressor,
                            gist_rope=self.gist_rope, round_to=self.round_to,
                            lane=self.eval_gistnet.lane).item()
        level, n = f"l{window.level}", ids.shape[0]
        for name, value in (("full", full), ("truncated", truncated), ("gist", gist)):
            self._val[f"{name}_{level}"] += [value] * n

    def on_validation_epoch_end(self) -> None:
        levels = sorted({k.rsplit("_", 1)[1] for k in self._val})
        for level in levels:
            full, trunc, gist = (sum(self._val[f"{c}_{level}"]) / len(self._val[f"{c}_{level}"])
                                 for c in ("full", "truncated", "gist"))
            self.log(f"val/nll_full_{level}", full)
            self.log(f"val/nll_truncated_{level}", trunc)
            self.log(f"val/nll_gist_{level}", gist)
            self.log(f"val/delta_nll_{level}", gist - full, prog_bar=level == "l1")
            self.log(f"val/recovery_{level}", recovery(trunc, gist, full), prog_bar=level == "l1")
        self._val.clear()
        if self.export_dir and not self.trainer.sanity_checking:
            self.export(self.export_dir)

    # -- export -----------------------------------------------------------------------------

    def export(self, directory: str | Path) -> Path:
        """Write the GistNet export that ``megacontext ingest --gistnet`` takes."""
        if self._trainer is not None and self.trainer.global_rank != 0:  # also usable unattached
            return Path(directory)
        net = self.eval_gistnet
        net.training_record = self.gistnet.training_record  # the counts live on the trained net
        return save_gistnet(net, directory, self.base.fingerprint)

    def on_fit_end(self) -> None:
        if self.export_dir:
            self.export(self.export_dir)
