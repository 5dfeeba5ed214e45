"""What the model does with its memory: the attention mass that each retrieval layer puts on the
retrieved chunks. Used by training's memory signals and by the reading diagnosis
(experiments/recall_diagnosis.py): a reading that drowns the local context shows a mass near 1,
a model that ignores memory a mass near 0.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from memlong_jax.llama.attention import MemoryKV, causal_mask, grouped_attention, with_memory
from memlong_jax.llama.layers import apply_rope, rope_cos_sin
from memlong_jax.llama.model import LlamaForCausalLM, layer_memory
from memlong_jax.memlong import scan
from memlong_jax.memlong.config import MemLongConfig


def memory_mass(module: LlamaForCausalLM, mcfg: MemLongConfig, params, h, positions,
                retrieved: MemoryKV, weights=None, at=None, skip: int = 0):
    """Attention mass on memory `[B, len(retrieval_layers), heads]` (retrieval layers in
    ascending order), averaged over the segment's queries (or taken at query index `at`), for
    hidden states `h` `[B, S, D]` entering the memory layer. Attention with values 1 on memory
    slots and 0 on local ones is that mass (the same `with_memory` + `grouped_attention` the
    model uses); the layers run between them as in `scan.forward_step`. `weights` `[B, M]`
    (0/1 per retrieved token): the mass on those memory tokens only (e.g. a pass key's). `skip`:
    the first queries (a context run in front of the segment) are left out of the average."""
    cfg = module.config
    apply = functools.partial(module.apply, {"params": params})
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    layers = sorted(mcfg.retrieval_layers)
    masses = []
    for layer in range(mcfg.memory_layer, layers[-1] + 1):
        if layer in layers:
            x, k, _ = apply(h, layer, method=module.memory_kv)
            kernel = params["model"][f"layers_{layer}"]["self_attn"]["q_proj"]["kernel"]
            q = (x @ kernel.astype(x.dtype)).reshape(*x.shape[:2], cfg.num_attention_heads,
                                                     cfg.head_dim)
            mem = layer_memory(retrieved, layer, mcfg.retrieval_layers, cfg.head_dim,
                               cfg.rope_theta)
            ones = mem._replace(values=jnp.ones_like(mem.keys) if weights is None else
                                jnp.broadcast_to(weights[:, :, None, None], mem.keys.shape)
                                .astype(mem.keys.dtype))
            keys, values, mask = with_memory(apply_rope(k, cos, sin), jnp.zeros_like(k),
                                             causal_mask(k.shape[1], k.shape[1]), ones)
            out = grouped_attention(apply_rope(q, cos, sin), keys, values, mask)
            out = out[..., 0].astype(jnp.float32)
            masses.append(out[:, skip:].mean(axis=1) if at is None else out[:, at])
        h = apply(h, positions, layer, layer + 1, retrieved, mcfg.retrieval_layers,
                  method=module.run_layers)
    return jnp.stack(masses, axis=1)


def segment_memory_mass(module: LlamaForCausalLM, mcfg: MemLongConfig, params,
                        state: scan.MemLongState, ids, key_emb=None, segment_query=None,
                        context=None):
    """`memory_mass` of segment `ids` `[B, S]` reading the memory of `state`, retrieved and run
    (with `context` in front, its queries left out) as `scan.forward_step` would."""
    _, (positions, h, *_), retrieved = scan.context_segment(
        module, mcfg, params, state, ids, key_emb, segment_query, context, need_emb=False)
    return memory_mass(module, mcfg, params, h, positions, retrieved,
                       skip=h.shape[1] - ids.shape[1])
