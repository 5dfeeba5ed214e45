#!/bin/bash
# docs/results.md end to end: fine-tune SmolLM2-135M with the MemLong recipe on four pg19_like
# books, then score the held-out book, WikiText and proof_pile-like LaTeX at 2k..32k tokens.
#
#   experiments/smollm2_pg19.sh [keys|train|export|eval|ablations|report]...  (default: all but
#   ablations, which eval runs last)
#
# Needs `make demo` first (the converted SmolLM2 in demo_out/) and ../shared/data. Every stage
# skips work whose output exists, so a killed run resumes (train.run resumes from its checkpoint).
# The published run trained on one GPU (`train` there, `eval` here on the 2-core CPU); on a CPU
# alone the same `train` command works, at about 180 tokens/s (see docs/results.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-out/results}             # large outputs: key table, training run, merged model
RESULTS=${RESULTS:-experiments/results}  # small ones, committed: score JSONs, training metrics
STEPS=${STEPS:-415}
DATA_DIR=../shared/data
B=$DATA_DIR/pg19_like
TRAIN_DATA=$B/karamazov_brothers.txt,$B/les_miserables.txt,$B/moby_dick.txt,$B/war_and_peace.txt
HELD_OUT=$B/jane_eyre.txt
BASE=demo_out/smollm2-135m
TRAINED=$OUT/smollm2-135m-memlong
LENGTHS=2k,4k,8k,16k,32k
SCORE=(--local-window 1024 --lengths $LENGTHS -q)
[ -d "$DATA_DIR" ] || { echo "no $DATA_DIR: the evaluation text is not here" >&2; exit 2; }
[ -f "$BASE/config.json" ] || { echo "no $BASE: run make demo first" >&2; exit 2; }
mkdir -p "$OUT" "$RESULTS"

keys() {  # the text retriever's keys of the training corpus, computed once
  [ -f "$OUT/train_keys.npz" ] || $PY -m train.keys "$OUT/train_keys.npz" --config smollm2-135m \
    --set data=$TRAIN_DATA
}

train() {  # LoRA on layers 16-29 (memory layer 15), 16 streams x 1024 tokens per step
  $PY -m train.run --config smollm2-135m --set data=$TRAIN_DATA key_table="$OUT/train_keys.npz" \
    output_dir="$OUT/train" rows_per_replica=16 grad_accum=1 steps=$STEPS lr=1e-3 \
    warmup_steps=20 dtype=bfloat16 eval_every=0 eval_batches=1 eval_length=4096 \
    eval_window=1024 checkpoint_every=100 keep_checkpoints=1 log_every=5
  cp "$OUT/train/metrics.jsonl" "$RESULTS/metrics.jsonl"
}

export_model() {  # the run's adapter (or its checkpoints) merged into SmolLM2
  [ -d "$TRAINED" ] && return
  if [ -d "$OUT/adapter" ]; then $PY -m train.export "$OUT/adapter" "$TRAINED"
  else $PY -m train.export "$OUT/train" "$TRAINED"; fi
}

score() {  # NAME CKPT MODES INPUT... [extra flags after --]
  local name=$1 ckpt=$2 modes=$3; shift 3
  [ -f "$RESULTS/$name.json" ] || $PY -m memlong_jax.score "$ckpt" --modes "$modes" \
    "${SCORE[@]}" "$@" --json "$RESULTS/$name.json"
}

eval_all() {  # the held-out book (4 windows per length), WikiText and LaTeX, then the ablations
  local book=(--max-windows 4) wiki=("$DATA_DIR/wikitext/wikitext2_raw_test.txt" --join
    --max-windows 2) proof=("$DATA_DIR/proofpile_like" --max-windows 1)
  score jane_base "$BASE" memlong,local,full "$HELD_OUT" "${book[@]}"
  score jane_trained "$TRAINED" memlong,local "$HELD_OUT" "${book[@]}"
  score wiki_base "$BASE" memlong,local,full "${wiki[@]}"
  score wiki_trained "$TRAINED" memlong,local "${wiki[@]}"
  score proof_base "$BASE" memlong,local,full "${proof[@]}"
  score proof_trained "$TRAINED" memlong,local "${proof[@]}"
  ablations
}

ablations() {  # held-out book, trained model, 16k and 32k: one setting changed each
  local ab=("$HELD_OUT" --max-windows 4 --lengths 16k,32k)
  score abl_segment "$TRAINED" memlong "${ab[@]}" --set query_mode=segment
  score abl_hidden "$TRAINED" memlong "${ab[@]}" --set retriever=hidden
  score abl_paper_8k "$TRAINED" memlong "${ab[@]}" --set memory_tokens=8192
  score abl_fifo_8k "$TRAINED" memlong "${ab[@]}" --set memory_tokens=8192 --set eviction=fifo_half
}

report() { $PY -m experiments.results_report "$RESULTS" --doc docs/results.md; }

stages=("$@"); [ ${#stages[@]} -gt 0 ] || stages=(keys train export eval report)
for stage in "${stages[@]}"; do
  case $stage in
    keys) keys ;; train) train ;; export) export_model ;; eval) eval_all ;;
    ablations) ablations ;; report) report ;;
    *) echo "unknown stage $stage (keys, train, export, eval, ablations, report)" >&2; exit 2 ;;
  esac
done
