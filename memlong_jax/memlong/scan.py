"""MemLong's forward: retrieve -> forward -> write, per segment, with the memory as scan carry.

A *segment* is S = n * tau tokens processed together with local causal attention (positions
1..S): one prefix chunk (S = tau) or the final window. For each segment:

1. layers below the memory layer run on the segment alone (they never see memory);
2. the memory layer's normed input gives the chunk K/V (pre-RoPE) and, for the in-graph
   retriever, the chunk embeddings;
3. the query picks top-k chunks from memory written by *earlier* segments (a chunk never
   retrieves itself), and their hit counters go up;
4. the memory layer and everything above run with retrieval-causal attention in the retrieval
   layers, then the head gives logits (`forward_step`); prefix segments whose logits nobody
   needs skip this (`ingest_step`);
5. the segment's chunks are written to memory (eviction as configured; `read_step`, for ICL's
   label rows, writes nothing).

Query modes: `causal` uses the embedding of the chunk just before the segment (carried in the
state), so the choice of chunks depends only on earlier tokens; `segment` (upstream) uses the
segment itself, so the selection sees the tokens being predicted; `chunk` gives each tau-chunk of
the segment its own top-k, chosen with the embedding of the chunk before it (the carried one for
the first chunk), so a long window is not served by one query whose top-1 is always the chunk
just before the window. A one-chunk segment (every prefix chunk) is the same in `causal` and
`chunk`. With `continuation`, each of the best top_k // 2 chunks brings the chunk written after
it (RETRO), within the same budget of top_k chunks; with `previous`, the chunk written before it
(a line cut by a chunk boundary is read whole); with both, the best top_k // 3 bring both.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from memlong_jax.llama.attention import MemoryKV
from memlong_jax.llama.model import LlamaForCausalLM
from memlong_jax.memlong import memory as mem_ops
from memlong_jax.memlong.config import MemLongConfig
from memlong_jax.memlong.retrieval import retrieve


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
                                 cfg.num_key_value_heads, cfg.head_dim * len(mcfg.kv_layers),
                                 emb_dim,
                                 jnp.dtype(mcfg.mem_dtype))
    return MemLongState(memory, jnp.zeros((batch, emb_dim), jnp.float32),
                        jnp.zeros((batch,), bool))


def reset_rows(state: MemLongState, rows) -> MemLongState:
    """Forget everything in the selected batch rows (bool `[B]`)."""
    rows = jnp.asarray(rows, bool)
    return MemLongState(mem_ops.reset_rows(state.memory, rows),
                        jnp.where(rows[:, None], 0.0, state.last_emb), state.has_last & ~rows)


def pooled_chunks(x, tau: int):
    """In-graph retriever: each tau-token chunk of `x` `[B, S, D]` mean-pooled, L2-normalised,
    in fp32."""
    pooled = x.astype(jnp.float32).reshape(x.shape[0], -1, tau, x.shape[-1]).mean(axis=2)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def token_nll(logits, targets):
    """-log softmax(logits)[target] in fp32: `[B, S, V]`, `[B, S]` -> `[B, S]`."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def lower_stack(module: LlamaForCausalLM, mcfg: MemLongConfig, params, ids):
    """The frozen part of a step for segments `ids` `[B, S]` (local positions 1..S): embeddings
    and the layers below the memory layer, then the memory layer's normed input `x` and pre-RoPE
    K/V. Returns (positions, h entering the memory layer, x, keys, values), all under
    stop_gradient: nothing below the memory layer, and no memory K/V, is ever trained."""
    model = module.bind({"params": params}).model
    positions = jnp.broadcast_to(jnp.arange(1, ids.shape[1] + 1), ids.shape)
    h = model.run_layers(model.embed_tokens(ids), positions, 0, mcfg.memory_layer)
    x, keys, values = model.layers[mcfg.memory_layer].memory_kv(h)
    return positions, *jax.lax.stop_gradient((h, x, keys, values))


def retrieval_query(mcfg: MemLongConfig, state: MemLongState, segment_query):
    """The retrieval query and whether each row has one (causal: nothing before the first chunk)."""
    if mcfg.query_mode == "segment":
        return segment_query, jnp.ones(segment_query.shape[:1], bool)
    return state.last_emb, state.has_last


def chunk_queries(state: MemLongState, key_emb):
    """`chunk` mode: the query of each chunk of a segment (key_emb `[B, n, d]`) is the embedding
    of the chunk before it. Returns queries `[B, n, d]` and whether each exists `[B, n]`."""
    batch, n = key_emb.shape[:2]
    queries = jnp.concatenate([state.last_emb[:, None], key_emb[:, :-1]], axis=1)
    ok = jnp.concatenate([state.has_last[:, None], jnp.ones((batch, n - 1), bool)], axis=1)
    return queries.astype(jnp.float32), ok


def with_neighbours(memory: mem_ops.Memory, indices, found, count: int, step: int):
    """Append to the picks (`[B, k]`) the chunk written right after (`step` 1) or before (-1)
    each of the first `count`: the valid slot whose insertion time differs by `step`. A
    neighbour that was evicted, not written yet, or already picked is not found."""
    b = jnp.arange(indices.shape[0])[:, None]
    near = memory.insert_time[b, indices[:, :count]] + step                   # [B, count]
    match = memory.valid[:, None, :] & (memory.insert_time[:, None, :] == near[..., None])
    neighbour = jnp.argmax(match, axis=-1).astype(indices.dtype)
    repeated = ((neighbour[..., None] == indices[:, None, :]) & found[:, None, :]).any(-1)
    ok = match.any(-1) & found[:, :count] & ~repeated
    return (jnp.concatenate([indices, jnp.where(ok, neighbour, 0)], axis=1),
            jnp.concatenate([found, ok], axis=1))


def neighbour_budget(mcfg: MemLongConfig) -> int:
    """How many of the best picks bring neighbours: top_k // 2 with one kind (continuation or
    previous), top_k // 3 with both; the rest of top_k is searched."""
    kinds = int(mcfg.continuation) + int(mcfg.previous)
    return mcfg.top_k // (kinds + 1) if kinds else 0


def select_chunks(mcfg: MemLongConfig, memory: mem_ops.Memory, query):
    """Top-k slots for each query `[B, d]`: indices int `[B, top_k]`, found bool `[B, top_k]`
    (with neighbours: the searched picks, then their successors, then their predecessors)."""
    follow = neighbour_budget(mcfg)
    kinds = int(mcfg.continuation) + int(mcfg.previous)
    indices, found = retrieve(mcfg.backend, memory.emb, memory.valid, query,
                              mcfg.top_k - kinds * follow)
    for step, on in ((1, mcfg.continuation), (-1, mcfg.previous)):
        if on:
            indices, found = with_neighbours(memory, indices, found, follow, step)
    return indices, found


def retrieve_chunks(mcfg: MemLongConfig, memory: mem_ops.Memory, query, query_ok):
    """Top-k chunks for `query` `[B, d]` (or one query per segment chunk, `[B, n, d]`, giving
    `[B, n, k]` picks) from memory written by earlier segments; hits counted."""
    if query.ndim == 3:
        indices, found = jax.vmap(lambda q: select_chunks(mcfg, memory, q), in_axes=1,
                                  out_axes=1)(query)
    else:
        indices, found = select_chunks(mcfg, memory, query)
    found = found & query_ok[..., None]
    batch = indices.shape[0]
    memory = mem_ops.count_hits(memory, indices.reshape(batch, -1), found.reshape(batch, -1))
    return memory, indices, found


def retrieved_kv(memory: mem_ops.Memory, indices, found, positions: str = "zero") -> MemoryKV:
    """The picked chunks' K/V for attention: one list `[B, k*tau]`, or per query chunk
    (`[B, n, k]` picks) `[B, n, k*tau]`; gradients never flow into memory. `positions`
    (`memory_positions`): `zero` leaves the keys unrotated; `true` gives each memory token its
    RoPE position relative to a segment whose first token is at position 1 and follows the
    newest chunk written (a stream written in order); `near` packs the picks (of each query) in
    write order right before the segment, the newest ending at position 0, as if the retrieved
    text had come just before the local window however far back it was written."""
    batch, tau = indices.shape[0], memory.tau
    flat = indices.reshape(batch, -1)
    kv = mem_ops.gather_chunks(memory, flat, found.reshape(batch, -1))
    if positions != "zero":
        times = memory.insert_time[jnp.arange(batch)[:, None], flat]
        if positions == "true":
            start = (times - memory.clock[:, None]) * tau
        else:
            times = times.reshape(indices.shape)
            earlier = (found[..., None, :] & (times[..., None, :] < times[..., :, None])).sum(-1)
            start = ((earlier - found.sum(-1, keepdims=True)) * tau).reshape(batch, -1)
        kv = (*kv, (start[..., None] + jnp.arange(1, tau + 1)).reshape(batch, -1))
    if indices.ndim == 3:
        kv = tuple(a.reshape(batch, indices.shape[1], -1, *a.shape[2:]) for a in kv)
    return MemoryKV(*jax.lax.stop_gradient(kv))


def per_layer_stack(lm: LlamaForCausalLM, mcfg: MemLongConfig, h, positions,
                    retrieved: MemoryKV, stop: int):
    """`memory_kv=per_layer`: layers memory_layer..stop-1 (a bound `lm`) with `retrieved` in the
    retrieval layers, collecting each retrieval layer's pre-RoPE K/V on the way. Returns (h,
    keys, values), the K/V `[B, S, KV, hd * len(kv_layers)]` to store for these tokens."""
    keys, values, start = [], [], mcfg.memory_layer
    for layer in mcfg.kv_layers:
        h = lm.model.run_layers(h, positions, start, layer, retrieved, mcfg.retrieval_layers)
        _, k, v = lm.model.layers[layer].memory_kv(h)
        keys.append(k)
        values.append(v)
        start = layer
    h = lm.model.run_layers(h, positions, start, stop, retrieved, mcfg.retrieval_layers)
    return h, jnp.concatenate(keys, -1), jnp.concatenate(values, -1)


def write_segment(mcfg: MemLongConfig, memory: mem_ops.Memory, keys, values,
                  key_emb) -> MemLongState:
    """Append the segment's chunks (keys/values `[B, S, kv, hd]`, key_emb `[B, S/tau, d]`)."""
    batch, n = key_emb.shape[:2]
    chunked = lambda a: a.reshape(batch, n, mcfg.chunk_size, *a.shape[2:])
    memory = mem_ops.write_chunks(memory, chunked(keys), chunked(values), key_emb, mcfg.eviction)
    return MemLongState(memory, key_emb[:, -1], jnp.ones((batch,), bool))


class SegmentInputs(NamedTuple):
    """What a segment's forward starts from: the frozen stack's output and the retrieval."""

    positions: jax.Array
    h: jax.Array          # entering the memory layer
    keys: jax.Array       # the memory layer's pre-RoPE K/V of the segment
    values: jax.Array
    key_emb: jax.Array | None
    memory: mem_ops.Memory   # hit counts updated by this retrieval
    indices: jax.Array
    found: jax.Array
    positions_mode: str   # memory_positions

    def retrieved(self) -> MemoryKV:
        return retrieved_kv(self.memory, self.indices, self.found, self.positions_mode)


def segment_inputs(module: LlamaForCausalLM, mcfg: MemLongConfig, params, state: MemLongState,
                   ids, key_emb=None, segment_query=None, need_emb: bool = True,
                   lower=None) -> SegmentInputs:
    """Lower stack and retrieval of segment `ids` `[B, S]`, as every step starts; `need_emb`:
    the chunk embeddings are wanted even when the query does not need them (to write).
    key_emb `[B, S/tau, d]` and segment_query `[B, d]` come from a host-side retriever
    (`retrievers.Retriever`); None: pooled in-graph from the memory layer's input. `lower`:
    `lower_stack`'s output for `ids` when the caller has it (a cached shared prefix)."""
    tau, length = mcfg.chunk_size, ids.shape[1]
    per_chunk = mcfg.query_mode == "chunk"
    if per_chunk and length % tau:
        raise ValueError(f"query_mode=chunk needs segments of whole chunks, got {length} tokens")
    positions, h, x, keys, values = lower if lower is not None else lower_stack(
        module, mcfg, params, ids)
    if key_emb is None and (need_emb or per_chunk):
        key_emb = pooled_chunks(x, tau)
    if segment_query is None and mcfg.query_mode == "segment":
        segment_query = pooled_chunks(x, length)[:, 0]
    query = chunk_queries(state, key_emb) if per_chunk else retrieval_query(mcfg, state,
                                                                            segment_query)
    memory, indices, found = retrieve_chunks(mcfg, state.memory, *query)
    return SegmentInputs(positions, h, keys, values, key_emb, memory, indices, found,
                         mcfg.memory_positions)


def with_context(mcfg: MemLongConfig, retrieved: MemoryKV, context: int) -> MemoryKV:
    """`retrieved` for a segment run with `context` tokens (whole chunks) in front of it: in
    `chunk` mode the context chunks read the first chunk's picks; `true` positions move by
    `context`, so that every memory token keeps its distance to the segment's tokens."""
    if not context:
        return retrieved
    if retrieved.per_chunk:
        front = lambda a: None if a is None else jnp.concatenate(
            [jnp.repeat(a[:, :1], context // mcfg.chunk_size, axis=1), a], axis=1)
        retrieved = MemoryKV(*(front(a) for a in retrieved))
    if mcfg.memory_positions == "true":
        retrieved = retrieved._replace(positions=retrieved.positions + context)
    return retrieved


def context_segment(module: LlamaForCausalLM, mcfg: MemLongConfig, params,
                    state: MemLongState, ids, key_emb=None, segment_query=None, context=None,
                    need_emb: bool = True, lower=None):
    """`segment_inputs` of `ids` `[B, S]` run with `context` `[B, c]` in front of it (whole
    chunks, `prefix_overlap`; None: none): positions 1..c, `ids` after them; retrieval, queries
    and chunk keys are those of `ids`. `lower`: `lower_stack` of [context; ids] when the caller
    has it. Returns (SegmentInputs of `ids`, `lower_stack` of the whole run, the retrieved K/V
    as the whole run reads them, `with_context`)."""
    c = 0 if context is None else context.shape[1]
    if lower is None:
        run = ids if context is None else jnp.concatenate([context, ids], axis=1)
        lower = lower_stack(module, mcfg, params, run)
    seg = segment_inputs(module, mcfg, params, state, ids, key_emb, segment_query, need_emb,
                         lower=tuple(a[:, c:] for a in lower) if c else lower)
    return seg, lower, with_context(mcfg, seg.retrieved(), c)


def run_segment(module: LlamaForCausalLM, mcfg: MemLongConfig, params, state: MemLongState,
                ids, key_emb=None, segment_query=None, context=None, stop: int | None = None,
                need_emb: bool = True, lower=None):
    """`context_segment`, then layers memory_layer..`stop`-1 on [context; ids] (`stop` None:
    none, what memory stores comes from below). Nothing of the context is returned: (SegmentInputs
    of `ids`, h `[B, S, D]` of `ids` after layer `stop`-1 or None, keys, values to store for
    `ids`: the memory layer's, or with `memory_kv=per_layer` the retrieval layers' collected on
    the way, `stop` then past the last of `kv_layers`)."""
    seg, (positions, h, *_), retrieved = context_segment(module, mcfg, params, state, ids,
                                                         key_emb, segment_query, context,
                                                         need_emb, lower)
    c, keys, values = h.shape[1] - ids.shape[1], seg.keys, seg.values
    if stop is None:
        return seg, None, keys, values
    lm = module.bind({"params": params})
    if mcfg.memory_kv == "per_layer":
        h, keys, values = per_layer_stack(lm, mcfg, h, positions, retrieved, stop)
        keys, values = keys[:, c:], values[:, c:]
    else:
        h = lm.model.run_layers(h, positions, mcfg.memory_layer, stop, retrieved,
                                mcfg.retrieval_layers)
    return seg, h[:, c:], keys, values


def forward_step(module: LlamaForCausalLM, mcfg: MemLongConfig, params, state: MemLongState,
                 ids, key_emb=None, segment_query=None, context=None):
    """Retrieve -> forward -> write for `ids` `[B, S]`, S a multiple of tau: (new state, logits
    `[B, S, V]`). `context` `[B, c]` (training with `prefix_overlap`): tokens run in front of
    `ids`, neither written nor given logits (`run_segment`); the K/V written are those
    `ingest_step(context=...)` writes."""
    seg, h, keys, values = run_segment(module, mcfg, params, state, ids, key_emb, segment_query,
                                       context, module.config.num_hidden_layers)
    logits = module.bind({"params": params}).final(h)
    return write_segment(mcfg, seg.memory, keys, values, seg.key_emb), logits


def read_step(module: LlamaForCausalLM, mcfg: MemLongConfig, params, state: MemLongState, ids,
              key_emb=None, segment_query=None, head_at=None, lower=None, context=None):
    """Retrieve -> forward for `ids` `[B, S]` without writing them to memory (S need not be a
    multiple of tau, except in `chunk` mode): (state with the retrieval's hits counted, logits).
    `head_at` int `[B, P]`: run the final norm and LM head only at these positions (logits
    `[B, P, V]`). `context`: as in `forward_step`. `lower`: `lower_stack` of [context; ids] made
    by the caller (`context_segment`)."""
    seg, h, _, _ = run_segment(module, mcfg, params, state, ids, key_emb, segment_query,
                               context, module.config.num_hidden_layers, need_emb=False,
                               lower=lower)
    if head_at is not None:
        h = jnp.take_along_axis(h, head_at[..., None], axis=1)
    return state._replace(memory=seg.memory), module.bind({"params": params}).final(h)


def ingest_step(module: LlamaForCausalLM, mcfg: MemLongConfig, params, state: MemLongState,
                ids, key_emb=None, segment_query=None, context=None) -> MemLongState:
    """Retrieve (hits only) -> write for a prefix segment `ids` `[B, S]` whose logits nobody
    needs: only the layers that produce what memory stores run (below the memory layer, or up
    to the last retrieval layer with `memory_kv=per_layer`). `context` `[B, c]` (whole chunks,
    `prefix_overlap`): tokens run in front of `ids` and not written (`run_segment`)."""
    stop = max(mcfg.retrieval_layers) + 1 if mcfg.memory_kv == "per_layer" else None
    seg, _, keys, values = run_segment(module, mcfg, params, state, ids, key_emb, segment_query,
                                       context, stop)
    return write_segment(mcfg, seg.memory, keys, values, seg.key_emb)


def ingest_segments(module: LlamaForCausalLM, mcfg: MemLongConfig, params, state: MemLongState,
                    ids, key_emb, segment: int, queries=None, context=None) -> MemLongState:
    """`ids` `[B, P]` into memory as a scan of `ingest_step` over `segment`-token
    segments (a shorter last one when `segment` does not divide P). `queries`
    `[B, ceil(P / segment), d]`: a host-side retriever's segment-mode query of each segment
    (`Retriever.prefix_queries`); one-chunk segments default to their chunk's key (same text).
    With `prefix_overlap`, each segment runs with the `prefix_overlap` chunks before it as
    context (`ingest_step`); `context` `[B, >= that]`: the tokens before `ids` (already in
    memory) when this continues an earlier call, else the first segment has none."""
    tau, (batch, total) = mcfg.chunk_size, ids.shape
    overlap = mcfg.prefix_overlap * tau
    if overlap > segment:
        raise ValueError(f"prefix_overlap ({overlap} tokens) exceeds the segment ({segment})")
    emb_of = lambda a, b: None if key_emb is None else key_emb[:, a // tau:b // tau]
    if mcfg.query_mode == "segment" and key_emb is not None and queries is None:
        if segment != tau:
            raise ValueError("segment-mode ingestion with a host-side retriever needs each "
                             "segment's query (Retriever.prefix_queries)")
        queries = key_emb
    stream = ids if context is None or not overlap else jnp.concatenate(
        [context[:, -overlap:], ids], axis=1)
    shift = stream.shape[1] - total
    before = lambda start: (None if not overlap or start + shift < overlap
                            else stream[:, start + shift - overlap:start + shift])
    query_of = lambda i: None if queries is None else queries[:, i]

    def body(state, xs):
        seg_ids, seg_emb, seg_query, seg_context = xs
        return ingest_step(module, mcfg, params, state, seg_ids, seg_emb, seg_query,
                           seg_context), None

    n = total // segment
    first = int(n > 0 and before(0) is None and overlap > 0)   # no context: run alone
    if first:
        state, _ = body(state, (ids[:, :segment], emb_of(0, segment), query_of(0), None))
    if n > first:
        split = lambda a: jnp.moveaxis(a.reshape(batch, n - first, -1, *a.shape[2:]), 1, 0)
        emb = emb_of(first * segment, n * segment)
        contexts = None if not overlap else jnp.stack(
            [before(i * segment) for i in range(first, n)])
        state, _ = jax.lax.scan(body, state, (
            split(ids[:, first * segment:n * segment]), None if emb is None else split(emb),
            None if queries is None else jnp.moveaxis(queries[:, first:n], 1, 0), contexts))
    if total % segment:
        state, _ = body(state, (ids[:, n * segment:], emb_of(n * segment, total), query_of(n),
                                before(n * segment)))
    return state


def ingest_prefix(module: LlamaForCausalLM, mcfg: MemLongConfig, params, state: MemLongState,
                  ids, key_emb=None, window: int | None = None,
                  segment_queries=None, context=None) -> MemLongState:
    """Send `ids` `[B, P]` (P a multiple of tau) into memory chunk by chunk, exactly as a loop of
    `ingest_step` over tau-token chunks would, but faster.

    A prefix chunk's K/V depend only on the chunk itself (layers below the memory layer never
    see memory), so the frozen stack runs on `ingest_chunks` chunks at once as one batch; only
    the cheap retrieve (hit counts) -> write bookkeeping walks the chunks in order. With
    `prefix_context=window` the prefix goes as segments of `window` tokens instead, and with
    `memory_kv=per_layer` through the retrieval layers (`ingest_segments`; `segment_queries`:
    a host-side retriever's segment-mode query per window segment, `Retriever.prefix_queries`;
    `context`: the tokens before `ids` when a prefix fed in blocks continues, for
    `prefix_overlap`).
    """
    tau = mcfg.chunk_size
    if mcfg.prefix_context == "window" or mcfg.memory_kv == "per_layer":
        if mcfg.prefix_context == "window" and window is None:
            raise ValueError("prefix_context=window needs the local window's length")
        segment = window if mcfg.prefix_context == "window" else tau
        return ingest_segments(module, mcfg, params, state, ids, key_emb, segment,
                               segment_queries, context)
    batch, n = ids.shape[0], ids.shape[1] // tau

    def block(state, xs):
        block_ids, block_emb = xs                          # [B, G, tau], [B, G, d] | None
        g = block_ids.shape[1]
        _, _, x, keys, values = lower_stack(module, mcfg, params, block_ids.reshape(-1, tau))
        if block_emb is None:
            block_emb = pooled_chunks(x, tau).reshape(batch, g, -1)
        per_chunk = lambda a: jnp.moveaxis(a.reshape(batch, g, *a.shape[1:]), 1, 0)

        def chunk(state, c):
            chunk_keys, chunk_values, emb = c
            query = retrieval_query(mcfg, state, emb)
            memory, _, _ = retrieve_chunks(mcfg, state.memory, *query)
            return write_segment(mcfg, memory, chunk_keys, chunk_values, emb[:, None]), None

        state, _ = jax.lax.scan(chunk, state, (per_chunk(keys), per_chunk(values),
                                               jnp.moveaxis(block_emb, 1, 0)))
        return state, None

    g = min(mcfg.ingest_chunks, n)
    full_blocks = n // g
    by_block = lambda a, count: jnp.moveaxis(a.reshape(batch, count, g, *a.shape[2:]), 1, 0)
    ids_chunks = ids.reshape(batch, n, tau)
    emb = key_emb
    head = (by_block(ids_chunks[:, :full_blocks * g], full_blocks),
            None if emb is None else by_block(emb[:, :full_blocks * g], full_blocks))
    state, _ = jax.lax.scan(block, state, head)
    if n % g:   # the remainder: one smaller block
        state, _ = block(state, (ids_chunks[:, full_blocks * g:],
                                 None if emb is None else emb[:, full_blocks * g:]))
    return state


def window_nll(module: LlamaForCausalLM, mcfg: MemLongConfig, params, state: MemLongState,
               ids, key_emb=None, segment_query=None, scored: int | None = None):
    """The protocol's final local window `ids` `[B, S]`: `forward_step`, then the NLL of each
    next token inside the window (its first token is predicted by nothing in it). Returns
    (state, nll `[B, S - 1]`, or its last `scored` columns): only NLL leaves the device."""
    state, logits = forward_step(module, mcfg, params, state, ids, key_emb, segment_query)
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros((ids.shape[0], 1), ids.dtype)], axis=1)
    nll = token_nll(logits, targets)[:, :-1]
    return state, nll if scored is None else nll[:, -scored:]


def score_sequence(module: LlamaForCausalLM, mcfg: MemLongConfig, params, state: MemLongState,
                   ids, window: int, key_emb=None, window_query=None):
    """The scoring protocol in one graph (training's validation): the first N - window tokens
    of `ids` `[B, N]` into memory (`ingest_prefix`), then `window_nll` of the last `window`.
    `eval.scoring.Scorer` runs the same two pieces with the prefix fed from the host in blocks.
    key_emb `[B, N/tau, d]`, window_query `[B, d]`: a host-side retriever's (None: in-graph).
    Returns (state, nll `[B, window - 1]`)."""
    tau, total = mcfg.chunk_size, ids.shape[1]
    prefix = total - window
    if prefix % tau or window % tau or window <= 0:
        raise ValueError(f"sequence length {total} and window {window} must be positive "
                         f"multiples of chunk_size {tau}")
    if prefix:
        state = ingest_prefix(module, mcfg, params, state, ids[:, :prefix],
                              None if key_emb is None else key_emb[:, :prefix // tau],
                              window=window)
    return window_nll(module, mcfg, params, state, ids[:, prefix:],
                      None if key_emb is None else key_emb[:, prefix // tau:], window_query)
