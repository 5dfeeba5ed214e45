"""The share of a step spent in top-k retrieval and memory writes, device vs faiss backends, at
memory sizes from 32k to 1M tokens.

    .venv/bin/python -m bench.retrieval               # full run -> bench/results/retrieval.json
    .venv/bin/python -m bench.retrieval --quick       # smoke test -> out/bench-quick/

Why: retrieval and writes are the bookkeeping MemLong adds to every chunk; the issue's target is
retrieve + write under 5% of step time at 32k tokens of memory, and the backends should be
compared where memory is large (a host FAISS call copies the row's embeddings every chunk).

What runs, per backend and memory size M (capacity M / 128 chunks, SmolLM2-135M's MemLong
settings otherwise: 384-d text-retriever embeddings given precomputed, causal query, paper
eviction, bf16 K/V), on a memory that starts full, over one block of `--block-chunks` chunks
(ingest_prefix's default 32), each jitted with the state donated and threaded through the calls
(`common.time_carried`), per chunk:

- retrieve: the query, top-k over the memory and the hit counts (`scan.retrieve_chunks`);
- write: `scan.write_segment` (eviction when a row is full, then the update of one slot);
- evict: one eviction pass over the memory (`memory.evict`). A write evicts only into a full
  row, and an eviction frees at least half of it, so it is charged per chunk as its time over
  capacity / 2 and added to retrieve+write in the shares;
- retrieve+write: both, chunk by chunk, i.e. `ingest_prefix`'s inner loop;
- prefix step: `scan.ingest_prefix` on the block (frozen stack batched + the loop above);
- full step: `scan.forward_step` on one tau-token chunk (retrieve, all 30 layers
  with the retrieved chunks, logits, write), the per-segment step of training.
Shares = (retrieve+write + evict) per chunk / step per chunk.

Estimated wall time of the default run on a quiet 2-core CPU: 15-25 minutes (the 1M-token
memory is 768 MB of K/V; the faiss backend copies 12.5 MB of embeddings to the host per chunk
there).
"""

from __future__ import annotations

import functools
import sys
import time

from bench import common

NAME = "retrieval"


def build_parser():
    p = common.parser(__doc__, NAME)
    p.add_argument("--memory-tokens", default="32k,128k,512k,1M", help="default: %(default)s")
    p.add_argument("--backends", default="device,faiss", help="default: %(default)s")
    p.add_argument("--block-chunks", type=int, default=32, help="default: %(default)s")
    p.add_argument("--repeats", type=int, default=3, help="default: %(default)s")
    p.add_argument("--no-full-step", action="store_true", help="skip the full-step timing")
    p.add_argument("--checkpoint", default=common.SMOLLM2_CKPT)
    return p


def step_functions(module, mcfg, g: int):
    """The jittable pieces, each `(state, ...) -> state` so the state can be donated."""
    import jax
    import jax.numpy as jnp
    from memlong_jax.memlong import scan

    def retrieve(state, emb):
        query = scan.retrieval_query(mcfg, state, emb)
        memory, _, _ = scan.retrieve_chunks(mcfg, state.memory, *query)
        return state._replace(memory=memory, last_emb=emb, has_last=jnp.ones_like(state.has_last))

    def write(state, keys, values, emb):
        return scan.write_segment(mcfg, state.memory, keys, values, emb[:, None])

    def loop(body):
        def run(state, keys, values, emb):   # keys/values [1, g*tau, kv, hd], emb [1, g, d]
            tau = mcfg.chunk_size
            per = lambda a: jnp.moveaxis(a.reshape(1, g, tau, *a.shape[2:]), 1, 0)
            xs = (per(keys), per(values), jnp.moveaxis(emb, 1, 0))
            return jax.lax.scan(lambda s, x: (body(s, *x), None), state, xs)[0]
        return run

    return {
        "retrieve": loop(lambda s, k, v, e: retrieve(s, e)),
        "write": loop(lambda s, k, v, e: write(s, k, v, e)),
        "retrieve_write": loop(lambda s, k, v, e: write(retrieve(s, e), k, v, e)),
    }


def measure(model, base_mcfg, memory_tokens: int, backend: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    from memlong_jax.memlong import memory as mem_ops
    from memlong_jax.memlong import scan
    from memlong_jax.memlong.retrievers import make_retriever

    mcfg = base_mcfg.replace(memory_tokens=memory_tokens, backend=backend)
    cfg, g, tau = model.config, args.block_chunks, base_mcfg.chunk_size
    retriever = make_retriever(mcfg)
    emb_dim = retriever.embedding_size(cfg)
    key = jax.random.PRNGKey(3)
    kv_shape = (1, g * tau, cfg.num_key_value_heads, cfg.head_dim)
    keys = jax.random.normal(key, kv_shape, jnp.float32)
    values = jax.random.normal(jax.random.fold_in(key, 1), kv_shape, jnp.float32)
    emb = jnp.asarray(common.unit_vectors((1, g, emb_dim)))
    ids = jax.random.randint(key, (1, g * tau), 0, cfg.vocab_size)
    text = retriever.host_side
    state = common.full_state(model.module, mcfg, emb_dim)
    row = {"backend": backend, "memory_tokens": memory_tokens,
           "capacity_chunks": mcfg.capacity_chunks, "block_chunks": g}
    for name, fn in step_functions(model.module, mcfg, g).items():
        t = common.time_carried(fn, state, keys, values, emb, repeats=args.repeats)
        row[name] = {**t, "per_chunk_s": t["median_s"] / g}
        state = common.full_state(model.module, mcfg, emb_dim)  # donated: rebuild
    evict = lambda s: s._replace(memory=mem_ops.evict(s.memory, mcfg.eviction))
    t = common.time_carried(evict, state, repeats=args.repeats)
    row["evict"] = {**t, "per_chunk_s": t["median_s"] / (mcfg.capacity_chunks // 2)}
    state = common.full_state(model.module, mcfg, emb_dim)
    ingest = functools.partial(scan.ingest_prefix, model.module, mcfg.replace(ingest_chunks=g))
    prefix = lambda s, p, i, e: ingest(p, s, i, e)
    t = common.time_carried(prefix, state, model.params, ids, emb if text else None,
                            repeats=args.repeats)
    row["prefix_step"] = {**t, "per_chunk_s": t["median_s"] / g}
    rw = row["retrieve_write"]["per_chunk_s"] + row["evict"]["per_chunk_s"]
    row["share_of_prefix_step"] = rw / row["prefix_step"]["per_chunk_s"]
    if not args.no_full_step:
        state = common.full_state(model.module, mcfg, emb_dim)
        full = lambda s, p, i, e: scan.forward_step(model.module, mcfg, p, s, i, e)[0]
        t = common.time_carried(full, state, model.params, ids[:, :tau],
                                emb[:, :1] if text else None, repeats=args.repeats)
        row["full_step"] = {**t, "per_chunk_s": t["median_s"]}
        row["share_of_full_step"] = rw / t["median_s"]
    return row


def main() -> None:
    args = build_parser().parse_args()
    if args.quick:
        args.memory_tokens, args.block_chunks, args.repeats = "4k,16k", 4, 2
        args.no_full_step = True
    started = time.perf_counter()
    model, source = common.load_smollm2(args.checkpoint)
    mcfg = model.memlong_config
    rows = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        for m in common.parse_list(args.memory_tokens):
            row = measure(model, mcfg, m, backend, args)
            rows.append(row)
            full = (f", {row['share_of_full_step']:.1%} of a full step"
                    if "share_of_full_step" in row else "")
            print(f"{backend:>6} {common.fmt_tokens(m):>5}: retrieve "
                  f"{row['retrieve']['per_chunk_s'] * 1e3:.2f} ms, write "
                  f"{row['write']['per_chunk_s'] * 1e3:.2f} ms, both "
                  f"{row['retrieve_write']['per_chunk_s'] * 1e3:.2f} ms per chunk (+ eviction "
                  f"{row['evict']['per_chunk_s'] * 1e3:.3f} ms) = "
                  f"{row['share_of_prefix_step']:.1%} of a prefix step{full}", file=sys.stderr)
    config = {"model_source": source, "memlong": mcfg.to_dict(),
              "memory": "full (eviction timed apart, charged once per capacity / 2 writes)",
              "state": "donated, threaded through calls", "matmul_peak": common.matmul_peak()}
    common.finish(NAME, args, config, rows, started)


if __name__ == "__main__":
    main()
