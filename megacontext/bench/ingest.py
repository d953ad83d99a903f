"""Benchmark: ``megacontext ingest`` on SmolLM2-135M embeddings with the default GistNet.

    python -m megacontext.bench.ingest [--tokens 1e6 1e7] [--repeats 3]
    python -m megacontext.bench.ingest --tokens 1e5 --gistnet default <run>/gistnet   # compare
    python -m megacontext.bench.ingest --tokens 1e7 --repeats 1 --device cpu cuda     # a GPU
    python -m megacontext.bench.ingest --tokens 1e6 --prefetch 0 4     # tokenize ahead, A/B
    python -m megacontext.bench.ingest --tokens 1e6 --precision float32 bfloat16   # A/B

For each size it writes a text file of about that many tokens (the running Python's standard
library sources, cycled), then runs the real console script in a fresh subprocess, as a user
would, ``--repeats`` times into a new tree each time. It reports the ingest rate the command
measured itself (tokens / seconds from first read to last commit, excluding interpreter start
and model load), the peak RSS of the subprocess, and bytes on disk per token for each level.
The GistNet is the default configuration (untrained weights cost the same as trained ones),
or, with ``--gistnet``, each export named in turn (``default`` names the light default), so a
contextual GistNet's cost (its base layers run over every span) is measured next to it.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path


def write_corpus(path: Path, tokens: int, tokenizer) -> int:
    """Write stdlib sources (cycled) until about ``tokens`` tokens; return the exact count."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    total = 0
    with open(path, "w", encoding="utf-8") as out:
        while total < tokens:
            for f in files:
                try:
                    text = f.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                n = len(tokenizer.encode(text))
                out.write(text)
                total += n
                if total >= tokens:
                    break
    return total


def run_once(tree: Path, corpus: Path, gistnet: Path, device: str | None = None,
             prefetch: int | None = None, precision: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "megacontext.cli", "ingest", str(tree), str(corpus),
           "--gistnet", str(gistnet), "--quiet"] + (["--device", device] if device else []) \
        + (["--prefetch", str(prefetch)] if prefetch is not None else []) \
        + (["--precision", precision] if precision is not None else [])
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:  # say why, not only that it failed
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"`{' '.join(cmd)}` exited with {done.returncode}: {tail}")
    out = done.stdout
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    m = re.search(r"\+([\d,]+) tokens.* in ([\d.]+) s \(([\d,]+) tok/s\)", out)
    tokens, seconds = int(m.group(1).replace(",", "")), float(m.group(2))
    rate = int(m.group(3).replace(",", ""))  # from the unrounded seconds (printed to 0.1 s)
    info = json.loads(subprocess.run([sys.executable, "-m", "megacontext.cli", "inspect",
                                      str(tree), "--json"], check=True, capture_output=True,
                                     text=True).stdout)
    # ru_maxrss of children is the max over all children so far: only trust it when it rose.
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": rate,
            "peak_rss_mib": peak_kib / 1024 if peak_kib > before else None, "info": info}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, nargs="+", default=[1e6, 1e7])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gistnet", nargs="+", default=["default"],
                        help="GistNet exports to time ('default': the light default config)")
    parser.add_argument("--device", nargs="+", default=[None],
                        help="where GistNet runs, each timed in turn (e.g. cpu cuda)")
    parser.add_argument("--prefetch", type=int, nargs="+", default=[None],
                        help="ingest --prefetch values, interleaved per repeat (e.g. 0 4)")
    parser.add_argument("--precision", nargs="+", default=[None],
                        choices=["float32", "bfloat16"],
                        help="ingest --precision values, interleaved per repeat")
    args = parser.parse_args(argv)

    from megacontext.base.loading import load_token_embeddings
    from megacontext.gistnet import GistNet, GistNetConfig, save_gistnet

    config, tokenizer, embedding = load_token_embeddings("smollm2-135m")
    results = []
    with tempfile.TemporaryDirectory(prefix="megacontext-bench-") as tmp:
        tmp = Path(tmp)
        net = GistNet(GistNetConfig(hidden_size=config.hidden_size))
        net.set_output_prior(embedding.mean(0))
        default = save_gistnet(net, tmp / "gistnet", config.fingerprint(tokenizer.sha256))
        gistnets = {name: default if name == "default" else Path(name) for name in args.gistnet}
        cases = ((s, g, d) for s in args.tokens for g in gistnets.items() for d in args.device)
        for size, (name, gdir), device in cases:
            corpus = tmp / f"corpus-{int(size)}.txt"
            if not corpus.exists():
                write_corpus(corpus, int(size), tokenizer)
            # interleaved: a1, a2, a1, a2, ... over (prefetch, precision) settings
            runs = {(p, q): [] for p in args.prefetch for q in args.precision}
            for i in range(args.repeats):
                for j, (p, q) in enumerate(runs):
                    tree = tmp / f"tree-{int(size)}-{i}-{j}"
                    runs[p, q].append(run_once(tree, corpus, gdir, device, p, q))
                    shutil.rmtree(tree)
            for (p, q), done in runs.items():
                results.append(report(done, name, device, p, list(gistnets), q))
    return results


def report(runs: list[dict], name: str, device: str | None, prefetch: int | None,
           names: list[str], precision: str | None = None) -> dict:
    """The result row of one case's runs, printed."""
    info = runs[-1]["info"]
    n = info["num_tokens"]
    row = {
        "gistnet": name,
        "device": device or "cpu",
        "prefetch": prefetch,
        "precision": precision or "float32",
        "tokens": n,
        "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
        "all_tokens_per_s": [round(r["tokens_per_s"]) for r in runs],
        "peak_rss_mib": max((r["peak_rss_mib"] or 0) for r in runs),
        "bytes_per_token": {f"L{k}": b / n for k, b in enumerate(info["bytes_per_level"])},
        "bytes_per_token_total": info["bytes_total"] / n,
    }
    label = (("" if names == ["default"] else f"{name}: ") + (f"[{device}] " if device else "")
             + (f"[prefetch {prefetch}] " if prefetch is not None else "")
             + (f"[{precision}] " if precision is not None else ""))
    print(f"{label}{n:>12,} tokens: median {row['median_tokens_per_s']:,.0f} tok/s "
          f"(runs: {', '.join(f'{v:,}' for v in row['all_tokens_per_s'])}), "
          f"peak RSS {row['peak_rss_mib']:,.0f} MiB, bytes/token "
          + ", ".join(f"{k} {v:.3f}" for k, v in row["bytes_per_token"].items())
          + f", total {row['bytes_per_token_total']:.3f}", flush=True)
    return row


if __name__ == "__main__":
    main()
