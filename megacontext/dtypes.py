"""Floating-point dtypes by name: the names configs and tree headers use, and their torch dtypes.

The one map from ``"float32"``/``"bfloat16"``/``"float16"`` to ``torch.dtype``. Imports nothing
of the project (torch only), so any layer may use it.
"""

from __future__ import annotations

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_NAMES: tuple[str, ...] = tuple(TORCH_DTYPES)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name``.

    Raises:
        ValueError: an unknown name (the known ones listed).
    """
    try:
        return TORCH_DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"dtype {name!r} is not one of {list(DTYPE_NAMES)}") from None
