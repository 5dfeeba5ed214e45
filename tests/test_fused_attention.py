"""The fused attention kernel (`jax.nn.dot_product_attention`, XLA on this CPU) equals the dense
masked reference (`grouped_attention`, memory prepended by `with_memory`): padded head dims,
GQA, shared and per-query-chunk memory merged through its log-sum-exp, gradients, bf16, the
whole model and MemLong scoring; cuDNN is asked for only on a GPU (bench/gpu.py checks it there
through bench/fused_accuracy.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench.fused_accuracy import MEMORY_FORMS, bf16_errors, random_memory, random_qkv, reference
from helpers import random_token_ids, sharp_params
from memlong_jax.llama import fused
from memlong_jax.llama.fused import checked_implementation, fused_causal_attention
from memlong_jax.llama.model import LlamaForCausalLM
from memlong_jax.memlong import scan
from memlong_jax.presets import PRESETS
from memlong_jax.settings import ConfigError


def fused_jit(multiple=8):
    return jax.jit(lambda q, k, v, m: fused_causal_attention(q, k, v, m, multiple))


CASES = {  # name: (heads, kv_heads, head_dim, attention_head_multiple)
    "mha-d16": (4, 4, 16, 8), "gqa-d16": (6, 2, 16, 8),
    "gqa-d100-pad104": (4, 2, 100, 8), "gqa-d100-pad128": (4, 2, 100, 128),
    "mha-d37-odd": (2, 2, 37, 8)}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("memory", MEMORY_FORMS)
def test_matches_dense_reference(case, memory):
    heads, kv_heads, head_dim, multiple = CASES[case]
    length, seed = 48, sum(map(ord, case + memory))
    q, k, v = random_qkv(seed, length, heads, kv_heads, head_dim)
    mem = {"none": None, "shared": (2, 20), "per-chunk": (2, 4, 6)}[memory]
    mem = mem and random_memory(seed + 1, mem, kv_heads, head_dim)
    got = fused_jit(multiple)(q, k, v, mem)
    want = reference(q, k, v, mem)
    assert got.shape == q.shape and got.dtype == q.dtype
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    if mem is not None:   # the memory matters, and some slots are masked
        assert np.abs(np.asarray(want) - np.asarray(reference(q, k, v))).max() > 1e-2
        assert not bool(mem.valid.all()) and bool(mem.valid.any())


@pytest.mark.parametrize("shape", [(2, 10), (2, 4, 5)], ids=["shared", "per-chunk"])
def test_memory_without_a_valid_slot_is_plain_causal(shape):
    q, k, v = random_qkv(5, 40, 6, 2, 16)
    mem = random_memory(6, shape, 2, 16)
    mem = mem._replace(valid=mem.valid.at[0].set(False))   # row 0: nothing valid
    got = fused_jit()(q, k, v, mem)
    np.testing.assert_allclose(got[0], reference(q, k, v)[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got, reference(q, k, v, mem), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("memory", MEMORY_FORMS)
def test_gradients_match_dense_reference(memory):
    """Training may run the fused kernel: gradients of q, k, v and the memory K/V."""
    q, k, v = random_qkv(7, 32, 6, 2, 20)
    mem = random_memory(8, (2, 12) if memory == "shared" else (2, 4, 6), 2, 20)
    w = jax.random.normal(jax.random.PRNGKey(9), q.shape)   # non-uniform cotangents

    def loss(f):
        def total(q, k, v, mk, mv):
            m = None if memory == "none" else mem._replace(keys=mk, values=mv)
            return jnp.sum(w * f(q, k, v, m))
        return total

    args = (q, k, v, mem.keys, mem.values)
    got = jax.jit(jax.grad(loss(fused_causal_attention), argnums=range(5)))(*args)
    want = jax.grad(loss(reference), argnums=range(5))(*args)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)
    assert np.abs(np.asarray(want[0])).max() > 1e-2


@pytest.mark.parametrize("memory", MEMORY_FORMS)
def test_bf16_as_close_as_dense_bf16(memory):
    """bf16: the paths round probabilities and outputs to bf16 in different places, so they
    cannot agree bitwise; the fused error against fp32 is held to the dense path's. With memory
    the fused output is rounded once before the merge adds the memory's part and once after,
    so its largest error may reach about two bf16 steps (2.5x the dense path's, measured); the
    mean error shows the merge's own precision (1.2-1.4x the dense path's over three seeds;
    2.0-2.2x with the low part of the memory score dropped)."""
    errors = bf16_errors(memory, "xla", length=64)
    assert errors["fused_mean_abs_error"] <= 1.6 * errors["dense_mean_abs_error"], errors
    assert errors["fused_max_abs_error"] <= 3.0 * errors["dense_max_abs_error"], errors


def test_cudnn_is_asked_for_only_on_a_gpu(monkeypatch):
    assert fused.implementation("gpu") == "cudnn"
    assert fused.implementation("cpu") == "xla" and fused.implementation("tpu") == "xla"
    asked = []
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, implementation, **kw: asked.append(implementation) or
                        real(*a, implementation=implementation, **kw))
    cfg = PRESETS["tiny"].model.replace(attention_kernel="fused")
    model = LlamaForCausalLM(cfg, dtype=jnp.bfloat16)   # cuDNN on a GPU takes no fp32
    ids = jnp.zeros((1, 8), jnp.int32)
    model.apply(model.init(jax.random.PRNGKey(0), ids), ids)
    assert asked and set(asked) == {fused.implementation(jax.default_backend())}
    assert jax.default_backend() == "gpu" or set(asked) == {"xla"}


@pytest.mark.parametrize("dtype,head_dim,multiple,message", [
    (jnp.float32, 100, 8, "needs bfloat16 or float16 compute, got float32"),
    (jnp.bfloat16, 100, 5, "pads head_dim 100 to 100 (attention_head_multiple=5); cuDNN "
                           "needs a multiple of 8")])
def test_impossible_cudnn_settings_are_one_line_errors(dtype, head_dim, multiple, message):
    with pytest.raises(ConfigError, match=r"^attention_kernel=fused .*") as err:
        checked_implementation(head_dim, dtype, False, multiple, backend="gpu")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert checked_implementation(head_dim, dtype, False, multiple, backend="cpu") == "xla"
    assert checked_implementation(100, jnp.bfloat16, True, 8, backend="gpu") == "cudnn"


def test_unknown_kernel_is_a_config_error():
    with pytest.raises(ConfigError, match="attention_kernel must be one of"):
        PRESETS["tiny"].model.replace(attention_kernel="flash")


def tiny(kernel, **changes):
    return LlamaForCausalLM(PRESETS["tiny"].model.replace(head_dim=20, attention_kernel=kernel,
                                                          **changes))


def test_model_forward_equals_default_kernel():
    default = tiny("auto")
    params = sharp_params(default)
    ids = random_token_ids(0, default.config.vocab_size, length=37)
    want = jax.jit(default.apply)({"params": params}, ids)
    got = jax.jit(tiny("fused").apply)({"params": params}, ids)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not np.allclose(want[:, :-1], want[:, 1:])


@pytest.mark.parametrize("query_mode", ["causal", "chunk"])
def test_memlong_scoring_equals_default_kernel(query_mode):
    """Prefix into memory, then the window read with retrieved memory (one set per segment, or
    per query chunk): the NLL of every window token as the default kernel gives it."""
    default = tiny("auto")
    mcfg = PRESETS["tiny"].memlong.replace(query_mode=query_mode).validate(default.config)
    params = sharp_params(default)
    ids = random_token_ids(1, default.config.vocab_size, length=40)

    def nll(module, ids):
        state = scan.init_state(module, mcfg, ids.shape[0])
        return jax.jit(lambda p, i: scan.score_sequence(module, mcfg, p, state, i, 16)[1])(
            params, ids)

    want, got = nll(default, ids), nll(tiny("fused"), ids)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    without_memory = nll(default, ids[:, -16:])
    assert np.abs(np.asarray(want) - np.asarray(without_memory)).max() > 1e-3
