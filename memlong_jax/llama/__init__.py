"""The base model: LLaMA config, layers (RMSNorm, RoPE, SwiGLU), attention and the Flax model."""
