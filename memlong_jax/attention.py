"""Grouped-query self-attention with an explicit boolean mask, softmax in fp32."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from memlong_jax.layers import apply_rope, dense


def causal_mask(q_len: int, k_len: int):
    """`[1, q_len, k_len]` bool; queries are the last `q_len` of `k_len` keys (bottom-right)."""
    q_idx = jnp.arange(q_len)[:, None] + (k_len - q_len)
    return (jnp.arange(k_len)[None, :] <= q_idx)[None]


def grouped_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d) masked) v with GQA, without repeating K/V per query head.

    q: `[B, T, H, D]`; k, v: `[B, S, KV, D]` with H a multiple of KV; mask: bool broadcastable
    to `[B, T, S]`. Scores and softmax are fp32 whatever the compute dtype.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(batch, q_len, heads, head_dim)


class Attention(nn.Module):
    """LLaMA self-attention: q/k/v/o projections (HF names), RoPE on q and k, GQA."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, mask):
        batch, length, _ = x.shape
        proj = lambda n, name: dense(n * self.head_dim, name, self.dtype, self.param_dtype)(x)
        q = proj(self.num_heads, "q_proj").reshape(batch, length, self.num_heads, self.head_dim)
        k = proj(self.num_kv_heads, "k_proj").reshape(batch, length, self.num_kv_heads, self.head_dim)
        v = proj(self.num_kv_heads, "v_proj").reshape(batch, length, self.num_kv_heads, self.head_dim)
        out = grouped_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, mask)
        out = out.reshape(batch, length, self.num_heads * self.head_dim)
        return dense(x.shape[-1], "o_proj", self.dtype, self.param_dtype)(out)
