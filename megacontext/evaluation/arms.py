"""A content-addressed disk cache for the evaluation arms that do not depend on the GistNet.

Axes: ``n`` windows, ``H`` scored tokens.

``full``, ``truncated``, ``sink``, ``streaming@W``, ``recent@W``, the mean-pool and constant
placeholders (and a RoPE variant's ``full``/``truncated``) read only the base model and the
window's tokens, so two GistNet exports scored on the same windows share them. Each arm's
``[n, H]`` per-token NLL is stored once under the sha256 of everything it was computed from:

- the base model: its fingerprint (name, architecture digest, tokenizer digest), its dtype
  and a digest of every weight (:func:`model_identity`);
- the arm: the condition, its parameters (budget, sink tokens, position mode, gist RoPE), the
  window layout and the concrete RoPE (scaling and factor resolved);
- the windows: the corpus, the split, the window keys and a digest of every window's token ids
  (so a changed document, split or layout is a different key);
- :data:`CACHE_VERSION`, raised whenever the scoring of an arm changes meaning.

An entry ``<root>/<key[:2]>/<key>.npz`` holds the array, its sha256 and the key's whole
description. Reading checks all three; an entry whose description differs from the one asked
for (a hash collision, a hand-copied file), whose array is torn or of the wrong shape, or that
does not load is reported (``log.warning``), never reused, and overwritten by the recomputed
arm. Files are written to a temporary name and renamed, so a killed run leaves no torn entry.
Loading uses ``allow_pickle=False``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # raise when an arm's scoring changes (positions, conditions, reductions)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_plain)


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, np.integer | np.floating):
        return obj.item()
    if isinstance(obj, tuple | set):
        return list(obj)
    raise TypeError(f"cannot describe {type(obj).__name__} in a cache key")


def array_digest(a: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def model_identity(lm) -> dict:
    """What identifies the base model's numbers: fingerprint, dtype and a digest of every
    parameter and buffer (sorted by name)."""
    h = hashlib.sha256()
    state = lm.state_dict()  # tied weights appear under both names: harmless
    dtype = None
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        dtype = dtype or str(t.dtype)
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"fingerprint": dict(lm.fingerprint), "dtype": dtype, "weights_sha256": h.hexdigest()}


class ArmCache:
    """Get and put arms; ``root=None`` is a cache that holds nothing (every arm computed).

    Args:
        root: the cache folder (created on first write).
        model: :func:`model_identity` of the base model, part of every key.

    Attributes:
        hits, misses, rejected: counts since creation (``rejected``: entries found but not
            reused because a check failed).
    """

    def __init__(self, root: str | Path | None, model: dict | None = None) -> None:
        self.root = None if root is None else Path(root).expanduser()
        self.model = model or {}
        self.hits = self.misses = self.rejected = 0

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def describe(self, arm: dict) -> dict:
        """The full description an arm is keyed by."""
        return {"version": CACHE_VERSION, "model": self.model, "arm": arm}

    def key(self, arm: dict) -> str:
        return hashlib.sha256(_canonical(self.describe(arm)).encode()).hexdigest()

    def path(self, arm: dict) -> Path:
        if self.root is None:
            raise ValueError("a disabled cache has no paths")
        k = self.key(arm)
        return self.root / k[:2] / f"{k}.npz"

    def get(self, arm: dict, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
        """The stored array of ``arm``, or None (absent, or present and rejected)."""
        if self.root is None:
            return None
        path = self.path(arm)
        if not path.is_file():
            self.misses += 1
            return None
        problem = None
        try:
            with np.load(path, allow_pickle=False) as f:
                nll = np.array(f["nll"])
                digest = bytes(f["digest"]).decode()
                described = bytes(f["described"]).decode()
        except Exception as e:  # noqa: BLE001 — any unreadable entry is recomputed
            problem = f"unreadable ({type(e).__name__}: {e})"
        else:
            if described != _canonical(self.describe(arm)):
                problem = "it was stored for another arm, model or window set"
            elif digest != array_digest(nll):
                problem = "its array does not match its stored digest (torn or edited)"
            elif shape is not None and nll.shape != tuple(shape):
                problem = f"its array has shape {nll.shape}, expected {tuple(shape)}"
            elif not np.all(np.isfinite(nll)):
                problem = "its array holds non-finite values"
        if problem is not None:
            self.rejected += 1
            self.misses += 1
            log.warning("evaluation cache entry %s not reused: %s; recomputing", path, problem)
            return None
        self.hits += 1
        return nll

    def put(self, arm: dict, nll: np.ndarray) -> Path | None:
        """Store ``nll`` for ``arm`` (atomically); returns the entry's path."""
        if self.root is None:
            return None
        nll = np.ascontiguousarray(nll, dtype=np.float64)
        path = self.path(arm)
        path.parent.mkdir(parents=True, exist_ok=True)
        described = _canonical(self.describe(arm)).encode()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, nll=nll, digest=np.frombuffer(array_digest(nll).encode(), np.uint8),
                         described=np.frombuffer(described, np.uint8))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def summary(self) -> dict:
        return {"dir": None if self.root is None else str(self.root), "hits": self.hits,
                "misses": self.misses, "rejected": self.rejected}


def windows_digest(ids: np.ndarray) -> str:
    """The digest of a level's window token ids ``[n, L]`` (part of each arm's key)."""
    return array_digest(np.asarray(ids, dtype=np.int64))
