#!/usr/bin/env bash
# The gist lane's ablation (docs/training.md, "The lane's ablation"): arms of the lane-mixture
# recipe (experiment=cpu_lane_mix: rank 8 on q, k, v, o of every layer; half the level-1
# batches 128-gist wide windows, a quarter of all batches level 2), 150 steps each from one
# make-run export, then every arm paired with the reference arm on the ruler's validation
# windows in one eval/compare.py call (the reference scored once), and the table and plot of
# eval/lane_ablation_table.py.
#   scripts/lane_ablation.sh <make run>/train/gistnet [OUT]      # OUT: outputs/lane_ablation
# An arm already trained (its gistnet/ exists) is kept; its wall time is in OUT/times.txt.
# JOBS=2 trains two arms at once, one thread each (more throughput on a 2-core CPU; the wall
# times are then those of two runs sharing the machine).
# Results: OUT/compare/ (A/ the reference, B1 … B6 the arms below in order) and
# OUT/lane-ablation.{md,json,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?usage: scripts/lane_ablation.sh <make run>/train/gistnet [OUT]}
out=${2:-outputs/lane_ablation}
PY=${PY:-.venv/bin/python}
JOBS=${JOBS:-1}
mkdir -p "$out"
common=(experiment=cpu_lane_mix "init_from=$base" trainer.max_steps=150
        trainer.val_check_interval=150 module.warmup_steps=10 data.max_val_windows=16)
train_arm() {  # NAME [train overrides ...]
    local name=$1; shift
    local t0; t0=$(date +%s)
    $PY train/train.py "${common[@]}" "$@" hydra.run.dir="$out/$name" > "$out/$name.log" 2>&1
    echo "$name $(( $(date +%s) - t0 )) s (jobs=$JOBS)" >> "$out/times.txt"
}
arm() {  # NAME [train overrides ...]
    [ -f "$out/$1/gistnet/gistnet.safetensors" ] && return
    if [ "$JOBS" -le 1 ]; then train_arm "$@"; return; fi
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    OMP_NUM_THREADS=1 train_arm "$@" &
}
# ARMS="off rank16" runs a subset of the arms (in the order given; the reference always).
read -r -a names <<< "${ARMS:-off rank4 rank16 rank32 mlp last_half}"  # compare/B1 … Bk
[ "${#names[@]}" -ge 2 ] || { echo "ARMS needs two arms or more (for one: eval/compare.py A B)"; exit 2; }
declare -A overrides=(
    [off]="module.lane=null"                                   # GistNet alone on the same mixture
    [rank4]="module.lane.rank=4 module.lane.alpha=8"           # alpha / rank = 2 in every arm
    [rank16]="module.lane.rank=16 module.lane.alpha=32"
    [rank32]="module.lane.rank=32 module.lane.alpha=64"
    [mlp]="module.lane.targets=[q,k,v,o,gate,up,down]"
    [last_half]="module.lane.layers=last_half"
)
arm rank8                                                      # the reference: cpu_lane_mix as it is
for name in "${names[@]}"; do
    [ -n "${overrides[$name]:-}" ] || { echo "unknown arm '$name' (known: ${!overrides[*]})"; exit 2; }
    read -r -a o <<< "${overrides[$name]}"
    arm "$name" "${o[@]}"
done
wait
for name in rank8 "${names[@]}"; do
    [ -f "$out/$name/gistnet/gistnet.safetensors" ] || { echo "arm $name failed: $out/$name.log"; exit 1; }
done
paths=() arms=()
for i in "${!names[@]}"; do
    paths+=("$out/${names[$i]}/gistnet")
    arms+=("${names[$i]}=$out/compare/B$((i + 1))")
done
$PY eval/compare.py "$out/rank8/gistnet" "${paths[@]}" --config-name eval_ruler \
    allow_untrained_levels=true substitutability.windows.num_windows=64 \
    substitutability.windows.num_l2_windows=8 long_range.positions=compact \
    progress_bar=false output_dir="$out/compare"
$PY eval/lane_ablation_table.py "${arms[@]}" --reference "rank8=$out/compare/A" \
    --times "$out/times.txt" --out "$out/lane-ablation"
