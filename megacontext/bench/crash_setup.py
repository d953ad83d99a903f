"""What the kill campaign (``megacontext.bench.crash``) works on and how it looks at a tree.

The setup is a small random base model whose tokenizer is a byte-level BPE trained on the
campaign's own text (merges and a word-splitting pre-tokenizer, so an ingest that cut the text
in the wrong place would store other ids than a one-shot ``encode``), a GistNet export for it,
and text files of random words (ASCII letters, runs of spaces, newlines, a few multi-byte
characters). The checks read a tree as the product does (``megacontext.tree``) and compare it
with the one-shot tokenization of the whole input.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import string
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TREE_FILES = (".tokens", ".gists", ".meta", ".crc32")
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Setup:
    root: Path
    model: Path
    gistnet: Path
    inputs: list[Path]
    stream: np.ndarray  # the one-shot tokenization of the inputs (documents joined by eos)
    merge_inputs: list[Path]
    merge_stream: np.ndarray
    levels: int = 2
    commit_every: int = 65536


def random_text(n: int, rng: random.Random) -> str:
    """``n`` characters: ASCII letters, spaces (runs of them), newlines and a few multi-byte
    characters, which a byte-level BPE splits into several tokens."""
    alphabet = string.ascii_letters + " " * 8 + "\n" + "é✓"
    return "".join(rng.choices(alphabet, k=n))


def doc_sizes(chars: int, rng: random.Random, mean: int = 100_000,
              first: int = 0) -> list[int]:
    """Sizes of documents of about ``mean`` characters (0.5x to 1.5x) summing to ``chars``,
    after one of ``first`` (when given): an ingest commits at document ends (and every
    ``--commit-every`` tokens of a long one), so kills find trees at many committed counts."""
    sizes = [first] if first else []
    while chars - sum(sizes) > 1.5 * mean:
        sizes.append(rng.randint(mean // 2, 3 * mean // 2))
    return sizes + ([chars - sum(sizes)] if chars > sum(sizes) else [])


def write_model(directory: Path, sample: str, vocab_size: int = 512, seed: int = 0) -> Path:
    """A random llama model directory (``megacontext.base.tiny``'s architecture) whose
    tokenizer is a byte-level BPE of ``vocab_size`` ids trained on ``sample``, then ``<eos>``."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megacontext.base.tiny import tiny_config, tiny_weights

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # splits words
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([sample], trainer=trainer)
    tok.save(str(directory / "tokenizer.json"))
    config = tiny_config(vocab_size=tok.get_vocab_size(), name="crash-bpe")
    hf = config.to_hf() | {"eos_token_id": tok.token_to_id("<eos>")}
    (directory / "config.json").write_text(json.dumps(hf, indent=2))
    state = {k: v.contiguous() for k, v in tiny_weights(config, seed).items()}
    save_file(state, str(directory / "model.safetensors"))
    return directory


def make_setup(root: Path, chars: int, merge_chars: int, seed: int) -> Setup:
    """The model, the GistNet and two sets of text files (``chars`` characters for the serial
    ingest, ``merge_chars`` for the distributed one) under ``root``, with their one-shot
    tokenizations."""
    import torch

    from megacontext.base.loading import load_token_embeddings
    from megacontext.gistnet import GistNet, GistNetConfig, save_gistnet

    rng = random.Random(seed)
    model = write_model(root / "model", random_text(200_000, rng), seed=seed)
    config, tokenizer, embedding = load_token_embeddings(model)
    torch.manual_seed(seed)
    net = GistNet(GistNetConfig(hidden_size=config.hidden_size, width=16, levels=2))
    net.set_output_prior(embedding.mean(0))
    with torch.no_grad():  # away from the constant initial output: gists differ per span
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    gistnet = save_gistnet(net, root / "gistnet", config.fingerprint(tokenizer.sha256))

    def files(name: str, sizes: list[int]) -> tuple[list[Path], np.ndarray]:
        paths, ids = [], []
        for i, n in enumerate(sizes):
            path = root / f"{name}{i}.txt"
            path.write_text(random_text(n, rng), encoding="utf-8")
            if ids:
                ids.append([tokenizer.eos_id])
            ids.append(tokenizer.encode(path.read_text(encoding="utf-8")))  # one shot
            paths.append(path)
        return paths, np.concatenate([np.asarray(x, dtype=np.int64) for x in ids])

    # The first document longer than ingest's 1 MiB reads: it is read in several pieces and
    # cut where its tokens cannot change.
    inputs, stream = files("ingest", doc_sizes(chars, rng, first=min(int(0.7 * chars),
                                                                     1_300_000)))
    merge_inputs, merge_stream = files("merge", doc_sizes(merge_chars, rng, mean=20_000))
    return Setup(root, model, gistnet, inputs, stream, merge_inputs, merge_stream)


# -- running the command -------------------------------------------------------------------

def env() -> dict:
    # One torch thread per process: the machine is shared, and the bits do not depend on it.
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def ingest_cmd(s: Setup, tree: Path, inputs: list[Path], *extra: str) -> list[str]:
    return [sys.executable, "-m", "megacontext.cli", "ingest", str(tree), *map(str, inputs),
            "--model", str(s.model), "--gistnet", str(s.gistnet), "--levels", str(s.levels),
            "--commit-every", str(s.commit_every), "--quiet", *extra]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=REPO, **kw)


def verify_ok(path: Path) -> bool:
    """``megacontext verify`` itself (the command's exit status)."""
    return run([sys.executable, "-m", "megacontext.cli", "verify", str(path)]).returncode == 0


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (torchrun starts its ranks in sessions of their own,
    so killing its process group would miss them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and all its descendants (as a machine crash would): the children are
    listed first and stopped (SIGSTOP), so none can react to its parent's death, then all are
    killed."""
    pids = [proc.pid, *descendants(proc.pid)]
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    proc.wait()
    for pid in pids[1:]:  # reap nothing (not ours), but wait until they are gone
        while Path(f"/proc/{pid}").exists() and _state(pid) not in ("Z", "X", None):
            time.sleep(0.001)


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


# -- looking at a tree ---------------------------------------------------------------------

@dataclass
class TreeState:
    exists: bool
    tokens: int = 0
    problems: list[str] = field(default_factory=list)
    prefix: bool = False  # committed ids are the stream's first ``tokens`` and levels complete
    done: bool = False  # its ingest note says the stream finished


def tree_state(path: Path, stream: np.ndarray) -> TreeState:
    """What a kill left: whether a tree exists, ``verify``'s problems, and whether its
    committed ids are a prefix of ``stream`` with every gist level complete for them."""
    from megacontext.tree import MegaContextTree, verify

    if not (path / "header.json").is_file():
        return TreeState(False)
    problems = verify(path)
    if problems:
        return TreeState(True, committed_tokens(path), problems)
    with MegaContextTree.open(path) as tree:
        n = tree.num_tokens
        ids = tree.tokens(0, n).numpy()
        levels_ok = all(tree.count(k) == n // tree.span ** k for k in range(1, tree.levels + 1))
        note = (tree.header.get("extra") or {}).get("ingest") or {}
    prefix = n <= stream.size and np.array_equal(ids, stream[:n]) and levels_ok
    return TreeState(True, n, problems, prefix, bool(note.get("done")))


def lost_and_duplicated(path: Path, stream: np.ndarray) -> tuple[int, int]:
    """Tokens of the one-shot stream missing from the tree, and tokens it holds beyond them
    (a position whose id differs counts as one of each)."""
    ids = tokens_of(path)
    m = min(ids.size, stream.size)
    wrong = int(np.count_nonzero(ids[:m] != stream[:m]))
    return max(0, stream.size - ids.size) + wrong, max(0, ids.size - stream.size) + wrong


def tokens_of(path: Path) -> np.ndarray:
    from megacontext.tree import MegaContextTree

    with MegaContextTree.open(path) as tree:
        return tree.tokens(0, tree.num_tokens).numpy()


def records_of(path: Path) -> list[dict]:
    """The tree's input records without their times (which differ from run to run)."""
    from megacontext.tree import MegaContextTree

    with MegaContextTree.open(path) as tree:
        return [{k: v for k, v in r.items() if k != "ingested"} for r in tree.inputs()]


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.suffix in TREE_FILES}


def same_bytes(a: Path, b: Path) -> bool:
    """Every data, metadata and checksum file of the two trees equal byte for byte."""
    return tree_bytes(a) == tree_bytes(b)


def committed_tokens(tree: Path) -> int:
    """The header's committed token count, -1 when there is no readable header."""
    try:
        return json.loads((tree / "header.json").read_text())["counts"][0]
    except (OSError, ValueError, KeyError):
        return -1
