"""The five ICL tasks (templates, label words, data files) and the seeded sampling of
context demonstrations, memory demonstrations and test items."""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import NamedTuple

import numpy as np

from memlong_jax.errors import UserError
from memlong_jax.io.documents import decode_utf8, jsonl_rows


ROWS = ("memlong", "local", "full")
# The repository's sibling ../shared/data/icl (this file is memlong_jax/eval/icl/tasks.py).
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "..",
                            "shared", "data", "icl")


@dataclasses.dataclass(frozen=True)
class Task:
    """A classification task: its label words and template words."""

    name: str
    labels: tuple[str, ...]
    input_word: str = "Review"
    label_word: str = "Sentiment"

    def demonstration(self, text: str, label: str) -> str:
        return f"{self.input_word}: {text} {self.label_word}: {label}. "

    def query(self, text: str) -> str:
        return f"{self.input_word}: {text} {self.label_word}:"

    def prompt(self, demonstrations, text: str) -> str:
        """`demonstrations`: (text, label) pairs in order, then the query for `text`."""
        return "".join(self.demonstration(x, y) for x, y in demonstrations) + self.query(text)

    @property
    def key(self) -> int:
        return zlib.crc32(self.name.encode())


SENTIMENT = ("negative", "positive")
TASKS = {task.name: task for task in (
    Task("sst-2", SENTIMENT),
    Task("sst-5", ("terrible", "bad", "okay", "good", "great")),
    Task("mr", SENTIMENT),
    Task("subj", ("subjective", "objective"), "Input", "Type"),
    Task("mpqa", SENTIMENT),
)}


class Example(NamedTuple):
    text: str
    label: str


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


def load_split(data_dir: str, task: Task, split: str) -> list[Example]:
    """`<data_dir>/<task>/<split>.jsonl` -> examples; every problem is a one-line UserError."""
    path = os.path.join(data_dir, task.name, f"{split}.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file (ICL data: <dir>/<task>/{{train,test}}.jsonl, "
                        f"see --data)")
    examples = []
    with open(path, "rb") as f:
        text = decode_utf8(f.read(), path)
    for number, row in jsonl_rows(text, path):
        if not (isinstance(row, dict) and isinstance(row.get("text"), str)
                and isinstance(row.get("label"), str)):
            raise UserError(f"{path}:{number}: expected an object with string 'text' and 'label'")
        if row["label"] not in task.labels:
            raise UserError(f"{path}:{number}: label {row['label']!r} is not one of "
                            f"{', '.join(task.labels)}")
        examples.append(Example(row["text"], row["label"]))
    if not examples:
        raise UserError(f"{path}: no examples")
    return examples


def scored_items(task: Task, n_test: int, limit: int | None) -> np.ndarray:
    """Indices of the scored test examples: all, or a fixed random `limit` of them, in order."""
    if limit is None or limit >= n_test:
        return np.arange(n_test)
    rng = np.random.default_rng([task.key, 0])
    return np.sort(rng.choice(n_test, limit, replace=False))


def context_indices(task: Task, seed: int, n_train: int, k: int) -> np.ndarray:
    """The k in-context demonstrations of a seed: the first k of one permutation of train."""
    return np.random.default_rng([seed, task.key, 1]).permutation(n_train)[:k]


def memory_indices(task: Task, seed: int, item: int, n_train: int, m: int,
                   context: np.ndarray) -> np.ndarray:
    """The m memory demonstrations of one test item, none of them in `context`."""
    order = np.random.default_rng([seed, task.key, 2, int(item)]).permutation(n_train)
    return order[~np.isin(order, context)][:m]


def memory_tokens(stream: np.ndarray, tau: int) -> np.ndarray:
    """What of a demonstration stream goes into memory: its last floor(P / tau) * tau tokens."""
    return stream[len(stream) % tau:]


def bucket(n: int, minimum: int = 1) -> int:
    """Round up to one of 4 sizes per octave (at most 25% padding): 5, 10, 12, 14, 16, 20, ..."""
    n = max(int(n), minimum)
    step = max(1, 2 ** (n.bit_length() - 3))
    return -(-n // step) * step
