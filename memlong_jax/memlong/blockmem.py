"""Block memory: a training-free long memory for any LLaMA (InfLLM-style), in every layer.

Each layer keeps, per batch row:

* the first `sink_tokens` tokens for good (attention sinks);
* the last `window` tokens, attended at their true relative positions;
* every `block_size`-token block that leaves the window, in a bounded `memory.Memory` with one
  row per (batch row, KV group) and MemLong's eviction policies. A block's retrieval key is the
  mean of its `representatives` pre-RoPE keys that received the most attention from the block's
  own queries (causal softmax inside the block, summed over its queries and the group's heads).

Tokens are processed in chunks of `chunk` tokens. When a chunk is complete (`commit`), its
queries, summed over the chunk and over the heads of each KV group, score every stored block
(the sum of q . representative over those queries and heads) and the `top_k` blocks of each
group (exact top-k, `retrieval.retrieve`) become, with the sinks, the memory tile of the *next*
chunk: the choice never depends on the tokens it serves, so nothing leaks. With `previous` (the
default) the budget goes to the top_k // 2 best blocks and the block before each: a line that a
block boundary cuts (a pass key's "The pass key is 680|38") is then read whole; without it
SmolLM2 read the half holding "68038 is the pass key" and answered "the pass key". Each layer attends in
one softmax over [sinks ; retrieved blocks ; window ; chunk so far] (`grouped_attention`
with a mask per KV group).

Positions: in a chunk's frame the window occupies 1..window and the chunk window+1..; with
`placement=fixed` the sinks and retrieved blocks are keys at position 0 (MemLong's convention),
so every distance stays within window + chunk, inside the trained range. `placement=true` puts
them at their true positions instead; with every block retrieved this is exactly full causal
attention, which is how the machinery is tested.

The state is a pytree of fixed shapes; `extend` feeds 1..chunk tokens of the pending chunk
(decoding feeds one), `commit` closes a full chunk, `score_chunks` scans whole chunks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from memlong_jax.llama.attention import grouped_attention
from memlong_jax.llama.config import DTYPES, LlamaConfig
from memlong_jax.llama.layers import apply_rope, rope_cos_sin
from memlong_jax.llama.model import DecoderLayer, LlamaForCausalLM
from memlong_jax.memlong import memory as mem_ops
from memlong_jax.memlong.retrieval import BACKENDS, retrieve
from memlong_jax.memlong.scan import token_nll
from memlong_jax.settings import Config, ConfigError, check, setting

PLACEMENTS = ("fixed", "true")


@dataclasses.dataclass(frozen=True)
class BlockConfig(Config):
    """Help text, allowed values and least values are in each field's metadata."""

    block_size: int = setting(128, help="tokens per memory block (InfLLM: 128)", least=1)
    sink_tokens: int = setting(4, help="initial tokens every later token attends to", least=0)
    window: int = setting(2048, least=1, help="local window in tokens, at true relative "
                                               "positions (a multiple of block_size)")
    chunk: int = setting(128, least=1, help="tokens that share one block selection (a multiple "
                                             "of block_size, <= window)")
    top_k: int = setting(8, help="blocks retrieved per layer, KV group and chunk", least=1)
    representatives: int = setting(4, help="keys averaged into a block's retrieval key",
                                   least=1)
    memory_tokens: int = setting(32768, least=1, help="memory capacity per layer in tokens (a "
                                                       "multiple of block_size)")
    mem_dtype: str = setting(
        "float32", choices=DTYPES,
        help="storage dtype of the memory K/V (bfloat16 halves the memory and rounds the "
             "stored K/V; held as its bits, so writes stay in place on XLA's CPU backend)")
    eviction: str = setting("paper", choices=mem_ops.POLICIES,
                            help="MemLong's policies: paper (hit counts) or fifo_half")
    backend: str = setting("device", choices=BACKENDS,
                           help="top-k search: device (exact, in-graph), faiss, faiss-hnsw")
    placement: str = setting("fixed", choices=PLACEMENTS,
                             help="fixed (retrieved keys and sinks at one position) or true "
                                  "(their own)")
    previous: bool = setting(
        True, help="each of top_k // 2 retrieved blocks brings the block before it, so a line "
                   "cut by a block boundary is read whole (passkey: the key line)")

    @property
    def capacity_blocks(self) -> int:
        return self.memory_tokens // self.block_size

    @property
    def tile_slots(self) -> int:
        return self.sink_tokens + self.top_k * self.block_size

    def validate(self, model: LlamaConfig) -> "BlockConfig":
        """Raise `ConfigError` naming the first bad setting; return self when all is well."""
        check(self, "block ")
        for name in ("window", "chunk", "memory_tokens"):
            if getattr(self, name) % self.block_size:
                raise ConfigError(f"block {name} ({getattr(self, name)}) must be a multiple of "
                                  f"block_size ({self.block_size})")
        rules = [
            (self.chunk <= self.window, f"block chunk ({self.chunk}) must not exceed the window "
                                        f"({self.window})"),
            (self.sink_tokens <= self.chunk, f"block sink_tokens ({self.sink_tokens}) must not "
                                             f"exceed the chunk ({self.chunk})"),
            (self.representatives <= self.block_size,
             f"block representatives ({self.representatives}) must not exceed block_size "
             f"({self.block_size})"),
            (self.top_k <= self.capacity_blocks,
             f"block memory_tokens ({self.memory_tokens}) must hold at least top_k "
             f"({self.top_k}) blocks"),
            (not self.previous or self.top_k >= 2,
             f"block top_k ({self.top_k}) must be at least 2 with previous blocks"),
            (self.eviction != "paper" or self.capacity_blocks >= 2,
             "block memory must hold at least 2 blocks for the 'paper' eviction policy"),
            (self.placement != "fixed" or self.window + self.chunk < model.max_position_embeddings,
             f"block window + chunk ({self.window + self.chunk}) must stay below the model's "
             f"trained range ({model.max_position_embeddings} positions)"),
        ]
        for ok, message in rules:
            if not ok:
                raise ConfigError(message)
        return self


class Tile(NamedTuple):
    """What a chunk reads besides its window: sinks then retrieved blocks, keys as placed.
    keys/values `[B, tile_slots, KV, D]`, valid `[B, KV, tile_slots]` (each KV group has its
    own blocks)."""

    keys: jax.Array
    values: jax.Array
    valid: jax.Array


class LayerBlocks(NamedTuple):
    """One layer's block memory state (K/V pre-RoPE)."""

    sink_k: jax.Array     # [B, sink_tokens, KV, D]
    sink_v: jax.Array
    win_k: jax.Array      # [B, window, KV, D]; slot j holds token start - window + j
    win_v: jax.Array
    win_rep: jax.Array    # [B, window / block_size, KV, D] fp32 retrieval keys of window blocks
    pend_q: jax.Array     # [B, chunk, H, D] the pending chunk, slots < fill real
    pend_k: jax.Array     # [B, chunk, KV, D]
    pend_v: jax.Array
    memory: mem_ops.Memory  # bookkeeping of the blocks: rows b * KV + g; emb = retrieval keys
    tile: Tile


class BlockState(NamedTuple):
    """`layers` (small) walks through the layer scan. The blocks' K/V stay outside it: written
    and gathered once per chunk for all layers, in place, so a chunk never copies the memory.
    The `memory.Memory` in each layer does the bookkeeping (eviction, hits, retrieval keys);
    its own K/V are one-element placeholders."""

    layers: LayerBlocks   # every field stacked over layers on a leading axis
    keys: jax.Array       # [L, B * KV, capacity, block_size, D] pre-RoPE K of stored blocks,
    values: jax.Array     # in mem_dtype as `mem_ops.float_bits` holds it (bf16 as uint16)
    start: jax.Array      # int32: position of the pending chunk's first token
    fill: jax.Array       # int32: tokens of the pending chunk fed so far


class Writes(NamedTuple):
    """One layer's blocks leaving the window at a commit: slot per memory row (capacity where
    nothing is written) and their K/V `[rows, n, block_size, D]`."""

    slots: jax.Array
    keys: jax.Array
    values: jax.Array


class Picks(NamedTuple):
    """One layer's selected blocks per memory row `[rows, top_k]`."""

    indices: jax.Array
    found: jax.Array
    block_start: jax.Array  # true position of each block's first token


def init_state(module: LlamaForCausalLM, bcfg: BlockConfig, batch: int) -> BlockState:
    """Nothing seen yet, for `batch` rows."""
    cfg = module.config
    kv, dim = cfg.num_key_value_heads, cfg.head_dim
    zeros = lambda n, heads=kv, dtype=module.dtype: jnp.zeros((batch, n, heads, dim), dtype)
    memory = mem_ops.init_memory(batch * kv, bcfg.capacity_blocks, 1, 1, 1, dim, jnp.float32)
    tile = Tile(zeros(bcfg.tile_slots), zeros(bcfg.tile_slots),
                    jnp.zeros((batch, kv, bcfg.tile_slots), bool))
    layer = LayerBlocks(zeros(bcfg.sink_tokens), zeros(bcfg.sink_tokens), zeros(bcfg.window),
                        zeros(bcfg.window),
                        zeros(bcfg.window // bcfg.block_size, dtype=jnp.float32),
                        zeros(bcfg.chunk, cfg.num_attention_heads), zeros(bcfg.chunk),
                        zeros(bcfg.chunk), memory, tile)
    layers = cfg.num_hidden_layers
    stacked = jax.tree_util.tree_map(lambda x: jnp.zeros((layers, *x.shape), x.dtype), layer)
    blocks = lambda: jnp.zeros((layers, batch * kv, bcfg.capacity_blocks, bcfg.block_size,
                                dim), mem_ops.bits_dtype(bcfg.mem_dtype))   # two: both donated
    return BlockState(stacked, blocks(), blocks(), jnp.zeros((), jnp.int32),
                      jnp.zeros((), jnp.int32))


def stacked_layer_params(params):
    """The decoder layers' parameters stacked on a leading axis, for a `lax.scan` over layers
    (one compiled layer however deep the model)."""
    model = params["model"]
    count = sum(name.startswith("layers_") for name in model)
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs),
                                  *[model[f"layers_{i}"] for i in range(count)])


def _rope(cfg: LlamaConfig, positions):
    """cos/sin `[1, T, D]` for integer positions `[T]`."""
    return rope_cos_sin(positions[None], cfg.head_dim, cfg.rope_theta)


def local_mask(bcfg: BlockConfig, start, fill, new: int):
    """`[1, new, window + chunk]`: the window and pending slots each new token sees. Window
    tokens before position `sink_tokens` are hidden: they are the sinks, seen through the tile
    (during the first chunk they are still pending and seen there)."""
    slot = jnp.arange(bcfg.window + bcfg.chunk)
    query_slot = bcfg.window + fill + jnp.arange(new)
    usable = (slot >= bcfg.window) | (start - bcfg.window + slot >= bcfg.sink_tokens)
    return ((slot[None] <= query_slot[:, None]) & usable[None])[None]


def _attend(layer: LayerBlocks, fill, q_rope, k_rope, mask, q, k, v):
    """One layer's attention for new tokens (pre-RoPE q/k/v), which join the pending chunk."""
    put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), fill, 1)
    layer = layer._replace(pend_q=put(layer.pend_q, q), pend_k=put(layer.pend_k, k),
                           pend_v=put(layer.pend_v, v))
    tile = layer.tile
    keys = apply_rope(jnp.concatenate([layer.win_k, layer.pend_k], axis=1), *k_rope)
    keys = jnp.concatenate([tile.keys.astype(keys.dtype), keys], axis=1)
    values = jnp.concatenate([tile.values, layer.win_v, layer.pend_v], axis=1)
    batch, kv, slots = tile.valid.shape
    shape = (batch, kv, 1, q.shape[1])
    joint = jnp.concatenate([jnp.broadcast_to(tile.valid[:, :, None, None], (*shape, slots)),
                             jnp.broadcast_to(mask[:, None, None], (*shape, mask.shape[-1]))],
                            axis=-1)   # [B, KV, 1, T, tile + local]: per KV group
    return grouped_attention(apply_rope(q, *q_rope), keys, values, joint), layer


def _forward(module: LlamaForCausalLM, bcfg: BlockConfig, params, layer_params,
             state: BlockState, ids, close: bool):
    """The layer stack over new tokens `ids` `[B, T]` of the pending chunk; with `close` each
    layer also commits the (then full) chunk right after its attention. `layer_params`:
    `stacked_layer_params(params)`. -> (state, last layer's hidden states); a closed chunk's
    state still has the old `start` and `fill`."""
    cfg = module.config
    apply = functools.partial(module.apply, {"params": params})
    decoder = DecoderLayer(cfg, module.dtype, module.param_dtype)
    new = ids.shape[1]
    q_rope = _rope(cfg, bcfg.window + 1 + state.fill + jnp.arange(new))
    k_rope = _rope(cfg, jnp.arange(1, bcfg.window + bcfg.chunk + 1))
    mask = local_mask(bcfg, state.start, state.fill, new)

    def body(h, xs):
        p, layer = xs
        attend = functools.partial(_attend, layer, state.fill, q_rope, k_rope, mask)
        h, layer = decoder.apply({"params": p}, h, attend, method=DecoderLayer.with_attention)
        return h, (_commit_layer(cfg, bcfg, layer, state.start) if close else (layer, None, None))

    h, (layers, writes, picks) = jax.lax.scan(body, apply(ids, method=module.embed),
                                              (layer_params, state.layers))
    state = state._replace(layers=layers)
    return (_finish(cfg, bcfg, state, writes, picks, state.start + bcfg.chunk) if close
            else state), h


def extend(module: LlamaForCausalLM, bcfg: BlockConfig, params, state: BlockState, ids):
    """Feed `ids` `[B, T]` (T <= chunk - fill) into the pending chunk -> (state, logits
    `[B, T, V]`). Does not commit: call `commit` once the chunk is full."""
    state, h = _forward(module, bcfg, params, stacked_layer_params(params), state, ids,
                        close=False)
    logits = module.apply({"params": params}, h, method=module.final)
    return state._replace(fill=state.fill + ids.shape[1]), logits


def block_representatives(q, k, block_size: int, count: int, theta: float):
    """Retrieval keys `[B, C / block_size, KV, D]` (fp32) of the blocks of a chunk: the mean of
    the `count` pre-RoPE keys of each block that received the most attention from the block's
    own queries (causal softmax inside the block, summed over its queries and the KV group's
    heads). q `[B, C, H, D]`, k `[B, C, KV, D]`, both pre-RoPE."""
    batch, length, heads, dim = q.shape
    kv = k.shape[2]
    n = length // block_size
    blocks = lambda x: x.astype(jnp.float32).reshape(batch * n, block_size, *x.shape[2:])
    q, k = blocks(q), blocks(k)
    cos, sin = rope_cos_sin(jnp.arange(block_size)[None], dim, theta)
    q_rot = apply_rope(q, cos, sin).reshape(batch * n, block_size, kv, heads // kv, dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q_rot, apply_rope(k, cos, sin)) * dim ** -0.5
    causal = jnp.tril(jnp.ones((block_size, block_size), bool))
    received = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1).sum(axis=(2, 3))
    _, top = jax.lax.top_k(received, count)                         # [B*n, KV, count]
    picked = jnp.take_along_axis(jnp.moveaxis(k, 1, 2), top[..., None], axis=2)
    return picked.mean(axis=2).reshape(batch, n, kv, dim)


def selection_query(q, cos, sin, kv: int):
    """`[B, KV, D]` fp32: queries `[B, T, H, D]` (pre-RoPE) rotated to their positions and
    summed over the T tokens and the heads of each KV group; its inner product with a block's
    retrieval key is the block's score summed over those queries and heads."""
    batch, length, heads, dim = q.shape
    rotated = apply_rope(q.astype(jnp.float32), cos, sin)
    return rotated.reshape(batch, length, kv, heads // kv, dim).sum(axis=(1, 3))


def with_previous(memory: mem_ops.Memory, indices, found):
    """Picks `[rows, k]` -> `[rows, 2k]`: the block written just before each pick (found when
    memory still holds it), then the picks; a slot already taken earlier in the row is not
    found again, so no block is read twice."""
    rows = jnp.arange(indices.shape[0])[:, None]
    time = memory.insert_time[rows, indices]
    match = memory.valid[:, None] & (memory.insert_time[:, None] == time[..., None] - 1)
    before = found & match.any(-1)
    indices = jnp.concatenate([jnp.where(before, jnp.argmax(match, -1), 0), indices], axis=1)
    found = jnp.concatenate([before, found], axis=1)
    k = indices.shape[1]
    earlier = jnp.tril(jnp.ones((k, k), bool), -1)
    repeat = ((indices[:, :, None] == indices[:, None, :]) & found[:, None, :] & earlier).any(-1)
    found = found & ~repeat
    return jnp.where(found, indices, 0).astype(jnp.int32), found


def select_blocks(bcfg: BlockConfig, memory: mem_ops.Memory, query):
    """Top-k blocks per memory row for `query` `[rows, D]` (with `previous`: the top k // 2 and
    the block before each); hits counted. Returns (memory, indices `[rows, k]`, found
    `[rows, k]`)."""
    picks = bcfg.top_k // 2 if bcfg.previous else bcfg.top_k
    indices, found = retrieve(bcfg.backend, memory.emb, memory.valid, query, picks)
    if bcfg.previous:
        indices, found = with_previous(memory, indices, found)
        if bcfg.top_k % 2:   # an odd budget: one slot stays empty
            indices = jnp.pad(indices, ((0, 0), (0, 1)))
            found = jnp.pad(found, ((0, 0), (0, 1)))
    return mem_ops.count_hits(memory, indices, found), indices, found


def _pick(bcfg: BlockConfig, layer: LayerBlocks, query):
    """Select blocks with `query` `[B, KV, D]` (hits counted) -> (layer, Picks)."""
    batch, _, kv, dim = layer.win_k.shape
    memory, indices, found = select_blocks(bcfg, layer.memory, query.reshape(batch * kv, dim))
    rows = jnp.arange(batch * kv)[:, None]
    picks = Picks(indices, found, memory.insert_time[rows, indices] * bcfg.block_size)
    return layer._replace(memory=memory), picks


def _tile(cfg: LlamaConfig, bcfg: BlockConfig, start, sink_k, sink_v, keys, values,
          picks: Picks):
    """One layer's memory tile for the chunk starting at `start`: sinks, then the picked blocks
    (keys/values `[rows, top_k, block_size, D]`), their sink tokens hidden, placed as set."""
    batch, _, kv, dim = sink_k.shape
    position = (picks.block_start[..., None] + jnp.arange(bcfg.block_size)).reshape(
        batch * kv, -1)
    valid = jnp.repeat(picks.found, bcfg.block_size, axis=1) & (position >= bcfg.sink_tokens)
    keys = keys.reshape(batch * kv, -1, 1, dim)
    if bcfg.placement == "true":
        offset = start - bcfg.window - 1  # frame position = true position - offset
        keys = apply_rope(keys.astype(jnp.float32),
                          *rope_cos_sin(position - offset, dim, cfg.rope_theta))
        sink_k = apply_rope(sink_k, *_rope(cfg, jnp.arange(bcfg.sink_tokens) - offset))
    per_group = lambda x: jnp.moveaxis(x.reshape(batch, kv, -1, dim), 1, 2).astype(sink_k.dtype)
    return Tile(jnp.concatenate([sink_k, per_group(keys)], axis=1),
                    jnp.concatenate([sink_v, per_group(values)], axis=1),
                    jnp.concatenate([jnp.broadcast_to(start > 0, (batch, kv, bcfg.sink_tokens)),
                                     valid.reshape(batch, kv, -1)], axis=-1))


def _layer_row_index(stored):
    """Index arrays `[L, 1, 1]` and `[1, rows, 1]` that pair each (layer, row) of `stored`
    with its own slots `[L, rows, n]`."""
    return (jnp.arange(stored.shape[0])[:, None, None],
            jnp.arange(stored.shape[1])[None, :, None])


def store_blocks(stored, slots, blocks, mem_dtype: str):
    """`stored` (`BlockState.keys` or `.values`) with `blocks` `[L, rows, n, block_size, D]`
    written, cast to `mem_dtype`, at `slots` `[L, rows, n]` (slots past the capacity are not
    written). The scatter runs on the bits (`mem_ops.float_bits`), in place."""
    layer_ix, row_ix = _layer_row_index(stored)
    return stored.at[layer_ix, row_ix, slots].set(
        mem_ops.float_bits(blocks.astype(mem_dtype)), mode="drop")


def load_blocks(stored, indices, mem_dtype: str):
    """The blocks at `indices` `[L, rows, k]` of `stored`, in `mem_dtype`:
    `[L, rows, k, block_size, D]`."""
    layer_ix, row_ix = _layer_row_index(stored)
    return jax.lax.bitcast_convert_type(stored[layer_ix, row_ix, indices], jnp.dtype(mem_dtype))


def _finish(cfg: LlamaConfig, bcfg: BlockConfig, state: BlockState, writes, picks, start):
    """All layers at once: the leaving blocks' K/V into their slots (in place), the picked
    blocks gathered into each layer's tile for the chunk starting at `start`."""
    keys, values = state.keys, state.values
    if writes is not None:
        keys = store_blocks(keys, writes.slots, writes.keys, bcfg.mem_dtype)
        values = store_blocks(values, writes.slots, writes.values, bcfg.mem_dtype)
    take = lambda big: load_blocks(big, picks.indices, bcfg.mem_dtype)
    tile = jax.vmap(functools.partial(_tile, cfg, bcfg, start))(
        state.layers.sink_k, state.layers.sink_v, take(keys), take(values), picks)
    return state._replace(layers=state.layers._replace(tile=tile), keys=keys, values=values)


def _commit_layer(cfg: LlamaConfig, bcfg: BlockConfig, layer: LayerBlocks, start):
    """Close the full pending chunk of one layer (it began at `start`): sinks taken from the
    first chunk, the oldest chunk of the window leaves for memory, the window shifts, and the
    next chunk's blocks are picked with this chunk's queries. -> (layer, Writes, Picks); the
    K/V are moved by `_finish`."""
    batch, _, kv, dim = layer.win_k.shape
    size, chunk, window = bcfg.block_size, bcfg.chunk, bcfg.window
    leaving = chunk // size
    reps = block_representatives(layer.pend_q, layer.pend_k, size, bcfg.representatives,
                                 cfg.rope_theta)
    first = start == 0
    sinks = lambda old, pending: jnp.where(first, pending[:, :bcfg.sink_tokens], old)
    rows = lambda x: jnp.moveaxis(x.reshape(batch, leaving, size, kv, dim), 3, 1).reshape(
        batch * kv, leaving, size, dim)
    real = jnp.broadcast_to(start - window + jnp.arange(leaving) * size >= 0,
                            (batch * kv, leaving))   # blocks before token 0 are empty
    clock = layer.memory.clock
    placeholder = jnp.zeros((batch * kv, leaving, 1, 1, 1))
    memory = mem_ops.write_chunks(
        layer.memory, placeholder, placeholder,
        jnp.moveaxis(layer.win_rep[:, :leaving], 2, 1).reshape(batch * kv, leaving, dim),
        bcfg.eviction, real)
    # Where each block went: the slot holding its write time (none if evicted meanwhile).
    stamp = clock[:, None] + jnp.cumsum(real, axis=1) - 1
    held = memory.valid[:, None] & (memory.insert_time[:, None] == stamp[..., None])
    slots = jnp.where(real & held.any(-1), jnp.argmax(held, -1), bcfg.capacity_blocks)
    writes = Writes(slots, rows(layer.win_k[:, :chunk]), rows(layer.win_v[:, :chunk]))
    shift = lambda old, new: jnp.concatenate([old[:, new.shape[1]:], new.astype(old.dtype)], 1)
    layer = layer._replace(sink_k=sinks(layer.sink_k, layer.pend_k),
                           sink_v=sinks(layer.sink_v, layer.pend_v),
                           win_k=shift(layer.win_k, layer.pend_k),
                           win_v=shift(layer.win_v, layer.pend_v),
                           win_rep=shift(layer.win_rep, reps), memory=memory)
    query = selection_query(layer.pend_q, *_rope(cfg, window + 1 + jnp.arange(chunk)), kv)
    layer, picks = _pick(bcfg, layer, query)
    return layer, writes, picks


def commit(module: LlamaForCausalLM, bcfg: BlockConfig, state: BlockState) -> BlockState:
    """Close a full pending chunk (fill == chunk) in every layer; the next chunk starts."""
    cfg = module.config
    layers, writes, picks = jax.lax.scan(
        lambda _, layer: (None, _commit_layer(cfg, bcfg, layer, state.start)), None,
        state.layers)[1]
    state = _finish(cfg, bcfg, state._replace(layers=layers), writes, picks,
                    state.start + bcfg.chunk)
    return state._replace(start=state.start + bcfg.chunk, fill=jnp.zeros_like(state.fill))


def reselect(module: LlamaForCausalLM, bcfg: BlockConfig, state: BlockState) -> BlockState:
    """Select the pending chunk's blocks again with its own queries so far (fill > 0), e.g. a
    prompt's last partial chunk before decoding: later tokens then read the blocks their
    prompt asked for. Uses only tokens already fed, so decoding stays causal."""
    cfg = module.config
    seen = (jnp.arange(bcfg.chunk) < state.fill)[None, :, None, None]
    rope = _rope(cfg, bcfg.window + 1 + jnp.arange(bcfg.chunk))
    query = lambda layer: selection_query(jnp.where(seen, layer.pend_q, 0), *rope,
                                          cfg.num_key_value_heads)
    layers, picks = jax.lax.scan(lambda _, layer: (None, _pick(bcfg, layer, query(layer))),
                                 None, state.layers)[1]
    return _finish(cfg, bcfg, state._replace(layers=layers), None, picks, state.start)


def score_chunks(module: LlamaForCausalLM, bcfg: BlockConfig, params, state: BlockState, ids,
                 targets=None):
    """Feed whole chunks `ids` `[B, n * chunk]` (no chunk pending in `state`), each extended
    then committed, in one `lax.scan`. Returns (state, nll `[B, n * chunk]`), nll[t] =
    -log p(targets[t] | ids up to t); with `targets=None` the head never runs (a prompt or a
    prefix) and nll is None."""
    batch, length = ids.shape
    by_chunk = lambda a: jnp.moveaxis(a.reshape(batch, length // bcfg.chunk, bcfg.chunk), 1, 0)
    layer_params = stacked_layer_params(params)

    def step(state, xs):
        chunk_ids, chunk_targets = xs
        state, h = _forward(module, bcfg, params, layer_params, state, chunk_ids, close=True)
        state = state._replace(start=state.start + bcfg.chunk)
        if chunk_targets is None:
            return state, None
        logits = module.apply({"params": params}, h, method=module.final)
        return state, token_nll(logits, chunk_targets)

    state, nll = jax.lax.scan(step, state, (by_chunk(ids),
                                            None if targets is None else by_chunk(targets)))
    return state, None if nll is None else jnp.moveaxis(nll, 0, 1).reshape(batch, length)
