"""The reading ladder (issue 14, item 3): why SmolLM2-135M gains nothing from MemLong's memory,
measured without training.

    .venv/bin/python -m experiments.recall_diagnosis [--windows 3] [--out FILE]

2048-token windows with a 1024-token local window: the 1024-token prefix is 8 chunks and top-8
retrieves all of it, so retrieval cannot miss; what is left is how the memory is *read*. Two
texts: the held-out book (Jane Eyre) and a `repeat` stream (a 512-token passage of the book, 1024
tokens of another book, the passage again: the copy lies 1536 tokens back, beyond the local
window). Rows: `local`, `full`, and MemLong with the reading steps

  a  today (upstream: prefix chunks alone, keys at position 0, every retrieval layer reads the
     memory layer's K/V)
  b  a + prefix K/V computed with context (`prefix_context=window`)
  c  b + retrieval at the memory layer only (`retrieval_layers=15`)
  d  b + memory keys at their true RoPE positions (`memory_positions=true`)
  e  d + each retrieval layer reading its own K/V (`memory_kv=per_layer`)
  e+ e with every layer from the memory layer up reading memory (15..29)

For each: NLL of the scored 1023 predictions (and of the repeated copy's 512), the share of the
local-to-full gap recovered, the per-position NLL difference to `local` (8 bins of 128), and the
attention mass on memory per retrieval layer and head. The retriever is `hidden` (all 8 chunks
are retrieved in any case). Writes experiments/results/recall_diagnosis.json; render with
`python -m experiments.recall_diagnosis_report`.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import memlong_jax as ml
from bench import common   # run record, atomic JSON
from memlong_jax.eval.scoring import Protocol, Scorer
from memlong_jax.memlong import diagnostics, scan

CKPT = "/work/main/demo_out/smollm2-135m"
DATA = os.path.join(common.SHARED_DATA, "pg19_like")
LENGTH, LOCAL, PASSAGE = 2048, 1024, 512
WITH_CONTEXT = dict(prefix_context="window")
TRUE = dict(WITH_CONTEXT, memory_positions="true")
STEPS = (("a", "today (upstream reading)", {}),
         ("b", "+ prefix K/V with context", WITH_CONTEXT),
         ("c", "b + retrieval at the memory layer only", dict(WITH_CONTEXT,
                                                              retrieval_layers=(15,))),
         ("d", "b + memory keys at true positions", TRUE),
         ("e", "d + each retrieval layer its own K/V", dict(TRUE, memory_kv="per_layer")),
         ("e+", "e with layers 15..29 all reading memory",
          dict(TRUE, memory_kv="per_layer", retrieval_layers=tuple(range(15, 30)))))
BINS = 8


def texts(tokenizer, windows: int) -> dict[str, list[np.ndarray]]:
    """`book`: consecutive 2048-token windows of Jane Eyre from token 20k; `repeat`: passage +
    1024 tokens of Moby Dick + the passage again, passages from the same book region."""
    read = lambda name: np.asarray(tokenizer.encode(
        open(os.path.join(DATA, name), encoding="utf-8").read()).ids, np.int32)
    book, other = read("jane_eyre.txt"), read("moby_dick.txt")
    start = 20_000
    book_windows = [book[start + i * LENGTH:start + (i + 1) * LENGTH] for i in range(windows)]
    repeat = []
    for i in range(windows):
        passage = book[start + i * LENGTH:start + i * LENGTH + PASSAGE]
        filler = other[30_000 + i * LENGTH:30_000 + i * LENGTH + LENGTH - 2 * PASSAGE]
        repeat.append(np.concatenate([passage, filler, passage]))
    return {"book": book_windows, "repeat": repeat}


@functools.partial(jax.jit, static_argnames=("module", "mcfg"))
def ingest(module, mcfg, params, state, prefix):
    return scan.ingest_prefix(module, mcfg, params, state, prefix, window=LOCAL)


@functools.partial(jax.jit, static_argnames=("module", "mcfg"))
def memory_mass(module, mcfg, params, state, ids):
    """Attention mass on memory `[layers, heads]` of the final window `ids` `[1, S]`."""
    return diagnostics.segment_memory_mass(module, mcfg, params, state, ids).mean(axis=0)


def summarise(nll: np.ndarray, local: np.ndarray, full: np.ndarray) -> dict:
    """Means over windows of the scored predictions and of the last PASSAGE ones (the copy)."""
    gap = local.mean() - full.mean()
    diff = (nll - local).mean(axis=0)
    return {"nll": float(nll.mean()), "copy_nll": float(nll[:, -PASSAGE:].mean()),
            "gap_recovered": float((local.mean() - nll.mean()) / gap) if gap else None,
            "copy_gap_recovered": float((local[:, -PASSAGE:].mean() - nll[:, -PASSAGE:].mean())
                                        / (local[:, -PASSAGE:].mean() - full[:, -PASSAGE:].mean())),
            "diff_vs_local_by_position": [float(b.mean()) for b in np.array_split(diff, BINS)],
            "per_window_nll": [float(w.mean()) for w in nll]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=3, help="windows per text (default 3)")
    p.add_argument("--steps", default=",".join(name for name, _, _ in STEPS),
                   help="comma-separated ladder steps to run (default: all)")
    p.add_argument("--checkpoint", default=CKPT, help=f"converted SmolLM2 (default {CKPT})")
    p.add_argument("--out", default=os.path.join(common.REPO, "experiments", "results",
                                                  "recall_diagnosis.json"))
    args = p.parse_args(argv)
    if args.windows < 1:
        p.error("--windows must be at least 1")
    chosen = args.steps.split(",")
    if not set(chosen) <= {name for name, _, _ in STEPS}:
        p.error(f"--steps: choose from {', '.join(name for name, _, _ in STEPS)}")
    if not os.path.isdir(DATA) or not os.path.isdir(args.checkpoint):
        print(f"needs {DATA} and {args.checkpoint}", file=sys.stderr)
        return 2
    started, git = time.perf_counter(), common.git_commit()
    model = ml.load(args.checkpoint)
    base = model.memlong_config.replace(retriever="hidden", query_mode="causal")
    protocol = Protocol(lengths=(LENGTH,), local_window=LOCAL, scored_tokens=LOCAL)
    data = texts(model.tokenizer, args.windows)
    rows = [("local", None, "local", {}), ("full", None, "full", {})] + [
        (name, label, "memlong", change) for name, label, change in STEPS if name in chosen]
    nll = {text: {} for text in data}
    results = {"steps": [], "texts": {}}
    bar = tqdm(total=len(rows) * sum(map(len, data.values())), desc="windows")
    for name, label, mode, change in rows:
        mcfg = base.replace(**change).validate(model.config)
        scorer = Scorer(model.module, model.params, mcfg, protocol)
        masses = []
        for text, windows in data.items():
            per_window = []
            for ids in windows:
                bar.set_description(f"{name} {text}")
                state, out = scorer.window_nll(mode, ids[None])
                per_window.append(np.asarray(out)[0])
                if mode == "memlong":   # the memory as the window found it: ingest again
                    state = ingest(model.module, mcfg, model.params, scorer.empty_state(),
                                   jnp.asarray(ids[None, :LENGTH - LOCAL]))
                    masses.append(np.asarray(memory_mass(model.module, mcfg, model.params, state,
                                                         jnp.asarray(ids[None, -LOCAL:]))))
                bar.update()
            nll[text][name] = np.stack(per_window)
        results["steps"].append({"name": name, "label": label or name, "mode": mode,
                                 "memlong": mcfg.to_dict() if mode == "memlong" else None,
                                 "memory_mass": np.mean(masses, axis=0).tolist() if masses
                                 else None})
        for text, by_row in nll.items() if mode != "local" else ():   # after every row: a
            # killed run keeps what it measured
            results["texts"][text] = {row: summarise(values, by_row["local"], by_row["full"])
                                      for row, values in by_row.items()}
        config = {"checkpoint": args.checkpoint, "length": LENGTH, "local_window": LOCAL,
                  "passage": PASSAGE, "windows": args.windows, "base": base.to_dict()}
        data_out = common.record("recall_diagnosis", args, config, git=git)
        data_out["results"] = results
        data_out["wall_s"] = time.perf_counter() - started
        path = common.write_json(args.out, data_out)
    bar.close()
    print(f"recall_diagnosis: wrote {os.path.relpath(path)} ({data_out['wall_s']:.0f} s)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
