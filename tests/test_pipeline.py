"""`make run`'s pipeline on the tiny model: GistNet training, then the evaluation; with
`LENS=1`, LensNet on that GistNet's memories between them and an evaluation that uses the lens
— each stage given the very overrides the Makefile's `run` recipe passes (the commands
`make -n run` prints), plus sizes that fit a test."""

from __future__ import annotations

import json
import random
import shlex
import string
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def run_recipe_overrides(script: str, run_dir: Path, **variables: str) -> list[str]:
    """The ``key=value`` arguments ``make run`` gives ``script`` (Hydra's own ``hydra.*`` left
    out), as ``make -n run RUN_DIR=<run_dir> <variables>`` prints them; [] if it is not run."""
    printed = subprocess.run(
        ["make", "-n", "--no-print-directory", "run", f"RUN_DIR={run_dir}",
         *(f"{k}={v}" for k, v in variables.items())],
        cwd=ROOT, check=True, capture_output=True, text=True).stdout.replace("\\\n", " ")
    lines = [line for line in printed.splitlines() if f"/python {script} " in line]
    assert len(lines) <= 1, f"make run calls {script} {len(lines)} times"
    return [t for t in shlex.split(lines[0]) if "=" in t and not t.startswith("hydra.")] \
        if lines else []


@pytest.mark.parametrize("lens", ["0", "1"])
def test_make_run_pipeline_on_the_tiny_model(tiny_model_dir, tmp_path, lens):
    from megacontext.evaluation import evaluate
    from megacontext.training.lens import train_lens
    from megacontext.training.train import train

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        rng = random.Random(i)
        (docs / f"d{i:02d}.txt").write_text("".join(
            rng.choice(string.ascii_letters + "      \n") for _ in range(5000 + 200 * i)))
    run = tmp_path / "run"
    model = f"model.name={tiny_model_dir}"
    split = ["val_fraction=0.25", "test_fraction=0.25"]

    train_args = run_recipe_overrides("train/train.py", run, LENS=lens)
    assert train_args == ["experiment=cpu"]  # the recipe; the test trains the smoke one
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=smoke", model, f"output_dir={run / 'train'}", "data=folder",
            f"data.corpus={docs}", "data.min_tokens=1", *(f"data.{s}" for s in split)])
    train(cfg)
    assert (run / "train" / "gistnet" / "gistnet.json").is_file()

    lens_args = run_recipe_overrides("train/train_lens.py", run, LENS=lens, LENS_EXAMPLES="8")
    assert bool(lens_args) == (lens == "1")  # LensNet is trained with LENS=1 only
    if lens == "1":
        with initialize_config_dir(str(CONFIGS), version_base="1.3"):
            cfg = compose("train_lens", overrides=[
                *lens_args, model, f"corpus={docs}", *split,
                f"output_dir={run / 'lens_train'}", "logger=csv",
                "examples.lengths=[512,1024]", "examples.budgets=[128]", "trainer.max_steps=4",
                "trainer.val_check_interval=2", "batch_size=4", "progress_bar=false",
                "lensnet.width=16", "lensnet.heads=2"])
        train_lens(cfg)
        assert (run / "lens" / "lens.json").is_file()  # the recipe's export_dir, <run>/lens

    eval_args = run_recipe_overrides("eval/eval.py", run, LENS=lens)
    lensed = {"allocator.scorer=lens", "substitutability.mixed.scorer=lens",
              "substitutability.mixed.compare=recency", f"lens={run / 'lens'}"}
    assert lensed <= set(eval_args) if lens == "1" else not lensed & set(eval_args)
    assert {"substitutability.variants=[]", "substitutability.distance.num_windows=0"} \
        <= set(eval_args)  # make run's cuts to stay within ~20 minutes
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("eval", overrides=[
            *eval_args, model, "data=folder", f"data.corpus={docs}", "data.min_tokens=1",
            *(f"data.{s}" for s in split), f"output_dir={run / 'eval'}", "progress_bar=false",
            f"cache_dir={run / 'arms'}",
            "long_range.enabled=false", "substitutability.windows.context_spans=3",
            "substitutability.windows.tail_tokens=8", "substitutability.windows.horizon=8",
            "substitutability.windows.horizons=[8]", "substitutability.windows.num_windows=4",
            "substitutability.windows.num_l2_windows=1", "substitutability.mixed.budgets=[11,48]",
            "substitutability.bootstrap=50", "passkey.lengths=[300]", "passkey.depths=[0.5]",
            "passkey.trials=1", "allocator.budget=96", "allocator.tail_tokens=16",
            "passkey.max_new_tokens=6"])
    results = evaluate(cfg)
    saved = json.loads((run / "eval" / "substitutability.json").read_text())
    mixed = saved["l1"]["mixed"]
    assert mixed and all("gain_vs_streaming" in row for row in mixed), mixed
    assert all("gain_vs_compare" in row for row in mixed), mixed  # lexical, or recency (lens)
    assert results["passkey"]["scorer"] == ("lens" if lens == "1" else "lexical")
    assert "Memory vs streaming at equal entries" in (run / "eval" /
                                                      "substitutability.md").read_text()
