"""Blockwise (online-softmax) causal attention equals the dense masked path it replaces for
long sequences: values, gradients, bf16, retrieved memory in the same softmax, and the whole
model through `run_layers`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memlong_jax.llama.attention import (MemoryKV, blockwise_causal_attention, causal_mask,
                                   grouped_attention, with_memory)
from memlong_jax.llama.model import LlamaForCausalLM
from memlong_jax.presets import PRESETS


def qkv(seed, length, heads, kv_heads, head_dim=16, batch=2, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    # Scale 2 makes the softmax peaked enough that a wrong mask or max would show.
    q = 2.0 * jax.random.normal(kq, (batch, length, heads, head_dim))
    k = 2.0 * jax.random.normal(kk, (batch, length, kv_heads, head_dim))
    v = jax.random.normal(kv, (batch, length, kv_heads, head_dim))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def dense(q, k, v):
    return grouped_attention(q, k, v, causal_mask(q.shape[1], q.shape[1]))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("length,block", [(64, 16), (70, 16), (50, 8), (37, 64), (96, 32)])
def test_matches_dense(heads, kv_heads, length, block):
    q, k, v = qkv(length * 10 + block, length, heads, kv_heads)
    got = jax.jit(blockwise_causal_attention, static_argnums=3)(q, k, v, block)
    assert got.shape == q.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, dense(q, k, v), atol=1e-5, rtol=1e-5)


def test_is_causal():
    """Changing the last token's keys/values leaves every earlier output unchanged."""
    q, k, v = qkv(3, 40, 6, 2)
    out = blockwise_causal_attention(q, k, v, 16)
    out2 = blockwise_causal_attention(q, k.at[:, -1].add(5.0), v.at[:, -1].add(5.0), 16)
    np.testing.assert_array_equal(out[:, :-1], out2[:, :-1])
    assert not np.allclose(out[:, -1], out2[:, -1])


@pytest.mark.parametrize("length,block", [(48, 16), (45, 16)])
def test_gradients_match_dense(length, block):
    q, k, v = qkv(7, length, 6, 2)
    w = jax.random.normal(jax.random.PRNGKey(8), q.shape)  # a loss with non-uniform cotangents
    loss = lambda f: lambda q, k, v: jnp.sum(w * f(q, k, v))
    got = jax.jit(jax.grad(loss(lambda *a: blockwise_causal_attention(*a, block)),
                           argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)


def test_bf16_as_close_as_dense_bf16():
    """bf16 inputs: both paths round probabilities to bf16 before P@V and round the output to
    bf16 (~3 significant digits), in different places (per block vs. once), so they cannot agree
    bitwise; instead the blockwise error against fp32 must be no worse than the dense path's."""
    q, k, v = qkv(11, 70, 6, 2, dtype=jnp.bfloat16)
    got = blockwise_causal_attention(q, k, v, 16)
    assert got.dtype == jnp.bfloat16
    want = dense(*(x.astype(jnp.float32) for x in (q, k, v)))
    err = np.abs(np.asarray(got, np.float32) - want).max()
    dense_err = np.abs(np.asarray(dense(q, k, v), np.float32) - want).max()
    assert err <= 1.5 * dense_err, (err, dense_err)


def test_model_long_path_matches_dense():
    cfg = PRESETS["tiny"].model
    model = LlamaForCausalLM(cfg)
    ids = jax.random.randint(jax.random.PRNGKey(0), (2, 75), 0, cfg.vocab_size)
    params = model.init(jax.random.PRNGKey(1), ids)["params"]
    # Random init is small; scale the projections so attention is far from uniform.
    params = jax.tree.map(lambda p: p * 4.0 if p.ndim == 2 else p, params)
    dense_logits = jax.jit(model.apply)({"params": params}, ids)
    tiled = LlamaForCausalLM(cfg.replace(blockwise_min_length=64, blockwise_block=16))
    long_logits = jax.jit(tiled.apply)({"params": params}, ids)
    np.testing.assert_allclose(long_logits, dense_logits, atol=1e-5, rtol=1e-5)
    assert not np.allclose(long_logits[:, :-1], long_logits[:, 1:])  # non-trivial logits


def memory_kv(seed, slots, kv_heads, head_dim=16, batch=2, valid_fraction=0.7):
    kk, kv, km = jax.random.split(jax.random.PRNGKey(seed), 3)
    return MemoryKV(2.0 * jax.random.normal(kk, (batch, slots, kv_heads, head_dim)),
                    jax.random.normal(kv, (batch, slots, kv_heads, head_dim)),
                    jax.random.uniform(km, (batch, slots)) < valid_fraction)


def dense_with_memory(q, k, v, memory):
    keys, values, mask = with_memory(k, v, causal_mask(q.shape[1], q.shape[1]), memory)
    return grouped_attention(q, keys, values, mask)


@pytest.mark.parametrize("length,block,slots", [(64, 16, 24), (45, 16, 8), (33, 64, 40)])
def test_memory_matches_dense_retrieval_causal(length, block, slots):
    q, k, v = qkv(length + slots, length, 6, 2)
    memory = memory_kv(slots, slots, 2)
    got = jax.jit(blockwise_causal_attention, static_argnums=3)(q, k, v, block, memory)
    want = dense_with_memory(q, k, v, memory)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # the memory matters (a wrong visibility mask would not)
    assert np.abs(np.asarray(want) - np.asarray(dense(q, k, v))).max() > 1e-2


def test_memory_with_no_valid_slot_is_plain_causal():
    q, k, v = qkv(5, 40, 6, 2)
    memory = memory_kv(6, 16, 2, valid_fraction=0.0)
    assert not bool(memory.valid.any())
    np.testing.assert_allclose(blockwise_causal_attention(q, k, v, 16, memory), dense(q, k, v),
                               atol=1e-5, rtol=1e-5)


def test_memory_gradients_match_dense():
    q, k, v = qkv(9, 40, 6, 2)
    memory = memory_kv(10, 12, 2)
    w = jax.random.normal(jax.random.PRNGKey(8), q.shape)
    loss = lambda f: lambda q, k, v, mk, mv: jnp.sum(w * f(q, k, v, memory._replace(
        keys=mk, values=mv)))
    args = (q, k, v, memory.keys, memory.values)
    got = jax.jit(jax.grad(loss(lambda q, k, v, m: blockwise_causal_attention(q, k, v, 16, m)),
                           argnums=(0, 1, 2, 3, 4)))(*args)
    want = jax.grad(loss(dense_with_memory), argnums=(0, 1, 2, 3, 4))(*args)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)
