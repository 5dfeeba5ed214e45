"""Training with `prefix_overlap` (issue 15): each micro-step's block runs with the last chunk of
its stream's previous block in front (unwritten, unscored), the run's first micro-step alone.
The jitted training step is checked against a hand-written loop over micro-steps that builds
each context from the block before it (loss, gradients, memory)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from memlong_jax.llama.model import LlamaForCausalLM
from memlong_jax.memlong import scan
from memlong_jax.presets import PRESETS
from train import data as datamod
from train import lora, step as stepmod

from helpers import sharp_params

CFG = PRESETS["tiny"].model
TAU, SEQ, ACCUM, ROWS = 4, 8, 2, 2
MCFG = PRESETS["tiny"].memlong.replace(memory_tokens=64, prefix_context="window",
                                       prefix_overlap=1, memory_kv="per_layer",
                                       query_mode="chunk").validate(CFG)
T = types.SimpleNamespace(lora_alpha=8.0, lora_rank=4, lora_dropout=0.0, trainable="lora")


@pytest.fixture(scope="module")
def setup():
    module = LlamaForCausalLM(CFG)
    params = sharp_params(module, 3)
    frozen, trainable = lora.split(params, lora.plan(params, CFG, MCFG, "lora"), T.lora_rank,
                                   jax.random.PRNGKey(4))
    flat = traverse_util.flatten_dict(trainable)      # non-zero B: the context reaches the loss
    keys = jax.random.split(jax.random.PRNGKey(5), len(flat))
    trainable = traverse_util.unflatten_dict(
        {p: (0.3 * jax.random.normal(k, v.shape) if p[-1] == "lora_b" else v)
         for k, (p, v) in zip(keys, flat.items())})
    tokens = np.random.default_rng(6).integers(0, CFG.vocab_size, 12 * SEQ).astype(np.uint16)
    streams = datamod.Streams(datamod.Blocks(tokens, SEQ, 0.0), ROWS, ACCUM)
    return module, frozen, trainable, streams


def hand_step(module, frozen, trainable, mem, streams, step):
    """One optimizer step by hand: micro-step by micro-step, the context cut from the block the
    same stream read just before (none before the first), the loss averaged over micro-steps.
    Returns ((loss, memory), gradients)."""
    block = lambda m: jnp.asarray(np.stack([streams.tokens(m, r) for r in range(ROWS)]),
                                  jnp.int32)
    micros = range(step * ACCUM, (step + 1) * ACCUM)
    blocks = [block(m) for m in micros]
    contexts = [block(m - 1)[:, -TAU:] if m else None for m in micros]

    def loss(trainable, mem, blocks, contexts):
        params = lora.merge(frozen, trainable, T.lora_alpha / T.lora_rank)
        losses = []
        for ids, context in zip(blocks, contexts):
            mem, logits = scan.forward_step(module, MCFG, params, mem, ids, context=context)
            losses.append(scan.token_nll(logits[:, :-1], ids[:, 1:]).mean())
        return sum(losses) / len(losses), mem

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable, mem, blocks, contexts)


def test_training_step_equals_a_loop_over_micro_steps_with_the_previous_blocks_tail(setup):
    """Two optimizer steps of two micro-steps (SGD, lr 1: the update is the gradient): loss,
    gradients (1e-5) and memory equal the hand-written loop's; the first step's first
    micro-step runs alone, the second step's first one with the tail of the first step's last
    block."""
    module, frozen, trainable, streams = setup
    tx = optax.sgd(1.0)
    step_fn = jax.jit(stepmod.make_train_step(module, MCFG, T, tx, lambda s: 0.0))
    state = {"step": jnp.int32(0), "trainable": trainable, "opt_state": tx.init(trainable),
             "rng": jax.random.PRNGKey(0)}
    mem = hand_mem = scan.init_state(module, MCFG, ROWS)
    for step in range(2):
        context, has_context = streams.context(step, TAU)
        batch = {"ids": jnp.asarray(streams.batch(step)), "context": jnp.asarray(context),
                 "has_context": jnp.asarray(has_context)}
        before = state["trainable"]
        state, mem, metrics = step_fn(state, frozen, mem, batch)
        (loss, hand_mem), grads = hand_step(module, frozen, before, hand_mem, streams, step)
        np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
        moved = jax.tree_util.tree_map(jnp.subtract, before, state["trainable"])
        for got, want in zip(jax.tree_util.tree_leaves(moved), jax.tree_util.tree_leaves(grads)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
        for got, want in zip(jax.tree_util.tree_leaves(mem), jax.tree_util.tree_leaves(hand_mem)):
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                       atol=1e-5, rtol=0)
