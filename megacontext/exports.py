"""What every export of trained weights shares (GistNet's and LensNet's): a digest of the
weights, the base-model fingerprint it records, a checked read of its metadata and a strict
safetensors load; and a GistNet export's training record (which levels were trained, on how
many steps). Exports are safetensors + JSON; nothing here unpickles."""

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


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def blank_training_record(levels: int, counts: int | None = 0) -> dict[int, dict]:
    """A training record with every level ``1 … levels`` untrained; ``counts`` fills the
    steps and windows (0 for a fresh GistNet, None for an export that recorded nothing)."""
    return {k: {"trained": False, "steps": counts, "windows": counts}
            for k in range(1, levels + 1)}


def _count_ok(v: object) -> bool:
    return v is None or (_is_int(v) and v >= 0)


def check_training_record(record: object, levels: int) -> dict[int, dict]:
    """Validate a training record (int or decimal-string level keys) for a GistNet of
    ``levels`` levels; return it with int keys, levels in order.

    Raises:
        ValueError: the levels are not exactly ``1 … levels``, or an entry is not
            ``{"trained": bool, "steps": int >= 0 | None, "windows": int >= 0 | None}``
            (``trained`` true needs ``steps`` >= 1).
    """
    if not isinstance(record, dict):
        raise ValueError(f"training record must be a dict, got {type(record).__name__}")
    out: dict[int, dict] = {}
    problems = []
    for key, entry in record.items():
        level = int(key) if isinstance(key, str) and key.isdigit() else key
        if not _is_int(level):
            problems.append(f"level key {key!r} is not an int")
            continue
        ok = (isinstance(entry, dict) and set(entry) == {"trained", "steps", "windows"}
              and isinstance(entry["trained"], bool) and _count_ok(entry["steps"])
              and _count_ok(entry["windows"])
              and (not entry["trained"] or (entry["steps"] or 0) >= 1))
        if not ok:
            problems.append(f"level {key}: {entry!r} (expected {{trained: bool, steps: int "
                            f">= 0 or null, windows: int >= 0 or null}}, trained needs steps "
                            f">= 1)")
            continue
        out[level] = dict(entry)
    if not problems and sorted(out) != list(range(1, levels + 1)):
        problems.append(f"levels {sorted(out)} (expected 1..{levels})")
    if problems:
        raise ValueError("bad training record: " + "; ".join(problems))
    return {k: out[k] for k in sorted(out)}


__all__ = ["blank_training_record", "check_training_record", "export_fingerprint", "load_weights",
           "read_export", "state_digest"]
