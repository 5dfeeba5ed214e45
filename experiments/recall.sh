#!/bin/bash
# docs/recall.md end to end: the recall benchmark on SmolLM2-135M (untrained MemLong, the
# checkpoint's default settings), then the report.
#
#   experiments/recall.sh [run|report]...   (default: both)
#
# Needs `make demo` first (the converted SmolLM2 in demo_out/) and ../shared/data. `run` is the
# default command (passkey and repeat at 2k, 8k, 32k; depths 0, 50, 100%; one item per cell).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CKPT=${CKPT:-demo_out/smollm2-135m}
RESULTS=${RESULTS:-experiments/results/recall}
NAME=${NAME:-smollm2_default}
[ -f "$CKPT/config.json" ] || { echo "no $CKPT: run make demo first" >&2; exit 2; }
mkdir -p "$RESULTS"

run() {
  # RECALL_ARGS: more options, e.g. "--tasks passkey,needle,repeat --items 2"
  $PY -m memlong_jax.recall "$CKPT" ${RECALL_ARGS:-} --json "$RESULTS/$NAME.json" \
    --csv "$RESULTS/$NAME.csv"
}

report() {
  $PY -m experiments.recall_report
}

for stage in ${@:-run report}; do $stage; done
