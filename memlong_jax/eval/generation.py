"""Generation with memory: a prompt of any length goes through memory, then tokens are decoded
with a local KV cache of fixed capacity W (the local window) whose oldest half moves into memory
whenever it fills.

The pieces are pure functions, jitted once per model, MemLong config and window (prompt length
for `start`); `Generator` drives them and does what needs the host (the text retriever's
embeddings, sampling keys, stop tokens):

* `start`: the prompt's head goes into memory tau tokens at a time through
  `scan.ingest_prefix`, exactly as `score_sequence` ingests its prefix; then the prompt's tail
  (the last W - tau < L <= W tokens, or the whole prompt when it fits) becomes the local cache in
  one forward, ordered like `scan.forward_step` on the final window: layers below the memory layer,
  retrieval, the layers above with the retrieved chunks. Nothing of the tail is written to
  memory: it stays local.
* `decode`: one token per row attends to the cache (causal) and, in the retrieval layers, to the
  chunks retrieved at the last `start`/`spill`/`refresh`. No retrieval and no host round trip
  inside.
* `decode_run`: many `decode` steps in one call (a `lax.while_loop`), the tokens chosen on the
  device: `Generator.tokens` goes back to the host only between runs, for a spill or refresh
  (text embeddings) or after `run_steps` tokens, not once per token.
* `spill` (only when the cache is full): its oldest `spill_size` tokens (half, in whole chunks)
  go into memory: the memory layer's pre-RoPE K/V straight from its cache, and embeddings pooled
  from the memory layer's normed inputs kept beside the cache (hidden retriever, as
  `scan.pooled_chunks`) or made on the host from those very tokens' text (text retriever,
  `retrievers.TextRetriever`; upstream embeds text from the start of the sequence instead);
  the cache shifts left and the chunks for the new window are retrieved.

Design choices:

* Cache: per layer a `KVCache`: the keys un-rotated and rotated, laid out for decoding; beside
  it the memory layer's normed inputs `[B, W, hidden]` and the ids `[B, W]` (what a spill needs),
  the fill count, shared by all rows (prompts in a batch have one length), and the RoPE tables of
  the slots (made once in `start`: inside a decode step XLA would evaluate them again per layer).
* Positions: slot j is local position j+1, as in the scoring path (memory keys at 0). A key is
  rotated when it enters its slot, with the very positions and code of the scoring path's
  window; a spill shifts the cache and rotates the kept keys again from their un-rotated copy
  (once per spill, no rounding from rotating rotated keys, no position drift; absolute
  positions would grow without bound and lose fp32 precision in the angles).
* Retrieval runs once per `start`/`spill`, not per token: the causal query (the most recently
  written chunk, `MemLongState.last_emb`) only changes when memory is written. Hit counters go up
  once per retrieval, as for one segment in scoring.
* `chunk` query mode: the query is the last *completed* chunk, as in scoring's window: the
  prompt's tail runs with one top-k per tail chunk (queried by the chunk before it), and
  `refresh` retrieves again each time a new chunk begins (after a spill, too), with the
  just-completed chunk as the query.
* `segment` query mode: the embedding of the local window's contents (its end, as far as the
  text encoder reads: `TextRetriever.window_query`; the prompt's tail at
  `start`, the kept half after a spill), refreshed only at spills. Upstream queries with all past
  ids truncated to 8192 tokens; the window is what `score_sequence`'s segment mode uses, has a
  bounded cost however long the generation runs, and keeps generation and scoring comparable.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memlong_jax.errors import UserError
from memlong_jax.llama.attention import KVCache, MemoryKV
from memlong_jax.llama.model import LlamaForCausalLM, cache_rope
from memlong_jax.memlong import scan
from memlong_jax.memlong.config import MemLongConfig
from memlong_jax.memlong.retrievers import HIDDEN, Retriever

DEFAULT_WINDOW = 2048
# Decode steps per jitted call of `Generator.tokens` (`decode_run`): the host round trip per call
# is shared by this many tokens, and streaming yields tokens in bursts of at most this many.
# 0: no fusing, one `decode` call and host round trip per token (`TokenStream`'s loop).
DEFAULT_RUN_STEPS = 32


class GenState(NamedTuple):
    """Everything that carries from one decode step to the next (a pytree)."""

    memlong: scan.MemLongState  # memory and the causal query
    retrieved: MemoryKV            # [B, k*tau, KV, D]: the chunks the current window attends to
    cache: tuple                   # per layer a `KVCache` of W slots
    mem_x: jax.Array               # [B, W, hidden] memory layer's normed inputs (hidden retriever)
    ids: jax.Array                 # [B, W] int32 cached token ids (text retriever, segment query)
    length: jax.Array              # int32 scalar: slots in use, all rows alike
    rope: tuple                    # (cos, sin) [1, W, D] of the slots (`model.cache_rope`)


def spill_size(mcfg: MemLongConfig, window: int) -> int:
    """Tokens a full cache hands to memory: its oldest half, rounded down to whole chunks."""
    return mcfg.chunk_size * (window // mcfg.chunk_size // 2)


def check_window(mcfg: MemLongConfig, window) -> None:
    """A window of whole chunks, at least two: a spill moves whole chunks and must leave the
    window something to attend to (and, in segment mode, to build the query from)."""
    tau = mcfg.chunk_size
    if (not isinstance(window, int) or isinstance(window, bool) or window < 2 * tau
            or window % tau):
        raise UserError(f"window must be a multiple of chunk_size ({tau}) and at least two "
                        f"chunks ({2 * tau}), got {window!r}")


def init_state(module: LlamaForCausalLM, mcfg: MemLongConfig, mstate: scan.MemLongState,
               window: int) -> GenState:
    """An empty cache of `window` slots next to the memory of `mstate`."""
    cfg = module.config
    batch = mstate.last_emb.shape[0]
    mem = jnp.zeros((batch, mcfg.top_k * mcfg.chunk_size, cfg.num_key_value_heads,
                     cfg.head_dim * len(mcfg.kv_layers)), jnp.dtype(mcfg.mem_dtype))
    positions = None if mcfg.memory_positions == "zero" else jnp.zeros(mem.shape[:2], jnp.int32)
    return GenState(mstate, MemoryKV(mem, mem, jnp.zeros(mem.shape[:2], bool), positions),
                    tuple(KVCache.empty(batch, window, cfg.num_key_value_heads, cfg.head_dim,
                                        module.dtype) for _ in range(cfg.num_hidden_layers)),
                    jnp.zeros((batch, window, cfg.hidden_size), module.dtype),
                    jnp.zeros((batch, window), jnp.int32), jnp.zeros((), jnp.int32),
                    cache_rope(cfg, window))


def _retrieve(mcfg: MemLongConfig, gen: GenState, query, query_ok):
    """Pick the top-k chunks for `query` (hits counted): (state, the picks' MemoryKV, shared
    `[B, d]` queries or one per chunk `[B, n, d]`)."""
    memory, indices, found = scan.retrieve_chunks(mcfg, gen.memlong.memory, query, query_ok)
    return (gen._replace(memlong=gen.memlong._replace(memory=memory)),
            scan.retrieved_kv(memory, indices, found, mcfg.memory_positions))


def _retrieve_window(mcfg: MemLongConfig, gen: GenState, x, segment_query) -> GenState:
    """Pick the top-k chunks for the window whose memory-layer inputs are `x` `[B, S, hidden]`
    and keep their K/V for decoding; the query as in `scan.forward_step` (segment mode:
    `segment_query` from the text retriever, else `x` pooled)."""
    if segment_query is None and mcfg.query_mode == "segment":
        segment_query = scan.pooled_chunks(x, x.shape[1])[:, 0]
    gen, retrieved = _retrieve(mcfg, gen, *scan.retrieval_query(mcfg, gen.memlong,
                                                                   segment_query))
    return gen._replace(retrieved=retrieved)


def _retrieve_per_chunk(mcfg: MemLongConfig, gen: GenState, x, tail_emb):
    """`chunk` mode for tokens `x` `[B, L, hidden]` at cache slots 0..L-1: each chunk of slots
    retrieves with the chunk before it (`scan.chunk_queries`; tail_emb `[B, L // tau, d]`:
    text embeddings of the complete chunks, else pooled from `x`). Returns (state keeping the
    last token's chunk's picks for decoding, per-chunk MemoryKV `[B, W/tau, ...]`)."""
    tau, length = mcfg.chunk_size, x.shape[1]
    n, complete = gen.ids.shape[1] // tau, length // tau
    if tail_emb is None:
        tail_emb = scan.pooled_chunks(x[:, :complete * tau], tau)
    emb = jnp.zeros((x.shape[0], n, gen.memlong.last_emb.shape[1]), jnp.float32)
    emb = emb.at[:, :complete].set(tail_emb.astype(jnp.float32))
    query, ok = scan.chunk_queries(gen.memlong, emb)
    gen, retrieved = _retrieve(mcfg, gen, query, ok & (jnp.arange(n) <= (length - 1) // tau))
    last = (length - 1) // tau
    return gen._replace(retrieved=jax.tree_util.tree_map(lambda a: a[:, last], retrieved)), \
        retrieved


def _extend(module, mcfg: MemLongConfig, params, gen: GenState, ids, refresh: bool = False,
            segment_query=None, tail_emb=None):
    """Append `ids` `[B, T]` to the cache; returns (state, logits `[B, V]` of the last token).

    Layers below the memory layer (they never see memory), the memory layer's normed input kept
    for spills, with `refresh` a new retrieval for the window (in `chunk` mode one per chunk of
    `ids`, which then start at slot 0), then the memory layer and above with the retrieved
    chunks in the retrieval layers.
    """
    m, n_layers = mcfg.memory_layer, module.config.num_hidden_layers
    apply = functools.partial(module.apply, {"params": params})
    h = apply(ids, method=module.embed)
    h, lower = apply(h, gen.cache[:m], gen.length, 0, m, rope=gen.rope,
                     method=module.extend_layers)
    x = apply(h, m, method=module.memory_kv)[0]
    put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype),
                                                               gen.length, axis=1)
    mem_x = put(gen.mem_x, x)
    retrieved = gen.retrieved
    if refresh and mcfg.query_mode == "chunk":
        gen, retrieved = _retrieve_per_chunk(mcfg, gen, x, tail_emb)
    elif refresh:
        gen = _retrieve_window(mcfg, gen, x, segment_query)
        retrieved = gen.retrieved
    h, upper = apply(h, gen.cache[m:], gen.length, m, n_layers, retrieved,
                     mcfg.retrieval_layers, gen.rope, method=module.extend_layers)
    logits = apply(h[:, -1:], method=module.final)[:, 0]
    return gen._replace(cache=lower + upper, mem_x=mem_x, ids=put(gen.ids, ids),
                        length=gen.length + ids.shape[1]), logits


@functools.partial(jax.jit, static_argnames=("module", "mcfg", "window"))
def start(module, mcfg: MemLongConfig, window: int, params, mstate: scan.MemLongState,
          prefix_ids, local_ids, key_emb=None, segment_query=None, tail_emb=None,
          prefix_queries=None):
    """Prompt -> (state, logits `[B, V]` for the first new token).

    prefix_ids `[B, n*tau]` (maybe empty) go into memory, local_ids `[B, L]` (1 <= L <= window)
    into the cache. key_emb `[B, n, d]` / segment_query `[B, d]` / tail_emb `[B, L // tau, d]`:
    text retriever embeddings of the prefix chunks / of the local ids / of their complete
    chunks (`chunk` mode) / of the prefix's segments (`Retriever.prefix_queries`) (None for
    the in-graph retriever).
    """
    if prefix_ids.shape[1]:
        mstate = scan.ingest_prefix(module, mcfg, params, mstate, prefix_ids, key_emb,
                                       window=window, segment_queries=prefix_queries)
    gen = init_state(module, mcfg, mstate, window)
    return _extend(module, mcfg, params, gen, local_ids, refresh=True,
                   segment_query=segment_query, tail_emb=tail_emb)


@functools.partial(jax.jit, static_argnames=("module", "mcfg"), donate_argnames=("gen",))
def decode(module, mcfg: MemLongConfig, params, gen: GenState, tokens):
    """Append one token per row (`tokens` `[B]`; the cache must have a free slot) -> (state,
    next-token logits `[B, V]`)."""
    return _extend(module, mcfg, params, gen, tokens[:, None])


@functools.partial(jax.jit, static_argnames=("mcfg",), donate_argnames=("gen",))
def spill(mcfg: MemLongConfig, gen: GenState, key_emb=None, segment_query=None) -> GenState:
    """Move the oldest `spill_size` tokens of a *full* cache into memory, shift the rest to the
    front and retrieve for the new window (in `chunk` mode `refresh` follows instead: a new
    chunk begins). key_emb `[B, n/tau, d]` / segment_query `[B, d]`: text retriever embeddings
    of the spilled chunks / of the kept tokens."""
    window = gen.ids.shape[1]
    n = spill_size(mcfg, window)
    keys, values = (jnp.concatenate(parts, axis=-1) for parts in
                    zip(*((gen.cache[layer].keys, gen.cache[layer].token_values())
                          for layer in mcfg.kv_layers)))
    if key_emb is None:
        key_emb = scan.pooled_chunks(gen.mem_x[:, :n], mcfg.chunk_size)
    mstate = scan.write_segment(mcfg, gen.memlong.memory, keys[:, :n], values[:, :n], key_emb)
    shift = lambda a: jnp.roll(a, -n, axis=1)  # the stale tail lies beyond `length`: masked
    gen = GenState(mstate, gen.retrieved, tuple(c.shift(n, *gen.rope) for c in gen.cache),
                   shift(gen.mem_x), shift(gen.ids), gen.length - n, gen.rope)
    if mcfg.query_mode == "chunk":
        return gen
    return _retrieve_window(mcfg, gen, gen.mem_x[:, :window - n], segment_query)


@functools.partial(jax.jit, static_argnames=("mcfg",), donate_argnames=("gen",))
def refresh(mcfg: MemLongConfig, gen: GenState, query=None) -> GenState:
    """`chunk` mode, when the next token begins a chunk (`length` a multiple of tau): retrieve
    with the chunk just completed, slots length-tau..length-1 (`query` `[B, d]`: its text
    embedding; None: pooled from the cached memory-layer inputs)."""
    tau = mcfg.chunk_size
    if query is None:
        done = jax.lax.dynamic_slice_in_dim(gen.mem_x, gen.length - tau, tau, axis=1)
        query = scan.pooled_chunks(done, tau)[:, 0]
    gen, retrieved = _retrieve(mcfg, gen, query, jnp.ones(query.shape[:1], bool))
    return gen._replace(retrieved=retrieved)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: the most likely one when `temperature` is 0 (greedy), else
    a draw from softmax(logits / temperature) restricted to the `top_k` most likely tokens
    (0: no limit) and to the smallest most-likely set whose probability reaches `top_p`."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        if not number(self.temperature) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise UserError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise UserError(f"top_k must be an integer >= 0 (0: no limit), got {self.top_k!r}")
        if not number(self.top_p) or not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p!r}")


@functools.partial(jax.jit, static_argnames=("sampling",))
def sample(logits, key, sampling: Sampling):
    """Next token per row from logits `[B, V]` (fp32 arithmetic) -> int32 `[B]`."""
    logits = logits.astype(jnp.float32)
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        ordered = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        cutoff = jnp.min(jnp.where(before < sampling.top_p, ordered, jnp.inf), axis=-1,
                         keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def choose(logits, key, index, done, stops, pad, sampling: Sampling):
    """Step `index`'s tokens `[B]`: drawn with `fold_in(key, index)`, `pad` for the rows already
    done; and which rows are done after them (one of `stops` `[S]` chosen)."""
    tokens = jnp.where(done, pad, sample(logits, jax.random.fold_in(key, index), sampling))
    return tokens, done | (tokens[:, None] == stops[None, :]).any(axis=-1)


_choose = jax.jit(choose, static_argnames=("sampling",))


def _stops(max_new_tokens, stop_ids: Sequence[int], pad_id: int | None):
    """The checked token budget's stop ids `[S]` and pad id (default: the first stop id)."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) \
            or max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    stops = np.asarray(list(stop_ids), np.int32)
    return stops, pad_id if pad_id is not None else int(stops[0]) if stops.size else 0


class TokenStream:
    """The sampling loop over a decoder's `start(params, prompt_ids) -> (state, logits)` and
    `step(params, state, tokens) -> (state, logits)`, one host round trip per token; shared by
    block memory's `BlockGenerator` and MemLong's `Generator` (which fuses the steps)."""

    def tokens(self, params, prompt_ids, max_new_tokens: int, sampling: Sampling = Sampling(),
               stop_ids: Sequence[int] = (), seed: int = 0,
               pad_id: int | None = None) -> Iterator[np.ndarray]:
        """Yield each step's new tokens `[B]` as they are chosen (streaming).

        Stops after `max_new_tokens` steps or once every row has produced one of `stop_ids`
        (the stop token is yielded); rows that stopped earlier yield `pad_id` (default: the
        first stop id). Step i draws with `fold_in(PRNGKey(seed), i)`: a seed fixes the output.
        """
        stops, pad = _stops(max_new_tokens, stop_ids, pad_id)
        key = jax.random.PRNGKey(seed)
        gen, logits = self.start(params, prompt_ids)
        tokens, done = _choose(logits, key, 0, jnp.zeros(np.shape(prompt_ids)[0], bool), stops,
                               pad, sampling)
        chosen, finished = jax.device_get((tokens, done.all()))
        yield chosen
        if not finished:
            yield from self._decode(params, gen, tokens, done, key, max_new_tokens, sampling,
                                    stops, pad)

    def _decode(self, params, gen, tokens, done, key, max_new_tokens: int, sampling: Sampling,
                stops, pad) -> Iterator[np.ndarray]:
        """`tokens`'s steps after step 0's `tokens` `[B]`: one `step` and one round trip each."""
        for index in range(1, max_new_tokens):
            gen, logits = self.step(params, gen, tokens)
            tokens, done = _choose(logits, key, index, done, stops, pad, sampling)
            tokens, finished = jax.device_get((tokens, done.all()))
            yield tokens
            if finished:
                return


@functools.partial(jax.jit, static_argnames=("module", "mcfg", "sampling", "capacity"),
                   donate_argnames=("gen",))
def decode_run(module, mcfg: MemLongConfig, sampling: Sampling, capacity: int, params,
               gen: GenState, tokens, key, first, steps, done, stops, pad):
    """`steps` (traced, at most `capacity`) decode steps in one call, with no host round trip:
    each feeds the tokens `[B]` chosen last (`decode`) and chooses the next ones from their
    logits (`choose`, step index `first + j`). The cache must take them with no spill or
    refresh due on the way (`Generator.room`). Stops early once every row is done. Returns
    (state, the last tokens chosen, the logits they were chosen from `[B, V]`, done, the tokens
    chosen `[capacity, B]`, of which the first `taken` are real, taken)."""

    def body(carry):
        gen, tokens, _, done, out, j = carry
        gen, logits = _extend(module, mcfg, params, gen, tokens[:, None])
        tokens, done = choose(logits, key, first + j, done, stops, pad, sampling)
        return gen, tokens, logits, done, out.at[j].set(tokens), j + 1

    more = lambda carry: (carry[5] < steps) & ~carry[3].all()
    batch = tokens.shape[0]
    return jax.lax.while_loop(more, body, (
        gen, tokens, jnp.zeros((batch, module.config.vocab_size), module.dtype), done,
        jnp.zeros((capacity, batch), jnp.int32), jnp.zeros((), jnp.int32)))


@dataclasses.dataclass
class Generator(TokenStream):
    """Runs `start` / `decode` / `spill` for one model, MemLong config and window.

    `retriever` (`retrievers.make_retriever`) makes the text retriever's embeddings on the host,
    before the jitted calls, as in scoring; the hidden one pools in-graph.
    """

    module: LlamaForCausalLM
    mcfg: MemLongConfig
    window: int = DEFAULT_WINDOW
    retriever: Retriever = HIDDEN
    run_steps: int = DEFAULT_RUN_STEPS

    def __post_init__(self):
        self.mcfg.validate(self.module.config)
        check_window(self.mcfg, self.window)
        if not isinstance(self.run_steps, int) or isinstance(self.run_steps, bool) \
                or self.run_steps < 0:
            raise UserError(f"run_steps must be an integer >= 0, got {self.run_steps!r}")

    def start(self, params, prompt_ids, mstate: scan.MemLongState | None = None):
        """Prompt `[B, P]` (P >= 1) -> (state, logits for the first new token). `mstate`: a
        memory to start from (default empty), e.g. one built by scoring earlier text."""
        ids = np.asarray(prompt_ids)
        if ids.ndim != 2 or not ids.shape[1] or not np.issubdtype(ids.dtype, np.integer):
            raise UserError(f"prompt ids must be a non-empty int array [B, P], got {ids.dtype} "
                            f"{ids.shape}")
        ids = ids.astype(np.int32)
        tau = self.mcfg.chunk_size
        prefix = max(0, -(-(ids.shape[1] - self.window) // tau) * tau)
        keys, query = self.retriever.chunk_keys, self.retriever.window_query
        if mstate is None:
            mstate = self.retriever.empty_state(self.module, self.mcfg, ids.shape[0])
        tail = ids[:, prefix:]
        tail_emb = None
        if self.mcfg.query_mode == "chunk":
            tail_emb = keys(tail[:, :tail.shape[1] // tau * tau])
        return start(self.module, self.mcfg, self.window, params, mstate, ids[:, :prefix],
                     tail, keys(ids[:, :prefix]), query(tail), tail_emb,
                     self.retriever.prefix_queries(self.mcfg, ids[:, :prefix], self.window))

    def spill(self, gen: GenState) -> GenState:
        """`spill`, with the text retriever's embeddings made from the cached ids."""
        n = spill_size(self.mcfg, self.window)
        ids = np.asarray(gen.ids) if self.retriever.host_side else None
        return spill(self.mcfg, gen, None if ids is None else self.retriever.chunk_keys(ids[:, :n]),
                     None if ids is None else self.retriever.window_query(ids[:, n:]))

    def room(self, gen: GenState) -> tuple[GenState, int]:
        """Make room for the next token (`spill` a full cache; in `chunk` mode `refresh` when
        it begins a chunk) -> (state, tokens that can be fed before the next spill or refresh)."""
        if int(gen.length) == self.window:
            gen = self.spill(gen)
        length, tau = int(gen.length), self.mcfg.chunk_size
        if self.mcfg.query_mode != "chunk":
            return gen, self.window - length
        if length % tau == 0:
            done = (np.asarray(gen.ids)[:, length - tau:length] if self.retriever.host_side
                    else None)
            gen = refresh(self.mcfg, gen,
                          None if done is None else self.retriever.chunk_keys(done)[:, 0])
        return gen, tau - length % tau

    def step(self, params, gen: GenState, tokens):
        """Feed one token per row -> (state, next-token logits); spills (and refreshes) first
        when due. `gen` is consumed (its buffers are donated)."""
        gen, _ = self.room(gen)
        return decode(self.module, self.mcfg, params, gen, jnp.asarray(tokens, jnp.int32))

    def _decode(self, params, gen, tokens, done, key, max_new_tokens: int, sampling: Sampling,
                stops, pad) -> Iterator[np.ndarray]:
        """`TokenStream._decode` (the same tokens and logits) with the steps between two spills
        or refreshes fused into `decode_run` calls of at most `run_steps` tokens: one host
        round trip per call instead of per token; each call's tokens yielded when it ends.
        `run_steps` 0: `TokenStream._decode` itself."""
        if not self.run_steps:
            yield from super()._decode(params, gen, tokens, done, key, max_new_tokens, sampling,
                                       stops, pad)
            return
        index = 1   # the step whose tokens are chosen next
        while index < max_new_tokens:
            gen, free = self.room(gen)
            gen, tokens, _, done, chosen, taken = decode_run(
                self.module, self.mcfg, sampling, self.run_steps, params, gen, tokens, key,
                index, min(free, self.run_steps, max_new_tokens - index), done, stops, pad)
            chosen, taken, finished = jax.device_get((chosen, taken, done.all()))
            yield from chosen[:taken]
            index += int(taken)
            if finished:
                return
