"""Streaming ingest and the console script, on a tiny random model with a byte tokenizer;
exact streaming tokenization also with SmolLM2-135M-Instruct's tokenizer (the tokenizer alone,
read from the GGUF's metadata)."""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megacontext import textio
from megacontext.base.loading import embedded_gguf, load_token_embeddings
from megacontext.base.tokenizer import Tokenizer
from megacontext.cli import main as cli
from megacontext.gistnet import GistNet, GistNetConfig, MeanPoolGist, gistnet_digest, save_gistnet
from megacontext.ingest import (
    CHUNK_SPANS,
    Ingestor,
    expand_inputs,
    ingest,
    inputs_digest,
    token_stream,
)
from megacontext.rope import RopeConfig
from megacontext.textio import Source, exact_segments
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


def one_pass_gists(ids: np.ndarray, embedding, net, levels, dtype=torch.float16, chunk=None):
    """Reference: every level computed from the whole stream at once from embeddings,
    children rounded as stored; with ``chunk``, in aligned calls of exactly ``chunk`` spans
    (the last one padded with zeros) and level 1 from ids (``GistNet.from_ids``), the rules
    the Ingestor follows, so the result must be equal bit for bit."""
    spans = torch.from_numpy(ids[: ids.size // 32 * 32]).long().reshape(-1, 32)
    x = embedding[spans]
    table = net.token_table(embedding) if chunk is not None and hasattr(net, "token_table") \
        else None
    out = {}
    with torch.no_grad():
        for level in range(1, levels + 1):
            g = x.shape[0]
            if chunk is None:
                y = net(x, level) if g else torch.zeros(0, x.shape[-1])
            else:
                parts = [torch.zeros(0, x.shape[-1])]
                for i in range(0, g, chunk):
                    pad = max(0, i + chunk - g)
                    if level == 1 and table is not None:
                        part = torch.cat([spans[i:i + chunk], spans.new_zeros(pad, 32)])
                        parts.append(net.from_ids(part, embedding, table))
                    else:
                        part = torch.cat([x[i:i + chunk], x.new_zeros(pad, *x.shape[1:])])
                        parts.append(net(part, level))
                y = torch.cat(parts)[:g]
            out[level] = y.to(dtype).float()
            n = out[level].shape[0] // 32 * 32
            x = out[level][:n].reshape(-1, 32, x.shape[-1])
    return out


def tree_bytes(path: Path) -> dict[str, bytes]:
    """Every array file of a tree (the committed parts: trees here end with a commit)."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())
            if p.suffix in (".tokens", ".gists", ".meta", ".crc32")}


def test_round_trip_counts_centers_and_one_pass_equality(tmp_path, model, gistnet):
    _, tokenizer, embedding = model
    net, _ = gistnet
    ids = np.asarray(tokenizer.encode(TEXT), dtype=np.int64)
    assert ids.size > 32**2 * 2  # at least two L2 gists
    with new_tree(tmp_path / "t", model, net) as tree:
        worker = Ingestor(tree, embedding, net, commit_every=5000)
        worker.feed(ids)
        worker.commit()
        assert tree.tokens(0, tree.num_tokens).numpy().tolist() == ids.tolist()
        exact = one_pass_gists(ids, embedding, net, 3, chunk=CHUNK_SPANS)
        batched = one_pass_gists(ids, embedding, net, 3)
        for level in (1, 2, 3):
            assert tree.count(level) == ids.size // 32**level
            stored = tree.gists(level, 0, tree.count(level))
            assert torch.equal(stored, exact[level])
            # one call over every span sums in another order: a float16 ulp or so apart
            torch.testing.assert_close(stored, batched[level], atol=2e-3, rtol=0)
            i = torch.arange(tree.count(level), dtype=torch.float64)
            assert torch.equal(tree.centers(level, 0, tree.count(level)),
                               i * 32**level + (32**level - 1) / 2)
        assert tree.verify() == []


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_ingest_on_a_device_stores_what_the_cpu_stores(tmp_path, model, gistnet, device):
    """GistNet on ``device``: the same tokens; the same gists (bit for bit on the CPU, within
    a float16 ulp on a GPU, whose kernels sum in another order); the caller's GistNet and
    embedding are not moved off the CPU."""
    _, tokenizer, embedding = model
    net, _ = gistnet
    ids = np.asarray(tokenizer.encode(TEXT), dtype=np.int64)
    trees = {}
    for where in (None, device):
        with new_tree(tmp_path / str(where), model, net) as tree:
            worker = Ingestor(tree, embedding, net, commit_every=5000, device=where)
            worker.feed(ids)
            worker.commit()
            trees[where] = [tree.tokens(0, tree.num_tokens)] + [
                tree.gists(k, 0, tree.count(k)) for k in (1, 2, 3)]
    cpu, dev = trees[None], trees[device]
    assert torch.equal(cpu[0], dev[0]) and all(g.device.type == "cpu" for g in dev[1:])
    for a, b in zip(cpu[1:], dev[1:], strict=True):
        assert a.shape == b.shape and a.shape[0] > 0
        if device == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(b, a, atol=4e-3, rtol=2e-3)
    assert embedding.device.type == "cpu" and next(net.parameters()).device.type == "cpu"


@pytest.mark.parametrize("seed", [0, 1])
def test_any_chunking_gives_the_same_tree(tmp_path, model, gistnet, seed):
    """Feeds of any size (1-token appends too) and commits anywhere: the same bytes."""
    _, tokenizer, embedding = model
    net, _ = gistnet
    ids = np.asarray(tokenizer.encode(TEXT[:20000]), dtype=np.int64)
    rng = random.Random(seed)
    with new_tree(tmp_path / "chunked", model, net) as tree:
        worker = Ingestor(tree, embedding, net, commit_every=rng.choice([1, 100, 3000]))
        i = 0
        while i < ids.size:
            n = rng.choice([1, 1, 1, 2, 31, 33, 500, 1500])  # including 1-token appends
            worker.feed(ids[i:i + n])
            i += n
            if rng.random() < 0.05:
                worker.commit()
        worker.commit()
        assert tree.tokens(0, tree.num_tokens).numpy().tolist() == ids.tolist()
    with new_tree(tmp_path / "one", model, net) as tree:
        worker = Ingestor(tree, embedding, net)
        worker.feed(ids)
        worker.commit()
    assert tree_bytes(tmp_path / "chunked") == tree_bytes(tmp_path / "one")


def test_restart_rebuilds_pending_children_from_the_tree(tmp_path, model, gistnet):
    """Close mid-span and mid-chunk at every level (after commits), reopen, continue, several
    times: the same bytes as one pass, equal to the aligned-chunk reference."""
    _, tokenizer, embedding = model
    net, _ = gistnet
    ids = np.asarray(tokenizer.encode(TEXT * 3), dtype=np.int64)
    assert ids.size > 2 * 64 * 32**2  # complete L2 chunks
    cuts = [0, 32 * 32 * 3 + 32 * 5 + 7, 32 * 32 * 3 + 32 * 70 + 1, 32 * 32 * 20 + 3,
            64 * 32**2 + 32 * 64 * 3 + 5, ids.size]
    new_tree(tmp_path / "t", model, net).close()
    for a, b in zip(cuts, cuts[1:], strict=False):
        with MegaContextTree.open(tmp_path / "t", mode="a") as tree:
            w = Ingestor(tree, embedding, net)
            w.feed(ids[a:b])
            w.commit()
    with MegaContextTree.open(tmp_path / "t") as tree:
        got = {k: tree.gists(k, 0, tree.count(k)) for k in (1, 2, 3)}
    expected = one_pass_gists(ids, embedding, net, 3, chunk=CHUNK_SPANS)
    for level in (1, 2, 3):
        assert torch.equal(got[level], expected[level])
    with new_tree(tmp_path / "one", model, net) as tree:
        w = Ingestor(tree, embedding, net)
        w.feed(ids)
        w.commit()
    assert tree_bytes(tmp_path / "t") == tree_bytes(tmp_path / "one")


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


# -- exact streaming tokenization --------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_tokenizer(tmp_path_factory):
    """SmolLM2-135M-Instruct's tokenizer alone: transformers' GGUF converter reads only the
    embedded GGUF's metadata (no weights are dequantized)."""
    try:
        gguf = embedded_gguf("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("smollm2") / "tokenizer.json"
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).backend_tokenizer.save(
        str(path))
    return Tokenizer(path)


@pytest.fixture(params=["tiny", "smollm2"])
def any_tokenizer(request, model):
    return model[1] if request.param == "tiny" else request.getfixturevalue("smollm2_tokenizer")


def megabytes(tokenizer, mb: float) -> float:
    """Multi-megabyte texts for SmolLM2's BPE; a third of that for the byte tokenizer (every
    byte one token, so no cut can go wrong, and its one-word BPE is slow)."""
    return mb if tokenizer.vocab_size > 1000 else mb / 3


# Places where tokenizing two pieces separately differs from tokenizing their concatenation.
HARD_CUTS = [r"\n(?= )", r"\r(?=\n)", r"(?<= )(?= )", r"(?=[é✓🙂])", r"(?<=[é✓🙂])",
             r"(?<=\d)(?=\d)", r"(?<=[a-z])(?=[a-z])", r"(?<=<\|endof)", r"\n(?=\n)"]


def hard_text(megabytes: float, seed: int = 0) -> str:
    """Code and prose with indentation, CRLF, runs of spaces, multi-byte characters, digits
    and an added token's text, about ``megabytes`` MB of UTF-8."""
    rng = random.Random(seed)
    parts = ["def f(x):\n    return x + 1\n", "\r\n", "    ", "  \t  ", " é", "✓", "🙂",
             " 1234567", "3.14159", " word", "<|endoftext|>", "\n\n\n", "  \n  ", "'s ",
             " naïve café", " 中文", "\n\tif y:\n\t\tpass\n", "x" * 40, " " * 33, "\n" + " " * 8]
    out, size = [], 0
    while size < megabytes * 1e6:
        part = rng.choice(parts)
        out.append(part)
        size += len(part.encode())
    return "".join(out)


def hard_pieces(text: str, n: int, seed: int = 0) -> list[str]:
    """``text`` cut into pieces at ``n`` places drawn from ``HARD_CUTS``."""
    rng = random.Random(seed)
    places = sorted({m.start() for pattern in HARD_CUTS for m in re.finditer(pattern, text)})
    cuts = sorted({0, len(text), *rng.sample(places, min(n, len(places))),
                   *(rng.randrange(len(text)) for _ in range(n // 4))})
    return [text[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def test_exact_segments_equal_one_shot_tokenization(any_tokenizer):
    """Pieces cut at newline + indentation, CRLF, runs of spaces, multi-byte characters,
    digits, inside words and inside an added token: regrouped, they tokenize exactly as the
    whole 3 MB text does (1 MB with the byte tokenizer)."""
    tok = any_tokenizer
    text = hard_text(megabytes(tok, 3.0))
    whole = tok.encode(text)
    pieces = hard_pieces(text, 600)
    assert "".join(pieces) == text and len(pieces) > 400
    segments = list(exact_segments(pieces, tok))
    assert "".join(segments) == text
    assert [i for s in segments for i in tok.encode(s)] == whole
    if tok.vocab_size > 1000:  # BPE with merges: the pieces themselves would not do
        assert [i for p in pieces[:50] for i in tok.encode(p)] != tok.encode("".join(pieces[:50]))


@pytest.mark.parametrize("part_chars", [20_000, 1 << 17])
def test_split_exact_parts_tokenize_as_the_whole_text(any_tokenizer, part_chars):
    """A segment cut into parts for a parallel batch encode: the parts' ids, concatenated,
    are the whole text's (1 MB of hard text; 0.3 MB with the byte tokenizer)."""
    tok = any_tokenizer
    text = hard_text(megabytes(tok, 1.0), seed=2)
    parts = textio.split_exact(text, tok, part_chars)
    assert "".join(parts) == text
    assert len(parts) >= max(2, len(text) // part_chars - 1)  # cut, about every part_chars
    assert max(map(len, parts)) < 2 * part_chars
    assert [i for ids in tok.encode_batch(parts) for i in ids] == tok.encode(text)
    assert textio.split_exact(text[:part_chars], tok, part_chars) == [text[:part_chars]]


def test_ingest_stores_one_shot_ids_whatever_the_read_size(tmp_path, any_tokenizer, monkeypatch):
    """A 4 MB file (1.3 MB with the byte tokenizer) ingested with reads that end anywhere
    (inside UTF-8 sequences too): the tree's ids are ``tokenizer.encode(whole file)``."""
    tok = any_tokenizer
    text = hard_text(megabytes(tok, 4.0), seed=1)
    (tmp_path / "in.txt").write_text(text, encoding="utf-8", newline="")
    whole = np.asarray(tok.encode(text), dtype=np.int64)
    hidden = 8
    for read_bytes in (1 << 20, 65_521):
        monkeypatch.setattr(textio, "READ_BYTES", read_bytes)
        tree = MegaContextTree.create(tmp_path / f"t{read_bytes}", hidden_size=hidden,
                                      vocab_size=tok.vocab_size, rope=RopeConfig(hidden, 1e4),
                                      fingerprint={"tokenizer": tok.sha256}, levels=1,
                                      gist_dtype="float32")
        with tree:
            ingest(tree, [Source(tmp_path / "in.txt", "text")], tok,
                   torch.zeros(tok.vocab_size, hidden), MeanPoolGist())
            assert np.array_equal(tree.tokens(0, tree.num_tokens).numpy(), whole)


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
    # a second ingest with --again appends, with the end-of-text id between the two copies
    assert run_cli("ingest", tree_dir, tmp_path / "a.txt", "--model", tiny_model_dir,
                   "--gistnet", gdir, "--quiet", "--again") == 0
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
    a prefix of the stream; resuming finishes with the same tree as an uninterrupted run, byte
    for byte (gists included)."""
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
            assert torch.equal(got.gists(level, 0, got.count(level)),
                               want.gists(level, 0, want.count(level)))
    assert tree_bytes(tree_dir) == tree_bytes(reference)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_ingest_on_cuda_without_one_is_a_clear_error(tmp_path, model, gistnet):
    _, _, embedding = model
    net, _ = gistnet
    with new_tree(tmp_path / "t", model, net) as tree, \
            pytest.raises(ValueError, match="device='cuda': torch .* sees no CUDA device"):
        Ingestor(tree, embedding, net, device="cuda")


@pytest.mark.parametrize("flag, value, message", [
    ("--device", "cuda", "--device cuda: distributed ingest runs on the CPU"),
    ("--precision", "bfloat16", "--precision bfloat16: distributed ingest computes in float32"),
])
def test_distributed_ingest_refuses_a_device_or_bfloat16(tmp_path, tiny_model_dir,
                                                         monkeypatch, flag, value, message):
    """Under torchrun each rank ingests on the CPU in float32 (the merge equals a serial
    float32 ingest): --device and --precision bfloat16 are refused, before any rank joins a
    process group or touches the tree."""
    (tmp_path / "a.txt").write_text(TEXT)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match=message):
        run_cli("ingest", tmp_path / "t", tmp_path / "a.txt", "--model", tiny_model_dir,
                flag, value, "--quiet")
    assert not (tmp_path / "t").exists()


def test_bfloat16_ingest_stays_within_bfloat16_rounding_of_float32(tmp_path, model, gistnet):
    """precision='bfloat16' computes under autocast: gists differ from float32's (the option
    takes effect) by about bfloat16's rounding, far less than gists differ from each other."""
    _, tokenizer, embedding = model
    net, _ = gistnet
    ids = np.asarray(tokenizer.encode(TEXT), dtype=np.int64)
    stored = {}
    for precision in ("float32", "bfloat16"):
        with new_tree(tmp_path / precision, model, net) as tree:
            worker = Ingestor(tree, embedding, net, precision=precision)
            worker.feed(ids)
            worker.commit()
            stored[precision] = [tree.gists(k, 0, tree.count(k)) for k in (1, 2)]
    for a, b in zip(stored["float32"], stored["bfloat16"], strict=True):
        assert not torch.equal(a, b)
        err = float((a - b).norm() / a.norm())
        spread = float((a - a.mean(0)).norm() / a.norm())
        assert err < 1e-2 < spread, (err, spread)


def test_bad_precision_and_a_resume_in_another_precision_are_refused(tmp_path, model, gistnet):
    _, tokenizer, embedding = model
    net, _ = gistnet
    with new_tree(tmp_path / "t", model, net) as tree, \
            pytest.raises(ValueError, match="precision='float16' \\(expected one of"):
        Ingestor(tree, embedding, net, precision="float16")
    (tmp_path / "a.txt").write_text(TEXT)
    sources = expand_inputs([str(tmp_path / "a.txt")])
    with new_tree(tmp_path / "r", model, net) as tree:
        # an interrupted bfloat16 ingest of these inputs: its note says so, done=False
        note = {"inputs": inputs_digest(sources),
                "start_tokens": 0, "done": False, "precision": "bfloat16"}
        tree.commit(extra={"ingest": note})
        before = tree_bytes(tmp_path / "r")
        with pytest.raises(ValueError, match="made with precision 'bfloat16'; resume it with "
                                             "that precision, not 'float32'"):
            ingest(tree, sources, tokenizer, embedding, net)
    assert tree_bytes(tmp_path / "r") == before


@pytest.mark.parametrize("depth", [0, 1, 4])
def test_prefetched_keeps_order_raises_in_place_and_stops_early(depth):
    from megacontext.ingest import prefetched

    assert list(prefetched(iter(range(100)), depth)) == list(range(100))

    def failing():
        yield from range(3)
        raise ValueError("bad byte at offset 7")

    got = []
    with pytest.raises(ValueError, match="bad byte at offset 7"):
        for x in prefetched(failing(), depth):
            got.append(x)
    assert got == [0, 1, 2]  # everything before the error arrives, then the error

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    stream = prefetched(endless(), depth)
    assert [next(stream) for _ in range(5)] == [0, 1, 2, 3, 4]
    stream.close()  # leaving early: the producer stops, at most `depth` + 1 items ahead
    import threading
    assert not any(t.name == "megacontext-prefetch" for t in threading.enumerate())
    assert len(produced) <= 5 + depth + 1
