"""Passkey retrieval from memory: can the model find a 5-digit key in a long memory?

The protocol follows the passkey test of Mohtashami & Jaggi (2023, "Landmark attention"), with
filler drawn from held-out corpus documents instead of a repeated sentence:

    <intro> <filler …> <needle: "The pass key is 12345. Remember it. 12345 is the pass key.">
    <filler …>                                   (``length`` tokens in all)
    question: "What is the pass key? The pass key is"   → greedy answer, first number == key?

The intro, needle and question are ``passkey.intro``/``needle``/``question`` in the config
(:class:`PasskeyConfig`, ``str.format`` templates; the needle's ``{key}`` is the key); the
wording above is the default.

The needle's first token sits at ``intro + depth · (length − intro − needle)``. Conditions:

- ``memory``: the runtime loop (:class:`megacontext.runtime.MemoryLM`): the text goes into a
  memory tree, the allocator assembles a working context of at most ``budget`` entries (the
  question's token embeddings are the query: ``similarity`` reads their mean, ``lens`` each),
  and the model answers from it;
- ``streaming``: StreamingLLM at the memory's budget: the first ``sink_tokens`` tokens + the
  most recent ones of memory + question, ``budget`` in all, at consecutive positions (cache
  ranks) under the model's own RoPE;
- ``truncated``: the last ``budget`` tokens of memory + question, nothing else, at their true
  positions (what a plain model with a ``budget``-token window sees);
- ``full`` (optional, lengths within the trained length only): every token.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch

from megacontext.allocator import FocusAllocator
from megacontext.base.model import KVCache
from megacontext.data import TokenCorpus
from megacontext.data.needles import answer_is, filler_stream, make_example
from megacontext.evaluation.config import MemoryConfig, PasskeyConfig
from megacontext.evaluation.substitutability import variant_rope
from megacontext.gistnet import gistnet_digest

__all__ = ["answer_is", "filler_stream", "greedy", "make_example", "run_passkey",
           "streaming_tokens"]

# The default templates (PasskeyConfig's defaults: one wording, defined there).
INTRO: str = PasskeyConfig.intro
NEEDLE: str = PasskeyConfig.needle
QUESTION: str = PasskeyConfig.question


@torch.inference_mode()
def greedy(lm, ids: np.ndarray, first_position: int, max_new_tokens: int,
           stop: tuple[int, ...] = (), rope=None) -> list[int]:
    """Greedy continuation of ``ids`` placed at positions ``first_position …`` (KV-cached),
    rotated by ``rope`` (a concrete ``RopeConfig``; default the model's own)."""
    cache = KVCache()
    x = torch.as_tensor(ids, dtype=torch.int64)[None]  # [1, n]
    positions = torch.arange(first_position, first_position + x.shape[1])
    logits = lm(lm.embed(x), positions, rope=rope, num_logits=1, cache=cache)[0, -1]
    out: list[int] = []
    for step in range(max_new_tokens):
        token = int(logits.argmax())
        out.append(token)
        if token in stop:
            break
        p = torch.tensor([first_position + x.shape[1] + step])
        logits = lm(lm.embed(torch.tensor([[token]])), p, rope=rope, num_logits=1,
                    cache=cache)[0, -1]
    return out


def streaming_tokens(seen: np.ndarray, budget: int, sink_tokens: int) -> np.ndarray:
    """StreamingLLM's cache of ``budget`` entries over ``seen``: its first ``sink_tokens``
    tokens and the most recent rest (everything when it fits)."""
    if seen.size <= budget:
        return seen
    sinks = min(sink_tokens, budget)
    return np.concatenate([seen[:sinks], seen[seen.size - (budget - sinks):]])


def _entry_level(wc, token: int) -> int | None:
    if wc is None:
        return None
    j = int(np.searchsorted(wc.starts, token, side="right")) - 1
    return int(wc.levels[j]) if 0 <= j < len(wc) else None


def run_passkey(lm, compressor, corpus: TokenCorpus, docs: np.ndarray, cfg: PasskeyConfig, *,
                allocator: Callable[[], FocusAllocator], memory: MemoryConfig, seed: int,
                progress: Callable[[str], None] | None = None,
                progress_bar: bool = True, sink_tokens: int = 4) -> dict:
    """Accuracy by memory length × depth under each condition (JSON-ready).

    Args:
        docs: the held-out documents the filler is drawn from.
        allocator: makes a fresh allocator per trial (its budget is also the truncation
            baseline's window).
        memory: the runtime's settings.
        progress: called with one line per trial (e.g. ``log.info``).
        progress_bar: show a tqdm bar over the trials on stderr (log records are routed
            through it meanwhile so they do not break it).
        sink_tokens: first tokens the ``streaming`` condition keeps.

    Returns:
        ``lengths``, ``depths``, the settings, ``templates`` (intro, needle, question),
        ``full_max_length`` (the longest memory answered with the full context),
        ``key_raw_in_memory_context`` (length × depth), ``examples`` (one row per trial: key,
        needle position, per condition the answer text, its token ids and whether it is
        correct) and per condition ``accuracy`` (length × depth, ``None`` where not run),
        ``accuracy_by_length``, ``accuracy_by_depth``, ``mean_accuracy``, ``num_answered``.

    Deterministic for ``seed``: each (length, depth, trial) draws its key and filler offset
    from ``default_rng([seed, i_length, i_depth, trial])``.
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from megacontext.runtime import MemoryLM  # the runtime joins everything: import on use

    tok = lm.tokenizer
    filler = filler_stream(corpus, docs)
    question = np.asarray(tok.encode(cfg.question.format()), dtype=np.int64)
    stop = tuple(t for t in (tok.eos_id,) if t is not None)
    conditions = ["memory", "streaming", "truncated"] + (["full"] if cfg.full_context else [])
    shape = (len(cfg.lengths), len(cfg.depths))
    # Per cell, the correct/answered counts of each condition.
    right = {c: np.zeros(shape, dtype=np.int64) for c in conditions}
    asked = {c: np.zeros(shape, dtype=np.int64) for c in conditions}
    key_raw = np.full(shape, np.nan)
    # The full context answers while memory + question + answer fit the trained length.
    full_max = lm.config.max_position - question.size - cfg.max_new_tokens
    examples = []
    digest = gistnet_digest(compressor)
    budget = allocator().budget
    # Memories longer than the trained length: an NTK factor resolved at each refocus from
    # the working context's extent (a power of two; 1 within the trained length).
    # (A rule other than exact keeps the context inside the trained length: auto resolves 1.)
    rope = None if memory.rope_scaling == "none" else variant_rope(
        lm.config.rope, {"scaling": "auto"}, lm.config.max_position)
    total = len(cfg.lengths) * len(cfg.depths) * cfg.trials
    bar = tqdm(total=total, desc="passkey", unit="key", disable=not progress_bar,
               dynamic_ncols=True)
    with bar, (logging_redirect_tqdm() if progress_bar else nullcontext()):
        for i, length in enumerate(cfg.lengths):
            for j, depth in enumerate(cfg.depths):
                raw = []
                for trial in range(cfg.trials):
                    rng = np.random.default_rng([seed, i, j, trial])
                    key = str(int(rng.integers(10 ** (cfg.digits - 1), 10**cfg.digits)))
                    ids, start = make_example(tok, filler, length, depth, key,
                                              int(rng.integers(0, filler.size)),
                                              intro=cfg.intro, needle=cfg.needle)
                    answers = {}
                    with MemoryLM(lm, compressor, allocator(), levels=memory.levels,
                                  gist_dtype=memory.gist_dtype,
                                  refocus_every=memory.refocus_every,
                                  gist_rope=memory.gist_rope, gistnet_digest=digest,
                                  rope=rope, positions=memory.positions) as mem:
                        mem.feed(ids)
                        # The question is the query (scorers that need none ignore it).
                        query = mem.query(question.tolist())
                        answers["memory"] = mem.generate(question.tolist(), cfg.max_new_tokens,
                                                         query=query, stop=stop)
                        level = _entry_level(mem.context, start)
                    raw.append(level == 0)
                    seen = np.concatenate([ids, question])
                    kept = seen[-budget:]
                    answers["streaming"] = greedy(lm, streaming_tokens(seen, budget,
                                                                       sink_tokens),
                                                  0, cfg.max_new_tokens, stop)
                    answers["truncated"] = greedy(lm, kept, seen.size - kept.size,
                                                  cfg.max_new_tokens, stop)
                    if cfg.full_context and length <= full_max:
                        answers["full"] = greedy(lm, seen, 0, cfg.max_new_tokens, stop)
                    example = {"length": length, "depth": depth, "trial": trial, "key": key,
                               "needle_start": start, "key_level_in_memory_context": level,
                               "key_within_truncation": bool(start >= seen.size - kept.size)}
                    for cond, out in answers.items():
                        text = tok.decode(out)
                        ok = answer_is(text, key)
                        right[cond][i, j] += ok
                        asked[cond][i, j] += 1
                        example[f"{cond}_answer"] = text
                        example[f"{cond}_answer_ids"] = [int(t) for t in out]
                        example[f"{cond}_correct"] = ok
                    examples.append(example)
                    line = (f"passkey {length} tokens, depth {depth:g}, trial {trial}: " +
                            ", ".join(f"{c} {'ok' if example[f'{c}_correct'] else 'wrong'}"
                                      for c in answers))
                    if progress is not None:
                        progress(line)
                    bar.set_postfix_str(", ".join(
                        f"{c} {int(right[c].sum())}/{int(asked[c].sum())}" for c in conditions),
                        refresh=False)
                    bar.update(1)
                key_raw[i, j] = float(np.mean(raw))

    def rate(r: np.ndarray, n: np.ndarray) -> float | None:
        return float(r.sum() / n.sum()) if n.sum() else None

    def grid(a: np.ndarray) -> list[list[float | None]]:
        return [[None if np.isnan(x) else float(x) for x in row] for row in a]

    alloc = allocator()
    scorer = alloc.scorer if isinstance(alloc.scorer, str) else type(alloc.scorer).__name__
    titles = {"memory": f"memory (budget {budget}, {scorer} scorer)",
              "streaming": f"streaming: first {sink_tokens} + last tokens, {budget} at ranks",
              "truncated": f"truncated to the last {budget} tokens",
              "full": "full context (no memory)"}
    result = {"lengths": list(cfg.lengths), "depths": list(cfg.depths), "trials": cfg.trials,
              "digits": cfg.digits, "max_new_tokens": cfg.max_new_tokens, "budget": budget,
              "tail_tokens": alloc.tail_tokens, "scorer": scorer, "sink_tokens": sink_tokens,
              "refocus_every": memory.refocus_every, "levels": memory.levels,
              "rope_scaling": memory.rope_scaling, "positions": memory.positions.as_dict(),
              "gist_dtype": memory.gist_dtype, "gist_rope": memory.gist_rope,
              "conditions": conditions,
              "templates": {"intro": cfg.intro, "needle": cfg.needle, "question": cfg.question},
              "full_max_length": full_max if cfg.full_context else None,
              "key_raw_in_memory_context": grid(key_raw), "examples": examples}
    for cond in conditions:
        r, n = right[cond], asked[cond]
        cells = np.array([[rate(r[i, j], n[i, j]) if n[i, j] else np.nan
                           for j in range(shape[1])] for i in range(shape[0])], dtype=float)
        result[cond] = {"accuracy": grid(cells), "title": titles[cond],
                        "accuracy_by_length": [rate(r[i], n[i]) for i in range(shape[0])],
                        "accuracy_by_depth": [rate(r[:, j], n[:, j]) for j in range(shape[1])],
                        "mean_accuracy": rate(r, n), "num_answered": int(n.sum())}
    return result
