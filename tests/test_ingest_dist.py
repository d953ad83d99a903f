"""Distributed ingest (megacontext.ingest_dist): shards on 2 and 3 gloo ranks merged into a tree
equal, byte for byte, to a single-process ingest of the same stream; appending; interrupted
ranks and merges resumed; and the torchrun command line."""

from __future__ import annotations

import os
import random
import shutil
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megacontext import ingest_dist
from megacontext.base.loading import load_token_embeddings
from megacontext.gistnet import GistNet, GistNetConfig, gistnet_digest, load_gistnet, save_gistnet
from megacontext.ingest import Ingestor, expand_inputs, ingest
from megacontext.ingest_dist import ShardPlan, distributed_ingest, work_dir
from megacontext.tree import MegaContextTree, verify

LEVELS = 3


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """Inputs of ~21k tokens (byte tokenizer), a perturbed GistNet export."""
    config, tokenizer, embedding = load_token_embeddings(tiny_model_dir)
    root = tmp_path_factory.mktemp("dist")
    docs = root / "docs"
    docs.mkdir()
    rng = random.Random(0)
    for i, n in enumerate((9000, 5000, 7000)):
        (docs / f"d{i}.txt").write_text("".join(rng.choice(string.ascii_letters + " \n")
                                                for _ in range(n)))
    torch.manual_seed(0)
    net = GistNet(GistNetConfig(hidden_size=config.hidden_size, width=16, levels=LEVELS))
    net.set_output_prior(embedding.mean(0))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    export = save_gistnet(net, root / "gistnet", config.fingerprint(tokenizer.sha256))
    return {"model": tiny_model_dir, "docs": docs, "export": export, "config": config,
            "tokenizer": tokenizer, "embedding": embedding}


def new_tree(path: Path, s: dict) -> None:
    c, tok = s["config"], s["tokenizer"]
    MegaContextTree.create(path, hidden_size=c.hidden_size, vocab_size=c.vocab_size,
                           rope=c.rope, fingerprint=c.fingerprint(tok.sha256), levels=LEVELS,
                           gist_dtype="float16",
                           gistnet_digest=gistnet_digest(load_gistnet(s["export"]))).close()


def serial(path: Path, s: dict, inputs: list[Path], prefix: list[Path] = ()) -> None:
    new_tree(path, s)
    with MegaContextTree.open(path, mode="a") as tree:
        for part in (prefix, inputs):
            if part:
                ingest(tree, expand_inputs([str(p) for p in part]), s["tokenizer"],
                       s["embedding"], load_gistnet(s["export"]).eval(),
                       separator=s["tokenizer"].eos_id, commit_every=3000)


def assert_same_tree(a: Path, b: Path) -> None:
    with MegaContextTree.open(a) as x, MegaContextTree.open(b) as y:
        assert x.num_tokens == y.num_tokens > 0
        assert torch.equal(x.tokens(), y.tokens())
        for k in range(1, LEVELS + 1):
            assert x.count(k) == y.count(k)
            gx, gy = x.gists(k), y.gists(k)  # float16 widened exactly: compare the bits
            assert torch.equal(gx.view(torch.int32), gy.view(torch.int32)), f"level {k}"
    assert verify(a) == [] and verify(b) == []


def _rank(rank: int, world: int, rdzv: str, tree: str, s: dict, inputs: list[str],
          shard_level: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    try:
        distributed_ingest(tree, expand_inputs(inputs), s["tokenizer"], s["embedding"],
                           load_gistnet(s["export"]).eval(), shard_level=shard_level,
                           separator=s["tokenizer"].eos_id, commit_every=3000)
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, tree: Path, s: dict, inputs: list[Path], shard_level: int = 1):
    rdzv = tree.parent / f"rdzv-{tree.name}-{world}"
    rdzv.unlink(missing_ok=True)
    mp.spawn(_rank, args=(world, str(rdzv), str(tree), s, [str(p) for p in inputs],
                          shard_level), nprocs=world, join=True)


@pytest.mark.parametrize("world", [2, 3])
def test_shards_merged_equal_a_serial_ingest(setup, tmp_path, world):
    inputs = sorted(setup["docs"].iterdir())
    serial(tmp_path / "serial", setup, inputs)
    new_tree(tmp_path / "dist", setup)
    run_ranks(world, tmp_path / "dist", setup, inputs)
    assert_same_tree(tmp_path / "serial", tmp_path / "dist")
    assert not work_dir(tmp_path / "dist").exists()  # the work folder is removed


def test_appending_to_a_tree_equals_serial_append(setup, tmp_path):
    """The tree already holds 9k tokens (not on a shard boundary): the head up to the first
    boundary is fed serially, then the shards, then the tail."""
    docs = sorted(setup["docs"].iterdir())
    serial(tmp_path / "serial", setup, docs[1:], prefix=docs[:1])
    serial(tmp_path / "dist", setup, [], prefix=docs[:1])
    run_ranks(2, tmp_path / "dist", setup, docs[1:])
    assert_same_tree(tmp_path / "serial", tmp_path / "dist")


def test_plan_covers_the_stream_with_aligned_shards():
    plan = ShardPlan(base=3000, total=20000, size=2048, level=1)
    assert list(plan.shards) == list(range(2, 11))  # [4096, 22528)
    assert plan.serial_parts() == ((3000, 4096), (22528, 23000))
    small = ShardPlan(base=100, total=500, size=2048, level=1)
    assert not small.shards and small.serial_parts() == ((100, 600), (600, 600))


def test_a_stream_shorter_than_a_shard_is_ingested_serially(setup, tmp_path):
    docs = sorted(setup["docs"].iterdir())
    short = tmp_path / "short.txt"
    short.write_text(docs[0].read_text()[:1500])
    serial(tmp_path / "serial", setup, [short])
    new_tree(tmp_path / "dist", setup)
    run_ranks(2, tmp_path / "dist", setup, [short])
    assert_same_tree(tmp_path / "serial", tmp_path / "dist")


class Boom(RuntimeError):
    pass


def _single(tree: Path, s: dict, inputs: list[Path], rdzv: Path, commit_every: int) -> None:
    rdzv.unlink(missing_ok=True)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=0, world_size=1)
    try:
        distributed_ingest(tree, expand_inputs([str(p) for p in inputs]), s["tokenizer"],
                           s["embedding"], load_gistnet(s["export"]).eval(), shard_level=1,
                           separator=s["tokenizer"].eos_id, commit_every=commit_every)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("where", ["shard", "merge"])
def test_an_interrupted_run_resumes_to_the_same_tree(setup, tmp_path, monkeypatch, where):
    """A rank dies in the middle of its 4th shard (after one of its commits: 1,000 of the
    shard's 2,048 tokens are committed), or the merge dies adopting its 4th shard: the trees
    left are sound, and the same command run again finishes the job — equal to a serial
    ingest."""
    inputs = sorted(setup["docs"].iterdir())
    serial(tmp_path / "serial", setup, inputs)
    new_tree(tmp_path / "dist", setup)
    calls = {"n": 0}
    if where == "shard":
        real = ingest_dist.Ingestor.feed

        def feed(self, ids, note=None):
            if "shard-" in str(self.tree.path):
                calls["n"] += 1
                if calls["n"] == 11:  # 3 feeds (1000, 1000, 48) per shard: the 4th's 2nd
                    raise Boom("rank killed")
            return real(self, ids, note)
        monkeypatch.setattr(Ingestor, "feed", feed)
    else:
        real = Ingestor.adopt

        def adopt(self, shard, level, rows=8192):
            calls["n"] += 1
            if calls["n"] == 4:
                raise Boom("merge killed")
            return real(self, shard, level, rows)
        monkeypatch.setattr(Ingestor, "adopt", adopt)
    with pytest.raises(Boom):
        _single(tmp_path / "dist", setup, inputs, tmp_path / "rdzv", commit_every=1000)
    assert verify(tmp_path / "dist") == []
    sizes = []
    for shard in sorted(work_dir(tmp_path / "dist").glob("shard-*")):
        assert verify(shard) == []
        with MegaContextTree.open(shard) as t:
            sizes.append(t.num_tokens)
    if where == "shard":
        assert sizes == [2048, 2048, 2048, 1000]  # the 4th left half done
    else:
        assert len(sizes) >= 4 and set(sizes) == {2048}
    monkeypatch.undo()
    _single(tmp_path / "dist", setup, inputs, tmp_path / "rdzv", commit_every=1000)
    assert_same_tree(tmp_path / "serial", tmp_path / "dist")


def test_torchrun_command_line_equals_the_serial_command(setup, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    inputs = [str(p) for p in sorted(setup["docs"].iterdir())]
    flags = ["--model", str(setup["model"]), "--gistnet", str(setup["export"]), "--levels",
             str(LEVELS), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "megacontext.cli", "ingest", str(tmp_path / "a"),
                    *inputs, *flags], check=True, env=env, capture_output=True)
    out = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m",
                          "megacontext.cli", "ingest", str(tmp_path / "b"), *inputs, *flags,
                          "--shard-level", "1"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[2 ranks]" in out.stdout
    assert_same_tree(tmp_path / "a", tmp_path / "b")


def test_distributed_ingest_records_its_inputs_and_skips_them_next_time(setup, tmp_path):
    """The records match a serial ingest's (paths, sizes, digests, token ranges); running the
    same distributed ingest again appends nothing."""
    inputs = sorted(setup["docs"].iterdir())
    serial(tmp_path / "serial", setup, inputs)
    new_tree(tmp_path / "dist", setup)
    run_ranks(2, tmp_path / "dist", setup, inputs)
    run_ranks(2, tmp_path / "dist", setup, inputs)
    assert_same_tree(tmp_path / "serial", tmp_path / "dist")

    def fields(path):
        with MegaContextTree.open(path) as t:
            return [(r["path"], r["size"], r["sha256"], r["tokens"]) for r in t.inputs()]
    got = fields(tmp_path / "dist")
    assert got == fields(tmp_path / "serial") and len(got) == len(inputs)
    assert got[-1][3][1] == 9000 + 5000 + 7000 + 2  # two separators between three documents


def test_a_work_folder_left_after_the_final_commit_is_removed_by_the_rerun(setup, tmp_path):
    """A run killed between the merge's final commit and the removal of its work folder:
    the same command again finds every input held, appends nothing and removes the folder."""
    inputs = sorted(setup["docs"].iterdir())
    new_tree(tmp_path / "dist", setup)
    _single(tmp_path / "dist", setup, inputs, tmp_path / "rdzv", commit_every=3000)
    before = {p.name: p.read_bytes() for p in (tmp_path / "dist").iterdir()}
    work = work_dir(tmp_path / "dist")
    (work / "shard-00000000").mkdir(parents=True)
    (work / "tokens.bin").write_bytes(b"\0" * 64)
    _single(tmp_path / "dist", setup, inputs, tmp_path / "rdzv", commit_every=3000)
    assert not work.exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "dist").iterdir()} == before
