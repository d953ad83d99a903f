"""An ingest keeps a tree's token index current (megacontext.ingest.extend_token_index): an
indexed tree's index covers every committed span after an ingest, serial or distributed, with
the scan's scores; a tree without one gets none; an ingest killed after its commit, before or
during the extension, leaves the index behind (sound, served with the scan's scores) and the
next ingest catches up; an index that cannot be extended is reported and the ingest stands;
``--no-index`` leaves it behind. On the tiny random model (byte tokenizer) and the mean-pool
compressor: the index reads only token ids."""

from __future__ import annotations

import os

import numpy as np
import pytest

from megacontext.allocator import FocusAllocator, Query
from megacontext.allocator.lexical import LexicalScorer
from megacontext.base.loading import load_token_embeddings
from megacontext.cli import main as cli
from megacontext.gistnet import MeanPoolGist, gistnet_digest
from megacontext.ingest import expand_inputs, ingest
from megacontext.tree import MegaContextTree, verify
from megacontext.tree import lexicon as lx
from megacontext.tree.lexicon import build_lexicon, lexicon_dir, lexicon_problems
from tests.conftest import random_text
from tests.test_lexicon import assert_index_equals, scores

S = 32


class Killed(BaseException):
    """The process killed at this point (nothing catches it, as nothing survives a kill)."""


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_token_embeddings(tiny_model_dir)


@pytest.fixture
def docs(tmp_path):
    """Three documents of random text (about 6k, 4k, 3k tokens), paths by name."""
    out = {}
    for i, n in enumerate((6000, 4000, 3000)):
        out[f"d{i}"] = tmp_path / f"d{i}.txt"
        out[f"d{i}"].write_text(random_text(n, seed=10 + i))
    return out


def new_tree(path, model) -> MegaContextTree:
    config, tokenizer, _ = model
    return MegaContextTree.create(path, hidden_size=config.hidden_size,
                                  vocab_size=config.vocab_size, rope=config.rope,
                                  fingerprint=config.fingerprint(tokenizer.sha256), levels=2,
                                  gistnet_digest=gistnet_digest(MeanPoolGist()))


def run(tree: MegaContextTree, model, *paths, **kwargs):
    _, tokenizer, embedding = model
    return ingest(tree, expand_inputs([str(p) for p in paths]), tokenizer, embedding,
                  MeanPoolGist(), separator=tokenizer.eos_id, commit_every=2000, **kwargs)


def assert_scores_equal_the_scan(tree: MegaContextTree) -> None:
    """The lexical scorer through the index and by the scan: the same scores at levels 1 and
    2, cursors mid-span and at the end, and the allocator the same contexts."""
    tokens = tree.tokens().numpy()
    query = np.concatenate([tokens[-700:-690], tokens[100:104]])  # late and early words
    a, b = LexicalScorer(0.5), LexicalScorer(0.5, use_index=False)
    for cursor in (tree.num_tokens, tree.num_tokens - 1000 - 17, 4321):
        for level in (1, 2):
            idx = np.arange(cursor // S**level, dtype=np.int64)
            np.testing.assert_array_equal(scores(a, tree, cursor, query, level, idx),
                                          scores(b, tree, cursor, query, level, idx))
    wa = FocusAllocator(512, scorer="lexical").assemble(tree, query=Query(ids=query))
    wb = FocusAllocator(512, scorer="lexical", scorer_options={"use_index": False}).assemble(
        tree, query=Query(ids=query))
    assert wa.entries() == wb.entries()


def test_an_ingest_extends_the_index_over_every_committed_span(tmp_path, model, docs):
    with new_tree(tmp_path / "t", model) as tree:
        first = run(tree, model, docs["d0"])
        assert first.index is None  # no index yet: none built
        build_lexicon(tree, progress=False)
        covered = tree.num_tokens // S
        stats = run(tree, model, docs["d1"], docs["d2"])
        assert stats.index["spans"] == tree.num_tokens // S
        assert stats.index["added"] == tree.num_tokens // S - covered > 0
        lex = tree.lexicon()
        assert len(lex.segments) == 2 and lex.spans == tree.num_tokens // S
        assert_index_equals(lex, tree.tokens().numpy(), tree.vocab_size)
        assert lexicon_problems(tree) == []
        assert_scores_equal_the_scan(tree)
        scorer = LexicalScorer()
        scores(scorer, tree, tree.num_tokens, [1, 2, 3], 1, np.arange(5, dtype=np.int64))
        assert scorer._tail.shape[0] == 0  # nothing past the index to scan
        again = run(tree, model, docs["d0"])  # held: nothing appended, the index up to date
        assert again.held and again.index["added"] == 0
    assert verify(tmp_path / "t") == []


def test_a_tree_without_an_index_gets_none(tmp_path, model, docs):
    with new_tree(tmp_path / "t", model) as tree:
        for name in ("d0", "d1"):
            assert run(tree, model, docs[name]).index is None
        assert tree.lexicon() is None
    assert not lexicon_dir(tmp_path / "t").exists()


@pytest.mark.parametrize("where", ["before", "during"])
def test_a_kill_after_the_commit_leaves_the_index_behind_and_the_next_ingest_catches_up(
        tmp_path, model, docs, monkeypatch, capsys, where):
    """Killed after the final commit: before the extension started, or in it (its segment
    written, the index's header not replaced)."""
    with new_tree(tmp_path / "t", model) as tree:
        run(tree, model, docs["d0"])
        build_lexicon(tree, progress=False)
        covered = tree.num_tokens // S

        def kill(*args, **kwargs):
            raise Killed

        monkeypatch.setattr(*(("megacontext.ingest.build_lexicon", kill) if where == "before"
                              else (lx, "_write_header", kill)))
        with pytest.raises(Killed):
            run(tree, model, docs["d1"])
        monkeypatch.undo()
    with MegaContextTree.open(tmp_path / "t") as tree:  # as the next process finds it
        assert verify(tmp_path / "t") == [] and lexicon_problems(tree) == []
        assert (tree.header["extra"]["ingest"]["done"], len(tree.inputs())) == (True, 2)
        n = tree.num_tokens
        assert tree.lexicon().spans == covered < n // S  # behind: the covered prefix
        assert_scores_equal_the_scan(tree)
        scorer = LexicalScorer()
        scores(scorer, tree, n, [1, 2, 3], 1, np.arange(5, dtype=np.int64))
        assert scorer._tail.shape[0] == n // S - covered  # only the spans past it scanned
    debris = sorted(p.name for p in lexicon_dir(tmp_path / "t").iterdir())
    assert ("g000002.postings" in debris) == (where == "during")
    capsys.readouterr()
    assert cli(["inspect", str(tmp_path / "t")]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps its lines
    assert (f"{n // S - covered:,} newer spans not indexed (scanned; the next ingest or "
            f"`megacontext index` adds them)") in out
    with MegaContextTree.open(tmp_path / "t", mode="a") as tree:
        stats = run(tree, model, docs["d1"])  # the same command again: held, and catches up
        assert stats.held and not stats.tokens and tree.num_tokens == n
        assert stats.index["added"] == n // S - covered
        assert tree.lexicon().spans == n // S
        assert_index_equals(tree.lexicon(), tree.tokens().numpy(), tree.vocab_size)
        assert_scores_equal_the_scan(tree)
    names = sorted(p.name for p in lexicon_dir(tmp_path / "t").iterdir())
    assert names == ["build.lock", "g000001.offsets", "g000001.postings",
                     *(["g000003.offsets", "g000003.postings"] if where == "during" else
                       ["g000002.offsets", "g000002.postings"]), "header.json"]


def ingest_cli(tree_dir, model_dir, *args) -> int:
    return cli(["ingest", str(tree_dir), *map(str, args), "--model", str(model_dir),
                "--gistnet", "mean", "--quiet"])


def test_the_command_extends_the_index_and_no_index_leaves_it_behind(tmp_path, tiny_model_dir,
                                                                     docs, capsys):
    t = tmp_path / "t"
    assert ingest_cli(t, tiny_model_dir, docs["d0"]) == 0
    assert "token index" not in capsys.readouterr().out  # no index: nothing said, none built
    assert not lexicon_dir(t).exists()
    assert cli(["index", str(t), "--quiet"]) == 0
    capsys.readouterr()
    assert ingest_cli(t, tiny_model_dir, docs["d1"], "--no-index") == 0
    assert "token index" not in capsys.readouterr().out
    with MegaContextTree.open(t) as tree:
        covered = tree.lexicon().spans
        assert covered < tree.num_tokens // S  # behind
        assert_scores_equal_the_scan(tree)
    assert ingest_cli(t, tiny_model_dir, docs["d2"]) == 0  # catches up on d1's spans too
    out = capsys.readouterr().out
    with MegaContextTree.open(t) as tree:
        spans = tree.num_tokens // S
        assert tree.lexicon().spans == spans
        assert_scores_equal_the_scan(tree)
    assert f"{t}: token index +{spans - covered:,} spans in " in out
    assert f"(now {spans:,})" in out
    assert cli(["verify", str(t)]) == 0


@pytest.mark.parametrize("problem", ["torn", "locked"])
def test_an_index_that_cannot_be_extended_is_reported_and_the_ingest_stands(
        tmp_path, tiny_model_dir, docs, capsys, problem):
    t = tmp_path / "t"
    assert ingest_cli(t, tiny_model_dir, docs["d0"]) == 0
    assert cli(["index", str(t), "--quiet"]) == 0
    fd = None
    if problem == "torn":
        (lexicon_dir(t) / "g000001.postings").write_bytes(b"")
    else:
        fd = lx._lock(lexicon_dir(t))  # another build in progress
    capsys.readouterr()
    try:
        assert ingest_cli(t, tiny_model_dir, docs["d1"]) == 0
    finally:
        if fd is not None:
            os.close(fd)
    out, err = capsys.readouterr()
    assert "+" in out and "tokens" in out  # the ingest's summary
    assert f"{t}: token index not extended: " in err
    assert ("rebuild it with `megacontext index" if problem == "torn"
            else "is being built by another process") in err
    assert "the ingested text is committed" in err
    assert verify(t) == []  # the tree itself is sound and holds both documents
    with MegaContextTree.open(t) as tree:
        assert len(tree.inputs()) == 2


def test_a_reader_opened_before_an_indexed_ingest_is_served_the_index(tmp_path, model, docs):
    """The index ahead of a reader's handle (a writer committed and extended it since the
    reader read its header) is the same tree's: served, up to the reader's spans."""
    with new_tree(tmp_path / "t", model) as tree:
        run(tree, model, docs["d0"])
        build_lexicon(tree, progress=False)
    with MegaContextTree.open(tmp_path / "t") as reader:
        n = reader.num_tokens
        with MegaContextTree.open(tmp_path / "t", mode="a") as writer:
            assert run(writer, model, docs["d1"]).index["added"] > 0
        assert reader.num_tokens == n and reader.lexicon().spans > n // S
        assert_scores_equal_the_scan(reader)
        assert build_lexicon(reader, progress=False).spans > n // S  # nothing to add here
        reader.refresh()
        assert reader.lexicon().spans == reader.num_tokens // S
        assert_scores_equal_the_scan(reader)


def test_a_distributed_ingest_extends_the_index(tmp_path, model, docs):
    import torch.distributed as dist

    from megacontext.ingest_dist import distributed_ingest

    _, tokenizer, embedding = model
    with new_tree(tmp_path / "t", model) as tree:
        run(tree, model, docs["d0"])
        build_lexicon(tree, progress=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0,
                            world_size=1)
    try:
        stats = distributed_ingest(tmp_path / "t", expand_inputs([str(docs["d1"])]), tokenizer,
                                   embedding, MeanPoolGist(), shard_level=1,
                                   separator=tokenizer.eos_id, commit_every=2000)
    finally:
        dist.destroy_process_group()
    with MegaContextTree.open(tmp_path / "t") as tree:
        assert stats.index["spans"] == tree.lexicon().spans == tree.num_tokens // S
        assert_index_equals(tree.lexicon(), tree.tokens().numpy(), tree.vocab_size)
        assert_scores_equal_the_scan(tree)
