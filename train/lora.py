"""Trainable subtree, LoRA as a params transform, and merging for export.

The model is never changed. The base params are split into
  frozen     the base tree minus the leaves that training replaces, and
  trainable  a nested dict with the same paths holding: `lora_a` `[in, r]` / `lora_b` `[r, out]`
             beside each LoRA target's `kernel`, the replaced norm weights, or (mode `upper`)
             every leaf of the trainable layers.
`merge(frozen, trainable)` rebuilds a full params tree inside the loss with the effective weight
    W_eff = W + (alpha / r) * A @ B
so `value_and_grad` over `trainable` differentiates exactly the LoRA factors (and norms).
B starts at zero (PEFT's init), A uniform(+-1/sqrt(in)) (PEFT's kaiming_uniform(a=sqrt(5))), so
the merged model equals the base model at step 0.

LoRA dropout. PEFT computes x W + s * dropout(x) A B, an element-wise mask on every token's
input. A weight-space transform cannot do that per token; here dropout multiplies the rows of A
by a keep/(1-p) mask, i.e. dropout(x) = x * m with one mask m over input features per micro-step
and LoRA target, shared by all tokens of the micro-batch. Same expectation and the same rate
per feature, but correlated across tokens (a deviation from PEFT, documented in the report).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from memlong_jax.llama.config import LlamaConfig
from memlong_jax.memlong.config import MemLongConfig

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")


def first_trainable_layer(mcfg: MemLongConfig, train_from: int = -1) -> int:
    """By default layers strictly above the memory layer train (the memory layer itself stays
    frozen so stored K/V never go stale, as in the paper); `train_from` > memory layer starts
    higher (fewer trainable parameters)."""
    return mcfg.memory_layer + 1 if train_from < 0 else train_from


def _layer_of(path) -> int | None:
    if len(path) > 1 and path[0] == "model" and path[1].startswith("layers_"):
        return int(path[1].split("_")[1])
    return None


def plan(params, model: LlamaConfig, mcfg: MemLongConfig, mode: str, targets=ATTN,
         train_norms: bool = True, train_from: int = -1) -> dict:
    """flat path -> "lora" | "full" for each trainable base leaf."""
    start = first_trainable_layer(mcfg, train_from)
    out = {}
    for path in traverse_util.flatten_dict(params):
        layer = _layer_of(path)
        if layer is not None and layer >= start:
            if mode == "upper":
                out[path] = "full"
            elif path[-2] in targets and path[-1] == "kernel":
                out[path] = "lora"
            elif train_norms and path[-2] in NORMS:
                out[path] = "full"
        elif train_norms and path == ("model", "norm", "weight"):
            out[path] = "full"
    return out


def split(params, spec: dict, rank: int, rng) -> tuple[dict, dict]:
    """(frozen, trainable) from base `params` and a `plan`; trainable leaves are float32."""
    flat = traverse_util.flatten_dict(params)
    frozen, trainable = {}, {}
    keys = jax.random.split(rng, max(1, len(spec)))
    for n, (path, leaf) in enumerate(flat.items()):
        kind = spec.get(path)
        if kind == "full":
            trainable[path] = jnp.asarray(leaf, jnp.float32)
            continue
        frozen[path] = leaf
        if kind == "lora":
            d_in, d_out = leaf.shape
            bound = 1.0 / np.sqrt(d_in)
            trainable[path[:-1] + ("lora_a",)] = jax.random.uniform(
                keys[n % len(keys)], (d_in, rank), jnp.float32, -bound, bound)
            trainable[path[:-1] + ("lora_b",)] = jnp.zeros((rank, d_out), jnp.float32)
    return traverse_util.unflatten_dict(frozen), traverse_util.unflatten_dict(trainable)


def merge(frozen, trainable, scale: float, dropout: float = 0.0, rng=None):
    """Full params: frozen leaves, trainable replacements, and W + scale * (m*A) @ B for LoRA."""
    flat = dict(traverse_util.flatten_dict(frozen))
    extra = traverse_util.flatten_dict(trainable)
    for n, (path, leaf) in enumerate(sorted(extra.items())):
        if path[-1] == "lora_b":
            continue
        if path[-1] != "lora_a":
            flat[path] = leaf
            continue
        kernel_path = path[:-1] + ("kernel",)
        a, b = leaf, extra[path[:-1] + ("lora_b",)]
        if dropout and rng is not None:
            keep = jax.random.bernoulli(jax.random.fold_in(rng, n), 1.0 - dropout, (a.shape[0],))
            a = a * (keep.astype(a.dtype) / (1.0 - dropout))[:, None]
        w = flat[kernel_path]
        flat[kernel_path] = w.astype(jnp.float32) + scale * (a @ b)
    return traverse_util.unflatten_dict(flat)


def merged_for_export(frozen, trainable, scale: float, base_dtypes: dict | None = None):
    """The trained model as one plain params tree in the base storage dtypes (LoRA folded in);
    `base_dtypes` (flat path -> dtype) covers leaves that left `frozen`, e.g. trained norms."""
    dtypes = {p: leaf.dtype for p, leaf in traverse_util.flatten_dict(frozen).items()}
    dtypes.update(base_dtypes or {})
    merged = traverse_util.flatten_dict(merge(frozen, trainable, scale))
    return traverse_util.unflatten_dict(
        {p: jnp.asarray(leaf).astype(dtypes.get(p, leaf.dtype)) for p, leaf in merged.items()})


def count(tree) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))
