"""The evaluation loop over tasks, seeds, k and rows, and its summaries (table, CSV)."""

from __future__ import annotations

import time

import numpy as np

from memlong_jax.errors import UserError
from memlong_jax.eval.icl.prompts import Settings, build_groups, label_token_ids, load_data
from memlong_jax.eval.icl.scorer import ICLScorer, argmax_correct, memory_capacity
from memlong_jax.eval.icl.tasks import DEFAULT_DATA, ROWS, TASKS
from memlong_jax.eval.score_report import write_rows
from memlong_jax.memlong.config import MemLongConfig
from memlong_jax.memlong.retrievers import make_retriever



def evaluate(model, data_dir: str = DEFAULT_DATA, settings: Settings = Settings(),
             mcfg: MemLongConfig | None = None, encoder=None, batch_size: int = 8,
             batch_tokens: int = 8192, max_context: int | None = None, progress=None) -> dict:
    """Run the ICL protocol for `model` (`memlong_jax.load`): returns {"runs": one entry per
    (task, row, k, m, seed), "summary": mean/std over seeds per (task, row, k, m), "items":
    the scored test indices per task, "timing"}. `progress(total_items)` returns a tqdm-like
    bar (`set_description`, `update(items)`), or leave it None."""
    settings = settings.validate()
    if model.tokenizer is None:
        raise UserError("the checkpoint has no tokenizer; convert it with its tokenizer")
    mcfg = (mcfg or model.memlong_config).validate(model.config)
    if max_context is None:
        max_context = model.config.max_position_embeddings
    retriever = make_retriever(mcfg, model.tokenizer, encoder)
    tokenizer, tau = model.tokenizer, mcfg.chunk_size
    data = load_data(data_dir, settings)
    labels = {d.task.name: label_token_ids(tokenizer, d.task) for d in data}
    plan = []
    for d in data:
        label_len = max(len(t) for t in labels[d.task.name])
        plan += build_groups(tokenizer, tau, d, settings, max_context, label_len)
    scorer = ICLScorer(model.module, model.params, mcfg, retriever,
                       memory_capacity(plan, tau), batch_size, batch_tokens)
    bar = None if progress is None else progress(sum(len(g.queries) for g in plan if g.queries))
    gold = {d.task.name: [d.test[i].label for i in d.items] for d in data}
    runs = []
    start = time.perf_counter()
    for group in plan:
        entry = {"task": group.task, "row": group.row, "k": group.k, "m": group.m,
                 "seed": group.seed}
        if group.queries is None:
            runs.append({**entry, "accuracy": None, "argmax_accuracy": None,
                         "n/a": group.reason})
            continue
        if bar is not None:
            bar.set_description(f"{group.task} k={group.k} seed={group.seed} {row_name(entry)}")
        compiled, begin = scorer.compile_seconds, time.perf_counter()
        scores, argmax = scorer.score(group.queries, labels[group.task],
                                      bar.update if bar is not None else None)
        compile_s = scorer.compile_seconds - compiled
        words = TASKS[group.task].labels
        predictions = scores.argmax(axis=1)
        correct = [words[p] == g for p, g in zip(predictions, gold[group.task])]
        by_argmax = [argmax_correct(tokenizer, t, g) for t, g in zip(argmax, gold[group.task])]
        runs.append({**entry, "accuracy": float(np.mean(correct)),
                     "argmax_accuracy": float(np.mean(by_argmax)), "items": len(correct),
                     "window_tokens_mean": float(np.mean([len(q.window) for q in group.queries])),
                     "memory_tokens_mean": float(np.mean([len(q.memory) for q in group.queries])),
                     "seconds": time.perf_counter() - begin - compile_s,
                     "compile_seconds": compile_s,
                     "predictions": [int(p) for p in predictions],
                     "label_scores": np.round(scores, 4).tolist(),
                     "argmax_tokens": [int(t) for t in argmax]})
    return {"runs": runs, "summary": summarize(runs),
            "items": {d.task.name: [int(i) for i in d.items] for d in data},
            "memlong": scorer.mcfg.to_dict(),
            "timing": {"seconds": time.perf_counter() - start,
                       "compile_seconds": scorer.compile_seconds}}


def row_name(entry: dict) -> str:
    return entry["row"] if entry["row"] == "local" else f"{entry['row']} m={entry['m']}"


def summarize(runs: list[dict]) -> list[dict]:
    """Mean and std (ddof 0) over seeds per (task, row, k, m), in first-seen order."""
    cells: dict = {}
    for run in runs:
        cells.setdefault((run["task"], run["row"], run["k"], run["m"]), []).append(run)
    summary = []
    for (task, row, k, m), group in cells.items():
        cell = {"task": task, "row": row, "k": k, "m": m, "seeds": [r["seed"] for r in group]}
        for metric in ("accuracy", "argmax_accuracy"):
            values = [r[metric] for r in group]
            ok = all(v is not None for v in values)
            cell[f"{metric}_mean"] = float(np.mean(values)) if ok else None
            cell[f"{metric}_std"] = float(np.std(values)) if ok else None
        cell["items"] = group[0].get("items")
        cell["seconds"] = sum(r.get("seconds", 0.0) for r in group)
        summary.append(cell)
    return summary


def table(results: dict, metric: str = "accuracy") -> str:
    """Rows (k, row) x columns (tasks): mean ± std over seeds, in percent."""
    summary = results["summary"]
    tasks = list(dict.fromkeys(c["task"] for c in summary))
    keys = sorted(dict.fromkeys((c["k"], ROWS.index(c["row"]), c["m"]) for c in summary))
    cells = {(c["task"], c["k"], c["row"], c["m"]): c for c in summary}
    width = 13
    lines = [f"{'k':>3}  {'row':<14}" + "".join(f"{t:>{width}}" for t in tasks)]
    for k, row_index, m in keys:
        row = ROWS[row_index]
        text = f"{k:>3}  {row_name({'row': row, 'm': m}):<14}"
        for task in tasks:
            cell = cells.get((task, k, row, m))
            mean = cell[f"{metric}_mean"] if cell else None
            value = "n/a" if mean is None else \
                f"{100 * mean:.1f} ± {100 * cell[f'{metric}_std']:.1f}"
            text += f"{value:>{width}}"
        lines.append(text)
    return "\n".join(lines)


CSV_FIELDS = ("task", "row", "k", "m", "items", "seeds", "accuracy_mean", "accuracy_std",
              "argmax_accuracy_mean", "argmax_accuracy_std", "seconds")


def write_csv(results: dict, path: str) -> None:
    write_rows(path, CSV_FIELDS, [{**cell, "seeds": " ".join(map(str, cell["seeds"]))}
                                  for cell in results["summary"]])
