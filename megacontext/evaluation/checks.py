"""Checking a composed ``eval`` config: :func:`check_config` builds every part's settings
(:mod:`megacontext.evaluation.config`) and raises once, naming every bad value, before any
model loads.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any, NamedTuple

from megacontext.evaluation.config import (
    DTYPES,
    MEAN,
    DistancePlan,
    LongRangePlan,
    MemoryConfig,
    MixedPlan,
    PasskeyConfig,
    SubstitutabilityConfig,
    Variant,
    WindowPlan,
)


def _plain(node: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node


def build_substitutability(node: Any) -> SubstitutabilityConfig:
    """A :class:`SubstitutabilityConfig` from the ``substitutability`` node (a mapping)."""
    d = dict(_plain(node) or {})
    problems = []
    parts: dict[str, Any] = {}
    for key, cls in (("windows", WindowPlan), ("mixed", MixedPlan), ("distance", DistancePlan)):
        try:
            parts[key] = cls(**(d.pop(key, None) or {}))
        except (ValueError, TypeError) as e:
            problems.append(f"{key}: {e}")
    variants = []
    for i, v in enumerate(d.pop("variants", None) or []):
        try:
            variants.append(Variant(**v))
        except (ValueError, TypeError) as e:
            problems.append(f"variants[{i}]: {e}")
    if problems:
        raise ValueError("; ".join(problems))
    return SubstitutabilityConfig(**parts, variants=tuple(variants), **d)


class EvalSettings(NamedTuple):
    """The validated parts of an ``eval`` config."""

    substitutability: SubstitutabilityConfig
    passkey: PasskeyConfig
    memory: MemoryConfig
    long_range: LongRangePlan


SPLITS = ("auto", "test", "validation", "all")


def check_config(cfg: Any) -> EvalSettings:
    """Validate a composed ``eval`` config before any heavy work; raise once naming every bad
    value. Returns the built settings."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    problems: list[str] = []
    sub = passkey = memory = long_range = None
    try:
        sub = build_substitutability(cfg.substitutability)
    except (ValueError, TypeError) as e:
        problems.append(f"substitutability: {e}")
    try:
        long_range = LongRangePlan(**dict(_plain(cfg.get("long_range")) or {"enabled": False}))
    except (ValueError, TypeError) as e:
        problems.append(f"long_range: {e}")
    split = cfg.get("split", "auto")
    if split not in SPLITS:
        problems.append(f"split={split!r} (expected one of {SPLITS})")
    allow = cfg.get("allow_untrained_levels", False)
    if not isinstance(allow, bool):
        problems.append(f"allow_untrained_levels={allow!r} (expected true or false)")
    upper = cfg.get("upper_levels", "error")
    if upper not in ("error", "untrained"):
        problems.append(f"upper_levels={upper!r} (expected error or untrained)")
    try:
        passkey = PasskeyConfig(**dict(_plain(cfg.passkey) or {}))
    except (ValueError, TypeError) as e:
        problems.append(f"passkey: {e}")
    if passkey is not None and passkey.enabled:
        try:
            memory = MemoryConfig(**dict(_plain(cfg.memory) or {}))
        except (ValueError, TypeError) as e:
            problems.append(f"memory: {e}")
        scorer = cfg.allocator.get("scorer")
        if scorer == "lens" and not _lens_given(cfg):
            problems.append(f"allocator.scorer=lens needs lens=<a LensNet export> (e.g. "
                            f"<run>/lens, holding lens.json), got lens={cfg.get('lens')!r}")
        elif scorer == "oracle":
            problems.append("allocator.scorer=oracle needs a judge; the passkey test uses "
                            "recency, similarity, lexical or lens")
        else:
            try:  # the lens scorer is built with its LensNet later; check the rest now
                node = OmegaConf.to_container(cfg.allocator, resolve=True)
                if scorer == "lens":
                    node.update(scorer="recency", scorer_options={})
                instantiate(node)
            except Exception as e:  # noqa: BLE001 — report every problem, then raise once
                problems.append(f"allocator: {_root_cause(e)}")
    if sub is not None and "lens" in (sub.mixed.scorer, sub.mixed.compare) and \
            sub.mixed.budgets and not _lens_given(cfg):
        problems.append(f"substitutability.mixed with the lens scorer needs lens=<a LensNet "
                        f"export>, got lens={cfg.get('lens')!r}")
    if cfg.model.dtype not in DTYPES:
        problems.append(f"model.dtype={cfg.model.dtype!r} is not one of {list(DTYPES)}")
    compressor = cfg.get("compressor")
    if compressor is None or str(compressor) == "":
        problems.append("compressor is not set: give a GistNet export directory "
                        "(<train run>/gistnet) or 'mean'")
    elif str(compressor) != MEAN and not Path(str(compressor)).expanduser().is_dir():
        problems.append(f"compressor={str(compressor)!r}: no such GistNet export directory "
                        f"(expected <train run>/gistnet holding gistnet.json, or 'mean')")
    for key in ("val_fraction", "test_fraction"):
        v = cfg.data.get(key, 0.0)
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or not 0.0 <= v < 1.0:
            problems.append(f"data.{key}={v!r} (expected a number in [0, 1), equal to "
                            f"training's)")
    if split == "test" and not cfg.data.get("test_fraction"):
        problems.append("split=test needs data.test_fraction > 0 (the share of test documents)")
    if split == "validation" and not cfg.data.get("val_fraction"):
        problems.append("split=validation needs data.val_fraction > 0")
    if problems:
        raise ValueError("invalid evaluation config:\n  " + "\n  ".join(problems))
    return EvalSettings(sub, passkey, memory or MemoryConfig(), long_range)


def _lens_given(cfg: Any) -> bool:
    lens = cfg.get("lens")
    return lens is not None and (Path(str(lens)).expanduser() / "lens.json").is_file()


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    return str(e)
