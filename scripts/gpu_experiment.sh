#!/usr/bin/env bash
# The GPU experiment in a fixed wall-time budget: `experiment=gpu` trained for about TRAIN_S
# seconds of steps (a 25-step probe measures s/step; max_steps, the validation interval and the
# warm-up follow from it, so the cosine schedule ends on time), then ingest throughput with
# GistNet on the CPU and on the GPU. Its output is quoted in docs/training.md ("experiment=gpu
# on one H200"), and its ingest numbers in docs/ingest.md ("Speed and size") and docs/scaling.md.
#
#   scripts/gpu_experiment.sh OUT_DIR [TRAIN_S=240] [extra train overrides...]
#   (PYTHON=... picks the interpreter; default .venv/bin/python when present)
#
# OUT_DIR gets probe/ and run/ (the training runs: gistnet/, history.json, curves) and
# ingest.txt. Score the export afterwards, anywhere:
#   python eval/eval.py compressor=OUT_DIR/run/gistnet substitutability.windows.num_l2_windows=8
set -euo pipefail
out=${1:?usage: scripts/gpu_experiment.sh OUT_DIR [TRAIN_S] [overrides...]}
train_s=${2:-240}
shift $(( $# >= 2 ? 2 : 1 ))
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
mkdir -p "$out"
common=(experiment=gpu logger=csv trainer.enable_progress_bar=false "$@")

"$python" train/train.py "${common[@]}" trainer.max_steps=25 trainer.limit_val_batches=0 \
  checkpoint_every=100000 hydra.run.dir="$out/probe"
sps=$("$python" -c "import json, sys; print(json.load(open(sys.argv[1]))['seconds_per_step'])" \
  "$out/probe/history.json")
read -r steps every warmup <<< "$("$python" -c "
n = max(100, int($train_s / $sps) // 100 * 100); print(n, n // 4, min(500, n // 10))")"
echo "probe: $sps s/step -> max_steps=$steps val_check_interval=$every warmup_steps=$warmup"

"$python" train/train.py "${common[@]}" trainer.max_steps="$steps" \
  trainer.val_check_interval="$every" module.warmup_steps="$warmup" checkpoint_every="$steps" \
  hydra.run.dir="$out/run"

"$python" -m megacontext.bench.ingest --tokens 4e6 --repeats 1 --device cpu cuda \
  | tee "$out/ingest.txt"
