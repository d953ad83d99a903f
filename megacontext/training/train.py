"""``train(cfg) -> (metrics, objects)``: the plain function behind ``train/train.py``.

Tests and notebooks call it directly with a composed config; the Hydra entry point is a thin
wrapper around it (the lightning-hydra-template pattern).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from megacontext.base import BaseLM
from megacontext.dtypes import TORCH_DTYPES
from megacontext.gistnet import LANE_SETTINGS, load_gistnet, untrained_levels
from megacontext.training.curves import TrainingCurves
from megacontext.training.module import GistTrainingModule

log = logging.getLogger(__name__)

DTYPES = TORCH_DTYPES  # model.dtype name -> torch dtype


def check_config(cfg: DictConfig) -> None:
    """Fail before any heavy work, naming every bad value: instantiate the small dataclass
    configs (each validates itself) and check the plain values here."""
    problems = []
    if cfg.model.dtype not in DTYPES:
        problems.append(f"model.dtype={cfg.model.dtype!r} is not one of {sorted(DTYPES)}")
    for key in ("gistnet", "data.window"):
        node = OmegaConf.select(cfg, key)
        try:
            instantiate(node, **({"hidden_size": 8} if key == "gistnet" else {}))
        except Exception as e:  # noqa: BLE001 — report every config problem, then raise once
            problems.append(f"{key}: {_root_cause(e)}")
    module = cfg.module
    if module.gist_rope not in ("point", "span", "gaussian"):
        problems.append(f"module.gist_rope={module.gist_rope!r} is not one of point, span, "
                        f"gaussian")
    if not (module.kl_weight >= 0 and math.isfinite(module.kl_weight)):
        problems.append(f"module.kl_weight={module.kl_weight!r} must be a finite number >= 0")
    if module.optimizer.lr <= 0:
        problems.append(f"module.optimizer.lr={module.optimizer.lr!r} must be > 0")
    if cfg.trainer.max_steps is None or cfg.trainer.max_steps < 1:
        problems.append(f"trainer.max_steps={cfg.trainer.max_steps!r} must be >= 1")
    if problems:
        raise ValueError("invalid training config:\n  " + "\n  ".join(problems))


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    return str(e)


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX): elsewhere torch
    emulates it and bfloat16 autocast is slower than float32, not faster."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True  # no way to tell (not Linux): keep what the config asks
    flags = {f for line in cpuinfo.splitlines() if line.startswith("flags")
             for f in line.split(":", 1)[1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cpu_precision(precision: str, accelerator: str, cpu_bf16: str,
                  cpuinfo: str | None = None) -> str:
    """The Trainer's precision: a bfloat16 one on a CPU without bfloat16 units becomes
    ``32-true`` when ``cpu_bf16`` is ``auto`` (measured on an AMD EPYC without AVX512: a
    SmolLM2 step 89 s under bf16 autocast against 6.9 s in float32; docs/training.md,
    "Training speed"); ``keep`` leaves it."""
    if cpu_bf16 not in ("auto", "keep"):
        raise ValueError(f"cpu_bf16={cpu_bf16!r}: expected auto or keep")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if cpu_bf16 == "auto" and on_cpu and precision.startswith("bf16") \
            and not cpu_has_bf16(cpuinfo):
        log.warning("trainer.precision=%s on a CPU without bfloat16 units (no avx512_bf16 or "
                    "amx_bf16): training in 32-true instead (cpu_bf16=keep keeps it)", precision)
        return "32-true"
    return precision


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Train GistNet as configured; return the final metrics and the live objects."""
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    base = BaseLM.load(cfg.model.name, dtype=DTYPES[cfg.model.dtype])
    start = None
    if cfg.get("init_from"):  # a GistNet export to start from: its shape, weights and record
        start = load_gistnet(Path(str(cfg.init_from)).expanduser(),
                             expect_fingerprint=base.fingerprint)
        gistnet_cfg = start.cfg
        log.info("starting from the GistNet at %s (%s); the gistnet group is ignored",
                 cfg.init_from, ", ".join(f"L{k} {e['steps']} steps" for k, e in
                                          start.training_record.items()))
    else:
        gistnet_cfg = instantiate(cfg.gistnet, hidden_size=base.config.hidden_size)
    lane = cfg.module.get("lane")
    lane = OmegaConf.to_container(lane, resolve=True) if lane else None
    if start is not None and start.lane is not None:  # an export's lane goes on training
        if lane is not None:
            log.info("module.lane is ignored: the GistNet at %s has its own lane", cfg.init_from)
        lane = {k: v for k, v in start.lane.config_dict().items() if k in LANE_SETTINGS}
    datamodule = instantiate(cfg.data, model=cfg.model.name)
    module = GistTrainingModule(
        base=base, gistnet=gistnet_cfg, optimizer=instantiate(cfg.module.optimizer),
        warmup_steps=cfg.module.warmup_steps, total_steps=cfg.module.total_steps,
        min_lr_ratio=cfg.module.min_lr_ratio, kl_weight=cfg.module.kl_weight,
        gist_rope=cfg.module.gist_rope, full_every=cfg.module.full_every,
        export_dir=str(out / "gistnet"), nll_weight=cfg.module.get("nll_weight", 1.0),
        recon_weight=cfg.module.get("recon_weight", 0.0),
        recon_spans=cfg.module.get("recon_spans", 16),
        recon_only_steps=cfg.module.get("recon_only_steps", 0),
        round_to=cfg.module.get("round_to"),
        joint_levels=cfg.module.get("joint_levels", True),
        ema_decay=cfg.module.get("ema_decay", 0.0),
        child_kl_weight=cfg.module.get("child_kl_weight", 0.0),
        curriculum_steps=cfg.module.get("curriculum_steps", 0),
        curriculum_start=cfg.module.get("curriculum_start", 1),
        lane=lane, lane_lr=cfg.module.get("lane_lr"),
        lane_weight_decay=cfg.module.get("lane_weight_decay"))
    if start is not None:  # a new lane on an export without one starts fresh (B = 0)
        state = {**module.gistnet.state_dict(), **start.state_dict()}
        module.gistnet.load_state_dict(state)
        module.gistnet.training_record = {k: dict(v) for k, v in start.training_record.items()}
        if module.gistnet_ema is not None:
            module.gistnet_ema.load_state_dict(state)
    loggers = [instantiate(cfg.logger)] if cfg.get("logger") else []
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=out / "checkpoints", save_last=True, every_n_train_steps=cfg.checkpoint_every,
        save_top_k=0)
    curves = TrainingCurves(out)
    precision = cpu_precision(str(cfg.trainer.get("precision", "32-true")),
                              str(cfg.trainer.get("accelerator", "auto")),
                              str(cfg.get("cpu_bf16", "auto")))
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False,
                                     callbacks=[checkpoint, curves],
                                     default_root_dir=str(out), precision=precision)
    log.info("training GistNet (%d parameters) against %s",
             sum(p.numel() for p in module.parameters()), base.config.name)
    # weights_only: a checkpoint is never unpickled beyond tensors and plain containers.
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if curves.seconds_per_step is not None:
        metrics["train/seconds_per_step"] = curves.seconds_per_step  # median, warm-up excluded
        log.info("training: %.3f s/step (median of %d steps)", curves.seconds_per_step,
                 len(curves.step_seconds))
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    record = module.gistnet.training_record
    log.info("GistNet levels trained: %s", ", ".join(
        f"L{k} {e['steps']} steps / {e['windows']} windows" if e["trained"] else f"L{k} untrained"
        for k, e in record.items()))
    untrained = untrained_levels(module.gistnet, range(1, gistnet_cfg.levels + 1))
    if untrained:
        log.warning("GistNet levels %s were not trained (data.window.l2_share=0?); their gists "
                    "are the untrained output prior", untrained)
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule,
                     "base": base, "export_dir": out / "gistnet", "training_record": record}
