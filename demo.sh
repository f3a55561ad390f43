#!/usr/bin/env bash
# End to end on the built-in toy data: install, make the data, build vocabulary and labels, train,
# evaluate with retrieval examples. About a minute on a laptop CPU after the install.
#   ./demo.sh [OUT_DIR]     (default runs/demo; a rerun into the same folder starts clean)
set -euo pipefail
cd "$(dirname "$0")"
OUT=${1:-runs/demo}
MARK="$OUT/.casc_demo"  # marks a folder this script made, so that a rerun may clear it
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then
  if [ ! -e "$MARK" ]; then
    echo "demo: $OUT exists and was not made by demo.sh; choose an empty or new folder" >&2
    exit 1
  fi
  echo "demo: clearing the earlier demo run in $OUT"
  rm -rf "$OUT/data" "$OUT/vocab" "$OUT/log" "$OUT/examples" "$OUT"/checkpoint_*.pth.tar "$OUT/model_best.pth.tar"
fi
./install.sh
mkdir -p "$OUT" && touch "$MARK"
PY=.venv/bin/python
DATA=(--data_path "$OUT/data" --data_name toy_precomp --vocab_path "$OUT/vocab")
$PY toy.py "$OUT/data"
$PY vocab.py "${DATA[@]}"
$PY labels.py "${DATA[@]}" --num_labels 24
# The toy features have 64 dims; small embeddings and a higher learning rate keep it to minutes.
$PY train.py "${DATA[@]}" --logger_name "$OUT/log" --model_name "$OUT" --img_dim 64 --embed_size 128 \
  --word_dim 64 --num_labels 24 --label_hidden 64 --learning_rate 1e-3 --num_epochs 3 --log_step 40 \
  --val_step 100000 --workers 0
$PY evaluation.py --model_path "$OUT/model_best.pth.tar" --split test --examples 3 --out "$OUT/examples"
echo "demo done: checkpoints in $OUT, TensorBoard logs in $OUT/log (tensorboard --logdir $OUT/log)," \
     "retrieval examples in $OUT/examples/examples.html"
