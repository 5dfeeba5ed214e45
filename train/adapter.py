"""Adapters: a run's trained parameters (LoRA factors and trained norms) with its config, in a
small directory that travels without the base weights. `train.export` writes and merges them;
`train.run --set init_adapter=DIR` starts a new run from one (continuing a finished run with
other settings: a fresh optimizer and schedule, the same trained parameters)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from memlong_jax.errors import UserError, atomic_output_dir

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Settings that shape the trained tree or its meaning (alpha scales it at merge): an adapter
# of other settings is another model.
LORA_SETTINGS = ("trainable", "lora_rank", "lora_alpha", "lora_targets", "train_norms",
                 "train_from")


def is_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def write(out_dir: str, stored: dict, step: int, trainable) -> None:
    """The trained tree (flattened, '/'-joined names) and the run's config, as `out_dir`."""
    flat = {"/".join(k): np.ascontiguousarray(v)
            for k, v in traverse_util.flatten_dict(trainable).items()}
    with atomic_output_dir(out_dir) as tmp:
        save_file(flat, os.path.join(tmp, ADAPTER_WEIGHTS))
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
            json.dump({"step": step, **stored}, f, indent=1)


def read(path: str):
    """(stored config, step, trainable tree) of an adapter directory."""
    try:
        with open(os.path.join(path, ADAPTER_CONFIG)) as f:
            stored = json.load(f)
        flat = load_file(os.path.join(path, ADAPTER_WEIGHTS))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable adapter ({err})") from None
    tree = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    return stored, stored.pop("step"), tree


def lora_differences(stored: dict, train) -> list[str]:
    """The LORA_SETTINGS in which an adapter's stored run differs from `train` (a TrainConfig)."""
    theirs = stored["run"]["train"]
    return [k for k in LORA_SETTINGS if theirs.get(k) != getattr(train, k)]


def start_from(path: str, train, model_hf: dict, fresh):
    """The adapter at `path` as the initial trainable tree of a run whose fresh tree is `fresh`
    (same structure, shapes and dtypes), after checking it was trained on the same architecture
    with the same LoRA settings."""
    stored, step, tree = read(path)
    diffs = lora_differences(stored, train)
    if stored.get("model") != model_hf:
        diffs.append("model")
    if diffs:
        raise UserError(f"init_adapter {path} (step {step}) was trained with other "
                        f"{', '.join(diffs)} than this run")
    want = {p: x.shape for p, x in traverse_util.flatten_dict(fresh).items()}
    got = {p: x.shape for p, x in traverse_util.flatten_dict(tree).items()}
    if got != want:
        raise UserError(f"init_adapter {path}: its parameters do not match this run's trainable "
                        "ones")
    return jax.tree_util.tree_map(lambda x, like: np.asarray(x, like.dtype), tree, fresh)
