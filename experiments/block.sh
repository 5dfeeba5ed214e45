#!/bin/bash
# docs/block_memory.md end to end: block memory (`block` rows) against local, full and MemLong
# on SmolLM2-135M, no training; one process at a time, each stage writes its own JSON.
#
#   experiments/block.sh [passkey|passkey128k|repeat|ppl32k|ppl16k|cost|report]...
#   (default: all)
#
# Needs the converted SmolLM2 (CKPT) and ../shared/data. Item counts are small (the shared CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CKPT=${CKPT:-demo_out/smollm2-135m}
OUT=${OUT:-experiments/results/block}
BOOK=${BOOK:-../shared/data/pg19_like/jane_eyre.txt}
[ -f "$CKPT/config.json" ] || { echo "no $CKPT: run make demo first" >&2; exit 2; }
mkdir -p "$OUT"

passkey() {   # full at 2k/8k is the model's own ability; block at 2k..32k
  $PY -m memlong_jax.recall "$CKPT" --tasks passkey --lengths 2k,8k,32k --depths 50 --items 1 \
    --rows full,block --json "$OUT/passkey.json"
}
passkey128k() {   # memory for every block of 128k tokens; bfloat16 storage keeps it at 3 GB
  $PY -m memlong_jax.recall "$CKPT" --tasks passkey --lengths 128k --depths 50 --items 1 \
    --rows block --block memory_tokens=131072 --block mem_dtype=bfloat16 \
    --json "$OUT/passkey_128k.json"
}
repeat() {
  $PY -m memlong_jax.recall "$CKPT" --tasks repeat --lengths 4k,8k --items 1 \
    --rows local,full,block --json "$OUT/repeat.json"
}
ppl32k() {   # memlong, local and block on the same window: PPL and time per token in one run
  $PY -m memlong_jax.score "$CKPT" "$BOOK" --lengths 32k --max-windows 1 \
    --modes memlong,local,block --json "$OUT/ppl_32k.json"
}
ppl16k() {
  $PY -m memlong_jax.score "$CKPT" "$BOOK" --lengths 16k --max-windows 1 --modes local,block \
    --json "$OUT/ppl_16k.json"
}
cost() {
  $PY -m bench.block_cost --checkpoint "$CKPT" --out "$OUT/cost.json"
}
report() {
  $PY -m experiments.block_report
}

for stage in ${@:-passkey passkey128k repeat ppl32k ppl16k cost report}; do $stage; done
