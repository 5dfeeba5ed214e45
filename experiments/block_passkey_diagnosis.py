"""Why block memory missed the pass key: one passkey item through `BlockGenerator`, the rank of
the block(s) holding the key line among each layer's and KV group's stored blocks for the
prompt's last selection, and the greedy answer. Appends one JSON line per run.

    python -m experiments.block_passkey_diagnosis CKPT LENGTH DEPTH [KEY=VALUE ...] \
        --out experiments/results/block/passkey_diagnosis.jsonl

KEY=VALUE: block memory settings (`blockmem.BlockConfig`, memory_tokens default 32768).
rank r: r stored blocks score higher than the best of the (one or two) blocks the key line
touches; `in_top_picks`: the share of (layer, group) rows where that block is among the picks.
"""

from __future__ import annotations

import argparse
import json
import time

import jax.numpy as jnp
import numpy as np

import memlong_jax as ml
from memlong_jax.eval.block_generation import BlockGenerator
from memlong_jax.eval.recall import answer_correct, prompts
from memlong_jax.memlong import blockmem
from memlong_jax.settings import apply_overrides

NEW_TOKENS = 8


def key_block_ranks(cfg, bcfg, state, blocks) -> np.ndarray:
    """`[layers, KV]` rank of the best of `blocks` under the pending chunk's selection query."""
    layers = state.layers
    seen = (jnp.arange(bcfg.chunk) < state.fill)[None, :, None, None]
    rope = blockmem._rope(cfg, bcfg.window + 1 + jnp.arange(bcfg.chunk))
    ranks = np.full((cfg.num_hidden_layers, cfg.num_key_value_heads), -1)
    for layer in range(cfg.num_hidden_layers):
        query = blockmem.selection_query(jnp.where(seen, layers.pend_q[layer], 0), *rope,
                                         cfg.num_key_value_heads).reshape(-1, cfg.head_dim)
        memory = layers.memory
        valid = np.asarray(memory.valid[layer])
        written = np.asarray(memory.insert_time[layer])
        scores = np.where(valid, np.asarray(jnp.sum(memory.emb[layer] * query[:, None], -1)),
                          -np.inf)
        for row in range(scores.shape[0]):
            held = [s for s in np.flatnonzero(valid[row]) if written[row, s] in blocks]
            if held:
                ranks[layer, row] = min(int((scores[row] > scores[row, s]).sum()) for s in held)
    return ranks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("length", type=int)
    parser.add_argument("depth", type=float, help="0..1")
    parser.add_argument("settings", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    model = ml.load(args.checkpoint)
    bcfg = apply_overrides(blockmem.BlockConfig(memory_tokens=32768), args.settings).validate(
        model.config)
    item = prompts.passkey_item(model.tokenizer, args.length - NEW_TOKENS, args.depth, 0,
                                args.length, 0)
    line = len(prompts.encode(model.tokenizer, prompts.KEY_LINE.format(key=item.answer)))
    blocks = sorted({item.position // bcfg.block_size,
                     (item.position + line - 1) // bcfg.block_size})
    begin = time.perf_counter()
    generator = BlockGenerator(model.module, bcfg)
    state, logits = generator.start(model.params, item.ids[None])
    ranks = key_block_ranks(model.config, bcfg, state, blocks)
    picks = bcfg.top_k // 2 if bcfg.previous else bcfg.top_k
    tokens = [int(np.argmax(logits[0]))]
    for _ in range(NEW_TOKENS - 1):
        state, logits = generator.step(model.params, state, np.asarray([tokens[-1]]))
        tokens.append(int(np.argmax(logits[0])))
    answer = model.tokenizer.decode(tokens)
    record = {"length": args.length, "depth": args.depth, "settings": args.settings,
              "key": item.answer, "key_line_blocks": blocks, "answer": answer,
              "correct": answer_correct("passkey", answer, item.answer),
              "in_top_picks": float(((ranks >= 0) & (ranks < picks)).mean()),
              "ranks": ranks.tolist(), "seconds_under_load": time.perf_counter() - begin}
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "ranks"}))


if __name__ == "__main__":
    main()
