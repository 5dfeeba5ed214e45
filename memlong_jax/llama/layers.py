"""Building blocks of the LLaMA decoder: RMSNorm, rotate-half RoPE, SwiGLU MLP.

Parameter names follow HF (`weight`, `gate_proj`, ...) so checkpoint conversion is transposes only.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
    """RMSNorm with the variance in fp32, the scale applied in the compute dtype (as HF does)."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(self.dtype)
        return weight.astype(self.dtype) * normed


def rope_cos_sin(positions, head_dim: int, theta: float):
    """cos/sin tables `[..., T, head_dim]` from integer position ids, computed in fp32.

    Computed from the ids rather than read from a max-position table, so any position (including
    MemLong's position 0 for memory keys) and any length work.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on `x` `[B, T, heads, head_dim]` with cos/sin `[B, T, head_dim]`."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def dense(features: int, name: str, dtype, param_dtype):
    """A bias-free projection, the only kind of linear layer LLaMA has."""
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=nn.initializers.normal(0.02))


class SwiGLU(nn.Module):
    """LLaMA MLP: down(silu(gate(x)) * up(x))."""

    hidden_size: int
    intermediate_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        gate = dense(self.intermediate_size, "gate_proj", self.dtype, self.param_dtype)(x)
        up = dense(self.intermediate_size, "up_proj", self.dtype, self.param_dtype)(x)
        return dense(self.hidden_size, "down_proj", self.dtype, self.param_dtype)(
            nn.silu(gate) * up)
