"""Causal attention in one fused call, `jax.nn.dot_product_attention` (cuDNN flash attention on
a GPU, XLA elsewhere), with MemLong's retrieved memory merged exactly.

cuDNN takes only bf16/fp16 and head dims that are multiples of 8 (OpenLLaMA-3B has 100), so
q, k and v are zero-padded along head_dim (zeros change no dot product; the scale stays
1/sqrt(true head_dim)) and the output is sliced back.

Memory (the top-k retrieved chunks: small) is attended explicitly and merged with the fused
local causal part through its log-sum-exp: a softmax over [memory keys ; local keys] equals one
over [a single key of score lse_mem and value out_mem ; local keys]. That key goes first in the
fused call, behind a zero query row that keeps the call square and causal. Its score comes in
through two padded head dims (the query holds lse_mem / scale as a compute-dtype high part and
the rest, the key holds ones); its value is an indicator in a padded dim, so the fused output
is (1 - w) out_local in the real dims and the memory's weight w in the indicator, and the
result is that plus w out_mem. `return_residual=True` would hand back the local log-sum-exp
instead, but rounded to the compute dtype (bf16 keeps 8 significant bits: a log-sum-exp near 10
can be 0.03 off, which moves the merge weights by up to 3%) and cut off from the gradient; the
the extra key keeps the merge at fp32 precision, and its gradient is the fused call's own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from memlong_jax.settings import ConfigError

CUDNN_DTYPES = ("bfloat16", "float16")
MEMORY_DIMS = 2      # padded head dims that carry the memory key's score
NO_MEMORY = -1e30    # memory log-sum-exp of a query without a valid memory slot (weight 0)


def implementation(backend: str | None = None) -> str:
    """What `jax.nn.dot_product_attention` is asked for: 'cudnn' on a GPU backend (default:
    this process's), 'xla' elsewhere."""
    return "cudnn" if (backend or jax.default_backend()) == "gpu" else "xla"


def padded_width(head_dim: int, memory: bool, multiple: int) -> int:
    """head_dim (plus the memory key's score dims) rounded up to a multiple of `multiple`."""
    need = head_dim + (MEMORY_DIMS if memory else 0)
    return -(-need // multiple) * multiple


def checked_implementation(head_dim: int, dtype, memory: bool, multiple: int,
                           backend: str | None = None) -> str:
    """`implementation(backend)`, or a one-line `ConfigError` for settings cuDNN cannot run
    (its head-dim ceiling, 128 before Hopper and 256 from it, jax checks itself)."""
    chosen = implementation(backend)
    if chosen != "cudnn":
        return chosen
    name = jnp.dtype(dtype).name
    if name not in CUDNN_DTYPES:
        raise ConfigError(f"attention_kernel=fused runs cuDNN on a GPU, which needs bfloat16 "
                          f"or float16 compute, got {name}")
    width = padded_width(head_dim, memory, multiple)
    if width % 8:
        raise ConfigError(f"attention_kernel=fused pads head_dim {head_dim} to {width} "
                          f"(attention_head_multiple={multiple}); cuDNN needs a multiple of 8")
    return chosen


def fused_causal_attention(q, k, v, memory=None, multiple: int = 8, impl: str = "xla"):
    """Causal grouped attention of q `[B, T, H, D]` over k, v `[B, T, KV, D]` (H a multiple of
    KV) in one `jax.nn.dot_product_attention` call; with `memory` (a `MemoryKV`, shared or per
    query chunk) the retrieval-causal attention of `with_memory` + `grouped_attention`."""
    head_dim = q.shape[-1]
    scale = head_dim ** -0.5
    width = padded_width(head_dim, memory is not None, multiple)
    pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])
    attend = lambda q, k, v: jax.nn.dot_product_attention(
        pad(q), pad(k), pad(v), scale=scale, is_causal=True, implementation=impl)
    if memory is None:
        return attend(q, k, v)[..., :head_dim]
    mem_out, mem_lse = memory_attention(q, memory, scale)
    score = mem_lse / scale                      # the call multiplies q.k by `scale`
    high = score.astype(q.dtype)
    low = (score - high.astype(jnp.float32)).astype(q.dtype)   # what bf16 rounded off
    extra = lambda *x: jnp.array([0.0] * head_dim + list(x), q.dtype)   # a row [0 ... 0, x]
    in_front = lambda row, x: jnp.concatenate(
        [jnp.broadcast_to(row, (x.shape[0], 1, x.shape[2], row.shape[-1])), x], axis=1)
    widen = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, MEMORY_DIMS)])
    # Position 0: a zero query (dropped), the memory key (ones in the score dims: its score is
    # high + low) and its value (1 in the first extra dim: the output there is its weight).
    out = attend(in_front(extra(0, 0), jnp.concatenate([q, high[..., None], low[..., None]], -1)),
                 in_front(extra(1, 1), widen(k)), in_front(extra(1, 0), widen(v)))[:, 1:]
    weight = out[..., head_dim:head_dim + 1].astype(jnp.float32)
    return (out[..., :head_dim].astype(jnp.float32) + weight * mem_out).astype(q.dtype)


def memory_attention(q, memory, scale: float):
    """Each query's attention over its memory alone: shared memory is seen by every query, per
    query chunk the queries of chunk j see row j. Returns the output `[B, T, H, D]` and the
    log-sum-exp of the scaled scores `[B, T, H]` (NO_MEMORY where no slot is valid), fp32."""
    keys, values, valid = memory.keys, memory.values, memory.valid
    if not memory.per_chunk:   # one chunk holding every query
        keys, values, valid = keys[:, None], values[:, None], valid[:, None]
    batch, length, heads, head_dim = q.shape
    n, kv_heads = valid.shape[1], keys.shape[-2]
    if length % n:
        raise ValueError(f"{length} queries do not split into {n} query chunks")
    q = q.reshape(batch, n, length // n, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bntkgd,bnmkd->bnkgtm", q, keys.astype(q.dtype),
                        preferred_element_type=jnp.float32) * scale
    valid = valid[:, :, None, None, None, :]
    scores = jnp.where(valid, scores, jnp.finfo(jnp.float32).min)
    peak = jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True))
    weights = jnp.where(valid, jnp.exp(scores - peak), 0.0)
    total = weights.sum(axis=-1)
    seen = total > 0
    total = jnp.where(seen, total, 1.0)
    out = jnp.einsum("bnkgtm,bnmkd->bntkgd", weights.astype(q.dtype), values.astype(q.dtype),
                     preferred_element_type=jnp.float32)
    out = out / jnp.einsum("bnkgt->bntkg", total)[..., None]
    lse = jnp.where(seen, peak[..., 0] + jnp.log(total), NO_MEMORY)
    tokens = lambda x: x.reshape(batch, length, heads, *x.shape[5:])
    return tokens(out), tokens(jnp.einsum("bnkgt->bntkg", lse))
