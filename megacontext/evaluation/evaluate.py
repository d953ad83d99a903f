"""``evaluate(cfg) -> dict``: the plain function behind ``eval/eval.py``.

Tests and notebooks call it with a composed config (``configs/eval.yaml``); the Hydra entry
point is a thin wrapper around it, as for training.

Writes into ``cfg.output_dir``: ``substitutability.json``, ``substitutability.md`` (the table
that ``eval/eval.py`` prints), ``delta_nll_by_level.png``, ``delta_nll_by_distance.png``,
``nll_vs_budget.png``, and with the passkey test ``passkey.json`` and ``passkey.png``;
``timing.json`` holds wall times (kept out of the results, which are deterministic).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from megacontext.allocator import FocusAllocator, LensNet, load_lens
from megacontext.base import BaseLM
from megacontext.data import load_corpus
from megacontext.dtypes import TORCH_DTYPES
from megacontext.encoders import compressor_for
from megacontext.evaluation.arms import ArmCache, model_identity
from megacontext.evaluation.checks import check_config
from megacontext.evaluation.config import MEAN
from megacontext.evaluation.long_range import run_long_range
from megacontext.evaluation.passkey import run_passkey
from megacontext.evaluation.report import (
    condition_rows,
    markdown,
    passkey_markdown,
    plot_all,
    plot_passkey,
)
from megacontext.evaluation.substitutability import evaluation_windows, run_substitutability
from megacontext.gistnet import (
    MeanPoolGist,
    gistnet_digest,
    lane_of,
    load_gistnet,
    untrained_levels,
    with_levels,
)

log = logging.getLogger(__name__)


def load_compressor(spec: str, lm: BaseLM, levels: int, span: int = 32,
                    untrained_upper: bool = False):
    """A GistNet export for ``lm`` serving ``levels`` levels, or the mean-pool baseline.
    With ``untrained_upper``, an export with fewer levels gets untrained ones added
    (:func:`~megacontext.gistnet.with_levels`: they emit the output prior).

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
    if model.cfg.levels < levels and untrained_upper:
        log.warning("compressor=%s serves %d level(s); levels %d-%d are added untrained "
                    "(they emit the output prior: no content)", spec, model.cfg.levels,
                    model.cfg.levels + 1, levels)
        model = with_levels(model, levels, lm.model.embed_tokens.weight.detach().float().mean(0))
    if model.cfg.levels < levels:
        raise ValueError(f"compressor={str(spec)!r} serves {model.cfg.levels} gist level(s), the "
                         f"evaluation needs {levels} (level-2 windows or a {levels}-level "
                         f"memory); set substitutability.windows.num_l2_windows=0 and "
                         f"memory.levels=1, or train more levels")
    if model.cfg.span != span:
        raise ValueError(f"compressor={str(spec)!r} has span {model.cfg.span}, the windows use "
                         f"{span}")
    return compressor_for(model.eval(), lm)  # a contextual GistNet reads the base model


SPLIT_KEYS = ("val_fraction", "test_fraction", "seed")


def training_data(compressor: str) -> DictConfig | None:
    """The ``data`` config of the training run that made a GistNet export, or None.

    A run made by ``train/train.py`` keeps its composed config in ``<run>/.hydra/config.yaml``
    next to ``<run>/gistnet``; None for the baselines, a copied export, or an unreadable one.
    """
    if str(compressor) == MEAN:
        return None
    saved = Path(str(compressor)).expanduser().parent / ".hydra" / "config.yaml"
    if not saved.is_file():
        return None
    try:
        data = OmegaConf.select(OmegaConf.load(saved), "data", throw_on_resolution_failure=True)
    except Exception:  # noqa: BLE001 — an unreadable config cannot vouch for the split
        return None
    if data is None or OmegaConf.select(data, "corpus") is None:
        return None
    return data


def _split_settings(data: DictConfig) -> dict:
    return {k: data.get(k, 0.0 if k == "test_fraction" else None) for k in SPLIT_KEYS}


def evaluation_documents(corpus, data: DictConfig, split: str,
                         compressor: str) -> tuple[np.ndarray, dict]:
    """The documents to evaluate on, and how they were chosen (for the JSON).

    ``split=auto``: the test documents when ``data.corpus`` is the training run's corpus,
    every document of any other corpus (a cross-domain evaluation). ``test`` / ``validation``
    take that side of the split, ``all`` every document. On the training run's corpus the
    split settings (``val_fraction``, ``test_fraction``, ``seed``) must equal training's, or
    the "held-out" documents could be training documents.

    Raises:
        ValueError: same corpus, different split settings (both named), or an empty side.
    """
    train_data = training_data(compressor)
    if train_data is None:
        relation = "unknown"  # no training run to compare with: the split is taken as given
    elif str(train_data.corpus) != str(data.corpus):
        relation = "cross-domain"
    else:
        relation = "training corpus"
        ours, theirs = _split_settings(data), _split_settings(train_data)
        if split != "all" and ours != theirs:
            raise ValueError(
                f"the GistNet at {compressor} was trained on {train_data.corpus!r} with "
                + ", ".join(f"data.{k}={v}" for k, v in theirs.items())
                + "; this evaluation splits with "
                + ", ".join(f"data.{k}={v}" for k, v in ours.items())
                + ", so its held-out documents may be training documents. Use the training "
                  "run's values")
    if split == "auto":
        split = "all" if relation == "cross-domain" else "test"
    sides = corpus.split(float(data.val_fraction), int(data.seed),
                         float(data.get("test_fraction", 0.0)))
    docs = {"test": sides.test, "validation": sides.val,
            "all": np.arange(corpus.num_docs, dtype=np.int64)}[split]
    if docs.size == 0:
        raise ValueError(f"split={split!r} of corpus {corpus.name!r} has no documents "
                         f"(data.val_fraction={data.val_fraction}, "
                         f"data.test_fraction={data.get('test_fraction', 0.0)}); raise the "
                         f"fraction or use split=all")
    label = {"test": "test documents", "validation": "validation documents",
             "all": "every document"}[split]
    if relation == "cross-domain":
        label += f" (cross-domain: GistNet trained on {train_data.corpus})"
    return docs, {"split": split, "relation": relation, "label": label,
                  "cross_domain": relation == "cross-domain",
                  "training_corpus": None if train_data is None else str(train_data.corpus),
                  **_split_settings(data)}


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


def _scalar(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def flat_metrics(results: dict) -> dict[str, float]:
    """Every scalar result for a logger: ``eval/<key>_lK`` per level, ``eval/mixed/...``,
    ``eval/long_range/<C>/...`` and ``eval/passkey/<condition>/...`` names."""
    out: dict[str, float] = {}
    for key, block in results.items():
        if not (key[:1] == "l" and key[1:].isdigit()):
            continue
        for name, value in block.items():
            if _scalar(value):
                out[f"eval/{name}" if name.endswith(key) else f"eval/{name}_{key}"] = value
        for m in block.get("mixed", []):
            for name, value in m.items():
                if name != "budget" and _scalar(value):
                    out[f"eval/mixed/{key}_w{m['budget']}/{name}"] = value
    for row in (results.get("long_range") or {}).get("by_length", []):
        for name, value in row.items():
            if _scalar(value) and name != "context_tokens":
                out[f"eval/long_range/{row['context_tokens']}/{name}"] = value
    passkey = results.get("passkey")
    if passkey:
        for cond in passkey["conditions"]:
            if passkey[cond]["mean_accuracy"] is not None:
                out[f"eval/passkey_{cond}"] = passkey[cond]["mean_accuracy"]
            for i, length in enumerate(passkey["lengths"]):
                for j, depth in enumerate(passkey["depths"]):
                    acc = passkey[cond]["accuracy"][i][j]
                    if acc is not None:
                        out[f"eval/passkey/{cond}/{length}_depth{depth:g}"] = acc
    return out


def log_results(logger, cfg: DictConfig, results: dict, table: str) -> None:
    """The config, every scalar (:func:`flat_metrics`) and the full table to a Lightning logger:
    a wandb table, tensorboard text, or ``substitutability_table.csv`` in the logger's folder
    (csv and any other logger with a ``log_dir``)."""
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    logger.log_metrics(flat_metrics(results), step=0)
    columns, rows = condition_rows(results)
    if hasattr(logger, "log_table"):  # wandb
        logger.log_table(key="eval/substitutability", columns=columns, data=rows)
        if hasattr(logger, "log_text"):
            logger.log_text(key="eval/report", columns=["markdown"], data=[[table]])
    elif type(logger).__name__ == "TensorBoardLogger":
        logger.experiment.add_text("eval/substitutability", table, 0)
    if getattr(logger, "log_dir", None) and not hasattr(logger, "log_table"):
        folder = Path(logger.log_dir)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "substitutability_table.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(rows)
    logger.save()
    if hasattr(logger, "finalize"):
        logger.finalize("success")


def needed_levels(settings) -> list[int]:
    """The gist levels an evaluation reads: its windows', long range's and the memory's."""
    sub, passkey, memory, long_range = settings
    levels = set(sub.windows.levels)
    if long_range.enabled:
        levels |= set(long_range.levels)
    if passkey.enabled:
        levels |= set(range(1, memory.levels + 1))
    return sorted(levels)


def check_trained(compressor, spec: str, levels: list[int], allow: bool) -> list[int]:
    """The levels of ``levels`` that ``compressor`` never trained; an error unless ``allow``.

    Raises:
        ValueError: naming each untrained level and how to proceed.
    """
    untrained = untrained_levels(compressor, levels)
    if untrained and not allow:
        record = getattr(compressor, "training_record", None) or {}
        what = "; ".join(f"level {k}: " + (f"{record[k].get('steps') or 0} optimizer steps"
                                           if k in record else "no training record")
                         for k in untrained)
        raise ValueError(
            f"compressor={spec!r}: gist level(s) {untrained} were never trained ({what}), and "
            f"this evaluation reads levels {levels}. Train them, evaluate only trained levels "
            f"(e.g. substitutability.windows.num_l2_windows=0 long_range.levels=[1] "
            f"memory.levels=1), or set allow_untrained_levels=true to score them anyway (the "
            f"table then marks them untrained)")
    return untrained


def lens_for(cfg: DictConfig, lm: BaseLM, compressor) -> LensNet | None:
    """``cfg.lens`` loaded and checked against this base model and GistNet, or None when no
    scorer of the evaluation is ``lens``."""
    mixed = cfg.substitutability.mixed
    if "lens" not in (cfg.allocator.get("scorer"), mixed.get("scorer"), mixed.get("compare")):
        return None
    return load_lens(Path(str(cfg.lens)).expanduser(), expect_fingerprint=lm.fingerprint,
                     expect_gistnet_digest=gistnet_digest(compressor))


def allocator_factory(cfg: DictConfig, lens: LensNet | None) -> Callable[[], FocusAllocator]:
    """Makes the passkey test's allocator (``cfg.allocator``; ``lens`` for scorer ``lens``)."""
    if cfg.allocator.get("scorer") != "lens":
        return lambda: instantiate(cfg.allocator)
    return lambda: instantiate(cfg.allocator, scorer_options=lens_options(cfg, lens),
                               _convert_="all")


def lens_options(cfg: DictConfig, lens: LensNet | None) -> dict | None:
    """The ``lens`` scorer's options, for the passkey test and the mixed contexts alike: the
    LensNet and ``allocator.scorer_options`` (e.g. ``child_pool``)."""
    if lens is None:
        return None
    return {**(cfg.allocator.get("scorer_options") or {}), "lens": lens}


def arm_cache(cfg: DictConfig, lm: BaseLM) -> ArmCache:
    """The cache of the GistNet-independent arms at ``cfg.cache_dir`` (None: off)."""
    root = cfg.get("cache_dir")
    if root is None or str(root) == "":
        return ArmCache(None)
    return ArmCache(root, model_identity(lm))


def evaluate(cfg: DictConfig) -> dict:
    """Run the evaluation as configured; return the results (``substitutability.json``'s
    content, plus ``passkey`` when that test ran)."""
    settings = check_config(cfg)
    sub_cfg, passkey_cfg, memory_cfg, long_cfg = settings
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    show = bool(cfg.get("progress_bar", True))

    lm = BaseLM.load(cfg.model.name, dtype=TORCH_DTYPES[cfg.model.dtype])
    levels = needed_levels(settings)
    compressor = load_compressor(cfg.compressor, lm, max(levels), sub_cfg.windows.span,
                                 untrained_upper=cfg.get("upper_levels") == "untrained")
    untrained = check_trained(compressor, str(cfg.compressor), levels,
                              bool(cfg.get("allow_untrained_levels", False)))
    lens = lens_for(cfg, lm, compressor)
    data = cfg.data
    corpus = load_corpus(data.corpus, lm.tokenizer, min_tokens=data.get("min_tokens"),
                         cache_dir=data.get("cache_dir"), text_field=data.get("text_field", "text"),
                         source=data.get("source"), progress=False)
    docs, split = evaluation_documents(corpus, data, str(cfg.get("split", "auto")),
                                       str(cfg.compressor))
    windows = evaluation_windows(corpus, docs, sub_cfg.windows)
    timing["setup"] = time.perf_counter() - t0
    log.info("evaluating %s with %s on %s (%s, %d documents): %s", lm.config.name,
             cfg.compressor, corpus.name, split["label"], docs.size,
             ", ".join(f"{len(w)} level-{k} windows" for k, w in windows.items()))

    cache = arm_cache(cfg, lm)
    where = {"corpus": corpus.name, "split": {k: split[k] for k in ("split", *SPLIT_KEYS)}}
    total = sum(len(w) for w in windows.values()) + min(
        sub_cfg.distance.num_windows, len(windows.get(1, [])))
    t1 = time.perf_counter()
    with tqdm(total=total, desc="substitutability", unit="window", disable=not show,
              dynamic_ncols=True) as bar:
        scored, _ = run_substitutability(lm, compressor, corpus, windows, sub_cfg,
                                         seed=int(cfg.seed), progress=bar.update,
                                         lens_options=lens_options(cfg, lens), cache=cache,
                                         where=where)
    timing["substitutability"] = time.perf_counter() - t1
    h = sub_cfg.windows.horizon
    used = {key.doc for keys in windows.values() for key in keys}
    results = {
        "horizon": h,
        "horizons": list(sub_cfg.windows.horizons),
        "num_documents": len(used),
        "num_tokens_scored": sum(len(k) for k in windows.values()) * h,
        "model": lm.config.name,
        "compressor": str(cfg.compressor),
        "compressor_digest": gistnet_digest(compressor),
        "lane": None if lane_of(compressor) is None else lane_of(compressor).config_dict(),
        "training_record": getattr(compressor, "training_record", None),
        "untrained_levels": untrained,
        "corpus": corpus.name,
        "split": split,
        "evaluated_documents": int(docs.size),
        "seed": int(cfg.seed),
        "bootstrap": sub_cfg.bootstrap,
        "position_mode": sub_cfg.position_mode,
        "gist_rope": sub_cfg.gist_rope,
        "sink_tokens": sub_cfg.sink_tokens,
        "mixed_scorer": sub_cfg.mixed.scorer,
        "mixed_compare": sub_cfg.mixed.compare,
        "mixed_tree_dtype": sub_cfg.mixed.tree_dtype,
        "mixed_positions": sub_cfg.mixed.positions.as_dict(),
        **scored,
    }
    if long_cfg.enabled:
        t2 = time.perf_counter()
        section = run_long_range(lm, compressor, corpus, docs, long_cfg, seed=int(cfg.seed),
                                 bootstrap=sub_cfg.bootstrap, progress=show,
                                 sink_tokens=sub_cfg.sink_tokens, cache=cache, where=where)
        for row in section["by_length"]:  # wall times go to timing.json: the JSON stays exact
            timing[f"long_range_{row['context_tokens']}_per_window"] = row.pop(
                "seconds_per_window")
            row.pop("seconds", None)
        results["long_range"] = section
        timing["long_range"] = time.perf_counter() - t2
    write_json(out / "substitutability.json", results)
    results = json.loads((out / "substitutability.json").read_text())  # exactly what was written

    passkey = None
    if passkey_cfg.enabled:
        t3 = time.perf_counter()
        passkey = run_passkey(lm, compressor, corpus, docs, passkey_cfg,
                              allocator=allocator_factory(cfg, lens),
                              memory=memory_cfg,
                              seed=int(cfg.seed), progress=log.debug, progress_bar=show,
                              sink_tokens=sub_cfg.sink_tokens)
        write_json(out / "passkey.json", passkey)
        passkey = json.loads((out / "passkey.json").read_text())
        plot_passkey(passkey, out / "passkey.png")
        timing["passkey"] = time.perf_counter() - t3

    table = markdown(results, passkey)
    (out / "substitutability.md").write_text(table)
    if cfg.get("plots", True):
        plot_all(results, out)
    if passkey is not None:
        results["passkey"] = passkey
    if cfg.get("logger"):
        log_results(instantiate(cfg.logger), cfg, results, table)
    timing["total"] = time.perf_counter() - t0
    timing["cache"] = cache.summary()  # hits differ between runs: not part of the results
    write_json(out / "timing.json", {k: round(v, 2) if isinstance(v, float) else v
                                     for k, v in timing.items()})
    log.info("evaluation done in %.0f s; results in %s", timing["total"], out)
    return results


__all__ = ["evaluate", "evaluation_documents", "flat_metrics", "load_compressor", "log_results",
           "passkey_markdown"]
