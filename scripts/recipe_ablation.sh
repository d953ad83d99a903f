#!/usr/bin/env bash
# Which recipe `make run` trains, at about equal wall time (not measured yet: docs/training.md,
# "Training speed"): three GistNets trained from scratch on the embedded SmolLM2, then
# paired on the ruler's validation windows in one eval/compare.py call.
#   a600    experiment=cpu, 600 steps (the recipe until 2026-12-07: 14-gist windows, no lane)
#   staged  experiment=cpu for 450 steps, then experiment=cpu_lane_mix from its export for 150
#           (rank-8 lane; half the level-1 batches 128-gist wide windows; a quarter level 2)
#   mix500  experiment=cpu_lane_mix from the start, 500 steps (a mixture step costs ~1.2x)
#   scripts/recipe_ablation.sh [OUT]          # OUT: outputs/recipe
# An arm already trained (its gistnet/ exists) is kept; wall times go to OUT/times.txt.
# JOBS=2 (the default) trains two runs at once, one thread each; the stages of `staged` run
# one after the other. Results: OUT/compare/ (A = a600, B1 = staged, B2 = mix500) and
# OUT/recipe-ablation.{md,json,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/recipe}
PY=${PY:-.venv/bin/python}
JOBS=${JOBS:-2}
mkdir -p "$out"
run() {  # NAME [train overrides ...]
    local name=$1; shift
    [ -f "$out/$name/gistnet/gistnet.safetensors" ] && return
    local t0; t0=$(date +%s)
    $PY train/train.py "$@" hydra.run.dir="$out/$name" > "$out/$name.log" 2>&1
    echo "$name $(( $(date +%s) - t0 )) s (jobs=$JOBS)" >> "$out/times.txt"
}
staged() {
    run staged_1 experiment=cpu trainer.max_steps=450 trainer.val_check_interval=225
    run staged experiment=cpu_lane_mix "init_from=$out/staged_1/gistnet" trainer.max_steps=150 \
        trainer.val_check_interval=150 module.warmup_steps=10
}
export OMP_NUM_THREADS=$(( JOBS > 1 ? 1 : $(nproc) ))
if [ "$JOBS" -le 1 ]; then
    run a600 experiment=cpu
    staged
    run mix500 experiment=cpu_lane_mix trainer.max_steps=500 trainer.val_check_interval=250
else
    { run a600 experiment=cpu; run mix500 experiment=cpu_lane_mix trainer.max_steps=500 \
        trainer.val_check_interval=250; } &
    staged &
    wait
fi
for name in a600 staged mix500; do
    [ -f "$out/$name/gistnet/gistnet.safetensors" ] || { echo "run $name failed: $out/$name.log"; exit 1; }
done
unset OMP_NUM_THREADS
$PY eval/compare.py "$out/a600/gistnet" "$out/staged/gistnet" "$out/mix500/gistnet" \
    --config-name eval_ruler allow_untrained_levels=true substitutability.windows.num_windows=64 \
    substitutability.windows.num_l2_windows=8 long_range.positions=compact \
    progress_bar=false output_dir="$out/compare"
$PY eval/lane_ablation_table.py "staged=$out/compare/B1" "mix500=$out/compare/B2" \
    --reference "a600=$out/compare/A" --times "$out/times.txt" --out "$out/recipe-ablation"
