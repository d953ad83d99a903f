"""Memories of N tokens (10^6 … 10^9): build one from a real corpus stream, then use it.

:func:`run_scale` (``python eval/scale.py``, ``configs/scale.yaml``):

1. **Build.** The documents of a corpus back to back (end-of-text between them), cycled with a
   fresh shuffle of the document order per cycle (:func:`corpus_stream`), with needles — a
   5-digit value in the passkey wording — planted at chosen distances from the end
   (:func:`plant`), through the real GistNet into a tree in ``<run>/tree``, in chunks, with a
   progress bar and ETA. Resumable: a rerun skips the tokens the tree has committed (the
   stream is a deterministic function of the seed).
2. **Measure** (``scale.json``, ``scale.md``, ``scale.png``): tokens/s per chunk (median) and
   overall, bytes per token per level and in all, peak RSS of the process; refocus latency
   at the end of the memory per scorer (median of ``repeats`` incremental refocuses); for each
   needle, that its stored token span is exactly what was planted, and (``answer: true``)
   whether the model, reading the allocator's working context of the whole memory plus the
   question, answers with the value; the far-end position check — the same raw window's
   logits placed at the start and at the end of the memory (max abs difference).
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megacontext.allocator import FocusAllocator, Query
from megacontext.base.cache import KVCache
from megacontext.data import TokenCorpus
from megacontext.data.needles import answer_is
from megacontext.ingest import Ingestor
from megacontext.rope import RopeConfig
from megacontext.tree import MegaContextTree
from megacontext.working_context import materialize


@dataclass(frozen=True)
class Needle:
    """A fact planted ``depth`` tokens before the end of the memory."""

    depth: int
    key: str
    ids: np.ndarray  # the needle's token ids
    question: str = ""  # asks for this needle's value (each needle is numbered)

    def start(self, total: int) -> int:
        return total - self.depth


def wordings(templates: Any) -> list[str]:
    """One ``str.format`` template or a list of them (the i-th needle takes the
    ``(i - 1) % len``-th: distinct wordings keep like needles apart)."""
    out = [templates] if isinstance(templates, str) else [str(t) for t in templates]
    if not out:
        raise ValueError("needles.needle / needles.question: give at least one template")
    return out


def corpus_stream(corpus: TokenCorpus, docs: np.ndarray, seed: int,
                  separator: int | None) -> Iterator[np.ndarray]:
    """Documents ``docs`` back to back, ``separator`` between them, forever: cycle ``c``
    takes them in the order of ``default_rng([seed, c]).permutation``."""
    if len(docs) == 0:
        raise ValueError("the scale stream needs at least one document")
    cycle = 0
    while True:
        for d in np.random.default_rng([seed, cycle]).permutation(np.asarray(docs)):
            ids = np.asarray(corpus.doc(int(d)), dtype=np.int64)
            yield ids if separator is None else np.append(ids, separator)
        cycle += 1


def plant(stream: Iterator[np.ndarray], total: int, needles: list[Needle]) -> Iterator[np.ndarray]:
    """The first ``total`` tokens of ``stream`` with each needle's ids inserted so that it
    starts exactly at ``total − depth`` (the stream's tokens shift right around them)."""
    at = sorted(((n.start(total), n.ids) for n in needles), key=lambda x: x[0])
    for (a, ids), (b, _) in zip(at, at[1:], strict=False):
        if a + ids.size > b:
            raise ValueError(f"needles at tokens {a} and {b} overlap")
    if at and (at[0][0] < 0 or at[-1][0] + at[-1][1].size > total):
        raise ValueError(f"needle depths must lie in [needle length, {total}]")
    pos = 0
    for piece in stream:
        while piece.size and pos < total:
            if at and at[0][0] == pos:
                ids = at.pop(0)[1]
                yield ids
                pos += ids.size
                continue
            cut = min(piece.size, total - pos, (at[0][0] - pos) if at else piece.size)
            yield piece[:cut]
            pos, piece = pos + cut, piece[cut:]
        if pos >= total:
            return


def skip(stream: Iterator[np.ndarray], n: int) -> Iterator[np.ndarray]:
    """``stream`` without its first ``n`` tokens."""
    for piece in stream:
        if n >= piece.size:
            n -= piece.size
            continue
        yield piece[n:]
        n = 0


def peak_rss_mib() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(tree: MegaContextTree, stream: Iterator[np.ndarray], ingestor: Ingestor, total: int,
          chunk_tokens: int, progress=None) -> list[tuple[int, float]]:
    """Feed ``stream`` (already past the committed tokens) until the tree holds ``total``;
    commit after each chunk. Returns ``(tokens, seconds)`` per chunk."""
    chunks, buf, have = [], [], 0
    t0 = time.perf_counter()
    for piece in stream:
        buf.append(piece)
        have += piece.size
        if have >= chunk_tokens or tree.appended_count(0) + have >= total:
            ingestor.feed(np.concatenate(buf))
            ingestor.commit()
            t1 = time.perf_counter()
            chunks.append((have, t1 - t0))
            if progress is not None:
                progress(have)
            buf, have, t0 = [], 0, t1
    if buf:
        ingestor.feed(np.concatenate(buf))
        ingestor.commit()
        chunks.append((have, time.perf_counter() - t0))
    return chunks


def refocus_latency(tree: MegaContextTree, scorer: str, budget: int, repeats: int,
                    query: Query | None, options: dict) -> dict:
    """Median ms of incremental refocuses at the end of the memory (the cursor starts
    ``32 · (repeats + 1)`` tokens before the end and moves forward 32 tokens per step, so the
    tree needs no growth), and the from-scratch one."""
    alloc = FocusAllocator(budget, scorer=scorer, scorer_options=options)
    cursor = tree.num_tokens - 32 * (repeats + 1)
    t0 = time.perf_counter()
    wc = alloc.assemble(tree, cursor, query)
    scratch = time.perf_counter() - t0
    times, read = [], []
    for _ in range(repeats):
        cursor += 32
        t0 = time.perf_counter()
        wc = alloc.assemble(tree, cursor, query, previous=wc)
        times.append(time.perf_counter() - t0)
        read.append(alloc.last_stats.nodes_read)
    return {"scorer": scorer, "budget": budget, "median_ms": 1e3 * statistics.median(times),
            "scratch_ms": 1e3 * scratch, "nodes_read": max(read), "entries": len(wc)}


@torch.inference_mode()
def answer(lm, tree: MegaContextTree, question: np.ndarray, alloc: FocusAllocator,
           max_new_tokens: int, query, rope: RopeConfig, lane=None, positions=None):
    """Greedy answer to ``question`` after the allocator's working context of the whole
    memory, read with ``rope`` (``auto``: resolved from the context's extent, as the runtime
    does), at the read-time ``positions`` rule (``exact`` when None; ``compact`` keeps the
    whole context inside the trained length) and the gists through ``lane`` (a GistNet's gist
    lane) when given; the question follows the context's last position. The tree is not
    modified. Returns ``(answer text, working context)``."""
    wc = alloc.assemble(tree, tree.num_tokens, query)
    m = materialize(wc, tree, lambda ids: lm.embed(ids[None])[0], rope=rope,
                    max_position=lm.config.max_position, positions=positions)
    cache = KVCache()
    q = torch.as_tensor(question)[None]
    emb = torch.cat([m.embeddings.float(), lm.embed(q)[0].float()])[None]
    first = float(m.next_position)
    pos = torch.cat([m.positions, first + torch.arange(q.shape[1], dtype=torch.float64)])
    bound = None if lane is None else lane.at(
        torch.cat([m.gist_rows, torch.zeros(q.shape[1], dtype=torch.bool)]))
    logits = lm(emb, pos, rope=m.rope, num_logits=1, cache=cache, lane=bound)[0, -1]
    out, p = [], first + q.shape[1]
    for step in range(max_new_tokens):
        token = int(logits.argmax())
        out.append(token)
        logits = lm(lm.embed(torch.tensor([[token]])),
                    torch.tensor([float(p + step)], dtype=torch.float64), rope=m.rope,
                    num_logits=1, cache=cache)[0, -1]
    return lm.tokenizer.decode(out), wc


@torch.inference_mode()
def far_end_check(lm, tree: MegaContextTree, window: int = 256) -> float:
    """Max abs difference of the logits of the memory's last ``window`` tokens placed at
    positions ``0 …`` and at their own positions near the end."""
    ids = tree.tokens(tree.num_tokens - window, tree.num_tokens)[None]
    emb = lm.embed(ids)
    near = lm(emb, torch.arange(window, dtype=torch.int64))
    far = lm(emb, torch.arange(tree.num_tokens - window, tree.num_tokens, dtype=torch.int64))
    return float((near - far).abs().max())


def summary_markdown(r: dict) -> str:
    untrained = ", ".join(map(str, r.get("untrained_levels") or []))
    lines = [f"# Memory of {r['tokens']:,} tokens", "",
             f"- levels {r['levels']}, gists {r['gist_dtype']}, GistNet `{r['compressor']}`"
             f" (untrained levels: {untrained or 'none'})",
             f"- ingest: {r['tokens_per_second']:,.0f} tokens/s overall, median "
             f"{r['tokens_per_second_median_chunk']:,.0f} over {r['chunks']} chunks "
             f"(this run: {r['built_tokens']:,} tokens in {r['build_seconds']:.1f} s)",
             f"- bytes per token: {r['bytes_per_token']:.1f} ("
             + ", ".join(f"L{k} {v:.2f}" for k, v in r['bytes_per_token_by_level'].items()) + ")",
             f"- peak RSS {r['peak_rss_mib']:.0f} MiB",
             f"- far-end check: max |logits(start) − logits(end)| = {r['far_end_max_abs']:.2e}",
             "", "| scorer | budget | refocus median ms | from scratch ms | nodes read |",
             "|---|---:|---:|---:|---:|"]
    for x in r["refocus"]:
        lines.append(f"| {x['scorer']} | {x['budget']} | {x['median_ms']:.2f} | "
                     f"{x['scratch_ms']:.2f} | {x['nodes_read']} |")
    lines += ["", "| needle depth (tokens from the end) | stored span exact | answer | correct |"
              " needle level in context |", "|---:|---|---|---|---:|"]
    for n in r["needles"]:
        lines.append(f"| {n['depth']:,} | {n['stored_exact']} | {n.get('answer', '')!r} | "
                     f"{n.get('correct', '')} | {n.get('level_in_context', '')} |")
    return "\n".join(lines) + "\n"


def _finite(x):
    """``x`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(_finite(obj), indent=2))




def run_scale(cfg) -> dict:
    """Build (or resume) the memory ``cfg`` describes, measure it, write the reports."""
    from tqdm import tqdm

    from megacontext.allocator import load_lens
    from megacontext.base import BaseLM
    from megacontext.data import load_corpus
    from megacontext.dtypes import TORCH_DTYPES
    from megacontext.evaluation.evaluate import load_compressor
    from megacontext.evaluation.substitutability import variant_rope
    from megacontext.gistnet import gistnet_digest, lane_of, untrained_levels
    from megacontext.positions import PositionRule
    from megacontext.spans import node_size
    from megacontext.tree.lexicon import build_lexicon

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = int(float(cfg.tokens))
    levels = int(cfg.levels) if cfg.get("levels") else max(
        2, next(k for k in range(1, 12) if total // node_size(k) < 32))
    lm = BaseLM.load(cfg.model.name, dtype=TORCH_DTYPES[cfg.model.dtype])
    compressor = load_compressor(cfg.compressor, lm, levels,
                                 untrained_upper=cfg.get("upper_levels", "error") == "untrained")
    digest = gistnet_digest(compressor)
    untrained = untrained_levels(getattr(compressor, "gistnet", compressor),
                                 range(1, levels + 1))
    corpus = load_corpus(cfg.corpus, lm.tokenizer, progress=False)
    docs = np.arange(corpus.num_docs) if cfg.split == "all" else \
        corpus.split(cfg.val_fraction, cfg.seed, cfg.test_fraction).train
    tok = lm.tokenizer
    rng = np.random.default_rng(cfg.seed)
    needles = []
    needle_of, question_of = wordings(cfg.needles.needle), wordings(cfg.needles.question)
    if len(needle_of) != len(question_of):
        raise ValueError(f"needles.needle has {len(needle_of)} wordings and needles.question "
                         f"{len(question_of)}: give one question per needle wording")
    for i, depth in enumerate(cfg.needles.depths, 1):
        key = str(int(rng.integers(10 ** 4, 10 ** 5)))
        w = (i - 1) % len(needle_of)
        ids = np.asarray(tok.encode(needle_of[w].format(key=key, i=i)), dtype=np.int64)
        if ids.size <= int(depth) <= total:
            needles.append(Needle(int(depth), key, ids, question_of[w].format(i=i)))
    path = out / "tree"
    settings = {"tokens": total, "levels": levels, "gist_dtype": str(cfg.gist_dtype),
                "compressor_digest": digest, "corpus": corpus.name, "split": str(cfg.split),
                "fractions": [cfg.val_fraction, cfg.test_fraction], "seed": int(cfg.seed),
                "needles": [[n.depth, n.key, n.ids.tolist()] for n in needles]}
    recorded = out / "build.json"
    if (path / "header.json").is_file():
        before = json.loads(recorded.read_text()) if recorded.is_file() else {}
        wrong = [f"{k}: the tree has {before.get(k)!r}, this run asks {v!r}"
                 for k, v in settings.items() if before.get(k) != v]
        if wrong:
            raise ValueError(f"{path} was built with other settings; resume it with the same "
                             f"ones or use another output directory: " + "; ".join(wrong))
    else:
        recorded.write_text(json.dumps(settings))
    if (path / "header.json").is_file():
        tree = MegaContextTree.open(path, mode="a", expect_fingerprint=lm.fingerprint,
                                    expect_gistnet_digest=digest)
    else:
        tree = MegaContextTree.create(path, hidden_size=lm.config.hidden_size,
                                      vocab_size=lm.config.vocab_size, rope=lm.config.rope,
                                      fingerprint=lm.fingerprint, levels=levels,
                                      gist_dtype=cfg.gist_dtype, gistnet_digest=digest)
    with tree:
        if tree.num_tokens > total:
            raise ValueError(f"{path} holds {tree.num_tokens:,} tokens, more than tokens="
                             f"{total:,}: use another output directory")
        resumed = tree.num_tokens
        stream = skip(plant(corpus_stream(corpus, docs, cfg.seed, tok.eos_id), total, needles),
                      resumed)
        ingestor = Ingestor(tree, lm.model.embed_tokens.weight.detach().float(), compressor,
                            commit_every=1 << 62)
        t0 = time.perf_counter()
        with tqdm(total=total, initial=resumed, unit="tok", unit_scale=True, desc="build",
                  disable=not cfg.progress_bar, dynamic_ncols=True) as bar:
            chunks = build(tree, stream, ingestor, total, int(cfg.chunk_tokens), bar.update)
        seconds = time.perf_counter() - t0
        built = sum(n for n, _ in chunks)
        lens = None
        if cfg.get("lens"):
            # A lens trained on the GistNet before untrained levels were added (upper_levels)
            # is checked against that one; the trained levels' gists are the same, so it then
            # serves this tree, whose digest is the extended GistNet's.
            net = getattr(compressor, "gistnet", compressor)
            lens = load_lens(cfg.lens, lm.fingerprint, getattr(net, "extended_from", digest))
            lens.gistnet_digest = digest

        def query_of(text: str) -> tuple[np.ndarray, Query]:
            ids = np.asarray(tok.encode(text), dtype=np.int64)
            return ids, Query(ids=ids, embeddings=lm.embed(torch.as_tensor(ids)[None])[0].float())

        index = None
        if cfg.get("lexicon", False):  # the token index the lexical scorer reads (bounded refocus)
            t1 = time.perf_counter()
            lex = build_lexicon(tree, progress=bool(cfg.progress_bar))
            index = {"seconds": time.perf_counter() - t1, "spans": lex.spans,
                     "bytes": lex.nbytes()}
        _, q_first = query_of(question_of[0].format(i=1))
        refocus = [refocus_latency(tree, s, int(cfg.refocus.budget), int(cfg.refocus.repeats),
                                   None if s == "recency" else q_first,
                                   {"lens": lens} if s == "lens" else {})
                   for s in cfg.refocus.scorers]
        rows = []
        rule = PositionRule.of(cfg.get("positions", "exact"))
        rope = variant_rope(lm.config.rope, {"scaling": "auto"}, lm.config.max_position)
        for n in needles:
            start = n.start(total)
            stored = tree.tokens(start, start + n.ids.size).numpy()
            row = {"depth": n.depth, "start": start, "key": n.key, "question": n.question,
                   "stored_exact": bool(np.array_equal(stored, n.ids))}
            if cfg.answer:
                alloc = FocusAllocator(int(cfg.refocus.budget), scorer=cfg.answer_scorer,
                                       scorer_options={"lens": lens} if lens else {})
                question, query = query_of(n.question)
                text, wc = answer(lm, tree, question, alloc, 8,
                                  None if cfg.answer_scorer == "recency" else query, rope,
                                  lane_of(compressor), positions=rule)
                j = int(np.searchsorted(wc.starts, start, side="right")) - 1
                row.update(answer=text, correct=answer_is(text, n.key),
                           level_in_context=int(wc.levels[j]))
            rows.append(row)
        per_chunk = [n / s for n, s in chunks if s > 0]
        result = {
            "tokens": total, "levels": levels, "gist_dtype": tree.gist_dtype,
            "compressor": str(cfg.compressor), "compressor_digest": digest,
            "untrained_levels": untrained, "corpus": corpus.name, "built_tokens": built,
            "resumed_from": resumed,
            "build_seconds": seconds, "chunks": len(chunks),
            "tokens_per_second": built / max(seconds, 1e-9),
            "tokens_per_second_median_chunk": statistics.median(per_chunk) if per_chunk else 0.0,
            "bytes_total": tree.nbytes(), "bytes_per_token": tree.nbytes() / total,
            "bytes_per_token_by_level": {k: tree.nbytes(k) / total
                                         for k in range(tree.levels + 1)},
            "counts": [tree.count(k) for k in range(tree.levels + 1)],
            "peak_rss_mib": peak_rss_mib(), "refocus": refocus, "needles": rows,
            "answer_scorer": cfg.answer_scorer if cfg.answer else None,
            "positions": rule.as_dict(), "lexicon": index,
            "far_end_max_abs": far_end_check(lm, tree) if total >= 256 else None,
            "chunk_rates": per_chunk,
        }
    write_json(out / "scale.json", result)
    (out / "scale.md").write_text(summary_markdown(result))
    if cfg.get("plots", True):
        plot(result, out / "scale.png")
    return result


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(np.arange(1, len(r["chunk_rates"]) + 1), r["chunk_rates"], "o-", ms=3)
    a.axhline(r["tokens_per_second_median_chunk"], ls="--", color="k", alpha=0.5,
              label=f"median {r['tokens_per_second_median_chunk']:,.0f}")
    a.set(title=f"ingest of {r['tokens']:,} tokens", xlabel="chunk", ylabel="tokens / s")
    a.legend()
    names = [x["scorer"] for x in r["refocus"]]
    b.bar(names, [x["median_ms"] for x in r["refocus"]])
    b.set(title=f"refocus at the end (budget {r['refocus'][0]['budget'] if names else '-'})",
          ylabel="median ms")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["Needle", "answer", "build", "corpus_stream", "far_end_check", "peak_rss_mib",
           "plant", "refocus_latency", "run_scale", "skip", "summary_markdown"]
