"""The recall evaluation: every (task, length) cell's items through every row, then summaries.

Rows: `memlong:<mode>` for each query mode (by default every one in `memlong.config.QUERY_MODES`,
so a new mode is picked up without a change here), `local`, `full` (n/a past
`max_context`, by default the model's trained context) and, when asked for, `block` (the
training-free block memory, `blockmem`, over the whole item). All rows of a cell see the same
items.

Scores: passkey is correct when the first integer of the greedy answer is the key; needle when
its first word is the value; both also record the teacher-forced log-probability of the
expected answer (" " + answer). repeat: the mean NLL of the second copy's tokens (all but its
first, which no copy predicts) next to the first copy's (the same tokens at the start, no
earlier context); copy gain = first - second, in nats per token.
"""

from __future__ import annotations

import dataclasses
import re
import time

import numpy as np

from memlong_jax.errors import UserError
from memlong_jax.memlong.blockmem import BlockConfig
from memlong_jax.memlong.config import QUERY_MODES, MemLongConfig
from memlong_jax.memlong.retrievers import make_retriever
from memlong_jax.eval.recall import prompts
from memlong_jax.eval.recall.reader import Reader
from memlong_jax.eval.score_report import write_rows

ROW_KINDS = ("memlong", "local", "full", "block")
DEFAULT_ROWS = ("memlong", "local", "full")
ANSWER_TASKS = ("passkey", "needle")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What is run. `query_modes` None: every allowed query mode. `budget`: new tokens per answer
    (the prompt holds length - budget tokens, so prompt and answer fit in `length`). `block`:
    the block memory settings of the `block` row."""

    tasks: tuple[str, ...] = ("passkey", "repeat")
    lengths: tuple[int, ...] = (2048, 8192, 32768)
    depths: tuple[float, ...] = (0.0, 0.5, 1.0)
    items: int = 1
    batch: int = 4        # items run together: host and device memory grow with it
    seed: int = 0
    rows: tuple[str, ...] = DEFAULT_ROWS
    query_modes: tuple[str, ...] | None = None
    local_window: int = 1024
    passage: int = 512
    budget: int = 8
    max_context: int | None = None
    block: BlockConfig = BlockConfig()

    def validate(self, chunk_size: int) -> "Settings":
        bad = lambda what, values, allowed: UserError(
            f"unknown {what} {', '.join(values)}; choose from {', '.join(allowed)}")
        for what, values, allowed in (("task", self.tasks, prompts.TASKS),
                                      ("row", self.rows, ROW_KINDS),
                                      ("query mode", self.modes(), QUERY_MODES)):
            unknown = [v for v in values if v not in allowed]
            if unknown or not values:
                raise bad(what, unknown or ["(none)"], allowed)
        if self.items < 1:
            raise UserError(f"--items must be at least 1, got {self.items}")
        if self.batch < 1:
            raise UserError(f"--batch must be at least 1, got {self.batch}")
        if not self.depths or any(not 0 <= d <= 1 for d in self.depths):
            raise UserError(f"depths must lie in 0..100%, got {list(self.depths)}")
        if not 1 <= self.budget <= 64:
            raise UserError(f"the answer budget must be 1..64 tokens, got {self.budget}")
        tau = chunk_size
        if self.local_window % tau or self.local_window < 2 * tau:
            raise UserError(f"local window {self.local_window} must be a multiple of the chunk "
                            f"size {tau} and at least two chunks")
        for length in self.lengths:
            if length <= 0 or length % tau:
                raise UserError(f"length {length} is not a positive multiple of the chunk size "
                                f"{tau}")
            if "block" in self.rows and length % self.block.chunk:
                raise UserError(f"length {length} is not a multiple of the block memory's "
                                f"chunk ({self.block.chunk})")
        if "repeat" in self.tasks and not 2 <= self.passage <= self.local_window:
            raise UserError(f"passage must be 2..local window ({self.local_window}) tokens, "
                            f"got {self.passage}")
        return self

    def modes(self) -> tuple[str, ...]:
        return QUERY_MODES if self.query_modes is None else self.query_modes

    def row_names(self) -> list[str]:
        """`memlong` expands into one row per query mode."""
        return [name for kind in self.rows
                for name in ([f"memlong:{m}" for m in self.modes()] if kind == "memlong"
                             else [kind])]


def answer_correct(task: str, generated: str, answer: str) -> bool:
    """passkey: the first integer is the key; needle: the first word is the value."""
    pattern = r"\d+" if task == "passkey" else r"[A-Za-z]+"
    match = re.search(pattern, generated)
    return bool(match) and match.group(0).lower() == answer.lower()


def item_count(task: str, settings: Settings) -> int:
    """Items per (task, length): `repeat` has no depth."""
    return settings.items * (1 if task == "repeat" else len(settings.depths))


def build_items(tokenizer, task: str, length: int, settings: Settings, haystack) -> list:
    prompt = length - settings.budget
    if task == "repeat":
        return [prompts.repeat_item(tokenizer, haystack, length, settings.passage, settings.seed,
                                    i) for i in range(settings.items)]
    make = (lambda d, i: prompts.passkey_item(tokenizer, prompt, d, settings.seed, length, i)) \
        if task == "passkey" else \
        (lambda d, i: prompts.needle_item(tokenizer, haystack, prompt, d, settings.seed, length, i))
    return [make(d, i) for d in settings.depths for i in range(settings.items)]


def _run_row(reader: Reader, tokenizer, row: str, items, settings: Settings, memory) -> list:
    ids = np.stack([item.ids for item in items])
    base = [{"task": it.task, "length": it.length, "depth": it.depth, "index": it.index,
             "row": row, "position": it.position} for it in items]
    if items[0].task == "repeat":
        nll = reader.nll(row, ids, settings.passage, memory).mean(axis=1)
        return [{**b, "nll_second": float(n)} for b, n in zip(base, nll)]
    greedy, logprob = reader.answers(row, ids, [it.answer_ids for it in items], memory)
    texts = tokenizer.decode_batch(greedy.tolist(), skip_special_tokens=True)
    return [{**b, "answer": it.answer, "generated": text, "logprob": float(lp),
             "correct": answer_correct(it.task, text, it.answer)}
            for b, it, text, lp in zip(base, items, texts, logprob)]


def evaluate(model, settings: Settings = Settings(), mcfg: MemLongConfig | None = None,
             encoder=None, haystack_texts=(), progress=None, on_cell=None) -> dict:
    """Run `settings` on `model` (`memlong_jax.load`): {"records": one per (item, row),
    "summary": one per (task, row, length, depth), "timing": seconds per (task, length, row)}.
    `haystack_texts`: real text for needle and repeat. `progress(total)` returns a tqdm-like bar
    (`set_description`, `update(units)`) counting (task, length, row) cells, or leave it None.
    `on_cell(results so far)` is called after each cell (to save them as they come)."""
    if model.tokenizer is None:
        raise UserError("the checkpoint has no tokenizer; convert it with its tokenizer")
    mcfg = (mcfg or model.memlong_config).validate(model.config)
    settings = settings.validate(mcfg.chunk_size)
    block = settings.block.validate(model.config) if "block" in settings.rows else None
    max_context = settings.max_context or model.config.max_position_embeddings
    rows = settings.row_names()
    if "memlong" in settings.rows:   # the text retriever's encoder, loaded once for every row
        encoder = make_retriever(mcfg, encoder=encoder).encoder
    tokenizer = model.tokenizer
    needs_text = any(t in settings.tasks for t in ("needle", "repeat"))
    haystack = prompts.Haystack(tokenizer, haystack_texts) if needs_text else None
    reader = Reader(model, mcfg, encoder, settings.local_window, settings.budget, block)
    batches = {task: -(-item_count(task, settings) // settings.batch) for task in settings.tasks}
    bar = None if progress is None else progress(
        sum(batches.values()) * len(settings.lengths) * len(rows))
    records, timing = [], []
    for task in settings.tasks:
        for length in settings.lengths:
            items = build_items(tokenizer, task, length, settings, haystack)
            seconds = dict.fromkeys(rows, 0.0)
            for start in range(0, len(items), settings.batch):
                part = items[start:start + settings.batch]
                records += _run_batch(reader, tokenizer, rows, part, settings, max_context,
                                      seconds, bar)
                if on_cell is not None and task != "repeat":   # repeat: once its first copy is in
                    on_cell(_results(records, _timing(task, length, seconds, timing), rows,
                                     mcfg, max_context))
            timing = _timing(task, length, seconds, timing)
            if task == "repeat":
                first = np.concatenate([
                    reader.nll("local", np.stack([it.ids[:settings.passage]
                                                  for it in items[i:i + settings.batch]]),
                               settings.passage).mean(axis=1)
                    for i in range(0, len(items), settings.batch)])
                for record in records:
                    if record["task"] == "repeat" and record["length"] == length:
                        record["nll_first"] = float(first[record["index"]])
                        if "nll_second" in record:
                            record["copy_gain"] = record["nll_first"] - record["nll_second"]
                if on_cell is not None:
                    on_cell(_results(records, timing, rows, mcfg, max_context))
    return _results(records, timing, rows, mcfg, max_context)


def _run_batch(reader: Reader, tokenizer, rows, items, settings: Settings, max_context: int,
               seconds: dict, bar) -> list:
    """Every row on one batch of items of the same (task, length); the memory of the items'
    head is built once and shared by the query modes that can share it. Adds each row's time
    to `seconds`."""
    task, length = items[0].task, items[0].length
    head = np.stack([it.ids[:reader.head_tokens(length)] for it in items])
    shared, records = None, []
    for row in rows:
        if bar is not None:
            bar.set_description(f"{task} {length} {row}")
        begin = time.perf_counter()
        if row == "full" and length > max_context:
            records += [{"task": task, "length": length, "depth": it.depth, "index": it.index,
                         "row": row, "n/a": f"longer than the model's context ({max_context})"}
                        for it in items]
        else:
            memory = None
            if row.startswith("memlong:") and head.shape[1]:
                if reader.shares_memory(length):
                    shared = reader.memory(head) if shared is None else shared
                    memory = shared
                else:
                    memory = reader.memory(head, row.split(":", 1)[1])
            records += _run_row(reader, tokenizer, row, items, settings, memory)
        seconds[row] += time.perf_counter() - begin
        if bar is not None:
            bar.update(1)
    return records


def _timing(task: str, length: int, seconds: dict, timing: list) -> list:
    """`timing` with this (task, length)'s seconds per row (replacing earlier partial ones)."""
    kept = [t for t in timing if (t["task"], t["length"]) != (task, length)]
    return kept + [{"task": task, "length": length, "row": row, "seconds": s}
                   for row, s in seconds.items()]


def _results(records, timing, rows, mcfg: MemLongConfig, max_context: int) -> dict:
    return {"records": records, "summary": summarize(records), "timing": timing,
            "rows": rows, "memlong": mcfg.to_dict(), "max_context": max_context}


def summarize(records: list[dict]) -> list[dict]:
    """Means per (task, row, length, depth), in first-seen order; n/a cells keep their reason."""
    cells: dict = {}
    for record in records:
        key = (record["task"], record["row"], record["length"], record["depth"])
        cells.setdefault(key, []).append(record)
    summary = []
    for (task, row, length, depth), group in cells.items():
        cell = {"task": task, "row": row, "length": length, "depth": depth, "items": len(group)}
        if "n/a" in group[0]:
            cell["n/a"] = group[0]["n/a"]
        elif task == "repeat":
            for key in ("nll_first", "nll_second", "copy_gain"):
                cell[key] = float(np.mean([r[key] for r in group]))
        else:
            cell["accuracy"] = float(np.mean([r["correct"] for r in group]))
            cell["logprob"] = float(np.mean([r["logprob"] for r in group]))
        summary.append(cell)
    return summary


def by_length(summary: list[dict], task: str, metric: str) -> dict:
    """{(row, length): mean of `metric` over depths, or None when n/a}."""
    values: dict = {}
    for cell in summary:
        if cell["task"] == task:
            values.setdefault((cell["row"], cell["length"]), []).append(cell.get(metric))
    return {key: None if None in v else float(np.mean(v)) for key, v in values.items()}


TABLES = (("passkey", "accuracy", "passkey: exact-match accuracy (%), mean over depths", 100, 0),
          ("passkey", "logprob", "passkey: log-probability of the key (nats)", 1, 2),
          ("needle", "accuracy", "needle: exact-match accuracy (%), mean over depths", 100, 0),
          ("needle", "logprob", "needle: log-probability of the answer (nats)", 1, 2),
          ("repeat", "copy_gain", "repeat: copy gain, NLL(first copy) - NLL(second copy) "
                                  "(nats/token)", 1, 3),
          ("repeat", "nll_second", "repeat: NLL of the second copy (nats/token)", 1, 3))


def length_label(n: int) -> str:
    return f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}k" if n % 1024 == 0 else str(n)


def table(results: dict) -> str:
    """Per task and metric: rows x lengths."""
    summary = results["summary"]
    rows = results["rows"]
    blocks = []
    for task, metric, title, scale, digits in TABLES:
        values = by_length(summary, task, metric)
        if not values:
            continue
        lengths = sorted({length for _, length in values})
        lines = [title, f"{'row':<18}" + "".join(f"{length_label(n):>9}" for n in lengths)]
        for row in rows:
            cells = [values.get((row, n)) for n in lengths]
            lines.append(f"{row:<18}" + "".join(
                f"{'n/a':>9}" if v is None else f"{scale * v:>9.{digits}f}" for v in cells))
        if metric == "copy_gain":
            first = by_length(summary, task, "nll_first")
            lines.append(f"{'(first copy NLL)':<18}" + "".join(
                f"{first.get((rows[0], n)) or 0:>9.3f}" for n in lengths))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


CSV_FIELDS = ("task", "row", "length", "depth", "items", "accuracy", "logprob", "nll_first",
              "nll_second", "copy_gain", "n/a")


def write_csv(results: dict, path: str) -> None:
    write_rows(path, CSV_FIELDS, results["summary"])


def write_plot(results: dict, path: str) -> None:
    """Heatmaps: per task one line of panels, one per row. passkey/needle: accuracy by depth x
    length; repeat: copy gain by length. Grey: n/a."""
    import matplotlib  # heavy and optional: only for --plot
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, rows = results["summary"], results["rows"]
    tasks = list(dict.fromkeys(c["task"] for c in summary))
    fig, axes = plt.subplots(len(tasks), len(rows), squeeze=False,
                             figsize=(2.6 * len(rows) + 1, 2.6 * len(tasks) + 0.4))
    for t, task in enumerate(tasks):
        cells = [c for c in summary if c["task"] == task]
        lengths = sorted({c["length"] for c in cells})
        depths = sorted({c["depth"] for c in cells})
        metric, limits, cmap = ("copy_gain", None, "viridis") if task == "repeat" \
            else ("accuracy", (0, 1), "RdYlGn")
        grids = {}
        for row in rows:
            grid = np.full((len(depths), len(lengths)), np.nan)
            for c in cells:
                if c["row"] == row and metric in c:
                    grid[depths.index(c["depth"]), lengths.index(c["length"])] = c[metric]
            grids[row] = grid
        if limits is None:
            finite = np.concatenate([g[np.isfinite(g)] for g in grids.values()] + [np.zeros(1)])
            limits = (min(0.0, finite.min()), max(finite.max(), 1e-6))
        for r, row in enumerate(rows):
            ax = axes[t][r]
            ax.set_facecolor("0.85")
            image = ax.imshow(grids[row], cmap=cmap, vmin=limits[0], vmax=limits[1],
                              aspect="auto", origin="upper")
            ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)),
                          [f"{100 * d:.0f}%" for d in depths] if task != "repeat" else [""],
                          fontsize=7)
            ax.set_title(f"{task}: {row}", fontsize=8)
            if r == 0:
                ax.set_ylabel("depth" if task != "repeat" else "copy gain", fontsize=8)
        fig.colorbar(image, ax=list(axes[t]), shrink=0.8,
                     label="accuracy" if task != "repeat" else "nats/token")
    fig.savefig(path, dpi=110)
    plt.close(fig)
