"""LLaMA decoder in Flax Linen with HF parameter names (`model.layers_3.self_attn.q_proj`...)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from memlong_jax.attention import Attention, causal_mask
from memlong_jax.config import LlamaConfig
from memlong_jax.layers import RMSNorm, SwiGLU, rope_cos_sin


class DecoderLayer(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h, cos, sin, mask):
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name=name)
        h = h + Attention(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                          self.dtype, self.param_dtype, name="self_attn")(
            norm("input_layernorm")(h), cos, sin, mask)
        return h + SwiGLU(cfg.hidden_size, cfg.intermediate_size, self.dtype, self.param_dtype,
                          name="mlp")(norm("post_attention_layernorm")(h))


class LlamaModel(nn.Module):
    """Embeddings, decoder stack and final norm: token ids -> final hidden states."""

    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                                     param_dtype=self.param_dtype,
                                     embedding_init=nn.initializers.normal(0.02))
        self.layers = [DecoderLayer(cfg, self.dtype, self.param_dtype)
                       for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype)

    def __call__(self, input_ids, positions=None):
        length = input_ids.shape[1]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length), input_ids.shape)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        mask = causal_mask(length, length)
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        return self.norm(h)

    def attend_embeddings(self, h):
        """Logits through the (tied) input embedding matrix."""
        return self.embed_tokens.attend(h)


class LlamaForCausalLM(nn.Module):
    """`LlamaModel` plus the LM head (tied to the embeddings or its own `lm_head`)."""

    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.model = LlamaModel(self.config, self.dtype, self.param_dtype)
        if not self.config.tie_word_embeddings:
            self.lm_head = nn.Dense(self.config.vocab_size, use_bias=False, dtype=self.dtype,
                                    param_dtype=self.param_dtype,
                                    kernel_init=nn.initializers.normal(0.02))

    def __call__(self, input_ids, positions=None):
        """`[B, T]` int ids -> `[B, T, V]` logits (compute dtype)."""
        return self.head(self.model(input_ids, positions))

    def head(self, h):
        if self.config.tie_word_embeddings:
            return self.model.attend_embeddings(h)
        return self.lm_head(h)
