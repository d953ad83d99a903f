"""GistNet exports: save, load and digest (safetensors and a JSON record, never pickle), and
:func:`with_levels`, a copy that serves more levels than it was trained for."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from megacontext.exports import (
    blank_training_record,
    check_training_record,
    export_fingerprint,
    load_weights,
    read_export,
    state_digest,
)
from megacontext.gistnet.lane import GistLane, LaneConfig
from megacontext.gistnet.net import ConstantGist, GistNet, GistNetConfig, MeanPoolGist

FORMAT_VERSION = 1
WEIGHTS_FILE = "gistnet.safetensors"
META_FILE = "gistnet.json"


def with_levels(model: GistNet, levels: int, prior: torch.Tensor) -> GistNet:
    """A copy of ``model`` that serves ``levels`` levels: its own levels unchanged (weights,
    residual gates, training record), each added level a fresh core that emits the output
    prior ``prior`` (normally the base model's mean token embedding, as at initialisation) and
    is recorded untrained. For a memory deeper than the levels a GistNet was trained for;
    the added levels' gists carry no content (``untrained_levels`` names them);
    ``extended_from`` holds ``model``'s digest (a LensNet trained on ``model`` checks it).

    Raises:
        ValueError: ``levels`` is below the model's, or the model shares one core across
            levels (``share_levels``: its per-level tables cannot grow).
    """
    old = model.cfg.levels
    if levels < old:
        raise ValueError(f"with_levels: the GistNet serves {old} levels, asked for {levels}")
    if model.cfg.share_levels and levels > old:
        raise ValueError("with_levels: a GistNet with share_levels=true cannot add levels")
    norm = float(model.target_norm)
    with torch.random.fork_rng(devices=[]):  # a fixed init: one digest, so builds can resume
        torch.manual_seed(levels)
        new = GistNet(dataclasses.replace(model.cfg, levels=levels), init_output=prior,
                      target_norm=norm if norm > 0 else None)
    if model.lane is not None:
        new.attach_lane(GistLane(model.lane.cfg))
    state = new.state_dict()
    for name, t in model.state_dict().items():
        if name == "gate":
            state[name][:old] = t
        else:
            state[name] = t
    new.load_state_dict(state, strict=True)
    record = getattr(model, "training_record", None) or blank_training_record(old, None)
    new.training_record = {**blank_training_record(levels), **record}
    new.extended_from = gistnet_digest(model)  # what a LensNet trained on `model` checks
    return new.train(model.training)


def gistnet_digest(model: GistNet | MeanPoolGist | ConstantGist) -> str:
    """sha256 hex of the kind, config and every tensor (sorted by name, with dtype and shape)."""
    model = getattr(model, "gistnet", model)  # a wrapper (e.g. contextual) digests its GistNet
    return state_digest({"kind": type(model).__name__, "config": model.config_dict()},
                        model.state_dict())


def save_gistnet(model: GistNet, directory: str | Path, base_fingerprint: dict) -> Path:
    """Write `gistnet.safetensors` and `gistnet.json` into `directory` (created if needed).

    Args:
        model: the GistNet.
        directory: target folder.
        base_fingerprint: the base model it was trained for, e.g. `{"name", "hidden_size",
            "vocab_size"}`; JSON scalars only. `hidden_size` is filled in if absent.

    Returns:
        The directory.
    """
    fp = export_fingerprint(base_fingerprint, model.cfg.hidden_size, "GistNet")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE))
    record = getattr(model, "training_record", None)  # None: a GistNet made some other way
    record = check_training_record(blank_training_record(model.cfg.levels, counts=None)
                                   if record is None else record, model.cfg.levels)
    meta = {"format": "megacontext-gistnet", "format_version": FORMAT_VERSION,
            "config": model.config_dict(), "base_fingerprint": fp,
            "digest": gistnet_digest(model),
            "training": {str(k): v for k, v in record.items()}}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return directory


def load_gistnet(directory: str | Path, expect_fingerprint: dict | None = None) -> GistNet:
    """Load a GistNet written by `save_gistnet` (safetensors only, never pickle).

    Args:
        directory: the folder holding `gistnet.json` and `gistnet.safetensors`.
        expect_fingerprint: fields of the base model in use; each must equal the recorded one.

    Raises:
        FileNotFoundError: a path is missing (named).
        ValueError: fingerprint mismatch (each field, both values), bad metadata, missing or
            extra tensors, wrong shapes, or weights that do not match the recorded digest.
    """
    directory = Path(directory)
    meta = read_export(directory, META_FILE, WEIGHTS_FILE, "gistnet", FORMAT_VERSION,
                       expect_fingerprint)
    fields = {f.name for f in dataclasses.fields(GistNetConfig)}
    config = dict(meta.get("config", {}))
    lane = config.pop("lane", None)
    unknown = sorted(set(config) - fields)
    if unknown or "config" not in meta:
        raise ValueError(f"{directory / META_FILE}: bad config (unknown fields {unknown})")
    model = GistNet(GistNetConfig(**config))
    if lane is not None:
        try:
            model.attach_lane(GistLane(LaneConfig(**lane)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{directory / META_FILE}: bad gist lane ({e})") from e
    load_weights(model, directory / WEIGHTS_FILE)
    if "digest" in meta and gistnet_digest(model) != meta["digest"]:
        raise ValueError(f"{directory}: weights do not match the recorded digest")
    if "training" in meta:
        try:
            model.training_record = check_training_record(meta["training"], model.cfg.levels)
        except ValueError as e:
            raise ValueError(f"{directory / META_FILE}: {e}") from e
    else:  # an export from before the record: nothing says any level was trained
        model.training_record = blank_training_record(model.cfg.levels, counts=None)
    return model
