"""LensNet's training data: memory nodes labelled with their full-detail value, measured by
the frozen base model.

One *example* is a memory (a tree made by the run's GistNet), a working context the
``recency`` allocator chose for it at a random budget, a query, and a handful of candidate
gist entries of that context. A candidate's label is its **full-detail value**:

    value = NLL(target | context) − NLL(target | context with the node replaced by its raw tokens)

in nats per target token (positive: seeing the node in detail helps). It is what a focus
scorer should rank by, at every level: for a level-2 node it is the worth of everything below
it, which is what a coarse-to-fine descent needs (the one-step gain of expanding a level-2
node into level-1 gists is near zero when level-1 gists do not carry the fact).

Two kinds of example (``retrieval_share`` of the first):

- **retrieval**: filler from the training corpus with a fact planted at a random depth (a
  5-digit value in one of the wordings of :data:`TRAIN_FACTS`, or with ``wordings:
  generated`` one composed per example by :func:`generated_fact`), the question after the memory;
  the query is the question's tokens, the target the value's tokens; the entry holding the
  fact is always a candidate. :data:`HELD_OUT_FACT` is a wording never used here, for
  evaluation.
- **text**: a stretch of the training corpus; the target is the next ``horizon`` tokens and
  the query the ``query_tokens`` tokens before the cursor.

Variants of equal length are batched through the model (``batch`` per pass).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from megacontext.allocator import FocusAllocator
from megacontext.base import BaseLM
from megacontext.data.needles import make_example
from megacontext.gistnet import Compressor, GistLane, gistnet_digest, lane_of
from megacontext.ingest import Ingestor
from megacontext.lens.model import node_features
from megacontext.tree import MegaContextTree
from megacontext.working_context import WorkingContext, materialize


@dataclass(frozen=True)
class Fact:
    """A wording of a planted fact: ``str.format`` templates, ``needle`` with ``{key}``."""

    intro: str
    needle: str
    question: str


# The default passkey wording is among them (evaluation also uses it); HELD_OUT_FACT is not.
TRAIN_FACTS: tuple[Fact, ...] = (
    Fact("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the pass key.\n",
         "\nThe pass key is {key}. Remember it. {key} is the pass key.\n",
         "\nWhat is the pass key? The pass key is"),
    Fact("Somewhere below is the door code. Keep it in mind.\n",
         "\nThe door code is {key}. Do not forget: the door code is {key}.\n",
         "\nWhat is the door code? The door code is"),
    Fact("A serial number appears once in this file.\n",
         "\n# serial number: {key}  (the serial number is {key})\n",
         "\nQuestion: what was the serial number? Answer: the serial number is"),
    Fact("Read carefully; you will be asked for the account id.\n",
         "\nNote that the account id is {key}.\n",
         "\nThe account id mentioned above is"),
    Fact("",
         "\nThe winning lottery ticket was {key}. Ticket {key} won.\n",
         "\nWhich lottery ticket won? The winning ticket was"),
)
HELD_OUT_FACT = Fact(
    "Hidden in the notes below is a secret number.\n",
    "\nMy secret number is {key}. Keep {key} safe.\n",
    "\nTell me my secret number. Your secret number is")

# ``wordings: generated`` composes a fact per example from these parts (subject × needle ×
# question × intro: 2,304 wordings), so that the lens learns to match a question's words to
# the gist that holds them rather than five sentences. None of the words of HELD_OUT_FACT or
# of the passkey probes' wordings (pass key, secret number, berth, ferry) appear.
SUBJECTS: tuple[str, ...] = (
    "the locker number", "the vault combination", "the invoice number", "the room number",
    "the order id", "the train number", "the ticket code", "the badge number",
    "the parcel code", "the shelf number", "the gate number", "the flight code",
    "the patient id", "the lot number", "the cabinet code", "the sample id",
    "the tracking code", "the bus route", "the table number", "the case number",
    "the phone extension", "the seat number", "the batch number", "the voucher code",
    "the meter reading", "the license number", "the postal code", "the bin number",
    "the frequency", "the grid reference", "the safe code", "the access pin",
)
NEEDLES: tuple[str, ...] = (
    "\n{S} is {key}. Remember {s}.\n",
    "\nFor the record, {s} is {key}.\n",
    "\n({S}: {key})\n",
    "\nPlease note that {s} was set to {key}. Again, {key}.\n",
    "\n{S}, written here only once, is {key}.\n",
    "\nImportant: {s} = {key}.\n",
)
QUESTIONS: tuple[str, ...] = (
    "\nWhat is {s}? {S} is",
    "\nQuestion: what was {s}? Answer: {s} is",
    "\nRecall {s} from the text above. {S} is",
    "\n{S} mentioned earlier is",
)
INTROS: tuple[str, ...] = (
    "", "Somewhere in the text below, {s} is written down.\n",
    "Keep track of {s}; you will be asked for it.\n",
)


def generated_fact(rng: np.random.Generator) -> Fact:
    """A wording composed from :data:`SUBJECTS`, :data:`NEEDLES`, :data:`QUESTIONS` and
    :data:`INTROS` (``str.format`` templates: only the needle keeps its ``{key}``)."""
    subject, needle, question, intro = (options[int(rng.integers(len(options)))]
                                        for options in (SUBJECTS, NEEDLES, QUESTIONS, INTROS))
    parts = {"s": subject, "S": subject[0].upper() + subject[1:], "key": "{key}"}
    return Fact(intro.format(**parts), needle.format(**parts), question.format(**parts))


@dataclass(frozen=True)
class LensDataConfig:
    """How many examples of which shape (the module docstring has the protocol).

    Attributes:
        examples: examples to make.
        retrieval_share: the share of retrieval examples (the rest are plain text).
        lengths: memory lengths in tokens, drawn uniformly.
        budgets: working-context budgets of the recency allocator, drawn uniformly.
        tail_tokens: raw tail of those contexts.
        candidates: gist entries labelled per example (all, if the context has fewer).
        horizon: target tokens of a text example.
        query_tokens: a text example's query: the tokens before the cursor.
        levels, gist_dtype: of the memory trees.
        digits: of the planted values.
        wordings: ``fixed``: each fact in one of the wordings of :data:`TRAIN_FACTS`;
            ``generated``: composed per example (:func:`generated_fact`).
        batch: variants per base-model pass.
        seed: the examples are a function of the seed.
    """

    examples: int = 96
    retrieval_share: float = 0.75
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    budgets: tuple[int, ...] = (128, 256)
    tail_tokens: int = 64
    candidates: int = 8
    horizon: int = 32
    query_tokens: int = 32
    levels: int = 2
    gist_dtype: str = "float16"
    digits: int = 5
    wordings: str = "fixed"
    batch: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        p = []
        if self.examples < 1:
            p.append(f"examples={self.examples} (expected >= 1)")
        if not 0.0 <= self.retrieval_share <= 1.0:
            p.append(f"retrieval_share={self.retrieval_share} (expected in [0, 1])")
        if not self.lengths or min(self.lengths) < 2 * max(self.budgets, default=0):
            p.append(f"lengths={tuple(self.lengths)} (expected each >= 2 x the largest "
                     f"budget {max(self.budgets, default=0)}: a memory that fits is not one)")
        if not self.budgets or min(self.budgets) <= self.tail_tokens:
            p.append(f"budgets={tuple(self.budgets)} (expected each > tail_tokens="
                     f"{self.tail_tokens})")
        if self.wordings not in ("fixed", "generated"):
            p.append(f"wordings={self.wordings!r} (expected fixed or generated)")
        for k in ("candidates", "horizon", "query_tokens", "levels", "digits", "batch"):
            if getattr(self, k) < 1:
                p.append(f"{k}={getattr(self, k)} (expected >= 1)")
        if p:
            raise ValueError("invalid LensDataConfig: " + "; ".join(p))


def _nll(lm: BaseLM, embeds: torch.Tensor, positions: torch.Tensor, cont: torch.Tensor,
         scored: int, cursor: int, rope=None, lane: GistLane | None = None,
         rows: torch.Tensor | None = None) -> torch.Tensor:
    """``[b]`` mean NLL of the last ``scored`` tokens of ``cont`` after each context.

    ``embeds [b, w, c]``, ``positions [b, w]`` the contexts of ``[0, cursor)``; ``cont [m]``
    the ids that follow, at ``cursor …`` (their embeddings are appended, except the last,
    whose only role is to be predicted); ``rows [b, w]`` the contexts' gist rows, read
    through ``lane`` when given.
    """
    b, m = embeds.shape[0], cont.shape[0]
    bound = None
    if lane is not None and rows is not None:
        bound = lane.at(torch.cat([rows, torch.zeros(b, m - 1, dtype=torch.bool)], 1))
    tail = lm.embed(cont[None, :-1]).float().expand(b, -1, -1)  # [b, m-1, c]
    tail_pos = (cursor + torch.arange(m - 1, dtype=torch.float64)).expand(b, -1)  # [b, m-1]
    logits = lm(torch.cat([embeds, tail], 1), torch.cat([positions, tail_pos], 1), rope=rope,
                num_logits=m, lane=bound)  # [b, m, v]
    nll = F.cross_entropy(logits[:, -scored:].reshape(-1, logits.shape[-1]).float(),
                          cont[-scored:].repeat(b), reduction="none")
    return nll.view(b, scored).mean(1)


@torch.inference_mode()
def full_detail_values(lm: BaseLM, tree: MegaContextTree, wc: WorkingContext,
                       entries: list[int], cont: np.ndarray, scored: int,
                       batch: int = 8, lane: GistLane | None = None) -> tuple[float, np.ndarray]:
    """The context's NLL and the full-detail value of each gist entry ``entries`` of ``wc``;
    the gists read through ``lane`` when given (the GistNet's own).

    Returns ``(nll, values [len(entries)])``: ``values[i] = nll − NLL(with entry i raw)``.
    """
    m = materialize(wc, tree, lambda ids: lm.embed(ids[None])[0], rope=lm.config.rope)
    emb, pos, rows = m.embeddings.float(), m.positions, m.gist_rows  # [w, c], [w], [w]
    c = torch.as_tensor(np.asarray(cont, dtype=np.int64))
    base = float(_nll(lm, emb[None], pos[None], c, scored, wc.cursor, m.rope, lane,
                      rows[None])[0])
    variants: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for n, j in enumerate(entries):
        a, b = int(wc.starts[j]), int(wc.ends[j])
        if wc.levels[j] < 1:
            raise ValueError(f"entry {j} is a raw token, not a gist")
        raw = lm.embed(tree.tokens(a, b)[None].long())[0].float()
        e = torch.cat([emb[:j], raw, emb[j + 1:]])
        p = torch.cat([pos[:j], torch.arange(a, b, dtype=torch.float64), pos[j + 1:]])
        r = torch.cat([rows[:j], torch.zeros(b - a, dtype=torch.bool), rows[j + 1:]])
        variants.setdefault(e.shape[0], []).append((n, e, p, r))
    values = np.zeros(len(entries), dtype=np.float64)
    for group in variants.values():
        for k in range(0, len(group), batch):
            chunk = group[k:k + batch]
            nll = _nll(lm, torch.stack([x[1] for x in chunk]),
                       torch.stack([x[2] for x in chunk]), c, scored, wc.cursor, m.rope,
                       lane, torch.stack([x[3] for x in chunk]))
            for (n, *_), v in zip(chunk, nll.tolist(), strict=True):
                values[n] = base - v
    return base, values


def build_examples(lm: BaseLM, compressor: Compressor, filler: np.ndarray,
                   cfg: LensDataConfig, *, facts: tuple[Fact, ...] = TRAIN_FACTS,
                   progress: Callable[[int, int, dict], None] | None = None) -> dict:
    """Labelled examples (module docstring) as flat arrays, ready for :func:`save_examples`.

    Args:
        filler: the token stream memories are cut from (training documents only).
        progress: called after each example with ``(done, total, example summary)``.

    Returns:
        ``gists [N, c]`` float16, ``levels [N]``, ``features [N, f]``, ``labels [N]`` float32,
        ``example [N]`` (which example a candidate belongs to), ``is_fact [N]`` (holds the
        planted fact), per example ``query [E, q, c]`` float16 with ``query_pad [E, q]``,
        ``kind [E]`` (1 retrieval, 0 text), ``base_nll [E]``, and ``gistnet_digest``.
    """
    if filler.size < max(cfg.lengths) + cfg.horizon + 1:
        raise ValueError(f"the filler stream has {filler.size} tokens; examples need "
                         f">= {max(cfg.lengths) + cfg.horizon + 1}")
    tok = lm.tokenizer
    rng = np.random.default_rng(cfg.seed)
    embedding = lm.model.embed_tokens.weight.detach().float()
    rows: dict[str, list] = {k: [] for k in ("gists", "levels", "features", "labels",
                                             "example", "is_fact")}
    queries, kinds, base_nll = [], [], []
    for e in range(cfg.examples):
        length = int(rng.choice(cfg.lengths))
        budget = int(rng.choice(cfg.budgets))
        retrieval = bool(rng.random() < cfg.retrieval_share)
        offset = int(rng.integers(0, filler.size))
        if retrieval:
            fact = (generated_fact(rng) if cfg.wordings == "generated"
                    else facts[int(rng.integers(len(facts)))])
            key = str(int(rng.integers(10 ** (cfg.digits - 1), 10 ** cfg.digits)))
            ids, fact_start = make_example(tok, filler, length, float(rng.random()), key,
                                           offset, intro=fact.intro, needle=fact.needle)
            query_ids = np.asarray(tok.encode(fact.question.format()), dtype=np.int64)
            answer = np.asarray(tok.encode(" " + key), dtype=np.int64)
            cont, scored = np.concatenate([query_ids, answer]), answer.size
            fact_end = fact_start + len(tok.encode(fact.needle.format(key=key)))
        else:
            stream = np.take(filler, np.arange(offset, offset + length + cfg.horizon),
                             mode="wrap")
            ids, cont, scored = stream[:length], stream[length:], cfg.horizon
            query_ids = ids[-cfg.query_tokens:]
            fact_start = fact_end = -1
        with tempfile.TemporaryDirectory(prefix="megacontext-lens-") as tmp:
            tree = MegaContextTree.create(
                f"{tmp}/tree", hidden_size=lm.config.hidden_size,
                vocab_size=lm.config.vocab_size, rope=lm.config.rope,
                fingerprint=lm.fingerprint, levels=cfg.levels, gist_dtype=cfg.gist_dtype,
                gistnet_digest=gistnet_digest(compressor))
            with tree:
                ingest = Ingestor(tree, embedding, compressor)
                ingest.feed(np.asarray(ids, dtype=np.int64))
                ingest.commit()
                wc = FocusAllocator(budget, tail_tokens=cfg.tail_tokens).assemble(tree)
                gist_entries = np.flatnonzero(wc.levels >= 1)
                holds = (wc.starts[gist_entries] < fact_end) & (wc.ends[gist_entries] > fact_start)
                chosen = list(gist_entries[holds])[:cfg.candidates]
                rest = gist_entries[~holds]
                take = min(cfg.candidates - len(chosen), rest.size)
                chosen += list(rng.choice(rest, size=take, replace=False))
                chosen = sorted(int(j) for j in chosen)
                nll, values = full_detail_values(lm, tree, wc, chosen, cont, scored, cfg.batch,
                                                 lane_of(compressor))
                for j, v in zip(chosen, values.tolist(), strict=True):
                    level, index = int(wc.levels[j]), int(wc.indices[j])
                    g = tree.gists(level, index, index + 1).float().numpy()  # [1, c]
                    rows["gists"].append(g[0].astype(np.float16))
                    rows["levels"].append(level)
                    rows["features"].append(node_features(level, np.array([index]), length, g,
                                                          tree.span)[0])
                    rows["labels"].append(v)
                    rows["example"].append(e)
                    rows["is_fact"].append(bool(wc.starts[j] < fact_end and
                                                wc.ends[j] > fact_start))
        with torch.no_grad():
            queries.append(lm.embed(torch.as_tensor(query_ids)[None])[0].float()
                           .to(torch.float16).numpy())
        kinds.append(int(retrieval))
        base_nll.append(nll)
        if progress is not None:
            progress(e + 1, cfg.examples, {"kind": "retrieval" if retrieval else "text",
                                           "length": length, "budget": budget,
                                           "candidates": len(chosen),
                                           "best": float(values.max()) if len(values) else 0.0})
    q = max(x.shape[0] for x in queries)
    query = np.zeros((len(queries), q, lm.config.hidden_size), dtype=np.float16)
    query_pad = np.ones((len(queries), q), dtype=bool)
    for i, x in enumerate(queries):
        query[i, :x.shape[0]], query_pad[i, :x.shape[0]] = x, False
    return {"gists": np.stack(rows["gists"]), "levels": np.asarray(rows["levels"], np.int64),
            "features": np.stack(rows["features"]).astype(np.float32),
            "labels": np.asarray(rows["labels"], np.float32),
            "example": np.asarray(rows["example"], np.int64),
            "is_fact": np.asarray(rows["is_fact"], bool), "query": query,
            "query_pad": query_pad, "kind": np.asarray(kinds, np.int64),
            "base_nll": np.asarray(base_nll, np.float32),
            "gistnet_digest": gistnet_digest(compressor)}


def save_examples(data: dict, path: str, about: dict | None = None) -> None:
    """Write :func:`build_examples`'s arrays to one safetensors file (no pickle), atomically
    (a temporary file, then a rename); ``about`` (JSON-ready: what made them) goes into its
    metadata and comes back as ``data["about"]``."""
    import os

    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in data.items() if isinstance(v, np.ndarray)}
    tmp = f"{path}.tmp"
    save_file(arrays, tmp, metadata={"gistnet_digest": str(data["gistnet_digest"]),
                                     "about": json.dumps(about or {}, sort_keys=True)})
    os.replace(tmp, path)


def load_examples(path: str) -> dict:
    """Read a file written by :func:`save_examples`; checks the arrays agree in length."""
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 — safe_open has no iter
        meta = f.metadata() or {}
        data["gistnet_digest"] = meta.get("gistnet_digest")
        data["about"] = json.loads(meta.get("about") or "{}")
    need = ("gists", "levels", "features", "labels", "example", "is_fact", "query",
            "query_pad", "kind", "base_nll")
    missing = [k for k in need if k not in data]
    n = {k: len(data[k]) for k in need[:6] if k in data}
    e = {k: len(data[k]) for k in need[6:] if k in data}
    if missing or len(set(n.values())) > 1 or len(set(e.values())) > 1 or (
            n and int(data["example"].max()) >= min(e.values())):
        raise ValueError(f"{path}: not a lens example file (missing {missing}, candidate "
                         f"arrays of lengths {n}, example arrays of lengths {e})")
    return data


__all__ = ["HELD_OUT_FACT", "TRAIN_FACTS", "Fact", "LensDataConfig", "build_examples",
           "full_detail_values", "generated_fact", "load_examples", "save_examples"]
