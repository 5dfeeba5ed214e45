"""Setup shared by training, the dry run and export: the base parameters and their split into
frozen and trainable parts, and the run config read back from a checkpoint."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import traverse_util

from memlong_jax.errors import UserError
from memlong_jax.io import checkpoint
from memlong_jax.llama.config import DTYPES, LlamaConfig
from memlong_jax.llama.model import LlamaForCausalLM
from memlong_jax.memlong.config import MemLongConfig
from memlong_jax.memlong.retrievers import Retriever, make_retriever
from train import config as cfgmod
from train import data as datamod
from train import lora

CONVERT_HINT = {
    "openllama3b": "convert them first: python -m convert.from_hf "
                   "<open_llama_3b_v2 HF directory> {path} (or --set init_from=DIR)",
    "smollm2-135m": "create them with `make demo` (python -m convert.from_hf "
                    "<SmolLM2 GGUF> {path}) or --set init_from=DIR",
}


def make_run_retriever(run: cfgmod.Resolved, tokenizer=None) -> Retriever:
    """The run's retriever: the text one takes its keys from `key_table` when set, else from
    the encoder in `encoder_dir` (which then also makes segment queries)."""
    t, m = run.train, run.memlong
    table = datamod.KeyTable(t.key_table, m.chunk_size) if t.key_table else None
    return make_retriever(m, tokenizer, encoder_dir=t.encoder_dir, key_table=table)


def load_base(run: cfgmod.Resolved, model: LlamaConfig):
    """Base params cast to param_dtype: init_from's, or a seeded random init when empty."""
    t = run.train
    dtype = DTYPES[t.param_dtype]
    if t.init_from:
        if not os.path.isfile(os.path.join(t.init_from, "config.json")):
            hint = CONVERT_HINT.get(run.name, "convert a model with python -m convert.from_hf "
                                              "SRC {path}").format(path=t.init_from)
            raise UserError(f"no converted weights at {t.init_from}: {hint}")
        params = checkpoint.load_params(t.init_from, model)
    else:
        module = LlamaForCausalLM(model, param_dtype=jnp.float32)
        params = jax.jit(module.init)(jax.random.PRNGKey(t.seed),
                                      jnp.zeros((1, 1), jnp.int32))["params"]
    return jax.jit(lambda p: jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), p))(params)


def base_dtypes(params) -> dict:
    return {p: x.dtype for p, x in traverse_util.flatten_dict(params).items()}


def split_params(run, model, params):
    t = run.train
    spec = lora.plan(params, model, run.memlong, t.trainable, t.lora_target_list, t.train_norms,
                     t.train_from)
    rng = jax.random.fold_in(jax.random.PRNGKey(t.seed), 1)
    return jax.jit(lambda p, key: lora.split(p, spec, t.lora_rank, key))(params, rng)


def resolved_from_dict(data: dict) -> cfgmod.Resolved:
    return cfgmod.Resolved(data["preset"], cfgmod.TrainConfig(**data["train"]),
                           MemLongConfig.from_dict(data["memlong"]))
