"""Retrieval-causal attention against a slow, explicit, loop-based implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memlong_jax.llama.attention import Attention, MemoryKV, causal_mask
from memlong_jax.llama.layers import rope_cos_sin


def slow_rope(x, position, theta):
    """Rotate-half RoPE of one vector at one position, in float64."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = np.concatenate([position * inv, position * inv])
    rot = np.concatenate([-x[d // 2:], x[: d // 2]])
    return x * np.cos(ang) + rot * np.sin(ang)


def slow_retrieval_attention(x, params, mem_k, mem_v, mem_valid, heads, kv_heads, theta):
    """Per row and head: keys = [memory at position 0 (unrotated) ; local at 1..T], a mask built
    element by element, one softmax in float64, values [V_mem ; V]."""
    w = {n: np.asarray(params[n]["kernel"], np.float64) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    batch, length, _ = x.shape
    d = w["q_proj"].shape[1] // heads
    out = np.zeros((batch, length, heads * d))
    for b in range(batch):
        q = (x[b] @ w["q_proj"]).reshape(length, heads, d)
        k = (x[b] @ w["k_proj"]).reshape(length, kv_heads, d)
        v = (x[b] @ w["v_proj"]).reshape(length, kv_heads, d)
        for h in range(heads):
            g = h // (heads // kv_heads)
            keys = [mem_k[b, m, g] for m in range(mem_k.shape[1])]
            keys += [slow_rope(k[j, g], j + 1, theta) for j in range(length)]
            values = [mem_v[b, m, g] for m in range(mem_v.shape[1])] + [v[j, g] for j in range(length)]
            for i in range(length):
                qi = slow_rope(q[i, h], i + 1, theta)
                allowed = [bool(mem_valid[b, m]) for m in range(mem_k.shape[1])]
                allowed += [j <= i for j in range(length)]
                logits = np.array([qi @ key / np.sqrt(d) if ok else -np.inf
                                   for key, ok in zip(keys, allowed)])
                p = np.exp(logits - logits.max())
                p /= p.sum()
                out[b, i, h * d:(h + 1) * d] = p @ np.array(values)
    return out @ w["o_proj"]


def run_attention(module, params, x, memory, theta):
    positions = jnp.broadcast_to(jnp.arange(1, x.shape[1] + 1), x.shape[:2])
    cos, sin = rope_cos_sin(positions, module.head_dim, theta)
    mask = causal_mask(x.shape[1], x.shape[1])
    return module.apply({"params": params}, x, cos, sin, mask, memory)


def random_case(seed, heads, kv_heads, head_dim=10, hidden=40, length=7, mem_tokens=12):
    rng = np.random.default_rng(seed)
    module = Attention(hidden, heads, kv_heads, head_dim)
    x = rng.normal(size=(2, length, hidden)).astype(np.float32)
    mem_k = rng.normal(size=(2, mem_tokens, kv_heads, head_dim)).astype(np.float32)
    mem_v = rng.normal(size=(2, mem_tokens, kv_heads, head_dim)).astype(np.float32)
    valid = rng.random((2, mem_tokens)) < 0.6      # partially filled memory
    valid[1, :] = False                            # and a row with nothing retrieved
    params = module.init(jax.random.PRNGKey(seed), x, *rope_cos_sin(
        jnp.zeros((2, length)), head_dim, 1e4), causal_mask(length, length))["params"]
    params = jax.tree_util.tree_map(lambda p: p * 3.0, params)  # sharper softmax
    return module, params, x, mem_k, mem_v, valid


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_joint_softmax_matches_slow_reference(heads, kv_heads):
    module, params, x, mem_k, mem_v, valid = random_case(heads * 10 + kv_heads, heads, kv_heads)
    got = run_attention(module, params, x, MemoryKV(mem_k, mem_v, valid), 1e4)
    expected = slow_retrieval_attention(x.astype(np.float64), params, mem_k, mem_v, valid,
                                        heads, kv_heads, 1e4)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=1e-4)


def test_memory_changes_the_output_only_where_valid():
    module, params, x, mem_k, mem_v, valid = random_case(1, 4, 2)
    with_mem = run_attention(module, params, x, MemoryKV(mem_k, mem_v, valid), 1e4)
    without = run_attention(module, params, x, None, 1e4)
    assert np.abs(np.asarray(with_mem[0] - without[0])).max() > 1e-2   # row 0 has memory
    # Row 1 retrieved nothing: its masked memory terms are exact zeros (exp underflows), so only
    # the blocking of the fp32 sums can differ (measured 7e-9).
    np.testing.assert_allclose(np.asarray(with_mem[1]), np.asarray(without[1]), atol=1e-7)


def test_permuting_memory_tokens_changes_nothing():
    module, params, x, mem_k, mem_v, valid = random_case(2, 4, 2)
    perm = np.random.default_rng(5).permutation(mem_k.shape[1])
    a = run_attention(module, params, x, MemoryKV(mem_k, mem_v, valid), 1e4)
    b = run_attention(module, params, x, MemoryKV(mem_k[:, perm], mem_v[:, perm], valid[:, perm]), 1e4)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_bf16_memory_is_used_in_compute_dtype():
    module, params, x, mem_k, mem_v, valid = random_case(3, 4, 4)
    mem = MemoryKV(jnp.asarray(mem_k, jnp.bfloat16), jnp.asarray(mem_v, jnp.bfloat16), valid)
    got = run_attention(module, params, x, mem, 1e4)
    ref = run_attention(module, params, x, MemoryKV(np.asarray(mem.keys, np.float32),
                                                    np.asarray(mem.values, np.float32), valid), 1e4)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
