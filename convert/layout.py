"""The one table that links HF tensor names to our parameter paths.

HF `nn.Linear` stores `[out, in]`, Flax `Dense` stores `[in, out]`: linear weights are transposed,
everything else is copied as is.
"""

from __future__ import annotations

import dataclasses

from memlong_jax.llama.config import LlamaConfig

_LAYER_TENSORS = (
    ("self_attn.q_proj", True), ("self_attn.k_proj", True), ("self_attn.v_proj", True),
    ("self_attn.o_proj", True), ("mlp.gate_proj", True), ("mlp.up_proj", True),
    ("mlp.down_proj", True), ("input_layernorm", False), ("post_attention_layernorm", False),
)


@dataclasses.dataclass(frozen=True)
class TensorSlot:
    hf_name: str
    path: tuple[str, ...]   # path inside our params tree
    transpose: bool


def tensor_slots(config: LlamaConfig) -> list[TensorSlot]:
    """Every HF tensor the model needs, in checkpoint order (embeddings, layers, norm, head)."""
    slots = [TensorSlot("model.embed_tokens.weight", ("model", "embed_tokens", "embedding"), False)]
    for i in range(config.num_hidden_layers):
        for name, is_linear in _LAYER_TENSORS:
            leaf = "kernel" if is_linear else "weight"
            slots.append(TensorSlot(f"model.layers.{i}.{name}.weight",
                                    ("model", f"layers_{i}", *name.split("."), leaf), is_linear))
    slots.append(TensorSlot("model.norm.weight", ("model", "norm", "weight"), False))
    if not config.tie_word_embeddings:
        slots.append(TensorSlot("lm_head.weight", ("lm_head", "kernel"), True))
    return slots


def get_path(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
