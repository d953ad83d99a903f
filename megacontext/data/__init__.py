"""Data for training and evaluation: offline corpora, the tokenized id cache, windows.

No Lightning here: :mod:`megacontext.training.datamodule` wraps this for the Trainer.
"""

from megacontext.data.corpora import (
    BUILTIN,
    load_corpus,
    read_shakespeare_archive,
    stdlib_files,
)
from megacontext.data.token_cache import Split, TokenCorpus, split_documents
from megacontext.data.windows import (
    LevelBatchSampler,
    WindowDataset,
    WindowKey,
    WindowLayout,
    WindowSampler,
    WindowSpec,
    collate_windows,
    evenly_spaced_windows,
)

__all__ = ["BUILTIN", "LevelBatchSampler", "Split", "TokenCorpus", "WindowDataset", "WindowKey",
           "WindowLayout", "WindowSampler", "WindowSpec", "collate_windows",
           "evenly_spaced_windows", "load_corpus", "read_shakespeare_archive", "split_documents",
           "stdlib_files"]
