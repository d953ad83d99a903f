"""The ``megacontext`` command's refusals (docs/cli.md) and idempotent ingest, on the tiny
random model with its byte tokenizer (one token per character of ASCII text)."""

from __future__ import annotations

import hashlib
import io
import json
import sys

import pytest

from megacontext.base.loading import load_token_embeddings
from megacontext.cli import main as cli
from megacontext.gistnet import GistNet, GistNetConfig, save_gistnet
from megacontext.tree import MegaContextTree, verify

TEXT = "".join(f"line {i}: a quick brown fox jumps over it.\n" for i in range(120))


def run_cli(*args) -> int:
    return cli([str(a) for a in args])


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def gistnet_48(tiny_model_dir_48, tmp_path_factory):
    """A GistNet exported for the other tiny model (hidden 48)."""
    config, tokenizer, _ = load_token_embeddings(tiny_model_dir_48)
    net = GistNet(GistNetConfig(hidden_size=config.hidden_size, width=16, levels=2))
    return save_gistnet(net, tmp_path_factory.mktemp("gistnet-48"),
                        config.fingerprint(tokenizer.sha256))


@pytest.mark.parametrize("flags, message", [
    (["--levels", "0"], "--levels 0: expected an integer in [1, 12]"),
    (["--levels", "-3"], "--levels -3: expected an integer in [1, 12]"),
    (["--levels", "1000"], "--levels 1000: expected an integer in [1, 12]"),
    (["--commit-every", "0"], "--commit-every 0: expected a positive number of tokens"),
    (["--prefetch", "-1"], "--prefetch -1: expected 0 (off, the default) or a positive"),
    (["--shard-level", "0"], "--shard-level 0: expected an integer in [1, the tree's levels]"),
    (["--device", "gpu"], "--device 'gpu': expected a torch device such as cpu, cuda"),
    (["--device", "meta"], "--device meta: expected cpu or cuda[:N]"),
])
def test_bad_values_are_refused_before_the_tree_exists(tmp_path, text_file, tiny_model_dir,
                                                       capsys, flags, message):
    assert run_cli("ingest", tmp_path / "t", text_file, "--model", tiny_model_dir, "--quiet",
                   *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("megacontext ingest: error: ") and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("flags, message", [
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8' (choose from"),
    (["--levels", "two"], "argument --levels: invalid int value: 'two'"),
    (["--errors", "ignore"], "argument --errors: invalid choice: 'ignore'"),
    (["--precision", "float16"], "argument --precision: invalid choice: 'float16'"),
])
def test_argparse_refusals_exit_2_naming_the_choices(tmp_path, text_file, tiny_model_dir,
                                                     capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        run_cli("ingest", tmp_path / "t", text_file, "--model", tiny_model_dir, *flags)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_a_gistnet_for_another_model_is_refused_before_any_byte(tmp_path, text_file,
                                                                tiny_model_dir, gistnet_48,
                                                                capsys):
    assert run_cli("ingest", tmp_path / "t", text_file, "--model", tiny_model_dir,
                   "--gistnet", gistnet_48, "--quiet") == 2
    err = capsys.readouterr().err
    assert "hidden_size 48, this model has 32" in err
    assert not (tmp_path / "t").exists()


def test_settings_other_than_the_trees_are_refused_and_leave_it_unchanged(
        tmp_path, text_file, tiny_model_dir, capsys):
    tree = tmp_path / "t"
    assert run_cli("ingest", tree, text_file, "--model", tiny_model_dir, "--quiet",
                   "--levels", "3") == 0
    before = {p.name: p.read_bytes() for p in tree.iterdir()}
    capsys.readouterr()
    other = tmp_path / "b.txt"
    other.write_text("new text\n" * 50)
    assert run_cli("ingest", tree, other, "--model", tiny_model_dir, "--quiet",
                   "--levels", "2", "--dtype", "float32") == 2
    err = capsys.readouterr().err
    assert f"--levels 2: tree at {tree} has levels 3; drop --levels or pass --levels 3" in err
    assert "--dtype float32: tree at" in err and "has dtype float16" in err
    assert {p.name: p.read_bytes() for p in tree.iterdir()} == before


def test_inspect_and_verify_of_what_is_not_a_tree(tmp_path, text_file, capsys):
    assert run_cli("inspect", tmp_path / "none") == 2
    assert "no memory tree at" in capsys.readouterr().err
    assert run_cli("inspect", text_file) == 2
    assert "it is not a directory" in capsys.readouterr().err
    assert run_cli("verify", tmp_path / "none") == 1
    assert "FAIL no memory tree at" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


# -- idempotent ingest -------------------------------------------------------------------------

def ingest_cli(tree, *inputs, model, flags=()) -> int:
    return run_cli("ingest", tree, *inputs, "--model", model, "--quiet", *flags)


def stored_ids(tree) -> list[int]:
    with MegaContextTree.open(tree) as t:
        return t.tokens().tolist()


def test_twice_ingest_appends_nothing_and_says_when(tmp_path, text_file, tiny_model_dir,
                                                    capsys):
    tree = tmp_path / "t"
    assert ingest_cli(tree, text_file, model=tiny_model_dir) == 0
    before = {p.name: p.read_bytes() for p in tree.iterdir()}
    with MegaContextTree.open(tree) as t:
        (record,) = t.inputs()
    assert record["path"] == str(text_file) and record["size"] == len(TEXT)
    assert record["sha256"] == hashlib.sha256(TEXT.encode()).hexdigest()
    assert record["tokens"] == [0, len(TEXT)] and record["kind"] == "text"
    capsys.readouterr()
    assert ingest_cli(tree, text_file, model=tiny_model_dir) == 0
    out = capsys.readouterr().out
    assert f"{text_file}: already ingested at {record['ingested']}" in out
    assert "nothing appended" in out
    assert {p.name: p.read_bytes() for p in tree.iterdir()} == before


def test_again_appends_a_second_copy(tmp_path, text_file, tiny_model_dir):
    _, tokenizer, _ = load_token_embeddings(tiny_model_dir)
    tree = tmp_path / "t"
    assert ingest_cli(tree, text_file, model=tiny_model_dir) == 0
    assert ingest_cli(tree, text_file, model=tiny_model_dir, flags=["--again"]) == 0
    once = tokenizer.encode(TEXT)
    assert stored_ids(tree) == once + [tokenizer.eos_id] + once
    with MegaContextTree.open(tree) as t:
        assert [r["tokens"] for r in t.inputs()] == [[0, len(once)],
                                                     [len(once) + 1, 2 * len(once) + 1]]
    assert verify(tree) == []


def test_changed_content_is_refused_naming_the_file_unless_asked(tmp_path, text_file,
                                                                 tiny_model_dir, capsys):
    tree = tmp_path / "t"
    other = tmp_path / "b.txt"
    other.write_text("another document\n" * 20)
    assert ingest_cli(tree, text_file, model=tiny_model_dir) == 0
    before = {p.name: p.read_bytes() for p in tree.iterdir()}
    text_file.write_text(TEXT + "one more line\n")
    capsys.readouterr()
    assert ingest_cli(tree, other, text_file, model=tiny_model_dir) == 2
    err = capsys.readouterr().err
    assert f"{text_file} changed since it was ingested at" in err and "nothing was appended" in err
    assert f"now {len(TEXT) + 14:,} bytes" in err
    assert {p.name: p.read_bytes() for p in tree.iterdir()} == before  # b.txt not appended either
    assert ingest_cli(tree, other, text_file, model=tiny_model_dir,
                      flags=["--append-changed"]) == 0
    with MegaContextTree.open(tree) as t:
        assert [r["path"] for r in t.inputs()] == [str(text_file), str(other), str(text_file)]
        assert t.num_tokens == len(TEXT) + 1 + 20 * 17 + 1 + len(TEXT) + 14


def test_stdin_is_recorded_by_its_digest(tmp_path, tiny_model_dir, monkeypatch, capsys):
    tree = tmp_path / "t"
    for _ in range(2):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(TEXT.encode())))
        assert ingest_cli(tree, "-", model=tiny_model_dir) == 0
    assert "-: already ingested at" in capsys.readouterr().out
    with MegaContextTree.open(tree) as t:
        (record,) = t.inputs()
        assert t.num_tokens == len(TEXT)
    assert record["kind"] == "stdin" and record["abspath"] is None
    assert record["sha256"] == hashlib.sha256(TEXT.encode()).hexdigest()


def test_an_interrupted_ingest_records_nothing_and_resumes(tmp_path, text_file, tiny_model_dir,
                                                           monkeypatch, capsys):
    """A crash after a commit in the middle of the second input: the tree records no input
    (the record rides in the final commit), the same command resumes and records both, the
    ids equal one tokenization; a different command is refused meanwhile."""
    from megacontext import ingest as ingest_mod

    _, tokenizer, _ = load_token_embeddings(tiny_model_dir)
    second = tmp_path / "b.txt"
    second.write_text(TEXT[::-1])
    tree = tmp_path / "t"
    real = ingest_mod.Ingestor.feed

    def feed(self, ids, note=None):
        if self.tree.appended_count(0) + ids.size > len(TEXT) + 1500:
            real(self, ids[:1000], note)  # 1,001 uncommitted tokens: this feed commits them
            raise KeyboardInterrupt  # as if killed: what was committed stays
        return real(self, ids, note)

    monkeypatch.setattr(ingest_mod.Ingestor, "feed", feed)
    flags = ["--commit-every", "700"]
    assert ingest_cli(tree, text_file, second, model=tiny_model_dir, flags=flags) == 130
    with MegaContextTree.open(tree) as t:
        assert t.inputs() == [] and len(TEXT) < t.num_tokens <= len(TEXT) + 1500
        assert t.header["extra"]["ingest"]["done"] is False
    capsys.readouterr()
    assert ingest_cli(tree, second, model=tiny_model_dir, flags=flags) == 2
    assert "interrupted ingest of other inputs" in capsys.readouterr().err
    monkeypatch.undo()
    assert ingest_cli(tree, text_file, second, model=tiny_model_dir, flags=flags) == 0
    assert "resumed" in capsys.readouterr().out
    expected = tokenizer.encode(TEXT) + [tokenizer.eos_id] + tokenizer.encode(TEXT[::-1])
    assert stored_ids(tree) == expected
    with MegaContextTree.open(tree) as t:
        assert [(r["path"], r["tokens"]) for r in t.inputs()] == [
            (str(text_file), [0, len(TEXT)]), (str(second), [len(TEXT) + 1, len(expected)])]
    assert verify(tree) == []


def test_a_tree_without_the_record_opens_and_appends(tmp_path, text_file, tiny_model_dir):
    """A tree made before the inputs log (no ``inputs`` header key): it opens and verifies;
    its last finished ingest of the very same files counts as held; other files append."""
    tree = tmp_path / "t"
    assert ingest_cli(tree, text_file, model=tiny_model_dir) == 0
    header = json.loads((tree / "header.json").read_text())
    del header["inputs"]
    (tree / "header.json").write_text(json.dumps(header))
    (tree / "inputs.jsonl").unlink()
    assert verify(tree) == []
    assert ingest_cli(tree, text_file, model=tiny_model_dir) == 0
    assert len(stored_ids(tree)) == len(TEXT)
    other = tmp_path / "b.txt"
    other.write_text("more\n")
    assert ingest_cli(tree, other, model=tiny_model_dir) == 0
    with MegaContextTree.open(tree) as t:
        assert t.num_tokens == len(TEXT) + 1 + 5
        assert [r["path"] for r in t.inputs()] == [str(other)]


def test_inspect_lists_the_inputs(tmp_path, text_file, tiny_model_dir, capsys):
    tree = tmp_path / "t"
    assert ingest_cli(tree, text_file, model=tiny_model_dir) == 0
    capsys.readouterr()
    assert run_cli("inspect", tree, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert [(r["path"], r["tokens"]) for r in info["inputs"]] == [(str(text_file),
                                                                   [0, len(TEXT)])]
    assert run_cli("inspect", tree) == 0
    out = capsys.readouterr().out
    assert "ingested inputs (1)" in out and f"[0, {len(TEXT):,})" in out


def test_a_torn_inputs_log_is_damage_that_verify_names(tmp_path, text_file, tiny_model_dir):
    tree = tmp_path / "t"
    assert ingest_cli(tree, text_file, model=tiny_model_dir) == 0
    data = (tree / "inputs.jsonl").read_bytes()
    (tree / "inputs.jsonl").write_bytes(data.replace(b'"text"', b'"tExt"'))
    assert any("inputs file inputs.jsonl: CRC-32" in p for p in verify(tree))
    (tree / "inputs.jsonl").write_bytes(data[:10])
    assert any("inputs.jsonl is truncated at byte offset 10" in p for p in verify(tree))
    with pytest.raises(ValueError, match="damaged"):
        MegaContextTree.open(tree, mode="a")


def test_a_full_disk_mid_ingest_is_one_line_naming_the_tree_and_resumes(
        tmp_path, tiny_model_dir, monkeypatch, capsys):
    """The tree's writes meet ENOSPC after some commits: exit 2 with one line that names the
    tree, the error and what is kept; the tree verifies and the same command resumes."""
    import errno
    import os

    from megacontext.tree import files

    texts = []
    for i in range(6):  # ~10k tokens each: a commit (of 8,192 or more) after each
        texts.append(tmp_path / f"{i}.txt")
        texts[-1].write_text(f"{i}" + TEXT * 2)
    tree = tmp_path / "t"
    flags = ["--commit-every", "8192"]
    budget = {"bytes": 100_000}
    real = os.pwrite

    def pwrite(fd, data, offset):
        budget["bytes"] -= len(data)
        if budget["bytes"] < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(files.os, "pwrite", pwrite)
    assert ingest_cli(tree, *texts, model=tiny_model_dir, flags=flags) == 2
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()
    with MegaContextTree.open(tree) as t:
        kept = t.num_tokens
    assert 0 < kept < 6 * (len(TEXT) * 2 + 2)
    assert line == (f"megacontext ingest: error: writing tree at {tree} failed: No space left "
                    f"on device (ENOSPC); it keeps the {kept:,} tokens committed before; "
                    f"rerun the same command once the cause is fixed to resume")
    assert verify(tree) == []
    monkeypatch.undo()
    assert ingest_cli(tree, *texts, model=tiny_model_dir, flags=flags) == 0
    tokenizer = load_token_embeddings(tiny_model_dir)[1]
    assert stored_ids(tree) == [t for i in range(6) for t in [tokenizer.eos_id] * (i > 0)
                                + tokenizer.encode(f"{i}{TEXT * 2}")]


def test_a_tree_created_by_another_ingest_meanwhile_is_appended_to(
        tmp_path, text_file, tiny_model_dir, monkeypatch):
    """Two ingests into a new tree at once: the one that finds the tree created under it
    checks it and goes on as for an existing tree (no 'already exists' error)."""
    real = MegaContextTree.create.__func__

    def create_raced(cls, path, **kw):
        real(cls, path, **kw).close()  # the other ingest got there first
        return real(cls, path, **kw)

    monkeypatch.setattr(MegaContextTree, "create", classmethod(create_raced))
    assert ingest_cli(tmp_path / "t", text_file, model=tiny_model_dir) == 0
    monkeypatch.undo()
    assert stored_ids(tmp_path / "t") == load_token_embeddings(tiny_model_dir)[1].encode(TEXT)
