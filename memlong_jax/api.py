"""The user-facing model object: `memlong_jax.load(path)` -> `Model`."""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from memlong_jax import checkpoint
from memlong_jax.config import LlamaConfig
from memlong_jax.errors import UserError
from memlong_jax.model import LlamaForCausalLM

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class Model:
    """A converted LLaMA: config, params (HF names), optional tokenizer, jitted entry points."""

    config: LlamaConfig
    params: dict
    tokenizer: object | None = None
    dtype: jnp.dtype = jnp.float32

    @functools.cached_property
    def module(self) -> LlamaForCausalLM:
        return LlamaForCausalLM(self.config, dtype=self.dtype)

    @functools.cached_property
    def _logits_fn(self):
        return jax.jit(lambda params, ids: self.module.apply({"params": params}, ids))

    def logits(self, ids) -> jax.Array:
        """Plain forward, no memory: int `[B, T]` -> `[B, T, V]` logits."""
        ids = jnp.asarray(ids)
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise UserError(f"ids must be an int array [B, T], got {ids.dtype} {ids.shape}")
        return self._logits_fn(self.params, ids.astype(jnp.int32))

    def encode(self, text: str) -> np.ndarray:
        if self.tokenizer is None:
            raise UserError("this checkpoint has no tokenizer files")
        return np.asarray(self.tokenizer.encode(text).ids, dtype=np.int32)


def load_tokenizer(path: str):
    tokenizer_file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tokenizer_file):
        return None
    from tokenizers import Tokenizer
    return Tokenizer.from_file(tokenizer_file)


def load(path: str, dtype: str = "float32") -> Model:
    """Load a checkpoint written by `python -m convert.from_hf`.

    `dtype` is the compute dtype; params stay in their stored dtype until used.
    """
    if dtype not in COMPUTE_DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(COMPUTE_DTYPES)}")
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such checkpoint directory")
    config = checkpoint.load_config(path)
    params = checkpoint.load_params(path, config)
    return Model(config, params, load_tokenizer(path), COMPUTE_DTYPES[dtype])
