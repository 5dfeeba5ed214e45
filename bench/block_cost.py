"""Per-token cost of block memory (`blockmem.score_chunks`) by memory capacity, and of MemLong's
32k window, in FLOPs counted by XLA and in seconds.

    .venv/bin/python -m bench.block_cost                # -> bench/results/block_cost.json
    .venv/bin/python -m bench.block_cost --quick        # smoke test -> out/bench-quick/

Why: issue 18 asks for a per-token cost that stays flat from 8k to 128k tokens and within 2x of
MemLong's per token at 32k. Block memory runs on fixed shapes: a chunk's work depends on the
memory's capacity (`memory_tokens`: retrieval scores and bookkeeping over every slot), never on
how many tokens came before, so a capacity of C tokens is what a C-token document needs and the
per-token cost at length C is the cost of one host block with that capacity.

What runs: SmolLM2-135M (the converted checkpoint; a random init of the same shape if absent).
FLOPs: `compiled.cost_analysis()` of one host block of `--tokens` tokens (head included, as
scoring runs it), lowered on shapes only, so capacities too large for this machine's memory
are counted too. Seconds: the same call with the state threaded through the repeats, for the
capacities listed in `--timed` (each needs 2 x 30 layers x capacity x 3 KV heads x 64 x 4 bytes
of fp32 K/V: 1.5 GB at 32k). MemLong at 32k: the checkpoint's settings, the 30k-token prefix
ingested in 8k host blocks plus the final 2k window scored, both FLOP-counted the same way
(text-retriever embeddings given, their host encoder not counted).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from memlong_jax.eval import scoring
from memlong_jax.memlong import blockmem
from memlong_jax.memlong.retrievers import make_retriever

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
    p.add_argument("--repeats", type=int, default=3, help="timed calls each (default: 3)")
    return p


def shapes(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def flops(fn, *args) -> float:
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis["flops"])


def block_row(model, bcfg, tokens: int, timed: bool, repeats: int) -> dict:
    module = model.module
    score = functools.partial(blockmem.score_chunks, module, bcfg)
    state = jax.eval_shape(lambda: blockmem.init_state(module, bcfg, 1))
    ids = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
    row = {"capacity": bcfg.memory_tokens,
           "flops_per_token": flops(score, shapes(model.params), state, ids, ids) / tokens}
    if timed:
        real = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size,
                                                             (1, tokens)), jnp.int32)
        step = lambda s, params, x: score(params, s, x, x)[0]
        t = common.time_carried(step, blockmem.init_state(module, bcfg, 1), model.params, real,
                                repeats=repeats)
        row.update(t, s_per_token=t["median_s"] / tokens)
    return row


def memlong_flops(model, length: int) -> dict:
    """FLOPs per token of one memlong window of `length` (scoring's path: prefix ingested in
    host blocks, then the final local window)."""
    mcfg = model.memlong_config
    retriever = make_retriever(mcfg, model.tokenizer)
    protocol = scoring.Protocol((length,))
    scorer = scoring.Scorer(model.module, model.params, mcfg, protocol, retriever)
    window = protocol.final_window(length)
    block = mcfg.host_block_chunks * mcfg.chunk_size
    emb_dim = retriever.embedding_size(model.config)
    state = jax.eval_shape(lambda: retriever.empty_state(model.module, mcfg, 1))
    params = shapes(model.params)
    args = lambda n: (jax.ShapeDtypeStruct((1, n), jnp.int32),
                      jax.ShapeDtypeStruct((1, n // mcfg.chunk_size, emb_dim), jnp.float32)
                      if retriever.host_side else None)
    total, prefix = 0.0, length - window
    for start in range(0, prefix, block):
        total += flops(scorer._ingest, params, state, *args(min(block, prefix - start)))
    query = jax.ShapeDtypeStruct((1, emb_dim), jnp.float32) if retriever.host_side and \
        mcfg.query_mode == "segment" else None
    total += flops(scorer._final_window_nll, params, state, *args(window), query)
    return {"length": length, "flops_per_token": total / length, "memlong": mcfg.to_dict()}


def main(argv=None):
    args = build_parser().parse_args(argv)
    started, git = time.perf_counter(), common.git_commit()
    if args.quick:
        args.capacities, args.timed, args.tokens, args.memlong_length = "1k,2k", "1k", "256", "4k"
    model, source = common.load_smollm2(args.checkpoint)
    tokens = common.parse_tokens(args.tokens)
    timed = set(common.parse_list(args.timed))
    rows = []
    for capacity in common.parse_list(args.capacities):
        bcfg = blockmem.BlockConfig(memory_tokens=capacity).validate(model.config)
        rows.append(block_row(model, bcfg, tokens, capacity in timed, args.repeats))
        print(rows[-1], flush=True)
    memlong = memlong_flops(model, common.parse_tokens(args.memlong_length))
    print(memlong, flush=True)
    config = {"model": source, "block": blockmem.BlockConfig().__dict__, "tokens": tokens}
    common.finish(NAME, args, config, {"block": rows, "memlong": memlong}, started, git)


if __name__ == "__main__":
    main()
