"""The converted-checkpoint directory: `config.json` (HF fields), `params/` (orbax), tokenizer.

    OUT/config.json     transformers-style LLaMA config, plus a `memlong_jax` section
    OUT/params/         orbax StandardCheckpointer tree, HF parameter names, stored dtype
    OUT/tokenizer*.json tokenizer files, when the source had them
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from memlong_jax.errors import UserError
from memlong_jax.io.safe_paths import contained_file, inside
from memlong_jax.llama.config import LlamaConfig
from memlong_jax.llama.model import LlamaForCausalLM

FORMAT_VERSION = 1
PARAMS_DIR = "params"


def abstract_params(config: LlamaConfig, dtype=jnp.float32):
    """Parameter shapes and dtypes via `jax.eval_shape`: nothing is allocated."""
    model = LlamaForCausalLM(config, param_dtype=dtype)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)["params"]


def param_count(config: LlamaConfig) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(abstract_params(config)))


def write_config(directory: str, config: LlamaConfig, **extra) -> None:
    data = config.to_hf_dict()
    data["memlong_jax"] = {"format_version": FORMAT_VERSION, **extra}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def save_params(directory: str, params) -> None:
    """Write the params tree (numpy or jax arrays, any dtype) under `directory/params`, from
    this process alone (in a multi-host run only one host exports)."""
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    checkpointer = ocp.StandardCheckpointer(multiprocessing_options=alone)
    # Host arrays: orbax refuses single-device jax arrays in a multi-host run.
    checkpointer.save(os.path.join(os.path.abspath(directory), PARAMS_DIR),
                      jax.device_get(params))
    checkpointer.wait_until_finished()


def load_params(directory: str, config: LlamaConfig):
    """Restore params in their stored dtype as host (numpy) arrays."""
    path = os.path.join(os.path.abspath(directory), PARAMS_DIR)
    if not os.path.isdir(path):
        raise UserError(f"{directory} is not a converted checkpoint (no {PARAMS_DIR}/ inside)")
    inside(directory, PARAMS_DIR, "parameter directory")
    try:
        metadata = ocp.StandardCheckpointer().metadata(path)
        stored = getattr(metadata, "item_metadata", metadata)
        target = jax.tree_util.tree_map(
            lambda shape, meta: jax.ShapeDtypeStruct(shape.shape, meta.dtype),
            abstract_params(config), dict(stored))
        return ocp.StandardCheckpointer().restore(path, target)
    except Exception as err:  # orbax / tensorstore on missing, truncated or foreign files
        lines = str(err).strip().splitlines()
        raise UserError(f"{directory}: cannot restore {PARAMS_DIR}/ ({type(err).__name__}: "
                        f"{lines[0][:200] if lines else ''}); the checkpoint is incomplete or "
                        "damaged") from None


def load_config(directory: str) -> LlamaConfig:
    path = contained_file(directory, "config.json", "config")
    if path is None:
        raise UserError(f"{directory} is not a converted checkpoint (no config.json)")
    return LlamaConfig.from_json_file(path)
