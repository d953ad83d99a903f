"""Tests for megacontext.tree.lexicon (the token index beside a tree) and the lexical scorer's
use of it: the index against explicit loops over spans, its scores against the scan's and the
explicit-loop reference, its refusals, crash safety, and ``megacontext index``."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.allocator import FocusAllocator, Query
from megacontext.allocator.lexical import LexicalScorer
from megacontext.cli import main as cli
from megacontext.rope import RopeConfig
from megacontext.tree import MegaContextTree, verify
from megacontext.tree import lexicon as lx
from megacontext.tree.lexicon import Lexicon, build_lexicon, lexicon_dir, lexicon_problems
from tests.test_allocator import lexical_reference, needle_tree  # the explicit-loop reference

S, HIDDEN = 32, 8
ROPE = RopeConfig(8, 10000.0)


def make_tree(path: Path, tokens: np.ndarray, vocab: int = 500, name: str = "lex",
              levels: int = 2) -> MegaContextTree:
    """A tree of ``tokens`` (gists random: the index reads only tokens), open for append."""
    t = MegaContextTree.create(path, hidden_size=HIDDEN, vocab_size=vocab, rope=ROPE,
                               fingerprint={"name": name}, levels=levels)
    append(t, tokens)
    return t


def append(t: MegaContextTree, tokens: np.ndarray) -> None:
    g = torch.Generator().manual_seed(int(t.num_tokens))
    before = [t.count(k) for k in range(t.levels + 1)]
    t.append_tokens(torch.from_numpy(np.asarray(tokens, dtype=np.int64)))
    for k in range(1, t.levels + 1):
        t.append_gists(k, torch.randn(t.appended_count(k - 1) // S - before[k], HIDDEN,
                                      generator=g))
    t.commit()


def brute_postings(tokens: np.ndarray, vocab: int) -> list[list[int]]:
    """For each token id, the complete spans that hold it: explicit loops over spans."""
    out: list[list[int]] = [[] for _ in range(vocab)]
    for i in range(len(tokens) // S):
        for t in sorted(set(tokens[i * S:(i + 1) * S].tolist())):
            out[t].append(i)
    return out


def assert_index_equals(lex: Lexicon, tokens: np.ndarray, vocab: int) -> None:
    want = brute_postings(tokens, vocab)
    assert lex.spans == len(tokens) // S
    for t in range(vocab):
        assert lex.postings(t).tolist() == want[t], f"token {t}"


def tree_bytes(path: Path) -> dict[str, str]:
    """sha256 of every file of the tree itself (not its index)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------------------
# the index against explicit loops


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 3000), vocab=st.sampled_from([3, 40, 500]),
       chunk=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_index_equals_explicit_loops_over_spans(tmp_path_factory, n, vocab, chunk, seed):
    tokens = np.random.default_rng(seed).integers(0, vocab, n)
    with make_tree(tmp_path_factory.mktemp("h") / "t", tokens, vocab) as t:
        lex = build_lexicon(t, chunk_spans=chunk, progress=False)
        assert_index_equals(lex, tokens, vocab)
        assert [seg.dtype for seg in lex.segments] == (["<u4"] if n >= S else [])
        assert lexicon_problems(t) == []
        # document frequencies below any n and node ranges, against the same loops
        want = brute_postings(tokens, vocab)
        ids = np.arange(vocab)
        for cut in {0, lex.spans // 3, lex.spans}:
            assert lex.document_frequency(ids, cut).tolist() == [
                sum(p < cut for p in want[t]) for t in ids]
        lo = np.arange(0, lex.spans + 1, 5)
        hi = np.minimum(lo + 7, lex.spans)
        got = lex.holds(ids, lo, hi)
        assert got.tolist() == [[any(a <= p < b for p in want[t]) for t in ids]
                                for a, b in zip(lo, hi, strict=True)]


def test_round_trip_through_disk_and_the_documented_layout(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 300, 10_000)
    with make_tree(tmp_path / "t", tokens, 300) as t:
        build_lexicon(t, progress=False)
    with MegaContextTree.open(tmp_path / "t") as t:  # a fresh handle, read-only
        lex = t.lexicon()
        assert_index_equals(lex, tokens, 300)
        root = lexicon_dir(t.path)
        h = json.loads((root / "header.json").read_text())
        assert h["tree"] == {"fingerprint": {"name": "lex"}, "created": t.header["created"]}
        assert (h["span"], h["vocab_size"], h["spans"]) == (32, 300, 312)
        (seg,) = h["segments"]
        offsets = np.fromfile(root / f"{seg['name']}.offsets", dtype="<i8")
        postings = np.fromfile(root / f"{seg['name']}.postings", dtype="<u4")
        assert offsets.shape == (301,) and offsets[-1] == postings.size == seg["postings"]
        assert postings[offsets[7]:offsets[8]].tolist() == brute_postings(tokens, 300)[7]
        assert verify(t.path) == []


def test_extending_adds_the_new_spans_and_merges_past_the_limit(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 200, 3000)
    with make_tree(tmp_path / "t", tokens, 200) as t:
        build_lexicon(t, progress=False)
        for step in range(4):
            more = rng.integers(0, 200, 1000 + 37 * step)
            append(t, more)
            tokens = np.concatenate([tokens, more])
            monkeypatch.setattr(lx, "MAX_SEGMENTS", 3)
            lex = build_lexicon(t, progress=False)
            assert_index_equals(lex, tokens, 200)
            assert len(lex.segments) == [2, 3, 1, 2][step]  # the 4th segment merged all
            assert lexicon_problems(t) == []
        named = {f"{s.name}.{k}" for s in lex.segments for k in ("offsets", "postings")}
        on_disk = {p.name for p in lexicon_dir(t.path).glob("g*")}
        assert on_disk == named  # older generations deleted
        assert build_lexicon(t, progress=False).segments == lex.segments  # up to date
        rebuilt = build_lexicon(t, rebuild=True, progress=False)
        assert len(rebuilt.segments) == 1
        assert_index_equals(rebuilt, tokens, 200)


def test_a_merge_in_small_blocks_equals_one_in_a_large(tmp_path, monkeypatch):
    tokens = np.random.default_rng(2).integers(0, 50, 6000)
    with make_tree(tmp_path / "t", tokens[:2000], 50) as t:
        build_lexicon(t, progress=False)
        append(t, tokens[2000:])
        monkeypatch.setattr(lx, "MAX_SEGMENTS", 1)
        monkeypatch.setattr(lx, "MERGE_BLOCK", 7)  # many token blocks, some of one token
        lex = build_lexicon(t, progress=False)
        assert len(lex.segments) == 1
        assert_index_equals(lex, tokens, 50)


# ---------------------------------------------------------------------------------------
# the scorer: the index gives the scan's scores


class Ctx:
    def __init__(self, tree, cursor, query):
        self.tree, self.cursor, self.span, self.query_ids = tree, cursor, S, np.asarray(query)


def scores(scorer, tree, cursor, query, level, idx):
    return scorer.score(Ctx(tree, cursor, query), level, idx)


def test_index_scores_equal_the_scan_and_the_explicit_loops(tmp_path):
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 500, 40_000)
    query = [3, 3, 17, 250, 499, 0, 123]
    with make_tree(tmp_path / "t", tokens[:30_000], levels=3) as t:
        build_lexicon(t, chunk_spans=64, progress=False)
        append(t, tokens[30_000:])  # grown after indexing: spans past the index are scanned
        indexed, scan = LexicalScorer(0.5), LexicalScorer(0.5, use_index=False)
        # cursors mid-span, below the index's cover, at it, past it (growing, then back)
        for cursor in (5017, 29_999, 30_000, 33_333, 40_000, 12_345):
            for level in (1, 2, 3):
                count = cursor // S**level
                idx = np.arange(0, count, max(1, count // 40), dtype=np.int64)
                got = scores(indexed, t, cursor, query, level, idx)
                np.testing.assert_array_equal(got, scores(scan, t, cursor, query, level, idx))
                if level < 3 and cursor in (5017, 33_333):
                    want = [lexical_reference(tokens, cursor, level, int(i), query, 0.5)
                            for i in idx]
                    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        assert indexed._lex is not None and indexed._spans.shape[0] == 0  # never scanned all
        assert indexed._tail.shape[0] == 40_000 // S - 30_000 // S  # only the new spans


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1100, 5000), indexed_at=st.floats(0.3, 1.0), seed=st.integers(0, 2**16),
       vocab=st.sampled_from([20, 300]))
def test_index_scores_equal_the_scan_on_random_trees(tmp_path_factory, n, indexed_at, seed,
                                                     vocab):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, n)
    first = int(n * indexed_at)
    with make_tree(tmp_path_factory.mktemp("r") / "t", tokens[:first], vocab) as t:
        build_lexicon(t, chunk_spans=int(rng.integers(1, 50)), progress=False)
        append(t, tokens[first:])
        query = rng.integers(0, vocab, int(rng.integers(1, 12)))
        cursor = int(rng.integers(1025, n + 1))
        a, b = LexicalScorer(1.0), LexicalScorer(1.0, use_index=False)
        for level in (1, 2):
            idx = np.sort(rng.choice(cursor // S**level, min(cursor // S**level, 30),
                                     replace=False)).astype(np.int64)
            np.testing.assert_array_equal(scores(a, t, cursor, query, level, idx),
                                          scores(b, t, cursor, query, level, idx))


def test_the_allocator_chooses_the_same_contexts_with_and_without_the_index(tmp_path):
    tree, needle = needle_tree(tmp_path)
    with tree:
        build_lexicon(tree, progress=False)
        query = Query(ids=np.array([7, 400, 9, 401, 402, 10, 403]))
        for budget in (256, 1024):
            a = FocusAllocator(budget, scorer="lexical")
            b = FocusAllocator(budget, scorer="lexical", scorer_options={"use_index": False})
            wa, wb = a.assemble(tree, query=query), b.assemble(tree, query=query)
            assert wa.entries() == wb.entries()
            raw = {int(s) for k, s in zip(wa.levels, wa.starts, strict=True) if k == 0}
            assert set(needle) <= raw
            for cursor in (tree.num_tokens - 500, tree.num_tokens - 470):  # steady refocuses
                wa = a.assemble(tree, cursor, query=query, previous=wa)
                wb = b.assemble(tree, cursor, query=query, previous=wb)
                assert wa.entries() == wb.entries()


# ---------------------------------------------------------------------------------------
# refusals, torn and interrupted builds


@pytest.fixture
def indexed(tmp_path):
    tokens = np.random.default_rng(4).integers(0, 500, 5000)
    t = make_tree(tmp_path / "t", tokens)
    build_lexicon(t, progress=False)
    t.close()
    return tmp_path / "t"


def test_an_index_of_another_tree_is_refused_naming_both(indexed, tmp_path):
    other = make_tree(tmp_path / "other", np.zeros(6000, dtype=np.int64), name="another-model")
    shutil.copytree(lexicon_dir(indexed), lexicon_dir(other.path))
    with pytest.raises(ValueError, match=r"was built for another tree: fingerprint "
                                         r"\{'name': 'lex'\}, this tree has \{'name': "
                                         r"'another-model'\}.*megacontext index .* --rebuild"):
        other.lexicon()
    with pytest.raises(ValueError, match=r"was built for another tree"):
        FocusAllocator(300, scorer="lexical").assemble(other, query=Query(ids=np.array([1])))
    other.close()
    same_model = make_tree(tmp_path / "same", np.zeros(6000, dtype=np.int64))
    shutil.copytree(lexicon_dir(indexed), lexicon_dir(same_model.path))
    with pytest.raises(ValueError, match=r"another tree: created '.*', this tree has '.*'"):
        same_model.lexicon()
    same_model.close()


def test_a_stale_index_covering_more_than_the_tree_is_refused(tmp_path):
    """A copy of the tree made before it grew, given the grown tree's index: refused (its
    committed header counts fewer spans). A handle of the tree itself opened before the
    growth is served it instead (tests/test_ingest_lexicon.py)."""
    tokens = np.random.default_rng(4).integers(0, 500, 5000)
    with make_tree(tmp_path / "t", tokens[:1000]) as t:
        shutil.copytree(t.path, tmp_path / "copy", ignore=shutil.ignore_patterns("*.lock"))
        append(t, tokens[1000:])
        build_lexicon(t, progress=False)
    shutil.copytree(lexicon_dir(tmp_path / "t"), lexicon_dir(tmp_path / "copy"))
    with MegaContextTree.open(tmp_path / "copy") as copy:
        with pytest.raises(ValueError, match=r"covers 156 spans, the tree at .* holds 31: it "
                                             r"is stale"):
            Lexicon.open(copy)


@pytest.mark.parametrize("damage, message", [
    ("truncate_postings", r"g000001.postings is .* bytes, the header says .* \(torn"),
    ("delete_offsets", r"g000001.offsets is missing"),
    ("garble_header", r"token index .*header.json is corrupted"),
    ("bad_segments", r"token index .*header.json is invalid: segment"),
])
def test_a_torn_index_is_refused_and_the_tree_untouched(indexed, damage, message):
    root = lexicon_dir(indexed)
    before = tree_bytes(indexed)
    if damage == "truncate_postings":
        p = root / "g000001.postings"
        p.write_bytes(p.read_bytes()[:-4])
    elif damage == "delete_offsets":
        (root / "g000001.offsets").unlink()
    elif damage == "garble_header":
        (root / "header.json").write_bytes(b'{"format": "megacontext-lex')
    else:
        h = json.loads((root / "header.json").read_text())
        h["segments"][0]["start"] = 3
        (root / "header.json").write_text(json.dumps(h))
    with MegaContextTree.open(indexed) as t:
        with pytest.raises(ValueError, match=message):
            t.lexicon()
        with pytest.raises(ValueError, match=message):
            FocusAllocator(300, scorer="lexical").assemble(t, query=Query(ids=np.array([1])))
        with pytest.raises(ValueError, match=message):
            build_lexicon(t, progress=False)  # extending a torn index: refused too
        assert lexicon_problems(t) and verify(indexed) == []  # the tree itself is sound
        build_lexicon(t, rebuild=True, progress=False)  # ... and a rebuild replaces it
        assert lexicon_problems(t) == []
    assert tree_bytes(indexed) == before


def test_a_flipped_bit_is_found_by_the_full_check(indexed):
    p = lexicon_dir(indexed) / "g000001.postings"
    raw = bytearray(p.read_bytes())
    raw[100] ^= 1
    p.write_bytes(bytes(raw))
    with MegaContextTree.open(indexed) as t:
        assert t.lexicon() is not None  # opening checks sizes, not every byte
        assert any("does not match its CRC-32" in x for x in lexicon_problems(t))


class Interrupt(Exception):
    pass


def test_an_interrupted_first_build_leaves_no_index_and_the_scan_serves(tmp_path, monkeypatch):
    tokens = np.random.default_rng(5).integers(0, 500, 5000)
    with make_tree(tmp_path / "t", tokens) as t:
        before = tree_bytes(t.path)

        def crash(root, h):
            raise Interrupt

        monkeypatch.setattr(lx, "_write_header", crash)  # all files written, header not
        with pytest.raises(Interrupt):
            build_lexicon(t, progress=False)
        assert sorted(p.name for p in lexicon_dir(t.path).iterdir()) == [
            "build.lock", "g000001.offsets", "g000001.postings"]
        assert t.lexicon() is None  # no header: no index; the scorer scans
        query = Query(ids=np.array([1, 2, 3]))
        scan = FocusAllocator(200, scorer="lexical", scorer_options={"use_index": False})
        wc = FocusAllocator(200, scorer="lexical").assemble(t, query=query)
        assert wc.entries() == scan.assemble(t, query=query).entries()
        assert tree_bytes(t.path) == before and verify(t.path) == []
        monkeypatch.undo()
        lex = build_lexicon(t, progress=False)  # the next build overwrites the debris
        assert_index_equals(lex, tokens, 500)
        assert lex.segments[0].name == "g000002"
        assert sorted(p.name for p in lexicon_dir(t.path).iterdir()) == [
            "build.lock", "g000002.offsets", "g000002.postings", "header.json"]


def test_an_interrupted_extension_keeps_the_previous_index(indexed, monkeypatch):
    with MegaContextTree.open(indexed, mode="a") as t:
        old = t.lexicon()
        append(t, np.random.default_rng(6).integers(0, 500, 2000))

        def crash(*args, **kwargs):
            raise Interrupt

        monkeypatch.setattr(lx, "_crc_file", crash)  # mid-way through writing the segment
        with pytest.raises(Interrupt):
            build_lexicon(t, progress=False)
        lex = t.lexicon()
        assert lex.segments == old.segments and lex.spans == 5000 // S
        monkeypatch.undo()
        assert lexicon_problems(t) == []
        a, b = LexicalScorer(), LexicalScorer(use_index=False)
        idx = np.arange(0, 7000 // S, 3, dtype=np.int64)
        np.testing.assert_array_equal(scores(a, t, 7000, [5, 6, 7], 1, idx),
                                      scores(b, t, 7000, [5, 6, 7], 1, idx))


def test_a_second_builder_is_refused_while_one_builds(indexed):
    fd = lx._lock(lexicon_dir(indexed))
    try:
        with MegaContextTree.open(indexed) as t:
            with pytest.raises(RuntimeError, match=r"is being built by another process"):
                build_lexicon(t, progress=False)
    finally:
        import os

        os.close(fd)


def test_int64_postings_past_2_to_the_32_spans():
    assert lx.postings_dtype((1 << 32) - 1) == np.dtype("<u4")
    assert lx.postings_dtype(1 << 32) == np.dtype("<i8")  # the end, a search bound, must fit


def test_int64_postings_serve_the_same_lookups_and_scores(tmp_path, monkeypatch):
    """The int64 layout (a tree past 2^32 spans), forced on a small tree: same index, scores."""
    tokens = np.random.default_rng(8).integers(0, 500, 9000)
    with make_tree(tmp_path / "t", tokens[:6000]) as t:
        build_lexicon(t, progress=False)
        monkeypatch.setattr(lx, "postings_dtype", lambda stop: np.dtype("<i8"))
        with pytest.raises(ValueError, match=r"does not continue the spans"):
            t.lexicon()  # the uint32 segment no longer matches the rule: refused
        append(t, tokens[6000:])
        lex = build_lexicon(t, rebuild=True, progress=False)
        assert [seg.dtype for seg in lex.segments] == ["<i8"]
        assert_index_equals(lex, tokens, 500)
        idx = np.arange(0, 9000 // S, 2, dtype=np.int64)
        np.testing.assert_array_equal(
            scores(LexicalScorer(), t, 9000, [1, 2, 499], 1, idx),
            scores(LexicalScorer(use_index=False), t, 9000, [1, 2, 499], 1, idx))


# ---------------------------------------------------------------------------------------
# the command line


def test_the_index_command_builds_extends_and_is_reported(tmp_path, capsys):
    tokens = np.random.default_rng(7).integers(0, 500, 5000)
    t = make_tree(tmp_path / "t", tokens)
    t.close()
    before = tree_bytes(tmp_path / "t")
    assert cli(["index", str(tmp_path / "t"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path / 't'}: token index 156 spans in ") and "1 segment" in out
    assert cli(["index", str(tmp_path / "t")]) == 0
    assert "token index up to date (156 spans)" in capsys.readouterr().out
    assert tree_bytes(tmp_path / "t") == before
    with MegaContextTree.open(tmp_path / "t", mode="a") as t:
        append(t, tokens[:1000])
    assert cli(["inspect", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert "token index: 156 spans (4,992 tokens), 1 segment(s)" in out
    assert "31 newer spans not indexed" in out
    assert cli(["index", str(tmp_path / "t"), "--quiet"]) == 0
    assert "token index +31 spans" in capsys.readouterr().out
    assert cli(["inspect", str(tmp_path / "t"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["lexicon"]
    assert (info["spans"], info["segments"]) == (187, 2)
    assert cli(["verify", str(tmp_path / "t")]) == 0
    (lexicon_dir(tmp_path / "t") / "g000002.postings").write_bytes(b"")
    assert cli(["verify", str(tmp_path / "t")]) == 1
    assert "g000002.postings is 0 bytes" in capsys.readouterr().err
    assert cli(["index", str(tmp_path / "t"), "--quiet"]) == 2
    assert "rebuild it with `megacontext index" in capsys.readouterr().err
    assert cli(["index", str(tmp_path / "t"), "--rebuild", "--quiet"]) == 0
    assert "token index 187 spans in " in capsys.readouterr().out
    assert cli(["verify", str(tmp_path / "t")]) == 0


def test_the_index_command_on_what_is_not_a_tree(tmp_path, capsys):
    assert cli(["index", str(tmp_path / "nothing")]) == 2
    assert "no memory tree at" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


def test_the_benchmark_runs_and_both_paths_choose_alike(tmp_path, capsys):
    from megacontext.bench.lexical import main as bench

    rows = bench(["--tokens", "4e4", "--scan-tokens", "4e4", "--budget", "512", "--repeats",
                  "3", "--warmup", "1", "--firsts", "1", "--dir", str(tmp_path)])
    by = {r["path"]: r for r in rows}
    assert set(by) == {"scan", "index", "recency"}
    assert by["scan"]["nodes_scored"] == by["index"]["nodes_scored"]
    assert by["index"]["needle_raw"] and by["scan"]["needle_raw"]
    assert "scan / index at 4e+04" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # its indexes removed
