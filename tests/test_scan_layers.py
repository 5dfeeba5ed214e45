"""`scan_layers`: stretches of layers that read no memory run as one `lax.scan` over stacked
params, and give the numbers (and gradients) of the plain layer loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_token_ids, sharp_params
from memlong_jax.llama.model import LlamaForCausalLM
from memlong_jax.memlong import scan
from memlong_jax.presets import PRESETS

CFG = PRESETS["tiny"].model.replace(num_hidden_layers=6)
# Layers 0-1 below memory (frozen, scanned), 2 reads memory alone, 3-5 above it (scanned).
MCFG = PRESETS["tiny"].memlong.replace(memory_layer=2, retrieval_layers=(2,))


def modules(remat="none"):
    return [LlamaForCausalLM(CFG, remat_policy=remat, scan_layers=s) for s in (False, True)]


def test_plain_forward_equals_the_loop():
    loop, scanned = modules()
    params = sharp_params(loop, seed=2)
    ids = random_token_ids(3, CFG.vocab_size, length=24)
    want = jax.jit(loop.apply)({"params": params}, ids)
    got = jax.jit(scanned.apply)({"params": params}, ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_memlong_steps_and_gradients_equal_the_loop(remat):
    """Two chunks of 8 tokens: the second reads what the first wrote; loss and gradients of
    every parameter (frozen stretch included) agree with the loop's."""
    loop, scanned = modules(remat)
    params = sharp_params(loop, seed=4)
    ids = random_token_ids(5, CFG.vocab_size, length=16)

    def loss(module, params):
        state = scan.init_state(module, MCFG, ids.shape[0])
        state, _ = scan.forward_step(module, MCFG, params, state, ids[:, :8])
        _, logits = scan.forward_step(module, MCFG, params, state, ids[:, 8:])
        return scan.token_nll(logits[:, :-1], ids[:, 9:]).mean()

    want, want_grads = jax.jit(jax.value_and_grad(lambda p: loss(loop, p)))(params)
    got, grads = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p)))(params)
    np.testing.assert_allclose(float(got), float(want), atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
    upper = want_grads["model"]["layers_4"]["mlp"]
    assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(upper)) > 0
