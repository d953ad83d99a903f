"""The Lightning data module for GistNet training: corpus -> cached ids -> windows.

The data itself (corpora, the id cache, windows and samplers) lives in
:mod:`megacontext.data`, which does not import Lightning, so evaluation can cut the same
windows; this module wires it into a :class:`~lightning.pytorch.LightningDataModule`.

Batches (see :mod:`megacontext.data.windows` for the layout): ``ids`` int64 ``[b, L]``,
``doc``/``offset`` int64 ``[b]``, and the batch's ``level``, ``num_spans``,
``context_tokens``, ``tail``, ``horizon`` as ints. The level is drawn once per batch.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import BatchSampler, DataLoader

from megacontext.base.tokenizer import Tokenizer
from megacontext.data.corpora import load_corpus
from megacontext.data.token_cache import TokenCorpus
from megacontext.data.windows import (
    LevelBatchSampler,
    WindowDataset,
    WindowKey,
    WindowSampler,
    WindowSpec,
    collate_windows,
    evenly_spaced_windows,
    fitting_docs,
)

__all__ = ["GistDataModule", "WindowDataset", "WindowKey", "WindowSampler", "WindowSpec",
           "collate_windows"]


class GistDataModule(LightningDataModule):
    """Windows of one corpus, split by document into training and validation.

    Args:
        corpus: a built-in corpus name (``pystdlib``, ``shakespeare``, ``shakespeare-folio``)
            or a folder / file path (see :func:`megacontext.data.load_corpus`).
        model: the base model's name or directory; only its ``tokenizer.json`` is read,
            never the weights.
        window: the window layout (default :class:`WindowSpec`).
        tokenizer: overrides ``model``'s tokenizer: a :class:`Tokenizer` or a
            ``tokenizer.json`` path.
        batch_size: windows per batch.
        val_fraction: share of documents held out for validation (training's model
            selection), by a hash of their names; 0 disables validation.
        test_fraction: share of documents held out for the reported evaluation
            (``eval/eval.py``), by the same hash; never seen in training or validation.
        max_val_windows: validation windows (evenly spaced over the held-out documents).
        seed: seeds the split and the training windows.
        num_workers: DataLoader workers (the windows do not depend on it).
        batches_per_epoch: training batches per epoch; default: about one pass over the
            training tokens (``ceil(tokens / (batch_size · L))``).
        min_tokens: passed to :func:`load_corpus` (default: the corpus's own).
        cache_dir: cache root (default ``$MEGACONTEXT_CACHE`` or ``~/.cache/megacontext``).
        text_field: JSONL field / Parquet column of user corpora.
        source: where a built-in corpus is read from instead (stdlib folder, Shakespeare
            archive).

    Multi-device training: each rank draws its own windows (seeded by its rank); run the
    Trainer with ``use_distributed_sampler=False`` so Lightning keeps this sampler.
    """

    def __init__(self, corpus: str | os.PathLike = "pystdlib",
                 model: str | os.PathLike = "smollm2-135m",
                 window: WindowSpec | None = None, *,
                 tokenizer: str | os.PathLike | Tokenizer | None = None, batch_size: int = 4,
                 val_fraction: float = 0.1, test_fraction: float = 0.1,
                 max_val_windows: int = 64, seed: int = 0,
                 num_workers: int = 0, batches_per_epoch: int | None = None,
                 min_tokens: int | None = None, cache_dir: str | os.PathLike | None = None,
                 text_field: str = "text", source: str | os.PathLike | None = None) -> None:
        super().__init__()
        problems = [f"{k}={v!r} must be >= {lo}" for k, v, lo in
                    (("batch_size", batch_size, 1), ("max_val_windows", max_val_windows, 1),
                     ("num_workers", num_workers, 0),
                     ("batches_per_epoch", batches_per_epoch or 1, 1))
                    if v < lo]
        for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= v < 1.0:
                problems.append(f"{name}={v!r} must be in [0, 1)")
        if 0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction >= 1:
            problems.append(f"val_fraction + test_fraction = {val_fraction + test_fraction:g} "
                            f"must be < 1 (training needs documents)")
        if problems:
            raise ValueError("invalid GistDataModule settings: " + "; ".join(problems))
        # Only plain values go into hparams: checkpoints are loaded with weights_only=True.
        self.save_hyperparameters(ignore=["tokenizer", "window"])
        if window is not None:
            self.hparams["window"] = dataclasses.asdict(window)
        self.corpus_name, self.model = str(corpus), model
        self.tokenizer_spec = tokenizer if tokenizer is not None else model
        self.window = window if window is not None else WindowSpec()
        self.batch_size, self.val_fraction, self.max_val_windows = (
            batch_size, val_fraction, max_val_windows)
        self.test_fraction = test_fraction
        self.seed, self.num_workers, self.batches_per_epoch = seed, num_workers, batches_per_epoch
        self.min_tokens, self.cache_dir = min_tokens, cache_dir
        self.text_field, self.source = text_field, source
        self.corpus: TokenCorpus | None = None
        self.train_docs = self.val_docs = self.test_docs = np.zeros(0, dtype=np.int64)
        self.val_windows: list[WindowKey] = []
        self.stats: dict = {}
        self._tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = resolve_tokenizer(self.tokenizer_spec, self.cache_dir)
        return self._tokenizer

    def _load(self) -> TokenCorpus:
        return load_corpus(self.corpus_name, self.tokenizer, min_tokens=self.min_tokens,
                           cache_dir=self.cache_dir, text_field=self.text_field,
                           source=self.source)

    def prepare_data(self) -> None:
        """Tokenize the corpus into the cache (once, on one process)."""
        self._load()

    def setup(self, stage: str | None = None) -> None:
        """Open the cache, split by document, check the windows fit, fix the validation set."""
        if self.corpus is not None:
            return
        corpus = self._load()
        spec = self.window
        train, val, test = corpus.split(self.val_fraction, self.seed, self.test_fraction)
        longest_name, longest = corpus.longest()
        for level, wide in spec.shapes:
            length, kind = spec.window_tokens(level, wide), "wide " if wide else ""
            if longest < length:
                raise ValueError(
                    f"no document of corpus {corpus.name!r} fits a {kind}level-{level} window "
                    f"of {length} tokens (context {spec.context_tokens(level, wide)} + tail "
                    f"{spec.tail_tokens} + horizon {spec.horizon}); the longest, "
                    f"{longest_name!r}, has {longest} tokens")
        lengths = corpus.doc_lengths
        shortest_window = min(spec.window_tokens(level) for level in spec.levels)
        skipped = {split: int(np.sum(lengths[docs] < shortest_window))
                   for split, docs in (("train", train), ("val", val))}
        for level, wide in spec.shapes:
            length, kind = spec.window_tokens(level, wide), "wide " if wide else ""
            for split, docs in (("training", train), ("validation", val)):
                if split == "validation" and (self.val_fraction == 0 or wide):
                    continue  # validation has no wide windows
                if fitting_docs(lengths, docs, length).size == 0:
                    best = int(lengths[docs].max(initial=0))
                    raise ValueError(
                        f"no {split} document of corpus {corpus.name!r} fits a {kind}level-"
                        f"{level} window of {length} tokens (the longest of its {len(docs)} "
                        f"{split} documents has {best}); change val_fraction or seed, or "
                        f"shorten the window")
        self.corpus, self.train_docs, self.val_docs, self.test_docs = corpus, train, val, test
        if self.val_fraction > 0:
            self.val_windows = evenly_spaced_windows(lengths, val, spec, self.max_val_windows)
        train_tokens = int(lengths[fitting_docs(lengths, train, shortest_window)].sum())
        if self.batches_per_epoch is None:
            self.batches_per_epoch = max(1, math.ceil(
                train_tokens / (self.batch_size * spec.window_tokens(spec.levels[0]))))
        self.stats = {"corpus": corpus.name, "documents": corpus.num_docs,
                      "tokens": corpus.num_tokens, "train_documents": int(train.size),
                      "val_documents": int(val.size), "test_documents": int(test.size),
                      "skipped_short": skipped,
                      "window_tokens": {level: spec.window_tokens(level)
                                        for level in spec.levels},
                      **({"wide_window_tokens": spec.window_tokens(1, True)}
                         if (1, True) in spec.shapes else {}),
                      "train_tokens": train_tokens, "val_windows": len(self.val_windows),
                      "batches_per_epoch": self.batches_per_epoch}
        rank_zero_info(
            f"data: {corpus.name}, {corpus.num_docs} documents, {corpus.num_tokens:,} tokens; "
            f"train {train.size} docs, val {val.size} docs, test {test.size} docs (held out "
            f"for eval/eval.py); skipped as shorter than a "
            f"{shortest_window}-token window: {skipped['train']} train, {skipped['val']} val; "
            f"{len(self.val_windows)} val windows, {self.batches_per_epoch} batches/epoch")

    def _rank(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.global_rank if trainer is not None else 0

    def _loader(self, dataset: WindowDataset, batch_sampler) -> DataLoader:
        return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate_windows,
                          num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        corpus = self._require_setup()
        sampler = WindowSampler(corpus.doc_lengths, self.train_docs, self.window,
                                batch_size=self.batch_size,
                                num_batches=self.batches_per_epoch, seed=self.seed,
                                rank=self._rank())
        trainer = getattr(self, "trainer", None)
        if trainer is not None:  # resuming: continue with the batch that comes next
            sampler.next_batch = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        return self._loader(WindowDataset(corpus, self.window),
                            BatchSampler(sampler, self.batch_size, drop_last=True))

    def val_dataloader(self) -> DataLoader | list:
        corpus = self._require_setup()
        if not self.val_windows:
            return []
        dataset = WindowDataset(corpus, self.window, self.val_windows)
        return self._loader(dataset, LevelBatchSampler(dataset.levels, self.batch_size))

    def _require_setup(self) -> TokenCorpus:
        if self.corpus is None:
            raise RuntimeError("call setup() before asking GistDataModule for a dataloader")
        return self.corpus


def resolve_tokenizer(spec: str | os.PathLike | Tokenizer,
                      cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """A :class:`Tokenizer` from itself, a ``tokenizer.json`` path, or a model name/directory
    (only its tokenizer is read)."""
    if isinstance(spec, Tokenizer):
        return spec
    from megacontext.base.loading import model_directory, read_config_and_tokenizer

    path = Path(str(spec)).expanduser()
    if path.is_file() and path.suffix == ".json":
        return Tokenizer(path)
    _, tokenizer = read_config_and_tokenizer(model_directory(spec, cache_dir))
    if tokenizer is None:
        raise FileNotFoundError(f"model {str(spec)!r} has no tokenizer.json")
    return tokenizer
