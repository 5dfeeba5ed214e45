"""MemLong's external memory: a fixed-capacity pytree with one independent memory per batch row.

Every function here is pure and jittable (masks, sorts and scatters; no Python control flow on
traced values), so the memory can be a `jit` argument or a `lax.scan` carry. A row stores up to
`capacity` chunks of `tau` tokens: the memory layer's pre-RoPE K/V, the chunk's retrieval
embedding and the bookkeeping the eviction policies need.

Eviction policies (static strings), applied to a row that is full when a chunk arrives:

* `"paper"` (default; paper and README, upstream dead code): with n chunks ordered by insertion,
  the oldest `n * 10 // 100` always go, the newest from `n * 90 // 100` on always stay, and whole
  groups of equal hit count in the middle go in ascending count order until at least `n // 2`
  chunks are gone. Closed form: a middle chunk with count c goes iff
  `before + #(middle chunks with count < c) < n // 2`.
* `"fifo_half"` (upstream's live code): keep the newest `n // 2` chunks.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from flax import struct

from memlong_jax.llama.config import ConfigError

POLICIES = ("paper", "fifo_half")
LOWER, UPPER = 10, 90  # upstream `update_boundary`: percent always dropped / from which always kept
_INT_MAX = jnp.iinfo(jnp.int32).max


@struct.dataclass
class Memory:
    keys: jax.Array         # [B, C, tau, n_kv, head_dim] mem_dtype, pre-RoPE k_proj output
    values: jax.Array       # [B, C, tau, n_kv, head_dim] mem_dtype
    emb: jax.Array          # [B, C, d] float32 retrieval embedding of each chunk
    valid: jax.Array        # [B, C] bool
    insert_time: jax.Array  # [B, C] int32, write order (increasing per row)
    hits: jax.Array         # [B, C] int32, top-k selections since the chunk was written
    clock: jax.Array        # [B] int32, insert_time of the row's next write

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    @property
    def tau(self) -> int:
        return self.keys.shape[2]


def init_memory(batch: int, capacity: int, tau: int, n_kv: int, head_dim: int, emb_dim: int,
                mem_dtype) -> Memory:
    """An empty memory of `batch` rows, each with room for `capacity` chunks of `tau` tokens."""
    sizes = dict(batch=batch, capacity=capacity, tau=tau, n_kv=n_kv, head_dim=head_dim,
                 emb_dim=emb_dim)
    for name, value in sizes.items():
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"memory {name} must be a positive integer, got {value!r}")
    kv = jnp.zeros((batch, capacity, tau, n_kv, head_dim), mem_dtype)
    meta = jnp.zeros((batch, capacity), jnp.int32)
    return Memory(keys=kv, values=kv, emb=jnp.zeros((batch, capacity, emb_dim), jnp.float32),
                  valid=jnp.zeros((batch, capacity), bool), insert_time=meta, hits=meta,
                  clock=jnp.zeros((batch,), jnp.int32))


def reset_rows(mem: Memory, rows) -> Memory:
    """Empty the rows selected by `rows` (bool `[B]`); the others are untouched.

    Like eviction, this only clears `valid` (and the row's clock): the payload and counters of
    empty slots are never read, and clearing the K/V would cost a full pass over them.
    """
    rows = jnp.asarray(rows, bool)
    return mem.replace(valid=mem.valid & ~rows[:, None], clock=jnp.where(rows, 0, mem.clock))


def _check_policy(policy: str, capacity: int) -> None:
    if policy not in POLICIES:
        raise ConfigError(f"eviction policy must be one of {', '.join(POLICIES)}; got {policy!r}")
    if policy == "paper" and capacity < 2:
        raise ConfigError("memory capacity must be at least 2 chunks for the 'paper' eviction "
                          f"policy (it always keeps the newest chunk), got {capacity}")


def _drop_mask(mem: Memory, policy: str):
    """bool `[B, C]`: the chunks `policy` deletes from each row, as if every row were full."""
    n = mem.valid.sum(axis=1, keepdims=True)
    age = jnp.where(mem.valid, mem.insert_time, _INT_MAX)
    rank = jnp.argsort(jnp.argsort(age, axis=1), axis=1)  # 0 = oldest; empty slots rank >= n
    if policy == "fifo_half":
        return mem.valid & (rank < n - n // 2)
    before, upper = n * LOWER // 100, n * UPPER // 100
    middle = mem.valid & (rank >= before) & (rank < upper)
    counts = jnp.sort(jnp.where(middle, mem.hits, _INT_MAX), axis=1)
    fewer = jax.vmap(jnp.searchsorted)(counts, mem.hits)  # middle chunks with a smaller count
    return mem.valid & ((rank < before) | (middle & (before + fewer < n // 2)))


def _evict_rows(mem: Memory, policy: str, rows) -> Memory:
    return mem.replace(valid=mem.valid & ~(_drop_mask(mem, policy) & rows[:, None]))


def evict(mem: Memory, policy: str = "paper") -> Memory:
    """Apply the eviction `policy` to every full row; rows with a free slot are untouched.

    Survivors keep their slots, insertion times and hit counters.
    """
    _check_policy(policy, mem.capacity)
    return _evict_rows(mem, policy, mem.valid.all(axis=1))


def _check_shape(name: str, x, shape) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def bits_dtype(dtype):
    """What `float_bits` turns `dtype` into: uint16 for 16-bit floats, other dtypes as they are."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2:
        return jnp.dtype(jnp.uint16)
    return dtype


def float_bits(x):
    """A 16-bit float array as the same-width unsigned integers (other dtypes as they are).

    XLA:CPU computes a `dynamic_update_slice` (or a scatter) into a bf16/f16 buffer in float32:
    it converts the whole buffer up and back, a pass over all of memory for every chunk
    written. On the integer view of the same bits the update stays in place and costs one
    chunk."""
    bits = bits_dtype(x.dtype)
    return x if bits == x.dtype else jax.lax.bitcast_convert_type(x, bits)


def write_chunk(mem: Memory, keys, values, emb, policy: str = "paper", rows=None) -> Memory:
    """Store one chunk per selected row (`rows` bool `[B]`, default all) in its first free slot.

    keys, values: `[B, tau, n_kv, head_dim]` (cast to the memory dtype); emb: `[B, d]`. A selected
    row that is full is first evicted by `policy`. Everything written is under `stop_gradient`:
    the memory is never trained through.
    """
    _check_policy(policy, mem.capacity)
    batch = mem.valid.shape[0]
    _check_shape("keys", keys, (batch,) + mem.keys.shape[2:])
    _check_shape("values", values, (batch,) + mem.values.shape[2:])
    _check_shape("emb", emb, (batch, mem.emb.shape[2]))
    rows = jnp.ones((batch,), bool) if rows is None else jnp.asarray(rows, bool)
    full = rows & mem.valid.all(axis=1)
    # Eviction sorts the whole row: run it only when a selected row is full (once in about
    # capacity / 2 writes), not on every write.
    mem = mem.replace(valid=jax.lax.cond(full.any(),
                                         lambda: _evict_rows(mem, policy, full).valid,
                                         lambda: mem.valid))
    slot = jnp.argmax(~mem.valid, axis=1)

    def put(field, value):
        """One `dynamic_update_slice` per row (unselected rows get their old chunk back), which
        XLA performs in place inside `scan`; a batched scatter made it copy the whole memory
        for every chunk written. 16-bit float fields are updated through their bits
        (`float_bits`)."""
        value = jnp.broadcast_to(jax.lax.stop_gradient(jnp.asarray(value)).astype(field.dtype),
                                 (batch,) + field.shape[2:])
        dtype = field.dtype
        field, value = float_bits(field), float_bits(value)
        for row in range(batch):
            start = (row, slot[row]) + (0,) * (field.ndim - 2)
            old = jax.lax.dynamic_slice(field, start, (1, 1) + field.shape[2:])
            field = jax.lax.dynamic_update_slice(
                field, jnp.where(rows[row], value[row][None, None], old), start)
        return jax.lax.bitcast_convert_type(field, dtype)

    return mem.replace(keys=put(mem.keys, keys), values=put(mem.values, values),
                       emb=put(mem.emb, emb), valid=put(mem.valid, True),
                       insert_time=put(mem.insert_time, mem.clock), hits=put(mem.hits, 0),
                       clock=mem.clock + rows)


def write_chunks(mem: Memory, keys, values, emb, policy: str = "paper", rows=None) -> Memory:
    """Write n chunks per row in order: keys/values `[B, n, tau, n_kv, hd]`, emb `[B, n, d]`.

    `rows` selects rows (bool `[B]`) or individual chunks (bool `[B, n]`, e.g. to skip padding).
    """
    n = keys.shape[1]
    rows = jnp.ones((keys.shape[0], n), bool) if rows is None else jnp.asarray(rows, bool)
    rows = jnp.broadcast_to(rows[:, None] if rows.ndim == 1 else rows, keys.shape[:2])

    def step(m, chunk):
        k, v, e, r = chunk
        return write_chunk(m, k, v, e, policy, r), None

    chunks = tuple(jnp.moveaxis(x, 1, 0) for x in (keys, values, emb, rows))
    return jax.lax.scan(step, mem, chunks)[0]


def count_hits(mem: Memory, indices, found) -> Memory:
    """+1 hit per top-k selection (indices int `[B, k]`, found bool `[B, k]`) of a valid slot."""
    b = jnp.arange(indices.shape[0])[:, None]
    picked = found & mem.valid[b, indices]
    return mem.replace(hits=mem.hits.at[b, indices].add(picked.astype(jnp.int32)))


def gather_chunks(mem: Memory, indices, found):
    """The retrieved chunks' K/V, flattened over tokens, and a mask of the usable ones.

    Returns k_mem, v_mem `[B, k * tau, n_kv, head_dim]` and mask bool `[B, k * tau]`; picks that
    were not found (or point at an empty slot) are masked out.
    """
    batch, k = indices.shape
    b = jnp.arange(batch)[:, None]
    flat = lambda x: x[b, indices].reshape((batch, k * mem.tau) + x.shape[3:])
    mask = jnp.repeat(found & mem.valid[b, indices], mem.tau, axis=1)
    return flat(mem.keys), flat(mem.values), mask
