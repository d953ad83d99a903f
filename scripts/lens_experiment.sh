#!/usr/bin/env bash
# LensNet on the embedded SmolLM2 (its numbers: docs/focus.md, "Measured"): labelled examples
# and training on the memories of one GistNet, then passkey retrieval from memory
# (eval_passkey: 4,096 and 16,384 tokens, budget 1,024) with the scorers lens, lens_pool (lens
# with child_pool: a level-2 node scored by its best child), similarity and recency, in the
# default wording and in the wording training never used (eval_passkey_held_out).
#   scripts/lens_experiment.sh GISTNET_EXPORT [OUT_DIR] [train_lens overrides ...]
# Results: OUT_DIR/train (lens/, history.json, lens_curves.png), OUT_DIR/passkey_<scorer>_<wording>
# and OUT_DIR/passkey_table.md (eval/passkey_table.py).
set -euo pipefail
cd "$(dirname "$0")/.."
gistnet=$1
out=${2:-outputs/lens}
shift $(( $# > 1 ? 2 : 1 ))
PY=${PY:-.venv/bin/python}
mkdir -p "$out"
$PY train/train_lens.py compressor="$gistnet" hydra.run.dir="$out/train" logger=csv \
    progress_bar=false "$@" > "$out/train.log" 2>&1
grep -h "lens exported" "$out/train.log" || true
for scorer in ${SCORERS:-lens lens_pool similarity recency}; do
    for wording in default held_out; do
        config=eval_passkey
        [ "$wording" = held_out ] && config=eval_passkey_held_out
        dir="$out/passkey_${scorer}_${wording}"
        how="allocator.scorer=$scorer"  # lens_pool: level-2 nodes scored by their best child
        [ "$scorer" = lens_pool ] && how="allocator.scorer=lens +allocator.scorer_options.child_pool=true"
        $PY eval/eval.py --config-name "$config" compressor="$gistnet" lens="$out/train/lens" \
            $how progress_bar=false hydra.run.dir="$dir" \
            ${EVAL_OVERRIDES:-} > "$dir.log" 2>&1
        echo "$scorer $wording: done ($dir)"
    done
done
$PY eval/passkey_table.py "$out" | tee "$out/passkey_table.md"
