"""The user-facing model object: `memlong_jax.load(path)` -> `Model`."""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from memlong_jax.errors import UserError
from memlong_jax.eval import generation, scoring
from memlong_jax.io import checkpoint
from memlong_jax.io.loaded import Loaded
from memlong_jax.io.tokenizer import load_tokenizer
from memlong_jax.llama.config import DTYPES
from memlong_jax.llama.model import LlamaForCausalLM
from memlong_jax.memlong.config import MemLongConfig
from memlong_jax.memlong.retrievers import Retriever, make_retriever
from memlong_jax.presets import default_for, load_for_checkpoint


@dataclasses.dataclass
class Model(Loaded):
    """A converted LLaMA (`config` a LlamaConfig) and its jitted entry points."""

    memlong: MemLongConfig | None = None   # the checkpoint's MemLong settings (None: default)

    @property
    def memlong_config(self) -> MemLongConfig:
        return (self.memlong or default_for(self.config)).validate(self.config)

    @functools.cached_property
    def module(self) -> LlamaForCausalLM:
        return LlamaForCausalLM(self.config, dtype=self.dtype)

    @functools.cached_property
    def _logits_fn(self):
        return jax.jit(lambda params, ids: self.module.apply({"params": params}, ids))

    def logits(self, ids) -> jax.Array:
        """Plain forward, no memory: int `[B, T]` -> `[B, T, V]` logits."""
        return self._logits_fn(self.params, _check_ids(ids))

    def score(self, ids, mode: str = "memlong", local_window: int = 2048,
              scored_tokens: int | None = None, encoder=None) -> np.ndarray:
        """Per-token NLL `[B, P]` of the last P tokens of each row of `ids` `[B, N]`, one window
        of the scoring protocol (`memlong_jax.eval.scoring`): `memlong` sends the first
        N - local_window tokens through memory, `local` sees only the last local_window tokens,
        `full` attends over all N. P = min(scored_tokens, local_window, N) - 1. The text
        retriever uses `encoder` (default: the bundled all-MiniLM-L6-v2)."""
        ids = _check_ids(ids)
        mcfg = self.memlong_config
        protocol = scoring.Protocol((ids.shape[1],), local_window, scored_tokens or local_window)
        protocol.validate(mcfg.chunk_size)
        key = (protocol, id(encoder))
        if key not in self._scorers:
            self._scorers[key] = scoring.Scorer(self.module, self.params, mcfg, protocol,
                                                self.retriever(mcfg, encoder))
        return np.asarray(self._scorers[key].window_nll(mode, ids)[1])

    @functools.cached_property
    def _scorers(self) -> dict:
        return {}

    def retriever(self, mcfg: MemLongConfig, encoder=None) -> Retriever:
        """The retriever `mcfg` names, with this model's tokenizer; one per (settings, encoder),
        so the default text encoder (all-MiniLM-L6-v2) loads once, when first used."""
        key = (mcfg, id(encoder))
        if key not in self._retrievers:
            self._retrievers[key] = make_retriever(mcfg, self.tokenizer, encoder)
        return self._retrievers[key]

    @functools.cached_property
    def _retrievers(self) -> dict:
        return {}

    def generate(self, prompt_ids, max_new_tokens: int = 128, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_ids=None,
                 window: int = 2048, mcfg: MemLongConfig | None = None, encoder=None,
                 on_token=None) -> np.ndarray:
        """Generation with memory (`generation.Generator`): int prompt `[P]` or `[B, P]` of any
        length -> the new tokens `[n]` or `[B, n]`, n <= max_new_tokens.

        Greedy at temperature 0, else sampled (top_k 0 and top_p 1 mean no limit) with `seed`.
        Stops once every row has produced one of `stop_ids` (default: the config's eos; the
        stop token is included, later tokens of a finished row are the pad id). `window`: the
        local KV cache, a multiple of the chunk size. `mcfg` defaults to `memlong_config`;
        the text retriever uses `encoder` (default: the bundled all-MiniLM-L6-v2).
        `on_token(tokens)` streams each step's tokens (an int, or `[B]`) as they are chosen,
        in bursts of up to `generation.DEFAULT_RUN_STEPS` (the steps of one device call).
        """
        ids = np.asarray(prompt_ids)
        if ids.ndim not in (1, 2):
            raise UserError(f"prompt ids must be [P] or [B, P], got shape {ids.shape}")
        mcfg = mcfg or self.memlong_config
        if stop_ids is None:
            eos = self.config.eos_token_id
            stop_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        generator = generation.Generator(self.module, mcfg, window, self.retriever(mcfg, encoder))
        steps = []
        for tokens in generator.tokens(
                self.params, ids if ids.ndim == 2 else ids[None], max_new_tokens,
                generation.Sampling(temperature, top_k, top_p), stop_ids, seed,
                self.config.pad_token_id):
            steps.append(tokens)
            if on_token is not None:
                on_token(int(tokens[0]) if ids.ndim == 1 else tokens)
        out = np.stack(steps, axis=1)
        return out[0] if ids.ndim == 1 else out

    def encode(self, text: str) -> np.ndarray:
        if self.tokenizer is None:
            raise UserError("this checkpoint has no tokenizer files")
        return np.asarray(self.tokenizer.encode(text).ids, dtype=np.int32)


def _check_ids(ids) -> jax.Array:
    ids = jnp.asarray(ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise UserError(f"ids must be an int array [B, T], got {ids.dtype} {ids.shape}")
    return ids.astype(jnp.int32)


def load(path: str, dtype: str = "float32") -> Model:
    """Load a checkpoint written by `python -m convert.from_hf`.

    `dtype` is the compute dtype; params stay in their stored dtype until used.
    """
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such checkpoint directory")
    config = checkpoint.load_config(path)
    # On the device once: host (numpy) params would be copied in again by every jitted call
    # (a whole model per decoded token).
    params = jax.device_put(checkpoint.load_params(path, config))
    return Model(config, params, load_tokenizer(path), DTYPES[dtype],
                 load_for_checkpoint(path, config))
