"""Building the queries: prompts of k demonstrations, memory streams of m more, label tokens,
grouped into length buckets."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from memlong_jax.errors import UserError
from memlong_jax.eval.icl.tasks import (Example, ROWS, TASKS, Task, context_indices,
                                   get_task, load_split, memory_indices, memory_tokens, scored_items)



class TaskData(NamedTuple):
    task: Task
    train: list[Example]
    test: list[Example]
    items: np.ndarray   # indices into test of the scored items


class Query(NamedTuple):
    window: np.ndarray   # int32 ids seen with local attention (the prompt; for `full` all demos)
    memory: np.ndarray   # int32 ids for memory, a multiple of tau (maybe empty)


@dataclasses.dataclass
class Group:
    """One (task, seed, k, row, m) cell: its queries, one per scored item (None: n/a)."""

    task: str
    seed: int
    k: int
    row: str
    m: int
    queries: list[Query] | None
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to run. `ms` apply to every k (upstream: k = 4 and 20, each with m = 18 and 38)."""

    tasks: tuple[str, ...] = tuple(TASKS)
    ks: tuple[int, ...] = (4, 20)
    ms: tuple[int, ...] = (18, 38)
    seeds: tuple[int, ...] = (1, 2, 3)
    rows: tuple[str, ...] = ROWS
    limit: int | None = None

    def validate(self) -> "Settings":
        for name in self.tasks:
            get_task(name)
        bad_rows = [r for r in self.rows if r not in ROWS]
        if bad_rows or not self.rows:
            raise UserError(f"unknown row {', '.join(bad_rows) or repr(self.rows)}; choose from "
                            f"{', '.join(ROWS)}")
        for name, values in (("tasks", self.tasks), ("k", self.ks), ("seeds", self.seeds),
                             ("rows", self.rows)):
            if not values:
                raise UserError(f"no {name} given")
        if any(r != "local" for r in self.rows) and not self.ms:
            raise UserError("no m given (the memlong and full rows need at least one m)")
        for name, values in (("k", self.ks), ("m", self.ms), ("seed", self.seeds)):
            if any(v < 0 for v in values):
                raise UserError(f"{name} must not be negative, got {min(values)}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be at least 1, got {self.limit}")
        return self


def load_data(data_dir: str, settings: Settings) -> list[TaskData]:
    """Read every task's splits and check that k + m demonstrations fit its train split."""
    data = []
    for name in settings.tasks:
        task = get_task(name)
        train, test = load_split(data_dir, task, "train"), load_split(data_dir, task, "test")
        k = max(settings.ks)
        m = max(settings.ms) if any(r != "local" for r in settings.rows) else 0
        if k > len(train):
            raise UserError(f"k={k} is larger than the train split of {name} "
                            f"({len(train)} examples)")
        if k + m > len(train):
            raise UserError(f"k={k} plus m={m} demonstrations is more than the train split of "
                            f"{name} ({len(train)} examples)")
        data.append(TaskData(task, train, test, scored_items(task, len(test), settings.limit)))
    return data


def encode_all(tokenizer, texts: list[str], special: bool = True) -> list[np.ndarray]:
    return [np.asarray(e.ids, np.int32)
            for e in tokenizer.encode_batch(list(texts), add_special_tokens=special)]


def label_token_ids(tokenizer, task: Task) -> list[np.ndarray]:
    """Each label word's tokens as it continues a query: " " + word, no special tokens."""
    ids = [np.asarray(tokenizer.encode(" " + w, add_special_tokens=False).ids, np.int32)
           for w in task.labels]
    if any(len(i) == 0 for i in ids):
        raise UserError(f"a label word of {task.name} tokenises to nothing")
    return ids


def build_groups(tokenizer, tau: int, data: TaskData, settings: Settings,
                 max_context: int | None, label_len: int = 1) -> list[Group]:
    """Every (seed, k, row, m) group of one task, with its token ids (see the module doc)."""
    task, train = data.task, data.train
    tests = [data.test[i] for i in data.items]
    demo_ids = None
    if any(r != "local" for r in settings.rows) and settings.ms:
        demo_ids = encode_all(tokenizer, [task.demonstration(*e) for e in train])
    groups = []
    empty = np.zeros((0,), np.int32)
    for k in settings.ks:
        for seed in settings.seeds:
            context = context_indices(task, seed, len(train), k)
            demos = [train[i] for i in context]
            prompts = encode_all(tokenizer, [task.prompt(demos, e.text) for e in tests])
            if "local" in settings.rows:
                groups.append(Group(task.name, seed, k, "local", 0,
                                    [Query(p, empty) for p in prompts]))
            for m in settings.ms if demo_ids is not None else ():
                streams = []
                for item in data.items:
                    chosen = memory_indices(task, seed, item, len(train), m, context)
                    streams.append(np.concatenate([empty, *(demo_ids[i] for i in chosen)]))
                if "memlong" in settings.rows:
                    groups.append(Group(task.name, seed, k, "memlong", m,
                                        [Query(p, memory_tokens(s, tau))
                                         for p, s in zip(prompts, streams)]))
                if "full" in settings.rows:
                    full = [Query(np.concatenate([s, p]), empty) for p, s in zip(prompts, streams)]
                    longest = max(len(q.window) for q in full) + label_len - 1
                    too_long = max_context is not None and longest > max_context
                    groups.append(Group(task.name, seed, k, "full", m,
                                        None if too_long else full,
                                        f"{longest} tokens > max context {max_context}"
                                        if too_long else ""))
    return groups
