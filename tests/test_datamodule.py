"""Windows, samplers and the Lightning data module (megacontext.data.windows,
megacontext.training.datamodule)."""

from __future__ import annotations

import random
import string
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import BatchSampler, DataLoader

from megacontext.base.loading import load_token_embeddings
from megacontext.data import (
    LevelBatchSampler,
    WindowDataset,
    WindowKey,
    WindowSampler,
    collate_windows,
    evenly_spaced_windows,
    load_corpus,
)
from megacontext.training import GistDataModule, WindowSpec

# Small layout: level 1 = 3 spans of 4 tokens (12) + tail 5 + horizon 6 = 23 tokens;
# level 2 = 2 nodes of 16 tokens (32) + 11 = 43 tokens.
SMALL = WindowSpec(span=4, context_spans=3, tail_tokens=5, horizon=6, l2_share=0.5, l2_spans=2)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_token_embeddings(tiny_model_dir)[1]


def random_text(n: int, seed: int) -> str:
    """ASCII, so the byte tokenizer gives one token per character: offsets are character
    offsets and windows can be checked against the file itself."""
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters + " \n") for _ in range(n))


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("windows-corpus")
    # 40 documents of 10 … 400 characters: some shorter than a level-1 (23) or level-2 (43)
    # window.
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(random_text(10 + 10 * i, seed=i))
    return root


def make_dm(docs_dir, tiny_model_dir, cache, **kw) -> GistDataModule:
    settings = dict(window=SMALL, batch_size=4, val_fraction=0.25, max_val_windows=12, seed=0,
                    cache_dir=cache)
    dm = GistDataModule(str(docs_dir), model=str(tiny_model_dir), **(settings | kw))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def flat(loader) -> list[tuple[int, int, int]]:
    return [(int(d), int(o), b["level"]) for b in loader
            for d, o in zip(b["doc"], b["offset"], strict=True)]


# -- WindowSpec --------------------------------------------------------------------------------

def test_window_spec_layout():
    spec = WindowSpec(l2_share=0.25)
    assert spec.levels == (1, 2)
    assert (spec.context_tokens(1), spec.window_tokens(1)) == (960, 1088)
    assert (spec.node_tokens(2), spec.context_tokens(2), spec.window_tokens(2)) == (
        1024, 1024, 1152)
    assert WindowSpec(l2_share=1.0, l2_spans=3).levels == (2,)
    assert WindowSpec(l2_share=1.0, l2_spans=3).context_tokens(2) == 3072
    assert (SMALL.window_tokens(1), SMALL.window_tokens(2)) == (23, 43)


def test_window_spec_names_every_bad_value():
    with pytest.raises(ValueError) as err:
        WindowSpec(span=0, context_spans=-1, tail_tokens=-2, horizon=0, l2_share=1.5,
                   l2_spans=0)
    for name in ("span=0", "context_spans=-1", "tail_tokens=-2", "horizon=0", "l2_share=1.5",
                 "l2_spans=0"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match=r"l2_share=-0\.1"):
        WindowSpec(l2_share=-0.1)
    with pytest.raises(ValueError, match=r"context_spans=2\.5 must be an integer"):
        WindowSpec(context_spans=2.5)
    WindowSpec(tail_tokens=0)  # no raw tail is a legal experiment


def test_wide_layout_is_a_level_1_shape_of_its_own():
    spec = WindowSpec(context_spans=14, tail_tokens=16, horizon=64, wide_spans=128,
                      wide_share=0.25, l2_share=0.25)
    assert spec.shapes == ((1, False), (2, False), (1, True))
    assert spec.layout(1, wide=True).num_gists == 128 and spec.num_spans(1) == 14
    assert spec.context_tokens(1, True) == 128 * 32 and spec.window_tokens(1, True) == 4096 + 80
    assert spec.max_window_tokens == 4176
    assert WindowSpec(wide_spans=128).shapes == ((1, False),)  # wide_share 0: never drawn
    assert WindowSpec(l2_share=1.0, wide_spans=8, wide_share=0.5).shapes == ((2, False),)
    with pytest.raises(ValueError, match="no wide level-2 layout"):
        spec.num_spans(2, wide=True)
    with pytest.raises(ValueError, match=r"wide_share=0\.5 needs wide_spans >= 1"):
        WindowSpec(wide_share=0.5)
    with pytest.raises(ValueError) as err:
        WindowSpec(wide_spans=-1, wide_share=1.5)
    assert "wide_spans=-1" in str(err.value) and "wide_share=1.5" in str(err.value)


def test_wide_batches_come_at_their_share_and_leave_other_streams_alone():
    spec = WindowSpec(span=2, context_spans=3, tail_tokens=1, horizon=2, l2_share=0.3,
                      l2_spans=2)  # L1 = 9, L2 = 11
    wide = WindowSpec(span=2, context_spans=3, tail_tokens=1, horizon=2, l2_share=0.3,
                      l2_spans=2, wide_spans=20, wide_share=0.5)  # wide L1 = 43
    lengths = np.array([12, 60, 300, 40])  # doc 0 fits L1 only, doc 3 no wide window
    kw = dict(batch_size=2, num_batches=2000, seed=3)
    keys = list(WindowSampler(lengths, range(4), wide, **kw))
    batches = [keys[i:i + 2] for i in range(0, len(keys), 2)]
    assert all(len({(k.level, k.wide) for k in b}) == 1 for b in batches)  # one shape a batch
    levels = np.array([b[0].level for b in batches])
    is_wide = np.array([b[0].wide for b in batches])
    assert not is_wide[levels == 2].any()  # wide windows are level 1
    assert abs(is_wide[levels == 1].mean() - 0.5) < 0.04 and abs((levels == 2).mean() - 0.3) < 0.04
    for k in keys:
        assert k.offset + wide.window_tokens(k.level, k.wide) <= lengths[k.doc]
        if k.wide:
            assert k.doc in (1, 2)
    # The level of every batch is what a spec without wide windows draws (the wide draw
    # comes after it), and that spec's keys are the ones it always gave: level 1, never wide.
    plain = list(WindowSampler(lengths, range(4), spec, **kw))
    assert [k.level for k in plain[::2]] == levels.tolist()
    assert not any(k.wide for k in plain)


def test_wide_windows_are_trained_on_and_never_validated(docs_dir, tiny_model_dir, tmp_path):
    spec = WindowSpec(span=4, context_spans=3, tail_tokens=5, horizon=6, wide_spans=8,
                      wide_share=0.5)  # wide: 32 + 11 = 43 tokens
    dm = make_dm(docs_dir, tiny_model_dir, tmp_path, window=spec)
    seen = set()
    for batch in dm.train_dataloader():
        seen.add(batch["num_spans"])
        assert batch["ids"].shape[1] == 4 * batch["num_spans"] + 11
        assert batch["context_tokens"] == 4 * batch["num_spans"]
    assert seen == {3, 8}
    assert dm.stats["wide_window_tokens"] == 43
    assert {x["num_spans"] for x in dm.val_dataloader()} == {3}
    too_wide = WindowSpec(span=4, context_spans=3, tail_tokens=5, horizon=6, wide_spans=200,
                          wide_share=0.5)
    with pytest.raises(ValueError, match="fits a wide level-1 window of 811 tokens"):
        make_dm(docs_dir, tiny_model_dir, tmp_path, window=too_wide)


# -- windows -----------------------------------------------------------------------------------

def test_training_windows_lie_inside_one_document(docs_dir, tiny_model_dir, tmp_path):
    dm = make_dm(docs_dir, tiny_model_dir, tmp_path)
    corpus, train = dm.corpus, set(dm.train_docs.tolist())
    levels = set()
    for batch in dm.train_dataloader():
        level = batch["level"]
        length = SMALL.window_tokens(level)
        levels.add(level)
        assert batch["ids"].dtype == torch.int64 and batch["ids"].shape == (4, length)
        assert batch["context_tokens"] == SMALL.context_tokens(level)
        assert batch["num_spans"] == (3 if level == 1 else 2)
        for row, d, o in zip(batch["ids"], batch["doc"].tolist(), batch["offset"].tolist(),
                             strict=True):
            assert d in train
            text = (docs_dir / corpus.names[d]).read_text()
            assert 0 <= o and o + length <= len(text)
            assert dm.tokenizer.decode(row.tolist()) == text[o:o + length]
    assert levels == {1, 2}


def test_test_documents_never_appear_in_training_or_validation(docs_dir, tiny_model_dir,
                                                               tmp_path):
    dm = make_dm(docs_dir, tiny_model_dir, tmp_path, test_fraction=0.25, max_val_windows=40)
    test = set(dm.test_docs.tolist())
    assert len(test) >= 4  # about a quarter of 40 documents
    assert test.isdisjoint(dm.train_docs.tolist()) and test.isdisjoint(dm.val_docs.tolist())
    seen = {d for d, _, _ in flat(dm.train_dataloader())}
    for _ in range(3):  # several epochs of random windows
        seen |= {d for d, _, _ in flat(dm.train_dataloader())}
    validation = {d for d, _, _ in flat(dm.val_dataloader())}
    assert seen and validation
    assert not seen & test and not validation & test
    names = {dm.corpus.names[d] for d in test}
    assert names == {dm.corpus.names[i] for i in dm.corpus.split(0.25, 0, 0.25).test}
    assert dm.stats["test_documents"] == len(test)


def test_level2_windows_have_aligned_1024_token_context(tmp_path, tok):
    (tmp_path / "docs").mkdir()
    for i in range(3):
        (tmp_path / "docs" / f"long{i}.txt").write_text(random_text(2600 + 300 * i, seed=i))
    corpus = load_corpus(tmp_path / "docs", tok, cache_dir=tmp_path, progress=False)
    spec = WindowSpec(l2_share=1.0, l2_spans=2, tail_tokens=16, horizon=8)
    sampler = WindowSampler(corpus.doc_lengths, range(3), spec, batch_size=2, num_batches=5)
    dataset = WindowDataset(corpus, spec)
    for key in sampler:
        item = dataset[key]
        assert item["level"] == 2 and item["num_spans"] == 2
        assert item["context_tokens"] == 2048 and item["context_tokens"] % spec.node_tokens(2) == 0
        assert item["ids"].shape == (2048 + 16 + 8,)
        assert item["ids"].tolist() == corpus.doc(key.doc)[key.offset:key.offset + 2072].tolist()


def test_validation_windows_are_deterministic_and_evenly_spread(docs_dir, tiny_model_dir,
                                                                tmp_path):
    a = make_dm(docs_dir, tiny_model_dir, tmp_path)
    b = make_dm(docs_dir, tiny_model_dir, tmp_path)
    assert a.val_windows == b.val_windows and len(a.val_windows) == 12
    assert [w.level for w in a.val_windows] == [1] * 6 + [2] * 6  # l2_share 0.5
    val = set(a.val_docs.tolist())
    assert {w.doc for w in a.val_windows} <= val
    for w in a.val_windows:
        assert w.offset % SMALL.window_tokens(w.level) == 0  # non-overlapping grid
    # Spread over the documents, not piled into the first one.
    assert len({w.doc for w in a.val_windows if w.level == 1}) >= 3
    batches_a, batches_b = list(a.val_dataloader()), list(b.val_dataloader())
    assert [x["level"] for x in batches_a] == [1, 1, 2, 2]  # 6 per level in batches of 4
    for x, y in zip(batches_a, batches_b, strict=True):
        torch.testing.assert_close(x["ids"], y["ids"])


def test_evenly_spaced_windows_against_a_hand_count():
    spec = WindowSpec(span=4, context_spans=1, tail_tokens=2, horizon=2)  # L = 8
    lengths = np.array([7, 16, 40, 8])  # 0, 2, 5, 1 non-overlapping windows
    windows = evenly_spaced_windows(lengths, [0, 1, 2, 3], spec, max_windows=4)
    # 8 candidates, ranks 1, 3, 5, 7: (1, 8), (2, 8), (2, 24), (3, 0)
    assert windows == [WindowKey(1, 8, 1), WindowKey(2, 8, 1), WindowKey(2, 24, 1),
                       WindowKey(3, 0, 1)]
    assert len(evenly_spaced_windows(lengths, [0, 1, 2, 3], spec, max_windows=100)) == 8


def test_training_sampling_is_reproducible(docs_dir, tiny_model_dir, tmp_path):
    a = flat(make_dm(docs_dir, tiny_model_dir, tmp_path).train_dataloader())
    b = flat(make_dm(docs_dir, tiny_model_dir, tmp_path).train_dataloader())
    assert a == b and len(a) > 20
    assert a != flat(make_dm(docs_dir, tiny_model_dir, tmp_path, seed=1).train_dataloader())
    loader = make_dm(docs_dir, tiny_model_dir, tmp_path).train_dataloader()
    assert flat(loader) == a and flat(loader) != a  # the next epoch continues the stream
    # a resumed run (next_batch = batches already trained on) sees what comes next
    resumed = make_dm(docs_dir, tiny_model_dir, tmp_path).train_dataloader()
    resumed.batch_sampler.sampler.next_batch = 2
    batch_size = len(a) // len(list(loader))
    assert flat(resumed)[: len(a) - 2 * batch_size] == a[2 * batch_size:]
    workers = make_dm(docs_dir, tiny_model_dir, tmp_path, num_workers=2).train_dataloader()
    assert flat(workers) == a  # sampling happens in the main process


def test_long_documents_are_chosen_more_often():
    spec = WindowSpec(span=4, context_spans=1, tail_tokens=2, horizon=2)  # L = 8
    lengths = np.array([8, 27, 107, 5])  # 1, 20, 100 and 0 valid offsets
    sampler = WindowSampler(lengths, [0, 1, 2, 3], spec, batch_size=8, num_batches=1000, seed=5)
    keys = list(sampler)
    counts = np.bincount([k.doc for k in keys], minlength=4) / len(keys)
    np.testing.assert_allclose(counts, np.array([1, 20, 100, 0]) / 121, atol=0.015)
    assert all(0 <= k.offset <= lengths[k.doc] - 8 for k in keys)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 200), min_size=1, max_size=12),
       share=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 1000))
def test_sampled_windows_always_fit(lengths, share, seed):
    spec = WindowSpec(span=2, context_spans=3, tail_tokens=1, horizon=2, l2_share=share,
                      l2_spans=2)  # L1 = 9, L2 = 11
    lengths = np.array(lengths)
    docs = list(range(len(lengths)))
    if any(lengths.max() < spec.window_tokens(level) for level in spec.levels):
        with pytest.raises(ValueError, match="no document fits"):
            WindowSampler(lengths, docs, spec, batch_size=3, num_batches=4, seed=seed)
        return
    keys = list(WindowSampler(lengths, docs, spec, batch_size=3, num_batches=4, seed=seed))
    for b in range(4):
        assert len({k.level for k in keys[3 * b:3 * b + 3]}) == 1  # one level per batch
    for k in keys:
        assert 0 <= k.offset and k.offset + spec.window_tokens(k.level) <= lengths[k.doc]


def test_batches_never_mix_levels():
    assert list(LevelBatchSampler([1, 1, 1, 2, 2, 1], 2)) == [[0, 1], [2], [3, 4], [5]]
    item = {"ids": torch.zeros(3, dtype=torch.int64), "level": 1, "num_spans": 1,
            "context_tokens": 1, "tail": 1, "horizon": 1, "doc": 0, "offset": 0}
    with pytest.raises(ValueError, match="mixes window layouts"):
        collate_windows([item, item | {"level": 2, "ids": torch.zeros(3, dtype=torch.int64)}])


# -- the data module ---------------------------------------------------------------------------

def test_short_documents_are_skipped_and_counted(docs_dir, tiny_model_dir, tmp_path):
    dm = make_dm(docs_dir, tiny_model_dir, tmp_path)
    lengths = dm.corpus.doc_lengths
    short = {split: int((lengths[docs] < 23).sum())
             for split, docs in (("train", dm.train_docs), ("val", dm.val_docs))}
    assert dm.stats["skipped_short"] == short and sum(short.values()) == 2  # 10 and 20 chars
    assert dm.stats["documents"] == 40


def test_no_document_long_enough_names_the_lengths(tmp_path, tiny_model_dir):
    (tmp_path / "short").mkdir()
    for i, n in enumerate((100, 300, 250)):
        (tmp_path / "short" / f"s{i}.txt").write_text(random_text(n, seed=i))
    dm = GistDataModule(str(tmp_path / "short"), model=str(tiny_model_dir),
                        cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"1088 tokens.*longest, 's1\.txt', has 300 tokens"):
        dm.setup("fit")


def test_data_module_settings_are_checked(tiny_model_dir):
    with pytest.raises(ValueError, match=r"batch_size=0.*val_fraction=1\.5"):
        GistDataModule("pystdlib", model=str(tiny_model_dir), batch_size=0, val_fraction=1.5)


class _Recorder(L.LightningModule):
    """Records what the Trainer feeds it; learns nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, int, list[int]]] = []

    def training_step(self, batch, batch_idx):
        assert batch["ids"].shape[1] == SMALL.window_tokens(batch["level"])
        self.seen.append((self.current_epoch, batch["level"], batch["offset"].tolist()))
        return self.weight * 0 + batch["ids"].float().mean() * 0

    def validation_step(self, batch, batch_idx):
        self.seen.append((-1, batch["level"], batch["offset"].tolist()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_runs_epochs_with_fresh_windows(docs_dir, tiny_model_dir, tmp_path):
    dm = GistDataModule(str(docs_dir), model=str(tiny_model_dir), window=SMALL, batch_size=4,
                        val_fraction=0.25, max_val_windows=8, batches_per_epoch=3,
                        cache_dir=tmp_path)
    module = _Recorder()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    train = [s for s in module.seen if s[0] >= 0]
    assert [s[0] for s in train] == [0, 0, 0, 1, 1, 1]
    assert [s[1:] for s in train if s[0] == 0] != [s[1:] for s in train if s[0] == 1]
    assert sum(1 for s in module.seen if s[0] == -1) == 2 * 2  # 2 val batches per epoch
    # Epoch 0 is exactly what a fresh sampler gives for epoch 0.
    replay = make_dm(docs_dir, tiny_model_dir, tmp_path, batches_per_epoch=3,
                     max_val_windows=8).train_dataloader()
    assert [(b["level"], b["offset"].tolist()) for b in replay] == [
        s[1:] for s in train if s[0] == 0]


def test_manual_loader_with_a_plain_dataloader(tmp_path, tok):
    """The pieces compose without the data module (as evaluation will use them)."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text(random_text(200, seed=1))
    corpus = load_corpus(tmp_path / "d", tok, cache_dir=tmp_path, progress=False)
    spec = WindowSpec(span=4, context_spans=2, tail_tokens=3, horizon=4)
    sampler = WindowSampler(corpus.doc_lengths, [0], spec, batch_size=2, num_batches=3)
    loader = DataLoader(WindowDataset(corpus, spec), collate_fn=collate_windows,
                        batch_sampler=BatchSampler(sampler, 2, drop_last=True))
    batches = list(loader)
    assert len(batches) == 3 and all(b["ids"].shape == (2, 15) for b in batches)
