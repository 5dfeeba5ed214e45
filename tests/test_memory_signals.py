"""train/signals.py: the memory gain equals a direct computation with plain attention.

With each layer reading its own K/V at true positions and everything retrieved in every layer
from layer 0, MemLong's second block sees exactly what full attention over both blocks sees, and
a block read with empty memory is the plain model on that block alone; so the gain is computable
with the plain LLaMA forward, independently of the memory code.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from memlong_jax.llama.model import LlamaForCausalLM
from memlong_jax.memlong import scan
from memlong_jax.presets import PRESETS
from train import lora, signals

ALL_LAYERS = dict(memory_layer=0, retrieval_layers=(0, 1, 2, 3), memory_kv="per_layer",
                  memory_positions="true", top_k=4)


def _setup(seed):
    cfg = PRESETS["tiny"].model
    module = LlamaForCausalLM(cfg)
    params = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"]
    params = jax.tree_util.tree_map(lambda x: x * 3.0 if x.ndim == 2 else x, params)
    mcfg = PRESETS["tiny"].memlong.replace(**ALL_LAYERS).validate(cfg)
    spec = lora.plan(params, cfg, mcfg, "lora")
    frozen, trainable = lora.split(params, spec, 4, jax.random.PRNGKey(seed + 1))
    flat = traverse_util.flatten_dict(trainable)   # non-zero B: the merge matters
    keys = jax.random.split(jax.random.PRNGKey(seed + 2), len(flat))
    flat = {p: (0.3 * jax.random.normal(k, v.shape) if p[-1] == "lora_b" else v)
            for k, (p, v) in zip(keys, flat.items())}
    t = types.SimpleNamespace(lora_alpha=8.0, lora_rank=4)
    return cfg, module, mcfg, frozen, traverse_util.unflatten_dict(flat), t


def plain_nll(module, params, ids):
    """Per-token NLL `[B, T-1]` of the plain model over `ids` `[B, T]` (full causal attention)."""
    logits = module.apply({"params": params}, ids)
    return np.asarray(scan.token_nll(logits[:, :-1], ids[:, 1:]))


def test_memory_gain_equals_plain_attention():
    cfg, module, mcfg, frozen, trainable, t = _setup(0)
    mcfg = mcfg.replace(query_mode="chunk")   # per-chunk retrieval, as the recipe trains
    seq = 8                                   # two chunks per block; top-4 retrieves all
    ids = jax.random.randint(jax.random.PRNGKey(3), (2, 2, seq), 0, cfg.vocab_size)
    mem = scan.init_state(module, mcfg, 2)
    got = jax.jit(signals.make_signal_step(module, mcfg, t))(trainable, frozen, mem,
                                                            {"ids": ids})

    params = lora.merge(frozen, trainable, t.lora_alpha / t.lora_rank)
    first, second = ids[0], ids[1]
    alone = [plain_nll(module, params, block).mean() for block in (first, second)]
    both = plain_nll(module, params, jnp.concatenate([first, second], axis=1))[:, seq:]
    with_memory = (alone[0] + both.mean()) / 2
    without = np.mean(alone)
    np.testing.assert_allclose(got["signal_loss"], with_memory, rtol=1e-5)
    np.testing.assert_allclose(got["signal_loss_no_memory"], without, rtol=1e-5)
    np.testing.assert_allclose(got["memory_gain"], without - with_memory, atol=2e-5)
    assert abs(got["memory_gain"]) > 1e-3      # memory changes something on these weights
    masses = [got[f"memory_mass_l{layer}"] for layer in mcfg.retrieval_layers]
    assert all(0.0 < m < 0.5 for m in masses)  # micro-step 1 reads nothing: mass 0 there



def test_memory_gain_with_overlap_equals_plain_attention():
    """With `prefix_overlap=1` the second micro-step runs with the first block's last chunk in
    front, at the positions it had: [block 1 (memory); its last chunk again; block 2] is the
    plain model on that sequence with those positions (each token sees memory and the context
    as the model sees earlier tokens). Without memory, the plain model on [last chunk; block 2].
    The first micro-step has no context: its block alone either way."""
    cfg, module, mcfg, frozen, trainable, t = _setup(1)
    mcfg = mcfg.replace(query_mode="chunk", prefix_context="window", prefix_overlap=1)
    seq, tau = 8, mcfg.chunk_size
    ids = jax.random.randint(jax.random.PRNGKey(4), (2, 2, seq), 0, cfg.vocab_size)
    context = jnp.stack([jnp.zeros_like(ids[0, :, -tau:]), ids[0, :, -tau:]])
    batch = {"ids": ids, "context": context, "has_context": jnp.array([False, True])}
    mem = scan.init_state(module, mcfg, 2)
    got = jax.jit(signals.make_signal_step(module, mcfg, t))(trainable, frozen, mem, batch)

    params = lora.merge(frozen, trainable, t.lora_alpha / t.lora_rank)
    first, second = ids[0], ids[1]
    alone = plain_nll(module, params, first).mean()
    run = jnp.concatenate([first, first[:, -tau:], second], axis=1)
    positions = jnp.concatenate([jnp.arange(seq), jnp.arange(seq - tau, 2 * seq)])
    logits = module.apply({"params": params}, run, jnp.broadcast_to(positions, run.shape))
    with_memory = np.asarray(scan.token_nll(logits[:, seq + tau:-1], second[:, 1:])).mean()
    without = plain_nll(module, params, run[:, seq:])[:, tau:].mean()
    np.testing.assert_allclose(got["signal_loss"], (alone + with_memory) / 2, rtol=1e-5)
    np.testing.assert_allclose(got["signal_loss_no_memory"], (alone + without) / 2, rtol=1e-5)
    np.testing.assert_allclose(got["memory_gain"], (without - with_memory) / 2, atol=2e-5)
    assert abs(got["memory_gain"]) > 1e-3
    masses = [got[f"memory_mass_l{layer}"] for layer in mcfg.retrieval_layers]
    assert all(0.0 < m < 0.5 for m in masses)
