"""LLaMA decoder in Flax Linen with HF parameter names (`model.layers_3.self_attn.q_proj`...).

Besides the plain forward, the stack can be run a slice at a time (`run_layers`) with retrieved
memory in chosen layers, and a layer can emit only its pre-RoPE K/V (`memory_kv`): MemLong's
chunk scan is built from these pieces without a second copy of the model.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from memlong_jax.llama.attention import Attention, MemoryKV
from memlong_jax.llama.config import LlamaConfig
from memlong_jax.llama.layers import RMSNorm, SwiGLU, apply_rope, rope_cos_sin

# Rematerialisation of each decoder layer's forward in the backward pass, by name: what is kept.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderLayer(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg = self.config
        norm = lambda: RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype)
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg.hidden_size, cfg.num_attention_heads,
                                   cfg.num_key_value_heads, cfg.head_dim, self.dtype,
                                   self.param_dtype,
                                   (cfg.blockwise_min_length, cfg.blockwise_block),
                                   cfg.attention_kernel, cfg.attention_head_multiple)
        self.post_attention_layernorm = norm()
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, self.dtype, self.param_dtype)

    def __call__(self, h, cos, sin, memory: MemoryKV | None = None):
        """Causal over the tokens of `h`; Attention picks dense or blockwise by length."""
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, memory=memory)
        return h + self.mlp(self.post_attention_layernorm(h))

    def extend(self, h, cache, length, cos, sin, memory: MemoryKV | None = None):
        """`__call__` for new tokens appended to this layer's local KV cache (`Attention.extend`).
        Returns (h, updated cache)."""
        out, cache = self.self_attn.extend(self.input_layernorm(h), cache, length, cos, sin,
                                           memory)
        h = h + out
        return h + self.mlp(self.post_attention_layernorm(h)), cache

    def with_attention(self, h, attend):
        """This layer with its attention replaced by `attend(q, k, v) -> (out, aux)` on pre-RoPE
        q `[B, T, H, D]`, k, v `[B, T, KV, D]` (a caller-managed context, e.g. block memory).
        Returns (h, aux)."""
        q, k, v = self.self_attn.qkv(self.input_layernorm(h))
        out, aux = attend(q, k, v)
        h = h + self.self_attn.project_out(out)
        return h + self.mlp(self.post_attention_layernorm(h)), aux

    def memory_kv(self, h):
        """(normed input, pre-RoPE K, V) of this layer for hidden states `h` entering it."""
        x = self.input_layernorm(h)
        return (x, *self.self_attn.kv(x))


def cache_rope(config: LlamaConfig, window: int):
    """RoPE (cos, sin) `[1, W, head_dim]` of a local KV cache's slots: positions 1..W."""
    return rope_cos_sin(jnp.arange(1, window + 1)[None], config.head_dim, config.rope_theta)


def layer_memory(memory: MemoryKV | None, layer: int, retrieval_layers, head_dim: int,
                 theta: float):
    """The memory that `layer` reads: None outside `retrieval_layers`; with keys of
    len(retrieval_layers) * head_dim (`memory_kv=per_layer`), this layer's slice (layers in
    ascending order); keys with `positions` rotated there (`memory_positions=true|near`)."""
    if memory is None or layer not in retrieval_layers:
        return None
    if memory.keys.shape[-1] != head_dim:
        index = sorted(retrieval_layers).index(layer)
        part = lambda a: a[..., index * head_dim:(index + 1) * head_dim]
        memory = memory._replace(keys=part(memory.keys), values=part(memory.values))
    if memory.positions is None:
        return memory
    batch, shape = memory.keys.shape[0], memory.keys.shape
    cos, sin = rope_cos_sin(memory.positions.reshape(batch, -1), head_dim, theta)
    keys = apply_rope(memory.keys.reshape(batch, -1, *shape[-2:]).astype(jnp.float32), cos, sin)
    return memory._replace(keys=keys.reshape(shape), positions=None)


class _LlamaSettings(nn.Module):
    """The fields of `LlamaModel` and `LlamaForCausalLM`. `remat_policy` (a `REMAT_POLICIES`
    name) recomputes each layer's forward in the backward pass; `scan_layers` runs each stretch
    of consecutive layers that read no memory as one `lax.scan` over their stacked params (one
    layer's graph to compile instead of one per layer). The parameter tree is the same for
    every choice."""

    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: str = "none"
    scan_layers: bool = False


class LlamaModel(_LlamaSettings):
    """Embeddings, decoder stack and final norm: token ids -> final hidden states."""

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                                     param_dtype=self.param_dtype,
                                     embedding_init=nn.initializers.normal(0.02))
        layer = DecoderLayer if self.remat_policy == "none" else \
            nn.remat(DecoderLayer, policy=REMAT_POLICIES[self.remat_policy])
        self.layers = [layer(cfg, self.dtype, self.param_dtype)
                       for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype)

    def __call__(self, input_ids, positions=None):
        h = self.embed_tokens(input_ids)
        h = self.run_layers(h, positions, 0, self.config.num_hidden_layers)
        return self.norm(h)

    def run_layers(self, h, positions, start: int, stop: int,
                   memory: MemoryKV | None = None, retrieval_layers=()):
        """Layers `start..stop-1` over `h` `[B, T, hidden]`, causal within the T tokens; the
        layers listed in `retrieval_layers` also attend to `memory`."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(h.shape[1]), h.shape[:2])
        cfg = self.config
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        reads = lambda i: memory is not None and i in retrieval_layers
        i = start
        while i < stop:
            end = i + 1
            if self.scan_layers and not self.is_initializing():
                while end < stop and not reads(i) and not reads(end):
                    end += 1
            if end - i > 1:
                h = self._scan_layers(h, cos, sin, i, end)
            else:
                h = self.layers[i](h, cos, sin, layer_memory(memory, i, retrieval_layers,
                                                             cfg.head_dim, cfg.rope_theta))
            i = end
        return h

    def _scan_layers(self, h, cos, sin, start: int, stop: int):
        """Layers start..stop-1, none reading memory, as one `lax.scan` over their params
        stacked on a leading axis (remat as configured)."""
        stacked = jax.tree_util.tree_map(
            lambda *p: jnp.stack(p),
            *[self.layers[i].variables["params"] for i in range(start, stop)])
        layer = DecoderLayer(self.config, self.dtype, self.param_dtype, parent=None)
        body = lambda h, params: (layer.apply({"params": params}, h, cos, sin), None)
        if self.remat_policy != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat_policy])
        return jax.lax.scan(body, h, stacked)[0]

    def extend_layers(self, h, caches, length, start: int, stop: int,
                      memory: MemoryKV | None = None, retrieval_layers=(), rope=None):
        """`run_layers` for new tokens `h` `[B, T, hidden]` appended at slot `length` of the local
        KV caches of layers `start..stop-1` (`caches`: one `KVCache` of W slots per layer). Cached tokens have local positions 1..W by slot, the new ones
        `length+1..length+T`. `rope`: `cache_rope(config, W)` passed in from outside the jitted
        call (a decode step; made inside, XLA's fusion evaluates the tables' sin/cos again in
        every layer). Returns (h, updated caches)."""
        if not caches:  # an empty range of layers
            return h, ()
        cos, sin = rope if rope is not None else cache_rope(self.config, caches[0][0].shape[1])
        updated = []
        for i, cache in zip(range(start, stop), caches, strict=True):
            h, cache = self.layers[i].extend(h, cache, length, cos, sin, layer_memory(
                memory, i, retrieval_layers, self.config.head_dim, self.config.rope_theta))
            updated.append(cache)
        return h, tuple(updated)

    def attend_embeddings(self, h):
        """Logits through the (tied) input embedding matrix."""
        return self.embed_tokens.attend(h)


class LlamaForCausalLM(_LlamaSettings):
    """`LlamaModel` plus the LM head (tied to the embeddings or its own `lm_head`)."""

    def setup(self):
        self.model = LlamaModel(self.config, self.dtype, self.param_dtype, self.remat_policy,
                                self.scan_layers)
        if not self.config.tie_word_embeddings:
            self.lm_head = nn.Dense(self.config.vocab_size, use_bias=False, dtype=self.dtype,
                                    param_dtype=self.param_dtype,
                                    kernel_init=nn.initializers.normal(0.02))

    def __call__(self, input_ids, positions=None):
        """`[B, T]` int ids -> `[B, T, V]` logits (compute dtype)."""
        h = self.run_layers(self.embed(input_ids), positions, 0, self.config.num_hidden_layers)
        return self.final(h)

    def embed(self, input_ids):
        return self.model.embed_tokens(input_ids)

    def run_layers(self, h, positions, start, stop, memory=None, retrieval_layers=()):
        return self.model.run_layers(h, positions, start, stop, memory, retrieval_layers)

    def extend_layers(self, h, caches, length, start, stop, memory=None, retrieval_layers=(),
                      rope=None):
        return self.model.extend_layers(h, caches, length, start, stop, memory, retrieval_layers,
                                        rope)

    def layer_with_attention(self, h, layer: int, attend):
        return self.model.layers[layer].with_attention(h, attend)

    def memory_kv(self, h, layer: int):
        return self.model.layers[layer].memory_kv(h)

    def final(self, h):
        """Final norm and LM head: last-layer hidden states -> logits."""
        h = self.model.norm(h)
        if self.config.tie_word_embeddings:
            return self.model.attend_embeddings(h)
        return self.lm_head(h)
