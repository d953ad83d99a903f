#!/usr/bin/env bash
# Report finished ablation arms once, after the recipe was chosen on validation: each arm's
# GistNet on the TEST documents of its training corpus and on a foreign corpus it never saw
# (a folder of plain-text files; scripts/prose_corpus.sh makes one). Results land in
# outputs/ablation/NAME/eval_test and eval_foreign; the main arms' numbers are in
# docs/training.md, "Test split and foreign corpus, once".
#   scripts/ablate_report.sh FOREIGN_DIR NAME [NAME ...]
# Then: .venv/bin/python eval/ablation_table.py outputs/ablation --eval eval_test
#       .venv/bin/python eval/ablation_table.py outputs/ablation --eval eval_foreign
set -euo pipefail
cd "$(dirname "$0")/.."
foreign=$1; shift
PY=${PY:-.venv/bin/python}
for name in "$@"; do
    out=outputs/ablation/$name
    test -d "$out/train/gistnet" || { echo "$out/train/gistnet: no trained arm" >&2; exit 2; }
    $PY eval/eval.py --config-name eval_quick compressor="$out/train/gistnet" split=test \
        progress_bar=false hydra.run.dir="$out/eval_test" ${EVAL_OVERRIDES:-} \
        > "$out/eval_test.log" 2>&1
    $PY eval/eval.py --config-name eval_quick compressor="$out/train/gistnet" split=auto \
        data=folder data.corpus="$foreign" progress_bar=false hydra.run.dir="$out/eval_foreign" \
        ${EVAL_OVERRIDES:-} > "$out/eval_foreign.log" 2>&1
    echo "$name: $(grep -h '^| \*\*gist' "$out/eval_test/substitutability.md" | head -1)"
done
