"""What every export of trained weights shares (GistNet's and LensNet's): a digest of the
weights, the base-model fingerprint it records, a checked read of its metadata and a strict
safetensors load. Exports are safetensors + JSON; nothing here unpickles."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn


def state_digest(head: dict, state: dict[str, torch.Tensor]) -> str:
    """sha256 hex of ``head`` (JSON, sorted keys) and every tensor of ``state`` (sorted by
    name, with dtype and shape)."""
    h = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
    for name, t in sorted(state.items()):
        h.update(f"\n{name}:{t.dtype}:{list(t.shape)}\n".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def export_fingerprint(base_fingerprint: dict, hidden_size: int, what: str) -> dict:
    """The base-model fingerprint an export records: JSON scalars, ``hidden_size`` filled in
    and equal to the model's."""
    fp = dict(base_fingerprint)
    bad = [k for k, v in fp.items() if not isinstance(v, str | int | float | bool | None)]
    if bad:
        raise ValueError(f"base_fingerprint values must be JSON scalars; not so for {bad}")
    fp.setdefault("hidden_size", hidden_size)
    if fp["hidden_size"] != hidden_size:
        raise ValueError(f"base_fingerprint hidden_size {fp['hidden_size']} != {what} "
                         f"hidden_size {hidden_size}")
    return fp


def read_export(directory: Path, meta_file: str, weights_file: str, what: str, version: int,
                expect_fingerprint: dict | None) -> dict:
    """An export's metadata, checked: files present, JSON, format version, and each field of
    ``expect_fingerprint`` equal to the recorded base fingerprint (every mismatch named)."""
    for p in (directory, directory / meta_file, directory / weights_file):
        if not p.exists():
            raise FileNotFoundError(f"{what} checkpoint path not found: {p}")
    try:
        meta = json.loads((directory / meta_file).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{directory / meta_file} is not valid JSON: {e}") from e
    if meta.get("format_version") != version:
        raise ValueError(f"{what} at {directory} has format_version "
                         f"{meta.get('format_version')!r}, this code reads {version}")
    fp = meta.get("base_fingerprint", {})
    wrong = [f"{k} {fp[k]!r}, this model has {v!r}" if k in fp else f"{k} <unrecorded>, "
             f"this model has {v!r}" for k, v in (expect_fingerprint or {}).items()
             if fp.get(k) != v]
    if wrong:
        raise ValueError(f"{what} at {directory} was trained for " + "; ".join(wrong))
    return meta


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a safetensors file into ``model``, every tensor present with its shape."""
    tensors = load_file(str(path))
    want = model.state_dict()
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    shapes = [f"{k}: {tuple(tensors[k].shape)}, expected {tuple(v.shape)}"
              for k, v in want.items() if k in tensors and tensors[k].shape != v.shape]
    if missing or extra or shapes:
        raise ValueError(f"{path} does not fit its config: missing {missing}, extra {extra}, "
                         f"wrong shapes {shapes}")
    model.load_state_dict({k: v.to(want[k].dtype) for k, v in tensors.items()}, strict=True)


__all__ = ["export_fingerprint", "load_weights", "read_export", "state_digest"]
