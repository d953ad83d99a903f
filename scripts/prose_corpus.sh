#!/usr/bin/env bash
# A small foreign corpus of plain English prose for cross-domain evaluation, made from text
# files every machine of this kind has: IDLE's NEWS, README, HISTORY … (the Python of the
# virtual environment) and the software licenses of /usr/share/common-licenses (regular files
# only: the GPL/LGPL/GFDL names are symlinks to versions already copied).
#   scripts/prose_corpus.sh [DIR]        (default outputs/prose)
#   .venv/bin/python eval/eval.py compressor=<run>/gistnet data=folder data.corpus=outputs/prose
# The corpus and what it measured: docs/training.md ("The recipe and its ablation"; the foreign
# corpus), docs/evaluation.md (cross-domain), docs/focus.md (passkey and read-out on foreign
# prose).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-outputs/prose}
PY=${PY:-.venv/bin/python}
idle=$($PY -c "import idlelib, os; print(os.path.dirname(idlelib.__file__))")
mkdir -p "$dest"
cp "$idle"/*.txt "$dest"/
if [ -d /usr/share/common-licenses ]; then
    find /usr/share/common-licenses -maxdepth 1 -type f -printf '%f\n' | while read -r name; do
        cp "/usr/share/common-licenses/$name" "$dest/license-$name.txt"
    done
fi
echo "$(ls "$dest" | wc -l) files in $dest"
