"""ICL protocol cost per (item, seed): the shared demonstration prefix run once (`ICLScorer`'s
default) against every window run whole (`share_prefix=False`, the path before issue 19), side
by side in one process on the same items, SmolLM2 with its own MemLong settings.

    .venv/bin/python -m bench.icl [--checkpoint DIR] [--k 20] [--limit 8]

For each row (`local`, `memlong m`, `full m`) of one (task, seed, k) the same queries are scored
by both paths, the per-item path first; compilation is timed apart (`ICLScorer.compile_seconds`).
The prefix (the k demonstrations, once per (task, seed, k)) is timed on its own and charged to
the new path once, over the measured items only (the full protocol spreads it over hundreds).
`full` windows start with each item's own memory demonstrations, so they share no prefix and
both paths run the same code: `full` is scored once and counted on both sides. The label
scores of the two paths are compared (max abs difference). The machine's matmul peak and the
load average after each row are recorded: on a shared machine only the ratio means something.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from bench import common
from memlong_jax.eval import icl
from memlong_jax.memlong.retrievers import make_retriever

NAME = "icl"


def score_timed(scorer, queries, labels) -> tuple[float, np.ndarray]:
    """(seconds without compilation, label scores)."""
    compiled, start = scorer.compile_seconds, time.perf_counter()
    scores, _ = scorer.score(queries, labels)
    return time.perf_counter() - start - (scorer.compile_seconds - compiled), scores


def prefix_seconds(scorer, queries) -> float:
    """The shared prefix of `queries` run once (compilation apart); kept by the scorer."""
    compiled, start = scorer.compile_seconds, time.perf_counter()
    jax.block_until_ready(scorer.prefix([q.window for q in queries])[1])
    return time.perf_counter() - start - (scorer.compile_seconds - compiled)


def main() -> None:
    p = common.parser(__doc__, NAME)
    p.add_argument("--checkpoint", default=common.SMOLLM2_CKPT)
    p.add_argument("--task", default="sst-2")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--m", default="18,38")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--data", default=icl.DEFAULT_DATA)
    args = p.parse_args()
    if args.quick:
        args.k, args.m, args.limit = 4, "6", 2
    started, git = time.perf_counter(), common.git_commit()
    model, _ = common.load_smollm2(common.require_checkpoint(args.checkpoint))
    mcfg = model.memlong_config.validate(model.config)
    ms = tuple(common.parse_list(args.m, int))
    settings = icl.Settings(tasks=(args.task,), ks=(args.k,), ms=ms, seeds=(args.seed,),
                            limit=args.limit).validate()
    data = icl.load_data(args.data, settings)[0]
    labels = icl.label_token_ids(model.tokenizer, data.task)
    groups = [g for g in icl.build_groups(model.tokenizer, mcfg.chunk_size, data, settings,
                                          model.config.max_position_embeddings,
                                          max(len(t) for t in labels)) if g.queries]
    retriever = make_retriever(mcfg, model.tokenizer)
    capacity = icl.memory_capacity(groups, mcfg.chunk_size)
    new, old = (icl.ICLScorer(model.module, model.params, mcfg, retriever, capacity,
                              share_prefix=share) for share in (True, False))
    config = {"task": args.task, "k": args.k, "ms": list(ms), "seed": args.seed,
              "items": len(data.items), "memlong": mcfg.to_dict(),
              "matmul_peak": common.matmul_peak()}
    results = {"rows": [], "prefix_s": None}

    def save():
        common.write_json(args.out or common.default_out(NAME, args.quick),
                          {**common.record(NAME, args, config, git=git), "results": results,
                           "wall_s": time.perf_counter() - started})

    for group in groups:
        name = icl.row_name({"row": group.row, "m": group.m})
        windows = [q.window for q in group.queries]
        row = {"row": group.row, "m": group.m, "name": name, "items": len(windows),
               "window_tokens_mean": float(np.mean([len(w) for w in windows])),
               "memory_tokens_mean": float(np.mean([len(q.memory) for q in group.queries])),
               "shared_prefix_tokens": icl.shared_prefix(windows)}
        if group.row != "full":
            row["old_s"], expected = score_timed(old, group.queries, labels)
            if results["prefix_s"] is None:
                results["prefix_s"] = prefix_seconds(new, group.queries)
                results["prefix_tokens"] = row["shared_prefix_tokens"]
        row["new_s"], scores = score_timed(new, group.queries, labels)
        if group.row == "full":
            row["old_s"], expected = row["new_s"], scores
        row["max_abs_diff"] = float(np.abs(scores - expected).max())
        row["speedup"] = row["old_s"] / row["new_s"]
        row["load_average"] = os.getloadavg()
        results["rows"].append(row)
        print(f"{name}: per item {row['old_s'] / row['items']:.2f} s -> "
              f"{row['new_s'] / row['items']:.2f} s ({row['speedup']:.2f}x), "
              f"max |diff| {row['max_abs_diff']:.2e}, load {row['load_average'][0]:.1f}",
              flush=True)
        save()
    items = len(data.items)
    old_total = sum(r["old_s"] for r in results["rows"])
    new_total = sum(r["new_s"] for r in results["rows"])
    prefix = results["prefix_s"] or 0.0
    results["per_item_seed"] = {
        "old_s": old_total / items, "new_s": (new_total + prefix) / items,
        "new_s_prefix_spread": new_total / items,
        "speedup": old_total / (new_total + prefix), "speedup_prefix_spread": old_total / new_total}
    config["matmul_peak_end"] = common.matmul_peak()
    save()
    print(f"per (item, seed), all rows: {old_total / items:.2f} s -> "
          f"{(new_total + prefix) / items:.2f} s ({old_total / (new_total + prefix):.2f}x)")


if __name__ == "__main__":
    main()
