"""The ``megacontext`` command's refusals (docs/cli.md) and idempotent ingest, on the tiny
random model with its byte tokenizer (one token per character of ASCII text)."""

from __future__ import annotations

import hashlib
import io
import json
import sys

import numpy as np
import pytest
import torch

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
