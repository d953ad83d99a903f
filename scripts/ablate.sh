#!/usr/bin/env bash
# One arm of a GistNet recipe ablation: train with the given overrides, then evaluate on the
# VALIDATION documents (configs/eval_quick.yaml). Results land in outputs/ablation/NAME/
# (train/, eval/, arm.json with the overrides and wall times).
#   scripts/ablate.sh NAME [train overrides ...]
#   scripts/ablate.sh wide experiment=cpu trainer.max_steps=150 gistnet.width=256
# Then: .venv/bin/python eval/ablation_table.py outputs/ablation   (one row per arm)
# The arms run so far and their table: docs/training.md, "The recipe and its ablation".
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1; shift
out=outputs/ablation/$name
PY=${PY:-.venv/bin/python}
mkdir -p "$out"
start=$(date +%s)
$PY train/train.py "$@" logger=csv hydra.run.dir="$out/train" > "$out/train.log" 2>&1
trained=$(date +%s)
$PY eval/eval.py --config-name eval_quick compressor="$out/train/gistnet" progress_bar=false \
    hydra.run.dir="$out/eval" ${EVAL_OVERRIDES:-} > "$out/eval.log" 2>&1
done_at=$(date +%s)
printf '{"name": "%s", "overrides": "%s", "train_seconds": %d, "eval_seconds": %d}\n' \
    "$name" "$*" $((trained - start)) $((done_at - trained)) > "$out/arm.json"
tail -n 30 "$out/eval/substitutability.md"
