"""What a network loaded from disk holds, for the base model (`api.Model`) and the retrieval
encoder (`retrievers.text_encoder.TextEncoder`) alike."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass
class Loaded:
    """A config, params under HF names, the tokenizer when present, the dtype to compute in."""

    config: object
    params: dict
    tokenizer: object | None = None
    dtype: jnp.dtype = jnp.float32
