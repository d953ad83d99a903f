"""The ``megacontext`` console script: ``ingest``, ``inspect``, ``verify``, ``index``.

    megacontext ingest TREE_DIR INPUT... [--model NAME_OR_PATH] [--gistnet CKPT|mean]
                       [--levels N] [--dtype D] [--shard-level K] [--no-index]
    torchrun --standalone --nproc_per_node=R -m megacontext.cli ingest ...   (distributed)
    megacontext inspect TREE_DIR [--json]
    megacontext verify TREE_DIR
    megacontext index TREE_DIR [--rebuild] [--quiet]
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
import time
from pathlib import Path

MEAN = "mean"
# What a tree's writes can meet (a full disk or quota, a file system gone read-only or failing).
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG)


def _build_compressor(spec: str, fingerprint: dict, levels: int, model_name: str | None = None):
    """GistNet export directory, or ``mean`` for the untrained mean-pooling baseline. A
    contextual GistNet (``input_layer > 0``) also loads the base model, whose first layers it
    reads (docs/gistnet.md, Variants)."""
    from megacontext.gistnet import MeanPoolGist, gistnet_digest, load_gistnet

    if spec == MEAN:
        model = MeanPoolGist()
    else:
        model = load_gistnet(spec, expect_fingerprint=fingerprint)
        if model.cfg.levels < levels:
            raise ValueError(f"gistnet at {spec} serves {model.cfg.levels} gist levels, the tree "
                             f"asks for {levels}")
        if model.cfg.input_layer:
            from megacontext.base import BaseLM
            from megacontext.encoders import ContextualCompressor

            return (ContextualCompressor(BaseLM.load(model_name or "smollm2-135m"), model.eval()),
                    gistnet_digest(model))
    return model.eval(), gistnet_digest(model)


DEFAULT_LEVELS = 2  # gist levels of a new tree (megacontext.tree.format.DEFAULT_LEVELS)


def check_ingest_flags(args: argparse.Namespace, distributed: bool = False) -> None:
    """Refuse every bad flag value of ``ingest`` at once, before anything is read or written
    (docs/cli.md lists each flag's allowed values and what a bad one gets).

    Raises:
        ValueError: naming each offending flag, its value and the allowed range.
    """
    from megacontext.tree.format import MAX_LEVELS

    bad = []
    if args.levels is not None and not 1 <= args.levels <= MAX_LEVELS:
        bad.append(f"--levels {args.levels}: expected an integer in [1, {MAX_LEVELS}] (gist "
                   f"levels of a new tree; default {DEFAULT_LEVELS})")
    if args.commit_every < 1:
        bad.append(f"--commit-every {args.commit_every}: expected a positive number of tokens "
                   f"(default {1 << 18})")
    if args.prefetch < 0:
        bad.append(f"--prefetch {args.prefetch}: expected 0 (off, the default) or a positive "
                   f"number of token arrays")
    if not 1 <= args.shard_level <= MAX_LEVELS:
        bad.append(f"--shard-level {args.shard_level}: expected an integer in [1, the tree's "
                   f"levels] (default 2)")
    elif distributed:
        levels = args.levels or DEFAULT_LEVELS
        header = Path(args.tree) / "header.json"
        if header.is_file():
            try:
                levels = json.loads(header.read_text()).get("levels", levels)
            except (OSError, ValueError):
                pass  # an unreadable header is refused, naming it, when the tree is opened
        if args.shard_level > levels:
            bad.append(f"--shard-level {args.shard_level}: expected an integer in [1, {levels}] "
                       f"(the tree's levels)")
    if args.device is not None:
        import torch

        try:
            device = torch.device(args.device)
        except RuntimeError:
            bad.append(f"--device {args.device!r}: expected a torch device such as cpu, cuda "
                       f"or cuda:1")
        else:
            if device.type == "cuda" and not torch.cuda.is_available():
                bad.append(f"--device {args.device}: torch {torch.__version__} sees no CUDA "
                           f"device here; drop --device to ingest on the CPU")
            elif device.type not in ("cpu", "cuda"):
                bad.append(f"--device {args.device}: expected cpu or cuda[:N]")
    if bad:
        raise ValueError("; ".join(bad))


def _prepare(args: argparse.Namespace, create: bool = True):
    """Inputs, model pieces and compressor of an ingest; the tree checked against them and,
    with ``create``, created when missing. Returns ``(sources, tokenizer, embedding,
    compressor, digest)``."""
    from megacontext.base.loading import load_token_embeddings
    from megacontext.ingest import expand_inputs
    from megacontext.tree import MegaContextTree

    sources = expand_inputs(args.inputs)
    config, tokenizer, embedding = load_token_embeddings(args.model)
    fingerprint = config.fingerprint(tokenizer.sha256)
    tree_dir = Path(args.tree)
    exists = (tree_dir / "header.json").is_file()
    levels = args.levels if args.levels is not None else DEFAULT_LEVELS
    dtype = args.dtype or "float16"
    if exists:  # check settings against the tree first (read-only: no lock, nothing touched)
        with MegaContextTree.open(tree_dir, expect_fingerprint=fingerprint,
                                  expect_hidden_size=config.hidden_size) as tree:
            bad = [f"{flag} {asked}: tree at {tree_dir} has {flag[2:]} {has}; drop {flag} or "
                   f"pass {flag} {has} to append to it"
                   for flag, asked, has in (("--levels", args.levels, tree.levels),
                                            ("--dtype", args.dtype, tree.gist_dtype))
                   if asked is not None and asked != has]
            if bad:
                raise ValueError("; ".join(bad))
            levels = tree.levels
    compressor, digest = _build_compressor(args.gistnet, fingerprint, levels, args.model)
    if exists:
        MegaContextTree.open(tree_dir, expect_fingerprint=fingerprint,
                             expect_hidden_size=config.hidden_size,
                             expect_gistnet_digest=digest).close()
    elif create:
        try:
            MegaContextTree.create(tree_dir, hidden_size=config.hidden_size,
                                   vocab_size=config.vocab_size, rope=config.rope,
                                   fingerprint=fingerprint, levels=levels, gist_dtype=dtype,
                                   gistnet_digest=digest).close()
        except FileExistsError:
            # Another ingest created the tree since we looked: check ours against it as for
            # any existing tree (then one of the two holds the writer lock, the other is
            # refused naming it, or finds its inputs held).
            return _prepare(args, create)
    return sources, tokenizer, embedding, compressor, digest


def _summary(tree_dir: Path, tokens: int, skipped: int, seconds: float, before: int) -> str:
    from megacontext.tree import MegaContextTree

    with MegaContextTree.open(tree_dir) as tree:
        resumed = f" (resumed; {skipped:,} were already committed)" if skipped else ""
        return (f"{tree_dir}: +{tokens:,} tokens{resumed} in {seconds:.1f} s "
                f"({tokens / max(seconds, 1e-9):,.0f} tok/s); now {tree.num_tokens:,} tokens, "
                f"{', '.join(f'L{k} {tree.count(k):,}' for k in range(1, tree.levels + 1))}"
                + ("" if before else " (new tree)"))


def cmd_ingest(args: argparse.Namespace) -> int:
    import os

    from tqdm import tqdm

    from megacontext.ingest import ingest
    from megacontext.tree import MegaContextTree

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return cmd_ingest_distributed(args)
    check_ingest_flags(args)
    sources, tokenizer, embedding, compressor, _ = _prepare(args)
    tree_dir = Path(args.tree)
    tree = MegaContextTree.open(tree_dir, mode="a")
    total = sum(s.path.stat().st_size for s in sources if s.path is not None) or None
    start, before = time.perf_counter(), tree.num_tokens
    with tree, tqdm(total=total, unit="B", unit_scale=True, desc="ingest",
                    disable=args.quiet, file=sys.stderr) as bar:
        tokens = 0

        def progress(nbytes: int, ntokens: int) -> None:
            nonlocal tokens
            tokens += ntokens
            bar.update(nbytes)
            if ntokens:
                rate = tokens / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{tokens:,} tokens, {rate:,.0f} tok/s", refresh=False)

        try:
            stats = ingest(tree, sources, tokenizer, embedding, compressor,
                           errors=args.errors, separator=tokenizer.eos_id,
                           commit_every=args.commit_every, progress=progress,
                           device=args.device, prefetch=args.prefetch,
                           precision=args.precision, again=args.again,
                           append_changed=args.append_changed, index=not args.no_index)
        except OSError as e:
            if e.errno not in WRITE_ERRORS or (e.filename is not None
                                               and Path(tree_dir) not in Path(e.filename).parents):
                raise  # not the tree's writes (an input that cannot be read names itself)
            raise OSError(f"writing tree at {tree_dir} failed: {e.strerror} "
                          f"({errno.errorcode[e.errno]}); it keeps the {tree.num_tokens:,} "
                          f"tokens committed before; rerun the same command once the cause "
                          f"is fixed to resume") from None
    for line in _held_lines(stats.held):
        print(line)
    if stats.held and not stats.inputs and not stats.tokens:
        print(f"{tree_dir}: nothing appended: the tree holds every input already (pass "
              f"--again to append another copy)")
    else:
        print(_summary(tree_dir, stats.tokens, stats.skipped, time.perf_counter() - start,
                       before))
    _report_index(tree_dir, stats.index)
    return 0


def _report_index(tree_dir: Path, index: dict | None) -> None:
    """The token index's extension after an ingest (``IngestStats.index``): a line on stdout
    when spans were added, one on stderr when it could not be extended (the ingest stands)."""
    if index is None:
        return
    if "problem" in index:
        print(f"{tree_dir}: token index not extended: {index['problem']}; the ingested text is "
              f"committed (the lexical scorer scans the spans past the index; `megacontext "
              f"index {tree_dir}` extends it)", file=sys.stderr)
    elif index["added"]:
        print(f"{tree_dir}: token index +{index['added']:,} spans in {index['seconds']:.1f} s "
              f"(now {index['spans']:,})")


def _held_lines(held: list[tuple[dict, dict]]) -> list[str]:
    """One line per input skipped because the tree holds it."""
    lines = []
    for record, earlier in held:
        same = "" if earlier.get("path") == record.get("path") else \
            f" (the same content as {earlier.get('path')})"
        tokens = earlier.get("tokens")
        span = f", tokens [{tokens[0]:,}, {tokens[1]:,})" if tokens else ""
        lines.append(f"{record.get('path')}: already ingested at {earlier.get('ingested')}"
                     f"{same}{span}; skipped")
    return lines


def cmd_ingest_distributed(args: argparse.Namespace) -> int:
    """One rank of ``torchrun ... -m megacontext.cli ingest`` (megacontext.ingest_dist)."""
    import torch.distributed as dist

    from megacontext.ingest_dist import distributed_ingest
    from megacontext.tree import MegaContextTree

    if args.device not in (None, "cpu"):
        raise SystemExit(f"--device {args.device}: distributed ingest runs on the CPU (each "
                         f"rank a CPU ingest); drop --device or run a serial ingest")
    if args.precision != "float32":
        raise SystemExit(f"--precision {args.precision}: distributed ingest computes in "
                         f"float32 (its merge equals a serial float32 ingest bit for bit); drop "
                         f"--precision or run a serial ingest")
    check_ingest_flags(args, distributed=True)
    # gloo: the ranks only meet at barriers; the compute is the CPU ingest (GPUs unused)
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        tree_dir = Path(args.tree)
        # rank 0 creates the tree; the others check it once it exists
        if rank == 0:
            prepared = _prepare(args)
        dist.barrier()
        if rank != 0:
            prepared = _prepare(args, create=False)
        sources, tokenizer, embedding, compressor, _ = prepared
        before = 0
        if rank == 0:
            with MegaContextTree.open(tree_dir) as tree:
                before = tree.num_tokens
        start = time.perf_counter()
        phases: dict[str, int] = {}

        def progress(phase: str, n: int) -> None:
            phases[phase] = phases.get(phase, 0) + n
            if not args.quiet and rank == 0:
                rate = phases[phase] / max(time.perf_counter() - start, 1e-9)
                print(f"\r[rank 0] {phase}: {phases[phase]:,} tokens ({rate:,.0f} tok/s)",
                      end="", file=sys.stderr, flush=True)

        stats = distributed_ingest(tree_dir, sources, tokenizer, embedding, compressor,
                                   shard_level=args.shard_level, errors=args.errors,
                                   separator=tokenizer.eos_id, commit_every=args.commit_every,
                                   progress=progress, again=args.again,
                                   append_changed=args.append_changed,
                                   index=not args.no_index)
        if rank == 0:
            for line in _held_lines(stats.held):
                print(line)
        if rank == 0 and stats.held and not stats.inputs and not stats.tokens:
            print(f"{tree_dir}: nothing appended: the tree holds every input already (pass "
                  f"--again to append another copy)")
        elif rank == 0:
            print(("" if args.quiet else "\n") + _summary(
                tree_dir, stats.tokens, 0, time.perf_counter() - start, before)
                + f" [{dist.get_world_size()} ranks]")
        if rank == 0:
            _report_index(tree_dir, stats.index)
    finally:
        dist.destroy_process_group()
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from megacontext.tree import MegaContextTree

    with MegaContextTree.open(args.tree) as tree:
        info = tree.info()
        try:
            lexicon = tree.lexicon()
            info["lexicon"] = None if lexicon is None else lexicon.info()
        except ValueError as e:
            info["lexicon"] = {"problem": str(e)}
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    from megacontext.spans import node_size

    table = Table(title=f"{args.tree}  (format {info.get('format_version')})")
    table.add_column("level")
    table.add_column("nodes", justify="right")
    table.add_column("tokens per node", justify="right")
    table.add_column("bytes on disk", justify="right")
    rows = zip(info["counts"], info["bytes_per_level"], strict=True)
    for level, (count, nbytes) in enumerate(rows):
        size = node_size(level, info["span"])
        table.add_row(f"L{level}", f"{count:,}", f"{size:,}", f"{nbytes:,}")
    table.add_row("all", "", "", f"{info['bytes_total']:,}")
    console = Console()
    console.print(table)
    for key in ("fingerprint", "gistnet_digest", "gist_dtype", "rope"):
        console.print(f"{key}: {info.get(key)}")
    inputs = info["inputs"]
    if inputs:
        table = Table(title=f"ingested inputs ({len(inputs):,})")
        for column in ("input", "bytes", "sha256", "tokens", "ingested"):
            table.add_column(column, justify="right" if column == "bytes" else "left")
        for r in inputs:
            a, b = r.get("tokens", ["?", "?"])
            table.add_row(str(r.get("path")), f"{r.get('size', 0):,}",
                          str(r.get("sha256", ""))[:16], f"[{a:,}, {b:,})",
                          str(r.get("ingested")))
        console.print(table)
    else:
        console.print("ingested inputs: none recorded (a tree made before the record keeps "
                      "none)" if info["num_tokens"] else "ingested inputs: none")
    lexicon = info["lexicon"]
    if lexicon is None:
        console.print("token index: none (`megacontext index` builds one for the lexical "
                      "scorer)")
    elif "problem" in lexicon:
        console.print(f"token index: refused: {lexicon['problem']}")
    else:
        behind = max(info["num_tokens"] // info["span"] - lexicon["spans"], 0)
        console.print(f"token index: {lexicon['spans']:,} spans ({lexicon['tokens']:,} tokens), "
                      f"{lexicon['segments']} segment(s), {lexicon['postings']:,} postings, "
                      f"{lexicon['bytes']:,} bytes" + (f"; {behind:,} newer spans not indexed "
                                                       f"(scanned; the next ingest or "
                                                       f"`megacontext index` adds them)"
                                                       if behind else ""))
    note = (info.get("extra") or {}).get("ingest") or {}
    if note and not note.get("done", True):
        console.print(f"interrupted ingest: {', '.join(note.get('names') or ['?'])} "
                      f"({info['num_tokens'] - note.get('start_tokens', 0):,} tokens committed "
                      f"from token {note.get('start_tokens', 0):,}); rerun its command to "
                      f"finish it")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from megacontext.tree import MegaContextTree, verify
    from megacontext.tree.lexicon import lexicon_problems

    problems = verify(args.tree)
    if not problems:  # the token index beside a sound tree, when it has one
        with MegaContextTree.open(args.tree) as tree:
            problems = lexicon_problems(tree)
    if problems:
        for problem in problems:
            print(f"FAIL {problem}", file=sys.stderr)
        return 1
    print(f"{args.tree}: sound")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from megacontext.tree import MegaContextTree
    from megacontext.tree.lexicon import build_lexicon

    start = time.perf_counter()
    with MegaContextTree.open(args.tree) as tree:
        before = None if args.rebuild else tree.lexicon()  # refused here when torn or foreign
        lex = build_lexicon(tree, rebuild=args.rebuild, progress=not args.quiet)
        added = lex.spans - (before.spans if before is not None else 0)
        info = lex.info()
    what = (f"up to date ({lex.spans:,} spans)" if before is not None and not added else
            f"{'+' if before is not None else ''}{added:,} spans in "
            f"{time.perf_counter() - start:.1f} s")
    print(f"{args.tree}: token index {what}; {info['segments']} segment(s), "
          f"{info['postings']:,} postings, {info['bytes']:,} bytes")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megacontext", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="create a tree or append text to it (resumes an "
                                      "interrupted ingest of the same inputs)")
    p.add_argument("tree", metavar="TREE_DIR")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="text files, directories, .jsonl files (a 'text' field), or - for stdin")
    p.add_argument("--model", default="smollm2-135m", help="base model name or path")
    p.add_argument("--gistnet", default=MEAN,
                   help="GistNet export directory, or 'mean' for the mean-pooling baseline")
    p.add_argument("--levels", type=int, default=None, help="gist levels of a new tree (2)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="gist dtype of a new tree (float16)")
    p.add_argument("--errors", choices=["strict", "replace"], default="strict",
                   help="non-UTF-8 input: fail naming file and byte offset, or substitute U+FFFD")
    p.add_argument("--commit-every", type=int, default=1 << 18, metavar="TOKENS",
                   help="commit after this many tokens")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--device", default=None,
                   help="where GistNet runs, e.g. cuda (serial ingest; default: the CPU)")
    p.add_argument("--prefetch", type=int, default=0, metavar="N",
                   help="token arrays tokenized ahead on a background thread (default 0: "
                        "none; on 2 cores the thread slows GistNet more than it saves)")
    p.add_argument("--precision", choices=["float32", "bfloat16"], default="float32",
                   help="what GistNet computes in: float32 (exact) or bfloat16 autocast (its "
                        "training numerics; ~1.2x faster end to end on a CPU with AVX512-BF16, "
                        "gists within ~0.2%%); serial ingest")
    p.add_argument("--again", action="store_true",
                   help="append inputs the tree already holds (another copy) or holds an "
                        "earlier version of")
    p.add_argument("--append-changed", action="store_true",
                   help="append inputs whose content changed since they were ingested, as new "
                        "text (unchanged ones are still skipped)")
    p.add_argument("--shard-level", type=int, default=2, metavar="K",
                   help="under torchrun: shards of 64 x 32^K tokens per rank (2: 65,536)")
    p.add_argument("--no-index", action="store_true",
                   help="leave the tree's token index (if any) behind: by default an ingest "
                        "extends it over the new spans; `megacontext index` catches up later")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("inspect", help="tokens, counts per level, bytes, fingerprints")
    p.add_argument("tree", metavar="TREE_DIR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="integrity check: exit 0 when sound, 1 naming the problem")
    p.add_argument("tree", metavar="TREE_DIR")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("index", help="build or extend the token index the lexical scorer reads "
                                     "(TREE_DIR/lexicon/; the tree is not changed)")
    p.add_argument("tree", metavar="TREE_DIR")
    p.add_argument("--rebuild", action="store_true",
                   help="write the index anew (also replaces a torn or foreign one)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_index)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"megacontext {args.command}: interrupted; what was committed is kept (an "
              f"ingest resumes when the same command is run again)", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        # A user's mistake or the machine's refusal (a missing file, a read-only directory, a
        # tree another writer holds): one line naming it, no traceback.
        print(f"megacontext {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
