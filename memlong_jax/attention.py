"""Grouped-query self-attention with an explicit boolean mask, softmax in fp32, and MemLong's
retrieval-causal variant: one joint softmax over [retrieved memory keys ; local causal keys]."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from memlong_jax.layers import apply_rope, dense


class MemoryKV(NamedTuple):
    """Retrieved memory for one attention call: pre-RoPE keys (= RoPE position 0), values and
    which slots hold a real token. keys/values `[B, M, KV, D]`, valid `[B, M]` bool."""

    keys: jax.Array
    values: jax.Array
    valid: jax.Array


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


def with_memory(k, v, mask, memory: MemoryKV):
    """Prepend memory to the local keys: memory keys are not rotated (position 0) and visible to
    every query; invalid memory slots are masked. Returns keys, values, mask for one softmax."""
    batch, q_len = k.shape[:2]
    mem_mask = jnp.broadcast_to(memory.valid[:, None, :], (batch, q_len, memory.valid.shape[1]))
    local_mask = jnp.broadcast_to(mask, (batch, q_len, k.shape[1]))
    return (jnp.concatenate([memory.keys.astype(k.dtype), k], axis=1),
            jnp.concatenate([memory.values.astype(v.dtype), v], axis=1),
            jnp.concatenate([mem_mask, local_mask], axis=-1))


class Attention(nn.Module):
    """LLaMA self-attention: q/k/v/o projections (HF names), RoPE on q and k, GQA."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        proj = lambda features: dense(features, None, self.dtype, self.param_dtype)
        self.q_proj = proj(self.num_heads * self.head_dim)
        self.k_proj = proj(self.num_kv_heads * self.head_dim)
        self.v_proj = proj(self.num_kv_heads * self.head_dim)
        self.o_proj = proj(self.hidden_size)

    def kv(self, x):
        """Pre-RoPE keys and values `[B, T, KV, D]`: what MemLong's memory layer stores."""
        shape = (*x.shape[:2], self.num_kv_heads, self.head_dim)
        return self.k_proj(x).reshape(shape), self.v_proj(x).reshape(shape)

    def __call__(self, x, cos, sin, mask, memory: MemoryKV | None = None):
        """Causal self-attention; with `memory`, MemLong's retrieval-causal attention."""
        batch, length, _ = x.shape
        q = self.q_proj(x).reshape(batch, length, self.num_heads, self.head_dim)
        k, v = self.kv(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if memory is not None:
            k, v, mask = with_memory(k, v, mask, memory)
        out = grouped_attention(q, k, v, mask).reshape(batch, length, self.num_heads * self.head_dim)
        return self.o_proj(out)
