#!/bin/bash
# Issue 15 phase 1: zero-training reading levers on SmolLM2-135M (no fine-tuning), one JSON per
# (configuration, task) in experiments/results/levers/ (written as each finishes).
#
#   experiments/lever_sweep.sh [CONFIG...]   (default: all; names below)
#
# Every memlong configuration reads per-layer K/V at true positions with the prefix computed
# in local windows (the settings that make MemLong equal `full` when everything is retrieved);
# they differ in which layers see memory (and l8_all_near in where the retrieved chunks sit).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CKPT=${CKPT:-demo_out/smollm2-135m}
OUT=${OUT:-experiments/results/levers}
mkdir -p "$OUT"
READ="--set query_mode=chunk --set memory_kv=per_layer --set memory_positions=true --set prefix_context=window"
declare -A SETS=(
  [upstream]="--set query_mode=chunk"
  [l15_every4]="$READ --set retrieval_layers=15,19,23,27"
  [l15_all]="$READ --set retrieval_layers=$(seq -s, 15 29)"
  [l8_all]="$READ --set memory_layer=8 --set retrieval_layers=$(seq -s, 8 29)"
  [l8_all_near]="$READ --set memory_layer=8 --set retrieval_layers=$(seq -s, 8 29) --set memory_positions=near --set continuation=true"
)
declare -A REPEAT_LENGTHS=([l8_all_near]=2k,8k)   # default 2k
for name in ${@:-baselines upstream l15_every4 l15_all l8_all}; do
  if [ "$name" = baselines ]; then rows="--rows local,full"; extra=""; else rows="--rows memlong"; extra=${SETS[$name]}; fi
  lengths=${REPEAT_LENGTHS[$name]:-2k}
  $PY -m memlong_jax.recall "$CKPT" --tasks repeat --lengths $lengths --depths 0 $rows $extra \
    --json "$OUT/${name}_repeat_${lengths/,/_}.json" -q
  [ "$name" = l8_all_near ] && continue   # its passkey: experiments/train15_measure.sh
  $PY -m memlong_jax.recall "$CKPT" --tasks passkey --lengths 4k --depths 0,50 $rows $extra \
    --json "$OUT/${name}_passkey_4k.json" -q
done
