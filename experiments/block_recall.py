"""Recall with block memory vs `local` and `full` on the same items (no training): passkey
accuracy and repeat copy gain. A stand-in until `python -m memlong_jax.recall` lands.

    python experiments/block_recall.py CKPT passkey --lengths 2k,32k --depths 0.1,0.5,0.9 \
        --items 2 --rows block,full --json experiments/results/block_passkey.json
    python experiments/block_recall.py CKPT repeat --lengths 4k,8k --items 2 \
        --rows block,local,full --json experiments/results/block_repeat.json

passkey: the landmark-attention format (intro line, filler lines, "The pass key is K. Remember
it. K is the pass key." at the given depth, then "What is the pass key? The pass key is"),
5-digit keys from --seed, greedy generation of 8 tokens, exact match of the first integer.
repeat: a P-token passage of a book, other text, the same passage again at the end; copy gain
= mean NLL of the first copy (from the start of the sequence) - mean NLL of the second copy.
Rows: `block` (block memory over the whole sequence), `local` (the last --local-window tokens
only), `full` (plain causal attention over everything; only up to the model's trained range).
Generation for `local` and `full` runs block memory set up to be exactly full causal attention
over what the row sees (a KV-cached decoder).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import memlong_jax as ml
from memlong_jax.memlong import blockmem
from memlong_jax.eval.block_generation import BlockGenerator
from memlong_jax.cli.options import versions
from memlong_jax.errors import write_json
from memlong_jax.memlong.scan import token_nll
from memlong_jax.cli.score import parse_length

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
         "memorize them. I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
KEY_LINE = "The pass key is {k}. Remember it. {k} is the pass key.\n"
QUESTION = "What is the pass key? The pass key is"
NEW_TOKENS = 8
BOOK = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "pg19_like")


def passkey_prompt(model, length: int, depth: float, key: int) -> np.ndarray:
    """Token ids of about `length` tokens (never more) with the key line at `depth`."""
    fixed = len(model.encode(INTRO + KEY_LINE.format(k=key) + QUESTION))
    lines = max(0, (length - fixed) // len(model.encode(FILLER)))
    while True:
        before = int(round(depth * lines))
        text = (INTRO + FILLER * before + KEY_LINE.format(k=key) + FILLER * (lines - before)
                + QUESTION)
        ids = model.encode(text)
        if len(ids) <= length or lines == 0:
            return ids
        lines -= 1 + (len(ids) - length) // len(model.encode(FILLER))


@functools.partial(jax.jit, static_argnums=0)
def plain_logits(module, params, ids):
    return module.apply({"params": params}, ids)


def as_full_attention(bcfg, length: int):
    """Block settings that are exactly full causal attention over `length` tokens (every block
    kept and retrieved, true positions; tested in tests/test_blockmem.py): a KV-cached decoder
    for the `full` row."""
    blocks = max(2, -(-length // bcfg.block_size))
    return bcfg.replace(placement="true", memory_tokens=blocks * bcfg.block_size, top_k=blocks)


def greedy(model, bcfg, ids: np.ndarray) -> list[int]:
    generator = BlockGenerator(model.module, bcfg)
    return [int(t[0]) for t in generator.tokens(model.params, ids[None], NEW_TOKENS)]


def first_integer(text: str):
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


def row_ids(row: str, ids: np.ndarray, local_window: int, trained: int):
    """The tokens a row sees, or None when it does not apply (full past the trained range)."""
    if row == "local":
        return ids[-local_window:]
    if row == "full" and len(ids) > trained:
        return None
    return ids


def run_passkey(model, bcfg, args, bar):
    rng = np.random.default_rng(args.seed)
    items = []
    for length in args.lengths:
        for depth in args.depths:
            for _ in range(args.items):
                key = int(rng.integers(10000, 100000))
                ids = passkey_prompt(model, length, depth, key)
                for row in args.rows:
                    seen = row_ids(row, ids, args.local_window, args.trained)
                    if seen is None:
                        continue
                    start = time.perf_counter()
                    settings = bcfg if row == "block" else as_full_attention(bcfg, len(seen))
                    tokens = greedy(model, settings, seen)
                    answer = model.tokenizer.decode(tokens)
                    items.append({"length": length, "depth": depth, "row": row, "key": key,
                                  "prompt_tokens": int(len(ids)), "answer": answer,
                                  "correct": first_integer(answer) == key,
                                  "seconds": time.perf_counter() - start})
                    bar.update(1)
    return items


def sequence_nll(model, bcfg, row: str, ids: np.ndarray, local_window: int) -> np.ndarray:
    """-log p(ids[t+1] | what the row sees of ids[:t+1]) for every t (NaN where unseen)."""
    out = np.full(len(ids) - 1, np.nan)
    if row == "block":
        state = blockmem.init_state(model.module, bcfg, 1)
        batch = jnp.asarray(ids, jnp.int32)[None]
        targets = jnp.concatenate([batch[:, 1:], batch[:, :1]], axis=1)
        score = jax.jit(functools.partial(blockmem.score_chunks, model.module, bcfg))
        out[:] = np.asarray(score(model.params, state, batch, targets)[1])[0, :-1]
        return out
    start = len(ids) - len(row_ids(row, ids, local_window, len(ids)))
    seen = jnp.asarray(ids[start:], jnp.int32)[None]
    logits = plain_logits(model.module, model.params, seen)
    out[start:] = np.asarray(token_nll(logits[:, :-1], seen[:, 1:]))[0]
    return out


def run_repeat(model, bcfg, args, bar):
    rng = np.random.default_rng(args.seed)
    books = sorted(os.listdir(args.book_dir))
    texts = [model.encode(open(os.path.join(args.book_dir, b), encoding="utf-8").read())
             for b in books[:2]]
    passage_len = args.passage
    items = []
    for length in args.lengths:
        for _ in range(args.items):
            a = int(rng.integers(0, len(texts[0]) - passage_len))
            passage = texts[0][a:a + passage_len]
            b = int(rng.integers(0, len(texts[1]) - length))
            other = texts[1][b:b + length - 2 * passage_len]
            ids = np.concatenate([passage, other, passage])
            first = None
            for row in args.rows:
                if row_ids(row, ids, args.local_window, args.trained) is None:
                    continue
                start = time.perf_counter()
                nll = sequence_nll(model, bcfg, row, ids, args.local_window)
                second = float(np.mean(nll[-passage_len + 1:]))   # inside the second copy
                if first is None:   # the first copy is the start of the sequence in every row
                    first = float(np.mean(plain_first_copy(model, passage)))
                items.append({"length": length, "row": row, "first_copy_nll": first,
                              "second_copy_nll": second, "copy_gain": first - second,
                              "seconds": time.perf_counter() - start})
                bar.update(1)
    return items


def plain_first_copy(model, passage):
    seen = jnp.asarray(passage, jnp.int32)[None]
    logits = plain_logits(model.module, model.params, seen)
    return np.asarray(token_nll(logits[:, :-1], seen[:, 1:]))[0]


def summarize(task: str, items: list[dict]) -> list[dict]:
    keys = sorted({(i["length"], i["row"]) for i in items})
    rows = []
    for length, row in keys:
        group = [i for i in items if i["length"] == length and i["row"] == row]
        entry = {"length": length, "row": row, "items": len(group),
                 "seconds_per_item": float(np.mean([i["seconds"] for i in group]))}
        if task == "passkey":
            entry["accuracy"] = float(np.mean([i["correct"] for i in group]))
        else:
            entry["copy_gain"] = float(np.mean([i["copy_gain"] for i in group]))
        rows.append(entry)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("task", choices=("passkey", "repeat"))
    parser.add_argument("--lengths", default="2k,4k")
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--items", type=int, default=2)
    parser.add_argument("--rows", default="block,local,full")
    parser.add_argument("--passage", type=int, default=512)
    parser.add_argument("--local-window", type=int, default=2048)
    parser.add_argument("--block", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--book-dir", default=BOOK)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    args.lengths = [parse_length(x) for x in args.lengths.split(",")]
    args.depths = [float(x) for x in args.depths.split(",")]
    args.rows = [r.strip() for r in args.rows.split(",")]
    model = ml.load(args.checkpoint)
    args.trained = model.config.max_position_embeddings
    bcfg = blockmem.BlockConfig().with_overrides(args.block).validate(model.config)
    total = len(args.lengths) * len(args.rows) * args.items * (
        len(args.depths) if args.task == "passkey" else 1)
    begin = time.perf_counter()
    with tqdm(total=total, desc=args.task, file=sys.stderr) as bar:
        items = (run_passkey if args.task == "passkey" else run_repeat)(model, bcfg, args, bar)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    result = {"task": args.task, "checkpoint": os.path.abspath(args.checkpoint),
              "block": dataclasses.asdict(bcfg), "local_window": args.local_window,
              "seed": args.seed, "commit": commit, "versions": versions(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "total_seconds": time.perf_counter() - begin, "note": "2-core CPU under load",
              "rows": summarize(args.task, items), "items": items}
    write_json(args.json, result)
    for row in result["rows"]:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
