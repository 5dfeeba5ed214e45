"""Per-token cost of block memory (`blockmem.score_chunks`) by memory capacity, next to
MemLong's 32k window: FLOPs by formula, seconds measured.

    .venv/bin/python -m bench.block_cost                # -> bench/results/block_cost.json
    .venv/bin/python -m bench.block_cost --quick        # smoke test -> out/bench-quick/

Why: issue 18 asks for a per-token cost that stays flat from 8k to 128k tokens and within 2x of
MemLong's per token at 32k. Block memory runs on fixed shapes: a chunk's work depends on the
memory's capacity (`memory_tokens`: retrieval scores over every slot), never on how many
tokens came before, so a capacity of C tokens is what a C-token document needs and the cost
per token at length C is the cost of one host block with that capacity.

FLOPs per token of block memory, as the fixed shapes run them (L layers, W_layer the weights
of one decoder layer, H heads of size D, KV groups, B block size, C chunk, S capacity blocks):
    2 * L * W_layer + 2 * d * vocab                          (layers; head: every token scored)
    + L * 4 * H * D * (sinks + top_k * B + window + C)      (joint softmax over every key slot)
    + L * 2 * H * D * B                                      (representatives inside each block)
    + L * 2 * KV * D * S / C                                 (block selection, once per chunk)
MemLong: `bench.gpu.score_flops` (prefix through m layers in tau-chunks, final window through
all layers with retrieved memory). XLA's `cost_analysis` is not used: it counts a `lax.scan`
body once, not once per step.
Seconds: one host block of `--tokens` tokens, the state threaded through the repeats
(`common.time_carried`), for the capacities in `--timed` (fp32 K/V: 2 x L x capacity x KV x D x
4 bytes, 1.5 GB at 32k, 6 GB at 128k).
"""

from __future__ import annotations

import functools
import time

import jax.numpy as jnp
import numpy as np

from bench import common
from bench.gpu import score_flops
from memlong_jax.memlong import blockmem
from train.metrics import layer_params

NAME = "block_cost"


def build_parser():
    p = common.parser(__doc__, NAME)
    p.add_argument("--checkpoint", default=common.SMOLLM2_CKPT)
    p.add_argument("--capacities", default="8k,32k,128k",
                   help="block memory capacities (tokens) to count (default: %(default)s)")
    p.add_argument("--timed", default="8k,32k",
                   help="capacities also timed (default: %(default)s)")
    p.add_argument("--tokens", default="1k", help="tokens per call (default: %(default)s)")
    p.add_argument("--memlong-length", default="32k", help="(default: %(default)s)")
    p.add_argument("--memlong-window", default="2k", help="(default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls each (default: 3)")
    return p


def block_flops(cfg, bcfg) -> dict:
    """FLOPs per token of block memory (module docstring)."""
    layers, heads, dim = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
    keys = bcfg.tile_slots + bcfg.window + bcfg.chunk
    parts = {"matmul": 2 * layers * sum(layer_params(cfg).values())
             + 2 * cfg.hidden_size * cfg.vocab_size,
             "attention": layers * 4 * heads * dim * keys,
             "representatives": layers * 2 * heads * dim * bcfg.block_size,
             "selection": layers * 2 * cfg.num_key_value_heads * dim * bcfg.capacity_blocks
             / bcfg.chunk}
    return {"total": sum(parts.values()), **parts}


def block_row(model, bcfg, tokens: int, timed: bool, repeats: int) -> dict:
    row = {"capacity": bcfg.memory_tokens, "flops_per_token": block_flops(model.config, bcfg)}
    if timed:
        score = functools.partial(blockmem.score_chunks, model.module, bcfg)
        ids = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size,
                                                            (1, tokens)), jnp.int32)
        step = lambda state, params, x: score(params, state, x, x)[0]
        t = common.time_carried(step, blockmem.init_state(model.module, bcfg, 1), model.params,
                                ids, repeats=repeats)
        row.update(t, s_per_token=t["median_s"] / tokens)
    return row


def memlong_row(model, length: int, window: int) -> dict:
    mcfg = model.memlong_config
    flops = score_flops(model.config, mcfg, "memlong", length, window, window - 1)
    return {"length": length, "window": window,
            "flops_per_token": {k: v / length for k, v in flops.items()},
            "memlong": mcfg.to_dict()}


def main(argv=None):
    args = build_parser().parse_args(argv)
    started, git = time.perf_counter(), common.git_commit()
    if args.quick:
        args.capacities, args.timed, args.tokens = "8k,32k", "8k", "256"
    model, source = common.load_smollm2(args.checkpoint)
    tokens = common.parse_tokens(args.tokens)
    timed = set(common.parse_list(args.timed))
    rows = []
    for capacity in common.parse_list(args.capacities):
        bcfg = blockmem.BlockConfig(memory_tokens=capacity).validate(model.config)
        rows.append(block_row(model, bcfg, tokens, capacity in timed, args.repeats))
        print(rows[-1], flush=True)
    memlong = memlong_row(model, common.parse_tokens(args.memlong_length),
                          common.parse_tokens(args.memlong_window))
    print(memlong, flush=True)
    config = {"model": source, "block": blockmem.BlockConfig().__dict__, "tokens": tokens}
    common.finish(NAME, args, config, {"block": rows, "memlong": memlong}, started, git)


if __name__ == "__main__":
    main()
