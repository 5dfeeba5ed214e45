#!/usr/bin/env bash
# Golden outputs for refactors: run before and after a change, then compare the two directories
# with experiments/golden_compare.py (NLLs, tokens and losses; timings are ignored).
#   experiments/golden.sh CKPT OUT_DIR
set -euo pipefail
CKPT=${1:?converted checkpoint}; OUT=${2:?output directory}
PY=${PY:-python}
BOOK=${BOOK:-../shared/data/pg19_like/jane_eyre.txt}
mkdir -p "$OUT"
export PYTHONHASHSEED=0
$PY -m memlong_jax.demo "$CKPT" --tokens 512 > "$OUT/demo.txt"
$PY -m memlong_jax.score "$CKPT" "$BOOK" --lengths 4k,8k --modes memlong,local,full \
    --max-windows 1 --local-window 2k --scored-tokens 512 --json "$OUT/score.json" -q > "$OUT/score.txt"
$PY -m memlong_jax.score "$CKPT" "$BOOK" --lengths 4k --modes memlong --max-windows 1 \
    --local-window 2k --scored-tokens 512 --set retriever=hidden --set query_mode=segment \
    --json "$OUT/score_hidden.json" -q > "$OUT/score_hidden.txt"
head -c 20000 "$BOOK" | $PY -m memlong_jax.generate "$CKPT" --max-new-tokens 24 --window 512 \
    > "$OUT/generate.txt"
$PY -m memlong_jax.icl "$CKPT" --tasks sst-2 --k 2 --m 4 --seeds 1 --limit 4 \
    --json "$OUT/icl.json" -q > "$OUT/icl.txt"
rm -rf "$OUT/train"
$PY -m train.run --config tiny --set steps=12 "output_dir=$OUT/train" "cache_dir=$OUT/cache" \
    progress=false eval_every=6 log_every=1 > "$OUT/train.txt" 2>&1
cp "$OUT/train/metrics.jsonl" "$OUT/train_metrics.jsonl"
