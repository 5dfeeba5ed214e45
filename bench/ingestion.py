"""Prefix ingestion throughput (`scan.ingest_prefix`) against the FLOPs it needs, as a fraction
of this machine's matmul peak measured in the same run.

    .venv/bin/python -m bench.ingestion               # full run -> bench/results/ingestion.json
    .venv/bin/python -m bench.ingestion --quick       # smoke test -> out/bench-quick/

Why: at long lengths almost every token of a memlong window goes through ingestion, so its
throughput bounds scoring; the issue's target is 50% or more of the measured matmul peak.

What runs: SmolLM2-135M (the converted checkpoint; a random init of the same shape if absent),
its MemLong settings (memory layer 15, tau 128, 32k-token memory, bf16 K/V), one host block of
`--prefix` tokens (what `Scorer` hands `ingest_prefix` per call: 8192) into a memory that is
already full, so every write evicts as in steady state. The text retriever's chunk embeddings
are given precomputed (as the Scorer does); their host cost, decoding each chunk and running
all-MiniLM-L6-v2 on it, is timed separately on the same tokens, and the combined rate is
1 / (1/jax + 1/host). `block_chunks` (chunks run through the frozen stack as one batch) is
swept.

FLOPs needed per prefix token (frozen, forward only, 2 per weight, memory layer m):
    2 * (m * W_layer + W_k + W_v) + m * 4 * heads * head_dim * (tau + 1) / 2
with W_layer the weights of one decoder layer (q, k, v, o, gate, up, down; `train.metrics.
layer_params`), W_k, W_v the memory layer's K/V projections, and the last term causal
attention inside each tau-token chunk (every prefix chunk is its own segment, positions
1..tau). Retrieval scores (2 * capacity * d per chunk), norms, RoPE and the memory write are
not counted: they are what the implementation adds, not what the computation needs.

Estimated wall time of the default run on a quiet 2-core CPU: 4-6 minutes.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from bench import common

NAME = "ingestion"


def build_parser():
    p = common.parser(__doc__, NAME)
    p.add_argument("--prefix", default="8k", help="prefix tokens per call (default: %(default)s)")
    p.add_argument("--block-chunks", default="8,16,32,64",
                   help="MemLongConfig.ingest_chunks to sweep (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls each (default: 3)")
    p.add_argument("--checkpoint", default=common.SMOLLM2_CKPT)
    return p


def prefix_flops_per_token(cfg, mcfg) -> dict:
    from train.metrics import layer_params
    p = layer_params(cfg)
    weights = mcfg.memory_layer * sum(p.values()) + p["k_proj"] + p["v_proj"]
    attention = (mcfg.memory_layer * 4 * cfg.num_attention_heads * cfg.head_dim
                 * (mcfg.chunk_size + 1) / 2)
    return {"matmul": 2 * weights, "attention": attention, "total": 2 * weights + attention}


def text_ids(model, n: int):
    """`[1, n]` real token ids: Python's bundled documentation, present on every machine."""
    from memlong_jax.io.documents import pydoc_text
    if model.tokenizer is None:
        return np.random.default_rng(0).integers(0, model.config.vocab_size, (1, n), np.int32)
    ids = model.encode(pydoc_text())
    return np.resize(ids, n)[None].astype(np.int32)


def main() -> None:
    args = build_parser().parse_args()
    if args.quick:
        args.prefix, args.block_chunks, args.repeats = "1k", "4,8", 2
    started = time.perf_counter()
    import functools

    import jax.numpy as jnp
    from memlong_jax.memlong import scan
    from memlong_jax.memlong.retrievers import make_retriever

    peak = common.matmul_peak((512, 1024) if args.quick else (1024, 2048, 3072))
    model, source = common.load_smollm2(args.checkpoint)
    cfg, mcfg = model.config, model.memlong_config
    prefix = common.parse_tokens(args.prefix)
    tau = mcfg.chunk_size
    retriever = make_retriever(mcfg, model.tokenizer)
    emb_dim = retriever.embedding_size(cfg)
    ids = jnp.asarray(text_ids(model, prefix))
    key_emb = (jnp.asarray(common.unit_vectors((1, prefix // tau, emb_dim)))
               if retriever.host_side else None)
    state = common.full_state(model.module, mcfg, emb_dim)
    flops = prefix_flops_per_token(cfg, mcfg)
    rows = []
    for g in common.parse_list(args.block_chunks, int):
        fn = functools.partial(scan.ingest_prefix, model.module, mcfg.replace(ingest_chunks=g))
        t = common.time_jitted(fn, model.params, state, ids, key_emb, repeats=args.repeats)
        gflops = flops["total"] * prefix / t["min_s"] / 1e9
        rows.append({"block_chunks": g, "block_tokens": g * tau, **t,
                     "tokens_per_s": prefix / t["median_s"],
                     "best_tokens_per_s": prefix / t["min_s"], "gflops": gflops,
                     "fraction_of_peak": gflops / peak["gflops"]})
        print(f"block_chunks {g:3d}: {rows[-1]['tokens_per_s']:.0f} tok/s, {gflops:.1f} GFLOP/s "
              f"= {rows[-1]['fraction_of_peak']:.0%} of {peak['gflops']:.1f}", file=sys.stderr)
    host = None
    if retriever.host_side:
        run = lambda: retriever.chunk_keys(np.asarray(ids))
        run()  # compiles the encoder's padded shapes
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        host = {**common.summary(times), "tokens_per_s": prefix / min(times)}
        best = max(r["best_tokens_per_s"] for r in rows)
        host["combined_tokens_per_s"] = 1 / (1 / best + 1 / host["tokens_per_s"])
    config = {"model_source": source, "prefix_tokens": prefix, "memlong": mcfg.to_dict(),
              "emb_dim": emb_dim, "memory": "full (every write evicts)",
              "flops_per_token": flops, "flops_formula":
              "2*(m*W_layer + W_k + W_v) + m*4*heads*head_dim*(tau+1)/2"}
    common.finish(NAME, args, config, {"matmul_peak": peak, "rows": rows, "host_text_embeddings":
                                       host}, started)


if __name__ == "__main__":
    main()
