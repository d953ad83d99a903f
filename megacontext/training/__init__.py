"""Training: the Lightning side (the only package that imports lightning)."""

from megacontext.training.datamodule import GistDataModule, WindowSpec

__all__ = ["GistDataModule", "WindowSpec"]
