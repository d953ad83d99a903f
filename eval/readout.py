"""The oracle read-out of a passkey: is retrieval from memory limited by focus or by read-out?

    python eval/readout.py COMPRESSOR [--lengths 4096 16384 65536] [--budgets 256 1024]
        [--trials 2] [--rope auto|none] [--positions exact compact]
        [--conditions fill minimal recency full truncated truncated-ntk] [--out probe.json]
        [--override data=folder data.corpus=outputs/prose] [--split all]
        [--intro T] [--needle T] [--question T]

COMPRESSOR is a ``<train run>/gistnet`` export (or ``mean``). The passkey memories follow the
passkey test's protocol (``configs/eval_passkey.yaml``, its templates and seed; filler from the
``--split`` documents); every memory condition holds the needle raw by an oracle focus, or is
the recency scorer's context for comparison (the conditions:
:mod:`megacontext.evaluation.readout`). Prints one JSON line per answer and the table of right
answers per condition and length; ``--out X.json`` also writes ``X.json`` and the plot
``X.png``. Numbers: docs/focus.md ("What limits retrieval past 16k: the read-out, not the
focus"; "Read-time positions: the read-out past the trained length"), docs/design.md
("Read-time positions").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from megacontext.base import BaseLM
from megacontext.data import load_corpus
from megacontext.data.needles import filler_stream
from megacontext.dtypes import TORCH_DTYPES
from megacontext.evaluation import check_config, evaluation_documents, load_compressor
from megacontext.evaluation.readout import CONDITIONS, plot, render_table, run_readout
from megacontext.evaluation.substitutability import variant_rope
from megacontext.positions import POSITION_RULES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("compressor", help="a GistNet export (<train run>/gistnet) or 'mean'")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536],
                   help="memory lengths in tokens")
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9],
                   help="needle depths (fractions of the memory)")
    p.add_argument("--budgets", type=int, nargs="+", default=[256, 1024],
                   help="working-context budgets W (minimal uses the largest)")
    p.add_argument("--trials", type=int, default=2, help="keys per length and depth")
    p.add_argument("--levels", type=int, default=2,
                   help="gist levels of the memory (missing ones are added untrained)")
    p.add_argument("--rope", choices=["auto", "none"], default="auto",
                   help="memory.rope_scaling: auto (NTK factor from the context's extent, "
                        "the default) or none (the model's own RoPE)")
    p.add_argument("--auto-kind", default="ntk",
                   help="the scaling auto resolves to: linear | ntk | dynamic | yarn | llama3")
    p.add_argument("--factor", type=float, default=None,
                   help="a fixed NTK factor instead of auto's (which covers the extent)")
    p.add_argument("--conditions", nargs="+", default=["fill", "minimal", "recency"],
                   choices=CONDITIONS, help="the conditions (megacontext.evaluation.readout)")
    p.add_argument("--positions", nargs="+", default=["exact"], choices=POSITION_RULES,
                   help="read-time position rules of the memory conditions")
    p.add_argument("--local", type=int, default=4096,
                   help="positions.local of the rules other than exact")
    p.add_argument("--override", nargs="*", default=[],
                   help="Hydra overrides of eval_passkey (e.g. data=folder "
                        "data.corpus=outputs/prose for a foreign filler)")
    p.add_argument("--split", default="validation",
                   help="the filler documents: validation | test | all")
    for name in ("intro", "needle", "question"):
        p.add_argument(f"--{name}", default=None,
                       help=f"passkey.{name} template instead of the config's")
    p.add_argument("--out", type=Path, default=None,
                   help="write the results as JSON (and the plot beside it, .png)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("eval_passkey", overrides=["output_dir=unused",
                                                 f"compressor={args.compressor}",
                                                 *args.override])
    templates = {k: getattr(args, k) for k in ("intro", "needle", "question")
                 if getattr(args, k) is not None}
    pk = dataclasses.replace(check_config(cfg).passkey, lengths=tuple(args.lengths),
                             depths=tuple(args.depths), trials=args.trials, **templates)
    lm = BaseLM.load(cfg.model.name, dtype=TORCH_DTYPES[cfg.model.dtype])
    compressor = load_compressor(args.compressor, lm, args.levels, untrained_upper=True)
    data = cfg.data  # opened as eval/eval.py opens it
    corpus = load_corpus(data.corpus, lm.tokenizer, min_tokens=data.get("min_tokens"),
                         cache_dir=data.get("cache_dir"), text_field=data.get("text_field", "text"),
                         source=data.get("source"), progress=False)
    docs, _ = evaluation_documents(corpus, cfg.data, args.split, args.compressor)
    if args.factor is not None:
        rope = variant_rope(lm.config.rope, {"scaling": "ntk", "factor": args.factor},
                            lm.config.max_position)
    else:
        rope = None if args.rope == "none" else variant_rope(
            lm.config.rope, {"scaling": "auto", "auto_kind": args.auto_kind},
            lm.config.max_position)
    with torch.no_grad():
        result = run_readout(lm, compressor, filler_stream(corpus, docs), pk,
                             budgets=args.budgets, conditions=args.conditions,
                             positions=args.positions, local=args.local, levels=args.levels,
                             rope=rope, tail_tokens=int(cfg.allocator.tail_tokens),
                             seed=int(cfg.seed))
    result = {"compressor": args.compressor, "rope_scaling": args.rope,
              "auto_kind": args.auto_kind, "factor": args.factor, "override": args.override,
              "split": args.split, "templates": {k: getattr(pk, k)
                                                 for k in ("intro", "needle", "question")},
              **result}
    print("\n" + render_table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
        plot(result, args.out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
