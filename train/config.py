"""A training run's settings: a preset (`memlong_jax.presets`) with `--set key=value` overrides,
checked against each other and the model.

`--set key=value` overrides a training field (`memlong_jax.train_config.TrainConfig`);
`--set memlong.key=value` a MemLong field (`memlong_jax.memlong.config.MemLongConfig`), both
through `memlong_jax.settings.apply_overrides`. The resolved config (all three parts) is written
into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os

from memlong_jax.llama.config import LlamaConfig
from memlong_jax.memlong.config import MemLongConfig
from memlong_jax.presets import PRESETS
from memlong_jax.settings import ConfigError, apply_overrides, check, describe
from memlong_jax.train_config import TrainConfig
from train import adapter
from train.recall_mix import KINDS as RECALL_KINDS

MEMLONG_PREFIX = "memlong."


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Everything a run is defined by."""

    name: str
    train: TrainConfig
    memlong: MemLongConfig

    def to_dict(self) -> dict:
        return {"preset": self.name, "train": self.train.to_dict(),
                "memlong": self.memlong.to_dict()}


def resolve(name: str, assignments=()) -> Resolved:
    """The preset `name` with `key=value` overrides applied; raises ConfigError on bad input."""
    if name not in PRESETS:
        raise ConfigError(f"unknown config {name!r}; choose from {', '.join(PRESETS)}")
    base = PRESETS[name]
    parts = apply_overrides({"": base.train, MEMLONG_PREFIX[:-1]: base.memlong}, assignments)
    train = parts[""]
    given = {item.partition("=")[0].strip() for item in assignments}
    if "output_dir" not in given and train.model != base.train.model:
        train = train.replace(output_dir=f"out/train/{train.model}")
    return Resolved(name, train, parts[MEMLONG_PREFIX[:-1]])


def validate(run: Resolved, model: LlamaConfig) -> Resolved:
    """Check the settings against each other and the model; raise ConfigError on the first
    problem."""
    t, m = run.train, run.memlong.validate(model)
    check(t)
    if t.seq_len % m.chunk_size:
        raise ConfigError(f"seq_len ({t.seq_len}) must be a multiple of memlong.chunk_size "
                          f"({m.chunk_size})")
    if m.prefix_overlap * m.chunk_size > t.seq_len:
        raise ConfigError(f"memlong.prefix_overlap ({m.prefix_overlap} chunks) must fit in "
                          f"seq_len ({t.seq_len}): the context is the previous block's tail")
    if t.eval_batches:
        if t.eval_window % m.chunk_size or t.eval_length % m.chunk_size or \
                not 0 < t.eval_window <= t.eval_length:
            raise ConfigError(f"eval_window ({t.eval_window}) and eval_length ({t.eval_length}) "
                              f"must be multiples of memlong.chunk_size ({m.chunk_size}) with "
                              "0 < eval_window <= eval_length")
    for key in ("lr", "weight_decay", "clip", "adam_eps", "lora_alpha", "peak_tflops"):
        value = getattr(t, key)
        if not math.isfinite(value) or value < 0 or (key in ("lr", "adam_eps") and value == 0):
            raise ConfigError(f"{key} must be a finite number "
                              f"{'> 0' if key in ('lr', 'adam_eps') else '>= 0'}, got {value}")
    for key in ("adam_b1", "adam_b2"):
        if not 0 <= getattr(t, key) < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {getattr(t, key)}")
    if not 0 <= t.recall_fraction <= 1:
        raise ConfigError(f"recall_fraction must be in [0, 1], got {t.recall_fraction}")
    if t.init_adapter and not adapter.is_adapter(t.init_adapter):
        raise ConfigError(f"init_adapter {t.init_adapter!r} is not an adapter directory "
                          "(python -m train.export RUN DIR --adapter writes one)")
    if t.recall_episode < 2:
        raise ConfigError(f"recall_episode must be at least 2 blocks, got {t.recall_episode}")
    kinds = t.recall_kind_list
    if not kinds or not set(kinds) <= set(RECALL_KINDS):
        raise ConfigError(f"recall_kinds must name some of {', '.join(RECALL_KINDS)}, got "
                          f"{t.recall_kinds!r}")
    if not 0 <= t.val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {t.val_fraction}")
    if not 0 <= t.lora_dropout < 1:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {t.lora_dropout}")
    if m.memory_layer >= model.num_hidden_layers - 1:
        raise ConfigError("nothing to train: the memory layer is the last layer")
    if t.train_from != -1 and not m.memory_layer < t.train_from < model.num_hidden_layers:
        raise ConfigError(f"train_from must be -1 or in {m.memory_layer + 1}.."
                          f"{model.num_hidden_layers - 1} (above the memory layer), got "
                          f"{t.train_from}")
    if t.trainable == "lora":
        bad = [x for x in t.lora_target_list if x not in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj", "up_proj", "down_proj")]
        if bad or not t.lora_target_list:
            raise ConfigError(f"lora_targets must name projections (q_proj, k_proj, v_proj, "
                              f"o_proj, gate_proj, up_proj, down_proj), got {t.lora_targets!r}")
    if t.mesh_fsdp <= 0 or t.mesh_data == 0 or t.mesh_data < -1:
        raise ConfigError(f"mesh_data ({t.mesh_data}) must be -1 or positive and mesh_fsdp "
                          f"({t.mesh_fsdp}) positive")
    return Resolved(run.name, t, m)


def help_text() -> str:
    """The key table for `--help`: every key with its default in each preset, its help text and
    its allowed values (all from the fields' metadata)."""
    presets = list(PRESETS.values())
    return "\n".join(
        ["settings (--set key=value; defaults per preset: " + " | ".join(PRESETS) + "):",
         *describe([p.train for p in presets]),
         "MemLong settings (--set memlong.key=value; defaults per preset):",
         *describe([p.memlong for p in presets], MEMLONG_PREFIX)])


def model_config(run: Resolved) -> LlamaConfig:
    """The architecture: init_from's config.json when it exists, else the `model` preset."""
    path = run.train.init_from
    if path and os.path.isfile(os.path.join(path, "config.json")):
        return LlamaConfig.from_json_file(os.path.join(path, "config.json"))
    if run.train.model not in PRESETS:
        raise ConfigError(f"unknown model {run.train.model!r}; choose from "
                          f"{', '.join(PRESETS)}")
    return PRESETS[run.train.model].model
