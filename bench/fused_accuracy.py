"""How close the fused attention kernel (memlong_jax/llama/fused.py) comes to fp32 in bf16, next
to the dense path's own bf16 error, with no memory, shared memory and per-query-chunk memory.

Both paths round probabilities and outputs to bf16, in different places, so they cannot agree
bitwise; the fused kernel is right when its largest error against the fp32 dense reference is
about the dense bf16 path's. bench/gpu.py runs this on the GPU (cuDNN; it is the check that
needs one) and records the numbers; tests/test_fused_attention.py runs it with XLA on the CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from memlong_jax.llama.attention import MemoryKV, causal_mask, grouped_attention, with_memory
from memlong_jax.llama.fused import fused_causal_attention

MEMORY_FORMS = ("none", "shared", "per-chunk")


def random_qkv(seed, length, heads, kv_heads, head_dim, batch=2, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    # Scale 2 makes the softmax peaked enough that a wrong mask, scale or merge would show.
    q = 2.0 * jax.random.normal(kq, (batch, length, heads, head_dim))
    k = 2.0 * jax.random.normal(kk, (batch, length, kv_heads, head_dim))
    v = jax.random.normal(kv, (batch, length, kv_heads, head_dim))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def random_memory(seed, shape, kv_heads, head_dim, valid_fraction=0.7, dtype=jnp.float32):
    """MemoryKV of `shape` = (B, M) (shared) or (B, n, M) (per query chunk), some slots
    invalid."""
    kk, kv, km = jax.random.split(jax.random.PRNGKey(seed), 3)
    full = (*shape, kv_heads, head_dim)
    return MemoryKV((2.0 * jax.random.normal(kk, full)).astype(dtype),
                    jax.random.normal(kv, full).astype(dtype),
                    jax.random.uniform(km, shape) < valid_fraction)


def reference(q, k, v, memory=None):
    """The dense retrieval-causal path: memory prepended by `with_memory`, explicit mask."""
    keys, values, mask = k, v, causal_mask(q.shape[1], q.shape[1])
    if memory is not None:
        keys, values, mask = with_memory(k, v, mask, memory)
    return grouped_attention(q, keys, values, mask)


def bf16_errors(memory: str, impl: str, length: int, heads: int = 4, kv_heads: int = 2,
                head_dim: int = 100, slots: int = 32, chunks: int = 4, seed: int = 11) -> dict:
    """Largest and mean absolute error against the fp32 reference of the fused kernel (`impl`)
    and of the dense path, both in bf16; `slots` memory slots (per query chunk: `chunks` rows of
    them)."""
    q, k, v = random_qkv(seed, length, heads, kv_heads, head_dim, batch=1, dtype=jnp.bfloat16)
    shape = {"none": None, "shared": (1, slots), "per-chunk": (1, chunks, slots)}[memory]
    mem = shape and random_memory(seed + 1, shape, kv_heads, head_dim, dtype=jnp.bfloat16)
    fused = jax.jit(lambda *a: fused_causal_attention(*a, impl=impl))(q, k, v, mem)
    as_f32 = lambda tree: jax.tree.map(
        lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a, tree)
    with jax.default_matmul_precision("highest"):   # not TF32 on a GPU
        exact = np.asarray(jax.jit(reference)(*as_f32((q, k, v)), as_f32(mem)))
    dense = jax.jit(reference)(q, k, v, mem)
    errors = lambda out: np.abs(np.asarray(out, np.float32) - exact)
    return {"memory": memory, "length": length, "heads": heads, "kv_heads": kv_heads,
            "head_dim": head_dim, "implementation": impl, "dtype": str(fused.dtype),
            **{f"{name}_{stat}_abs_error": float(getattr(errors(out), stat)())
               for name, out in (("fused", fused), ("dense", dense)) for stat in ("max", "mean")}}
