"""``evaluate(cfg) -> dict``: the plain function behind ``eval/eval.py``.

Tests and notebooks call it with a composed config (``configs/eval.yaml``); the Hydra entry
point is a thin wrapper around it, as for training.

Writes into ``cfg.output_dir``: ``substitutability.json``, ``substitutability.md`` (the table
that ``eval/eval.py`` prints), ``delta_nll_by_level.png``, ``delta_nll_by_distance.png``,
``nll_vs_budget.png``, and with the passkey test ``passkey.json`` and ``passkey.png``;
``timing.json`` holds wall times (kept out of the results, which are deterministic).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from megacontext.base import BaseLM
from megacontext.data import load_corpus
from megacontext.evaluation.config import MEAN, check_config
from megacontext.evaluation.passkey import run_passkey
from megacontext.evaluation.report import markdown, passkey_markdown, plot_all, plot_passkey
from megacontext.evaluation.substitutability import held_out_windows, run_substitutability
from megacontext.gistnet import MeanPoolGist, gistnet_digest, load_gistnet

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_compressor(spec: str, lm: BaseLM, levels: int, span: int = 32):
    """A GistNet export for ``lm`` serving ``levels`` levels, or the mean-pool baseline.

    Raises:
        FileNotFoundError: no export at ``spec`` (the path is named).
        ValueError: the export was trained for another base model (each differing field
            named), serves too few levels, or has another span.
    """
    if str(spec) == MEAN:
        return MeanPoolGist(span).eval()
    path = Path(str(spec)).expanduser()
    try:
        model = load_gistnet(path, expect_fingerprint=lm.fingerprint)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"compressor={str(spec)!r}: {e} (pass the gistnet/ folder of a "
                                f"training run, or compressor=mean)") from None
    except ValueError as e:
        raise ValueError(f"compressor={str(spec)!r} cannot serve base model "
                         f"{lm.config.name!r}: {e}") from None
    if model.cfg.levels < levels:
        raise ValueError(f"compressor={str(spec)!r} serves {model.cfg.levels} gist level(s), the "
                         f"evaluation needs {levels} (level-2 windows or a {levels}-level "
                         f"memory); set substitutability.windows.num_l2_windows=0 and "
                         f"memory.levels=1, or train more levels")
    if model.cfg.span != span:
        raise ValueError(f"compressor={str(spec)!r} has span {model.cfg.span}, the windows use "
                         f"{span}")
    return model.eval()


def training_split(compressor: str, data: DictConfig) -> str:
    """Check the evaluation's split against the training run that made the GistNet export.

    A training run made by ``train/train.py`` keeps its composed config in
    ``<run>/.hydra/config.yaml`` next to ``<run>/gistnet``. On the same corpus, its
    ``val_fraction`` and split ``seed`` must equal the evaluation's, or the "held-out"
    documents could be training documents.

    Returns:
        ``"matches"``, ``"other corpus"`` (a cross-domain evaluation), or ``"unknown"`` (no
        training config found, or the mean-pool baseline).

    Raises:
        ValueError: same corpus, different split; both settings named.
    """
    if str(compressor) == MEAN:
        return "unknown"
    saved = Path(str(compressor)).expanduser().parent / ".hydra" / "config.yaml"
    if not saved.is_file():
        return "unknown"
    train = OmegaConf.load(saved)
    try:
        corpus, vf, seed = (OmegaConf.select(train, k, throw_on_resolution_failure=True)
                            for k in ("data.corpus", "data.val_fraction", "data.seed"))
    except Exception:  # noqa: BLE001 — an unreadable config cannot vouch for the split
        return "unknown"
    if corpus is None or str(corpus) != str(data.corpus):
        return "other corpus"
    if (vf, seed) != (data.val_fraction, data.seed):
        raise ValueError(
            f"the GistNet at {compressor} was trained on {corpus!r} with data.val_fraction={vf} "
            f"and data.seed={seed} ({saved}); this evaluation splits with "
            f"data.val_fraction={data.val_fraction} and data.seed={data.seed}, so its held-out "
            f"documents may be training documents. Use the training run's values")
    return "matches"


def _json_safe(x: Any) -> Any:
    """NaN/inf → null (strict JSON), tuples → lists."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(_json_safe(data), indent=1, allow_nan=False) + "\n")
    return path


def flat_metrics(results: dict) -> dict[str, float]:
    """Scalar metrics for a logger: ``eval/<key>_lK`` style names."""
    out: dict[str, float] = {}
    for key, block in results.items():
        if not (key[:1] == "l" and key[1:].isdigit()):
            continue
        for name, value in block.items():
            if isinstance(value, int | float) and not isinstance(value, bool) \
                    and math.isfinite(value):
                out[f"eval/{name}" if name.endswith(key) else f"eval/{name}_{key}"] = value
        for m in block.get("mixed", []):
            out[f"eval/nll_mixed_{key}_w{m['budget']}"] = m["nll"]
    passkey = results.get("passkey")
    if passkey:
        for cond in passkey["conditions"]:
            if passkey[cond]["mean_accuracy"] is not None:
                out[f"eval/passkey_{cond}"] = passkey[cond]["mean_accuracy"]
    return out


def evaluate(cfg: DictConfig) -> dict:
    """Run the evaluation as configured; return the results (``substitutability.json``'s
    content, plus ``passkey`` when that test ran)."""
    sub_cfg, passkey_cfg, memory_cfg = check_config(cfg)
    split_check = training_split(cfg.compressor, cfg.data)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()

    lm = BaseLM.load(cfg.model.name, dtype=DTYPES[cfg.model.dtype])
    levels = max([*sub_cfg.windows.levels,
                  *([memory_cfg.levels] if passkey_cfg.enabled else [])])
    compressor = load_compressor(cfg.compressor, lm, levels, sub_cfg.windows.span)
    data = cfg.data
    corpus = load_corpus(data.corpus, lm.tokenizer, min_tokens=data.get("min_tokens"),
                         cache_dir=data.get("cache_dir"), text_field=data.get("text_field", "text"),
                         source=data.get("source"), progress=False)
    split_seed, val_fraction = int(data.seed), float(data.val_fraction)
    windows = held_out_windows(corpus, val_fraction, split_seed, sub_cfg.windows)
    timing["setup"] = time.perf_counter() - t0
    log.info("evaluating %s with %s on %s: %s", lm.config.name, cfg.compressor, corpus.name,
             ", ".join(f"{len(w)} level-{k} windows" for k, w in windows.items()))

    done = {"windows": 0}
    total = sum(len(w) for w in windows.values()) + min(
        sub_cfg.distance.num_windows, len(windows.get(1, [])))

    def progress(n: int) -> None:
        done["windows"] += n
        log.info("scored %d/%d windows (%.0f s)", done["windows"], total,
                 time.perf_counter() - t0)

    t1 = time.perf_counter()
    scored, _ = run_substitutability(lm, compressor, corpus, windows, sub_cfg,
                                     seed=int(cfg.seed), progress=progress)
    timing["substitutability"] = time.perf_counter() - t1
    h = sub_cfg.windows.horizon
    docs = {key.doc for keys in windows.values() for key in keys}
    results = {
        "horizon": h,
        "horizons": list(sub_cfg.windows.horizons),
        "num_documents": len(docs),
        "num_tokens_scored": sum(len(k) for k in windows.values()) * h,
        "model": lm.config.name,
        "compressor": str(cfg.compressor),
        "compressor_digest": gistnet_digest(compressor),
        "corpus": corpus.name,
        "val_fraction": val_fraction,
        "split_seed": split_seed,
        "training_split": split_check,
        "seed": int(cfg.seed),
        "bootstrap": sub_cfg.bootstrap,
        "position_mode": sub_cfg.position_mode,
        "gist_rope": sub_cfg.gist_rope,
        "mean_pool_rescale": sub_cfg.mean_pool_rescale,
        "mixed_scorer": sub_cfg.mixed.scorer,
        "mixed_tree_dtype": sub_cfg.mixed.tree_dtype,
        **scored,
    }
    write_json(out / "substitutability.json", results)
    results = json.loads((out / "substitutability.json").read_text())  # exactly what was written

    passkey = None
    if passkey_cfg.enabled:
        t2 = time.perf_counter()
        _, val = corpus.split(val_fraction, split_seed)
        passkey = run_passkey(lm, compressor, corpus, val, passkey_cfg,
                              allocator=lambda: instantiate(cfg.allocator), memory=memory_cfg,
                              seed=int(cfg.seed), progress=log.info)
        write_json(out / "passkey.json", passkey)
        passkey = json.loads((out / "passkey.json").read_text())
        plot_passkey(passkey, out / "passkey.png")
        timing["passkey"] = time.perf_counter() - t2

    table = markdown(results, passkey)
    (out / "substitutability.md").write_text(table)
    if cfg.get("plots", True):
        plot_all(results, out)
    if passkey is not None:
        results["passkey"] = passkey
    if cfg.get("logger"):
        logger = instantiate(cfg.logger)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        logger.log_metrics(flat_metrics(results), step=0)
        if hasattr(logger, "finalize"):
            logger.finalize("success")
    timing["total"] = time.perf_counter() - t0
    write_json(out / "timing.json", {k: round(v, 2) for k, v in timing.items()})
    log.info("evaluation done in %.0f s; results in %s", timing["total"], out)
    return results


__all__ = ["evaluate", "flat_metrics", "load_compressor", "passkey_markdown"]
