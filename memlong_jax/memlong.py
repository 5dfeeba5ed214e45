"""MemLong's forward: retrieve -> forward -> write, per segment, with the memory as scan carry.

A *segment* is S = n * tau tokens processed together with local causal attention (positions
1..S): one prefix chunk (S = tau) or the final window. For each segment:

1. layers below the memory layer run on the segment alone (they never see memory);
2. the memory layer's normed input gives the chunk K/V (pre-RoPE) and, for the in-graph
   retriever, the chunk embeddings;
3. the query picks top-k chunks from memory written by *earlier* segments (a chunk never
   retrieves itself), and their hit counters go up;
4. with `full=True`, the memory layer and everything above run with retrieval-causal attention
   in the retrieval layers, then the head gives per-token NLL; with `full=False` (prefix chunks
   whose logits nobody needs) this step is skipped entirely;
5. the segment's chunks are written to memory (eviction as configured).

Query modes: `causal` uses the embedding of the chunk just before the segment (carried in the
state), so the choice of chunks depends only on earlier tokens; `segment` (upstream) uses the
segment itself, so the selection sees the tokens being predicted.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from memlong_jax import memory as mem_ops
from memlong_jax.attention import MemoryKV
from memlong_jax.memlong_config import MemLongConfig
from memlong_jax.model import LlamaForCausalLM
from memlong_jax.retrieval import retrieve


class MemLongState(NamedTuple):
    """What carries from one segment to the next: the memory and the causal query."""

    memory: mem_ops.Memory
    last_emb: jax.Array   # [B, d] embedding of the most recently written chunk
    has_last: jax.Array   # [B] bool: whether `last_emb` is real


def init_state(module: LlamaForCausalLM, mcfg: MemLongConfig, batch: int,
               emb_dim: int | None = None) -> MemLongState:
    """Empty memory for `batch` rows; `emb_dim` defaults to the hidden size (in-graph retriever)."""
    cfg = module.config
    emb_dim = emb_dim or cfg.hidden_size
    memory = mem_ops.init_memory(batch, mcfg.capacity_chunks, mcfg.chunk_size,
                                 cfg.num_key_value_heads, cfg.head_dim, emb_dim,
                                 jnp.dtype(mcfg.mem_dtype))
    return MemLongState(memory, jnp.zeros((batch, emb_dim), jnp.float32),
                        jnp.zeros((batch,), bool))


def reset_rows(state: MemLongState, rows) -> MemLongState:
    """Forget everything in the selected batch rows (bool `[B]`)."""
    rows = jnp.asarray(rows, bool)
    return MemLongState(mem_ops.reset_rows(state.memory, rows),
                        jnp.where(rows[:, None], 0.0, state.last_emb), state.has_last & ~rows)


def pooled_chunks(x, tau: int):
    """In-graph retriever: mean over each tau-token chunk of `x` `[B, S, D]`, L2-normalised, fp32."""
    pooled = x.astype(jnp.float32).reshape(x.shape[0], -1, tau, x.shape[-1]).mean(axis=2)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def token_nll(logits, targets):
    """-log softmax(logits)[target] in fp32: `[B, S, V]`, `[B, S]` -> `[B, S]`."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def segment_step(module: LlamaForCausalLM, mcfg: MemLongConfig, params, state: MemLongState,
                 ids, key_emb=None, segment_query=None, full: bool = True):
    """One retrieve -> forward -> write step for `ids` `[B, S]`, S a multiple of tau.

    key_emb `[B, S/tau, d]` and segment_query `[B, d]` come from the text retriever; leave them
    None for the in-graph one. Returns (new state, logits `[B, S, V]`, or None if not `full`).
    """
    tau, m = mcfg.chunk_size, mcfg.memory_layer
    apply = functools.partial(module.apply, {"params": params})
    batch, length = ids.shape
    positions = jnp.broadcast_to(jnp.arange(1, length + 1), ids.shape)

    h = apply(ids, method=module.embed)
    h = jax.lax.stop_gradient(apply(h, positions, 0, m, method=module.run_layers))  # frozen
    x, keys, values = apply(h, m, method=module.memory_kv)
    keys, values = jax.lax.stop_gradient((keys, values))
    if key_emb is None:
        key_emb = pooled_chunks(jax.lax.stop_gradient(x), tau)
    if mcfg.query_mode == "segment":
        if segment_query is None:
            segment_query = pooled_chunks(jax.lax.stop_gradient(x), length)[:, 0]
        query, query_ok = segment_query, jnp.ones((batch,), bool)
    else:
        query, query_ok = state.last_emb, state.has_last

    memory = state.memory
    indices, found = retrieve(mcfg.backend, memory.emb, memory.valid, query, mcfg.top_k)
    found = found & query_ok[:, None]
    memory = mem_ops.count_hits(memory, indices, found)

    logits = None
    if full:
        retrieved = MemoryKV(*jax.lax.stop_gradient(mem_ops.gather_chunks(memory, indices, found)))
        h = apply(h, positions, m, module.config.num_hidden_layers, retrieved,
                  mcfg.retrieval_layers, method=module.run_layers)
        logits = apply(h, method=module.final)

    n = length // tau
    chunked = lambda a: a.reshape(batch, n, tau, *a.shape[2:])
    memory = mem_ops.write_chunks(memory, chunked(keys), chunked(values), key_emb, mcfg.eviction)
    return MemLongState(memory, key_emb[:, -1], jnp.ones((batch,), bool)), logits


def score_sequence(module: LlamaForCausalLM, mcfg: MemLongConfig, params, state: MemLongState,
                   ids, window: int, prefix_nll: bool = False, key_emb=None,
                   window_query=None, window_logits: bool = False):
    """Score `ids` `[B, N]`: prefix chunks through memory (`lax.scan`), then the final window.

    N - window is split into tau-token prefix chunks; the last `window` tokens are one segment.
    Returns (state, nll) where nll `[B, N - 1]` (prefix_nll) or `[B, window - 1]` holds
    -log p(ids[t] | earlier tokens) for the scored tokens t (each prefix chunk predicts its
    successor's first token from its own last position). key_emb `[B, N/tau, d]` and
    window_query `[B, d]` are the text retriever's embeddings (None: in-graph retriever).
    Prefix chunks without `prefix_nll` only run the layers up to the memory layer's K/V; only
    per-token NLL leaves each step, and with `window_logits` the final window's logits
    `[B, window, V]` are returned as a third value.
    """
    tau = mcfg.chunk_size
    batch, total = ids.shape
    prefix = total - window
    if prefix % tau or window % tau or window <= 0:
        raise ValueError(f"sequence length {total} and window {window} must be positive "
                         f"multiples of chunk_size {tau}")
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros((batch, 1), ids.dtype)], axis=1)
    n_prefix = prefix // tau
    step = functools.partial(segment_step, module, mcfg, params, full=prefix_nll)

    def body(carry, xs):
        chunk_ids, chunk_targets, chunk_emb = xs
        carry, logits = step(carry, chunk_ids,
                             None if chunk_emb is None else chunk_emb[:, None], chunk_emb)
        return carry, None if logits is None else token_nll(logits, chunk_targets)

    if n_prefix:
        by_chunk = lambda a: jnp.moveaxis(a.reshape(batch, n_prefix, tau, *a.shape[2:]), 1, 0)
        prefix_emb = None if key_emb is None else jnp.moveaxis(key_emb[:, :n_prefix], 1, 0)
        state, prefix_out = jax.lax.scan(
            body, state, (by_chunk(ids[:, :prefix]), by_chunk(targets[:, :prefix]), prefix_emb))
    state, logits = segment_step(
        module, mcfg, params, state, ids[:, prefix:],
        None if key_emb is None else key_emb[:, n_prefix:], window_query, full=True)
    nll = token_nll(logits, targets[:, prefix:])[:, :-1]
    if prefix_nll and n_prefix:
        prefix_out = jnp.moveaxis(prefix_out, 0, 1).reshape(batch, prefix)
        nll = jnp.concatenate([prefix_out, nll], axis=1)
    return (state, nll, logits) if window_logits else (state, nll)
