"""Grouped-query self-attention with an explicit boolean mask, softmax in fp32, and MemLong's
retrieval-causal variant: one joint softmax over [retrieved memory keys ; local causal keys].
Long causal sequences (with or without memory) use exact blockwise (online-softmax) attention
instead, so no `[T, T]` mask or score matrix is ever materialised; or, by choice
(`LlamaConfig.attention_kernel`), one fused call (`fused.py`)."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from memlong_jax.llama.fused import checked_implementation, fused_causal_attention
from memlong_jax.llama.layers import apply_rope, dense

# Causal attention over at least `min_length` tokens goes blockwise, in tiles of `block` queries
# x keys; shorter sequences keep the dense path (and its exact numbers). backend -> (min_length,
# block), chosen from bench/attention.py and bench/gpu.py (docs/benchmarks.md): on a CPU the
# dense fp32 [T, S] scores fall out of cache from about 1024 tokens; a GPU stays dense longer.
BLOCKWISE = {"cpu": (1024, 256)}
BLOCKWISE_DEFAULT = (4096, 2048)


def blockwise_plan(min_length: int = 0, block: int = 0) -> tuple[int, int]:
    """(min_length, block): the given ones (`LlamaConfig.blockwise_*`), where 0 the defaults
    of the backend this trace runs on."""
    default = BLOCKWISE.get(jax.default_backend(), BLOCKWISE_DEFAULT)
    return min_length or default[0], block or default[1]


def causal_kernel(kernel: str, length: int, min_length: int) -> str:
    """'dense', 'blockwise' or 'fused' for causal attention over `length` tokens: `kernel`
    itself, or for 'auto' dense below `min_length` and blockwise from it. ('auto' stays off
    the fused kernel until it is measured on a GPU: bench/gpu.py has the rows.)"""
    if kernel != "auto":
        return kernel
    return "blockwise" if length >= min_length else "dense"


class MemoryKV(NamedTuple):
    """Retrieved memory for one attention call: pre-RoPE keys (= RoPE position 0), values and
    which slots hold a real token. keys/values `[B, M, KV, D]`, valid `[B, M]` bool: every query
    sees the same memory. Per query chunk (`query_mode=chunk`): keys/values `[B, n, M, KV, D]`,
    valid `[B, n, M]`, where the local keys split into n equal chunks and the queries at slots
    of chunk j see only memory row j."""

    keys: jax.Array
    values: jax.Array
    valid: jax.Array
    positions: jax.Array | None = None  # like `valid`: RoPE positions of the keys (None: 0)

    @property
    def per_chunk(self) -> bool:
        return self.valid.ndim == 3


def flat_memory(memory: MemoryKV, query_slots, n_keys: int):
    """Memory as one key list for queries at local slots `query_slots` `[T]` of `n_keys` local
    keys: keys/values `[B, M', KV, D]` and the visibility mask `[B, T, M']`."""
    batch = memory.valid.shape[0]
    if not memory.per_chunk:
        return memory.keys, memory.values, jnp.broadcast_to(
            memory.valid[:, None, :], (batch, query_slots.shape[0], memory.valid.shape[1]))
    n, slots = memory.valid.shape[1:]
    if n_keys % n:
        raise ValueError(f"{n_keys} local keys do not split into {n} query chunks")
    owner = query_slots // (n_keys // n)                          # [T] chunk of each query
    mine = owner[:, None, None] == jnp.arange(n)[None, :, None]   # [T, n, 1]
    mask = (mine[None] & memory.valid[:, None]).reshape(batch, -1, n * slots)
    flat = lambda a: a.reshape(batch, n * slots, *a.shape[3:])
    return flat(memory.keys), flat(memory.values), mask


def causal_mask(q_len: int, k_len: int):
    """`[1, q_len, k_len]` bool; queries are the last `q_len` of `k_len` keys (bottom-right)."""
    q_idx = jnp.arange(q_len)[:, None] + (k_len - q_len)
    return (jnp.arange(k_len)[None, :] <= q_idx)[None]


def grouped_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d) masked) v with GQA, without repeating K/V per query head.

    q: `[B, T, H, D]`; k, v: `[B, S, KV, D]` with H a multiple of KV; mask: bool broadcastable
    to `[B, T, S]`, or `[B, KV, 1, T, S]` (a mask per KV group). Scores and softmax are fp32
    whatever the compute dtype.

    Layout and order are chosen for speed (bench/attention.py): heads-major
    operands make both products plain batched matmuls; the 1/sqrt(d) scale is folded into the
    exponent and the normalisation applied to the `[T, D]` output, so only two elementwise
    passes touch the `[T, S]` scores.
    """
    q = heads_major(q, k.shape[2])
    scores = jnp.einsum("bkgtd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    mask = mask[:, None, None] if mask.ndim == 3 else mask  # else per KV group [B, KV, 1, T, S]
    probs, total = softmax_parts(scores, mask, q.shape[-1])
    out = jnp.einsum("bkgts,bskd->bkgtd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32) / total
    return token_major(out).astype(v.dtype)


def heads_major(q, kv_heads: int):
    """`[B, T, H, D]` -> `[B, KV, G, T, D]` (G = H / KV query heads per KV head)."""
    batch, q_len, heads, head_dim = q.shape
    return jnp.moveaxis(q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim), 1, 3)


def token_major(out):
    """`[B, KV, G, T, D]` -> `[B, T, H, D]`, the inverse of `heads_major`."""
    batch, kv_heads, group, q_len, head_dim = out.shape
    return jnp.moveaxis(out, 3, 1).reshape(batch, q_len, kv_heads * group, head_dim)


def softmax_parts(scores, mask, head_dim: int):
    """Unnormalised fp32 softmax weights of raw `scores` q.k under `mask` (the 1/sqrt(d) scale
    folded into the exponent) and their sum over the keys: the output is (weights @ v) / sum."""
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    peak = jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True))
    probs = jnp.exp((scores - peak) * (head_dim ** -0.5))
    return probs, probs.sum(axis=-1, keepdims=True)


class KVCache(NamedTuple):
    """One layer's local KV cache of W slots (`Attention.extend`); slot j has RoPE position j+1.

    Keys are kept twice: pre-RoPE in token order (what memory stores, and what a shift rotates
    again from, so kept keys carry no rounding from repeated rotations), and rotated at their
    slot's position, laid out `[B*KV, D, W]` so that the score product reads them in place;
    values `[B*KV, W, D]` for the same reason. With `[B, W, KV, D]` operands, or keys rotated
    afresh each step, XLA:CPU copies the whole cache of every layer for each decoded token (most
    of a decode step's time); batch and heads share one axis because a unit axis (batch 1) makes
    it duplicate the cache write and copy the cache twice.
    """

    keys: jax.Array     # [B, W, KV, D] pre-RoPE
    rotated: jax.Array  # [B*KV, D, W] rotated at positions 1..W
    values: jax.Array   # [B*KV, W, D]

    @classmethod
    def empty(cls, batch: int, window: int, kv_heads: int, head_dim: int, dtype) -> "KVCache":
        zeros = lambda *shape: jnp.zeros(shape, dtype)
        return cls(zeros(batch, window, kv_heads, head_dim),
                   zeros(batch * kv_heads, head_dim, window),
                   zeros(batch * kv_heads, window, head_dim))

    def write(self, keys, values, slot, cos, sin) -> "KVCache":
        """Pre-RoPE keys and values `[B, T, KV, D]` into slots `slot..slot+T-1` (`slot` may be
        traced); cos/sin `[1, W, D]`: the RoPE tables of positions 1..W."""
        put = lambda buf, new, axis: jax.lax.dynamic_update_slice_in_dim(
            buf, new.astype(buf.dtype), slot, axis=axis)
        at = lambda table: jax.lax.dynamic_slice_in_dim(table, slot, keys.shape[1], axis=1)
        return KVCache(put(self.keys, keys, 1),
                       put(self.rotated, _heads_first(apply_rope(keys, at(cos), at(sin)), 2), 2),
                       put(self.values, _heads_first(values, 1), 1))

    def repeated(self, batch: int, window: int) -> "KVCache":
        """This one-row cache for `batch` rows in `window` slots (the added slots empty): a
        prefix shared by every row, to be extended by each row's own tokens."""
        grow = lambda a, axis: jnp.pad(a, [(0, window - a.shape[axis]) if i == axis else (0, 0)
                                           for i in range(a.ndim)])
        return KVCache(jnp.repeat(grow(self.keys, 1), batch, axis=0),
                       jnp.tile(grow(self.rotated, 2), (batch, 1, 1)),
                       jnp.tile(grow(self.values, 1), (batch, 1, 1)))

    def shift(self, n: int, cos, sin) -> "KVCache":
        """Drop the oldest `n` slots: the rest move to the front and are rotated again at their
        new positions (the stale tail lies beyond the caller's fill count)."""
        keys = jnp.roll(self.keys, -n, axis=1)
        return KVCache(keys, _heads_first(apply_rope(keys, cos, sin), 2),
                       jnp.roll(self.values, -n, axis=1))

    def token_values(self):
        """Values `[B, W, KV, D]`, token-major like `keys`."""
        batch, window, kv_heads, head_dim = self.keys.shape
        return jnp.moveaxis(self.values.reshape(batch, kv_heads, window, head_dim), 1, 2)


def _heads_first(a, token_axis: int):
    """`[B, T, KV, D]` -> `[B*KV, T, D]` (token_axis 1) or `[B*KV, D, T]` (token_axis 2)."""
    batch, tokens, kv_heads, head_dim = a.shape
    a = jnp.transpose(a, (0, 2, 1, 3) if token_axis == 1 else (0, 2, 3, 1))
    return a.reshape(batch * kv_heads, *a.shape[2:])


def cached_attention(q, cache: KVCache, mask, memory: MemoryKV | None = None, query_slots=None):
    """`grouped_attention` of rotated queries `q` `[B, T, H, D]` over a `KVCache` under `mask`
    (bool, broadcastable to `[B, T, W]`), with `memory` (queries at local slots `query_slots`
    `[T]`) in the same softmax, as `with_memory` prepends it."""
    batch, window, kv_heads, head_dim = cache.keys.shape
    q = heads_major(q, kv_heads)                     # [B, KV, G, T, D]
    flat = lambda a: a.reshape(batch * kv_heads, *a.shape[2:])
    scores = jnp.einsum("ngtd,nds->ngts", flat(q), cache.rotated.astype(q.dtype),
                        preferred_element_type=jnp.float32).reshape(*q.shape[:4], window)
    mask = jnp.broadcast_to(mask, (batch, q.shape[3], window))
    if memory is not None:
        mem_k, mem_v, mem_mask = flat_memory(memory, query_slots, window)
        scores = jnp.concatenate([jnp.einsum("bkgtd,bskd->bkgts", q, mem_k.astype(q.dtype),
                                             preferred_element_type=jnp.float32), scores], -1)
        mask = jnp.concatenate([mem_mask, mask], axis=-1)
    probs, total = softmax_parts(scores, mask[:, None, None], head_dim)
    dtype = cache.values.dtype
    out = jnp.einsum("ngts,nsd->ngtd", flat(probs[..., -window:]).astype(dtype), cache.values,
                     preferred_element_type=jnp.float32).reshape(*q.shape)
    if memory is not None:
        out = out + jnp.einsum("bkgts,bskd->bkgtd", probs[..., :-window].astype(dtype),
                               mem_v.astype(dtype), preferred_element_type=jnp.float32)
    return token_major(out / total).astype(dtype)


def blockwise_causal_attention(q, k, v, block_size: int, memory: MemoryKV | None = None):
    """Exact causal `grouped_attention` in `block_size` tiles with an online (running max/sum)
    fp32 softmax: memory is O(block_size^2) per head instead of O(T^2), and each score tile
    stays in cache (bench/attention.py measures it against the dense path).

    q: `[B, T, H, D]`; k, v: `[B, T, KV, D]` (GQA, K/V not repeated). T need not be a multiple
    of `block_size`: the sequence is zero-padded to one, and padded keys are never seen by real
    queries (they lie above the diagonal); padded query rows are dropped. Key blocks above the
    diagonal are skipped with `lax.cond`, so causal attention costs about half of full.
    `memory`: retrieved keys/values visible to every query (invalid slots masked), entering the
    same softmax first, as `with_memory` + `grouped_attention` would.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    block = min(block_size, length)
    n_blocks = -(-length // block)
    pad = [(0, 0), (0, n_blocks * block - length), (0, 0), (0, 0)]
    # [n_blocks, B, block, KV, (G,) D]: the leading axis is what the scans walk over.
    split = lambda x, *heads_shape: jnp.moveaxis(
        jnp.pad(x, pad).reshape(batch, n_blocks, block, *heads_shape, head_dim), 1, 0)
    q_blocks = split(q, kv_heads, heads // kv_heads)
    k_blocks, v_blocks = split(k, kv_heads), split(v, kv_heads)
    offsets = jnp.arange(block)
    neg = jnp.finfo(jnp.float32).min

    def attend(carry, q_blk, k_blk, v_blk, visible):
        """Fold one key tile into the running (max, sum, output); `visible` broadcasts to the
        `[B, KV, G, q, s]` scores."""
        m, l, acc = carry
        s = jnp.einsum("bqkgd,bskd->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32)
        s = jnp.where(visible, s * (head_dim ** -0.5), neg)
        # The result does not depend on the running max (it cancels), so its gradient is 0.
        m_new = jax.lax.stop_gradient(jnp.maximum(m, s.max(-1)))
        p = jnp.exp(s - m_new[..., None])
        scale = jnp.exp(m - m_new)
        pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), v_blk,
                        preferred_element_type=jnp.float32)
        return m_new, l * scale + p.sum(-1), acc * scale[..., None] + pv

    # The memory tile, made once: every query block starts its softmax with it (per query
    # chunk: each block gets the memory of the chunks it covers, see `memory_blocks`).
    memory_tile = None if memory is None or memory.per_chunk else (
        memory.keys.astype(k.dtype), memory.values.astype(v.dtype),
        memory.valid[:, None, None, None, :])
    tiles = None if memory is None or not memory.per_chunk else memory_blocks(
        memory, length, block, n_blocks, k.dtype)

    def query_block(_, xs):
        i, q_blk, tile = xs
        tile = memory_tile if tile is None else tile

        def key_block(carry, xs):
            j, k_blk, v_blk = xs
            visible = i * block + offsets[:, None] >= j * block + offsets[None, :]
            return jax.lax.cond(j <= i, lambda c: attend(c, q_blk, k_blk, v_blk, visible),
                                lambda c: c, carry), None

        stats = q_blk.shape[:1] + q_blk.shape[2:4] + (block,)  # [B, KV, G, block]
        init = (jnp.full(stats, neg), jnp.zeros(stats), jnp.zeros((*stats, head_dim)))
        if tile is not None:
            init = attend(init, q_blk, *tile)
        (_, l, acc), _ = jax.lax.scan(key_block, init, (jnp.arange(n_blocks), k_blocks, v_blocks))
        return None, jnp.einsum("bkgqd->bqkgd", acc / l[..., None])

    _, out = jax.lax.scan(query_block, None, (jnp.arange(n_blocks), q_blocks, tiles))
    out = jnp.moveaxis(out, 0, 1).reshape(batch, n_blocks * block, heads, head_dim)
    return out[:, :length].astype(v.dtype)


def memory_blocks(memory: MemoryKV, length: int, block: int, n_blocks: int, dtype):
    """Per-chunk memory regrouped by query block: keys/values `[n_blocks, B, c*M, KV, D]` (c
    query chunks per block) and visibility `[n_blocks, B, 1, 1, block, c*M]`."""
    batch, n, slots = memory.valid.shape
    tau = length // n
    if length % n or block % tau:
        raise ValueError(f"blockwise attention needs query chunks ({length} / {n}) that divide "
                         f"the block ({block})")
    per_block = block // tau
    pad = n_blocks * per_block - n
    grouped = lambda a: jnp.moveaxis(jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
                                     .reshape(batch, n_blocks, per_block * slots, *a.shape[3:]),
                                     1, 0)
    valid = jnp.moveaxis(jnp.pad(memory.valid, [(0, 0), (0, pad), (0, 0)])
                         .reshape(batch, n_blocks, per_block, slots), 1, 0)
    mine = (jnp.arange(block)[:, None] // tau) == jnp.arange(per_block)[None, :]  # [block, c]
    visible = (mine[None, None, :, :, None] & valid[:, :, None, :, :]).reshape(
        n_blocks, batch, block, per_block * slots)
    return (grouped(memory.keys).astype(dtype), grouped(memory.values).astype(dtype),
            visible[:, :, None, None])


def with_memory(k, v, mask, memory: MemoryKV, q_len: int | None = None, query_slots=None):
    """Prepend memory to the local keys: memory keys are not rotated (position 0) and visible to
    every query (or, per query chunk, to the queries of their chunk); invalid memory slots are
    masked. Returns keys, values, mask for one softmax. `q_len`: the number of queries, when it
    is not the number of local keys (a KV cache); `query_slots` `[q_len]`: the queries' local
    slots (default: the last q_len)."""
    batch = k.shape[0]
    q_len = k.shape[1] if q_len is None else q_len
    if query_slots is None:
        query_slots = jnp.arange(k.shape[1] - q_len, k.shape[1])
    mem_k, mem_v, mem_mask = flat_memory(memory, query_slots, k.shape[1])
    local_mask = jnp.broadcast_to(mask, (batch, q_len, k.shape[1]))
    return (jnp.concatenate([mem_k.astype(k.dtype), k], axis=1),
            jnp.concatenate([mem_v.astype(v.dtype), v], axis=1),
            jnp.concatenate([mem_mask, local_mask], axis=-1))


class Attention(nn.Module):
    """LLaMA self-attention: q/k/v/o projections (HF names), RoPE on q and k, GQA."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    blockwise: tuple[int, int] = (0, 0)   # (min_length, block); 0: `blockwise_plan`'s default
    kernel: str = "auto"       # causal kernel: `LlamaConfig.attention_kernel`
    head_multiple: int = 8     # `LlamaConfig.attention_head_multiple` (fused only)

    def setup(self):
        proj = lambda features: dense(features, None, self.dtype, self.param_dtype)
        self.q_proj = proj(self.num_heads * self.head_dim)
        self.k_proj = proj(self.num_kv_heads * self.head_dim)
        self.v_proj = proj(self.num_kv_heads * self.head_dim)
        self.o_proj = proj(self.hidden_size)

    def qkv(self, x):
        """Pre-RoPE queries `[B, T, H, D]`, keys and values `[B, T, KV, D]`."""
        q = self.q_proj(x).reshape(*x.shape[:2], self.num_heads, self.head_dim)
        return (q, *self.kv(x))

    def project_out(self, out):
        """The output projection of attention outputs `[B, T, H, D]`."""
        return self.o_proj(out.reshape(*out.shape[:2], self.num_heads * self.head_dim))

    def kv(self, x):
        """Pre-RoPE keys and values `[B, T, KV, D]`: what MemLong's memory layer stores."""
        shape = (*x.shape[:2], self.num_kv_heads, self.head_dim)
        return self.k_proj(x).reshape(shape), self.v_proj(x).reshape(shape)

    def __call__(self, x, cos, sin, mask=None, memory: MemoryKV | None = None):
        """Self-attention under `mask` (None: causal, by `causal_kernel`); with `memory`,
        MemLong's retrieval-causal attention."""
        length = x.shape[1]
        q, k, v = self.qkv(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        min_length, block = blockwise_plan(*self.blockwise)
        kernel = "dense" if mask is not None else causal_kernel(self.kernel, length, min_length)
        if kernel == "fused":
            impl = checked_implementation(self.head_dim, q.dtype, memory is not None,
                                          self.head_multiple)
            out = fused_causal_attention(q, k, v, memory, self.head_multiple, impl)
        elif kernel == "blockwise":
            out = blockwise_causal_attention(q, k, v, block, memory)
        else:
            if mask is None:
                mask = causal_mask(length, length)
            if memory is not None:
                k, v, mask = with_memory(k, v, mask, memory)
            out = grouped_attention(q, k, v, mask)
        return self.project_out(out)

    def extend(self, x, cache: KVCache, length, cos, sin, memory: MemoryKV | None = None):
        """Attention of T new tokens `x` `[B, T, hidden]` appended to a fixed-capacity local cache.

        Slots `0..length-1` of `cache` are real (`length` may be traced); the new tokens go to
        slots `length..length+T-1`. Slot j has local position j+1 and cos/sin `[1, W, D]` are
        the RoPE tables of positions 1..W, so the math is that of `__call__` on the same window.
        Returns (output `[B, T, hidden]`, updated cache).
        """
        new = x.shape[1]
        q, k, v = self.qkv(x)
        cache = cache.write(k, v, length, cos, sin)
        slots = length + jnp.arange(new)
        at_new = lambda table: jax.lax.dynamic_slice_in_dim(table, length, new, axis=1)
        mask = (jnp.arange(cache.keys.shape[1])[None, :] <= slots[:, None])[None]
        out = cached_attention(apply_rope(q, at_new(cos), at_new(sin)), cache, mask, memory,
                               slots)
        return self.project_out(out), cache
