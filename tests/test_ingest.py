"""Streaming ingest and the console script, on a tiny random model with a byte tokenizer."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megacontext.base.loading import load_token_embeddings
from megacontext.cli import main as cli
from megacontext.gistnet import GistNet, GistNetConfig, gistnet_digest, save_gistnet
from megacontext.ingest import Ingestor, expand_inputs, token_stream
from megacontext.tree import MegaContextTree

TEXT = "".join(f"line {i}: the quick brown fox {i * 7919 % 1000} jumps over it.\n"
               for i in range(900))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    config, tokenizer, embedding = load_token_embeddings(tiny_model_dir)
    return config, tokenizer, embedding


@pytest.fixture(scope="module")
def gistnet(model, tmp_path_factory):
    """A GistNet moved away from its constant initial output, exported to disk."""
    config, tokenizer, embedding = model
    torch.manual_seed(0)
    net = GistNet(GistNetConfig(hidden_size=config.hidden_size, width=16, levels=3))
    net.set_output_prior(embedding.mean(0))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    directory = save_gistnet(net, tmp_path_factory.mktemp("gistnet"),
                             config.fingerprint(tokenizer.sha256))
    return net.eval(), directory


def new_tree(path, model, net, levels=3, dtype="float16"):
    config, tokenizer, _ = model
    return MegaContextTree.create(path, hidden_size=config.hidden_size,
                                  vocab_size=config.vocab_size, rope=config.rope,
                                  fingerprint=config.fingerprint(tokenizer.sha256),
                                  levels=levels, gist_dtype=dtype,
                                  gistnet_digest=gistnet_digest(net))


def one_pass_gists(ids: np.ndarray, embedding, net, levels, dtype=torch.float16):
    """Reference: every level computed in one batched call, children rounded as stored."""
    x = embedding[torch.from_numpy(ids[: ids.size // 32 * 32]).long()].reshape(-1, 32,
                                                                                 embedding.shape[1])
    out = {}
    with torch.no_grad():
        for level in range(1, levels + 1):
            g = x.shape[0]
            out[level] = net(x, level).to(dtype).float() if g else torch.zeros(0, x.shape[-1])
            n = out[level].shape[0] // 32 * 32
            x = out[level][:n].reshape(-1, 32, x.shape[-1])
    return out


def test_round_trip_counts_centers_and_one_pass_equality(tmp_path, model, gistnet):
    _, tokenizer, embedding = model
    net, _ = gistnet
    ids = np.asarray(tokenizer.encode(TEXT), dtype=np.int64)
    assert ids.size > 32**2 * 2  # at least two L2 gists
    with new_tree(tmp_path / "t", model, net) as tree:
        worker = Ingestor(tree, embedding, net, batch_spans=7, commit_every=5000)
        worker.feed(ids)
        worker.commit()
        assert tree.tokens(0, tree.num_tokens).numpy().tolist() == ids.tolist()
        expected = one_pass_gists(ids, embedding, net, 3)
        for level in (1, 2, 3):
            assert tree.count(level) == ids.size // 32**level
            torch.testing.assert_close(tree.gists(level, 0, tree.count(level)), expected[level],
                                       atol=2e-3, rtol=0)
            i = torch.arange(tree.count(level), dtype=torch.float64)
            assert torch.equal(tree.centers(level, 0, tree.count(level)),
                               i * 32**level + (32**level - 1) / 2)
        assert tree.verify() == []


@pytest.mark.parametrize("seed", [0, 1])
def test_any_chunking_gives_the_same_tree(tmp_path, model, gistnet, seed):
    _, tokenizer, embedding = model
    net, _ = gistnet
    ids = np.asarray(tokenizer.encode(TEXT[:40000]), dtype=np.int64)
    rng = random.Random(seed)
    with new_tree(tmp_path / "chunked", model, net) as tree:
        worker = Ingestor(tree, embedding, net, commit_every=rng.choice([1, 100, 3000]))
        i = 0
        while i < ids.size:
            n = rng.choice([1, 1, 1, 2, 31, 33, 500, 1500])  # including 1-token appends
            worker.feed(ids[i:i + n])
            i += n
        worker.commit()
        got = {k: tree.gists(k, 0, tree.count(k)) for k in (1, 2)}
        assert tree.tokens(0, tree.num_tokens).numpy().tolist() == ids.tolist()
    expected = one_pass_gists(ids, embedding, net, 2)
    for level in (1, 2):
        torch.testing.assert_close(got[level], expected[level], atol=2e-3, rtol=0)


def test_restart_rebuilds_pending_children_from_the_tree(tmp_path, model, gistnet):
    """Close mid-span (after a commit), reopen, continue: same tree as one pass."""
    _, tokenizer, embedding = model
    net, _ = gistnet
    ids = np.asarray(tokenizer.encode(TEXT[:40000]), dtype=np.int64)
    cut = 32 * 32 * 3 + 32 * 5 + 7  # mid L1 span, mid L2 span
    with new_tree(tmp_path / "t", model, net) as tree:
        w = Ingestor(tree, embedding, net)
        w.feed(ids[:cut])
        w.commit()
    with MegaContextTree.open(tmp_path / "t", mode="a") as tree:
        w = Ingestor(tree, embedding, net)
        w.feed(ids[cut:])
        w.commit()
        got = {k: tree.gists(k, 0, tree.count(k)) for k in (1, 2, 3)}
    expected = one_pass_gists(ids, embedding, net, 3)
    for level in (1, 2):
        torch.testing.assert_close(got[level], expected[level], atol=2e-3, rtol=0)


def test_token_stream_reads_files_directories_jsonl_and_separates_documents(tmp_path, model):
    _, tokenizer, _ = model
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("alpha\n")
    (tmp_path / "d" / "b.md").write_text("beta")
    (tmp_path / "d" / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / "r.jsonl").write_text(json.dumps({"text": "gamma"}) + "\n\n"
                                      + json.dumps({"text": "delta"}) + "\n")
    sources = expand_inputs([str(tmp_path / "d"), str(tmp_path / "r.jsonl")])
    assert [Path(s.path).name for s in sources] == ["a.txt", "b.md", "r.jsonl"]
    ids = np.concatenate(list(token_stream(sources, tokenizer, separator=tokenizer.eos_id)))
    sep = [tokenizer.eos_id]
    expected = (tokenizer.encode("alpha\n") + sep + tokenizer.encode("beta") + sep
                + tokenizer.encode("gamma") + sep + tokenizer.encode("delta"))
    assert ids.tolist() == expected


# -- the console script ------------------------------------------------------------------------

def run_cli(*args) -> int:
    return cli([str(a) for a in args])


def test_cli_ingest_inspect_verify_and_append(tmp_path, tiny_model_dir, gistnet, capsys):
    net, gdir = gistnet
    (tmp_path / "a.txt").write_text(TEXT)
    tree_dir = tmp_path / "tree"
    assert run_cli("ingest", tree_dir, tmp_path / "a.txt", "--model", tiny_model_dir,
                   "--gistnet", gdir, "--levels", "3", "--quiet") == 0
    assert run_cli("inspect", tree_dir, "--json") == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    n = len(TEXT.encode())  # byte tokenizer: one token per byte
    assert info["num_tokens"] == n and info["counts"] == [n, n // 32, n // 1024, n // 32768]
    assert info["gistnet_digest"] == gistnet_digest(net)
    assert run_cli("inspect", tree_dir) == 0
    assert run_cli("verify", tree_dir) == 0
    # a second ingest appends, with the end-of-text id between the two runs' documents
    assert run_cli("ingest", tree_dir, tmp_path / "a.txt", "--model", tiny_model_dir,
                   "--gistnet", gdir, "--quiet") == 0
    with MegaContextTree.open(tree_dir) as tree:
        assert tree.num_tokens == 2 * n + 1
        assert tree.tokens(n, n + 1).item() == load_token_embeddings(tiny_model_dir)[1].eos_id
        assert tree.verify() == []
    # corrupt one committed byte: verify says which level
    with open(tree_dir / "level0.tokens", "r+b") as f:
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 0xFF]))
    capsys.readouterr()
    assert run_cli("verify", tree_dir) == 1
    assert "level 0" in capsys.readouterr().err


def test_cli_reads_stdin_and_mean_baseline(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(TEXT.encode())))
    assert run_cli("ingest", tmp_path / "t", "-", "--model", tiny_model_dir, "--gistnet", "mean",
                   "--dtype", "float32", "--quiet") == 0
    with MegaContextTree.open(tmp_path / "t") as tree:
        assert tree.num_tokens == len(TEXT.encode())
        _, _, embedding = load_token_embeddings(tiny_model_dir)
        first = embedding[tree.tokens(0, 32)].mean(0)
        torch.testing.assert_close(tree.gists(1, 0, 1)[0], first)


def test_empty_input_is_a_no_op(tmp_path, tiny_model_dir):
    (tmp_path / "empty.txt").write_text("")
    assert run_cli("ingest", tmp_path / "t", tmp_path / "empty.txt", "--model", tiny_model_dir,
                   "--quiet") == 0
    with MegaContextTree.open(tmp_path / "t") as tree:
        assert tree.num_tokens == 0 and tree.verify() == []


def test_bad_inputs_fail_clearly_and_touch_nothing_committed(tmp_path, tiny_model_dir,
                                                            tiny_model_dir_48, gistnet, capsys):
    _, gdir = gistnet
    (tmp_path / "a.txt").write_text(TEXT[:5000])
    tree_dir = tmp_path / "tree"
    assert run_cli("ingest", tree_dir, tmp_path / "a.txt", "--model", tiny_model_dir,
                   "--gistnet", gdir, "--quiet") == 0
    before = {p.name: p.read_bytes() for p in tree_dir.iterdir()}

    def unchanged():
        return {p.name: p.read_bytes() for p in tree_dir.iterdir()} == before

    capsys.readouterr()
    # non-UTF-8 text: named by file and byte offset
    (tmp_path / "bad.txt").write_bytes(b"fine text\n" * 100 + b"caf\xe9 au lait")
    assert run_cli("ingest", tree_dir, tmp_path / "bad.txt", "--model", tiny_model_dir,
                   "--gistnet", gdir, "--quiet") == 2
    err = capsys.readouterr().err
    assert "bad.txt" in err and "byte offset 1003" in err
    # ... and the committed tree is as it was
    with MegaContextTree.open(tree_dir) as tree:
        assert tree.num_tokens == 5000 and tree.verify() == []
    # another base model (hidden 48) is refused by name
    assert run_cli("ingest", tree_dir, tmp_path / "a.txt", "--model", tiny_model_dir_48,
                   "--gistnet", "mean", "--quiet") == 2
    assert "hidden_size" in capsys.readouterr().err
    # another gistnet is refused
    assert run_cli("ingest", tree_dir, tmp_path / "a.txt", "--model", tiny_model_dir,
                   "--gistnet", "mean", "--quiet") == 2
    assert "gistnet" in capsys.readouterr().err
    assert unchanged()
    # missing input
    assert run_cli("ingest", tree_dir, tmp_path / "nope.txt", "--model", tiny_model_dir,
                   "--quiet") == 2
    assert "nope.txt" in capsys.readouterr().err
    # token ids outside the vocabulary (the tree refuses them before writing)
    config, tokenizer, embedding = load_token_embeddings(tiny_model_dir)
    net, _ = gistnet
    with MegaContextTree.open(tree_dir, mode="a") as tree:
        with pytest.raises(ValueError, match=str(config.vocab_size + 5)):
            Ingestor(tree, embedding, net).feed(np.array([1, 2, config.vocab_size + 5]))
    assert unchanged()


def test_replace_policy_substitutes_bad_bytes(tmp_path, tiny_model_dir):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9!")
    assert run_cli("ingest", tmp_path / "t", tmp_path / "bad.txt", "--model", tiny_model_dir,
                   "--errors", "replace", "--quiet") == 0
    config, tokenizer, _ = load_token_embeddings(tiny_model_dir)
    with MegaContextTree.open(tmp_path / "t") as tree:
        assert tree.tokens(0, tree.num_tokens).tolist() == tokenizer.encode("caf\ufffd!")


# -- crash campaign ----------------------------------------------------------------------------

def _ingest_cmd(tree_dir, text_path, model_dir, gdir):
    return [sys.executable, "-m", "megacontext.cli", "ingest", str(tree_dir), str(text_path),
            "--model", str(model_dir), "--gistnet", str(gdir), "--levels", "3",
            "--commit-every", "4096", "--quiet"]


@pytest.mark.slow
def test_crash_campaign_sigkill_then_resume(tmp_path, tiny_model_dir, gistnet):
    """SIGKILL an ingest at >= 10 random moments; every time the tree reopens, verifies, holds
    a prefix of the stream; resuming finishes with the same tree as an uninterrupted run."""
    _, gdir = gistnet
    text = tmp_path / "input.txt"
    text.write_text(TEXT * 60)  # ~3 MB, ~3M byte tokens
    _, tokenizer, _ = load_token_embeddings(tiny_model_dir)
    stream = np.asarray(tokenizer.encode(text.read_text()), dtype=np.int64)
    env = os.environ | {"OMP_NUM_THREADS": "1"}

    reference = tmp_path / "reference"
    start = time.perf_counter()
    subprocess.run(_ingest_cmd(reference, text, tiny_model_dir, gdir), check=True, env=env)
    full_seconds = time.perf_counter() - start

    rng = random.Random(1234)
    tree_dir, kills, attempts = tmp_path / "crashed", 0, 0
    while kills < 10:
        attempts += 1
        assert attempts < 60, f"only {kills} kills landed mid-ingest in {attempts} attempts"
        proc = subprocess.Popen(_ingest_cmd(tree_dir, text, tiny_model_dir, gdir), env=env)
        time.sleep(rng.uniform(0.0, full_seconds))
        proc.send_signal(signal.SIGKILL)
        code = proc.wait()
        if code == 0:  # finished before the kill: start over for another try
            shutil.rmtree(tree_dir)
            continue
        assert code == -signal.SIGKILL
        if not (tree_dir / "header.json").exists():
            continue  # killed before the tree was created
        with MegaContextTree.open(tree_dir) as tree:
            assert tree.verify() == []
            n = tree.num_tokens
            assert np.array_equal(tree.tokens(0, n).numpy(), stream[:n])
            for level in (1, 2, 3):
                assert tree.count(level) == n // 32**level
            finished = tree.header.get("extra", {}).get("ingest", {}).get("done", False)
        if finished:  # killed after the final commit: a rerun would append, so start over
            shutil.rmtree(tree_dir)
            continue
        kills += 1
    subprocess.run(_ingest_cmd(tree_dir, text, tiny_model_dir, gdir), check=True, env=env)
    with MegaContextTree.open(tree_dir) as got, MegaContextTree.open(reference) as want:
        assert got.num_tokens == want.num_tokens == stream.size
        assert got.verify() == []
        assert np.array_equal(got.tokens(0, got.num_tokens).numpy(), stream)
        for level in (1, 2, 3):
            assert got.count(level) == want.count(level)
            torch.testing.assert_close(got.gists(level, 0, got.count(level)),
                                       want.gists(level, 0, want.count(level)), atol=2e-3, rtol=0)
            assert torch.equal(got.phases(level, 0, got.count(level)),
                               want.phases(level, 0, want.count(level)))
